"""A pytest plugin that records where the test suite's time goes: one JSON line per test with its
wall-clock start and end, the xdist process that ran it, and the CPU seconds of that process and
of the children it waited for (worker processes, CLI commands) while the test ran.

Usage (BENCHMARKS.md section 10)::

    PYTHONPATH=bench TESTCLOCK_OUT=clock.jsonl python -m pytest -q -n 2 --dist loadfile -p testclock
    python bench/testclock.py clock.jsonl      # per process: when it ended, busy and CPU seconds;
                                               # per file: wall and CPU seconds, longest first

Processes a test starts but never waits for (a killed launcher's orphans) are not counted, nor
are database servers.
"""

from __future__ import annotations

import collections
import json
import os
import resource
import sys
import time
from collections.abc import Iterator

import pytest

_OUT = os.environ.get("TESTCLOCK_OUT", "clock.jsonl")


def _cpu() -> tuple[float, float]:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    start, (own, children) = time.time(), _cpu()
    yield
    end, (own_after, children_after) = time.time(), _cpu()
    with open(_OUT, "a", encoding="utf-8") as out:
        out.write(json.dumps({"id": item.nodeid, "worker": os.environ.get("PYTEST_XDIST_WORKER", "main"),
                              "start": start, "end": end, "self_cpu": own_after - own,
                              "child_cpu": children_after - children}) + "\n")


def summary(path: str) -> str:
    rows = [json.loads(line) for line in open(path, encoding="utf-8")]
    start = min(r["start"] for r in rows)
    lines = ["process  tests  ends at  busy s  CPU s"]
    for worker in sorted({r["worker"] for r in rows}):
        mine = [r for r in rows if r["worker"] == worker]
        lines.append(f"{worker:8} {len(mine):6} {max(r['end'] for r in mine) - start:8.0f} "
                     f"{sum(r['end'] - r['start'] for r in mine):7.0f} "
                     f"{sum(r['self_cpu'] + r['child_cpu'] for r in mine):6.0f}")
    files: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0, 0])
    for r in rows:
        entry = files[r["id"].split("::", 1)[0]]
        entry[0] += r["end"] - r["start"]
        entry[1] += r["self_cpu"] + r["child_cpu"]
        entry[2] += 1
    lines.append("")
    lines.append(f"{'file':44} {'wall s':>7} {'CPU s':>6} {'tests':>5}")
    for name, (wall, cpu, count) in sorted(files.items(), key=lambda item: -item[1][0]):
        lines.append(f"{name:44} {wall:7.0f} {cpu:6.0f} {count:5d}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(summary(sys.argv[1]))

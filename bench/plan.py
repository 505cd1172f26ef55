"""Planned studies (issue 21): what ``flexunet search plan`` asks for, and, with ``--run``, what
the planned study then does on this machine.

    python bench/plan.py --minutes 10 20 40                       # plan only: sizes and waste
    python bench/plan.py --minutes 10 20 40 --run                 # and run each as a user would
    python bench/plan.py --minutes 20 --throughput runs/plans/study.throughput.json

For each budget: the plan's image size, ``max_gflops``, space and timeout; the share of 300
configurations drawn at random from its space that the study would refuse as infeasible (the
study's own checks, :func:`search.spec.space.infeasible`); with ``--run``, the wall minutes of ``search
run`` plus ``search export``, the searched trials decided (complete, or pruned while training)
and the infeasible share of the trials it ran. Targets (issue 21): within the minutes +10%, at
least 8 decided, at most 5% infeasible. ``--quick`` plans 5 minutes at 32 px only.

The last line is ``plan_infeasible_share: VALUE`` (the largest of the budgets).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import ROOT, SAMPLE, headline, log, machine, search_outcome, write_json


def _waste(study_file: Path, draws: int = 300) -> float:
    import optuna

    from flexunet import config as cfg
    from search.spec import space
    from search.spec.study_file import load

    spec = load(study_file)
    base = cfg.load(ROOT / "tests" / "data" / "seed_ich.config")
    bounded = space.bounded(spec.space, spec.image_size, str(study_file))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    refused = 0
    for _ in range(draws):
        trial = study.ask()
        config = space.trial_config(base, spec, spec.image_size, space.suggest(trial, bounded))
        refused += space.infeasible(config, spec.budget) is not None
        study.tell(trial, 0.0)
    return refused / draws


def _run(study_file: Path, out: Path) -> dict[str, Any]:
    started = time.perf_counter()
    seconds = []
    for command in (["search", "run", study_file, "--out", out],
                    ["search", "export", study_file, "--run-dir", out, "--out", out / "best"]):
        subprocess.run([sys.executable, "-m", "flexunet.cli", *map(str, command)], check=True, cwd=ROOT)
        seconds.append(round(time.perf_counter() - started - sum(seconds), 1))
    minutes = (time.perf_counter() - started) / 60
    return {"minutes": round(minutes, 2), "run_seconds": seconds[0], "export_seconds": seconds[1],
            **search_outcome(out)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SAMPLE, help="what to plan (default: the bundled sample)")
    parser.add_argument("--minutes", type=float, nargs="+", default=[10, 20, 40])
    parser.add_argument("--throughput", type=Path, help="a throughput.json instead of measuring this device")
    parser.add_argument("--run", action="store_true", help="run each planned study and its export")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--keep", type=Path, help="write the plans and runs here (default: a temporary folder)")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    from flexunet.errors import FlexUNetError
    from search.spec import planner

    results = []
    throughput = args.throughput
    with tempfile.TemporaryDirectory(prefix="plan-bench-") as scratch:
        tmp = args.keep or Path(scratch)
        for minutes in ([5.0] if args.quick else args.minutes):
            out = Path(tmp) / f"plan-{minutes:g}" / "study.toml"
            started = time.perf_counter()
            try:
                plan = planner.plan(args.data, minutes, out=out, name=f"plan-{minutes:g}", throughput=throughput)
            except FlexUNetError as exc:  # an honest limit: recorded, not a crash
                log(minutes, "min: refused:", exc)
                results.append({"minutes_asked": minutes, "refused": str(exc)})
                continue
            seconds = time.perf_counter() - started
            throughput = throughput or out.parent / "study.throughput.json"  # measured once, reused
            row: dict[str, Any] = {"minutes_asked": minutes, "plan_seconds": round(seconds, 1),
                                   "image_size": plan.size.side, "max_gflops": plan.max_gflops,
                                   "base_filters": plan.base_filters, "num_layers": plan.num_layers,
                                   "kernels": plan.kernels, "expected_decided": round(plan.expected_trials, 1),
                                   "infeasible_share_of_draws": _waste(out)}
            log(minutes, "min:", *plan.lines())
            if args.run:
                row["run"] = _run(out, Path(tmp) / f"run-{minutes:g}")
                log("ran:", row["run"])
            results.append(row)
    write_json(args.json, {"machine": machine(), "results": results})
    shares = [r["infeasible_share_of_draws"] for r in results if "refused" not in r]
    headline("plan_infeasible_share", max(shares) if shares else "none planned", ".3f")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

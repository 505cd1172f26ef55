"""The connection budget of the real command: ``flexunet search run`` with K workers on a new
PostgreSQL database, its client connections polled in ``pg_stat_activity`` every 0.5 s.

The sample study shrunk to a smoke run (32 px, one epoch, 2 trials per worker; trials train
for real), once per worker count. Expected: K + 1 (one per worker, heartbeat included, and one
for the launcher); before the budget, about 2 per worker and 2 for the launcher.

    python bench/connections.py [--workers 1 4] [--json FILE]

Last line: ``connections_per_worker: X`` (the largest run's (peak - 1) / K).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import _common as c
import coordination as co
from scale import poll_connections


def one_run(workers: int, tmp: Path) -> dict[str, Any]:
    import sqlalchemy as sa

    with co.fresh_database(co.POSTGRES) as url:
        server = sa.engine.make_url(url)
        stop, peak = threading.Event(), [0]
        poller = threading.Thread(target=poll_connections, args=(
            server.set(database="postgres").render_as_string(hide_password=False), server.database, stop, peak, 0.5))
        poller.start()
        started = time.time()
        run = subprocess.run([sys.executable, "-m", "flexunet.cli", "search", "run", str(c.SAMPLE_STUDY),
                              "--storage", url, "--workers", str(workers), "--n-trials", str(2 * workers),
                              "--max-epochs", "1", "--image-size", "32", "--out", str(tmp / f"run-{workers}")],
                             capture_output=True, text=True)
        stop.set()
        poller.join()
    row = {"workers": workers, "peak_connections": peak[0], "exit": run.returncode, "seconds": time.time() - started}
    c.log(f"launcher with {workers} worker(s): peak {peak[0]} client connections (exit {run.returncode}, "
          f"{row['seconds']:.0f} s)" + ("" if run.returncode == 0 else f"\n{run.stderr[-2000:]}"))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--json", help="write every figure to this file")
    args = parser.parse_args()
    c.log("machine:", c.machine())
    tmp = Path(tempfile.mkdtemp(prefix="bench-connections-"))
    rows = [one_run(workers, tmp) for workers in args.workers]
    c.write_json(args.json, {"machine": c.machine(), "rows": rows})
    last = rows[-1]
    c.headline("connections_per_worker", (last["peak_connections"] - 1) / last["workers"], ".2f")


if __name__ == "__main__":
    main()

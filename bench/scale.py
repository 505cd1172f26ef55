"""Hundreds of no-op workers on one study: directly on PostgreSQL, and through one
``flexunet search proxy``.

Each worker is a process running the product's loop (``search.runtime.worker.run_trials``: the sweep,
the budget check, ``study.optimize`` with its heartbeat and stale-trial check) over the no-op
trial of ``bench/coordination.py`` (the sample study's parameters, the user attributes and
per-epoch reports a real trial writes, no training). Storages are opened as a worker opens them
(``search.store.storage.open_storage``: one connection per process; through the proxy, its gRPC client
with its heartbeat). For each worker count and mode:

- trials/s: completed trials over the time from the start signal to the last trial's end;
- ask and tell, p50 and p99 over every trial of every worker: ``ask`` is ``Study.ask`` (the
  trial's creation, with the study's read cache refreshed), ``tell`` the time from the
  objective's return to the end of ``optimize`` (Optuna's tell, with the heartbeat thread's stop);
- the database's peak connections (client backends of the bench database in
  ``pg_stat_activity``, polled every 0.25 s; the bench process itself holds one in the direct
  mode, none through the proxy);
- CPU seconds per trial of the proxy process and of the database server (all its processes);
- memory per worker: resident (RSS) and unique (USS, what the process does not share with the
  others: workers are forked from one preloaded server, as ``bench/memory.py`` does not), mean,
  read when every worker has joined; and the proxy's RSS at the end;
- trials lost (started, then neither finished nor queued again: 0) and counted (COMPLETE, which
  must be exactly ``n_trials``; trials a worker created after the budget was full are FAIL
  "over budget" and never count).

    python bench/scale.py [--workers 8 32 128 256] [--modes direct proxy] [--trials-per-worker 2]
                          [--min-trials 200] [--epochs 3] [--max-connections 300] [--json FILE]

The runs use a PostgreSQL server of their own (initdb + pg_ctl in a temporary folder, on a free
port, ``max_connections`` as given: 256 direct workers would take every connection of a shared
server), removed afterwards; or, with ``--server URL``, a new database on that server.

A worker count that memory cannot hold (free memory below 64 MiB per worker) is skipped and
said so. Last line: ``proxy_128_trials_per_s: X`` (or the largest proxied count that ran).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import _common as c
import coordination as co

PRELOAD = ["optuna", "sqlalchemy", "psycopg", "grpc", "search.store.storage", "search.store.proxy", "search.runtime.worker",
           "search.trial.lifecycle", "search.spec.space", "search.spec.study_file", "coordination"]
MIB_PER_WORKER = 64  # unique memory a forked no-op worker needs, with margin (53 MiB measured directly, 14 through the proxy: BENCHMARKS.md 14.3)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] if ordered else float("nan")


def _worker(url: str, name: str, n_trials: int, epochs: int, ready: Any, go: Any, out: Any) -> None:
    import optuna

    from search.store import storage as st

    from search.trial import lifecycle
    from search.runtime.worker import run_trials

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    space = co.sample_space()
    try:
        storage = st.open_storage(url, on_stale=lifecycle.stale_trial_callback)
    except st.ServerFull:
        ready.put(-os.getpid())  # turned away: counted, and the run goes on without it
        return
    study = st.load_study(storage, name, optuna.samplers.RandomSampler())
    objective = co.make_objective(space, epochs, [])
    asks: list[float] = []
    tells: list[float] = []
    ask, optimize = study.ask, study.optimize

    def timed_ask(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return ask(*args, **kwargs)
        finally:
            asks.append(time.perf_counter() - started)

    def timed_optimize(func: Any, **kwargs: Any) -> None:
        left: list[float] = []

        def timed(trial: Any) -> Any:
            try:
                return func(trial)
            finally:
                left.append(time.perf_counter())

        optimize(timed, **kwargs)
        if left:
            tells.append(time.perf_counter() - left[-1])

    study.ask, study.optimize = timed_ask, timed_optimize  # what run_trials and optimize call
    ready.put(os.getpid())
    go.wait()
    try:
        run_trials(study, objective, n_trials)
    except Exception as exc:  # counted as a worker that crashed; its trial is the others' to retry
        out.put((os.getpid(), asks, tells, f"{type(exc).__name__}: {exc}"))
        return
    out.put((os.getpid(), asks, tells, None))


def poll_connections(server: str, database: str, stop: threading.Event, peak: list[int], every: float = 0.25) -> None:
    """Keep in ``peak[0]`` the most client connections to ``database`` seen until ``stop``."""
    import sqlalchemy as sa

    engine = sa.create_engine(server, poolclass=sa.pool.NullPool)
    while not stop.is_set():
        with engine.connect() as connection:
            peak[0] = max(peak[0], connection.execute(sa.text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = :d AND backend_type = 'client backend'"),
                {"d": database}).scalar_one())
        stop.wait(every)
    engine.dispose()


def _memory(pids: list[int]) -> tuple[float, float]:
    import psutil

    rss, uss = [], []
    for pid in pids:
        try:
            info = psutil.Process(pid).memory_full_info()
        except (psutil.Error, OSError):
            continue
        rss.append(info.rss / 2**20)
        uss.append(info.uss / 2**20)
    return (sum(rss) / len(rss), sum(uss) / len(uss)) if rss else (float("nan"), float("nan"))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class _Proxy:
    def __init__(self, database: str, log: Path) -> None:
        self.port = _free_port()
        self.url = f"grpc://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "flexunet.cli", "search", "proxy", "--storage", database,
                                      "--port", str(self.port)], stdout=log.open("w"), stderr=subprocess.STDOUT)
        end = time.time() + 60
        while time.time() < end:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.2)
        raise RuntimeError(f"the proxy did not start: {log.read_text()}")

    def rss_mib(self) -> float:
        import psutil

        return psutil.Process(self.proc.pid).memory_info().rss / 2**20

    def cpu_s(self) -> float:
        import psutil

        times = psutil.Process(self.proc.pid).cpu_times()
        return times.user + times.system

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _server_cpu_s(postmaster: int | None) -> float | None:
    """CPU seconds of a PostgreSQL server so far: the postmaster, its ended backends (reaped
    children) and the live ones."""
    import psutil

    if postmaster is None:
        return None
    main = psutil.Process(postmaster)
    t = main.cpu_times()
    total = t.user + t.system + t.children_user + t.children_system
    for child in main.children(recursive=True):
        try:
            ct = child.cpu_times()
        except psutil.Error:
            continue
        total += ct.user + ct.system
    return total


def one_run(database: str, workers: int, mode: str, args: argparse.Namespace, tmp: Path,
            postmaster: int | None = None) -> dict[str, Any]:
    import sqlalchemy as sa
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    from search import keys as k
    from search.store import storage as st

    n_trials = max(args.min_trials, args.trials_per_worker * workers)
    name = f"scale-{mode}-{workers}-{uuid.uuid4().hex[:6]}"
    proxy = _Proxy(database, tmp / f"proxy-{name}.log") if mode == "proxy" else None
    url = proxy.url if proxy else database
    parent = st.open_storage(url, heartbeat=False)  # the bench's own: one connection directly, none by proxy
    study, _ = st.create_once(parent, name, ["maximize"])
    server = sa.engine.make_url(database)
    stop, peak = threading.Event(), [0]
    poller = threading.Thread(target=poll_connections, args=(
        server.set(database="postgres").render_as_string(hide_password=False), server.database, stop, peak))
    poller.start()
    ctx = mp.get_context("forkserver")
    ready, go, out = ctx.Queue(), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(url, name, n_trials, args.epochs, ready, go, out))
             for _ in range(workers)]
    started_at = time.time()
    for p in procs:
        p.start()
    answers = [ready.get(timeout=1800) for _ in procs]
    pids = [pid for pid in answers if pid > 0]
    joined_s = time.time() - started_at
    rss, uss = _memory(pids)
    db_cpu_before = _server_cpu_s(postmaster)
    proxy_cpu_before = proxy.cpu_s() if proxy else None
    begin = time.time()
    go.set()
    asks: list[float] = []
    tells: list[float] = []
    crashed: list[str] = []
    reported = 0
    while reported < len(pids):
        try:
            _, a, t, error = out.get(timeout=10)
        except queue.Empty:
            if not any(p.is_alive() for p in procs):
                break  # the rest died without a word (killed)
            continue
        reported += 1
        asks += a
        tells += t
        if error:
            crashed.append(error)
    for p in procs:
        p.join(timeout=120)
    stop.set()
    poller.join()
    proxy_rss = proxy.rss_mib() if proxy else None
    proxy_cpu = proxy.cpu_s() - proxy_cpu_before if proxy else None
    db_cpu = _server_cpu_s(postmaster) - db_cpu_before if postmaster else None
    trials = study.get_trials(deepcopy=False)
    if proxy:
        parent.close()
        proxy.stop()
    else:
        parent.engine.dispose()
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    over = [t for t in trials if t.system_attrs.get(k.OVER_BUDGET)]
    copied = {t.system_attrs.get(k.FAILED_TRIAL) for t in trials}
    lost = [t for t in trials if t.state.name in ("RUNNING", "WAITING")
            or (t.state.name == "FAIL" and not t.system_attrs.get(k.OVER_BUDGET) and t.number not in copied)]
    ended = max(t.datetime_complete.timestamp() for t in complete)
    # What a count over n_trials is made of: copies that completed beside an original that
    # finished after all (the 257 of 256 of an earlier run).
    by_number = {t.number: t for t in trials}
    doubles = [t.number for t in complete if t.system_attrs.get(k.FAILED_TRIAL) is not None
               and (orig := by_number.get(RetryHeartbeatStaleTrialCallback.retry_history(t)[-1]))
               and orig.state.name in ("COMPLETE", "PRUNED")]
    taken_over = sum(1 for t in trials if t.state.name == "FAIL" and t.user_attrs.get(k.FAIL_REASON) == "heartbeat stopped")
    row = {"workers": workers, "mode": mode, "n_trials": n_trials, "counted": len(complete), "lost": len(lost),
           "over_budget": len(over), "exact": len(complete) == n_trials,
           "completed_twice": doubles, "judged_stale": taken_over, "seconds": ended - begin,
           "trials_per_s": len(complete) / (ended - begin), "joined_s": joined_s,
           "ask_ms_p50": 1000 * _percentile(asks, 0.5), "ask_ms_p99": 1000 * _percentile(asks, 0.99),
           "tell_ms_p50": 1000 * _percentile(tells, 0.5), "tell_ms_p99": 1000 * _percentile(tells, 0.99),
           "peak_db_connections": peak[0], "rss_mib_per_worker": rss, "uss_mib_per_worker": uss,
           "proxy_rss_mib": proxy_rss,
           "proxy_cpu_s_per_trial": proxy_cpu / len(complete) if proxy_cpu is not None else None,
           "db_cpu_s_per_trial": db_cpu / len(complete) if db_cpu is not None else None, "turned_away": len(procs) - len(pids),
           "crashed": len(crashed) + len(pids) - reported, "crashes": sorted(set(crashed))[:5],
           "exit_codes_nonzero": sum(1 for p in procs if p.exitcode != 0)}
    c.log(f"{mode:<6} {workers:>4} workers: {row['counted']}/{n_trials} counted (exact: {row['exact']}), "
          f"{row['lost']} lost, {row['over_budget']} over budget, {taken_over} judged stale, {len(doubles)} completed twice; {row['trials_per_s']:.2f} trials/s; ask p50/p99 "
          f"{row['ask_ms_p50']:.0f}/{row['ask_ms_p99']:.0f} ms, tell {row['tell_ms_p50']:.0f}/{row['tell_ms_p99']:.0f}"
          f" ms; peak {peak[0]} DB connections ({row['turned_away']} workers turned away, {row['crashed']} crashed); {rss:.0f} MiB RSS ({uss:.0f} unique) per worker"
          + (f"; proxy {proxy_rss:.0f} MiB, {1000 * row['proxy_cpu_s_per_trial']:.0f} ms CPU per trial" if proxy else "")
          + (f"; database {1000 * row['db_cpu_s_per_trial']:.0f} ms CPU per trial" if postmaster else "")
          + f"; joined in {joined_s:.0f} s")
    return row


@contextmanager
def private_postgres(max_connections: int) -> Iterator[tuple[str, int | None]]:
    """A PostgreSQL server of this run's own; yields its URL (database ``postgres``) and the
    postmaster's pid."""
    bins = sorted(Path("/usr/lib/postgresql").glob("*/bin"))
    if not bins:
        raise SystemExit("PostgreSQL's server binaries (initdb, pg_ctl) are not installed: pass --server URL")
    root = Path(tempfile.mkdtemp(prefix="bench-scale-pg-", dir="/tmp"))
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
    port = _free_port()
    data = root / "data"
    ctl = [*as_postgres, str(bins[-1] / "pg_ctl"), "-D", str(data)]
    subprocess.run([*as_postgres, str(bins[-1] / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"],
                   check=True, capture_output=True)
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c max_connections={max_connections}"
    subprocess.run([*ctl, "-w", "-t", "60", "-l", str(root / "server.log"), "-o", options, "start"], check=True,
                   capture_output=True)
    try:
        postmaster = int((data / "postmaster.pid").read_text().split()[0])
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres", postmaster
    finally:
        subprocess.run([*ctl, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def _free_mib() -> float:
    import psutil

    return psutil.virtual_memory().available / 2**20


@contextmanager
def _given(url: str) -> Iterator[tuple[str, int | None]]:
    yield url, None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[8, 32, 128, 256])
    parser.add_argument("--modes", nargs="+", choices=("direct", "proxy"), default=["direct", "proxy"])
    parser.add_argument("--trials-per-worker", type=int, default=2)
    parser.add_argument("--min-trials", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=3, help="per no-op trial (reports and attributes)")
    parser.add_argument("--max-connections", type=int, default=300, help="of the bench's own PostgreSQL")
    parser.add_argument("--server", help="a PostgreSQL server URL to use instead of a server of the bench's own")
    parser.add_argument("--json", help="write every figure to this file")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))  # the servers are removed on the way out
    mp.set_forkserver_preload(PRELOAD)
    c.log("machine:", c.machine())
    rows: list[dict[str, Any]] = []
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-scale-{uuid.uuid4().hex[:6]}"
    tmp.mkdir()
    with (private_postgres(args.max_connections) if not args.server else _given(args.server)) as (server, postmaster), \
            co.fresh_database(server) as database:
        c.log(f"PostgreSQL {'of the bench, max_connections ' + str(args.max_connections) if not args.server else args.server}")
        for workers in args.workers:
            for mode in args.modes:
                if _free_mib() < MIB_PER_WORKER * workers:
                    c.log(f"{mode} {workers} workers: skipped, {_free_mib():.0f} MiB free < "
                          f"{MIB_PER_WORKER} MiB x {workers}")
                    rows.append({"workers": workers, "mode": mode, "skipped": "memory"})
                    continue
                rows.append(one_run(database, workers, mode, args, tmp, postmaster))
                c.write_json(args.json, {"machine": c.machine(), "rows": rows})  # after each: a long run may stop
    proxied = [r for r in rows if r["mode"] == "proxy" and "skipped" not in r]
    if proxied:
        best = next((r for r in proxied if r["workers"] == 128), proxied[-1])
        c.headline(f"proxy_{best['workers']}_trials_per_s", best["trials_per_s"], ".2f")


if __name__ == "__main__":
    main()

"""What coordinating trials through a storage costs, and how many workers one database holds.

A no-op trial does what a worker's trial does to the storage, without training: the worker's
budget check (``search.lifecycle.budget_left``), ``study.optimize(..., n_trials=1)`` (heartbeat
thread and stale-trial check on relational databases), the sample study's 12 parameters sampled
through ``search.space.suggest``, the user attributes the objective writes at the start and the
end of a trial, and per epoch what ``PruningReporter`` and the resume checkpoint write
(two user attributes, ``report``, ``should_prune`` with the sample study's pruner, the resume
epoch). Storages are opened with ``search.storage.open_storage``, as the product opens them.

1. One process, each storage (SQLite, PostgreSQL, MariaDB, journal file, journal on Redis):
   milliseconds per trial (median, and over the first and last 20 trials: the cost grows with
   the study), and the part spent per epoch.
2. PostgreSQL, 1, 2, 4 and 8 worker processes (multiprocessing, spawn) on one study: trials/s.
3. Against the training time of a real trial (``--trial-db``: a finished sample study, whose
   trials' ``train_seconds`` are used): the share of a trial spent coordinating, and how many
   workers the database would hold.

Every run uses new databases (PostgreSQL, MariaDB), an empty Redis database index, and temporary
files, all removed afterwards.

    python bench/coordination.py [--quick] [--trial-db sqlite:///runs/ct-ich-sample/study.db]
                                 [--trial-study ct-ich-sample] [--json FILE]

Last line: ``postgresql_trials_per_s: X`` (the most trials/s any worker count reached).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import socket
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import _common as c

POSTGRES = os.environ.get("FLEXUNET_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
MYSQL = os.environ.get("FLEXUNET_TEST_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306/test")
REDIS = os.environ.get("FLEXUNET_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
SETTINGS = {  # the shape of the objective's "settings" user attribute
    "image_width": 128, "image_height": 128, "image_channels": 1, "num_classes": 2, "input_normalize": True,
    "normalization": True, "base_filters": 16, "base_kernels": [3, 3], "num_layers": 5, "dropout_rate": 0.05,
    "dilation": [1, 1], "activation": "relu", "optimizer": "Adam", "learning_rate": 0.001,
    "loss": "categorical_crossentropy+dice_loss", "metrics": ["foreground_dice"], "show_summary": False,
    "epochs": 15, "batch_size": 4, "steps_per_epoch": 16, "patience": 6, "learning_rate_reducer": True,
    "reducer_factor": 0.5, "reducer_patience": 3, "reducer_min_lr": 1e-7, "epoch_change_infer": False,
    "num_infer_images": 0, "seed": 137, "augmentation": True, "augmentation_strength": 0.5,
}


# --- servers: a fresh database per run --------------------------------------------------------


@contextmanager
def fresh_database(url: str) -> Iterator[str]:
    import sqlalchemy

    server = sqlalchemy.engine.make_url(url)
    name = f"bench_coord_{uuid.uuid4().hex[:10]}"
    postgres = server.get_backend_name() == "postgresql"
    engine = sqlalchemy.create_engine(server.set(database="postgres" if postgres else None),
                                      isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(sqlalchemy.text(f"CREATE DATABASE {name}"))
    try:
        yield server.set(database=name).render_as_string(hide_password=False)
    finally:
        drop = f"DROP DATABASE IF EXISTS {name}" + (" WITH (FORCE)" if postgres else "")
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text(drop))
        engine.dispose()


@contextmanager
def empty_redis_db(url: str) -> Iterator[str]:
    """The first empty database index from 15 down to 8 (others may be in use); emptied after."""
    import redis

    root = url.rsplit("/", 1)[0] if url.count("/") >= 3 else url
    for index in range(15, 7, -1):
        candidate = f"{root}/{index}"
        client = redis.Redis.from_url(candidate)
        if client.dbsize() == 0:
            try:
                yield candidate
            finally:
                client.flushdb()
            return
    raise RuntimeError("no empty Redis database index among 8..15")


# --- the no-op trial ---------------------------------------------------------------------------


def sample_space() -> tuple:
    from search import space as sp
    from search import study_file

    return sp.bounded(study_file.load(c.SAMPLE_STUDY).space, 128, "bench")


def make_objective(space: tuple, epochs: int, loop_seconds: list[float]):
    from search import space as sp

    def objective(trial: Any) -> float:
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
        sp.suggest(trial, space)
        trial.set_user_attr("params", 1_000_000)
        trial.set_user_attr("gflops", 1.0)
        trial.set_user_attr("settings", SETTINGS)
        value = 0.0
        started = time.perf_counter()
        for epoch in range(epochs):
            value = (trial.number % 7 + epoch) / (epochs + 7)
            trial.set_user_attr("epoch", epoch + 1)  # PruningReporter
            trial.set_user_attr("last_val_foreground_dice", value)
            trial.report(value, step=epoch)
            trial.should_prune()  # asked, not obeyed: every trial costs the same
            if epoch == 0:  # Objective._save_resume_point
                trial.set_user_attr("resume_artifact", f"resume-{trial.number}")
            trial.set_user_attr("resume_epoch", epoch + 1)
        loop_seconds.append(time.perf_counter() - started)
        for key, v in (("train_seconds", 1.0), ("epochs_run", epochs), ("best_epoch", epochs),
                       ("stop_reason", "max_epochs"), ("seconds_per_epoch", 0.1), ("best_val_foreground_dice", value)):
            trial.set_user_attr(key, v)
        return value

    return objective


def open_study(url: str, name: str, create: bool):
    import optuna

    from search import storage as st

    storage = st.open_storage(url)
    from search import algorithms, study_file

    sampler = optuna.samplers.RandomSampler()  # the storage's cost, not TPE's
    pruner = algorithms.make_pruner(study_file.load(c.SAMPLE_STUDY))
    if create:
        return st.create_once(storage, name, ["maximize"], sampler, pruner)[0]
    return st.load_study(storage, name, sampler, pruner)


def run_trials(study: Any, space: tuple, n_trials: int, epochs: int) -> tuple[list[float], list[float]]:
    """The worker's loop; returns each trial's seconds and its epoch loop's seconds."""
    from search.lifecycle import budget_left

    objective = make_objective(space, epochs, loops := [])
    totals = []
    while True:
        started = time.perf_counter()
        if not budget_left(study, n_trials):
            break
        study.optimize(objective, n_trials=1)
        totals.append(time.perf_counter() - started)
    return totals, loops


def per_storage(name: str, url: str, args: argparse.Namespace, space: tuple) -> dict[str, Any]:
    study = open_study(url, f"coord-{uuid.uuid4().hex[:8]}", create=True)
    totals, loops = run_trials(study, space, args.trials, args.epochs)
    head, tail = totals[:20], totals[-20:]
    result = {
        "trials": len(totals), "epochs_per_trial": args.epochs,
        "ms_per_trial_median": 1000 * c.median(totals), "ms_per_trial_first20": 1000 * c.median(head),
        "ms_per_trial_last20": 1000 * c.median(tail),
        "ms_per_epoch_median": 1000 * c.median(loops) / args.epochs,
        "ms_outside_epochs_median": 1000 * (c.median(totals) - c.median(loops)),
        "total_s": sum(totals),
    }
    c.log(f"{name:<14} {result['ms_per_trial_median']:8.1f} ms/trial (first 20: {result['ms_per_trial_first20']:.1f}, "
          f"last 20: {result['ms_per_trial_last20']:.1f}); {result['ms_per_epoch_median']:.2f} ms per epoch; "
          f"{len(totals)} trials in {result['total_s']:.1f} s")
    return result


# --- many workers on PostgreSQL ----------------------------------------------------------------


def _worker(url: str, name: str, n_trials: int, epochs: int, ready: Any, go: Any, out: Any) -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    space = sample_space()
    study = open_study(url, name, create=False)
    ready.put(os.getpid())
    go.wait()
    totals, _ = run_trials(study, space, n_trials, epochs)
    out.put((os.getpid(), len(totals), time.time()))


def many_workers(url: str, workers: int, args: argparse.Namespace) -> dict[str, Any]:
    import optuna

    name = f"coord-w{workers}-{uuid.uuid4().hex[:6]}"
    open_study(url, name, create=True)
    ctx = mp.get_context("spawn")
    ready, out, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_worker, args=(url, name, args.parallel_trials, args.epochs, ready, go, out))
             for _ in range(workers)]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=300)
    started = time.time()
    go.set()
    finished = [out.get(timeout=1800) for _ in procs]
    for p in procs:
        p.join()
    ended = max(f[2] for f in finished)
    study = optuna.load_study(study_name=name, storage=url)
    states: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        states[t.state.name] = states.get(t.state.name, 0) + 1
    complete = states.get("COMPLETE", 0)
    rate = complete / (ended - started)
    c.log(f"postgresql, {workers} worker(s): {complete} trials in {ended - started:.1f} s = {rate:.2f} trials/s "
          f"(states {states}; per worker {[f[1] for f in finished]})")
    return {"workers": workers, "trials": complete, "seconds": ended - started, "trials_per_s": rate, "states": states}


# --- real trial times ---------------------------------------------------------------------------


def trial_times(url: str, name: str | None) -> dict[str, Any]:
    import optuna

    names = [name] if name else [s.study_name for s in optuna.get_all_study_summaries(url)]
    seconds, spe = [], []
    for n in names:
        for t in optuna.load_study(study_name=n, storage=url).get_trials(deepcopy=False):
            a = t.user_attrs
            if a.get("train_seconds"):
                seconds.append(float(a["train_seconds"]))
            if a.get("seconds_per_epoch") and a.get("epochs_run"):
                spe.append(float(a["seconds_per_epoch"]) * int(a["epochs_run"]))
    return {"studies": names, "trials": len(seconds), "train_seconds_median": c.median(seconds),
            "train_seconds_min": min(seconds) if seconds else None,
            "seconds_per_epoch_x_epochs_median": c.median(spe)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a run of under two minutes")
    parser.add_argument("--trial-db", help="storage URL of a finished sample study (real trial times)")
    parser.add_argument("--trial-study", help="study name in --trial-db (default: every study there)")
    parser.add_argument("--storages", nargs="+", default=["sqlite", "postgresql", "mysql", "journal-file", "journal-redis"])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--json", help="write every figure to this file")
    args = parser.parse_args()
    args.epochs = 10
    args.trials, args.parallel_trials = (15, 16) if args.quick else (200, 200)
    if args.quick and args.workers == [1, 2, 4, 8]:
        args.workers = [1, 2, 4]
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    c.log("machine:", c.machine())
    space = sample_space()
    results: dict[str, Any] = {"quick": args.quick, "machine": c.machine(), "storages": {}, "workers": []}
    tmp = Path(tempfile.mkdtemp(prefix="bench-coordination-"))
    c.log(f"one process, {args.trials} no-op trials of {args.epochs} epochs per storage")
    try:
        for kind in args.storages:
            if kind == "sqlite":
                results["storages"][kind] = per_storage(kind, f"sqlite:///{tmp / 'coord.db'}", args, space)
            elif kind == "journal-file":
                results["storages"][kind] = per_storage(kind, f"journal:{tmp / 'journal.log'}", args, space)
            elif kind == "journal-redis":
                with empty_redis_db(REDIS) as url:
                    results["storages"][kind] = per_storage(kind, url, args, space)
            else:
                with fresh_database(POSTGRES if kind == "postgresql" else MYSQL) as url:
                    results["storages"][kind] = per_storage(kind, url, args, space)
        if args.workers:
            c.log(f"postgresql, {args.parallel_trials} no-op trials per run shared by N worker processes")
            with fresh_database(POSTGRES) as url:
                for n in args.workers:
                    results["workers"].append(many_workers(url, n, args))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    best = max(results["workers"], key=lambda w: w["trials_per_s"]) if results["workers"] else None
    if args.trial_db:
        real = trial_times(args.trial_db, args.trial_study)
        results["real_trials"] = real
        t = real["train_seconds_median"]
        c.log(f"real trials ({real['trials']} in {real['studies']}): training {t:.1f} s median "
              f"(shortest {real['train_seconds_min']:.1f} s; seconds_per_epoch x epochs_run median "
              f"{real['seconds_per_epoch_x_epochs_median']:.1f} s)")
        for kind, r in results["storages"].items():
            share = r["ms_per_trial_median"] / 1000 / t
            c.log(f"  {kind:<14} coordination = {100 * share:.3f}% of a median trial")
        if best:
            c.log(f"  one PostgreSQL here completes at most {best['trials_per_s']:.1f} trials/s "
                  f"({best['workers']} workers): with trials of {t:.0f} s it would hold about "
                  f"{best['trials_per_s'] * t:,.0f} workers before coordination limits the study "
                  f"(trials of the shortest, {real['train_seconds_min']:.1f} s: {best['trials_per_s'] * real['train_seconds_min']:,.0f})")
    c.write_json(args.json, results)
    if best:
        c.headline("postgresql_trials_per_s", best["trials_per_s"], ".2f")
    else:
        first = next(iter(results["storages"]))
        c.headline(f"{first}_ms_per_trial", results["storages"][first]["ms_per_trial_median"], ".1f")


if __name__ == "__main__":
    main()

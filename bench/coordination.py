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
3. Growth (PostgreSQL): one study grown with ``study.add_trials`` to 100, 1,000 and 10,000
   finished trials; at each size, 1, 2, 4 and 8 worker processes run no-op trials (the storage's
   cost of a trial) and then time ``ask`` plus the space's ``suggest`` calls with the study's
   sampler (TPESampler, as in studies/ct_ich_sample.toml; one worker also with
   ``n_ei_candidates=8``). At 2,000 trials, ``study.get_trials(deepcopy=False)`` through
   flexunet's storage against a plain Optuna URL (both cached by Optuna; median of 20 calls).
4. Against the training time of a real trial (``--trial-db``: a finished sample study, whose
   trials' ``train_seconds`` are used): the share of a trial spent coordinating, and how many
   workers the database would hold.

Every run uses new databases (PostgreSQL, MariaDB), an empty Redis database index, and temporary
files, all removed afterwards.

    python bench/coordination.py [--quick] [--trial-db sqlite:///runs/ct-ich-sample/study.db]
                                 [--trial-study ct-ich-sample] [--parts storages workers growth]
                                 [--json FILE]

Last line: ``postgresql_trials_per_s: X`` (the most trials/s any worker count reached), or with
``--parts growth`` only, ``get_trials_flexunet_over_plain_url: X``.
"""

from __future__ import annotations

import argparse
import dataclasses
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
PARTS = ("storages", "workers", "growth")
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


# --- costs as the study grows (PostgreSQL) ------------------------------------------------------


def _prefill_chunk(url: str, name: str, start: int, count: int) -> None:
    """Add ``count`` finished trials like the sample study's (its parameters drawn at random,
    the user attributes a trial ends with) through ``study.add_trials``."""
    import optuna

    from search import space as sp

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    space = sample_space()
    scratch = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=start), direction="maximize")
    for i in range(count):
        trial = scratch.ask()
        sp.suggest(trial, space)
        for key, value in (("epochs_run", 10), ("train_seconds", 40.0), ("stop_reason", "max_epochs"),
                           ("best_val_foreground_dice", (start + i) % 97 / 100)):
            trial.set_user_attr(key, value)
        scratch.tell(trial, (start + i) % 97 / 100)
    open_study(url, name, create=False).add_trials(scratch.trials)


def prefill(url: str, name: str, count: int, processes: int = 2) -> float:
    """Grow the study by ``count`` trials, from a process per core (Optuna inserts a trial with
    a statement per parameter and attribute: CPU-bound); returns the seconds it took."""
    started = time.perf_counter()
    ctx = mp.get_context("spawn")
    per = -(-count // processes)
    chunks = [(k * per, min(per, count - k * per)) for k in range(processes) if count > k * per]
    procs = [ctx.Process(target=_prefill_chunk, args=(url, name, int(started) + first, n)) for first, n in chunks]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise RuntimeError(f"a prefill process exited with status {p.exitcode}")
    return time.perf_counter() - started


def get_trials_cost(url: str, name: str, calls: int) -> dict[str, Any]:
    """``study.get_trials(deepcopy=False)`` through flexunet's storage and through a plain URL
    (each loaded fresh, then called once to fill Optuna's cache): milliseconds per call."""
    import optuna

    from search import storage as st

    figures: dict[str, Any] = {}
    for label, storage in (("flexunet", st.open_storage(url)), ("plain_url", url)):
        study = optuna.load_study(study_name=name, storage=storage)
        first = time.perf_counter()
        n = len(study.get_trials(deepcopy=False))
        figures[f"{label}_first_ms"] = 1000 * (time.perf_counter() - first)
        times = []
        for _ in range(calls):
            started = time.perf_counter()
            study.get_trials(deepcopy=False)
            times.append(time.perf_counter() - started)
        figures[f"{label}_ms"] = 1000 * c.median(times)
        figures["trials"] = n
    figures["ratio"] = figures["flexunet_ms"] / figures["plain_url_ms"]
    return figures


def _growth_worker(url: str, name: str, noop: int, asks: int, epochs: int, samplers: list[dict[str, Any]],
                   ready: Any, go: Any, out: Any) -> None:
    import warnings

    import optuna

    from search import algorithms, study_file
    from search import space as sp
    from search import storage as st

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.simplefilter("ignore")
    space = sample_space()
    spec = study_file.load(c.SAMPLE_STUDY)
    study = open_study(url, name, create=False)
    objective = make_objective(space, epochs, [])
    ready.put(os.getpid())
    go.wait()
    trial_s = []
    for _ in range(noop):  # the storage's cost of a no-op trial (RandomSampler, as in part 1)
        started = time.perf_counter()
        study.optimize(objective, n_trials=1)
        trial_s.append(time.perf_counter() - started)
    ask_s: dict[str, list[float]] = {}
    for variant in samplers:  # the study's sampler (and variants): ask + the space's suggest calls
        changed = dataclasses.replace(spec, sampler=dataclasses.replace(
            spec.sampler, kwargs={**spec.sampler.kwargs, **variant}))
        sampler = algorithms.make_sampler(changed, f"bench-{os.getpid()}")
        tpe = optuna.load_study(study_name=name, storage=st.open_storage(url, heartbeat=False), sampler=sampler)
        times = ask_s.setdefault(_variant_name(variant), [])
        for _ in range(asks):
            started = time.perf_counter()
            trial = tpe.ask()
            sp.suggest(trial, space)
            times.append(time.perf_counter() - started)
            tpe.tell(trial, 0.5)
    out.put((os.getpid(), trial_s, ask_s))


def _variant_name(variant: dict[str, Any]) -> str:
    return "study" if not variant else ",".join(f"{k}={v}" for k, v in variant.items())


def growth(url: str, args: argparse.Namespace) -> dict[str, Any]:
    """One study grown to each size in turn; at each size, 1..8 workers run no-op trials (storage
    cost) and then time the sampler's ``ask``; at 2,000 trials, ``get_trials`` is timed."""
    import optuna

    name = f"coord-growth-{uuid.uuid4().hex[:6]}"
    open_study(url, name, create=True)
    results: dict[str, Any] = {"sizes": [], "get_trials": None}
    marks = sorted(set(args.sizes) | ({2000} if args.get_trials_at_2000 else set()))
    for size in marks:
        have = len(optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False))
        if size > have:
            seconds = prefill(url, name, size - have)
            c.log(f"growth: study grown from {have} to {size} trials in {seconds:.1f} s")
        if size == 2000 or (not args.get_trials_at_2000 and size == max(marks)):
            gt = get_trials_cost(url, name, calls=20)
            results["get_trials"] = gt
            c.log(f"get_trials(deepcopy=False) on {gt['trials']} trials: flexunet storage "
                  f"{gt['flexunet_ms']:.2f} ms, plain URL {gt['plain_url_ms']:.2f} ms (ratio {gt['ratio']:.2f}; "
                  f"first call {gt['flexunet_first_ms']:.0f} / {gt['plain_url_first_ms']:.0f} ms)")
        if size not in args.sizes:
            continue
        for workers in args.growth_workers:
            variants = [{}] + ([{"n_ei_candidates": 8}] if workers == 1 else [])
            ctx = mp.get_context("spawn")
            ready, out, go = ctx.Queue(), ctx.Queue(), ctx.Event()
            procs = [ctx.Process(target=_growth_worker, args=(url, name, args.growth_trials, args.growth_asks,
                                                              args.epochs, variants, ready, go, out))
                     for _ in range(workers)]
            for p in procs:
                p.start()
            for _ in procs:
                ready.get(timeout=300)
            go.set()
            finished = [out.get(timeout=3600) for _ in procs]
            for p in procs:
                p.join()
            trial_s = [x for f in finished for x in f[1]]
            row = {"size": size, "workers": workers, "ms_per_noop_trial": 1000 * c.median(trial_s)}
            for variant in variants:
                key = _variant_name(variant)
                row[f"ask_ms[{key}]"] = 1000 * c.median([x for f in finished for x in f[2][key]])
            results["sizes"].append(row)
            c.log(f"growth: {size:>6} trials, {workers} worker(s): no-op trial {row['ms_per_noop_trial']:.0f} ms; "
                  + "; ".join(f"ask {k[7:-1]} {v:.0f} ms" for k, v in row.items() if k.startswith("ask_ms")))
    for workers in args.growth_workers:
        rows = [r for r in results["sizes"] if r["workers"] == workers]
        if len(rows) >= 2:
            small, large = rows[0], rows[-1]
            c.log(f"growth, {workers} worker(s), {small['size']} -> {large['size']} trials: no-op trial x"
                  f"{large['ms_per_noop_trial'] / small['ms_per_noop_trial']:.2f}, ask x"
                  f"{large['ask_ms[study]'] / small['ask_ms[study]']:.2f}")
    return results


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
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                        help="what to measure (default: all)")
    parser.add_argument("--json", help="write every figure to this file")
    args = parser.parse_args()
    args.epochs = 10
    args.trials, args.parallel_trials = (15, 16) if args.quick else (200, 200)
    if args.quick and args.workers == [1, 2, 4, 8]:
        args.workers = [1, 2, 4]
    # Growth: study sizes, worker counts, no-op trials and sampler asks per worker at each.
    args.sizes, args.growth_workers = ([100, 400], [1, 2]) if args.quick else ([100, 1000, 10_000], [1, 2, 4, 8])
    args.growth_trials, args.growth_asks = (3, 3) if args.quick else (10, 8)
    args.get_trials_at_2000 = not args.quick
    if "storages" not in args.parts:
        args.storages = []
    if "workers" not in args.parts:
        args.workers = []
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    c.log("machine:", c.machine())
    space = sample_space()
    results: dict[str, Any] = {"quick": args.quick, "machine": c.machine(), "storages": {}, "workers": []}
    tmp = Path(tempfile.mkdtemp(prefix="bench-coordination-"))
    if args.storages:
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
        if "growth" in args.parts:
            c.log(f"postgresql, one study grown to {args.sizes} trials; {args.growth_workers} workers")
            with fresh_database(POSTGRES) as url:
                results["growth"] = growth(url, args)
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
    elif results.get("growth"):
        c.headline("get_trials_flexunet_over_plain_url", results["growth"]["get_trials"]["ratio"], ".2f")
    else:
        first = next(iter(results["storages"]))
        c.headline(f"{first}_ms_per_trial", results["storages"][first]["ms_per_trial_median"], ".1f")


if __name__ == "__main__":
    main()

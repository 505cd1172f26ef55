"""What coordinating trials through a storage costs, and how many workers one database holds.

A no-op trial does what a worker's trial does to the storage, without training: the worker's
loop (``search.runtime.worker.run_trials``: ``lifecycle.sweep``, ``lifecycle.budget_left``, then
``study.optimize(lifecycle.guarded(...), n_trials=1)`` with its heartbeat thread and stale-trial
check on relational databases, and ``lifecycle.start``'s host, pid and budget check), the sample
study's parameters sampled through ``search.spec.space.suggest``, the user attributes the objective
writes at the start and the end of a trial, and per epoch what ``PruningReporter`` and the
resume checkpoint write (two user attributes, ``report``, ``should_prune`` with the sample
study's pruner, the resume epoch). Storages are opened with ``search.store.storage.open_storage``, as
the product opens them.

1. ``storages``: one process, each storage (SQLite, PostgreSQL, MariaDB, journal file, journal
   on Redis): milliseconds per trial (median, and over the first and last 20 trials), and the
   part spent per epoch.
2. ``workers``: PostgreSQL, N worker processes (spawn) running ``search.runtime.worker.run_trials`` on
   one study of ``n_trials`` trials: trials/s, and whether exactly ``n_trials`` trials counted
   (a trial created after the budget was full is FAIL "over budget", never counted).
3. ``growth``: PostgreSQL; for 100, 1,000 and 10,000 trials and 1, 2, 4 and 8 worker processes,
   a new study filled with that many finished trials like a worker's (made in memory, written in
   one transaction by ``search.store._internals.bulk_add_trials``); the workers run no-op trials (the
   storage's cost, RandomSampler) and then time ``ask`` plus the space's ``suggest`` calls with
   the study's sampler (TPESampler as in studies/*.toml: multivariate, group) and variants
   (one worker: ``n_ei_candidates=8``, independent TPE, ``constant_liar``; all: the window of
   ``search.spec.window``). ``study.get_trials(deepcopy=False)`` on 2,000 trials through flexunet's
   storage against a plain Optuna URL (both cached by Optuna; median of 20 calls).
4. ``window``: in memory, what the window costs in quality: the study's TPE with and without a
   window on a cheap synthetic objective over the sample study's space (best value, mean of
   the last 100 trials, over a few seeds).
5. With ``--trial-db`` (a finished sample study, whose trials' ``train_seconds`` are used):
   the share of a trial spent coordinating, and how many workers the database would hold.

Every run uses new databases (PostgreSQL, MariaDB), an empty Redis database index, and temporary
files, all removed afterwards.

    python bench/coordination.py [--quick] [--trial-db sqlite:///runs/ct-ich-sample/study.db]
                                 [--trial-study ct-ich-sample] [--parts storages workers growth window]
                                 [--workers 2 8] [--json FILE]

Last line: ``postgresql_trials_per_s: X`` (the most trials/s any worker count reached), or
without the workers part ``get_trials_flexunet_over_plain_url: X`` (growth), or
``window_best_minus_full_best: X`` (window only).
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing as mp
import os
import shutil
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
PARTS = ("storages", "workers", "growth", "window")
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
    from search.spec import space as sp
    from search.spec import study_file

    return sp.bounded(study_file.load(c.SAMPLE_STUDY).space, 128, "bench")


def make_objective(space: tuple, epochs: int, loop_seconds: list[float]):
    """What a worker's objective writes to the storage, without training (keys: search.keys)."""
    from search import keys as k
    from search.spec import space as sp

    def objective(trial: Any) -> float:
        sp.suggest(trial, space)
        trial.set_user_attr(k.PARAMS, 1_000_000)
        trial.set_user_attr(k.GFLOPS, 1.0)
        trial.set_user_attr(k.SETTINGS, SETTINGS)
        value = 0.0
        started = time.perf_counter()
        for epoch in range(epochs):
            value = (trial.number % 7 + epoch) / (epochs + 7)
            trial.set_user_attr(k.EPOCH, epoch + 1)  # PruningReporter
            trial.set_user_attr(k.LAST_VAL_DICE, value)
            trial.report(value, step=epoch)
            trial.should_prune()  # asked, not obeyed: every trial costs the same
            if epoch == 0:  # Objective._save_resume_point
                trial.set_user_attr(k.RESUME_ARTIFACT, f"resume-{trial.number}")
            trial.set_user_attr(k.RESUME_EPOCH, epoch + 1)
        loop_seconds.append(time.perf_counter() - started)
        for key, v in ((k.TRAIN_SECONDS, 1.0), (k.EPOCHS_RUN, epochs), (k.BEST_EPOCH, epochs),
                       (k.STOP_REASON, "max_epochs"), (k.SECONDS_PER_EPOCH, 0.1), (k.BEST_VAL_DICE, value)):
            trial.set_user_attr(key, v)
        return value

    return objective


def open_study(url: str, name: str, create: bool):
    import optuna

    from search.store import storage as st

    from search.trial import lifecycle

    storage = st.open_storage(url, on_stale=lifecycle.stale_trial_callback)
    from search.spec import algorithms, study_file

    sampler = optuna.samplers.RandomSampler()  # the storage's cost, not TPE's
    pruner = algorithms.make_pruner(study_file.load(c.SAMPLE_STUDY))
    if create:
        return st.create_once(storage, name, ["maximize"], sampler, pruner)[0]
    return st.load_study(storage, name, sampler, pruner)


def run_trials(study: Any, space: tuple, n_trials: int, epochs: int,
               limit: int | None = None) -> tuple[list[float], list[float]]:
    """The worker's loop (``search.runtime.worker.run_trials``: the stale-trial sweep, the budget check,
    one ``optimize`` through ``lifecycle.guarded``), timed per trial, until the budget is spent
    or ``limit`` trials ran; returns each trial's seconds and its epoch loop's seconds."""
    from search.trial import lifecycle

    objective = make_objective(space, epochs, loops := [])
    guarded = lifecycle.guarded(objective, n_trials)
    totals: list[float] = []
    while limit is None or len(totals) < limit:
        started = time.perf_counter()
        lifecycle.sweep(study)
        if not lifecycle.budget_left(study, n_trials):
            break
        study.optimize(guarded, n_trials=1, catch=(lifecycle.OverBudget,))
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

    from search.runtime.worker import run_trials as worker_run_trials

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    space = sample_space()
    study = open_study(url, name, create=False)
    objective = make_objective(space, epochs, [])
    ready.put(os.getpid())
    go.wait()
    worker_run_trials(study, objective, n_trials)  # the product's loop: n_trials is met exactly
    out.put((os.getpid(), time.time()))


def many_workers(url: str, workers: int, args: argparse.Namespace) -> dict[str, Any]:
    """``workers`` processes run ``search.runtime.worker.run_trials`` on one new study of
    ``parallel_trials`` trials: trials/s (to the last trial's end; a worker whose budget is spent
    then waits for the others' trials) and whether exactly ``parallel_trials`` trials counted."""
    import optuna

    from search import keys as k

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
    for _ in procs:
        out.get(timeout=1800)
    for p in procs:
        p.join()
    trials = optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)
    states: dict[str, int] = {}
    for t in trials:
        states[t.state.name] = states.get(t.state.name, 0) + 1
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    over = sum(1 for t in trials if t.system_attrs.get(k.OVER_BUDGET))
    ended = max(t.datetime_complete.timestamp() for t in complete)
    rate = len(complete) / (ended - started)
    exact = len(complete) == args.parallel_trials and len(trials) - over == args.parallel_trials
    c.log(f"postgresql, {workers} worker(s): {len(complete)} of {args.parallel_trials} trials complete in "
          f"{ended - started:.1f} s = {rate:.2f} trials/s (states {states}; {over} over budget, not counted; "
          f"n_trials met exactly: {exact})")
    return {"workers": workers, "trials": len(complete), "n_trials": args.parallel_trials, "seconds": ended - started,
            "trials_per_s": rate, "states": states, "over_budget": over, "n_trials_exact": exact}


# --- costs as the study grows (PostgreSQL) ------------------------------------------------------


def made_trials(count: int, epochs: int, seed: int = 0, chunk: int = 500) -> list[Any]:
    """``count`` finished trials as a worker leaves them: the sample study's parameters at
    random, the no-op objective's user attributes and intermediate values, the host and pid
    that ``search.trial.lifecycle.start`` records (made in memory, a scratch study per ``chunk``:
    the in-memory storage's ask reads every trial)."""
    import optuna

    from search import keys as k

    space = sample_space()
    trials: list[Any] = []
    while len(trials) < count:
        scratch = optuna.create_study(direction="maximize", pruner=optuna.pruners.NopPruner(),
                                      sampler=optuna.samplers.RandomSampler(seed=seed + len(trials)))
        objective = make_objective(space, epochs, [])

        def worker_objective(trial: Any) -> float:
            trial.set_user_attr(k.HOST, "bench-host")
            trial.set_user_attr(k.PID, 4242)
            return objective(trial)

        scratch.optimize(worker_objective, n_trials=min(chunk, count - len(trials)))
        trials += scratch.get_trials(deepcopy=False)
    return trials


def fill(url: str, name: str, trials: list[Any]) -> float:
    """A new study ``name`` holding ``trials``, written in one transaction
    (``search.store._internals.bulk_add_trials``); returns the seconds the insert took."""
    from search.store import _internals

    study = open_study(url, name, create=True)
    started = time.perf_counter()
    _internals.bulk_add_trials(study, trials)
    return time.perf_counter() - started


def get_trials_cost(url: str, name: str, calls: int) -> dict[str, Any]:
    """``study.get_trials(deepcopy=False)`` through flexunet's storage and through a plain URL
    (each loaded fresh, then called once to fill Optuna's cache): milliseconds per call."""
    import optuna

    from search.store import storage as st

    from search.trial import lifecycle

    figures: dict[str, Any] = {}
    for label, storage in (("flexunet", st.open_storage(url, on_stale=lifecycle.stale_trial_callback)), ("plain_url", url)):
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


def _growth_worker(url: str, tasks: Any, ready: Any, go: Any, out: Any) -> None:
    """One worker process for every study size and worker count (its imports take longer than
    its trials, and its first read of a 10,000-trial study a minute): for each task, load the
    study (once per study), then, with the other workers of the task, no-op trials and asks."""
    import warnings

    import optuna

    from search.store import _internals
    from search.spec import algorithms, study_file
    from search import keys as k
    from search.spec import space as sp

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.simplefilter("ignore")
    space = sample_space()
    spec = study_file.load(c.SAMPLE_STUDY)
    studies: dict[str, tuple[Any, float]] = {}
    while (task := tasks.get()) is not None:
        name, noop, asks, epochs, variants = task
        if name not in studies:
            study = open_study(url, name, create=False)
            started = time.perf_counter()  # a worker's first read fills Optuna's cache with every trial
            study.get_trials(deepcopy=False)
            studies[name] = (study, time.perf_counter() - started)
        study, first_read = studies[name]
        ready.put(os.getpid())
        go.get()
        # The storage's cost of a no-op trial (RandomSampler, as in part 1), through the worker's loop.
        trial_s, _ = run_trials(study, space, 10**9, epochs, limit=noop)
        ask_s: dict[str, list[float]] = {}
        ask_cpu: dict[str, list[float]] = {}  # this process's CPU seconds: TPE's own work, less the machine's load
        for variant in variants:  # the study's sampler (and variants): ask + the space's suggest calls
            changed = dataclasses.replace(spec, sampler=dataclasses.replace(
                spec.sampler, kwargs={**spec.sampler.kwargs, **variant}))
            sampler = algorithms.make_sampler(changed, f"bench-{os.getpid()}")
            # The same storage (and read cache) as the worker's study: a second would read every trial again.
            tpe = optuna.load_study(study_name=name, storage=_internals.study_storage(study), sampler=sampler)
            times = ask_s.setdefault(variant_name(variant), [])
            cpu = ask_cpu.setdefault(variant_name(variant), [])
            for _ in range(asks):
                started, cpu_started = time.perf_counter(), time.process_time()
                trial = tpe.ask()
                sp.suggest(trial, space)
                times.append(time.perf_counter() - started)
                cpu.append(time.process_time() - cpu_started)
                # FAIL: samplers read COMPLETE and PRUNED trials, so the asks leave the study's size as it was;
                # with a reason, or lifecycle.sweep takes it for a trial lost with its process and retries it.
                trial.set_user_attr(k.FAIL_REASON, "bench: an ask, not a trial")
                tpe.tell(trial, state=optuna.trial.TrialState.FAIL)
        out.put((os.getpid(), trial_s, ask_s, first_read, ask_cpu))


def variant_name(variant: dict[str, Any]) -> str:
    return "study" if not variant else ",".join(f"{k}={v}" for k, v in variant.items())


def growth(url: str, args: argparse.Namespace) -> dict[str, Any]:
    """For each study size and worker count, a new study filled with that many finished
    trials; N workers run no-op trials (storage cost), then time the sampler's ``ask`` (the
    study's TPE and variants); ``get_trials`` timed on a study of 2,000 trials."""
    started = time.perf_counter()
    pool = made_trials(max([*args.sizes, args.get_trials_size]), args.epochs)
    c.log(f"growth: {len(pool)} finished trials made in memory in {time.perf_counter() - started:.1f} s")
    results: dict[str, Any] = {"sizes": [], "fill": [], "get_trials": None}
    name = f"coord-gt-{uuid.uuid4().hex[:6]}"
    seconds = fill(url, name, pool[:args.get_trials_size])
    results["fill"].append({"trials": args.get_trials_size, "seconds": seconds})
    gt = get_trials_cost(url, name, calls=20)
    results["get_trials"] = gt
    c.log(f"get_trials(deepcopy=False) on {gt['trials']} trials: flexunet storage "
          f"{gt['flexunet_ms']:.2f} ms, plain URL {gt['plain_url_ms']:.2f} ms (ratio {gt['ratio']:.2f}; "
          f"first call {gt['flexunet_first_ms']:.0f} / {gt['plain_url_first_ms']:.0f} ms)")
    # One pool of worker processes for everything; a task for W workers goes to the first W.
    # Sizes below 10,000 get a new study per worker count (the no-op trials add 20-32 trials);
    # 10,000 one study for all worker counts (it grows by about 1%), read once per process.
    ctx = mp.get_context("spawn")
    pool_size = max(args.growth_workers)
    tasks = [ctx.Queue() for _ in range(pool_size)]
    gos = [ctx.Queue() for _ in range(pool_size)]
    ready, out = ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=_growth_worker, args=(url, tasks[i], ready, gos[i], out)) for i in range(pool_size)]
    for p in procs:
        p.start()
    shared: dict[int, str] = {}
    try:
        for size in args.sizes:
            for workers in args.growth_workers:
                variants = args.variants_one if workers == 1 else args.variants_many
                seconds = None
                if size >= 10_000 and size in shared:
                    name = shared[size]
                else:
                    name = f"coord-g{size}-w{workers}-{uuid.uuid4().hex[:6]}"
                    seconds = fill(url, name, pool[:size])
                    results["fill"].append({"trials": size, "seconds": seconds})
                    c.log(f"growth: a study of {size} trials filled in {seconds:.1f} s")
                    shared[size] = name
                noop = max(4, args.growth_trials // workers)
                for queue in tasks[:workers]:
                    queue.put((name, noop, args.growth_asks, args.epochs, variants))
                for _ in range(workers):
                    ready.get(timeout=3600)  # every worker has read the study: go
                for queue in gos[:workers]:
                    queue.put("go")
                finished = [out.get(timeout=3600) for _ in range(workers)]
                trial_s = [x for f in finished for x in f[1]]
                row: dict[str, Any] = {"size": size, "workers": workers, "fill_s": seconds,
                                       "first_read_s": c.median([f[3] for f in finished]),
                                       "noop_trials": len(trial_s), "ms_per_noop_trial": 1000 * c.median(trial_s)}
                for variant in variants:
                    key = variant_name(variant)
                    row[f"ask_ms[{key}]"] = 1000 * c.median([x for f in finished for x in f[2][key]])
                    row[f"ask_cpu_ms[{key}]"] = 1000 * c.median([x for f in finished for x in f[4][key]])
                results["sizes"].append(row)
                c.log(f"growth: {size:>6} trials ({workers} worker(s); a worker's first read of the study "
                      f"{row['first_read_s']:.1f} s): no-op trial {row['ms_per_noop_trial']:.0f} ms "
                      f"(n={len(trial_s)}); " + "; ".join(f"ask {k[7:-1]} {v:.0f} ms (CPU {row['ask_cpu_ms[' + k[7:]]:.0f})"
                                                         for k, v in row.items() if k.startswith("ask_ms")))
    finally:
        for queue in tasks:
            queue.put(None)
        for p in procs:
            p.join(timeout=120)
    for workers in args.growth_workers:
        rows = [r for r in results["sizes"] if r["workers"] == workers]
        if len(rows) >= 2:
            small, large = rows[0], rows[-1]
            ratios = {k[7:-1]: (large[k] / small[k], large["ask_cpu_" + k[4:]] / small["ask_cpu_" + k[4:]])
                      for k in small if k.startswith("ask_ms")}
            c.log(f"growth, {workers} worker(s), {small['size']} -> {large['size']} trials: no-op trial x"
                  f"{large['ms_per_noop_trial'] / small['ms_per_noop_trial']:.2f}, ask "
                  + ", ".join(f"{k} x{v:.2f} (CPU x{u:.2f})" for k, (v, u) in ratios.items()))
    return results


# --- what the window costs in quality (in memory, a synthetic objective) --------------------------


def synthetic(params: dict[str, Any], noise: float) -> float:
    """A cheap stand-in for validation Dice over the sample study's space (maximize; best ~1):
    a smooth optimum inside the space, a right loss, batch size and optimizer, plus noise."""
    import math

    score = 1.0 - 0.3 * math.log10(params["learning_rate"] / 8e-4) ** 2
    score -= 0.2 * ((params["base_filters"] - 32) / 24) ** 2 + 0.1 * (params["num_layers"] - 5) ** 2 / 4
    score -= 0.1 * abs(params["base_kernels"] - 7) / 4 + 0.05 * (params["dilation"] - 1)
    score -= 5 * (params["dropout_rate"] - 0.03) ** 2 + 0.1 * (params["augmentation_strength"] - 0.6) ** 2
    score -= 0.15 * (params["loss"] != "categorical_crossentropy+dice_loss") + 0.05 * (params["batch_size"] != 8)
    if params["optimizer"] == "AdamW":
        score += 0.05 - 0.2 * (math.log10(params["weight_decay"]) + 3) ** 2 / 4
    return score + noise


def window_quality(args: argparse.Namespace) -> dict[str, Any]:
    """The study's TPE against the same TPE behind a window, on :func:`synthetic`: the best
    value found, the mean of the last 100 trials, and the seconds of the last asks."""
    import random
    import warnings

    import optuna

    from search.spec import algorithms, study_file
    from search.spec import space as sp

    warnings.simplefilter("ignore")
    space = sample_space()
    spec = study_file.load(c.SAMPLE_STUDY)
    results: dict[str, Any] = {"trials": args.quality_trials, "seeds": args.quality_seeds, "variants": {}}
    for variant in ({}, args.quality_window):
        rows = []
        for seed in range(args.quality_seeds):
            changed = dataclasses.replace(spec, sampler=dataclasses.replace(
                spec.sampler, kwargs={**spec.sampler.kwargs, "seed": seed, **variant}))
            study = optuna.create_study(direction="maximize", sampler=algorithms.make_sampler(changed))
            noise = random.Random(seed)
            values, asks = [], []
            for _ in range(args.quality_trials):
                started = time.perf_counter()
                trial = study.ask()
                params = sp.suggest(trial, space)
                asks.append(time.perf_counter() - started)
                values.append(synthetic(params, noise.gauss(0, 0.02)))
                study.tell(trial, values[-1])
            rows.append({"best": max(values), "last100_mean": sum(values[-100:]) / len(values[-100:]),
                         "ask_ms_last50": 1000 * c.median(asks[-50:]), "seconds": sum(asks)})
        key = variant_name(variant)
        mean = {f: sum(r[f] for r in rows) / len(rows) for f in rows[0]}
        results["variants"][key] = {"runs": rows, "mean": mean}
        c.log(f"window quality, {key}: best {mean['best']:.4f}, mean of the last 100 trials "
              f"{mean['last100_mean']:.4f}, ask {mean['ask_ms_last50']:.0f} ms at the end "
              f"(mean of {len(rows)} seeds; per seed best {[round(r['best'], 4) for r in rows]})")
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
    parser.add_argument("--sizes", type=int, nargs="+", help="growth: study sizes (default 100 1000 10000)")
    parser.add_argument("--growth-workers", type=int, nargs="+", help="growth: worker counts (default 1 2 4 8)")
    parser.add_argument("--json", help="write every figure to this file")
    args = parser.parse_args()
    args.epochs = 10
    args.trials, args.parallel_trials = (6, 8) if args.quick else (30, 200)
    if args.workers == [1, 2, 4, 8]:  # the default: 8 (1..8 workers are timed in the growth part)
        args.workers = [2] if args.quick else [8]
    # Growth: study sizes, worker counts, no-op trials per run (shared by its workers, at least 4
    # each), sampler asks per worker and variant, the sampler variants (one worker; several).
    window = {"window": 100, "window_best": 25} if args.quick else {"window": 1000, "window_best": 25}
    sizes, growth_workers = ([100, 300], [1]) if args.quick else ([100, 1000, 10_000], [1, 2, 4, 8])
    args.sizes, args.growth_workers = args.sizes or sizes, args.growth_workers or growth_workers
    args.growth_trials, args.growth_asks = (4, 3) if args.quick else (20, 4)
    args.get_trials_size = 300 if args.quick else 2000
    args.variants_one = [{}, window] if args.quick else [
        {}, {"n_ei_candidates": 8}, {"multivariate": False, "group": False}, {"constant_liar": True}, window]
    args.variants_many = [{}, window]
    # Window quality: trials per run, seeds, the window (a tenth of the trials, plus TPE's 25 good).
    args.quality_trials, args.quality_seeds = (100, 1) if args.quick else (600, 3)
    args.quality_window = {"window": 10, "window_best": 10} if args.quick else {"window": 60, "window_best": 25}
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
        if "window" in args.parts:
            c.log(f"window quality: {args.quality_trials} trials in memory, {args.quality_seeds} seed(s), "
                  f"the study's TPE against {variant_name(args.quality_window)}")
            results["window"] = window_quality(args)
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
    elif results.get("window"):
        v = results["window"]["variants"]
        c.headline("window_best_minus_full_best", v[variant_name(args.quality_window)]["mean"]["best"]
                   - v["study"]["mean"]["best"], ".4f")
    else:
        first = next(iter(results["storages"]))
        c.headline(f"{first}_ms_per_trial", results["storages"][first]["ms_per_trial_median"], ".1f")


if __name__ == "__main__":
    main()

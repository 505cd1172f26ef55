"""Soak test of the distributed machinery: workers killed at random must lose no trial.

Four worker processes (``--workers``) run 60 trials (``--trials``) of a fast objective (five
"epochs" of 0.2 s, each reported) on one PostgreSQL study, through the project's own storage
(heartbeats, stale-trial retry, reconnects) and budget accounting (``search.runtime.worker``). Every
few seconds a random worker is SIGKILLed and a new one started. At the end the script counts
trials completed, retried, lost (a trial whose every attempt failed, or one left RUNNING or
WAITING; must be 0) and duplicate trial numbers (must be 0).

    python bench/soak.py [--quick] [--storage postgresql+psycopg://postgres@127.0.0.1:5432/test]

The last line is ``soak: lost=N duplicates=M``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import signal
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HEARTBEAT = {"FLEXUNET_HEARTBEAT_INTERVAL": "1", "FLEXUNET_GRACE_PERIOD": "3"}


def _worker(url: str, name: str, n_trials: int, epochs: int, seconds: float) -> None:
    os.environ.update(HEARTBEAT)
    import optuna

    from search.store import storage as st

    from search.trial import lifecycle
    from search.runtime.worker import run_trials

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = st.load_study(st.open_storage(url, on_stale=lifecycle.stale_trial_callback), name)

    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", -1.0, 1.0)
        trial.set_user_attr("pid", os.getpid())
        for epoch in range(epochs):
            time.sleep(seconds)
            trial.report(x * epoch, step=epoch)
        return x * x

    run_trials(study, objective, n_trials)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 workers, 20 trials (under a minute)")
    parser.add_argument("--storage", default=os.environ.get(
        "FLEXUNET_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"))
    parser.add_argument("--workers", type=int)
    parser.add_argument("--trials", type=int)
    parser.add_argument("--kill-every", type=float, default=3.0, help="mean seconds between kills")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    workers = args.workers or (2 if args.quick else 4)
    n_trials = args.trials or (20 if args.quick else 60)
    epochs, seconds = 5, 0.2
    os.environ.update(HEARTBEAT)

    import optuna
    from optuna.trial import TrialState

    from search.trial import lifecycle
    from search.store import storage as st
    from search.store import urls

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    url = urls.normalize(args.storage)
    name = f"soak-{uuid.uuid4().hex[:8]}"
    storage = st.open_storage(url, on_stale=lifecycle.stale_trial_callback)
    study, _ = st.create_once(storage, name, ["minimize"])
    rng = random.Random(args.seed)
    ctx = mp.get_context("spawn")

    def start() -> mp.Process:
        process = ctx.Process(target=_worker, args=(url, name, n_trials, epochs, seconds), daemon=True)
        process.start()
        return process

    started = time.time()
    procs = [start() for _ in range(workers)]
    kills = 0
    next_kill = time.time() + rng.expovariate(1 / args.kill_every)
    last_recovery = 0.0
    while any(p.is_alive() for p in procs):
        time.sleep(0.1)
        # Our own heartbeat check, as every launcher does: a killed worker's trial is failed
        # (and retried) even while the other workers are busy.
        if time.time() - last_recovery >= 1.0:
            lifecycle.sweep(study)
            last_recovery = time.time()
        if time.time() >= next_kill:
            alive = [i for i, p in enumerate(procs) if p.is_alive()]
            if alive:
                victim = rng.choice(alive)
                os.kill(procs[victim].pid, signal.SIGKILL)
                procs[victim].join()
                kills += 1
                procs[victim] = start()
            next_kill = time.time() + rng.expovariate(1 / args.kill_every)
    elapsed = time.time() - started

    trials = study.get_trials(deepcopy=False)
    numbers = Counter(t.number for t in trials)
    duplicates = sum(n - 1 for n in numbers.values() if n > 1)
    # Optuna's retry callback names the attempt a copy repeats last in its retry history.
    repeats = [t.system_attrs["retry_history"][-1] for t in trials if t.system_attrs.get("retry_history")]
    retried_from = set(repeats)
    retries = len(repeats)
    copies = Counter(repeats)
    double_retries = sum(n - 1 for n in copies.values() if n > 1)
    completed = sum(1 for t in trials if t.state == TrialState.COMPLETE)
    stuck = sum(1 for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING))
    dead_ends = sum(1 for t in trials if t.state == TrialState.FAIL and t.number not in retried_from)
    # A trial is lost when its last attempt failed without a retry, or never finished.
    lost = dead_ends + stuck + max(0, n_trials - completed - dead_ends - stuck)
    print(f"storage {urls.mask(url)}, study {name}: {workers} workers, {n_trials} trials of {epochs} x {seconds}s epochs")
    print(f"elapsed {elapsed:.1f}s, workers killed {kills}, trials in storage {len(trials)}")
    print(f"completed {completed}, retried {retries}, failed attempts {sum(1 for t in trials if t.state == TrialState.FAIL)}, "
          f"lost {lost}, duplicate numbers {duplicates}, trials retried twice (extra work, nothing lost) {double_retries}")
    for t in trials:
        if (t.state == TrialState.FAIL and t.number not in retried_from) or t.state in (
                TrialState.RUNNING, TrialState.WAITING):
            print(f"  lost: trial {t.number} {t.state.name} {dict(t.system_attrs)}")
    optuna.delete_study(study_name=name, storage=storage)
    print(f"soak: lost={lost} duplicates={duplicates}")
    return 0 if lost == 0 and duplicates == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

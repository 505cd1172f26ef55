"""One worker process: load the study and run trials until the study's budget is spent.

Started by ``flexunet search run`` (``python -m search.worker ...``), one per local worker; the
storage URL comes in ``$FLEXUNET_STORAGE`` so that its password never shows in a process list.
Workers share nothing but the storage and the artifact store (a shared folder or a bucket):
any number of them, on any number of machines, can join one study.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_ERROR, EXIT_INTERRUPTED = 0, 2, 130
_logger = logging.getLogger("search.worker")


def budget_left(study: Any, n_trials: int) -> bool:
    """Whether another trial may start: fewer than ``n_trials`` used, or a trial waits (the
    enqueued baseline, or a retry of a trial whose worker died or was interrupted)."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    retried = {t.system_attrs.get("failed_trial") for t in trials} - {None}
    waiting = any(t.state == TrialState.WAITING for t in trials)
    used = sum(1 for t in trials
               if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
               or (t.state == TrialState.FAIL and t.number not in retried))
    return waiting or used < n_trials


def run_trials(study: Any, objective: Any, n_trials: int, *, deadline: float | None = None,
               catch: tuple[type[Exception], ...] = ()) -> None:
    """Run trials until the budget is spent and no other trial is still running.

    A worker whose budget is spent stays while other workers' trials run: if one of those
    workers died, its trial goes back to the queue (heartbeat) and someone must be there to
    run it.
    """
    from optuna.trial import TrialState

    from search import recovery

    while True:
        if deadline and time.time() >= deadline:
            _logger.info("timeout reached; no new trial")
            return
        recovery.recover(study)
        if budget_left(study, n_trials):
            if hasattr(objective, "current"):
                objective.current = None
            study.optimize(objective, n_trials=1, catch=catch)
            continue
        if not study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            return
        time.sleep(_poll_seconds(study))


def _poll_seconds(study: Any) -> float:
    interval = getattr(study._storage, "get_heartbeat_interval", lambda: None)()
    return float(min(interval or 5, 5))


def _raise_interrupted(signum: int, frame: Any) -> None:
    from search.objective import Interrupted

    # Ignore further signals: the first one already stops the trial; a second must not
    # interrupt the bookkeeping that marks it FAIL and puts it back in the queue.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Interrupted(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="search.worker")
    parser.add_argument("study_file")
    parser.add_argument("--out", required=True)
    parser.add_argument("--artifacts", help="artifact store: a folder or s3://BUCKET/PREFIX (default: the "
                                            "study file's, or OUT/artifacts)")
    parser.add_argument("--n-trials", type=int)
    parser.add_argument("--timeout", type=float)
    parser.add_argument("--max-epochs", type=int)
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--deadline", type=float, help="Unix time after which no trial starts")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s worker %(process)d %(levelname)s %(message)s",
                        stream=sys.stdout)
    signal.signal(signal.SIGTERM, _raise_interrupted)
    signal.signal(signal.SIGINT, _raise_interrupted)

    from flexunet._tf import quiet_import
    from flexunet.errors import FlexUNetError
    from search.objective import Interrupted

    try:
        quiet_import()
        _limit_threads()
        return _run(args)
    except FlexUNetError as exc:
        print(f"flexunet: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except Interrupted as exc:
        _logger.info("interrupted by %s; exiting", exc)
        return EXIT_INTERRUPTED


def _limit_threads() -> None:
    # Several workers on one CPU each get an even share of its cores (set by the launcher).
    import keras

    threads = os.environ.get("FLEXUNET_THREADS")
    if threads and keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(int(threads))
        tf.config.threading.set_inter_op_parallelism_threads(min(2, int(threads)))


def _run(args: argparse.Namespace) -> int:
    import optuna

    from flexunet.errors import ConfigError
    from search import algorithms, study_file
    from search import artifacts as af
    from search import storage as st
    from search.objective import Interrupted, Objective, TrialFailure
    from search.run import open_dataset, study_space

    url = os.environ.get(st.ENV_VAR)
    if not url:
        raise ConfigError(f"the worker needs ${st.ENV_VAR}")
    spec = study_file.load(args.study_file).with_overrides(
        n_trials=args.n_trials, timeout=args.timeout, max_epochs=args.max_epochs, image_size=args.image_size)
    out = Path(args.out)
    base, image_size = open_dataset(spec, out)
    space = study_space(spec, image_size)
    storage = st.open_storage(st.normalize(url))
    slot = os.environ.get("FLEXUNET_WORKER_SLOT", "")
    # The first worker of a run keeps the study file's seed (a one-worker run repeats exactly);
    # any other draws from its own stream.
    worker_name = "" if slot in ("", "0.0") else f"{socket.gethostname()}:{slot}:{os.getpid()}"
    study = st.load_study(storage, spec.name, algorithms.make_sampler(spec, worker_name),
                          algorithms.make_pruner(spec))
    artifacts = af.open_store(af.resolve(args.artifacts, spec.artifacts, out), create=True)
    objective = Objective(spec=spec, base=base, image_size=image_size, artifacts=artifacts, space=space)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    _logger.info("worker pid %d on %s joined study %r (%s), trial files in %s", os.getpid(), socket.gethostname(),
                 spec.name, st.mask(url), artifacts.location)
    try:
        run_trials(study, objective, spec.budget.n_trials, deadline=args.deadline, catch=(TrialFailure,))
    except Interrupted:
        if objective.current is not None:
            from search import recovery

            recovery.requeue(study, study._storage.get_trial(objective.current._trial_id))
            _logger.info("trial %d interrupted; queued again to resume from its last epoch",
                         objective.current.number)
        raise
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

"""One worker process: load the study and run trials until the study's budget is spent.

Started by ``flexunet search run`` (``python -m search.runtime.worker PLAN.json``), one per local
worker. The plan (:class:`search.runtime.context.WorkerPlan`) holds the resolved spec the launcher
runs and its artifact store; the storage URL comes in ``$FLEXUNET_STORAGE`` so that its password
never shows in a process list. Workers share nothing but the storage and the artifact store (a
shared folder or a bucket): any number of them, on any number of machines, can join one study.

A worker ends with its launcher: ``$FLEXUNET_LAUNCHER_PID`` names it, and the worker asks the
kernel for SIGTERM when its parent dies (``PR_SET_PDEATHSIG``), and watches its parent pid
where that is not available. SIGTERM interrupts the running trial, which is queued again to
resume from its last epoch.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_ERROR, EXIT_INTERRUPTED = 0, 2, 130  # and search.store.storage.EXIT_SERVER_FULL
_PR_SET_PDEATHSIG = 1
_logger = logging.getLogger("search.runtime.worker")


def run_trials(study: Any, objective: Callable[[Any], Any], n_trials: int, *, deadline: float | None = None,
               catch: tuple[type[Exception], ...] = (), moving_deadline: bool = False) -> None:
    """Run trials until the budget is spent and no other trial is still running.

    Every trial goes through :func:`search.trial.lifecycle.start` first, so ``n_trials`` is met
    exactly. A worker whose budget is spent stays while other workers' trials run: if one of
    those workers died, its trial goes back to the queue (heartbeat) and someone must be there
    to run it. With ``moving_deadline``, a deadline the launcher recorded on the study
    (``flexunet_search_deadline``: it moves as the search learns what its refit will cost,
    search/spec/budget.py) stops it too.
    """
    from optuna.trial import TrialState

    from search import keys
    from search.trial import lifecycle

    guarded = lifecycle.guarded(objective, n_trials)
    while True:
        limit = deadline
        if moving_deadline:
            recorded = study.user_attrs.get(keys.STUDY_SEARCH_DEADLINE)
            limit = recorded if isinstance(recorded, int | float) else deadline
        if limit and time.time() >= limit:
            _logger.info("timeout reached; no new trial")
            return
        lifecycle.sweep(study)
        if lifecycle.budget_left(study, n_trials):
            try:
                study.optimize(guarded, n_trials=1, catch=(*catch, lifecycle.OverBudget))
            except Exception as exc:
                if exc is guarded.raised or not lifecycle.taken_over(study, guarded.number):
                    raise
                _logger.warning("trial %d was failed by another worker (its heartbeat looked stopped) and queued "
                                "again; this worker's result for it is dropped", guarded.number)
            continue
        if not study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            return
        time.sleep(_poll_seconds(study))


def _poll_seconds(study: Any) -> float:
    from search.store import _internals

    return float(min(_internals.heartbeat_interval(study) or 5, 5))


def _raise_interrupted(signum: int, frame: Any) -> None:
    from search.trial.lifecycle import Interrupted

    # Ignore further signals: the first one already stops the trial; a second must not
    # interrupt the bookkeeping that marks it FAIL and puts it back in the queue.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    interrupted = Interrupted(signal.Signals(signum).name)
    retry = sys.modules.get("search.store.retry")  # not imported yet: no database call to wait for
    if retry is None:
        raise interrupted
    # Not in the middle of a database call: that would leave its SQLite lock behind.
    retry.interrupt_outside_calls(interrupted)


def end_with_launcher(launcher: int, poll: float = 1.0) -> None:
    """SIGTERM this process when the launcher ``launcher`` is gone, whatever killed it."""
    try:  # Linux: the kernel signals us the moment the parent dies, even of SIGKILL
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != launcher:  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)
        return

    def watch() -> None:  # elsewhere, or if the signal is lost: a re-parented process
        while os.getppid() == launcher:
            time.sleep(poll)
        _logger.warning("launcher %d is gone; stopping", launcher)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="launcher-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="search.runtime.worker")
    parser.add_argument("plan", help="the worker plan (JSON) its launcher wrote")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s worker %(process)d %(levelname)s %(message)s",
                        stream=sys.stdout)
    signal.signal(signal.SIGTERM, _raise_interrupted)
    signal.signal(signal.SIGINT, _raise_interrupted)

    from flexunet._tf import quiet_import
    from flexunet.errors import FlexUNetError
    from search.runtime.context import LAUNCHER_ENV
    from search.trial.lifecycle import Interrupted
    from search.store.storage import EXIT_SERVER_FULL, ServerFull

    try:
        launcher = os.environ.get(LAUNCHER_ENV)
        if launcher and launcher.isdigit():
            end_with_launcher(int(launcher))
        # The connection first: a worker the database turns away stops in a second, before
        # TensorFlow's import, and before it has a trial to lose.
        storage = open_worker_storage()
        quiet_import()
        _limit_threads()
        return _run(Path(args.plan), storage)
    except ServerFull as exc:
        print(f"flexunet: error: {exc}", file=sys.stderr)
        return EXIT_SERVER_FULL
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


def open_worker_storage() -> Any:
    """The storage ``$FLEXUNET_STORAGE`` names, as a worker opens it (heartbeat, one
    connection). Raises :class:`search.store.storage.ServerFull` when the database has no free slot."""
    from flexunet.errors import ConfigError
    from search.store import storage as st
    from search.store import urls
    from search.trial import lifecycle

    url = os.environ.get(urls.ENV_VAR)
    if not url:
        raise ConfigError(f"the worker needs ${urls.ENV_VAR}")
    return st.open_storage(urls.normalize(url), on_stale=lifecycle.stale_trial_callback)


def _run(plan_path: Path, storage: Any) -> int:
    import optuna

    from search.spec import algorithms
    from search.store import artifacts as af
    from search.store import storage as st
    from search.store import urls
    from search.runtime.context import REFIT, SLOT_ENV, WorkerPlan
    from search.trial.objective import Objective, TrialFailure

    plan = WorkerPlan.read(plan_path)
    ctx = plan.context(os.environ[urls.ENV_VAR])  # the launcher's, as it resolved it
    spec, url = ctx.spec, ctx.url
    data = ctx.open_dataset()
    slot = os.environ.get(SLOT_ENV, "")
    # The first worker of a run keeps the study file's seed (a one-worker run repeats exactly);
    # any other draws from its own stream.
    worker_name = "" if slot in ("", "0.0") else f"{socket.gethostname()}:{slot}:{os.getpid()}"
    study = st.load_study(storage, spec.name, algorithms.make_sampler(spec, worker_name),
                          algorithms.make_pruner(spec))
    artifacts = af.open_store(ctx.artifacts, create=True)
    if plan.stage == REFIT:
        return _run_refit(ctx, data.base, study, storage, artifacts)
    objective = Objective(spec=spec, base=data.base, image_size=data.image_size, artifacts=artifacts,
                          space=data.space, dataset_dir=ctx.dataset_dir)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    _logger.info("worker pid %d on %s joined study %r (%s), trial files in %s", os.getpid(), socket.gethostname(),
                 spec.name, urls.mask(url), artifacts.location)
    run_trials(study, objective, spec.budget.n_trials, deadline=plan.deadline, catch=(TrialFailure,),
               moving_deadline=spec.refit is not None)
    return EXIT_OK


def _run_refit(ctx: Any, base: Any, study: Any, storage: Any, artifacts: Any) -> int:
    """The refit's trials (search/trial/refit.py), run as search trials are: one fold x seed model each."""
    import optuna

    from flexunet.errors import FlexUNetError
    from search.trial import refit
    from search.trial.objective import TrialFailure

    spec = ctx.spec
    refit_study = refit.load(study, storage)
    if refit_study is None:
        raise FlexUNetError(f"study {spec.name!r} has no refit planned")
    objective = refit.RefitObjective(spec=spec, base=base, search=study, artifacts=artifacts,
                                     dataset_dir=ctx.dataset_dir)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    _logger.info("worker pid %d on %s joined refit %r (%d models)", os.getpid(), socket.gethostname(),
                 refit_study.study_name, refit.models(refit_study))
    run_trials(refit_study, objective, refit.models(refit_study), catch=(TrialFailure,))
    return EXIT_OK


def _exit_now(code: int) -> None:
    """End the process without the interpreter's teardown once an interrupted trial is booked.

    Unwinding TensorFlow's modules and threads took over 7 s on a loaded machine; a worker whose
    launcher was killed must be gone within seconds (a batch scheduler's cancel, a GPU to hand
    back), and everything it owes the study is already in the storage and the artifact store."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_code = main()
    if exit_code == EXIT_INTERRUPTED:
        _exit_now(exit_code)
    sys.exit(exit_code)

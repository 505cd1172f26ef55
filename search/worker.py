"""One worker process: load the study and run trials until the study's budget is spent.

Started by ``flexunet search run`` (``python -m search.worker ...``), one per local worker.
Workers share nothing but the storage (and the artifact folder): any number of them, on any
number of machines, can join one study.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

EXIT_OK, EXIT_ERROR = 0, 2


def budget_left(study, n_trials: int) -> bool:  # type: ignore[no-untyped-def]
    """Whether another trial may start: fewer than ``n_trials`` used, or a trial waits (the
    enqueued baseline, or a retry of a trial whose worker died)."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    retried = {t.system_attrs.get("failed_trial") for t in trials} - {None}
    waiting = any(t.state == TrialState.WAITING for t in trials)
    used = sum(1 for t in trials
               if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
               or (t.state == TrialState.FAIL and t.number not in retried))
    return waiting or used < n_trials


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="search.worker")
    parser.add_argument("study_file")
    parser.add_argument("--storage", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--n-trials", type=int)
    parser.add_argument("--timeout", type=float)
    parser.add_argument("--max-epochs", type=int)
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--deadline", type=float, help="Unix time after which no trial starts")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s worker %(process)d %(levelname)s %(message)s",
                        stream=sys.stdout)

    from flexunet._tf import quiet_import
    from flexunet.errors import FlexUNetError

    quiet_import()
    _limit_threads()
    try:
        return _run(args)
    except FlexUNetError as exc:
        print(f"flexunet: error: {exc}", file=sys.stderr)
        return EXIT_ERROR


def _limit_threads() -> None:
    # Several workers on one CPU each get an even share of its cores (set by the launcher).
    threads = os.environ.get("FLEXUNET_THREADS")
    if threads:
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(int(threads))
        tf.config.threading.set_inter_op_parallelism_threads(min(2, int(threads)))


def _run(args: argparse.Namespace) -> int:
    import optuna

    from search import algorithms, study_file
    from search import storage as st
    from search.objective import Objective, TrialFailure
    from search.run import open_dataset, study_space

    spec = study_file.load(args.study_file).with_overrides(
        n_trials=args.n_trials, timeout=args.timeout, max_epochs=args.max_epochs, image_size=args.image_size)
    out = Path(args.out)
    base, image_size = open_dataset(spec, out)
    space = study_space(spec, image_size)
    storage = st.open_storage(args.storage)
    study = st.load_study(storage, spec.name, algorithms.make_sampler(spec), algorithms.make_pruner(spec))
    artifacts = optuna.artifacts.FileSystemArtifactStore(str(artifact_dir(out)))
    objective = Objective(spec=spec, base=base, image_size=image_size, artifacts=artifacts, space=space)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    while budget_left(study, spec.budget.n_trials):
        if args.deadline and time.time() >= args.deadline:
            logging.info("timeout reached; no new trial")
            break
        study.optimize(objective, n_trials=1, catch=(TrialFailure,))
    return EXIT_OK


def artifact_dir(out: Path) -> Path:
    path = out / "artifacts"
    path.mkdir(parents=True, exist_ok=True)
    return path


if __name__ == "__main__":
    sys.exit(main())

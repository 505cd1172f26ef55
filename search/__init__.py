"""The AutoML layer: an Optuna study over FlexUNet's architecture and training parameters.

From Python (see :mod:`search.api`; it raises :mod:`search.errors` when a run does not end)::

    from search import Study

    study = Study.from_file("studies/ct_ich_sample.toml", n_trials=4, max_epochs=2, image_size=32)
    result = study.run(workers=2)      # raises StudyInterrupted, TrialsFailed or BadInput
    print(result.best_value, study.open().best_trial.params)
"""

import warnings

from optuna.exceptions import ExperimentalWarning

# Heartbeats, artifact stores, metric names and grouped TPE are all marked experimental in
# Optuna 5; the project depends on them knowingly, so their warnings are noise for users.
warnings.filterwarnings("ignore", category=ExperimentalWarning)

from search.api import OpenedStudy, RunResult, Study, load_study  # noqa: E402  (after the filter: Optuna's pieces warn)
from search.errors import BadInput, StudyError, StudyInterrupted, TrialsFailed  # noqa: E402
from search.spec.planner import plan  # noqa: E402
from search.spec.study_file import StudySpec, for_dataset, load as load_spec  # noqa: E402

__all__ = ["BadInput", "OpenedStudy", "RunResult", "Study", "StudyError", "StudyInterrupted", "StudySpec",
           "TrialsFailed", "for_dataset", "load_spec", "load_study", "plan"]

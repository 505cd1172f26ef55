"""The AutoML layer: an Optuna study over FlexUNet's architecture and training parameters.

From Python (see :class:`search.Study`)::

    from search import Study

    study = Study.from_file("studies/ct_ich_sample.toml", n_trials=4, max_epochs=2, image_size=32)
    study.run(workers=2)
    print(study.best_trial.params)
"""

import warnings

from optuna.exceptions import ExperimentalWarning

# Heartbeats, artifact stores, metric names and grouped TPE are all marked experimental in
# Optuna 5; the project depends on them knowingly, so their warnings are noise for users.
warnings.filterwarnings("ignore", category=ExperimentalWarning)

from search.api import Study  # noqa: E402  (after the filter: importing Optuna's pieces warns)
from search.spec.planner import plan  # noqa: E402
from search.spec.study_file import StudySpec, load as load_spec  # noqa: E402

__all__ = ["Study", "StudySpec", "load_spec", "plan"]

"""The AutoML layer: an Optuna study over FlexUNet's architecture and training parameters."""

import warnings

from optuna.exceptions import ExperimentalWarning

# Heartbeats, artifact stores, metric names and grouped TPE are all marked experimental in
# Optuna 5; the project depends on them knowingly, so their warnings are noise for users.
warnings.filterwarnings("ignore", category=ExperimentalWarning)

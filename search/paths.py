"""The run folder's layout and the names of the files a trial keeps, in one place.

A study's run folder (``runs/<study name>`` unless the study file or ``--out`` say otherwise)::

    <out>/
      data/                    the prepared dataset (when the study file prepares one)
        train_eval_infer.config
        split.json
      study.db                 the SQLite storage (when no other storage is given)
      artifacts/               every trial's files (Optuna's FileSystemArtifactStore)
      logs/                    one log per local worker, and the spec the launcher handed them
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DATA_DIR = "data"
# The seed-format config: a prepared dataset's, and an export's (what evaluate/infer read).
CONFIG_FILE = "train_eval_infer.config"
DATASET_CONFIG = CONFIG_FILE
SPLIT_FILE = "split.json"
STUDY_DB = "study.db"
ARTIFACTS_DIR = "artifacts"
LOGS_DIR = "logs"

# flexunet.train.MODEL_FILE, spelled here rather than imported: flexunet.train loads TensorFlow
# (~5 s), and every `flexunet` command imports this module, a usage error included
# (tests/test_internals.py checks that the two agree).
MODEL_FILE = "best_model.keras"

# A trial's artifacts (uploaded with optuna.artifacts.upload_artifact under these file names).
LOG_FILE = "train_log.csv"
CURVES_FILE = "learning_curves.png"
OVERLAYS_FILE = "validation_overlays.png"
TRIAL_FILES = (MODEL_FILE, LOG_FILE, CURVES_FILE, OVERLAYS_FILE)

# flexunet.callbacks' resume files beside a fit's checkpoint (the last epoch's model, the loop's
# state), spelled here for the same reason as MODEL_FILE (tests/test_internals.py checks them).
LAST_CHECKPOINT = "last.keras"
TRAIN_STATE = "state.json"

# Beside a dataset's train_eval_infer.config: which fold validates each slice (columns
# name,fold). Without it, folds are made by patient from the train and valid slices.
FOLDS_FILE = "folds.csv"

# Artifacts of a cross-validated trial (search/trial/cv.py); k is the 0-based fold.
OOF_PREDICTIONS = "oof_predictions.npz"


def plan_fingerprint(study_file: Path) -> Path:
    """Where ``flexunet search plan`` writes the dataset's fingerprint: beside the study file it
    planned, named after it (so that several plans share a folder, as in ``studies/``)."""
    return study_file.with_name(f"{study_file.stem}.fingerprint.json")


def plan_throughput(study_file: Path) -> Path:
    """Where ``flexunet search plan`` writes the device measurement a study was sized from."""
    return study_file.with_name(f"{study_file.stem}.throughput.json")


def fold_model(k: int) -> str:
    """Fold k's best checkpoint."""
    return f"best_model_fold{k}.keras"


def fold_log(k: int) -> str:
    """Fold k's per-epoch training log."""
    return f"train_log_fold{k}.csv"


def fold_predictions(k: int) -> str:
    """Fold k's out-of-fold probabilities (NumPy), kept in a cross-validated trial's resume archive."""
    return f"oof_fold{k}.npy"


__all__ = ["ARTIFACTS_DIR", "CONFIG_FILE", "CURVES_FILE", "DATASET_CONFIG", "DATA_DIR", "LOGS_DIR", "LOG_FILE", "MODEL_FILE",
           "OVERLAYS_FILE", "FOLDS_FILE", "OOF_PREDICTIONS", "fold_model", "fold_log", "fold_predictions",
           "LAST_CHECKPOINT", "TRAIN_STATE", "SPLIT_FILE", "STUDY_DB", "TRIAL_FILES", "RunFolder"]


@dataclass(frozen=True)
class RunFolder:
    """The paths of one run folder.

    Example::

        >>> from search.paths import RunFolder
        >>> RunFolder(Path("/runs/demo")).study_db
        PosixPath('/runs/demo/study.db')
    """

    root: Path

    @property
    def data(self) -> Path:
        return self.root / DATA_DIR

    @property
    def dataset_config(self) -> Path:
        """Where a prepared dataset's config lands."""
        return self.data / DATASET_CONFIG

    @property
    def study_db(self) -> Path:
        return self.root / STUDY_DB

    @property
    def artifacts(self) -> Path:
        return self.root / ARTIFACTS_DIR

    @property
    def logs(self) -> Path:
        return self.root / LOGS_DIR

    def sqlite_url(self) -> str:
        return f"sqlite:///{self.study_db.absolute()}"

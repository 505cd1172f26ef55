"""Names of the files a run writes or reads: dataset files and trial artifacts."""

from __future__ import annotations

# Beside a dataset's train_eval_infer.config: which fold validates each slice (columns
# name,fold). Without it, folds are made by patient from the train and valid slices.
FOLDS_FILE = "folds.csv"

# Artifacts of a cross-validated trial (search/cv.py); k is the 0-based fold.
OOF_PREDICTIONS = "oof_predictions.npz"


def fold_model(k: int) -> str:
    """Fold k's best checkpoint."""
    return f"best_model_fold{k}.keras"


def fold_log(k: int) -> str:
    """Fold k's per-epoch training log."""
    return f"train_log_fold{k}.csv"

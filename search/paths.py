"""File names of a trial's artifacts that several modules write or read."""

from __future__ import annotations

# A cross-validated trial's out-of-fold predictions: arrays ``probabilities`` (N,H,W,C float16),
# ``masks`` (N,H,W uint8), ``names`` (N str) and ``folds`` (N int, the fold that validated it).
OOF_PREDICTIONS = "oof_predictions.npz"


def fold_model_file(fold: int) -> str:
    """The best checkpoint of fold ``fold`` of a cross-validated trial."""
    return f"best_model_fold{fold}.keras"


def fold_train_log_file(fold: int) -> str:
    return f"train_log_fold{fold}.csv"

"""Trial and study user-attribute keys that more than one module reads or writes."""

from __future__ import annotations

# Cross-validated trials (search/cv.py), read by the export and the report.
FOLDS = "folds"  # K, the number of folds the trial was cross-validated on
FOLD_DICE = "fold_val_foreground_dice"  # list: best validation foreground Dice of each finished fold
POOLED_DICE = "val_foreground_dice_pooled"  # the trial's value: one Dice over every out-of-fold slice
FOLD = "fold"  # 0-based fold in progress
RESUMED_FROM_FOLD = "resumed_from_fold"  # a retry: the fold it resumed in (earlier ones were kept)
STOP_REASON = "stop_reason"

"""Names of the trial and study attributes that several modules read or write."""

from __future__ import annotations

# Cross-validated trials (issue 10): how many folds, each fold's validation foreground Dice,
# and the trial's value, one foreground Dice pooled over every out-of-fold slice.
FOLDS = "folds"
FOLD_VAL_FOREGROUND_DICE = "fold_val_foreground_dice"
VAL_FOREGROUND_DICE_POOLED = "val_foreground_dice_pooled"

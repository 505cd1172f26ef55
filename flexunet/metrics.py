"""Segmentation metrics, defined once and used by training, evaluation and the search.

Foreground Dice of class c is 2|P ∩ G| / (|P| + |G|), computed from confusion counts. The mean
foreground Dice averages the classes c >= 1 that are present in the evaluated set (reference or
predicted pixels); an absent class leaves the mean, and a set with no class present scores 0
(:mod:`flexunet.scoring`, the one home of that convention). The Keras metric accumulates the
same counts over a whole validation epoch (a global Dice, not a mean of batch Dices) and applies
the same rule.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
from keras import ops
from scipy import ndimage

# The NumPy scoring lives in flexunet.scoring (no Keras), which the config's checks and
# post-processing import too; these names are the same functions.
from flexunet.scoring import (  # noqa: F401
    class_mean, confusion, dice_score, foreground_dice_of, mean_foreground_dice, num_labels, present_classes,
    to_classes)


def iou_score(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    """tp / (tp + fp + fn); NaN where the class is absent (as :func:`dice_score`)."""
    union = tp + fp + fn
    return np.where(union > 0, tp / np.maximum(union, 1), np.nan)


def precision_score(tp: np.ndarray, fp: np.ndarray) -> np.ndarray:
    """tp / (tp + fp); NaN where nothing was predicted."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(tp + fp > 0, tp / (tp + fp), np.nan)


def recall_score(tp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    """tp / (tp + fn); NaN where the class is absent from the ground truth."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(tp + fn > 0, tp / (tp + fn), np.nan)


def hd95(pred: np.ndarray, true: np.ndarray) -> float | None:
    """95th percentile symmetric surface distance in pixels; None unless both masks are
    non-empty."""
    if not pred.any() or not true.any():
        return None
    pred_edge = pred & ~ndimage.binary_erosion(pred)
    true_edge = true & ~ndimage.binary_erosion(true)
    to_true = ndimage.distance_transform_edt(~true_edge)
    to_pred = ndimage.distance_transform_edt(~pred_edge)
    distances = np.concatenate([to_true[pred_edge], to_pred[true_edge]])
    return float(np.percentile(distances, 95))


@keras.saving.register_keras_serializable(package="flexunet")
class ForegroundDice(keras.metrics.Metric):
    """Mean foreground Dice over everything seen since the last reset (global, not per batch),
    over the classes present in it (:func:`flexunet.scoring.mean_foreground_dice`)."""

    def __init__(self, num_classes: int, name: str = "foreground_dice", **kwargs: Any) -> None:
        super().__init__(name=name, **kwargs)
        self.num_classes = num_classes
        n = num_labels(num_classes)
        self.tp = self.add_variable(shape=(n,), initializer="zeros", dtype="float64", name="tp")
        self.fp = self.add_variable(shape=(n,), initializer="zeros", dtype="float64", name="fp")
        self.fn = self.add_variable(shape=(n,), initializer="zeros", dtype="float64", name="fn")

    def update_state(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> None:
        n = num_labels(self.num_classes)
        if self.num_classes == 1:
            true = ops.cast(y_true[..., 0] > 0.5, "int32")
            pred = ops.cast(y_pred[..., 0] > 0.5, "int32")
        else:
            true = ops.argmax(y_true, axis=-1)
            pred = ops.argmax(y_pred, axis=-1)
        true_1h = ops.one_hot(true, n, dtype="float32")
        pred_1h = ops.one_hot(pred, n, dtype="float32")
        axes = tuple(range(len(true_1h.shape) - 1))
        tp = ops.sum(true_1h * pred_1h, axis=axes)
        self.tp.assign_add(ops.cast(tp, "float64"))
        self.fp.assign_add(ops.cast(ops.sum(pred_1h, axis=axes) - tp, "float64"))
        self.fn.assign_add(ops.cast(ops.sum(true_1h, axis=axes) - tp, "float64"))

    def result(self) -> Any:
        denominator = (2 * self.tp + self.fp + self.fn)[1:]
        is_present = ops.cast(denominator > 0, "float64")
        dice = 2 * self.tp[1:] / ops.maximum(denominator, 1.0)
        count = ops.sum(is_present)
        return ops.cast(ops.sum(dice * is_present) / ops.maximum(count, 1.0), "float32")

    def reset_state(self) -> None:
        for variable in (self.tp, self.fp, self.fn):
            variable.assign(ops.zeros(variable.shape, dtype=variable.dtype))

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "num_classes": self.num_classes}


def seed_dice(y_true: Any, y_pred: Any, xp: Any = np, smooth: float = 1.0) -> Any:
    """The seed's ``dice_coef_multiclass``, exactly: per image, a soft Dice over height, width
    and all channels together (smoothed by 1), then the mean over the batch.

    Channels are pooled, so background counts as much as the lesion: an all-background
    prediction of an image whose lesion covers 1/8 of it still scores about 0.875. ``xp`` is
    numpy or ``keras.ops``.

    >>> t = np.zeros((1, 2, 2, 2)); t[..., 0] = 1  # one image, all background
    >>> round(float(seed_dice(t, t)), 6)
    1.0
    """
    axes = tuple(range(1, len(y_pred.shape)))
    intersection = xp.sum(y_true * y_pred, axis=axes)
    union = xp.sum(y_true, axis=axes) + xp.sum(y_pred, axis=axes)
    return xp.mean((2.0 * intersection + smooth) / (union + smooth))


def seed_dice_of_classes(pred: np.ndarray, true: np.ndarray, num_classes: int) -> float:
    """:func:`seed_dice` of two class maps (H,W) as one image, on the model's channels (one-hot
    targets; a one-class model has the single foreground channel)."""

    def channels(classes: np.ndarray) -> np.ndarray:
        if num_classes == 1:
            return (classes == 1)[None, ..., None].astype(np.float64)
        return np.eye(num_classes, dtype=np.float64)[classes.astype(np.int64)][None]

    return float(seed_dice(channels(true), channels(pred)))


@keras.saving.register_keras_serializable(package="flexunet")
def dice_coef_multiclass(y_true: Any, y_pred: Any) -> Any:
    """The seed's metric (:func:`seed_dice`) as a Keras metric on the model's probabilities.

    Kept as a labelled extra: on images that are mostly background it stays near 1 whatever
    the model does with the lesion, so it is never used to choose or compare models.
    """
    return seed_dice(y_true, y_pred, ops)


def keras_metrics(num_classes: int, names: tuple[str, ...]) -> list[Any]:
    """The metrics ``compile`` gets: foreground Dice always, the seed's Dice when asked."""
    metrics: list[Any] = [ForegroundDice(num_classes)]
    if "dice_coef_multiclass" in names:
        metrics.append(dice_coef_multiclass)
    return metrics

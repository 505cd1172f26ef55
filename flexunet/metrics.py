"""Segmentation metrics, defined once and used by training, evaluation and the search.

Foreground Dice of class c is 2|P ∩ G| / (|P| + |G|), computed from confusion counts; where
both P and G are empty it is 1. The mean foreground Dice averages classes c >= 1. The Keras
metric accumulates the same counts over a whole validation epoch (a global Dice, not a mean of
batch Dices) and applies the same :func:`dice_score`.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
from keras import ops
from scipy import ndimage

# Defined beside the config's checks, which must not load Keras (every config load would pay
# TensorFlow's import); metrics.num_labels is the same function.
from flexunet.postprocess import num_labels  # noqa: F401


def dice_score(tp: Any, fp: Any, fn: Any, xp: Any = np) -> Any:
    """Dice from confusion counts; ``xp`` is numpy or ``keras.ops``."""
    denominator = 2 * tp + fp + fn
    return xp.where(denominator > 0, 2 * tp / xp.maximum(denominator, 1), 1.0)


def iou_score(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    union = tp + fp + fn
    return np.where(union > 0, tp / np.maximum(union, 1), 1.0)


def precision_score(tp: np.ndarray, fp: np.ndarray) -> np.ndarray:
    """tp / (tp + fp); NaN where nothing was predicted."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(tp + fp > 0, tp / (tp + fp), np.nan)


def recall_score(tp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    """tp / (tp + fn); NaN where the class is absent from the ground truth."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(tp + fn > 0, tp / (tp + fn), np.nan)


def confusion(pred: np.ndarray, true: np.ndarray, n_labels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class (tp, fp, fn) counts of two class maps of equal shape."""
    index = true.astype(np.int64).ravel() * n_labels + pred.astype(np.int64).ravel()
    matrix = np.bincount(index, minlength=n_labels * n_labels).reshape(n_labels, n_labels)
    tp = np.diag(matrix).copy()
    return tp, matrix.sum(axis=0) - tp, matrix.sum(axis=1) - tp


def to_classes(probabilities: np.ndarray) -> np.ndarray:
    """Model output (...,C) -> class map: argmax, or > 0.5 for a single sigmoid channel."""
    if probabilities.shape[-1] == 1:
        return (probabilities[..., 0] > 0.5).astype(np.uint8)
    return np.argmax(probabilities, axis=-1).astype(np.uint8)


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
    """Mean foreground Dice over everything seen since the last reset (global, not per batch)."""

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
        return ops.cast(ops.mean(dice_score(self.tp, self.fp, self.fn, ops)[1:]), "float32")

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

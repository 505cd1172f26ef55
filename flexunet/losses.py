"""Training losses: categorical cross-entropy, soft foreground Dice, and their sum; each
optionally weighted by class (:func:`class_weights`, :class:`ClassWeighted`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
from keras import ops

_MAX_WEIGHT = 100.0  # a class of a few pixels must not swamp the loss


@keras.saving.register_keras_serializable(package="flexunet")
def dice_loss(y_true: Any, y_pred: Any) -> Any:
    """1 - soft Dice of the foreground channels, pooled over the batch.

    Pooling over the batch (rather than averaging per image) keeps the loss defined on
    hemorrhage-free slices, where a per-image Dice would be 0/0.
    """
    if y_pred.shape[-1] > 1:
        y_true, y_pred = y_true[..., 1:], y_pred[..., 1:]
    axes = tuple(range(len(y_pred.shape) - 1))
    intersection = ops.sum(y_true * y_pred, axis=axes)
    denominator = ops.sum(y_true, axis=axes) + ops.sum(y_pred, axis=axes)
    return 1.0 - ops.mean((2.0 * intersection + 1.0) / (denominator + 1.0))


@keras.saving.register_keras_serializable(package="flexunet")
def crossentropy(y_true: Any, y_pred: Any) -> Any:
    """Categorical cross-entropy (binary for a single sigmoid channel), mean over pixels."""
    if y_pred.shape[-1] == 1:
        return ops.mean(keras.losses.binary_crossentropy(y_true, y_pred))
    return ops.mean(keras.losses.categorical_crossentropy(y_true, y_pred))


@keras.saving.register_keras_serializable(package="flexunet")
def crossentropy_dice_loss(y_true: Any, y_pred: Any) -> Any:
    return crossentropy(y_true, y_pred) + dice_loss(y_true, y_pred)


def class_weights(masks: np.ndarray, n_labels: int) -> tuple[float, ...]:
    """Per-label weights from training masks: 1/sqrt of each label's pixel share, scaled so
    that a pixel weighs 1 on average, capped at 100; 1 for a label the masks lack.

    The square root is the usual compromise (as in "median frequency" and effective-number
    weighting): full inverse frequency would weigh a 0.1% class 1000 times background.

    >>> masks = np.zeros((1, 10, 10), np.uint8); masks[0, :1, :4] = 1   # 4% class 1
    >>> [round(w, 3) for w in class_weights(masks, 3)]
    [0.865, 4.238, 1.0]
    """
    counts = np.bincount(np.asarray(masks, np.int64).ravel(), minlength=n_labels)[:n_labels].astype(np.float64)
    share = counts / max(counts.sum(), 1.0)
    present = share > 0
    weights = np.ones(n_labels)
    weights[present] = share[present] ** -0.5
    weights[present] /= float((weights[present] * share[present]).sum())
    return tuple(float(w) for w in np.minimum(weights, _MAX_WEIGHT))


@keras.saving.register_keras_serializable(package="flexunet")
class ClassWeighted(keras.losses.Loss):
    """A named loss with each label weighted: cross-entropy per pixel by its true label's
    weight, Dice as the weighted mean of the foreground classes' soft Dice.

    A Loss object rather than a closure, so that a compiled model with it saves and loads
    (a resumed trial reloads its compiled checkpoint).
    """

    def __init__(self, base: str, weights: Sequence[float], name: str | None = None, **kwargs: Any) -> None:
        super().__init__(name=name or f"{base.replace('+', '_')}_class_weighted", **kwargs)
        self.base, self.weights = base, tuple(float(w) for w in weights)

    def call(self, y_true: Any, y_pred: Any) -> Any:
        w = ops.convert_to_tensor(self.weights, dtype=y_pred.dtype)
        total = 0.0
        if "crossentropy" in self.base:
            total = total + _weighted_crossentropy(y_true, y_pred, w)
        if "dice" in self.base:
            total = total + _weighted_dice_loss(y_true, y_pred, w)
        return total

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "base": self.base, "weights": list(self.weights)}


def _weighted_crossentropy(y_true: Any, y_pred: Any, w: Any) -> Any:
    if y_pred.shape[-1] == 1:
        pixel_w = y_true[..., 0] * w[1] + (1.0 - y_true[..., 0]) * w[0]
        return ops.mean(pixel_w * keras.losses.binary_crossentropy(y_true, y_pred))
    pixel_w = ops.sum(y_true * w, axis=-1)
    return ops.mean(pixel_w * keras.losses.categorical_crossentropy(y_true, y_pred))


def _weighted_dice_loss(y_true: Any, y_pred: Any, w: Any) -> Any:
    if y_pred.shape[-1] > 1:
        y_true, y_pred, w = y_true[..., 1:], y_pred[..., 1:], w[1:]
    else:
        w = w[1:]
    axes = tuple(range(len(y_pred.shape) - 1))
    intersection = ops.sum(y_true * y_pred, axis=axes)
    denominator = ops.sum(y_true, axis=axes) + ops.sum(y_pred, axis=axes)
    dice = (2.0 * intersection + 1.0) / (denominator + 1.0)
    return 1.0 - ops.sum(w * dice) / ops.sum(w)


def get(name: str, weights: Sequence[float] | None = None) -> Any:
    """The loss a config names (names are checked when the config is read), weighted by
    class where ``weights`` (one per label) are given."""
    if weights is not None:
        return ClassWeighted(name, weights)
    return {
        "categorical_crossentropy": crossentropy,
        "dice_loss": dice_loss,
        "categorical_crossentropy+dice_loss": crossentropy_dice_loss,
    }[name]

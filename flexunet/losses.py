"""Training losses: categorical cross-entropy, soft foreground Dice, and their sum."""

from __future__ import annotations

from typing import Any

import keras
from keras import ops


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


def get(name: str) -> Any:
    """The loss function a config names (names are checked when the config is read)."""
    return {
        "categorical_crossentropy": crossentropy,
        "dice_loss": dice_loss,
        "categorical_crossentropy+dice_loss": crossentropy_dice_loss,
    }[name]

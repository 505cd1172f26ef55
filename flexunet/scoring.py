"""Dice from confusion counts, and the one convention for averaging it over classes.

NumPy only (no Keras, no SciPy), so that the config's checks, post-processing and the metrics
share it without importing each other.

The convention, as nnU-Net's evaluation and MONAI's ``DiceMetric(ignore_empty=True)``: a class
with no reference pixels and no predicted pixels in the evaluated set is *absent* there. Its Dice
is undefined (NaN), and it leaves every mean over classes. A class predicted where the reference
has none is present, and scores 0. A set in which no foreground class is present at all (no
reference and no predicted foreground) has mean foreground Dice 0: there is nothing to find,
and a model must not be rewarded for finding nothing.

Example:
    >>> import numpy as np
    >>> tp, fp, fn = np.array([90, 5, 0, 0]), np.array([0, 5, 0, 3]), np.array([10, 5, 0, 0])
    >>> dice_score(tp, fp, fn).round(3).tolist()   # background, class 1, absent class 2, class 3
    [0.947, 0.5, nan, 0.0]
    >>> round(mean_foreground_dice(tp, fp, fn), 6)   # classes 1 and 3; class 2 is left out
    0.25
    >>> present_classes(tp, fp, fn).tolist()
    [1, 3]
"""

from __future__ import annotations

from typing import Any

import numpy as np


def num_labels(num_classes: int) -> int:
    """Class labels of a model with ``num_classes`` output channels (one sigmoid = 2 labels)."""
    return 2 if num_classes == 1 else num_classes


def dice_score(tp: Any, fp: Any, fn: Any, xp: Any = np) -> Any:
    """Per-class Dice from confusion counts; NaN where the class is absent (no reference, no
    prediction). ``xp`` is numpy or ``keras.ops``."""
    denominator = 2 * tp + fp + fn
    return xp.where(denominator > 0, 2 * tp / xp.maximum(denominator, 1), float("nan"))


def present(tp: Any, fp: Any, fn: Any) -> Any:
    """Where a class is present: it has reference or predicted pixels."""
    return (2 * tp + fp + fn) > 0


def mean_foreground_dice(tp: Any, fp: Any, fn: Any) -> float | np.ndarray:
    """Mean Dice over the foreground classes (labels >= 1) present in the counts; 0 where none is.

    Counts have the class on their last axis; leading axes (folds, cut-offs) are kept, so a
    (folds, classes) input gives one value per fold.
    """
    tp, fp, fn = (np.asarray(v, np.float64) for v in (tp, fp, fn))
    return class_mean(dice_score(tp, fp, fn)[..., 1:])


def class_mean(values: Any, axis: int = -1) -> float | np.ndarray:
    """The mean of per-class values over ``axis``, absent classes (NaN) left out; 0 where every
    class is absent."""
    values = np.asarray(values, np.float64)
    finite = ~np.isnan(values)
    count = finite.sum(axis=axis)
    total = np.where(finite, values, 0.0).sum(axis=axis)
    mean = np.where(count > 0, total / np.maximum(count, 1), 0.0)
    return float(mean) if mean.ndim == 0 else mean


def present_classes(tp: Any, fp: Any, fn: Any) -> np.ndarray:
    """The foreground labels that :func:`mean_foreground_dice` averages."""
    return np.flatnonzero(present(np.asarray(tp), np.asarray(fp), np.asarray(fn))[1:]) + 1


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


def foreground_dice_of(pred: np.ndarray, true: np.ndarray, n_labels: int) -> float:
    """:func:`mean_foreground_dice` of two class maps (any shape, pooled over all pixels)."""
    return mean_foreground_dice(*confusion(pred, true, n_labels))

"""How sure a Dice is: a bootstrap interval over patients.

A Dice over a few patients swings with which patients were drawn, so a figure comes with a 95%
interval: patients are resampled with replacement (slices of one patient stay together, as a
new patient would come), their confusion counts summed, and the mean foreground Dice computed
as everywhere (:func:`flexunet.scoring.mean_foreground_dice`). With two test patients the
interval is wide, which is the point: it says what such a figure can tell.

Example:
    >>> import numpy as np
    >>> tp = np.array([[0, 10], [0, 0]]); fp = np.array([[0, 0], [0, 10]]); fn = np.array([[0, 0], [0, 10]])
    >>> bootstrap_interval(tp, fp, fn, resamples=2000, seed=0)    # one perfect patient, one missed
    (0.0, 1.0)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from flexunet.scoring import confusion, mean_foreground_dice, num_labels

LEVEL = 0.95
RESAMPLES = 2000


def group_counts(pred: np.ndarray, true: np.ndarray, groups: Sequence[str],
                 n_labels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-group (tp, fp, fn) of class maps (N,H,W), each (groups, n_labels), in the order the
    groups first appear."""
    order = list(dict.fromkeys(groups))
    counts = np.zeros((3, len(order), n_labels), np.int64)
    index = {g: i for i, g in enumerate(order)}
    for i, group in enumerate(groups):
        for acc, value in zip(counts, confusion(pred[i], true[i], n_labels)):
            acc[index[group]] += value
    return counts[0], counts[1], counts[2]


def bootstrap_interval(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray, *, resamples: int = RESAMPLES,
                       level: float = LEVEL, seed: int = 0) -> tuple[float, float]:
    """The percentile bootstrap interval of the pooled mean foreground Dice over groups
    (patients): rows of the (groups, labels) counts drawn with replacement."""
    tp, fp, fn = (np.asarray(v, np.int64) for v in (tp, fp, fn))
    if tp.ndim != 2 or not len(tp):
        raise ValueError("bootstrap_interval needs (groups, labels) counts of at least one group")
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(tp), size=(resamples, len(tp)))
    dice = mean_foreground_dice(tp[draws].sum(axis=1), fp[draws].sum(axis=1), fn[draws].sum(axis=1))
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(np.asarray(dice), [tail, 100 - tail])
    return float(low), float(high)


def summary(pred: np.ndarray, true: np.ndarray, groups: Sequence[str], num_classes: int, *,
            seed: int = 0) -> dict[str, Any]:
    """What an evaluation adds: the pooled mean foreground Dice's interval over ``groups``
    (patients; a slice without one is its own group). (Each class's predicted / true area is
    ``flexunet.evaluate.score``'s ``area_ratio``.)"""
    tp, fp, fn = group_counts(pred, true, groups, num_labels(num_classes))
    low, high = bootstrap_interval(tp, fp, fn, seed=seed)
    return {"foreground_dice_interval": {"low": low, "high": high, "level": LEVEL, "groups": len(tp),
                                         "resamples": RESAMPLES, "over": "patients"}}

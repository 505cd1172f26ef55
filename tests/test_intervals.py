"""flexunet/intervals.py: the bootstrap interval over patients, on known inputs."""

from __future__ import annotations

import numpy as np
import pytest

from flexunet import intervals


def test_identical_patients_give_a_point_interval() -> None:
    tp, fp, fn = np.array([[0, 6]] * 4), np.array([[0, 2]] * 4), np.array([[0, 2]] * 4)
    low, high = intervals.bootstrap_interval(tp, fp, fn, resamples=500)
    assert low == pytest.approx(0.75) and high == pytest.approx(0.75)


def test_the_interval_holds_the_pooled_dice_and_widens_with_disagreeing_patients() -> None:
    good = [[0, 9], [0, 1], [0, 1]]  # tp, fp, fn of a patient found well
    bad = [[0, 1], [0, 9], [0, 9]]
    counts = np.array([good, good, bad, bad, good, bad]).transpose(1, 0, 2)  # (3, patients, labels)
    low, high = intervals.bootstrap_interval(*counts, resamples=4000, seed=1)
    pooled = 2 * 30 / (2 * 30 + 30 + 30)
    assert low < pooled < high
    assert high - low > 0.2
    # The same seed draws the same patients.
    assert intervals.bootstrap_interval(*counts, resamples=4000, seed=1) == (low, high)


def test_group_counts_keep_a_patients_slices_together() -> None:
    pred = np.zeros((3, 2, 2), np.uint8)
    true = np.zeros((3, 2, 2), np.uint8)
    pred[0, 0, 0] = true[0, 0, 0] = 1  # patient a: one true positive
    pred[1, 0, 0] = 1  # patient a: one false positive
    true[2, 1, 1] = 1  # patient b: one missed pixel
    tp, fp, fn = intervals.group_counts(pred, true, ["a", "a", "b"], 2)
    assert tp[:, 1].tolist() == [1, 0] and fp[:, 1].tolist() == [1, 0] and fn[:, 1].tolist() == [0, 1]
    found = intervals.summary(pred, true, ["a", "a", "b"], 2)
    assert found["foreground_dice_interval"]["groups"] == 2

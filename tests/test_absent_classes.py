"""Issue 23: a class with no reference and no predicted pixels leaves every mean over classes.

The Keras metric, the NumPy metric, the pooled out-of-fold value and ``evaluate`` must give the
same figure, on a fold whose slices lack a class."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from flexunet import metrics as m
from flexunet.data.augment import one_hot
from flexunet.evaluate import score
from search.trial.cv import class_dice, pooled_foreground_dice


def _fold() -> np.ndarray:
    """Four 8x8 slices of a 4-class model (background + 3): classes 1 and 2 present, 3 absent."""
    masks = np.zeros((4, 8, 8), np.uint8)
    masks[0, 1:4, 1:4] = 1
    masks[1, 2:6, 2:6] = 1
    masks[2, 0:2, 0:8] = 2
    return masks


def _four_ways(pred: np.ndarray, true: np.ndarray, num_classes: int) -> list[float]:
    probabilities = keras.ops.convert_to_numpy(one_hot(pred, num_classes))
    metric = m.ForegroundDice(num_classes)
    metric.update_state(keras.ops.convert_to_numpy(one_hot(true, num_classes)), probabilities)
    names = [f"{i:03d}_{i}" for i in range(len(true))]
    return [float(metric.result()),
            float(m.mean_foreground_dice(*m.confusion(pred, true, m.num_labels(num_classes)))),
            pooled_foreground_dice(probabilities, true, num_classes),
            score(pred, true, names, num_classes).summary["foreground_dice_global"]]


def test_a_model_that_predicts_nothing_scores_0_and_the_absent_class_leaves_the_mean() -> None:
    true = _fold()
    nothing = np.zeros_like(true)
    assert _four_ways(nothing, true, 4) == pytest.approx([0.0] * 4, abs=1e-6)
    summary = score(nothing, true, ["a", "b", "c", "d"], 4).summary
    assert summary["averaged_classes"] == [1, 2] and summary["absent_classes"] == [3]
    assert np.isnan(summary["classes"][3]["dice_global"])
    assert summary["classes"][1]["dice_global"] == 0.0 and summary["classes"][2]["dice_global"] == 0.0


def test_the_four_implementations_agree_when_a_class_is_absent() -> None:
    true = _fold()
    pred = true.copy()
    pred[0] = 0                      # class 1: 16 of 25 reference pixels found, none false
    pred[2, 0:2, 0:4] = 0            # class 2: half found
    expected = np.mean([2 * 16 / (2 * 16 + 9), 2 * 8 / (2 * 8 + 8)])  # class 3 is not in the mean
    assert _four_ways(pred, true, 4) == pytest.approx([expected] * 4, abs=1e-6)
    assert class_dice(keras.ops.convert_to_numpy(one_hot(pred, 4)), true, 4)[2] is None


def test_a_class_predicted_where_the_reference_has_none_counts_0() -> None:
    true = _fold()
    pred = true.copy()
    pred[3, 0, 0] = 3                # one false pixel of the absent class
    assert _four_ways(pred, true, 4) == pytest.approx([np.mean([1.0, 1.0, 0.0])] * 4, abs=1e-6)


def test_a_set_with_no_class_present_scores_0_not_1() -> None:
    empty = np.zeros((2, 8, 8), np.uint8)
    assert _four_ways(empty, empty, 2) == pytest.approx([0.0] * 4, abs=1e-6)
    summary = score(empty, empty, ["a", "b"], 2).summary
    assert summary["averaged_classes"] == [] and summary["foreground_dice_mean_per_image"] == 0.0


def test_per_image_figures_leave_out_images_without_any_class() -> None:
    true = _fold()[:2]
    pred = true.copy()
    true = np.concatenate([true, np.zeros((1, 8, 8), np.uint8)])   # a third slice: no lesion, none predicted
    pred = np.concatenate([pred, np.zeros((1, 8, 8), np.uint8)])
    evaluation = score(pred, true, ["001_1", "001_2", "001_3"], 2)
    assert np.isnan(evaluation.rows[2]["foreground_dice"])
    assert evaluation.summary["foreground_dice_mean_per_image"] == pytest.approx(1.0)


def test_binary_values_are_unchanged_where_every_image_holds_a_lesion() -> None:
    rng = np.random.default_rng(3)
    true = (rng.random((5, 16, 16)) > 0.7).astype(np.uint8)
    true[:, 0, 0] = 1
    pred = np.where(rng.random(true.shape) > 0.25, true, 1 - true).astype(np.uint8)
    tp, fp, fn = m.confusion(pred, true, 2)
    old_formula = 2 * tp[1] / (2 * tp[1] + fp[1] + fn[1])   # what every figure was before
    assert _four_ways(pred, true, 2) == pytest.approx([old_formula] * 4, abs=1e-6)
    rows = score(pred, true, [str(i) for i in range(5)], 2).rows
    for i, row in enumerate(rows):
        t, f_p, f_n = m.confusion(pred[i], true[i], 2)
        assert row["foreground_dice"] == pytest.approx(2 * t[1] / (2 * t[1] + f_p[1] + f_n[1]))


def test_status_shows_each_class_of_a_multiclass_trial_and_absent_ones_as_such() -> None:
    import optuna

    from search import keys
    from search.results.status import class_text

    trial = optuna.trial.create_trial(value=0.25, user_attrs={keys.CLASS_DICE: [0.5, None, 0.0]})
    assert class_text(trial) == "per class: 1 0.5000, 2 absent, 3 0.0000"
    assert class_text(optuna.trial.create_trial(value=0.5, user_attrs={keys.CLASS_DICE: [0.5]})) is None

from __future__ import annotations

import keras
import numpy as np
import pytest

from flexunet import metrics as m
from flexunet.data.augment import one_hot as _device_one_hot
from flexunet.evaluate import score


def one_hot(masks: np.ndarray, num_classes: int) -> np.ndarray:
    return keras.ops.convert_to_numpy(_device_one_hot(masks, num_classes))


def test_dice_counts_and_empty_cases() -> None:
    true = np.zeros((4, 4), np.uint8)
    pred = np.zeros((4, 4), np.uint8)
    true[0, :2] = 1
    pred[0, 1:3] = 1
    tp, fp, fn = m.confusion(pred, true, 2)
    assert (tp[1], fp[1], fn[1]) == (1, 1, 1)
    assert m.dice_score(tp, fp, fn)[1] == pytest.approx(0.5)
    empty = np.zeros((4, 4), np.uint8)
    assert np.isnan(m.dice_score(*m.confusion(empty, empty, 2))[1])  # both empty: absent, undefined
    assert m.mean_foreground_dice(*m.confusion(empty, empty, 2)) == 0.0  # no class present: 0, not 1
    assert m.dice_score(*m.confusion(pred, empty, 2))[1] == 0.0  # only one empty


def test_keras_metric_is_the_global_dice_of_the_evaluation() -> None:
    rng = np.random.default_rng(0)
    true = (rng.random((6, 16, 16)) > 0.8).astype(np.uint8)
    pred = np.where(rng.random((6, 16, 16)) > 0.3, true, 1 - true).astype(np.uint8)
    metric = m.ForegroundDice(2)
    for batch in (slice(0, 4), slice(4, 6)):  # two batches, one epoch
        metric.update_state(one_hot(true[batch], 2), one_hot(pred[batch], 2) * 0.9 + 0.05)
    expected = score(pred, true, [f"{i}" for i in range(6)], 2).summary["foreground_dice_global"]
    assert float(metric.result()) == pytest.approx(expected, rel=1e-5)
    metric.reset_state()
    assert float(metric.result()) == 0.0  # nothing seen: no class present, 0 (never 1)


def test_multiclass_mean_excludes_background() -> None:
    true = np.array([[0, 1, 2, 2]], np.uint8)
    pred = np.array([[0, 1, 1, 2]], np.uint8)
    summary = score(pred[None], true[None], ["p_1"], 3).summary
    assert summary["classes"][1]["dice_global"] == pytest.approx(2 / 3)
    assert summary["classes"][2]["dice_global"] == pytest.approx(2 / 3)
    assert summary["foreground_dice_global"] == pytest.approx(2 / 3)


def _lesion_eighth() -> np.ndarray:
    """One-hot targets of two 64x64 images whose lesion covers exactly 1/8 (512 pixels)."""
    true = np.zeros((2, 64, 64), np.uint8)
    true[:, :8, :] = 1
    return one_hot(true, 2)


def _seed_formula(y_true: np.ndarray, y_pred: np.ndarray, smooth: float = 1.0) -> float:
    # The seed's src/dice_coef_multiclass.py, line for line, with numpy for K.
    intersection = np.sum(y_true * y_pred, axis=(1, 2, 3))
    union = np.sum(y_true, axis=(1, 2, 3)) + np.sum(y_pred, axis=(1, 2, 3))
    return float(np.mean((2.0 * intersection + smooth) / (union + smooth), axis=0))


def test_seed_dice_is_the_seeds_formula_on_the_three_cases_of_issue_12() -> None:
    true = _lesion_eighth()
    background = np.zeros_like(true)
    background[..., 0] = 1
    # Per image: intersection = 3584 background pixels, union = 4096 + 4096.
    assert float(m.dice_coef_multiclass(true, background)) == pytest.approx((2 * 3584 + 1) / (8192 + 1), abs=1e-6)
    confident = true * 0.9 + (1 - true) * 0.1  # the right class at 0.9, the other at 0.1
    # Per image: intersection = 0.9 * 4096, union = 4096 + 4096.
    assert float(m.dice_coef_multiclass(true, confident)) == pytest.approx((2 * 0.9 * 4096 + 1) / 8193, abs=1e-6)
    rng = np.random.default_rng(12)
    logits = rng.normal(size=true.shape)
    random = np.exp(logits) / np.exp(logits).sum(axis=-1, keepdims=True)
    got = float(m.dice_coef_multiclass(true.astype(np.float32), random.astype(np.float32)))
    assert got == pytest.approx(_seed_formula(true, random), abs=1e-6)
    assert got == pytest.approx(0.5, abs=0.01)  # E[p of the true class] = 1/2
    for pred in (background, confident):
        assert float(m.dice_coef_multiclass(true, pred)) == pytest.approx(_seed_formula(true, pred), abs=1e-6)


def test_seed_dice_averages_images_not_pixels() -> None:
    true = _lesion_eighth()
    pred = true.copy()
    pred[1] = 0
    pred[1, ..., 0] = 1  # image 0 perfect (1.0), image 1 all background (7169/8193)
    assert float(m.seed_dice(true, pred)) == pytest.approx((1.0 + 7169 / 8193) / 2)


def test_seed_dice_of_an_evaluation_is_the_seeds_formula_on_hard_predictions() -> None:
    true = np.zeros((1, 64, 64), np.uint8)
    true[0, :8, :] = 1
    pred = np.zeros_like(true)  # misses the lesion entirely
    summary = score(pred, true, ["x"], 2).summary
    assert summary["foreground_dice_global"] == 0.0
    assert summary["seed_dice_coef_multiclass (background-inclusive, not comparable)"] == pytest.approx(7169 / 8193)
    sigmoid = score(pred, true, ["x"], 1).summary  # one channel: the foreground alone
    assert sigmoid["seed_dice_coef_multiclass (background-inclusive, not comparable)"] == pytest.approx(1 / 513)


def test_hd95_of_shifted_squares() -> None:
    a = np.zeros((40, 40), bool)
    b = np.zeros((40, 40), bool)
    a[10:20, 10:20] = True
    b[10:20, 13:23] = True
    assert m.hd95(a, b) == pytest.approx(3.0)
    assert m.hd95(a, np.zeros_like(a)) is None


def test_detection_and_patients() -> None:
    true = np.zeros((4, 8, 8), np.uint8)
    true[0, 1, 1] = true[1, 2, 2] = 1
    pred = np.zeros_like(true)
    pred[0, 1, 1] = 1
    pred[2, 5, 5] = 1
    summary = score(pred, true, ["001_1", "001_2", "002_1", "002_2"], 2,
                    r"^(?P<patient>\d+)_(?P<slice>.+)$").summary
    d = summary["detection"]
    assert (d["tp"], d["fn"], d["fp"], d["tn"]) == (1, 1, 1, 1)
    assert d["sensitivity"] == 0.5 and d["specificity"] == 0.5
    assert summary["per_patient"]["001"]["dice_mean_over_positive_slices"] == 0.5
    assert np.isnan(summary["per_patient"]["002"]["dice_mean_over_positive_slices"])

"""Post-processing chosen on out-of-fold predictions: a rule is kept only when it raises pooled
foreground Dice by more than the noise, leaves no fold worse and removes (nearly) no true
lesion; the mildest such rule within the noise of the best; and the [postprocess] section."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli_here
from flexunet import config as cfg
from flexunet import postprocess
from flexunet.errors import ConfigError
from flexunet.postprocess import PostProcessing


def _dice(classes: np.ndarray, masks: np.ndarray, n_labels: int = 2) -> float:
    """Pooled foreground Dice written out from its definition, independent of flexunet.metrics."""
    dices = []
    for c in range(1, n_labels):
        p, t = classes == c, masks == c
        total = p.sum() + t.sum()
        dices.append(1.0 if total == 0 else 2 * (p & t).sum() / total)
    return float(np.mean(dices))


def _two_class(foreground: np.ndarray) -> np.ndarray:
    return np.stack([1 - foreground, foreground], axis=-1).astype(np.float16)


def _lesion_and_blob() -> tuple[np.ndarray, np.ndarray]:
    """Two slices: a 6x6 lesion predicted at 0.8, and a 2x2 false-positive blob at 0.8 (as
    confident as the lesion, so only its size tells it apart)."""
    fg = np.full((2, 16, 16), 0.1, np.float32)
    masks = np.zeros((2, 16, 16), np.uint8)
    masks[0, 3:9, 3:9] = 1
    fg[0, 3:9, 3:9] = 0.8
    fg[1, 12:14, 12:14] = 0.8
    return _two_class(fg), masks


def test_small_false_positive_blob_is_removed_by_the_size_rule() -> None:
    probabilities, masks = _lesion_and_blob()
    pp = postprocess.choose(probabilities, masks)
    assert pp == PostProcessing(threshold=None, min_component_size=(5,))  # the 4 px blob goes, the lesion stays
    classes = postprocess.apply(probabilities, pp)
    np.testing.assert_array_equal(classes, masks)
    assert postprocess.pooled_dice(probabilities, masks, pp) == 1.0
    assert _dice(postprocess.apply(probabilities, PostProcessing()), masks) == pytest.approx(2 * 36 / (40 + 36))


def test_chosen_rule_is_within_the_noise_of_every_allowed_candidate() -> None:
    """Brute force over thresholds and sizes on noisy data: no rule the guards allow (sizes up to
    the smallest true lesion, here 64 px) beats the choice by more than TOLERANCE, and the
    unguarded figure is the plain maximum over every candidate."""
    rng = np.random.default_rng(0)
    masks = np.zeros((4, 24, 24), np.uint8)
    masks[:, 6:14, 6:14] = 1
    fg = np.clip(0.45 * masks + rng.uniform(0.0, 0.6, masks.shape), 0, 1).astype(np.float32)
    probabilities = _two_class(fg)
    selection = postprocess.select(probabilities, masks)
    pp = selection.rules
    assert selection.size_caps == (64,)
    best = postprocess.pooled_dice(probabilities, masks, pp)
    assert best == pytest.approx(_dice(postprocess.apply(probabilities, pp), masks))
    assert best == pytest.approx(selection.dice_postprocessed)
    assert best > _dice(postprocess.apply(probabilities, PostProcessing()), masks) + postprocess.TOLERANCE
    scores = {}
    for threshold, size in itertools.product((None, *postprocess.THRESHOLDS), range(0, 80, 3)):
        candidate = PostProcessing(threshold, (size,))
        scores[candidate] = _dice(postprocess.apply(probabilities, candidate), masks)
        if size <= 64:
            assert scores[candidate] <= best + postprocess.TOLERANCE, candidate
    assert selection.unguarded_dice >= max(scores.values()) - 1e-12


def _small_lesions_found_badly() -> tuple[np.ndarray, np.ndarray]:
    """The sample study's failure in miniature (10 slices, 32 px): one 10x10 lesion predicted
    exactly, and nine 3x3 lesions each found inside a 6x6 predicted blob (9 true, 27 false
    pixels). Pooled Dice 2*181 / (2*181 + 243) = 0.598; removing components under 37 px keeps
    only the big lesion: 2*100 / (2*100 + 81) = 0.712, a large gain that deletes 90% of the
    true lesions."""
    fg = np.full((10, 32, 32), 0.05, np.float32)
    masks = np.zeros((10, 32, 32), np.uint8)
    masks[0, 4:14, 4:14] = 1
    fg[0, 4:14, 4:14] = 0.9
    for i in range(1, 10):
        masks[i, 10:13, 10:13] = 1
        fg[i, 9:15, 9:15] = 0.9
    return _two_class(fg), masks


def test_a_big_size_rule_with_a_large_gain_is_refused_when_it_removes_true_lesions() -> None:
    probabilities, masks = _small_lesions_found_badly()
    selection = postprocess.select(probabilities, masks)
    # Without the guard: components under 37 px go (the 36 px blobs), Dice 0.598 -> 0.712.
    assert selection.unguarded == PostProcessing(None, (37,))
    assert selection.dice == pytest.approx(362 / 605)
    assert selection.unguarded_dice == pytest.approx(200 / 281)
    # The smallest true lesion is 9 px (10 lesions: the cap is the smallest one's size), and no
    # predicted component is under 9 px: nothing may be removed.
    assert selection.size_caps == (9,)
    assert selection.rules == PostProcessing() and selection.dice_postprocessed == selection.dice
    assert "refused" in (selection.describe_refused() or "")
    # On a new patient with a small lesion found the same way, the refused rule deletes it.
    new = np.full((1, 32, 32), 0.05, np.float32)
    new[0, 2:8, 2:8] = 0.9
    new_masks = np.zeros((1, 32, 32), np.uint8)
    new_masks[0, 3:6, 3:6] = 1
    assert postprocess.pooled_dice(_two_class(new), new_masks, selection.unguarded) == 0.0
    assert postprocess.pooled_dice(_two_class(new), new_masks, selection.rules) == pytest.approx(18 / 45)


def test_size_cap_is_the_size_that_95_percent_of_true_lesions_reach() -> None:
    # 19 lesions: floor(0.05 * 19) = 0, so the cap is the smallest lesion's size (1 px).
    true = np.zeros((19, 8, 8), bool)
    true[:, 4:7, 4:7] = True
    true[0] = False
    true[0, 0, 0] = True
    assert postprocess.size_cap(true) == 1
    # 20 lesions: floor(0.05 * 20) = 1: the second smallest (9 px) may be the cut-off, which
    # removes the one 1 px lesion, 5% of them.
    true = np.concatenate([true, true[1:2]])
    assert postprocess.size_cap(true) == 9
    assert postprocess.size_cap(np.zeros((2, 8, 8), bool)) == 0


def _fragmented_in_one_fold() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fold 0: two 6x6 lesions predicted exactly, each with a 2x2 false positive (removing
    components under 5 px: fold Dice 144/152 -> 1). Fold 1: a 6x6 lesion predicted as an 18 px
    part and a separate 4 px part, both true (the rule drops the 4 px: 44/58 -> 36/54). Pooled:
    188/210 = 0.895 -> 180/198 = 0.909, a gain of 0.014 that comes from fold 0 only."""
    fg = np.full((3, 16, 16), 0.05, np.float32)
    masks = np.zeros((3, 16, 16), np.uint8)
    for i in (0, 1):
        masks[i, 2:8, 2:8] = 1
        fg[i, 2:8, 2:8] = 0.9
        fg[i, 12:14, 12:14] = 0.9
    masks[2, 2:8, 2:8] = 1
    fg[2, 2:8, 2:5] = 0.9
    fg[2, 2:4, 6:8] = 0.9
    return _two_class(fg), masks, np.array([0, 0, 1])


def test_a_rule_that_makes_one_fold_worse_is_refused() -> None:
    probabilities, masks, folds = _fragmented_in_one_fold()
    pooled_only = postprocess.select(probabilities, masks)  # one fold: the pooled gain decides
    assert pooled_only.rules == PostProcessing(None, (5,))
    assert pooled_only.dice == pytest.approx(188 / 210) and pooled_only.dice_postprocessed == pytest.approx(180 / 198)
    by_fold = postprocess.select(probabilities, masks, folds)
    assert by_fold.fold_dice == pytest.approx((144 / 152, 44 / 58))
    assert by_fold.rules == PostProcessing() and by_fold.fold_dice_postprocessed == by_fold.fold_dice
    assert by_fold.unguarded == PostProcessing(None, (5,))


def test_the_smallest_size_within_the_noise_of_the_best_is_kept() -> None:
    """Four 20x20 lesions predicted exactly; ten 2x2 false positives and one 3x3. Removing under
    5 px: 3200/3249 = 0.9849 -> 3200/3209 = 0.9972; under 10 px: 1.0, only 0.0028 more, less
    than TOLERANCE: the 5 px rule is kept, the 10 px one is what the pooled maximum alone takes."""
    fg = np.full((4, 48, 48), 0.05, np.float32)
    masks = np.zeros((4, 48, 48), np.uint8)
    masks[:, 2:22, 2:22] = 1
    fg[:, 2:22, 2:22] = 0.9
    for j in range(10):
        fg[j % 4, 30 + 4 * (j // 4):32 + 4 * (j // 4), 30:32] = 0.9
    fg[3, 40:43, 40:43] = 0.9
    selection = postprocess.select(_two_class(fg), masks)
    assert selection.dice == pytest.approx(3200 / 3249)
    assert selection.rules == PostProcessing(None, (5,))
    assert selection.dice_postprocessed == pytest.approx(3200 / 3209)
    assert selection.unguarded == PostProcessing(None, (10,)) and selection.unguarded_dice == 1.0


def test_a_rule_that_does_not_help_is_not_kept() -> None:
    # Perfect predictions: no threshold or size can raise Dice above 1, so no rule is kept.
    masks = np.zeros((2, 16, 16), np.uint8)
    masks[0, 2:4, 2:4] = 1  # a tiny true lesion: a size rule would remove it
    masks[1, 8:14, 8:14] = 1
    probabilities = _two_class(np.where(masks == 1, 0.7, 0.2).astype(np.float32))
    pp = postprocess.choose(probabilities, masks)
    assert pp == PostProcessing() and pp.is_identity
    assert "none" in pp.describe()


def test_threshold_kept_when_the_lesion_is_underconfident() -> None:
    # The model's lesion probability is 0.4: argmax misses it, a threshold below 0.4 finds it.
    # A weaker false positive larger than the lesion: no size rule can remove it alone.
    fg = np.full((1, 24, 24), 0.05, np.float32)
    masks = np.zeros((1, 24, 24), np.uint8)
    masks[0, 2:8, 2:8] = 1
    fg[0, 2:8, 2:8] = 0.4
    fg[0, 12:19, 12:19] = 0.3
    probabilities = _two_class(fg)
    pp = postprocess.choose(probabilities, masks)
    assert pp.threshold is not None and 0.3 <= pp.threshold < 0.4 and pp.min_component_size is None
    np.testing.assert_array_equal(postprocess.apply(probabilities, pp), masks)


def test_multiclass_sizes_are_chosen_per_class() -> None:
    # Class 1 has a small false positive (removing it helps), class 2 a small true lesion (keep it).
    masks = np.zeros((1, 20, 20), np.uint8)
    masks[0, 2:8, 2:8] = 1
    masks[0, 12:14, 12:14] = 2
    predicted = masks.copy()
    predicted[0, 17:19, 2:4] = 1
    probabilities = np.eye(3, dtype=np.float32)[predicted] * 0.8 + 0.2 / 3
    pp = postprocess.choose(probabilities, masks)
    assert pp.threshold is None and pp.min_component_size is not None
    assert 4 < pp.min_component_size[0] <= 36 and pp.min_component_size[1] == 0
    np.testing.assert_array_equal(postprocess.apply(probabilities, pp), masks)


def test_config_reads_and_writes_the_postprocess_section(tmp_path: Path) -> None:
    text = """
[model]
image_width = 32
image_height = 32
num_classes = 2
num_layers = 3
[postprocess]
threshold = 0.35
min_component_size = (12,)
"""
    config = cfg.loads(text)
    assert config.postprocess == PostProcessing(0.35, (12,))
    path = tmp_path / "train_eval_infer.config"
    cfg.dump(config, path)
    assert cfg.load(path).postprocess == config.postprocess
    assert cfg.loads(text.split("[postprocess]")[0]).postprocess.is_identity


@pytest.mark.parametrize(("line", "fragment"), [
    ("threshold = 1.5", "[postprocess] threshold: 1.5 is out of range"),
    ("threshold = 'high'", "[postprocess] threshold: expected a number"),
    ("min_component_size = (3, 4)", "min_component_size: 2 sizes for 1 foreground class"),
    ("min_component_size = (-1,)", "[postprocess] min_component_size: expected one size >= 0"),
])
def test_bad_postprocess_values_are_config_errors(line: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=r"^cfg: .*") as info:
        cfg.loads(f"[model]\nimage_width = 32\nimage_height = 32\nnum_classes = 2\nnum_layers = 3\n"
                  f"[postprocess]\n{line}\n", source="cfg")
    assert fragment in str(info.value)


def test_bad_postprocess_value_on_the_command_line(tmp_path: Path) -> None:
    config = tmp_path / "bad.config"
    config.write_text("[model]\nimage_width = 32\nimage_height = 32\nnum_classes = 2\nnum_layers = 3\n"
                      "[postprocess]\nthreshold = 0\n", encoding="utf-8")
    run = run_cli_here("evaluate", config)
    assert run.returncode == 2 and run.stderr.count("flexunet: error:") == 1
    assert "[postprocess] threshold: 0.0 is out of range" in run.stderr and "Traceback" not in run.stderr


def test_docstring_example_runs() -> None:
    import doctest

    assert doctest.testmod(postprocess).failed == 0

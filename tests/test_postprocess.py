"""Post-processing chosen on out-of-fold predictions: the rule kept is the one that maximises
pooled foreground Dice, a rule that does not help is not kept, and the [postprocess] section."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli
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


def test_chosen_rule_maximises_dice_over_every_candidate() -> None:
    """Brute force over thresholds and sizes on noisy data: nothing scores higher than the choice."""
    rng = np.random.default_rng(0)
    masks = np.zeros((4, 24, 24), np.uint8)
    masks[:, 6:14, 6:14] = 1
    fg = np.clip(0.45 * masks + rng.uniform(0.0, 0.6, masks.shape), 0, 1).astype(np.float32)
    probabilities = _two_class(fg)
    pp = postprocess.choose(probabilities, masks)
    best = postprocess.pooled_dice(probabilities, masks, pp)
    assert best == pytest.approx(_dice(postprocess.apply(probabilities, pp), masks))
    assert best > _dice(postprocess.apply(probabilities, PostProcessing()), masks)
    for threshold, size in itertools.product((None, *postprocess.THRESHOLDS), range(0, 40, 3)):
        candidate = PostProcessing(threshold, (size,))
        assert _dice(postprocess.apply(probabilities, candidate), masks) <= best + 1e-12, candidate


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
    run = run_cli("evaluate", config)
    assert run.returncode == 2 and run.stderr.count("flexunet: error:") == 1
    assert "[postprocess] threshold: 0.0 is out of range" in run.stderr and "Traceback" not in run.stderr


def test_docstring_example_runs() -> None:
    import doctest

    assert doctest.testmod(postprocess).failed == 0

"""Post-processing of predicted probabilities, chosen on out-of-fold predictions.

Two rules, each kept only when it raises the pooled foreground Dice (one Dice over every pixel
of every out-of-fold slice, :mod:`flexunet.metrics`) of the cross-validation predictions, as
nnU-Net keeps its largest-component rule only when it helps:

- ``threshold``: a pixel is foreground when its foreground probability (1 - p(background), or
  the sigmoid output) exceeds the threshold; it then takes the most likely foreground class.
  Without it a pixel takes the most likely class (argmax, or > 0.5 for one sigmoid channel).
- ``min_component_size``: per foreground class, connected components (8-connected, in pixels at
  the model's input size) smaller than this become background; 0 keeps every component.

Example:
    >>> import numpy as np
    >>> fg = np.zeros((1, 8, 8), np.float32)
    >>> fg[0, 1:5, 1:5] = 0.9   # a lesion
    >>> fg[0, 7, 7] = 0.9       # a one-pixel false positive
    >>> probabilities = np.stack([1 - fg, fg], axis=-1)
    >>> masks = np.zeros((1, 8, 8), np.uint8)
    >>> masks[0, 1:5, 1:5] = 1
    >>> pp = choose(probabilities, masks)
    >>> pp
    PostProcessing(threshold=None, min_component_size=(2,))
    >>> int(apply(probabilities, pp).sum())
    16
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flexunet.errors import ConfigError

# Candidate thresholds on the foreground probability; 0.5 is what argmax does for two classes.
THRESHOLDS: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(1, 20))
_EIGHT_CONNECTED = np.ones((3, 3), bool)


@dataclass(frozen=True)
class PostProcessing:
    """The rules applied after the model's softmax/sigmoid; None (the default) applies none."""

    threshold: float | None = None
    min_component_size: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.threshold is not None and not 0.0 < self.threshold < 1.0:
            raise ConfigError(f"[postprocess] threshold: {self.threshold} is out of range (0, 1)")
        if self.min_component_size is not None and any(s < 0 for s in self.min_component_size):
            raise ConfigError(f"[postprocess] min_component_size: sizes must be >= 0, got {self.min_component_size}")

    @property
    def is_identity(self) -> bool:
        return self.threshold is None and not any(self.min_component_size or ())

    def describe(self) -> str:
        """One line for people: what the rules do."""
        if self.is_identity:
            return "none (no rule raised the out-of-fold Dice)"
        parts = []
        if self.threshold is not None:
            parts.append(f"foreground where its probability > {self.threshold:g}")
        for c, size in enumerate(self.min_component_size or (), start=1):
            if size:
                parts.append(f"class {c}: components under {size} px removed")
        return "; ".join(parts)


def check_classes(pp: PostProcessing, num_classes: int) -> None:
    """A ConfigError unless ``min_component_size`` has one size per foreground class."""
    from flexunet.metrics import num_labels

    expected = num_labels(num_classes) - 1
    if pp.min_component_size is not None and len(pp.min_component_size) != expected:
        raise ConfigError(f"[postprocess] min_component_size: {len(pp.min_component_size)} sizes for "
                          f"{expected} foreground class(es)")


def apply(probabilities: np.ndarray, pp: PostProcessing) -> np.ndarray:
    """Class maps (N,H,W uint8) from model outputs (N,H,W,C) with the rules of ``pp``."""
    classes = _classes(probabilities, pp.threshold)
    for c, size in enumerate(pp.min_component_size or (), start=1):
        if size:
            for image in classes:
                _remove_small(image, c, size)
    return classes


def choose(probabilities: np.ndarray, masks: np.ndarray, thresholds: tuple[float, ...] = THRESHOLDS) -> PostProcessing:
    """The rules that maximise pooled foreground Dice of ``probabilities`` (N,H,W,C, out-of-fold)
    against ``masks`` (N,H,W class indices); a rule is kept only if it strictly raises that Dice.

    For each threshold (none first) the best minimum size of every class is found exactly (a
    class's Dice depends only on its own components); a threshold replaces the best so far only
    when it scores strictly higher.
    """
    from flexunet import metrics as m

    n_labels = m.num_labels(probabilities.shape[-1])
    best_dice, best = -1.0, PostProcessing()
    for threshold in (None, *thresholds):
        classes = _classes(probabilities, threshold)
        sizes, dices = [], []
        for c in range(1, n_labels):
            size, dice = _best_min_size(classes == c, masks == c)
            sizes.append(size)
            dices.append(dice)
        dice = float(np.mean(dices))
        if dice > best_dice:
            best_dice = dice
            best = PostProcessing(threshold, tuple(sizes) if any(sizes) else None)
    return best


def pooled_dice(probabilities: np.ndarray, masks: np.ndarray, pp: PostProcessing) -> float:
    """Pooled foreground Dice of the post-processed predictions (what :func:`choose` maximises)."""
    from flexunet import metrics as m

    n_labels = m.num_labels(probabilities.shape[-1])
    tp, fp, fn = m.confusion(apply(probabilities, pp), masks, n_labels)
    return float(np.mean(m.dice_score(tp, fp, fn)[1:]))


def _classes(probabilities: np.ndarray, threshold: float | None) -> np.ndarray:
    from flexunet.metrics import to_classes

    if threshold is None:
        return to_classes(probabilities)
    p = probabilities.astype(np.float32)
    if p.shape[-1] == 1:
        return (p[..., 0] > threshold).astype(np.uint8)
    foreground = 1.0 - p[..., 0]
    best_foreground = (np.argmax(p[..., 1:], axis=-1) + 1).astype(np.uint8)
    return np.where(foreground > threshold, best_foreground, 0).astype(np.uint8)


def _remove_small(image: np.ndarray, c: int, size: int) -> None:
    labels, n = _label(image == c)
    if n:
        counts = np.bincount(labels.ravel())
        small = counts < size
        small[0] = False
        image[small[labels]] = 0


def _label(binary: np.ndarray) -> tuple[np.ndarray, int]:
    # SciPy is imported on first use: flexunet.config imports this module for its dataclass.
    from scipy import ndimage

    return ndimage.label(binary, structure=_EIGHT_CONNECTED)


def _best_min_size(pred: np.ndarray, true: np.ndarray) -> tuple[int, float]:
    """The minimum component size (0: none) that maximises this class's pooled Dice, and that Dice.

    Removing a component of s pixels of which t are true turns t true positives into false
    negatives and s - t false positives into true negatives; other classes' counts do not change
    (those pixels stay errors of theirs). Sorting components by size gives every cut-off's Dice
    from cumulative sums.
    """
    from flexunet.metrics import dice_score

    tp = int(np.count_nonzero(pred & true))
    fp = int(np.count_nonzero(pred)) - tp
    fn = int(np.count_nonzero(true)) - tp
    sizes, hits = [], []
    for image, truth in zip(pred, true):
        labels, n = _label(image)
        if n:
            sizes.append(np.bincount(labels.ravel())[1:])
            hits.append(np.bincount(labels.ravel(), weights=truth.ravel(), minlength=n + 1)[1:])
    best_size, best = 0, float(dice_score(tp, fp, fn))
    if not sizes:
        return best_size, best
    size, hit = np.concatenate(sizes), np.concatenate(hits)
    order = np.argsort(size, kind="stable")
    size, hit = size[order], hit[order]
    removed_tp, removed = np.cumsum(hit), np.cumsum(size)
    # Cut-off size[i] + 1 removes components 0..i; only the last of equal sizes is a valid cut.
    last = np.append(size[1:] != size[:-1], True)
    dices = dice_score(tp - removed_tp, fp - (removed - removed_tp), fn + removed_tp)
    for i in np.flatnonzero(last):
        if dices[i] > best:
            best_size, best = int(size[i]) + 1, float(dices[i])
    return best_size, best

"""Post-processing of predicted probabilities, chosen on out-of-fold predictions, conservatively.

Two rules:

- ``threshold``: a pixel is foreground when its foreground probability (1 - p(background), or
  the sigmoid output) exceeds the threshold; it then takes the most likely foreground class.
  Without it a pixel takes the most likely class (argmax, or > 0.5 for one sigmoid channel).
- ``min_component_size``: per foreground class, connected components (8-connected, in pixels at
  the model's input size) smaller than this become background; 0 keeps every component.

:func:`select` chooses them on out-of-fold predictions, and keeps a rule only when it is safe to
expect it to help on unseen patients (as nnU-Net keeps its largest-component rule only when the
cross-validation Dice improves and no class gets worse). A first version kept whatever
maximised the pooled out-of-fold Dice: on the sample study it removed components under 262 px,
doubling the out-of-fold Dice (0.12 -> 0.24) by deleting the many small true lesions that the
fold models found badly along with their false positives, and on the test patients, whose
lesions are 3-53 px at 96 px, it deleted every lesion (test Dice 0.027 -> 0). So a rule must:

1. raise the pooled foreground Dice by more than ``TOLERANCE`` (smaller differences are noise
   on a few dozen slices);
2. leave no fold worse (the pooled gain must not come from one fold's patients);
3. for a size rule, remove at most ``MAX_LESIONS_REMOVED`` of the true lesions of the same
   masks: the cut-off is capped by the true components' sizes (:func:`size_cap`), so it can
   only remove what is smaller than (nearly) every real lesion;
4. and among the rules that pass, the mildest within ``TOLERANCE`` of the best is kept: the
   smallest size, no threshold before a threshold, a threshold near 0.5 before a far one.

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
from flexunet.scoring import class_mean, confusion, dice_score, mean_foreground_dice, num_labels, to_classes

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
            return "none (no rule passed the guards on the out-of-fold Dice)"
        parts = []
        if self.threshold is not None:
            parts.append(f"foreground where its probability > {self.threshold:g}")
        for c, size in enumerate(self.min_component_size or (), start=1):
            if size:
                parts.append(f"class {c}: components under {size} px removed")
        return "; ".join(parts)


def check_classes(pp: PostProcessing, num_classes: int) -> None:
    """A ConfigError unless ``min_component_size`` has one size per foreground class."""
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


# A pooled Dice difference this small is noise: rules must gain more, and the mildest rule
# within it of the best is kept (half a Dice point; a 3-fold study pools a few dozen slices).
TOLERANCE = 0.005
# A size rule may remove at most this share of a class's true lesions (components of the masks
# the rule is chosen on): the cut-off never exceeds the size that 95% of real lesions reach.
MAX_LESIONS_REMOVED = 0.05
_EPS = 1e-12


@dataclass(frozen=True)
class Selection:
    """What :func:`select` found: the rules kept and the figures they were judged on.

    ``unguarded`` is what maximising the pooled Dice alone would have kept (refused when it
    differs from ``rules``), for the model card."""

    rules: PostProcessing
    dice: float  # pooled foreground Dice without post-processing
    dice_postprocessed: float  # ... with ``rules``
    fold_dice: tuple[float, ...]  # per fold, without
    fold_dice_postprocessed: tuple[float, ...]  # per fold, with ``rules``
    size_caps: tuple[int, ...]  # per foreground class: the largest min_component_size allowed
    unguarded: PostProcessing
    unguarded_dice: float

    def describe_refused(self) -> str | None:
        """A line on the unguarded choice, when the guards refused it; None otherwise."""
        if self.unguarded == self.rules:
            return None
        return (f"maximising the pooled out-of-fold Dice alone would have kept: {self.unguarded.describe()} "
                f"(Dice {self.unguarded_dice:.4f}); refused by the guards (largest size allowed per class "
                f"{', '.join(map(str, self.size_caps))} px; no fold worse; gain > {TOLERANCE:g})")


def choose(probabilities: np.ndarray, masks: np.ndarray, folds: np.ndarray | None = None,
           thresholds: tuple[float, ...] = THRESHOLDS) -> PostProcessing:
    """The rules :func:`select` keeps."""
    return select(probabilities, masks, folds, thresholds).rules


def select(probabilities: np.ndarray, masks: np.ndarray, folds: np.ndarray | None = None,
           thresholds: tuple[float, ...] = THRESHOLDS) -> Selection:
    """Choose the rules on ``probabilities`` (N,H,W,C, out-of-fold) against ``masks`` (N,H,W
    class indices); ``folds`` (N,) says which fold predicted each slice (None: one fold).

    For each threshold (none first) each class's minimum size is chosen from every cut-off
    that changes something (a class's Dice depends only on its own components), under the
    module's guards; then the threshold, under the same guards against no rule at all.

    >>> import numpy as np
    >>> masks = np.zeros((2, 8, 8), np.uint8); masks[:, 1:4, 1:4] = 1   # two 9 px lesions
    >>> fg = masks * 0.9; fg[0, 6:8, 6:8] = 0.9                        # and a 4 px false positive
    >>> s = select(np.stack([1 - fg, fg], -1), masks, folds=np.array([0, 1]))
    >>> s.rules, s.size_caps, s.fold_dice_postprocessed
    (PostProcessing(threshold=None, min_component_size=(5,)), (9,), (1.0, 1.0))
    """
    n_labels = num_labels(probabilities.shape[-1])
    folds = np.zeros(len(probabilities), np.int64) if folds is None else np.asarray(folds, np.int64)
    if folds.shape != (len(probabilities),):
        raise ValueError(f"folds: {folds.shape} for {len(probabilities)} slices")
    folds = np.unique(folds, return_inverse=True)[1].reshape(-1)
    caps = tuple(size_cap(masks == c) for c in range(1, n_labels))
    identity: _Candidate | None = None
    candidates: list[_Candidate] = []
    for threshold in (None, *thresholds):
        classes = _classes(probabilities, threshold)
        cuts = [_cuts(classes == c, masks == c, folds) for c in range(1, n_labels)]
        if identity is None:
            identity = _Candidate.of(None, cuts, [0] * len(cuts))
        candidates.append(_Candidate.of(threshold, cuts, [cut.choose(cap) for cut, cap in zip(cuts, caps)]))
        candidates.append(_Candidate.of(threshold, cuts, [cut.choose(None) for cut in cuts], guarded=False))
    assert identity is not None
    passing = [c for c in candidates if c.guarded and c.rules != identity.rules
               and _passes(c.pooled, c.per_fold, identity.pooled, identity.per_fold)]
    kept = identity
    if passing:
        best = max(c.pooled for c in passing)
        kept = min((c for c in passing if c.pooled >= best - TOLERANCE), key=lambda c: c.strength)
    # The unguarded choice: the highest pooled Dice, earlier (no threshold, lower) thresholds on ties.
    unguarded = max((c for c in candidates if not c.guarded), key=lambda c: c.pooled)
    if unguarded.pooled <= identity.pooled:
        unguarded = identity
    return Selection(kept.rules, identity.pooled, kept.pooled, tuple(map(float, identity.per_fold)),
                     tuple(map(float, kept.per_fold)), caps, unguarded.rules, unguarded.pooled)


@dataclass(frozen=True)
class _Candidate:
    """One threshold with one minimum size per class, and its Dice (mean over classes)."""

    threshold: float | None
    sizes: tuple[int, ...]
    pooled: float
    per_fold: np.ndarray
    guarded: bool = True

    @classmethod
    def of(cls, threshold: float | None, cuts: list[_Cuts], chosen: list[int], guarded: bool = True) -> _Candidate:
        # Absent classes (NaN) leave the mean over classes, as in every other mean.
        return cls(threshold, tuple(cut.sizes[i] for cut, i in zip(cuts, chosen)),
                   float(class_mean([cut.pooled[i] for cut, i in zip(cuts, chosen)])),
                   np.asarray(class_mean(np.stack([cut.per_fold[:, i] for cut, i in zip(cuts, chosen)]), axis=0)),
                   guarded)

    @property
    def rules(self) -> PostProcessing:
        return PostProcessing(self.threshold, self.sizes if any(self.sizes) else None)

    @property
    def strength(self) -> tuple[float, int]:
        """How far the rule moves from the plain argmax: the mildest sorts first."""
        return (0.0 if self.threshold is None else 1.0 + abs(self.threshold - 0.5), sum(self.sizes))


def size_cap(true: np.ndarray) -> int:
    """The largest minimum component size that removes at most ``MAX_LESIONS_REMOVED`` of the
    true components in ``true`` (N,H,W bool): the size of the k-th smallest, k = floor(5% of
    them) (with fewer than 20 lesions, the smallest one's size); 0 where there is no lesion.

    >>> import numpy as np
    >>> true = np.zeros((1, 10, 10), bool); true[0, :3, :3] = True; true[0, 6:, 6:] = True
    >>> size_cap(true)   # lesions of 9 and 16 px: a cut-off of 9 removes neither
    9
    """
    sizes = np.sort(np.concatenate([_sizes(image) for image in true] or [np.zeros(0, np.int64)]))
    if not len(sizes):
        return 0
    return int(sizes[int(np.floor(MAX_LESIONS_REMOVED * len(sizes)))])


def _sizes(binary: np.ndarray) -> np.ndarray:
    labels, n = _label(binary)
    return np.bincount(labels.ravel())[1:] if n else np.zeros(0, np.int64)


def _passes(pooled: float, per_fold: np.ndarray, base_pooled: float, base_per_fold: np.ndarray) -> bool:
    """A rule's guards against what it replaces: a pooled gain over the noise, no fold worse."""
    # NaN-safe: a fold whose class is absent (NaN) before or after is not worse.
    return pooled > base_pooled + TOLERANCE and not bool(np.any(per_fold < base_per_fold - _EPS))


@dataclass(frozen=True)
class _Cuts:
    """One class's Dice for every minimum size that changes its prediction: ``sizes[0]`` is 0
    (keep all), ``pooled`` over every slice and ``per_fold`` (folds, cuts)."""

    sizes: tuple[int, ...]
    pooled: np.ndarray
    per_fold: np.ndarray

    def choose(self, cap: int | None) -> int:
        """The index of the size kept: 0 unless a size up to ``cap`` (None: any) passes the
        guards; of those, the smallest within ``TOLERANCE`` of the best. Without a cap (the
        unguarded choice) the plain maximum, the smallest size on ties."""
        if cap is None:
            # NaN: every pixel of a class the reference lacks removed, its best outcome.
            pooled = np.nan_to_num(self.pooled, nan=1.0)
            best = int(np.argmax(pooled))
            return best if pooled[best] > pooled[0] else 0
        ok = [i for i in range(1, len(self.sizes)) if self.sizes[i] <= cap
              and _passes(self.pooled[i], self.per_fold[:, i], self.pooled[0], self.per_fold[:, 0])]
        if not ok:
            return 0
        best = max(self.pooled[i] for i in ok)
        return min((i for i in ok if self.pooled[i] >= best - TOLERANCE), key=lambda i: self.sizes[i])


def _cuts(pred: np.ndarray, true: np.ndarray, folds: np.ndarray) -> _Cuts:
    """Every cut-off's Dice from cumulative sums, per fold and pooled.

    Removing a component of s pixels of which t are true turns t true positives into false
    negatives and s - t false positives into true negatives; other classes' counts do not change
    (those pixels stay errors of theirs). Sorting components by size gives every cut-off's
    counts; cut-off size + 1 removes a component and every smaller one.
    """
    n_folds = int(folds.max()) + 1 if len(folds) else 1
    per_slice_tp = np.count_nonzero(pred & true, axis=(1, 2))
    per_slice_fp = np.count_nonzero(pred, axis=(1, 2)) - per_slice_tp
    per_slice_fn = np.count_nonzero(true, axis=(1, 2)) - per_slice_tp
    tp, fp, fn = (np.bincount(folds, weights=v, minlength=n_folds) for v in (per_slice_tp, per_slice_fp, per_slice_fn))
    sizes, hits, where = [], [], []
    for image, truth, fold in zip(pred, true, folds):
        labels, n = _label(image)
        if n:
            sizes.append(np.bincount(labels.ravel())[1:])
            hits.append(np.bincount(labels.ravel(), weights=truth.ravel(), minlength=n + 1)[1:])
            where.append(np.full(n, fold))
    if sizes:
        size, hit, fold_of = np.concatenate(sizes), np.concatenate(hits), np.concatenate(where)
        order = np.argsort(size, kind="stable")
        size, hit, fold_of = size[order], hit[order], fold_of[order]
        in_fold = fold_of[None, :] == np.arange(n_folds)[:, None]  # (folds, components)
        removed_tp = np.cumsum(in_fold * hit, axis=1)
        removed = np.cumsum(in_fold * size, axis=1)
        # Only the last of equal sizes is a valid cut.
        last = np.flatnonzero(np.append(size[1:] != size[:-1], True))
        removed_tp = np.concatenate([np.zeros((n_folds, 1)), removed_tp[:, last]], axis=1)
        removed = np.concatenate([np.zeros((n_folds, 1)), removed[:, last]], axis=1)
        cut_sizes = (0, *(int(size[i]) + 1 for i in last))
    else:
        removed_tp = removed = np.zeros((n_folds, 1))
        cut_sizes = (0,)
    f_tp, f_fp, f_fn = tp[:, None] - removed_tp, fp[:, None] - (removed - removed_tp), fn[:, None] + removed_tp
    per_fold = dice_score(f_tp, f_fp, f_fn)
    pooled = dice_score(f_tp.sum(0), f_fp.sum(0), f_fn.sum(0))
    return _Cuts(cut_sizes, np.asarray(pooled, np.float64), np.asarray(per_fold, np.float64))


def pooled_dice(probabilities: np.ndarray, masks: np.ndarray, pp: PostProcessing) -> float:
    """Pooled foreground Dice of the post-processed predictions (what :func:`choose` maximises)."""
    n_labels = num_labels(probabilities.shape[-1])
    return float(mean_foreground_dice(*confusion(apply(probabilities, pp), masks, n_labels)))


def _classes(probabilities: np.ndarray, threshold: float | None) -> np.ndarray:
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

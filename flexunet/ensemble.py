"""One Keras model that averages several trained FlexUNets, with horizontal-flip test-time
augmentation inside the graph.

The ensemble is a plain functional model whose members are nested sub-models; the flip is
``keras.ops.flip`` on a symbolic tensor, which Keras 3 records as an operation of the functional
graph. Only built-in layers and operations are used, so the saved ``.keras`` file loads with
``keras.models.load_model`` in safe mode and no custom objects, and exports to SavedModel and
ONNX like a single model. Its output is exactly the mean of what the members predict on the
image and on its mirror image (mirrored back).

Example:
    >>> from flexunet.config import ModelConfig
    >>> from flexunet.model import build
    >>> members = [build(ModelConfig(image_width=32, image_height=32, num_classes=2, image_channels=1,
    ...                              base_filters=4, num_layers=2)) for _ in range(2)]
    >>> network = build_ensemble(members)
    >>> network.output_shape
    (None, 32, 32, 2)
    >>> forward_passes(2, tta=True)
    4
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

ENSEMBLE_NAME = "flexunet_ensemble"
# NHWC: axis 2 is the image width, so a flip along it mirrors left and right; axis 1 the height.
_WIDTH_AXIS = 2
_HEIGHT_AXIS = 1
# Test-time augmentations by name: the mirrorings each member sees (each is undone on its
# prediction before the average). "all" is nnU-Net's default, every axis of the image plane.
TTA_MODES: dict[str, tuple[tuple[int, ...], ...]] = {
    "none": ((),),
    "horizontal": ((), (_WIDTH_AXIS,)),
    "all": ((), (_WIDTH_AXIS,), (_HEIGHT_AXIS,), (_HEIGHT_AXIS, _WIDTH_AXIS)),
}


def _mirrors(tta: bool | str) -> tuple[tuple[int, ...], ...]:
    if isinstance(tta, bool):
        return TTA_MODES["horizontal" if tta else "none"]
    if tta not in TTA_MODES:
        raise ValueError(f"unknown test-time augmentation {tta!r}; expected one of {', '.join(TTA_MODES)}")
    return TTA_MODES[tta]


def forward_passes(members: int, tta: bool | str) -> int:
    """How many member evaluations one image costs: each member once per mirroring (``tta``
    True is the horizontal flip, False none, or a name of :data:`TTA_MODES`)."""
    return members * len(_mirrors(tta))


def build_ensemble(members: Sequence[Any], tta: bool | str = True, name: str = ENSEMBLE_NAME,
                   weights: Sequence[int] | None = None) -> Any:
    """A functional model: the mean of the members' outputs (softmax or sigmoid probabilities);
    with ``tta`` each member also sees the mirrored images (True: the horizontal flip; or a name
    of :data:`TTA_MODES`), and its predictions are mirrored back before the average. Integer
    ``weights`` (one per member, as ensemble selection with replacement gives them) count a
    member's outputs that many times in the mean; it is still evaluated once. Members must take
    and give the same shapes."""
    import keras

    if not members:
        raise ValueError("an ensemble needs at least one member")
    weights = [1] * len(members) if weights is None else [int(w) for w in weights]
    if len(weights) != len(members) or min(weights) < 0 or not any(weights):
        raise ValueError(f"ensemble weights {weights}: expected one integer >= 0 per member, not all 0")
    shapes = {(tuple(m.input_shape), tuple(m.output_shape)) for m in members}
    if len(shapes) != 1:
        raise ValueError(f"ensemble members disagree on input/output shapes: {sorted(shapes)}")
    image = keras.Input(shape=tuple(members[0].input_shape[1:]), name="image")
    mirrors = _mirrors(tta)
    views = [_flip(keras, image, axes) for axes in mirrors]
    outputs = []
    for k, (member, weight) in enumerate(zip(members, weights)):
        if not weight:
            continue
        # A new functional wrapper per member gives each a unique name in the ensemble (the
        # trained models are all called "flexunet") and shares the member's layers and weights.
        fold = keras.Model(member.input, member.output, name=f"fold_{k}")
        for axes, view in zip(mirrors, views):
            outputs += [_flip(keras, fold(view), axes)] * weight
    mean = keras.layers.Average(name="mean")(outputs) if len(outputs) > 1 else outputs[0]
    return keras.Model(image, mean, name=name)


def _flip(keras: Any, tensor: Any, axes: tuple[int, ...]) -> Any:
    for axis in axes:
        tensor = keras.ops.flip(tensor, axis=axis)
    return tensor


def select_greedy(predictions: Sequence[Any], score: Any, rounds: int) -> list[int]:
    """Caruana et al. (2004) ensemble selection, with replacement: start from nothing and add,
    ``rounds`` times, the candidate whose addition gives the best ``score`` of the averaged
    ``predictions`` (arrays of one shape, e.g. out-of-fold probabilities); return how many times
    each candidate was taken in the best-scoring prefix (earliest on ties, so the smallest).

    >>> import numpy as np
    >>> target = np.array([1.0, 0.0])
    >>> score = lambda p: -float(np.abs(p - target).sum())
    >>> select_greedy([np.array([0.9, 0.4]), np.array([0.9, -0.2]), np.array([0.0, 1.0])], score, 4)
    [1, 2, 0]
    """
    import numpy as np

    if not predictions or rounds < 1:
        raise ValueError("ensemble selection needs at least one candidate and one round")
    counts = [0] * len(predictions)
    total = np.zeros_like(np.asarray(predictions[0], np.float64))
    best_counts, best_score = None, -np.inf
    for step in range(1, rounds + 1):
        scores = [score((total + np.asarray(p, np.float64)) / step) for p in predictions]
        pick = int(np.argmax(scores))
        counts[pick] += 1
        total += np.asarray(predictions[pick], np.float64)
        if scores[pick] > best_score:
            best_score, best_counts = scores[pick], list(counts)
    assert best_counts is not None
    return best_counts


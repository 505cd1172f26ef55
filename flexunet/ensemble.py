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
# NHWC: axis 2 is the image width, so a flip along it mirrors left and right.
_WIDTH_AXIS = 2


def forward_passes(members: int, tta: bool) -> int:
    """How many member evaluations one image costs: each member once, twice with the flip."""
    return members * (2 if tta else 1)


def build_ensemble(members: Sequence[Any], tta: bool = True, name: str = ENSEMBLE_NAME) -> Any:
    """A functional model: the mean of the members' outputs (softmax or sigmoid probabilities);
    with ``tta`` each member also sees the horizontally flipped image, and its prediction is
    flipped back before the average. Members must take and give the same shapes."""
    import keras

    if not members:
        raise ValueError("an ensemble needs at least one member")
    shapes = {(tuple(m.input_shape), tuple(m.output_shape)) for m in members}
    if len(shapes) != 1:
        raise ValueError(f"ensemble members disagree on input/output shapes: {sorted(shapes)}")
    image = keras.Input(shape=tuple(members[0].input_shape[1:]), name="image")
    mirrored = keras.ops.flip(image, axis=_WIDTH_AXIS) if tta else None
    outputs = []
    for k, member in enumerate(members):
        # A new functional wrapper per member gives each a unique name in the ensemble (the
        # trained models are all called "flexunet") and shares the member's layers and weights.
        fold = keras.Model(member.input, member.output, name=f"fold_{k}")
        outputs.append(fold(image))
        if mirrored is not None:
            outputs.append(keras.ops.flip(fold(mirrored), axis=_WIDTH_AXIS))
    mean = keras.layers.Average(name="mean")(outputs) if len(outputs) > 1 else outputs[0]
    return keras.Model(image, mean, name=name)


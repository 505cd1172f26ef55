"""Training batches over an in-memory :class:`~flexunet.data.dataset.SliceSet`, and the hook that
turns them into a model's inputs and targets inside the compiled step.

The host sends uint8 images and masks (a quarter of float32's bytes) and, when augmenting, a few
random numbers per image; :mod:`flexunet.data.augment` does the rest on the device. The batches
come from one endless iterator that Keras keeps across epochs (``fit`` with ``steps_per_epoch``),
so no thread pool is restarted each epoch as with a ``PyDataset``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import numpy as np

from flexunet import _keras_internals
from flexunet.data import augment
from flexunet.data.dataset import SliceSet


class Batches:
    """Endless training batches, reshuffled and re-augmented each epoch from a seed, so two runs
    with one seed see the same batches; ``start_epoch`` resumes the sequence where a run
    stopped."""

    def __init__(self, data: SliceSet, batch_size: int, *, shuffle: bool = False, augment_strength: float = 0.0,
                 seed: int = 0, steps: int | None = None, start_epoch: int = 0,
                 class_sampling: float | None = None) -> None:
        if data.masks is None:
            raise ValueError("Batches needs masks")
        self.data, self.batch_size = data, batch_size
        self.shuffle, self.strength, self.seed = shuffle, augment_strength, seed
        # Without a step count an epoch is one pass (the last batch may be short); with one, the
        # set is reshuffled as often as the steps need.
        self.fixed_steps = steps
        self.steps = steps or math.ceil(len(data) / batch_size)
        self.start_epoch = start_epoch
        self.holders = class_holders(data.masks)
        self.class_sampling = resolve_class_sampling(class_sampling, self.holders, len(data))

    def order(self, epoch: int) -> np.ndarray:
        """The slice indices of one epoch, batch after batch."""
        n = len(self.data)
        if not self.shuffle:
            return np.resize(np.arange(n), self.steps * self.batch_size) if self.fixed_steps else np.arange(n)
        rng = np.random.default_rng([self.seed, epoch])
        passes = math.ceil(self.steps * self.batch_size / n)
        order = np.concatenate([rng.permutation(n) for _ in range(passes)])
        return self._draw_classes(order, epoch) if self.class_sampling > 0 else order

    def _draw_classes(self, order: np.ndarray, epoch: int) -> np.ndarray:
        """The last slots of each batch (nnU-Net's rule: slot i of B when i >= round(B * (1 -
        share))) each take a slice that holds a class drawn uniformly from those present, so a
        rare class comes as often as a common one."""
        rng = np.random.default_rng([self.seed, epoch, 1])
        first_forced = round(self.batch_size * (1.0 - self.class_sampling))
        classes = sorted(self.holders)
        order = order.copy()
        for start in range(0, self.steps * self.batch_size, self.batch_size):
            for slot in range(start + first_forced, min(start + self.batch_size, len(order))):
                holders = self.holders[classes[rng.integers(len(classes))]]
                order[slot] = holders[rng.integers(len(holders))]
        return order

    def batch(self, epoch: int, index: int, order: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
        """Batch ``index`` of ``epoch``: (uint8 images, uint8 masks) and, when augmenting, the
        augmentation's parameters (see :func:`flexunet.data.augment.draw`)."""
        order = self.order(epoch) if order is None else order
        chosen = order[index * self.batch_size:(index + 1) * self.batch_size]
        images, masks = self.data.images[chosen], self.data.masks[chosen]
        if self.strength <= 0:
            return images, masks
        rng = np.random.default_rng([self.seed, epoch, index])
        return images, masks, augment.draw(rng, len(chosen), *masks.shape[1:], self.strength)

    def __iter__(self) -> Iterator[tuple[np.ndarray, ...]]:
        epoch = self.start_epoch
        while True:
            order = self.order(epoch)
            for index in range(self.steps):
                yield self.batch(epoch, index, order)
            epoch += 1


DEFAULT_CLASS_SAMPLING = 1.0 / 3.0  # nnU-Net's oversample_foreground_percent


def class_holders(masks: np.ndarray) -> dict[int, np.ndarray]:
    """Foreground class -> the indices of the slices whose mask holds it."""
    flat = masks.reshape(len(masks), -1)
    classes = sorted({int(c) for c in np.unique(flat)} - {0})
    return {c: np.flatnonzero((flat == c).any(axis=1)) for c in classes}


def resolve_class_sampling(share: float | None, holders: dict[int, np.ndarray], n: int) -> float:
    """The share of slots drawn by class: as given, or by default 1/3 unless every slice holds
    every class (then drawing by class changes nothing but the random stream); 0 without
    foreground.

    >>> resolve_class_sampling(None, {1: np.arange(4)}, 4), resolve_class_sampling(None, {1: np.arange(2)}, 4)
    (0.0, 0.3333333333333333)
    """
    if not holders:
        return 0.0
    if share is None:
        return 0.0 if all(len(h) == n for h in holders.values()) else DEFAULT_CLASS_SAMPLING
    return float(share)


@contextlib.contextmanager
def device_inputs(network: Any, num_classes: int) -> Iterator[None]:
    """While active, ``network``'s train and test steps take batches as :class:`Batches` sends
    them (and validation as (uint8 images, uint8 masks)) and prepare them inside the compiled
    step: augmentation in training, float32 images and one-hot targets always.

    The step is wrapped on this model object only, for both backends (their ``train_step`` takes
    the batch last: ``(data)`` on TensorFlow, ``(state, data)`` on JAX); the saved model is the
    same network as before.
    """
    cls = type(network)

    def train_step(*args: Any) -> Any:
        return cls.train_step(network, *args[:-1], augment.prepare(args[-1], num_classes, training=True))

    def test_step(*args: Any) -> Any:
        return cls.test_step(network, *args[:-1], augment.prepare(args[-1], num_classes, training=False))

    _build_compiled_state(network, num_classes)
    network.train_step, network.test_step = train_step, test_step
    network.train_function = network.test_function = None  # traced again with the hook
    try:
        yield
    finally:
        del network.train_step, network.test_step
        network.train_function = network.test_function = None


def _build_compiled_state(network: Any, num_classes: int) -> None:
    # Keras on JAX builds the loss and metric state from the first batch as the data gives it,
    # before any step runs; ours is raw uint8 without a class axis, so build it from the shapes
    # that the step will hand them (a no-op where they are built already).
    h, w, c = network.input_shape[1:]
    x = np.zeros((1, h, w, c), np.float32)
    y = np.zeros((1, h, w, max(1, num_classes)), np.float32)
    _keras_internals.build_compiled_state(network, (x, y))

"""Keras batches over an in-memory :class:`~flexunet.data.dataset.SliceSet`."""

from __future__ import annotations

import math

import keras
import numpy as np

from flexunet.data.dataset import SliceSet, augment, one_hot


class Batches(keras.utils.PyDataset):
    """Batches of float32 images (0..255) and one-hot masks, reshuffled and re-augmented each
    epoch from a seed, so two runs with one seed see the same batches."""

    def __init__(self, data: SliceSet, num_classes: int, batch_size: int, *, shuffle: bool = False,
                 augment_strength: float = 0.0, seed: int = 0, steps: int | None = None) -> None:
        # Two threads prepare the next batches while the model trains on this one (a GPU would
        # otherwise wait on them); each batch depends only on its index, so the order is kept.
        super().__init__(workers=2, use_multiprocessing=False)
        if data.masks is None:
            raise ValueError("Batches needs masks")
        self.data, self.num_classes, self.batch_size = data, num_classes, batch_size
        self.shuffle, self.strength, self.seed = shuffle, augment_strength, seed
        # Without a step count an epoch is one pass (the last batch may be short); with one, the
        # set is reshuffled as often as the steps need.
        self.fixed_steps = steps
        self.steps = steps or math.ceil(len(data) / batch_size)
        self.epoch = 0
        self._order = self._new_order()

    def _new_order(self) -> np.ndarray:
        n = len(self.data)
        if not self.shuffle:
            return np.resize(np.arange(n), self.steps * self.batch_size) if self.fixed_steps else np.arange(n)
        rng = np.random.default_rng([self.seed, self.epoch])
        passes = math.ceil(self.steps * self.batch_size / n)
        return np.concatenate([rng.permutation(n) for _ in range(passes)])

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        chosen = self._order[index * self.batch_size:(index + 1) * self.batch_size]
        images = self.data.images[chosen].astype(np.float32)
        masks = self.data.masks[chosen]
        if self.strength > 0:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            pairs = [augment(images[i], masks[i], rng, self.strength) for i in range(len(chosen))]
            images = np.stack([p[0] for p in pairs])
            masks = np.stack([p[1] for p in pairs])
        return images, one_hot(masks, self.num_classes)

    def on_epoch_end(self) -> None:
        self.epoch += 1
        self._order = self._new_order()

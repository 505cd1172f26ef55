"""In-memory image/mask sets (no TensorFlow here: a data error is reported before TensorFlow is
even imported). Augmentation runs on the device: :mod:`flexunet.data.augment`.

A small dataset is decoded once and held as uint8: on a 2-core CPU this beats a tf.data
pipeline (see docs/design.md). Pairs are matched by file stem in sorted order.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flexunet.config import IMAGE_SUFFIXES, Config, ImageConfig, MaskConfig, ModelConfig
from flexunet.data import io as imio
from flexunet.errors import DataError

_logger = logging.getLogger(__name__)


@dataclass
class SliceSet:
    """Images (N,H,W,C uint8) and class masks (N,H,W uint8) at the model's size."""

    images: np.ndarray
    masks: np.ndarray | None
    names: list[str]
    original_sizes: list[tuple[int, int]]  # (height, width) before resizing

    def __len__(self) -> int:
        return len(self.names)

    def subset(self, indices: list[int]) -> SliceSet:
        return SliceSet(self.images[indices], None if self.masks is None else self.masks[indices],
                        [self.names[i] for i in indices], [self.original_sizes[i] for i in indices])


def pair_files(images_dir: Path, masks_dir: Path, mask_suffix: str) -> list[tuple[str, Path, Path]]:
    """(stem, image, mask) for every image, matched by stem; a missing partner is an error."""
    images = imio.image_files(images_dir, IMAGE_SUFFIXES)
    masks = imio.image_files(masks_dir, (mask_suffix,) if mask_suffix else IMAGE_SUFFIXES)
    if not images:
        raise DataError(f"{images_dir}: no images ({', '.join(IMAGE_SUFFIXES)})")
    for stem, path in images.items():
        if stem not in masks:
            raise DataError(f"{path}: no mask {stem}{mask_suffix} in {masks_dir}")
    for stem, path in masks.items():
        if stem not in images:
            raise DataError(f"{path}: mask without an image {stem}.* in {images_dir}")
    return [(stem, images[stem], masks[stem]) for stem in images]


def load_pairs(images_dir: Path, masks_dir: Path, model: ModelConfig, image: ImageConfig,
               mask: MaskConfig) -> SliceSet:
    """Decode every pair of a folder once, resized to the model's input."""
    pairs = pair_files(images_dir, masks_dir, mask.mask_file_format)
    n, (h, w, c) = len(pairs), model.input_shape
    images = np.empty((n, h, w, c), np.uint8)
    masks = np.empty((n, h, w), np.uint8)
    sizes = []
    snapped = 0
    for i, (_, image_path, mask_path) in enumerate(pairs):
        picture = imio.read_image(image_path, c, image.color_order)
        decoded = imio.decode_mask(mask_path, mask.rgb_map, model.num_classes, mask.colour_tolerance)
        labels, snapped = decoded.labels, snapped + decoded.snapped
        if labels.shape != picture.shape[:2]:
            raise DataError(f"{mask_path}: mask is {labels.shape[1]}x{labels.shape[0]} but its image "
                            f"{image_path.name} is {picture.shape[1]}x{picture.shape[0]}")
        sizes.append(picture.shape[:2])
        images[i] = imio.resize_image(picture, w, h)
        masks[i] = imio.resize_mask(labels, w, h)
    if snapped:
        _logger.info("%s: %d pixels of lossy masks snapped to the nearest [mask] rgb_map colour", masks_dir, snapped)
    return SliceSet(images, masks, [stem for stem, _, _ in pairs], sizes)


def load_masks(images_dir: Path, masks_dir: Path, model: ModelConfig, mask: MaskConfig) -> tuple[list[str], np.ndarray]:
    """(names, class masks N,H,W at the model's size) of a folder pair, without decoding the
    images: what a split needs to know of a dataset."""
    pairs = pair_files(images_dir, masks_dir, mask.mask_file_format)
    h, w, _ = model.input_shape
    masks = np.empty((len(pairs), h, w), np.uint8)
    for i, (_, _, mask_path) in enumerate(pairs):
        labels = imio.decode_mask(mask_path, mask.rgb_map, model.num_classes, mask.colour_tolerance).labels
        masks[i] = imio.resize_mask(labels, w, h)
    return [stem for stem, _, _ in pairs], masks


def load_images(images_dir: Path, model: ModelConfig, image: ImageConfig) -> SliceSet:
    """Decode every image of a folder (no masks), resized to the model's input."""
    files = imio.image_files(images_dir, IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"{images_dir}: no images ({', '.join(IMAGE_SUFFIXES)})")
    h, w, c = model.input_shape
    images = np.empty((len(files), h, w, c), np.uint8)
    sizes = []
    for i, path in enumerate(files.values()):
        picture = imio.read_image(path, c, image.color_order)
        sizes.append(picture.shape[:2])
        images[i] = imio.resize_image(picture, w, h)
    return SliceSet(images, None, list(files), sizes)


def load_split(config: Config, part: str) -> SliceSet:
    """The train, valid or test pairs a config names."""
    from flexunet.config import require_dir

    dirs = {"train": (config.train.images_dir, config.train.masks_dir),
            "valid": (config.valid.images_dir, config.valid.masks_dir),
            "test": (config.test.images_dir, config.test.masks_dir)}[part]
    images_dir = require_dir(dirs[0], part, "images_dir")
    masks_dir = require_dir(dirs[1], part, "masks_dir")
    return load_pairs(images_dir, masks_dir, config.model, config.image, config.mask)


def patient_of(name: str, pattern: str | None) -> tuple[str, str]:
    """(patient, slice) read from a file stem with the dataset's pattern; ("", name) without."""
    if pattern:
        m = re.match(pattern, name)
        if m:
            groups = m.groupdict()
            return groups.get("patient") or "", groups.get("slice") or name
    return "", name

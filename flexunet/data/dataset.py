"""In-memory image/mask sets and seeded online augmentation (no TensorFlow here: a data error
is reported before TensorFlow is even imported).

A small dataset is decoded once and held as uint8: on a 2-core CPU this beats a tf.data
pipeline (see docs/design.md). Pairs are matched by file stem in sorted order.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from flexunet.config import IMAGE_SUFFIXES, Config, ImageConfig, MaskConfig, ModelConfig
from flexunet.data import io as imio
from flexunet.errors import DataError


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
    for i, (_, image_path, mask_path) in enumerate(pairs):
        picture = imio.read_image(image_path, c, image.color_order)
        labels = imio.read_mask(mask_path, mask.rgb_map, model.num_classes)
        if labels.shape != picture.shape[:2]:
            raise DataError(f"{mask_path}: mask is {labels.shape[1]}x{labels.shape[0]} but its image "
                            f"{image_path.name} is {picture.shape[1]}x{picture.shape[0]}")
        sizes.append(picture.shape[:2])
        images[i] = imio.resize_image(picture, w, h)
        masks[i] = imio.resize_mask(labels, w, h)
    return SliceSet(images, masks, [stem for stem, _, _ in pairs], sizes)


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


# --- augmentation ----------------------------------------------------------------------------


def augment(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator,
            strength: float) -> tuple[np.ndarray, np.ndarray]:
    """One random flip/rotation/scale/shift and brightness/contrast change, applied identically
    to the image (linear) and the mask (nearest). ``strength`` 0 leaves both untouched."""
    if strength <= 0:
        return image, mask
    h, w = mask.shape
    if rng.random() < 0.5:
        image, mask = image[:, ::-1], mask[:, ::-1]
    angle = rng.uniform(-20.0, 20.0) * strength
    scale = 1.0 + rng.uniform(-0.15, 0.15) * strength
    shift = rng.uniform(-0.06, 0.06, size=2) * strength * np.array([w, h])
    matrix = cv2.getRotationMatrix2D((w / 2.0, h / 2.0), angle, scale)
    matrix[:, 2] += shift
    warped = cv2.warpAffine(np.ascontiguousarray(image), matrix, (w, h), flags=cv2.INTER_LINEAR,
                            borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    if warped.ndim == 2:
        warped = warped[..., None]
    mask = cv2.warpAffine(np.ascontiguousarray(mask), matrix, (w, h), flags=cv2.INTER_NEAREST,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    contrast = 1.0 + rng.uniform(-0.2, 0.2) * strength
    brightness = rng.uniform(-0.1, 0.1) * strength * 255.0
    image = np.clip(warped.astype(np.float32) * contrast + brightness, 0, 255)
    return image, mask


def one_hot(masks: np.ndarray, num_classes: int) -> np.ndarray:
    """N,H,W class maps -> N,H,W,C float32 targets (C=1: a single binary channel)."""
    if num_classes == 1:
        return (masks > 0).astype(np.float32)[..., None]
    if masks.size and int(masks.max()) >= num_classes:
        raise ValueError(f"mask class {int(masks.max())} is not below num_classes {num_classes}")
    # One comparison per class: about 4x faster than indexing np.eye, and batches are built
    # on the CPU while the GPU waits for them.
    targets = np.empty(masks.shape + (num_classes,), dtype=np.float32)
    for c in range(num_classes):
        targets[..., c] = masks == c
    return targets

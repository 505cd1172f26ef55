"""Reading and writing single images and masks, with errors that name the file at fault."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import cv2
import numpy as np

from flexunet.config import Color
from flexunet.errors import DataError
from flexunet.textfiles import read_bytes

_JPEG_SUFFIXES = (".jpg", ".jpeg")
_MAX_SIDE = 16384


def _read_bytes(path: Path) -> bytes:
    data = read_bytes(path, "image file", DataError)
    if not data:
        raise DataError(f"{path}: empty file")
    return data


def _decode(path: Path, flags: int) -> np.ndarray:
    data = _read_bytes(path)
    if path.suffix.lower() in _JPEG_SUFFIXES and b"\xff\xd9" not in data[-4096:]:
        # libjpeg decodes a truncated file with a warning and grey rows; refuse it instead.
        raise DataError(f"{path}: corrupt or truncated JPEG (no end-of-image marker)")
    try:
        array = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flags)
    except cv2.error as exc:  # OpenCV refuses some headers outright (e.g. a decompression bomb)
        check = getattr(exc, "err", "") or "unknown check"
        raise DataError(f"{path}: not a readable image (OpenCV refused it: {check})") from None
    if array is None or array.size == 0:
        raise DataError(f"{path}: not a readable image (corrupt or unsupported format)")
    if max(array.shape[:2]) > _MAX_SIDE:
        raise DataError(f"{path}: {array.shape[1]}x{array.shape[0]} is larger than {_MAX_SIDE} px")
    if array.dtype == np.uint16:
        array = (array / 257).round().astype(np.uint8)
    elif array.dtype != np.uint8:
        raise DataError(f"{path}: unsupported pixel type {array.dtype}")
    return array


def read_image(path: Path, channels: int, color_order: str = "RGB") -> np.ndarray:
    """An image as uint8 HxWxC; grayscale files are repeated to 3 channels when asked."""
    if channels == 1:
        return _decode(path, cv2.IMREAD_GRAYSCALE)[..., None]
    array = _decode(path, cv2.IMREAD_COLOR)
    if color_order == "RGB":
        array = cv2.cvtColor(array, cv2.COLOR_BGR2RGB)
    if channels == 4:
        array = np.concatenate([array, np.full(array.shape[:2] + (1,), 255, np.uint8)], axis=-1)
    return array


def read_mask(path: Path, rgb_map: Mapping[Color, int], num_classes: int) -> np.ndarray:
    """A mask as a uint8 HxW class-index array.

    A single-channel mask that holds only {0, 255} or only {0, 1} is binary: in a 2-class
    config it maps to classes 0/1 whatever colours the rgb_map names. JPEG masks in a 2-class
    config are thresholded at > 127 (JPEG blurs edges into grey). Any other colour that is not
    in the rgb_map is an error naming the file and the colour.
    """
    raw = _decode(path, cv2.IMREAD_UNCHANGED)
    if raw.ndim == 3 and raw.shape[2] == 4:
        raw = raw[..., :3]
    if raw.ndim == 3 and raw.shape[2] == 1:
        raw = raw[..., 0]
    if raw.ndim == 3 and np.array_equal(raw[..., 0], raw[..., 1]) and np.array_equal(raw[..., 0], raw[..., 2]):
        raw = raw[..., 0]
    binary = num_classes <= 2
    if raw.ndim == 2 and binary:
        if path.suffix.lower() in _JPEG_SUFFIXES:
            return (raw > 127).astype(np.uint8)
        values = np.unique(raw)
        if set(values.tolist()) <= {0, 255} or set(values.tolist()) <= {0, 1}:
            return (raw > 0).astype(np.uint8)
    rgb = np.repeat(raw[..., None], 3, axis=-1) if raw.ndim == 2 else cv2.cvtColor(raw, cv2.COLOR_BGR2RGB)
    return colors_to_classes(rgb, rgb_map, path)


def colors_to_classes(rgb: np.ndarray, rgb_map: Mapping[Color, int], path: Path | str) -> np.ndarray:
    """Map an HxWx3 RGB mask to class indices; an unmapped colour is a DataError."""
    packed = (rgb[..., 0].astype(np.uint32) << 16) | (rgb[..., 1].astype(np.uint32) << 8) | rgb[..., 2]
    keys = np.array([(r << 16) | (g << 8) | b for (r, g, b) in rgb_map], dtype=np.uint32)
    classes = np.array(list(rgb_map.values()), dtype=np.uint8)
    order = np.argsort(keys)
    keys, classes = keys[order], classes[order]
    pos = np.clip(np.searchsorted(keys, packed), 0, len(keys) - 1)
    known = keys[pos] == packed
    if not known.all():
        value = int(packed[~known][0])
        color = (value >> 16, (value >> 8) & 255, value & 255)
        count = int((~known).sum())
        raise DataError(f"{path}: colour {color} ({count} pixels) is not in [mask] rgb_map")
    return classes[pos]


def classes_to_colors(classes: np.ndarray, palette: list[Color]) -> np.ndarray:
    """An HxWx3 RGB picture of a class-index map."""
    lut = np.array(palette, dtype=np.uint8)
    return lut[np.clip(classes, 0, len(lut) - 1)]


def resize_image(image: np.ndarray, width: int, height: int) -> np.ndarray:
    if image.shape[1] == width and image.shape[0] == height:
        return image
    shrinking = width < image.shape[1] or height < image.shape[0]
    out = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
    return out[..., None] if out.ndim == 2 else out


def resize_mask(mask: np.ndarray, width: int, height: int) -> np.ndarray:
    """Class maps are resized with nearest neighbour so no class is invented at edges."""
    if mask.shape[1] == width and mask.shape[0] == height:
        return mask
    return cv2.resize(mask, (width, height), interpolation=cv2.INTER_NEAREST)


def write_png(path: Path, array: np.ndarray, color_order: str = "RGB") -> None:
    """Write a uint8 grayscale (HxW or HxWx1) or RGB (HxWx3) array as PNG."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim == 3 and color_order == "RGB":
        array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
    ok, encoded = cv2.imencode(".png", array)
    if not ok:
        raise DataError(f"{path}: could not encode PNG")
    path.write_bytes(encoded.tobytes())


def overlay(image: np.ndarray, classes: np.ndarray, palette: list[Color], alpha: float = 0.45) -> np.ndarray:
    """The image (grayscale or RGB) with foreground classes blended in their colours."""
    base = np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image[..., :3]
    colors = classes_to_colors(classes, palette).astype(np.float32)
    out = base.astype(np.float32)
    fg = classes > 0
    out[fg] = (1 - alpha) * out[fg] + alpha * colors[fg]
    return out.round().astype(np.uint8)


def image_files(folder: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    """Files of a folder by stem, in sorted order; two files with one stem is an error."""
    found: dict[str, Path] = {}
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        path = Path(entry.path)
        if not entry.is_file() or path.suffix.lower() not in suffixes:
            continue
        if path.stem in found:
            raise DataError(f"{folder}: two files share the stem {path.stem!r}: "
                            f"{found[path.stem].name} and {path.name}")
        found[path.stem] = path
    return found

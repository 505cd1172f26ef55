"""Reading and writing single images and masks, with errors that name the file at fault."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from flexunet.config import Color
from flexunet.errors import DataError
from flexunet.textfiles import read_bytes

_JPEG_SUFFIXES = (".jpg", ".jpeg")
LOSSY_SUFFIXES = _JPEG_SUFFIXES  # mask files whose colours compression moves
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


def image_shape(path: Path) -> tuple[int, int]:
    """(height, width) of an image file (decoded in grayscale: the cheapest read)."""
    return tuple(_decode(path, cv2.IMREAD_GRAYSCALE).shape[:2])  # type: ignore[return-value]


@dataclass(frozen=True)
class MaskFile:
    """A decoded mask: class indices (HxW uint8), and how many of its pixels were not an
    exact colour of the map but were snapped to one (lossy files only)."""

    labels: np.ndarray
    snapped: int = 0


def read_mask(path: Path, rgb_map: Mapping[Color, int], num_classes: int, tolerance: float = 0.0) -> np.ndarray:
    """A mask as a uint8 HxW class-index array (see :func:`decode_mask`)."""
    return decode_mask(path, rgb_map, num_classes, tolerance).labels


def decode_mask(path: Path, rgb_map: Mapping[Color, int], num_classes: int, tolerance: float = 0.0) -> MaskFile:
    """A mask file as class indices.

    A single-channel mask that holds only {0, 255} or only {0, 1} is binary: in a 2-class
    config it maps to classes 0/1 whatever colours the rgb_map names. JPEG masks in a 2-class
    config that are grey are thresholded at > 127 (JPEG blurs edges into grey; those pixels
    count as snapped). Colour masks map through the rgb_map: exactly for lossless files, and
    for lossy (JPEG) files to the nearest map colour within ``tolerance`` (Euclidean RGB
    distance). Any other colour is an error naming the file, the colour and the fix.
    """
    raw = _decode(path, cv2.IMREAD_UNCHANGED)
    if raw.ndim == 3 and raw.shape[2] == 4:
        raw = raw[..., :3]
    if raw.ndim == 3 and raw.shape[2] == 1:
        raw = raw[..., 0]
    if raw.ndim == 3 and np.array_equal(raw[..., 0], raw[..., 1]) and np.array_equal(raw[..., 0], raw[..., 2]):
        raw = raw[..., 0]
    binary = num_classes <= 2
    lossy = path.suffix.lower() in LOSSY_SUFFIXES
    if raw.ndim == 2 and binary:
        if lossy:
            return MaskFile((raw > 127).astype(np.uint8), int(((raw > 0) & (raw < 255)).sum()))
        values = np.unique(raw)
        if set(values.tolist()) <= {0, 255} or set(values.tolist()) <= {0, 1}:
            return MaskFile((raw > 0).astype(np.uint8))
    rgb = np.repeat(raw[..., None], 3, axis=-1) if raw.ndim == 2 else cv2.cvtColor(raw, cv2.COLOR_BGR2RGB)
    return snap_colors(rgb, rgb_map, path, tolerance if lossy else 0.0)


def colors_to_classes(rgb: np.ndarray, rgb_map: Mapping[Color, int], path: Path | str) -> np.ndarray:
    """Map an HxWx3 RGB mask to class indices by exact colour; an unmapped colour is a DataError."""
    return snap_colors(rgb, rgb_map, path, 0.0).labels


def _pack(rgb: np.ndarray) -> np.ndarray:
    return (rgb[..., 0].astype(np.uint32) << 16) | (rgb[..., 1].astype(np.uint32) << 8) | rgb[..., 2]


def _unpack(value: int) -> Color:
    return (value >> 16, (value >> 8) & 255, value & 255)


def snap_colors(rgb: np.ndarray, rgb_map: Mapping[Color, int], path: Path | str, tolerance: float) -> MaskFile:
    """Map an HxWx3 RGB mask to class indices: each colour of the map exactly, any other colour
    to the nearest map colour if it lies within ``tolerance``; beyond it, a DataError.

    With a tolerance (lossy files), a pixel farther than that from every map colour is still
    read as the nearest one (as the seed reads every pixel) unless it belongs to a region of
    such pixels at least :data:`REGION` px across. JPEG's chroma subsampling and ringing mix the
    colours either side of every class edge into colours often 100+ away from both, but in
    thin bands and specks; a colour the map lacks, painted as a region, is refused.

    >>> mask = np.array([[[0, 0, 0], [250, 3, 1]]], np.uint8)
    >>> result = snap_colors(mask, {(0, 0, 0): 0, (255, 0, 0): 1}, "m.jpg", tolerance=10.0)
    >>> result.labels.tolist(), result.snapped
    ([[0, 1]], 1)
    """
    packed = _pack(rgb)
    keys = np.array([(r << 16) | (g << 8) | b for (r, g, b) in rgb_map], dtype=np.uint32)
    classes = np.array(list(rgb_map.values()), dtype=np.uint8)
    order = np.argsort(keys)
    keys, classes = keys[order], classes[order]
    pos = np.clip(np.searchsorted(keys, packed), 0, len(keys) - 1)
    known = keys[pos] == packed
    if known.all():
        return MaskFile(classes[pos])
    others, inverse = np.unique(packed[~known], return_inverse=True)
    inverse = inverse.ravel()
    if tolerance <= 0:
        bad = np.bincount(inverse, minlength=len(others))
        raise DataError(f"{path}: {_foreign(others, bad)}; add the colour to [mask] rgb_map (lossless masks "
                        f"must match exactly; [mask] colour_tolerance applies to JPEG masks)")
    nearest, distance = _nearest(others, np.array([_unpack(int(k)) for k in keys], dtype=np.float64))
    pos = pos.copy()
    pos[~known] = nearest[inverse]
    accepted = np.ones(packed.shape, bool)
    accepted[~known] = distance[inverse] <= tolerance
    if not accepted.all():
        accepted |= _edge_artefacts(accepted)
    if not accepted.all():
        bad = np.bincount(inverse[~accepted[~known]], minlength=len(others))
        worst = int(bad.argmax())
        raise DataError(
            f"{path}: {_foreign(others, bad)} nor within [mask] colour_tolerance = {tolerance:g} of one of its "
            f"colours (nearest: {_unpack(int(keys[nearest[worst]]))}, {distance[worst]:.1f} away); add the "
            f"colour to [mask] rgb_map, or set [mask] colour_tolerance above {distance[worst]:.0f}")
    return MaskFile(classes[pos], int((~known).sum()))


def _foreign(others: np.ndarray, bad: np.ndarray) -> str:
    """The most frequent refused colour, with its count (``bad``: pixels per colour)."""
    worst = int(bad.argmax())
    text = f"colour {_unpack(int(others[worst]))} ({int(bad[worst])} pixels) is not in [mask] rgb_map"
    rest = int((bad > 0).sum()) - 1
    if rest:
        text += f" (nor are {rest} other colours, {int(bad.sum() - bad[worst])} pixels)"
    return text


def _nearest(packed_colours: np.ndarray, palette: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index of, and Euclidean RGB distance to, the nearest palette colour of each colour;
    in blocks, so that a mask of millions of colours does not need gigabytes."""
    nearest = np.empty(len(packed_colours), np.int64)
    distance = np.empty(len(packed_colours), np.float64)
    for start in range(0, len(packed_colours), 1 << 16):
        block = packed_colours[start:start + (1 << 16)]
        rgb = np.stack([block >> 16, (block >> 8) & 255, block & 255], axis=-1).astype(np.float64)
        d = ((rgb[:, None, :] - palette[None, :, :]) ** 2).sum(axis=-1)
        nearest[start:start + len(block)] = d.argmin(axis=1)
        distance[start:start + len(block)] = np.sqrt(d.min(axis=1))
    return nearest, distance


REGION = 7  # px: a far colour filling a 7x7 square is a region, not a JPEG edge artefact


def _edge_artefacts(accepted: np.ndarray) -> np.ndarray:
    """Far pixels that are JPEG edge artefacts: all but those of regions at least REGION px
    across (a morphological opening of the far pixels)."""
    far = (~accepted).astype(np.uint8)
    kernel = np.ones((REGION, REGION), np.uint8)
    regions = cv2.dilate(cv2.erode(far, kernel, borderType=cv2.BORDER_REPLICATE), kernel) > 0
    return ~accepted & ~regions


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

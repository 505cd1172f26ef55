"""Online augmentation and one-hot targets, computed on the device inside the compiled train step.

The host only draws each image's random parameters (a few numbers per image, from the run's
seed) and sends the batch as uint8; the warps, brightness/contrast and the one-hot encoding run
as ``keras.ops`` on whatever device trains (TensorFlow or JAX backend), so a GPU is not kept
waiting on numpy.

One augmentation, as before: a horizontal flip (p = 0.5), a rotation of up to 20 degrees, a scale
of up to 15%, a shift of up to 6% of the side and a contrast/brightness change of up to 20%/10%
of 255, each range times ``strength``; the image is resampled bilinearly and the mask by nearest
neighbour through the same transform, both filled with 0 outside.

    >>> import numpy as np
    >>> from flexunet.data import augment
    >>> params = augment.draw(np.random.default_rng(0), 2, 32, 32, strength=0.5)
    >>> params.shape
    (2, 10)
"""

from __future__ import annotations

import numpy as np

PARAMS = 10  # per image: 8 numbers of a projective transform, contrast, brightness
_MAX_ANGLE, _MAX_SCALE, _MAX_SHIFT = 20.0, 0.15, 0.06  # degrees; fractions of 1 and of the side
_MAX_CONTRAST, _MAX_BRIGHTNESS = 0.2, 0.1  # fractions of 1 and of 255


def draw(rng: np.random.Generator, n: int, height: int, width: int, strength: float) -> np.ndarray:
    """Random parameters of ``n`` augmentations (n, PARAMS float32): for each image the transform
    from an output pixel (x, y) back to the pixel it samples, in the layout of
    ``keras.ops.image.affine_transform``, then its contrast factor and brightness offset."""
    flip = rng.random(n) < 0.5
    angle = rng.uniform(-_MAX_ANGLE, _MAX_ANGLE, n) * strength
    scale = 1.0 + rng.uniform(-_MAX_SCALE, _MAX_SCALE, n) * strength
    shift = rng.uniform(-_MAX_SHIFT, _MAX_SHIFT, (n, 2)) * strength * np.array([width, height])
    contrast = 1.0 + rng.uniform(-_MAX_CONTRAST, _MAX_CONTRAST, n) * strength
    brightness = rng.uniform(-_MAX_BRIGHTNESS, _MAX_BRIGHTNESS, n) * strength * 255.0
    transform = transforms(flip, angle, scale, shift, height, width)
    params = np.concatenate([transform, contrast[:, None], brightness[:, None]], axis=1)
    return params.astype(np.float32)


def transforms(flip: np.ndarray, angle: np.ndarray, scale: np.ndarray, shift: np.ndarray, height: int,
               width: int) -> np.ndarray:
    """(n, 8) transforms of ``keras.ops.image.affine_transform`` for a horizontal flip (bool), then a
    rotation (degrees, counter-clockwise) and scale about the centre, then a shift (n, 2: x, y
    pixels) -- the warp that ``cv2.warpAffine`` does with ``cv2.getRotationMatrix2D``'s matrix
    plus the shift."""
    n = len(flip)
    # Forward map p' = A p + t, as cv2.getRotationMatrix2D builds it.
    radians = np.deg2rad(angle)
    cx, cy = width / 2.0, height / 2.0
    a, b = scale * np.cos(radians), scale * np.sin(radians)
    tx = (1 - a) * cx - b * cy + shift[:, 0]
    ty = b * cx + (1 - a) * cy + shift[:, 1]
    # Its inverse takes an output pixel to the source: p = R (p' - t), R = A^-1 = [[a, -b], [b, a]] / s^2.
    s2 = scale * scale
    r00, r01, r10, r11 = a / s2, -b / s2, b / s2, a / s2
    u0, u1 = -(r00 * tx + r01 * ty), -(r10 * tx + r11 * ty)
    # The flip comes before the warp: the source column x becomes width - 1 - x.
    sign = np.where(flip, -1.0, 1.0)
    offset = np.where(flip, width - 1.0, 0.0)
    return np.stack([sign * r00, sign * r01, offset + sign * u0, r10, r11, u1, np.zeros(n), np.zeros(n)], axis=1)


def apply(images, masks, params):  # -> (images, masks): backend tensors
    """Augment a batch: images (N,H,W,C, any dtype, 0..255) -> float32, masks (N,H,W) -> int32."""
    from keras import ops

    transform = params[:, :8]
    warped = ops.image.affine_transform(ops.cast(images, "float32"), transform, interpolation="bilinear",
                                        fill_mode="constant", fill_value=0, data_format="channels_last")
    labels = ops.image.affine_transform(ops.cast(masks, "float32")[..., None], transform, interpolation="nearest",
                                        fill_mode="constant", fill_value=0, data_format="channels_last")
    contrast, brightness = params[:, 8, None, None, None], params[:, 9, None, None, None]
    images = ops.clip(warped * contrast + brightness, 0.0, 255.0)
    return images, ops.cast(ops.round(labels[..., 0]), "int32")


def one_hot(masks, num_classes: int):  # -> backend tensor
    """N,H,W class maps -> N,H,W,C float32 targets (C=1: a single binary channel, foreground > 0)."""
    from keras import ops

    if num_classes == 1:
        return ops.cast(ops.greater(masks, 0), "float32")[..., None]
    return ops.one_hot(ops.cast(masks, "int32"), num_classes, dtype="float32")


def prepare(batch: tuple, num_classes: int, *, training: bool) -> tuple:
    """A batch as the host sends it -- (uint8 images, uint8 masks) or, when augmented in
    training, (images, masks, params) -- to (float32 images, one-hot targets)."""
    from keras import ops

    images, masks = batch[0], batch[1]
    if training and len(batch) > 2 and batch[2] is not None:
        images, masks = apply(images, masks, batch[2])
    else:
        images = ops.cast(images, "float32")
    return images, one_hot(masks, num_classes)

"""The on-device augmentation against the numpy/OpenCV one it replaced (kept here, as the
reference only), on real CT slices and on a shape whose flips and rotations can be read back."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import cv2
import keras
import numpy as np
import pytest

from flexunet.data import augment
from flexunet.data.batches import Batches
from flexunet.data.dataset import SliceSet, load_split
from flexunet import config as cfg

ROOT = Path(__file__).resolve().parents[1]


def _reference(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator,
               strength: float) -> tuple[np.ndarray, np.ndarray]:
    """flexunet's augmentation before it moved to the device (flexunet/data/dataset.py, 2026-11)."""
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
    return np.clip(warped.astype(np.float32) * contrast + brightness, 0, 255), mask


def _device(images: np.ndarray, masks: np.ndarray, seed: int, strength: float) -> tuple[np.ndarray, np.ndarray]:
    params = augment.draw(np.random.default_rng(seed), len(images), *masks.shape[1:], strength)
    out_images, out_masks = augment.apply(images, masks, params)
    return keras.ops.convert_to_numpy(out_images), keras.ops.convert_to_numpy(out_masks)


def _both(images: np.ndarray, masks: np.ndarray, repeats: int, strength: float):
    """Every pair augmented ``repeats`` times by each implementation (independent seeds)."""
    images, masks = np.repeat(images, repeats, 0), np.repeat(masks, repeats, 0)
    rng = np.random.default_rng(1)
    pairs = [_reference(images[i], masks[i], rng, strength) for i in range(len(images))]
    ref = np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
    return ref, _device(images, masks, 2, strength)


def _bar() -> tuple[np.ndarray, np.ndarray]:
    """A horizontal bar left of the centre: its centroid tells a flip, its axis the rotation."""
    mask = np.zeros((64, 64), np.uint8)
    mask[28:36, 8:30] = 1
    image = (mask * 180 + 40).astype(np.uint8)[..., None]
    return image, mask


def _shape_stats(masks: np.ndarray) -> dict[str, np.ndarray]:
    area, cx, angle = [], [], []
    for m in masks:
        ys, xs = np.nonzero(m)
        area.append(len(xs))
        cx.append(xs.mean() - 31.5)
        cov = np.cov(np.stack([xs - xs.mean(), ys - ys.mean()]))
        # Orientation of the bar's long axis, in degrees, folded into -90..90.
        angle.append(np.degrees(0.5 * np.arctan2(2 * cov[0, 1], cov[0, 0] - cov[1, 1])))
    return {"area": np.array(area), "cx": np.array(cx), "angle": np.array(angle)}


def test_flips_rotations_scales_match_the_reference() -> None:
    image, mask = _bar()
    (ref_img, ref_mask), (dev_img, dev_mask) = _both(image[None], mask[None], 600, strength=1.0)
    ref, dev = _shape_stats(ref_mask), _shape_stats(dev_mask)
    # Flip frequency: the bar ends up right of the centre in about half of the images.
    assert abs((ref["cx"] > 0).mean() - 0.5) < 0.07 and abs((dev["cx"] > 0).mean() - 0.5) < 0.07
    # Rotations: the same spread of angles (uniform within +-20 degrees: sd 11.5).
    assert abs(np.abs(dev["angle"]).max() - np.abs(ref["angle"]).max()) < 3.0
    assert abs(dev["angle"].std() - ref["angle"].std()) < 1.5 and 9.0 < dev["angle"].std() < 14.0
    # Rotating one way in image coordinates, as the reference (a sign error would flip this).
    assert np.corrcoef(np.sort(dev["angle"]), np.sort(ref["angle"]))[0, 1] > 0.98
    # Scale (area goes with its square) and shifts (the spread of the centroid).
    assert abs(dev["area"].mean() / ref["area"].mean() - 1) < 0.03
    assert abs(dev["area"].std() / ref["area"].std() - 1) < 0.15
    assert abs(np.abs(dev["cx"]).std() - np.abs(ref["cx"]).std()) < 0.6
    # The image moves with its mask.
    for img, msk in ((ref_img, ref_mask), (dev_img, dev_mask)):
        inside = img[..., 0][msk == 1].mean()
        outside = img[..., 0][(msk == 0) & (img[..., 0] > 0)].mean()
        assert inside > outside + 100


def test_intensities_and_foreground_on_ct_slices_match_the_reference(prepared64: Path) -> None:
    data = load_split(cfg.load(prepared64 / "train_eval_infer.config"), "train")
    chosen = np.argsort(-data.masks.reshape(len(data), -1).sum(1))[:12]  # slices with bleeds
    images, masks = data.images[chosen], data.masks[chosen]
    (ref_img, ref_mask), (dev_img, dev_mask) = _both(images, masks, 25, strength=1.0)
    assert dev_img.dtype == np.float32 and dev_img.min() >= 0 and dev_img.max() <= 255
    assert set(np.unique(dev_mask)) <= set(np.unique(masks).tolist())  # classes only, no blends
    assert abs(dev_img.mean() / ref_img.mean() - 1) < 0.03
    assert abs(dev_img.std() / ref_img.std() - 1) < 0.03
    assert abs((dev_img == 0).mean() - (ref_img == 0).mean()) < 0.02  # filled borders
    fg_ref, fg_dev = (ref_mask > 0).mean(), (dev_mask > 0).mean()
    assert abs(fg_dev / fg_ref - 1) < 0.05
    # Alignment: the pixels under a mask are as bright (blood, brain) as in the reference.
    under_ref, under_dev = ref_img[..., 0][ref_mask > 0].mean(), dev_img[..., 0][dev_mask > 0].mean()
    assert abs(under_dev / under_ref - 1) < 0.03


def test_each_warp_is_the_references_warp_for_the_same_draws(prepared64: Path) -> None:
    data = load_split(cfg.load(prepared64 / "train_eval_infer.config"), "train")
    images, masks = data.images[:8], data.masks[:8]
    flip = np.array([False, True] * 4)
    angle = np.array([-20, -12, -5, 0, 3, 9, 15, 20], np.float64)
    scale = np.array([0.85, 1.15, 1.0, 0.9, 1.1, 1.05, 0.95, 1.0])
    shift = np.array([[-3.8, 2.0], [1.0, -3.8], [0, 0], [3.8, 3.8], [-1, 0], [0, 2.5], [2, -2], [-3, 1]])
    params = np.concatenate([augment.transforms(flip, angle, scale, shift, 64, 64),
                             np.ones((8, 1)), np.zeros((8, 1))], axis=1).astype(np.float32)
    out_img, out_mask = (keras.ops.convert_to_numpy(t) for t in augment.apply(images, masks, params))
    for i in range(8):
        image, mask = (images[i][:, ::-1], masks[i][:, ::-1]) if flip[i] else (images[i], masks[i])
        matrix = cv2.getRotationMatrix2D((32.0, 32.0), float(angle[i]), float(scale[i]))
        matrix[:, 2] += shift[i]
        ref_img = cv2.warpAffine(np.ascontiguousarray(image), matrix, (64, 64), flags=cv2.INTER_LINEAR)
        ref_mask = cv2.warpAffine(np.ascontiguousarray(mask), matrix, (64, 64), flags=cv2.INTER_NEAREST)
        # Away from the border (where the two fill differently by a pixel) the images agree to
        # rounding, and the masks but for pixels on a label's edge.
        inner = (slice(4, 60), slice(4, 60))
        assert np.abs(out_img[i][..., 0][inner] - ref_img[inner].astype(np.float32)).mean() < 2.0, i
        assert (out_mask[i][inner] == ref_mask[inner]).mean() > 0.99, i


def test_a_pure_flip_and_no_change_are_exact() -> None:
    image, mask = _bar()
    identity = np.array([[1, 0, 0, 0, 1, 0, 0, 0, 1, 0]], np.float32)
    flip = np.array([[-1, 0, 63, 0, 1, 0, 0, 0, 1, 0]], np.float32)
    for params, expected_img, expected_mask in ((identity, image, mask), (flip, image[:, ::-1], mask[:, ::-1])):
        out_img, out_mask = (keras.ops.convert_to_numpy(t) for t in augment.apply(image[None], mask[None], params))
        np.testing.assert_array_equal(out_img[0], expected_img.astype(np.float32))
        np.testing.assert_array_equal(out_mask[0], expected_mask)


def test_one_hot_targets() -> None:
    masks = np.array([[[0, 1], [2, 0]]], np.uint8)
    two = keras.ops.convert_to_numpy(augment.one_hot(masks, 3))
    assert two.shape == (1, 2, 2, 3) and two.dtype == np.float32
    np.testing.assert_array_equal(two.argmax(-1), masks)
    np.testing.assert_array_equal(two.sum(-1), 1)
    binary = keras.ops.convert_to_numpy(augment.one_hot(masks, 1))
    np.testing.assert_array_equal(binary[..., 0], masks > 0)


def _slices(n: int = 6) -> SliceSet:
    rng = np.random.default_rng(0)
    return SliceSet(rng.integers(0, 255, (n, 32, 32, 1)).astype(np.uint8),
                    (rng.random((n, 32, 32)) > 0.9).astype(np.uint8), [str(i) for i in range(n)], [(32, 32)] * n)


def test_batches_are_seeded_endless_and_resume_mid_sequence() -> None:
    data = _slices()
    first = iter(Batches(data, 4, shuffle=True, augment_strength=0.5, seed=11, steps=2))
    second = iter(Batches(data, 4, shuffle=True, augment_strength=0.5, seed=11, steps=2))
    run = [next(first) for _ in range(6)]  # three epochs from one iterator
    for a, b in zip(run, [next(second) for _ in range(6)]):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
    images, masks, params = run[0]
    assert images.dtype == np.uint8 and masks.dtype == np.uint8 and params.shape == (4, augment.PARAMS)
    assert not np.array_equal(run[2][2], params)  # the next epoch is augmented anew
    resumed = iter(Batches(data, 4, shuffle=True, augment_strength=0.5, seed=11, steps=2, start_epoch=2))
    for x, y in zip(next(resumed), run[4]):
        np.testing.assert_array_equal(x, y)
    plain = next(iter(Batches(data, 4)))
    assert len(plain) == 2  # no augmentation: no parameters to send


def test_augmentation_agrees_on_tensorflow_and_jax(tmp_path: Path) -> None:
    """The same parameters give the same warp on both backends (run where JAX is installed)."""
    if importlib.util.find_spec("jax") is None:
        if os.environ.get("FLEXUNET_REQUIRE_SERVICES"):
            pytest.fail("JAX is not installed (it is in the test extra): pip install -e '.[test]'")
        pytest.skip("JAX is not installed here (pip install -e '.[test]' brings it)")
    image, mask = _bar()
    params = augment.draw(np.random.default_rng(5), 8, 64, 64, 1.0)
    images, masks = np.repeat(image[None], 8, 0), np.repeat(mask[None], 8, 0)
    np.savez(tmp_path / "in.npz", images=images, masks=masks, params=params)
    script = ("import numpy as np, keras, sys; from flexunet.data import augment; d = np.load(sys.argv[1]); "
              "i, m = augment.apply(d['images'], d['masks'], d['params']); "
              "np.savez(sys.argv[2], images=keras.ops.convert_to_numpy(i), masks=keras.ops.convert_to_numpy(m))")
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "in.npz"), str(tmp_path / "jax.npz")],
                   env={**os.environ, "KERAS_BACKEND": "jax", "PYTHONPATH": os.pathsep.join(
                       [str(ROOT), os.environ.get("PYTHONPATH", "")])}, check=True, timeout=300)
    jax_out = np.load(tmp_path / "jax.npz")
    here_img, here_mask = (keras.ops.convert_to_numpy(t) for t in augment.apply(images, masks, params))
    assert (jax_out["masks"] == here_mask).mean() > 0.995  # ties at exactly .5 may round apart
    assert np.abs(jax_out["images"] - here_img).mean() < 0.5


def test_training_with_on_device_augmentation_is_seeded(prepared64: Path) -> None:
    from flexunet.train import fit

    base = cfg.load(prepared64 / "train_eval_infer.config")
    config = cfg.override(base, "model", {"num_layers": 2, "base_filters": 4}, "test")
    config = cfg.override(config, "train", {"epochs": 2, "batch_size": 4, "steps_per_epoch": 3, "augmentation": True,
                                            "augmentation_strength": 0.8, "seed": 5}, "test")
    train, valid = load_split(config, "train"), load_split(config, "valid")
    runs = [fit(config.model, config.train, train, valid, verbose=0) for _ in range(2)]
    assert runs[0].history == runs[1].history and runs[0].epochs_run == 2
    other = cfg.override(config, "train", {"seed": 6}, "test")
    assert fit(other.model, other.train, train, valid, verbose=0).history["loss"] != runs[0].history["loss"]
    network = runs[0].model
    # The step hook is gone after fit: the model predicts float images as any Keras model.
    assert "train_step" not in vars(network)
    probabilities = network.predict(valid.images[:2].astype(np.float32), verbose=0)
    assert probabilities.shape == (2, 64, 64, config.model.num_classes)

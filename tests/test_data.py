from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import assert_user_error, run_cli_here
from flexunet.config import ImageConfig, MaskConfig, ModelConfig
from flexunet.data import io as imio
from flexunet.data.dataset import load_pairs, pair_files
from flexunet.errors import DataError

SEED_MAP = {(0, 0, 0): 0, (210, 80, 0): 1}


def _write(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), array)
    return path


def _model(**kw) -> ModelConfig:
    return ModelConfig(**{"image_width": 32, "image_height": 32, "num_classes": 2, "image_channels": 1,
                          "num_layers": 3, **kw})


def test_pairs_match_by_stem_in_sorted_order(tmp_path: Path) -> None:
    for stem in ("b", "a", "c"):
        _write(tmp_path / "images" / f"{stem}.jpg", np.zeros((8, 8), np.uint8))
        _write(tmp_path / "masks" / f"{stem}.png", np.zeros((8, 8), np.uint8))
    assert [s for s, _, _ in pair_files(tmp_path / "images", tmp_path / "masks", ".png")] == ["a", "b", "c"]


def test_missing_partner_is_named(tmp_path: Path) -> None:
    _write(tmp_path / "images" / "a.png", np.zeros((8, 8), np.uint8))
    _write(tmp_path / "images" / "b.png", np.zeros((8, 8), np.uint8))
    _write(tmp_path / "masks" / "a.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(DataError, match=r"b\.png: no mask b\.png"):
        pair_files(tmp_path / "images", tmp_path / "masks", ".png")


def test_duplicate_stems_are_refused(tmp_path: Path) -> None:
    _write(tmp_path / "images" / "a.png", np.zeros((8, 8), np.uint8))
    _write(tmp_path / "images" / "a.jpg", np.zeros((8, 8), np.uint8))
    with pytest.raises(DataError, match="two files share the stem 'a'"):
        imio.image_files(tmp_path / "images", (".png", ".jpg"))


def test_binary_masks_map_whatever_the_rgb_map_says(tmp_path: Path) -> None:
    mask = np.zeros((8, 8), np.uint8)
    mask[2:4, 2:4] = 255
    got = imio.read_mask(_write(tmp_path / "m.png", mask), SEED_MAP, 2)
    assert got.sum() == 4 and got.max() == 1
    got01 = imio.read_mask(_write(tmp_path / "m01.png", (mask > 0).astype(np.uint8)), SEED_MAP, 2)
    np.testing.assert_array_equal(got, got01)


def test_rgb_masks_go_through_the_map_and_unknown_colours_are_named(tmp_path: Path) -> None:
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[1, 1] = (210, 80, 0)
    path = _write(tmp_path / "m.png", rgb[..., ::-1])  # OpenCV writes BGR
    assert imio.read_mask(path, SEED_MAP, 2)[1, 1] == 1
    rgb[5, 5] = (0, 255, 0)
    bad = _write(tmp_path / "bad.png", rgb[..., ::-1])
    with pytest.raises(DataError, match=r"bad\.png: colour \(0, 255, 0\) \(1 pixels\) is not in \[mask\] rgb_map"):
        imio.read_mask(bad, SEED_MAP, 2)


def test_multiclass_grey_levels(tmp_path: Path) -> None:
    mask = np.array([[0, 1, 2], [2, 1, 0]], np.uint8)
    got = imio.read_mask(_write(tmp_path / "m.png", mask), {(0, 0, 0): 0, (1, 1, 1): 1, (2, 2, 2): 2}, 3)
    np.testing.assert_array_equal(got, mask)


def test_load_pairs_resizes_masks_with_nearest_neighbour(tmp_path: Path) -> None:
    image = np.random.default_rng(0).integers(0, 255, (64, 64, 3)).astype(np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[10:30, 10:30] = 255
    _write(tmp_path / "images" / "x.png", image)
    _write(tmp_path / "masks" / "x.png", mask)
    data = load_pairs(tmp_path / "images", tmp_path / "masks", _model(image_channels=3), ImageConfig(),
                      MaskConfig(rgb_map=SEED_MAP))
    assert data.images.shape == (1, 32, 32, 3) and data.images.dtype == np.uint8
    assert set(np.unique(data.masks)) == {0, 1} and data.masks[0].sum() == 100
    assert data.original_sizes == [(64, 64)]


def test_cli_names_an_image_without_its_mask(tiny_config: Path) -> None:
    orphan = tiny_config.parent / "train" / "images" / "999_1.png"
    cv2.imwrite(str(orphan), np.zeros((64, 64), np.uint8))
    assert_user_error(run_cli_here("train", tiny_config), str(orphan), "no mask")
    assert not (tiny_config.parent / "models").exists()


def test_cli_names_a_mask_colour_not_in_the_map(tiny_config: Path) -> None:
    mask_path = sorted((tiny_config.parent / "valid" / "masks").glob("*.png"))[0]
    mask = cv2.imread(str(mask_path), cv2.IMREAD_UNCHANGED)
    mask[0, 0] = 77
    cv2.imwrite(str(mask_path), mask)
    assert_user_error(run_cli_here("train", tiny_config), str(mask_path), "(77, 77, 77)", "rgb_map")
    assert not (tiny_config.parent / "models").exists()


def test_cli_names_a_corrupt_jpeg(tiny_config: Path) -> None:
    images = tiny_config.parent / "train" / "images"
    victim = sorted(images.glob("*.png"))[0]
    corrupt = images / f"{victim.stem}.jpg"
    victim.unlink()
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    assert_user_error(run_cli_here("train", tiny_config), str(corrupt), "JPEG")
    assert not (tiny_config.parent / "models").exists()


def test_jpeg_colour_masks_snap_to_the_map_and_a_foreign_region_is_refused(tmp_path: Path) -> None:
    palette = {(0, 0, 0): 0, (210, 80, 0): 1, (0, 200, 0): 2, (0, 90, 255): 3, (255, 220, 0): 4, (200, 0, 200): 5}
    classes = np.zeros((96, 96), np.uint8)
    for k, (x, y, r) in enumerate([(20, 20, 14), (60, 30, 18), (40, 70, 16), (75, 75, 12), (30, 45, 9)], start=1):
        cv2.circle(classes, (x, y), r, k, -1)
    colours = [c for c, _ in sorted(palette.items(), key=lambda item: item[1])]
    png = tmp_path / "m.png"
    imio.write_png(png, imio.classes_to_colors(classes, colours))
    jpg = tmp_path / "m.jpg"
    cv2.imwrite(str(jpg), cv2.imread(str(png), cv2.IMREAD_COLOR), [cv2.IMWRITE_JPEG_QUALITY, 75])
    assert (imio.read_mask(png, palette, 6) == classes).all()  # lossless: exact
    decoded = imio.decode_mask(jpg, palette, 6, tolerance=48.0)
    assert decoded.snapped > 100 and (decoded.labels == classes).mean() > 0.97
    with pytest.raises(DataError, match=r"m\.jpg: colour .* is not in \[mask\] rgb_map"):
        imio.read_mask(jpg, palette, 6, tolerance=0.0)
    foreign = cv2.imread(str(png), cv2.IMREAD_COLOR)
    foreign[40:60, 5:25] = (128, 128, 128)
    bad = tmp_path / "bad.jpg"
    cv2.imwrite(str(bad), foreign, [cv2.IMWRITE_JPEG_QUALITY, 75])
    with pytest.raises(DataError, match=r"bad\.jpg: colour \(1[23]\d, 1[23]\d, 1[23]\d\) \(\d+ pixels\) is not in "
                                        r"\[mask\] rgb_map.*add the colour to \[mask\] rgb_map, or set \[mask\] "
                                        r"colour_tolerance above \d+"):
        imio.read_mask(bad, palette, 6, tolerance=48.0)
    foreign_png = tmp_path / "bad.png"
    cv2.imwrite(str(foreign_png), foreign)
    with pytest.raises(DataError, match=r"colour \(128, 128, 128\) \(400 pixels\) is not in \[mask\] rgb_map; "
                                        r"add the colour to \[mask\] rgb_map \(lossless masks must match exactly"):
        imio.read_mask(foreign_png, palette, 6, tolerance=48.0)

"""Seed users move over unchanged (issue 12): a multiclass data set with JPEG colour masks and a
seed-format config trains, evaluates and infers; the seed's model options; a seed config with
8 levels drives a study at 64 px."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import cv2
import keras
import numpy as np
import pytest

from conftest import assert_user_error, run_cli, run_cli_here, set_keys
from flexunet import config as cfg
from flexunet.data import io as imio
from flexunet.errors import DataError
from flexunet.model import build

pytestmark = pytest.mark.slow

PALETTE = {(0, 0, 0): 0, (210, 80, 0): 1, (0, 200, 0): 2, (0, 90, 255): 3}
SEED_FORMAT = """; a seed train_eval_infer.config (antillia's layout), for JPEG colour masks
[model]
model          = "TensorFlowFlexUNet"
generator      = False
image_width    = {size}
image_height   = {size}
image_channels = 3
input_normalize = True
normalization  = False
num_classes    = 4
base_filters   = 4
base_kernels   = (5,5)
num_layers     = {layers}
dropout_rate   = 0.04
dropout_seed_fixing = True
dilation       = (1,1)
optimizer      = "Adam"
learning_rate  = 0.001
clipvalue      = 0.5
loss           = "categorical_crossentropy"
metrics        = ["dice_coef_multiclass"]
show_summary   = False

[dataset]
class_name     = "ImageCategorizedMaskDataset"

[train]
epochs         = 1
batch_size     = 8
patience       = 10
metrics        = ["dice_coef_multiclass", "val_dice_coef_multiclass"]
model_dir      = "./models/"
eval_dir       = "./eval/"
images_dir     = "./train/images/"
masks_dir      = "./train/masks/"
create_backup  = False
learning_rate_reducer = True
reducer_factor = 0.5
reducer_patience = 4
epoch_change_infer = False
save_weights_only = True

[valid]
images_dir = "./valid/images/"
masks_dir  = "./valid/masks/"

[test]
images_dir = "./test/images/"
masks_dir  = "./test/masks/"

[infer]
images_dir = "./test/images/"
output_dir = "./infer_output/"

[image]
color_order = "RGB"

[mask]
mask_file_format = ".jpg"
rgb_map = {{(0,0,0):0, (210,80,0):1, (0,200,0):2, (0,90,255):3}}
"""


def _classes(image: np.ndarray, hemorrhage: np.ndarray) -> np.ndarray:
    """Four classes of a real CT slice: hemorrhage, bright bone, soft tissue, background (the
    thresholds smoothed into regions, as drawn label masks are)."""
    classes = np.zeros(image.shape, np.uint8)
    classes[image > 40] = 3
    classes[image > 200] = 2
    classes = cv2.medianBlur(classes, 5)
    classes[hemorrhage > 0] = 1
    return classes


@pytest.fixture(scope="module")
def jpeg_dataset(prepared64: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample's slices with 4-class colour masks, written as PNG and then saved as JPEG
    (quality 90), as generators of public data sets do; the PNGs are removed."""
    root = tmp_path_factory.mktemp("jpeg") / "colour"
    colours = [c for c, _ in sorted(PALETTE.items(), key=lambda item: item[1])]
    for part in ("train", "valid", "test"):
        (root / part / "masks").mkdir(parents=True)
        shutil.copytree(prepared64 / part / "images", root / part / "images")
        for mask_path in sorted((prepared64 / part / "masks").glob("*.png")):
            image = cv2.imread(str(prepared64 / part / "images" / mask_path.name), cv2.IMREAD_GRAYSCALE)
            hemorrhage = cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE)
            png = root / part / "masks" / mask_path.name
            imio.write_png(png, imio.classes_to_colors(_classes(image, hemorrhage), colours))
            colour = cv2.imread(str(png), cv2.IMREAD_COLOR)
            cv2.imwrite(str(png.with_suffix(".jpg")), colour, [cv2.IMWRITE_JPEG_QUALITY, 90])
            png.unlink()
    (root / "train_eval_infer.config").write_text(SEED_FORMAT.format(size=64, layers=3), encoding="utf-8")
    return root


def _copy(dataset: Path, tmp_path: Path) -> Path:
    work = tmp_path / "work"
    shutil.copytree(dataset, work)
    return work / "train_eval_infer.config"


def test_the_masks_really_are_lossy_and_snap_to_the_classes_they_were_drawn_from(jpeg_dataset: Path,
                                                                                prepared64: Path) -> None:
    mask_path = next(p for p in sorted((jpeg_dataset / "train" / "masks").glob("*.jpg")))
    raw = cv2.cvtColor(cv2.imread(str(mask_path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    with pytest.raises(DataError, match="is not in \\[mask\\] rgb_map"):
        imio.snap_colors(raw, PALETTE, mask_path, 0.0)  # exact matching refuses the JPEG's colours
    decoded = imio.decode_mask(mask_path, PALETTE, 4, cfg.DEFAULT_COLOUR_TOLERANCE)
    assert decoded.snapped > 0
    image = cv2.imread(str(prepared64 / "train" / "images" / mask_path.with_suffix(".png").name), cv2.IMREAD_GRAYSCALE)
    hemorrhage = cv2.imread(str(prepared64 / "train" / "masks" / mask_path.with_suffix(".png").name),
                            cv2.IMREAD_GRAYSCALE)
    truth = _classes(image, hemorrhage)
    assert set(np.unique(decoded.labels)) == set(np.unique(truth))
    # The seed's nearest-colour reading: right but for edge pixels (thresholded CT has many edges).
    assert (decoded.labels == truth).mean() > 0.95


def test_train_evaluate_infer_on_jpeg_colour_masks_with_a_seed_config(jpeg_dataset: Path, tmp_path: Path) -> None:
    config = _copy(jpeg_dataset, tmp_path)
    work = config.parent
    run = run_cli_here("train", config)
    assert run.returncode == 0, run.stderr
    snapped = [line for line in run.stderr.splitlines() if "pixels of lossy masks snapped" in line]
    assert any("train/masks" in line for line in snapped) and any("valid/masks" in line for line in snapped)
    assert "[model] model" not in run.stderr  # TensorFlowFlexUNet is what is built: no warning
    assert (work / "models" / "best_model.keras").is_file()
    run = run_cli_here("evaluate", config)
    assert run.returncode == 0, run.stderr
    summary = json.loads((work / "evaluation.json").read_text())  # [eval] output_dir: the config's folder
    assert set(summary["classes"]) == {"1", "2", "3"} and summary["num_classes"] == 4
    assert 0.0 < summary["seed_dice_coef_multiclass (background-inclusive, not comparable)"] <= 1.0
    run = run_cli_here("infer", config)
    assert run.returncode == 0, run.stderr
    outputs = sorted((work / "infer_output").rglob("*.png"))
    assert len(outputs) >= len(list((work / "test" / "images").glob("*.png")))


def test_a_truly_foreign_colour_still_fails_with_the_fix(jpeg_dataset: Path, tmp_path: Path) -> None:
    config = _copy(jpeg_dataset, tmp_path)
    victim = sorted((config.parent / "train" / "masks").glob("*.jpg"))[0]
    picture = cv2.imread(str(victim), cv2.IMREAD_COLOR)
    picture[4:36, 4:36] = (128, 128, 128)  # grey: no class of the map, and a region, not an edge
    cv2.imwrite(str(victim), picture, [cv2.IMWRITE_JPEG_QUALITY, 90])
    run = run_cli_here("train", config)
    line = assert_user_error(run, victim.name, "is not in [mask] rgb_map", "pixels",
                             "add the colour to [mask] rgb_map", "colour_tolerance")
    assert "(12" in line or "(13" in line  # names a grey colour, e.g. (128, 128, 128)
    assert not (config.parent / "models" / "best_model.keras").exists()


def test_another_seed_architecture_is_refused_in_one_line(jpeg_dataset: Path, tmp_path: Path) -> None:
    config = _copy(jpeg_dataset, tmp_path)
    set_keys(config, model='"TensorFlowFlexAttentionUNet"')
    for command in ("train", "summary"):
        assert_user_error(run_cli_here(command, config), "[model] model", "TensorFlowFlexAttentionUNet",
                          "is not supported", 'set model = "TensorFlowFlexUNet"')


def test_one_class_trains_as_the_seed_sigmoid_and_binary_crossentropy(tiny_config: Path) -> None:
    set_keys(tiny_config, final_activation='"sigmoid"', num_classes="1", loss='"binary_crossentropy"', epochs="1",
             rgb_map="{(0,0,0):0, (255,255,255):1}")
    run = run_cli_here("train", tiny_config)
    assert run.returncode == 0, run.stderr
    work = tiny_config.parent
    network = keras.models.load_model(work / "models" / "best_model.keras", compile=False)
    assert network.output_shape[-1] == 1 and network.get_layer("head").activation.__name__ == "sigmoid"
    config = cfg.load(tiny_config)
    from flexunet.data.dataset import load_split

    valid = load_split(config, "valid")
    p = np.clip(network.predict(valid.images.astype(np.float32), verbose=0)[..., 0].astype(np.float64), 1e-7, 1 - 1e-7)
    y = (valid.masks > 0).astype(np.float64)
    bce = float(np.mean(-(y * np.log(p) + (1 - y) * np.log(1 - p))))
    with (work / "eval" / "train_log.csv").open() as handle:
        log = list(csv.DictReader(handle))
    assert float(log[0]["val_loss"]) == pytest.approx(bce, rel=2e-3)  # the loss trained on is BCE

    set_keys(tiny_config, final_activation='"relu"')
    assert_user_error(run_cli_here("train", tiny_config), "[model] final_activation", "'relu'",
                      'final_activation = "sigmoid"')


def test_dropout_seed_fixing_repeats_the_dropout_masks() -> None:
    x = np.random.default_rng(0).random((1, 32, 32, 1)).astype(np.float32)

    def twice(fixing: bool) -> tuple[np.ndarray, np.ndarray]:
        model = cfg.ModelConfig(image_width=32, image_height=32, num_classes=2, image_channels=1,
                                base_filters=4, num_layers=3, dropout_rate=0.3, dropout_seed_fixing=fixing)
        first = build(model, seed=137)
        second = build(model, seed=137)
        second.set_weights(first.get_weights())
        return (np.asarray(first(x, training=True)), np.asarray(second(x, training=True)))

    a, b = twice(True)
    np.testing.assert_array_equal(a, b)
    a, b = twice(False)
    assert not np.array_equal(a, b)


def test_a_study_at_64_px_over_a_seed_config_with_8_levels(jpeg_dataset: Path, tmp_path: Path) -> None:
    config = _copy(jpeg_dataset, tmp_path)
    config.write_text(SEED_FORMAT.format(size=512, layers=8), encoding="utf-8")  # the seed's 512 px depth
    with pytest.raises(cfg.ConfigError, match="not divisible"):
        cfg.override(cfg.load(config), "model", {"image_width": 64, "image_height": 64}, "alone")
    study = tmp_path / "study.toml"
    study.write_text(f"""
[study]
name = "seed-jpeg"
image_size = 64
baseline = true
[dataset]
config = "{config}"
[fixed]
steps_per_epoch = 2
patience = 0
save_overhead = 0
batch_size = 4
[budget]
n_trials = 2
max_epochs = 1
[sampler]
name = "RandomSampler"
seed = 0
[pruner]
name = "NopPruner"
[space]
base_filters = {{ type = "int", low = 4, high = 8, step = 4 }}
""", encoding="utf-8")
    out = tmp_path / "run"
    run = run_cli("search", "run", study, "--workers", "1", "--out", out, timeout=900)
    assert run.returncode == 0, run.stdout + run.stderr
    import optuna

    trials = optuna.load_study(study_name="seed-jpeg", storage=f"sqlite:///{out / 'study.db'}").trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    # The baseline keeps the seed's depth scaled to 64 px; the other trial scales the config's.
    assert [t.user_attrs["settings"]["num_layers"] for t in trials] == [5, 5]
    assert all(t.user_attrs["settings"]["image_width"] == 64 for t in trials)
    export = tmp_path / "export"
    run = run_cli_here("search", "export", "--study", "seed-jpeg", "--storage", f"sqlite:///{out / 'study.db'}",
                  "--out", export)
    assert run.returncode == 0, run.stdout + run.stderr
    metrics = json.loads((export / "metrics.json").read_text())
    assert set(metrics["test"]["classes"]) == {"1", "2", "3"}

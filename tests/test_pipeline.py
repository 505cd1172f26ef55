"""Prepare -> train -> evaluate -> infer through the real command, on the real sample.

Training runs as a user runs it, in its own process; evaluate and infer then read what it wrote,
in this interpreter (:func:`conftest.run_cli_here`: the same command, without another
TensorFlow import)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import keras
import numpy as np
import pytest

from conftest import SEED_CONFIG, run_cli, run_cli_here, set_keys
from flexunet import config as cfg
from flexunet.callbacks import BestCheckpoint, SaveThrottle
from flexunet.data.dataset import load_split
from flexunet.train import fit

pytestmark = pytest.mark.slow


def test_train_evaluate_infer(tiny_config: Path, sample: Path, tmp_path: Path) -> None:
    work = tiny_config.parent
    run = run_cli("train", tiny_config)
    assert run.returncode == 0, run.stderr
    assert "validation foreground Dice" in run.stdout
    model_path = work / "models" / "best_model.keras"
    assert model_path.is_file()
    with (work / "eval" / "train_log.csv").open() as handle:
        log = list(csv.DictReader(handle))
    assert len(log) == 2
    assert {"loss", "val_loss", "val_foreground_dice", "val_dice_coef_multiclass", "learning_rate"} <= set(log[0])
    assert (work / "eval" / "learning_curves.png").stat().st_size > 5000
    strips = sorted((work / "epoch_change_infer").glob("epoch_*.png"))
    assert [p.name for p in strips] == ["epoch_001.png", "epoch_002.png"]
    assert cv2.imread(str(strips[0])).shape[1] > 3 * 64  # input | ground truth | prediction
    summary = json.loads((work / "eval" / "train_summary.json").read_text())
    assert summary["epochs_run"] == 2 and summary["stop_reason"] == "max_epochs"

    run = run_cli_here("evaluate", tiny_config)
    assert run.returncode == 0, run.stderr
    assert "mean foreground Dice" in run.stdout and "Dice" in run.stdout.splitlines()[0]
    test_images = sorted(p.stem for p in (work / "test" / "images").glob("*.png"))
    with (work / "evaluation" / "evaluation.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["image"] for r in rows] == test_images
    assert {"patient", "slice", "dice_1", "iou_1", "precision_1", "recall_1", "hd95_1"} <= set(rows[0])
    assert rows[0]["patient"] == test_images[0].split("_")[0]
    result = json.loads((work / "evaluation" / "evaluation.json").read_text())
    assert 0.0 <= result["foreground_dice_global"] <= 1.0 and result["images"] == len(test_images)
    assert set(result["per_patient"]) == {s.split("_")[0] for s in test_images}
    assert result["detection"]["specificity"] is None  # the sample has no negative slices

    run = run_cli_here("infer", tiny_config)
    assert run.returncode == 0, run.stderr
    out = work / "infer_output"
    for kind in ("masks", "colorized", "overlays"):
        assert sorted(p.stem for p in (out / kind).glob("*.png")) == test_images
    mask = cv2.imread(str(out / "masks" / f"{test_images[0]}.png"), cv2.IMREAD_UNCHANGED)
    assert mask.shape == (64, 64) and mask.max() <= 1

    # Without a config: raw 650 px JPGs give masks at their original size, and the .keras
    # file's predictions are what a plain Keras user gets.
    raw = sample / "Patients_CT" / "077" / "brain"
    images = tmp_path / "raw"
    images.mkdir()
    for name in ("20.jpg", "21.jpg"):
        (images / name).write_bytes((raw / name).read_bytes())
    run = run_cli_here("infer", "--model", model_path, "--images", images, "--out", tmp_path / "pred")
    assert run.returncode == 0, run.stderr
    mask = cv2.imread(str(tmp_path / "pred" / "masks" / "20.png"), cv2.IMREAD_UNCHANGED)
    assert mask.shape == (650, 650)
    network = keras.models.load_model(model_path, compile=False, safe_mode=True)
    small = cv2.resize(cv2.imread(str(raw / "20.jpg"), cv2.IMREAD_GRAYSCALE), (64, 64), interpolation=cv2.INTER_AREA)
    expected = network.predict(small[None, ..., None].astype(np.float32), verbose=0)[0].argmax(-1)
    expected = cv2.resize(expected.astype(np.uint8), (650, 650), interpolation=cv2.INTER_NEAREST)
    np.testing.assert_array_equal(mask, expected)


def test_learning_rate_reducer_really_reduces(tiny_config: Path) -> None:
    # Without batch norm (whose moving statistics change val_loss whatever the rate) a rate this
    # small cannot move val_loss by Keras' min_delta, so after one flat epoch the reducer halves it.
    set_keys(tiny_config, learning_rate="1e-7", reducer_patience="1", reducer_min_lr="0.0", epochs="3",
             normalization="False",
             epoch_change_infer="False")
    config = cfg.load(tiny_config)
    result = fit(config.model, config.train, load_split(config, "train"), load_split(config, "valid"), verbose=0)
    lr = result.history["learning_rate"]
    assert lr[0] == pytest.approx(1e-7) and lr[-1] == pytest.approx(lr[0] * 0.5)


class _Net:
    def __init__(self) -> None:
        self.stop_training = False
        self.weights = 0

    def get_weights(self):
        return [self.weights]

    def set_weights(self, weights):
        self.weights = weights[0]

    def save(self, path):
        raise AssertionError("no path given, nothing to save")


def test_early_stopping_on_dice_with_loss_tiebreak() -> None:
    callback = BestCheckpoint(None, patience=2)
    net = _Net()
    callback.set_model(net)
    history = [(0.0, 1.0), (0.0, 0.9), (0.0, 0.8), (0.3, 0.7), (0.2, 0.6), (0.25, 0.5)]
    for epoch, (dice, loss) in enumerate(history):
        net.weights = epoch
        callback.on_epoch_end(epoch, {"val_foreground_dice": dice, "val_loss": loss})
        if net.stop_training:
            break
    # Dice 0 with a falling loss counts as progress; then two epochs below 0.3 stop the run.
    assert callback.best_epoch == 3 and epoch == 5 and callback.stop_reason == "early_stopping"
    callback.on_train_end()
    assert net.weights == 3  # the best epoch's weights are restored


def test_seed_config_trains(tmp_path: Path, prepared64: Path) -> None:
    """The seed's ICH config, unchanged apart from paths and size (128 px: 8 levels need a
    multiple of 128), builds its 126.8M-parameter model and trains an epoch on real slices."""
    path = tmp_path / "train_eval_infer.config"
    text = SEED_CONFIG.read_text(encoding="utf-8")
    for part in ("train", "valid", "test"):
        text = text.replace(f"../../../dataset/Brain-Intracranial-Hemorrhage/{part}/", f"{prepared64}/{part}/")
    path.write_text(text, encoding="utf-8")
    set_keys(path, image_width="128", image_height="128")
    config = cfg.load(path)
    train, valid = load_split(config, "train"), load_split(config, "valid")
    assert train.images.shape[1:] == (128, 128, 3)
    train, valid = train.subset([0, 1]), valid.subset([0, 1])
    result = fit(config.model, config.train, train, valid, epochs=1, verbose=0)
    assert result.epochs_run == 1 and np.isfinite(result.history["loss"][0])
    assert result.model.count_params() == 126_809_218


def test_training_resumes_from_its_last_epoch(tiny_config: Path, tmp_path: Path) -> None:
    """What a retried search trial relies on: the state saved after each epoch lets a new
    process carry on at the next epoch, with the log and early-stopping state intact."""
    from flexunet.train import TrainOutputs

    set_keys(tiny_config, epochs="4", epoch_change_infer="False", save_overhead="0")
    config = cfg.load(tiny_config)
    train, valid = load_split(config, "train"), load_split(config, "valid")
    work = tmp_path / "checkpoints"
    work.mkdir()
    outputs = TrainOutputs(model_path=work / "best_model.keras", log_csv=work / "log.csv")
    saved = []
    first = fit(config.model, config.train, train, valid, outputs=outputs, epochs=2, verbose=0,
                checkpoint_dir=work, on_checkpoint=lambda folder, epoch: saved.append(epoch))
    assert saved == [0, 1] and (work / "last.keras").exists() and (work / "state.json").exists()
    lr_before = first.history["learning_rate"][-1]
    keras.backend.clear_session()
    resumed = fit(config.model, config.train, train, valid, outputs=outputs, verbose=0, checkpoint_dir=work,
                  resume=True)
    assert resumed.epochs_run == 4 and saved == [0, 1]
    assert resumed.history["loss"][:2] == first.history["loss"]
    assert resumed.history["learning_rate"][2] == pytest.approx(lr_before)
    with (work / "log.csv").open() as handle:
        assert [row["epoch"] for row in csv.DictReader(handle)] == ["0", "1", "2", "3"]
    assert 1 <= resumed.best_epoch <= 4


def test_save_throttle_keeps_saving_within_its_share() -> None:
    """After a save of c seconds the next is due c * (1 - share) / share later; share 0: always."""
    now = [0.0]
    throttle = SaveThrottle(0.2, clock=lambda: now[0])
    assert throttle.due()
    with throttle.saving():
        now[0] += 1.0  # a save of one second: the next is due 4 s after it ends
    now[0] += 3.9
    assert not throttle.due()
    now[0] += 0.2
    assert throttle.due()
    always = SaveThrottle(0.0, clock=lambda: now[0])
    with always.saving():
        now[0] += 10.0
    assert always.due()


def test_throttled_saves_still_leave_the_best_model_and_curves(tiny_config: Path, tmp_path: Path) -> None:
    """With saves throttled as far as they go, the files written at the end are those of the
    best epoch, and the resume checkpoint (taken after the first epoch) matches its best model."""
    from flexunet.train import TrainOutputs

    set_keys(tiny_config, epochs="4", epoch_change_infer="False", patience="0", save_overhead="0.5")
    config = cfg.load(tiny_config)
    train, valid = load_split(config, "train"), load_split(config, "valid")
    work = tmp_path / "checkpoints"
    work.mkdir()
    outputs = TrainOutputs(model_path=work / "best_model.keras", curves_png=work / "curves.png")
    saved: list[int] = []
    result = fit(config.model, config.train, train, valid, outputs=outputs, verbose=0, checkpoint_dir=work,
                 on_checkpoint=lambda folder, epoch: saved.append(epoch))
    assert result.epochs_run == 4 and saved[0] == 0
    best = keras.models.load_model(work / "best_model.keras", compile=False)
    for ours, theirs in zip(result.model.get_weights(), best.get_weights(), strict=True):
        np.testing.assert_array_equal(ours, theirs)
    assert (work / "curves.png").stat().st_size > 5000
    state = json.loads((work / "state.json").read_text())
    assert state["epoch"] == saved[-1] and len(state["history"]["loss"]) == saved[-1] + 1

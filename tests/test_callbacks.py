"""What the trial loop writes, and when: a search trial's best model and learning curves are
written once after training (not by the loop), and are those of the best epoch; the progress
attrs are written at most every few seconds while every epoch is still reported to the pruner."""

from __future__ import annotations

import io
import math
import zipfile
from pathlib import Path
from typing import Any

import keras
import numpy as np
import optuna
import pytest

from conftest import set_keys, tiny_study
from flexunet import config as cfg
from flexunet.callbacks import MONITOR, SaveThrottle
from flexunet.data.dataset import load_split
from flexunet.train import TrainOutputs, fit
from search import keys as k
from search.spec import study_file
from search.trial.objective import Objective
from search.trial.training import PruningReporter
from search.paths import CURVES_FILE, LOG_FILE, MODEL_FILE, OVERLAYS_FILE

pytestmark = pytest.mark.slow


class _Recorder(keras.callbacks.Callback):
    """Keeps each epoch's weights and logs; after the last epoch it scrambles the weights, so that
    a model written from the last weights instead of the best epoch's cannot pass."""

    def __init__(self, epochs: int) -> None:
        super().__init__()
        self.epochs, self.weights, self.logs = epochs, [], []

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.weights.append(self.model.get_weights())
        self.logs.append(dict(logs or {}))
        if epoch == self.epochs - 1:
            rng = np.random.default_rng(0)
            self.model.set_weights([w + rng.normal(0, 1, w.shape).astype(w.dtype) for w in self.weights[-1]])


def _best_epoch(logs: list[dict[str, float]]) -> int:
    """The 0-based best epoch by BestCheckpoint's rule, computed independently: highest
    validation foreground Dice, ties broken by the lower validation loss."""
    scored = [(i, log[MONITOR], log["val_loss"]) for i, log in enumerate(logs) if math.isfinite(log[MONITOR])]
    return max(scored, key=lambda s: (s[1], -s[2]))[0]


def _assert_same_weights(ours: list[np.ndarray], theirs: list[np.ndarray]) -> None:
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_array_equal(a, b)


def _trial_objective(tmp_path: Path, config: cfg.Config, name: str
                     ) -> tuple[Objective, optuna.artifacts.FileSystemArtifactStore, optuna.Trial]:
    """A search objective over ``config`` with a folder artifact store, and a trial asked of an
    in-memory study: what a worker holds while it trains one trial."""
    spec = study_file.load(tiny_study(tmp_path / "study.toml", name))
    (tmp_path / "artifacts").mkdir()
    store = optuna.artifacts.FileSystemArtifactStore(str(tmp_path / "artifacts"))
    objective = Objective(spec=spec, base=config, image_size=64, artifacts=store)
    return objective, store, optuna.create_study().ask()


@pytest.fixture
def saves_only_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """Periodic saves throttled as far as they go, whatever the machine's speed: after its first
    save a throttled callback never finds another one due (flushes and final writes still run)."""
    monkeypatch.setattr(SaveThrottle, "due", lambda self: self._next == -math.inf)


def test_a_trial_writes_the_best_epochs_model_and_curves_once_after_training(tiny_config: Path, tmp_path: Path,
                                                                             saves_only_first: None) -> None:
    set_keys(tiny_config, epochs="3", epoch_change_infer="False", patience="0", save_overhead="0.02")
    config = cfg.load(tiny_config)
    train, valid = load_split(config, "train"), load_split(config, "valid")
    work = tmp_path / "trial"
    work.mkdir()
    recorder = _Recorder(epochs=3)
    saved: list[int] = []
    outputs = TrainOutputs(model_path=work / MODEL_FILE, log_csv=work / LOG_FILE, model_at_end=False)
    result = fit(config.model, config.train, train, valid, outputs=outputs, extra_callbacks=[recorder], verbose=0,
                 checkpoint_dir=work, on_checkpoint=lambda folder, epoch: saved.append(epoch))
    best = _best_epoch(recorder.logs)
    assert result.epochs_run == 3 and saved == [0] and result.best_epoch == best + 1
    # The loop left the model file as the one resume checkpoint needed it (epoch 1's), and no curves.
    _assert_same_weights(keras.models.load_model(work / MODEL_FILE, compile=False).get_weights(),
                         recorder.weights[0])
    assert not (work / CURVES_FILE).exists()
    # The model fit returns holds the best epoch's weights, not the scrambled last ones.
    _assert_same_weights(result.model.get_weights(), recorder.weights[best])

    objective, store, trial = _trial_objective(tmp_path, config, "wrap-up")
    objective._keep_artifacts(trial, result, valid, config, work)
    uploaded = {a.filename: a.artifact_id for a in optuna.artifacts.get_all_artifact_meta(trial)}
    assert set(uploaded) == {MODEL_FILE, LOG_FILE, CURVES_FILE, OVERLAYS_FILE}
    with store.open_reader(uploaded[MODEL_FILE]) as reader:
        (tmp_path / "uploaded.keras").write_bytes(reader.read())
    _assert_same_weights(keras.models.load_model(tmp_path / "uploaded.keras", compile=False).get_weights(),
                         recorder.weights[best])
    with store.open_reader(uploaded[CURVES_FILE]) as reader:
        assert reader.read(8) == b"\x89PNG\r\n\x1a\n"


def test_flexunet_train_still_writes_the_best_model_at_the_end(tiny_config: Path, tmp_path: Path,
                                                               saves_only_first: None) -> None:
    """Outside a search (``model_at_end`` left True) fit writes the final best model itself."""
    set_keys(tiny_config, epochs="3", epoch_change_infer="False", patience="0", save_overhead="0.02")
    config = cfg.load(tiny_config)
    train, valid = load_split(config, "train"), load_split(config, "valid")
    recorder = _Recorder(epochs=3)
    outputs = TrainOutputs(model_path=tmp_path / MODEL_FILE, curves_png=tmp_path / CURVES_FILE)
    fit(config.model, config.train, train, valid, outputs=outputs, extra_callbacks=[recorder], verbose=0)
    _assert_same_weights(keras.models.load_model(tmp_path / MODEL_FILE, compile=False).get_weights(),
                         recorder.weights[_best_epoch(recorder.logs)])
    assert (tmp_path / CURVES_FILE).stat().st_size > 5000


def _attr_writes(trial: optuna.Trial) -> list[tuple[str, Any]]:
    writes: list[tuple[str, Any]] = []
    original = trial.set_user_attr

    def spy(key: str, value: Any) -> None:
        writes.append((key, value))
        original(key, value)

    trial.set_user_attr = spy  # type: ignore[method-assign]
    return writes


@pytest.mark.parametrize("seconds, progress_epochs", [(3600.0, [1]), (0.0, [1, 2, 3, 4])])
def test_progress_is_written_at_most_every_few_seconds_and_every_epoch_is_reported(
        seconds: float, progress_epochs: list[int]) -> None:
    study = optuna.create_study(pruner=optuna.pruners.NopPruner())
    trial = study.ask()
    writes = _attr_writes(trial)
    reporter = PruningReporter(trial, progress_seconds=seconds)
    for epoch, dice in enumerate([0.1, 0.2, float("nan"), 0.4]):
        reporter.on_epoch_end(epoch, {MONITOR: dice})
    assert [v for key, v in writes if key == k.EPOCH] == progress_epochs
    last = [v for key, v in writes if key == k.LAST_VAL_DICE]
    assert len(last) == len(progress_epochs) and (seconds > 0 or last == [0.1, 0.2, None, 0.4])
    frozen = study.trials[0]
    assert frozen.intermediate_values == {0: 0.1, 1: 0.2, 3: 0.4}  # the NaN epoch is not reported
    assert frozen.user_attrs[k.EPOCH] == progress_epochs[-1]


def test_the_resume_archive_carries_the_best_model_the_loop_keeps(tiny_config: Path, tmp_path: Path) -> None:
    """With the final write left to the trial, a resume point still holds the best model so far:
    the retry of a killed trial starts from that model, not from nothing."""
    set_keys(tiny_config, epochs="2", epoch_change_infer="False", patience="0", save_overhead="0")
    config = cfg.load(tiny_config)
    train, valid = load_split(config, "train"), load_split(config, "valid")
    work = tmp_path / "trial"
    work.mkdir()
    objective, store, trial = _trial_objective(tmp_path, config, "resume-archive")
    recorder = _Recorder(epochs=2)
    outputs = TrainOutputs(model_path=work / MODEL_FILE, log_csv=work / LOG_FILE, model_at_end=False)
    fit(config.model, config.train, train, valid, outputs=outputs, extra_callbacks=[recorder], verbose=0,
        checkpoint_dir=work, on_checkpoint=lambda folder, epoch: objective._save_resume_point(trial, folder, epoch))
    with store.open_reader(trial.study.trials[0].user_attrs[k.RESUME_ARTIFACT]) as reader:
        archive = zipfile.ZipFile(io.BytesIO(reader.read()))
    assert {MODEL_FILE, "last.keras", "state.json"} <= set(archive.namelist())
    (tmp_path / "resumed_best.keras").write_bytes(archive.read(MODEL_FILE))
    _assert_same_weights(keras.models.load_model(tmp_path / "resumed_best.keras", compile=False).get_weights(),
                         recorder.weights[_best_epoch(recorder.logs)])

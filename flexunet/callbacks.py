"""Training callbacks. A callback that stops training sets ``stop_reason`` so that the caller
can say why a run ended (early stopping, a pruner, a non-finite loss...)."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import keras
import numpy as np

from flexunet import plots
from flexunet.config import Color
from flexunet.data import io as imio
from flexunet.data.dataset import SliceSet
from flexunet.metrics import to_classes

MONITOR = "val_foreground_dice"


class BestCheckpoint(keras.callbacks.Callback):
    """Early stopping and checkpointing on validation foreground Dice.

    Ties are broken by validation loss: a model that predicts no foreground yet scores Dice 0
    epoch after epoch, and without the tie-break early stopping would end the run (and keep
    epoch 1) before the loss has had time to bring the lesions out. At the end of training the
    best epoch's weights are restored.
    """

    def __init__(self, path: Path | None, patience: int, monitor: str = MONITOR) -> None:
        super().__init__()
        self.path, self.patience, self.monitor = path, patience, monitor
        self.best_epoch = -1
        self.best_dice = -math.inf
        self.best_loss = math.inf
        self.wait = 0
        self.stop_reason: str | None = None
        self._best_weights: list[np.ndarray] | None = None

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        logs = logs or {}
        if self.monitor not in logs:
            raise KeyError(f"{self.monitor!r} is not among the logged metrics {sorted(logs)}")
        dice = float(logs[self.monitor])
        loss = float(logs.get("val_loss", math.inf))
        if not math.isfinite(dice):
            return
        if dice > self.best_dice or (dice == self.best_dice and loss < self.best_loss):
            self.best_epoch, self.best_dice, self.best_loss, self.wait = epoch, dice, loss, 0
            self._best_weights = self.model.get_weights()
            if self.path is not None:
                self.model.save(self.path)
            return
        self.wait += 1
        if self.patience and self.wait >= self.patience:
            self.model.stop_training = True
            self.stop_reason = "early_stopping"

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        if self._best_weights is not None:
            self.model.set_weights(self._best_weights)

    def restore(self, state: dict[str, Any], best_weights: list[np.ndarray] | None) -> None:
        """Take up the state an :class:`EpochCheckpoint` saved."""
        self.best_epoch, self.best_dice = int(state["best_epoch"]), float(state["best_dice"])
        self.best_loss, self.wait = float(state["best_loss"]), int(state["wait"])
        self._best_weights = best_weights


class EpochCheckpoint(keras.callbacks.Callback):
    """After every epoch, save what a restarted run needs to carry on where this one stopped:
    the model with its optimizer state (``last.keras``) and the early-stopping state and
    history so far (``state.json``). ``on_saved`` is called with the folder and the epoch."""

    LAST, STATE = "last.keras", "state.json"

    def __init__(self, folder: Path, best: BestCheckpoint, history: dict[str, list[float]],
                 on_saved: Callable[[Path, int], None] | None = None) -> None:
        super().__init__()
        self.folder, self.best, self.history, self.on_saved = folder, best, history, on_saved

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        for key, value in (logs or {}).items():
            self.history.setdefault(key, []).append(float(value))
        self.model.save(self.folder / self.LAST)
        state = {"epoch": epoch, "best_epoch": self.best.best_epoch, "best_dice": self.best.best_dice,
                 "best_loss": self.best.best_loss, "wait": self.best.wait, "history": self.history}
        (self.folder / self.STATE).write_text(json.dumps(state), encoding="utf-8")
        if self.on_saved is not None:
            self.on_saved(self.folder, epoch)


class StopOnNonFinite(keras.callbacks.Callback):
    """Stop at the first batch whose loss is NaN or infinite."""

    def __init__(self) -> None:
        super().__init__()
        self.stop_reason: str | None = None

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            self.model.stop_training = True
            self.stop_reason = f"non-finite loss ({float(loss)}) at batch {batch}"


class EpochTimer(keras.callbacks.Callback):
    """Wall-clock seconds of each epoch (training and validation)."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds: list[float] = []
        self._start = 0.0

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.seconds.append(time.perf_counter() - self._start)


class LearningRateLog(keras.callbacks.Callback):
    """Put the epoch's learning rate into the logs (and so into the CSV log)."""

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if logs is not None:
            logs["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))


class LearningCurves(keras.callbacks.Callback):
    """Redraw the learning-curve PNG after every epoch."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self.history: dict[str, list[float]] = {}

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        for key, value in (logs or {}).items():
            self.history.setdefault(key, []).append(float(value))
        plots.learning_curves(self.history, self.path)


class EpochChangeInfer(keras.callbacks.Callback):
    """The seed's epoch_change_infer: after each epoch, predict a few validation slices and save
    input / ground truth / prediction side by side, to watch the masks form."""

    def __init__(self, samples: SliceSet, out_dir: Path, palette: list[Color]) -> None:
        super().__init__()
        self.samples, self.out_dir, self.palette = samples, out_dir, palette

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        probabilities = self.model.predict(self.samples.images.astype(np.float32), verbose=0)
        strip = plots.comparison_strip(
            self.samples.images,
            [("ground truth", self.samples.masks), (f"epoch {epoch + 1}", to_classes(probabilities))],
            self.palette, self.samples.names)
        imio.write_png(self.out_dir / f"epoch_{epoch + 1:03d}.png", strip)

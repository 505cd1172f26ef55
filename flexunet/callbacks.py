"""Training callbacks. A callback that stops training sets ``stop_reason`` so that the caller
can say why a run ended (early stopping, a pruner, a non-finite loss...)."""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterator
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
# What EpochCheckpoint keeps beside the best model: the last epoch's model and the loop's state.
LAST_CHECKPOINT = "last.keras"
TRAIN_STATE = "state.json"


class SaveThrottle:
    """When a periodic save is due, so that saving takes at most ``share`` of the wall time.

    After a save that took ``c`` seconds the next one is due ``c * (1 - share) / share`` seconds
    later: on a GPU, where an epoch of a small data set takes a fraction of a second, saving the
    model after every epoch would cost more than the training. ``share`` 0 saves every time.
    """

    def __init__(self, share: float, clock: Callable[[], float] = time.perf_counter) -> None:
        self.share, self.clock = share, clock
        self._next = -math.inf

    def due(self) -> bool:
        return self.share <= 0 or self.clock() >= self._next

    @contextlib.contextmanager
    def saving(self) -> Iterator[None]:
        """Time a save and schedule the next one from its cost."""
        start = self.clock()
        yield
        end = self.clock()
        if self.share > 0:
            self._next = end + (end - start) * (1 - self.share) / self.share


class BestCheckpoint(keras.callbacks.Callback):
    """Early stopping and checkpointing on validation foreground Dice.

    Ties are broken by validation loss: a model that predicts no foreground yet scores Dice 0
    epoch after epoch, and without the tie-break early stopping would end the run (and keep
    epoch 1) before the loss has had time to bring the lesions out. At the end of training the
    best epoch's weights are restored and written to ``path``; during training the best model is
    written as often as ``save_share`` allows (see :class:`SaveThrottle`), and whenever
    :meth:`flush` is called. With ``flush_only`` the file is written only by :meth:`flush` (a
    resume checkpoint must match it), and the caller writes the final model, whose weights are
    the best epoch's after training, when it likes.
    """

    def __init__(self, path: Path | None, patience: int, monitor: str = MONITOR, save_share: float = 0.0,
                 flush_only: bool = False) -> None:
        super().__init__()
        self.path, self.patience, self.monitor, self.flush_only = path, patience, monitor, flush_only
        self.best_epoch = -1
        self.best_dice = -math.inf
        self.best_loss = math.inf
        self.wait = 0
        self.stop_reason: str | None = None
        self._best_weights: list[np.ndarray] | None = None
        self._unsaved = False  # the best weights are newer than the file at path
        self._throttle = SaveThrottle(save_share)

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
            self._unsaved = self.path is not None
            if self._unsaved and not self.flush_only and self._throttle.due():
                self._save()
            return
        self.wait += 1
        if self.patience and self.wait >= self.patience:
            self.model.stop_training = True
            self.stop_reason = "early_stopping"

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        if self._best_weights is not None:
            self.model.set_weights(self._best_weights)
            if self._unsaved and not self.flush_only:
                self._save()

    def flush(self) -> None:
        """Write the best model now if the file is behind (a resume checkpoint must match it)."""
        if not self._unsaved or self._best_weights is None:
            return
        current = self.model.get_weights()
        self.model.set_weights(self._best_weights)
        try:
            self._save()
        finally:
            self.model.set_weights(current)

    def _save(self) -> None:
        assert self.path is not None
        with self._throttle.saving():
            self.model.save(self.path)
        self._unsaved = False

    def restore(self, state: dict[str, Any], best_weights: list[np.ndarray] | None) -> None:
        """Take up the state an :class:`EpochCheckpoint` saved."""
        self.best_epoch, self.best_dice = int(state["best_epoch"]), float(state["best_dice"])
        self.best_loss, self.wait = float(state["best_loss"]), int(state["wait"])
        self._best_weights = best_weights


class EpochCheckpoint(keras.callbacks.Callback):
    """After the first epoch, and then as often as ``save_share`` allows (see
    :class:`SaveThrottle`; 0: after every epoch), save what a restarted run needs to carry on
    where this one stopped: the model with its optimizer state (``last.keras``), the best model
    so far, and the early-stopping state and history (``state.json``). ``on_saved`` is called
    with the folder and the epoch, and its time counts as part of the save."""

    LAST, STATE = LAST_CHECKPOINT, TRAIN_STATE

    def __init__(self, folder: Path, best: BestCheckpoint, history: dict[str, list[float]],
                 on_saved: Callable[[Path, int], None] | None = None, save_share: float = 0.0) -> None:
        super().__init__()
        self.folder, self.best, self.history, self.on_saved = folder, best, history, on_saved
        self._throttle = SaveThrottle(save_share)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        for key, value in (logs or {}).items():
            self.history.setdefault(key, []).append(float(value))
        if not self._throttle.due():
            return
        with self._throttle.saving():
            self.best.flush()
            self.model.save(self.folder / self.LAST)
            state = {"epoch": epoch, "best_epoch": self.best.best_epoch, "best_dice": self.best.best_dice,
                     "best_loss": self.best.best_loss, "wait": self.best.wait, "history": self.history}
            (self.folder / self.STATE).write_text(json.dumps(state), encoding="utf-8")
            if self.on_saved is not None:
                self.on_saved(self.folder, epoch)


class StopOnNonFinite(keras.callbacks.Callback):
    """Stop after the first epoch whose mean training loss is NaN or infinite.

    Checked per epoch, not per batch: a batch-level hook makes Keras fetch the loss from the
    device after every step, which stalls a GPU; one non-finite batch already makes the
    epoch's mean non-finite.
    """

    def __init__(self) -> None:
        super().__init__()
        self.stop_reason: str | None = None

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            self.model.stop_training = True
            self.stop_reason = f"non-finite loss ({float(loss)}) in epoch {epoch + 1}"


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
    """Redraw the learning-curve PNG after an epoch, as often as ``save_share`` allows (see
    :class:`SaveThrottle`; 0: after every epoch), and at the end of training."""

    def __init__(self, path: Path, save_share: float = 0.0) -> None:
        super().__init__()
        self.path = path
        self.history: dict[str, list[float]] = {}
        self._throttle = SaveThrottle(save_share)
        self._drawn = -1  # epochs in the PNG

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        for key, value in (logs or {}).items():
            self.history.setdefault(key, []).append(float(value))
        if self._throttle.due():
            self._draw()

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        if self.history and self._drawn != len(self.history.get("loss", [])):
            self._draw()

    def _draw(self) -> None:
        with self._throttle.saving():
            plots.learning_curves(self.history, self.path)
        self._drawn = len(self.history.get("loss", []))


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

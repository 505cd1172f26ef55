"""Training: compile FlexUNet and fit it with early stopping on validation foreground Dice."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras

from flexunet import callbacks as cb
from flexunet import losses, metrics
from flexunet.config import Config, ModelConfig, TrainConfig
from flexunet.data.batches import Batches, device_inputs
from flexunet.data.dataset import SliceSet, load_split
from flexunet.model import build

_logger = logging.getLogger(__name__)
MODEL_FILE = "best_model.keras"
LOG_FILE = "train_log.csv"
CURVES_FILE = "learning_curves.png"


@dataclass(frozen=True)
class TrainOutputs:
    """Where a run writes; None skips that output."""

    model_path: Path | None = None
    log_csv: Path | None = None
    curves_png: Path | None = None
    infer_dir: Path | None = None
    num_infer_images: int = 0
    # False: model_path is written only with the resume checkpoints during training, and the
    # final best model is the caller's to write (from TrainResult.model, which holds the best
    # epoch's weights): a search trial writes it once with its other files, after training.
    model_at_end: bool = True


@dataclass
class TrainResult:
    model: Any  # keras.Model with the best epoch's weights
    history: dict[str, list[float]]
    best_epoch: int  # 1-based; 0 when no epoch finished
    best_val_dice: float
    epochs_run: int
    stop_reason: str  # "early_stopping", "max_epochs", or the reason a callback gave
    seconds_per_epoch: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "best_epoch": self.best_epoch, "best_val_foreground_dice": self.best_val_dice,
            "epochs_run": self.epochs_run, "stop_reason": self.stop_reason,
            "seconds_per_epoch": self.seconds_per_epoch, "params": int(self.model.count_params()),
        }


def make_optimizer(model: ModelConfig, ema_every: int | None = None,
                   ema_momentum: float = 0.99) -> keras.optimizers.Optimizer:
    """The config's optimizer. With ``ema_every`` (a number of steps), it keeps an exponential
    moving average of the weights (Keras' ``use_ema``) and writes it into the model every
    ``ema_every`` steps: one epoch's steps, so that validation, early stopping and the saved
    model all see the averaged weights."""
    kwargs: dict[str, Any] = {"learning_rate": model.learning_rate}
    if ema_every is not None:
        kwargs.update(use_ema=True, ema_momentum=ema_momentum, ema_overwrite_frequency=ema_every)
    if model.clipvalue is not None:
        kwargs["clipvalue"] = model.clipvalue
    if model.weight_decay is not None:
        kwargs["weight_decay"] = model.weight_decay
    return {
        "Adam": keras.optimizers.Adam, "AdamW": keras.optimizers.AdamW,
        "SGD": lambda **kw: keras.optimizers.SGD(momentum=0.9, nesterov=True, **kw),
        "RMSprop": keras.optimizers.RMSprop,
    }[model.optimizer](**kwargs)


def compile_model(network: keras.Model, model: ModelConfig, masks: Any = None, ema_every: int | None = None,
                  ema_momentum: float = 0.99) -> None:
    """Compile with the config's optimizer, loss and metrics; ``masks`` (the training masks)
    give the class weights where ``class_weights = "balanced"``; ``ema_every`` and
    ``ema_momentum`` as for :func:`make_optimizer`."""
    weights = None
    if model.class_weights == "balanced":
        if masks is None:
            raise ValueError("class_weights = 'balanced' needs the training masks")
        weights = losses.class_weights(masks, metrics.num_labels(model.num_classes))
    network.compile(optimizer=make_optimizer(model, ema_every, ema_momentum), loss=losses.get(model.loss, weights),
                    metrics=metrics.keras_metrics(model.num_classes, model.metrics))


def fit(model: ModelConfig, train: TrainConfig, train_data: SliceSet, valid_data: SliceSet, *,
        outputs: TrainOutputs = TrainOutputs(), palette: list | None = None,
        extra_callbacks: Sequence[keras.callbacks.Callback] = (), epochs: int | None = None,
        verbose: int | str = "auto", network: keras.Model | None = None,
        checkpoint_dir: Path | None = None, on_checkpoint: Callable[[Path, int], None] | None = None,
        resume: bool = False) -> TrainResult:
    """Train one model on in-memory data; the core that ``flexunet train`` and every search
    trial share.

    With ``checkpoint_dir``, the state after an epoch is saved there (and handed to
    ``on_checkpoint``): after the first epoch, then as often as ``train.save_overhead`` allows;
    with ``resume``, training carries on from the last state saved there.
    """
    keras.utils.set_random_seed(train.seed)
    state: dict[str, Any] = {}
    if resume:
        if checkpoint_dir is None:
            raise ValueError("resume needs checkpoint_dir")
        state = json.loads((checkpoint_dir / cb.EpochCheckpoint.STATE).read_text(encoding="utf-8"))
        # Compiled: the optimizer's moments and learning rate come back with the weights.
        network = keras.models.load_model(checkpoint_dir / cb.EpochCheckpoint.LAST, safe_mode=True)
    if network is None:
        network = build(model, seed=train.seed)
        compile_model(network, model, train_data.masks)
    if model.show_summary:
        network.summary(print_fn=lambda line, **_: _logger.info(line))
    initial_epoch = int(state["epoch"]) + 1 if state else 0
    train_batches = Batches(train_data, train.batch_size, shuffle=True,
                            augment_strength=train.augmentation_strength if train.augmentation else 0.0,
                            seed=train.seed, steps=train.steps_per_epoch, start_epoch=initial_epoch,
                            class_sampling=train.class_sampling)

    best = cb.BestCheckpoint(outputs.model_path, train.patience, save_share=train.save_overhead,
                             flush_only=not outputs.model_at_end)
    if state:
        best_weights = None
        if outputs.model_path is not None and outputs.model_path.exists():
            best_weights = keras.models.load_model(outputs.model_path, compile=False).get_weights()
        best.restore(state, best_weights)
    timer = cb.EpochTimer()
    nonfinite = cb.StopOnNonFinite()
    callbacks: list[keras.callbacks.Callback] = [timer, cb.LearningRateLog(), nonfinite, best]
    if train.learning_rate_reducer:
        callbacks.append(keras.callbacks.ReduceLROnPlateau(
            monitor="val_loss", mode="min", factor=train.reducer_factor,
            patience=train.reducer_patience, min_lr=train.reducer_min_lr, verbose=0))
    if outputs.log_csv is not None:
        callbacks.append(keras.callbacks.CSVLogger(str(outputs.log_csv), append=bool(state)))
    if outputs.curves_png is not None:
        curves = cb.LearningCurves(outputs.curves_png, save_share=train.save_overhead)
        curves.history = {k: list(v) for k, v in state.get("history", {}).items()}
        callbacks.append(curves)
    if outputs.infer_dir is not None and outputs.num_infer_images > 0:
        chosen = list(range(min(outputs.num_infer_images, len(valid_data))))
        callbacks.append(cb.EpochChangeInfer(valid_data.subset(chosen), outputs.infer_dir, palette or []))
    callbacks.extend(extra_callbacks)
    history_so_far: dict[str, list[float]] = {k: list(v) for k, v in state.get("history", {}).items()}
    if checkpoint_dir is not None:
        callbacks.append(cb.EpochCheckpoint(checkpoint_dir, best, history_so_far, on_checkpoint,
                                            save_share=train.save_overhead))
    if verbose == "auto":
        verbose = 1 if sys.stdout.isatty() else 2
    # Validation goes as uint8 arrays too; the hook one-hot encodes it on the device.
    with device_inputs(network, model.num_classes):
        history = network.fit(iter(train_batches), steps_per_epoch=train_batches.steps,
                              validation_data=(valid_data.images, valid_data.masks),
                              validation_batch_size=train.batch_size, shuffle=False, epochs=epochs or train.epochs,
                              initial_epoch=initial_epoch, callbacks=callbacks, verbose=verbose)
    logs = {k: [float(v) for v in vs] for k, vs in history.history.items()}
    if checkpoint_dir is not None:
        logs = {k: list(v) for k, v in history_so_far.items()}
    epochs_run = len(logs.get("loss", []))
    reasons = [c.stop_reason for c in callbacks if getattr(c, "stop_reason", None)]
    return TrainResult(
        model=network, history=logs, best_epoch=best.best_epoch + 1,
        best_val_dice=best.best_dice if best.best_epoch >= 0 else float("nan"),
        epochs_run=epochs_run, stop_reason=reasons[0] if reasons else "max_epochs",
        seconds_per_epoch=[round(s, 3) for s in timer.seconds],
    )


def train(config: Config, *, data: tuple[SliceSet, SliceSet] | None = None,
          verbose: int | str = "auto") -> TrainResult:
    """``flexunet train``: read the train and valid folders (unless given), fit, write every
    output."""
    train_data, valid_data = data or (load_split(config, "train"), load_split(config, "valid"))
    _logger.info("train %d slices, valid %d slices, input %s", len(train_data), len(valid_data),
                 config.model.input_shape)
    t = config.train
    for folder in (t.model_dir, t.eval_dir) + ((t.epoch_change_infer_dir,) if t.epoch_change_infer else ()):
        folder.mkdir(parents=True, exist_ok=True)
    outputs = TrainOutputs(
        model_path=t.model_dir / MODEL_FILE, log_csv=t.eval_dir / LOG_FILE,
        curves_png=t.eval_dir / CURVES_FILE,
        infer_dir=t.epoch_change_infer_dir if t.epoch_change_infer else None,
        num_infer_images=t.num_infer_images)
    result = fit(config.model, t, train_data, valid_data, outputs=outputs,
                 palette=config.mask.palette(max(2, config.model.num_classes)), verbose=verbose)
    summary = {**result.summary(), "train_slices": len(train_data), "valid_slices": len(valid_data)}
    (t.eval_dir / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return result

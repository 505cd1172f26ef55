"""One trial: sample a config, reject it if infeasible, train it with pruning, keep its
artifacts, and return validation foreground Dice (plus the second objective, if any)."""

from __future__ import annotations

import contextlib
import logging
import math
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
import optuna
from optuna.artifacts import upload_artifact

from flexunet import config as cfg
from flexunet import plots, postprocess
from flexunet.data.dataset import SliceSet, load_split
from flexunet.model import estimate_cost
from flexunet.errors import ConfigError
from flexunet.infer import latency_ms
from flexunet.train import TrainOutputs, TrainResult, fit
from search.store.artifacts import Store
from search.store import _internals
from search.trial import cv, lifecycle
from search.trial.training import (PruningReporter, TrainingRecord, record_training, restore_resume_point,
                                    save_resume_point)
from search import paths
from search import keys as k
from search.spec import space as sp
from search.trial.lifecycle import Interrupted, TrialFailure
from search.paths import CURVES_FILE, LOG_FILE, MODEL_FILE, OVERLAYS_FILE
from search.spec.study_file import StudySpec

_logger = logging.getLogger(__name__)
__all__ = ["Interrupted", "Objective", "TrialFailure"]






@dataclass
class Objective:
    """Callable objective for ``study.optimize``; holds the decoded data between trials."""

    spec: StudySpec
    base: cfg.Config
    image_size: int
    artifacts: Store  # a folder or a bucket (search.store.artifacts)
    space: tuple = field(default_factory=tuple)
    dataset_dir: Path | None = None  # the folder of the dataset's config, where folds.csv may be
    _data: dict[int, tuple[SliceSet, SliceSet]] = field(default_factory=dict)
    _folds: cv.FoldDataCache = field(default_factory=dict)

    def data(self, config: cfg.Config) -> tuple[SliceSet, SliceSet]:
        key = config.model.input_shape
        if key not in self._data:
            self._data = {key: (load_split(config, "train"), load_split(config, "valid"))}
        return self._data[key]

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, float]:
        """Train one trial; its life (start, infeasible, fail, interrupt) is search.trial.lifecycle's."""
        lifecycle.start(trial)
        baseline = bool(trial.user_attrs.get(k.BASELINE))
        values = sp.suggest(trial, self.space, sp.baseline_unsampled(self.space, self.image_size) if baseline else None)
        try:
            config = sp.trial_config(self.base, self.spec, self.image_size, values, baseline=baseline)
            cost = estimate_cost(config.model)
        except (ConfigError, ValueError) as exc:  # the config's checks or the model's shapes
            raise lifecycle.infeasible(trial, str(exc)) from None
        trial.set_user_attr(k.PARAMS, cost.params)
        trial.set_user_attr(k.GFLOPS, round(cost.flops / 1e9, 3))
        trial.set_user_attr(k.SETTINGS, _settings(config))
        reason = sp.infeasible(config, self.spec.budget, baseline=baseline)
        if reason:
            raise lifecycle.infeasible(trial, reason)
        with training_memory(trial):
            return self._train(trial, config, cost.params)

    @staticmethod
    def _fail(trial: optuna.Trial, reason: str) -> TrialFailure:
        return lifecycle.failure(trial, reason)

    def _save_resume_point(self, trial: optuna.Trial, folder: Path, epoch: int) -> None:
        save_resume_point(self.artifacts, trial, folder, epoch)

    def _restore_resume_point(self, trial: optuna.Trial, folder: Path) -> bool:
        return restore_resume_point(self.artifacts, trial, folder)

    def _train_folds(self, trial: optuna.Trial, config: cfg.Config, params: int) -> float | tuple[float, float]:
        """A cross-validated trial (search/trial/cv.py): its value is the pooled out-of-fold Dice."""
        folds_file = (self.dataset_dir or Path(".")) / paths.FOLDS_FILE
        seed = self.spec.prepare.seed if self.spec.prepare else 0
        data = cv.cached_fold_data(self._folds, config, self.spec.folds, folds_file, seed)
        multi = self.spec.second_objective is not None
        result = cv.train_folds(trial, config, data, self.artifacts, prune=not multi)
        if result.failure:
            raise self._fail(trial, result.failure)
        if not multi:
            return result.pooled_dice
        second = params if self.spec.second_objective == "params" else latency_ms(result.model, config)
        trial.set_user_attr(self.spec.second_objective, second)
        return result.pooled_dice, float(second)

    def _train(self, trial: optuna.Trial, config: cfg.Config, params: int) -> float | tuple[float, float]:
        if self.spec.cross_validated:
            return self._train_folds(trial, config, params)
        train_data, valid_data = self.data(config)
        multi = self.spec.second_objective is not None
        reporter = PruningReporter(trial, prune=not multi)  # Optuna prunes single-objective studies only
        with tempfile.TemporaryDirectory(prefix=f"trial-{trial.number}-") as tmp:
            work = Path(tmp)
            # The final best model and the learning-curve PNG are written once, after training,
            # by _keep_artifacts; during training the model file only follows the resume points.
            outputs = TrainOutputs(model_path=work / MODEL_FILE, log_csv=work / LOG_FILE, model_at_end=False)
            resume = self._restore_resume_point(trial, work)
            started = time.perf_counter()
            result = fit(config.model, config.train, train_data, valid_data, outputs=outputs,
                         extra_callbacks=[reporter], verbose=0, checkpoint_dir=work, resume=resume,
                         on_checkpoint=lambda folder, epoch: self._save_resume_point(trial, folder, epoch))
            record_training(trial, TrainingRecord.of_fit(
                seconds=time.perf_counter() - started, epochs_run=result.epochs_run, best_epoch=result.best_epoch,
                stop_reason=result.stop_reason, seconds_per_epoch=result.seconds_per_epoch,
                best_val_dice=result.best_val_dice))
            best = result.best_val_dice
            if result.epochs_run and result.best_epoch:
                self._keep_artifacts(trial, result, valid_data, config, work)
            if result.stop_reason == "pruned":
                raise optuna.TrialPruned(f"pruned at epoch {result.epochs_run}")
            if result.stop_reason.startswith("non-finite") or not math.isfinite(best):
                raise self._fail(trial, result.stop_reason)
            if not multi:
                return best
            second = params if self.spec.second_objective == "params" else latency_ms(result.model, config)
            trial.set_user_attr(self.spec.second_objective, second)
            return best, float(second)

    def _keep_artifacts(self, trial: optuna.Trial, result: TrainResult, valid_data: SliceSet, config: cfg.Config,
                        work: Path) -> None:
        """Once, when a trial's training has ended (completed, early-stopped or pruned): write
        its best model (``result.model`` holds the best epoch's weights), draw its learning
        curves (the whole history, a resumed run's earlier epochs included) and validation
        overlays, and upload them with the training log.

        Done here rather than in the training loop: nobody sees these files before the upload,
        and the PNG alone costs about half a 64 px CPU epoch to draw (bench/throughput.py). An
        interrupted or killed trial uploads nothing; its retry resumes from its last checkpoint
        (which carries the best model so far and the history) and writes them at its end."""
        result.model.save(work / MODEL_FILE)
        trial.set_user_attr(k.CLASS_DICE, _class_dice(result.model, valid_data, config))
        plots.learning_curves(result.history, work / CURVES_FILE)
        self._overlays(result.model, valid_data, config, work / OVERLAYS_FILE)
        for name in (MODEL_FILE, LOG_FILE, CURVES_FILE, OVERLAYS_FILE):
            if (work / name).exists():
                upload_artifact(artifact_store=self.artifacts, file_path=str(work / name), study_or_trial=trial)

    @staticmethod
    def _overlays(network: Any, data: SliceSet, config: cfg.Config, path: Path) -> None:
        chosen = data.subset(list(range(min(4, len(data)))))
        # One eager call for four slices: Keras' predict would first trace a predict function
        # for this model (0.2-0.3 CPU s at 64 px, bench/throughput.py's wrap-up), used once.
        probabilities = keras.ops.convert_to_numpy(network(chosen.images.astype(np.float32), training=False))
        pred = postprocess.apply(probabilities, postprocess.PostProcessing())
        strip = plots.comparison_strip(chosen.images, [("ground truth", chosen.masks), ("prediction", pred)],
                                       config.mask.palette(max(2, config.model.num_classes)), chosen.names)
        from flexunet.data.io import write_png

        write_png(path, strip)






@contextlib.contextmanager
def training_memory(trial: optuna.Trial) -> Iterator[None]:
    """Around one trial's training: out of memory fails the trial (FAIL with the reason), and
    what the training left in the process is released when it ends, however it ends."""
    custom_gradients = _custom_gradient_names()
    try:
        yield
    except MemoryError as exc:
        raise lifecycle.failure(trial, f"out of memory: {exc}") from None
    except Exception as exc:
        if _out_of_device_memory(exc):
            raise lifecycle.failure(trial, f"out of memory: {(str(exc).strip().splitlines() or [''])[0]}") from None
        raise
    finally:
        # Keras keeps every model built in this process unless the session is cleared. The
        # trial's gradient functions go first, so that the one garbage collection that
        # clear_session runs frees their graphs too (a second one cost ~0.2 CPU s a trial).
        _forget_custom_gradients(custom_gradients)
        keras.backend.clear_session()


def _class_dice(network: Any, data: SliceSet, config: cfg.Config) -> list[float | None]:
    """Each class's validation Dice of the best epoch's model (the single split's figure)."""
    # Eager calls, as for the overlays: a predict function would be traced for one use.
    parts = [keras.ops.convert_to_numpy(network(data.images[i:i + 8].astype(np.float32), training=False))
             for i in range(0, len(data), 8)]
    assert data.masks is not None
    return cv.class_dice(np.concatenate(parts), data.masks, config.model.num_classes)


def _out_of_device_memory(exc: BaseException) -> bool:
    # TensorFlow raises ResourceExhaustedError; JAX an XlaRuntimeError whose message starts so.
    return type(exc).__name__ == "ResourceExhaustedError" or str(exc).lstrip().startswith("RESOURCE_EXHAUSTED")


def _custom_gradient_names() -> set[str]:
    registry = _internals.gradient_registry()
    return set() if registry is None else {k for k in registry if k.startswith("CustomGradient-")}


def _forget_custom_gradients(before: set[str]) -> None:
    """Drop the gradient functions TensorFlow registered during a trial.

    Every trace of a ``tf.custom_gradient`` function in a graph (Keras' TensorFlow trainer
    traces two per ``fit``, through ``ReplicaContext.all_reduce``) adds a ``CustomGradient-N``
    entry to a process-wide registry that is never emptied, and each entry keeps its whole
    training graph alive: about 45-60 MB per trial of a U-Net, which ``clear_session`` does not
    release (bench/memory.py). Once the trial's model is gone nothing uses them.
    """
    registry = _internals.gradient_registry()
    if registry is None:
        return
    for name in [k for k in registry if k.startswith("CustomGradient-") and k not in before]:
        del registry[name]


def _settings(config: cfg.Config) -> dict[str, Any]:
    """Every model and training setting of the trial, JSON-able, without paths."""
    out: dict[str, Any] = {}
    for section in ("model", "train"):
        for key, value in vars(getattr(config, section)).items():
            if isinstance(value, Path) or value is None:
                continue
            out[key] = list(value) if isinstance(value, tuple) else value
    return out

"""Cross-validated trials: one model per fold, scored by one Dice pooled over every
out-of-fold slice, pruned by fold and by epoch, resumable with its finished folds kept.

A study with ``[study] folds = K`` validates each trial on K patient folds of the dataset's
development slices (its train and valid folders; the test folder stays out of every fold, for
the export to be scored on). Which fold validates a slice comes from ``folds.csv`` beside the
dataset's config (columns ``name,fold``) or, without that file, from the slices' patients
(:func:`flexunet.data.split.cv_folds`, seeded).

Pruning. Fold k, epoch e (0-based) reports at step ``k * max_epochs + e`` the mean, over the
folds finished so far and the current one, of each fold's best validation foreground Dice.
Two trials at the same step have trained the same folds for the same epochs (a fold that
stopped early holds its best Dice for its remaining steps), so any Optuna pruner that compares
trials step by step applies; the study's default is
``SuccessiveHalvingPruner``. ``WilcoxonPruner`` was the other candidate: it tests paired
per-fold values, but with K = 2..5 folds after one fold there is one pair, and a signed-rank
test on one pair cannot reach p < 0.1, so it could never stop a trial inside its first fold,
nor between epochs. Successive halving stops a weak trial at a rung within its first fold
(``min_resource`` counts combined steps) and runs asynchronously across workers.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
import optuna
from optuna.artifacts import upload_artifact

from flexunet import config as cfg
from flexunet import metrics as m
from flexunet.data.dataset import SliceSet, load_split
from flexunet.model import build
from flexunet.train import TrainOutputs, compile_model, fit
from search.store.artifacts import Store
from search import keys, paths
from search.spec.folds import fold_of
from search.trial import training
from search.trial.training import CHECKPOINT_FILES, PruningReporter, TrainingRecord, record_training

_logger = logging.getLogger(__name__)
_STATE = "cv_state.json"  # in a resume archive: the finished folds and the fold in progress
_CURRENT = "current/"  # in a resume archive: the checkpoint of the fold in progress
_FINISHED = "finished/"  # in a resume archive: finished folds' models, logs and predictions


@dataclass(frozen=True)
class FoldData:
    """The development slices (a dataset's train and valid folders) and the fold that
    validates each one."""

    data: SliceSet
    fold_of: np.ndarray  # (N,) int, 0..folds-1
    folds: int

    def split(self, k: int) -> tuple[SliceSet, SliceSet]:
        """(train, valid) of fold k: fold k validates, every other fold trains."""
        return (self.data.subset(np.flatnonzero(self.fold_of != k).tolist()),
                self.data.subset(np.flatnonzero(self.fold_of == k).tolist()))

    def valid_indices(self, k: int) -> np.ndarray:
        return np.flatnonzero(self.fold_of == k)


def load_fold_data(config: cfg.Config, folds: int, folds_file: Path, seed: int = 0) -> FoldData:
    """The development pool of ``config``'s dataset split into ``folds`` folds: by
    ``folds_file`` if it exists, else by patient.

    >>> from flexunet import config as cfg  # doctest: +SKIP
    >>> fd = load_fold_data(cfg.load("runs/x/data/train_eval_infer.config"), 3, Path("none"))  # doctest: +SKIP
    >>> sorted(set(fd.fold_of.tolist()))  # doctest: +SKIP
    [0, 1, 2]
    """
    pool = _concat(load_split(config, "train"), load_split(config, "valid"))
    assert pool.masks is not None
    return FoldData(pool, fold_of(pool.names, pool.masks, config, folds, folds_file, seed), folds)


def _concat(a: SliceSet, b: SliceSet) -> SliceSet:
    assert a.masks is not None and b.masks is not None
    return SliceSet(np.concatenate([a.images, b.images]), np.concatenate([a.masks, b.masks]),
                    a.names + b.names, a.original_sizes + b.original_sizes)


def pooled_foreground_dice(probabilities: np.ndarray, masks: np.ndarray, num_classes: int) -> float:
    """One global foreground Dice over every slice, over the classes present in them
    (flexunet.metrics' definition)."""
    return float(m.foreground_dice_of(m.to_classes(probabilities), masks, m.num_labels(num_classes)))


def class_dice(probabilities: np.ndarray, masks: np.ndarray, num_classes: int) -> list[float | None]:
    """Each foreground class's Dice pooled over every slice; None where the class is absent."""
    tp, fp, fn = m.confusion(m.to_classes(probabilities), masks, m.num_labels(num_classes))
    return [None if math.isnan(d) else float(d) for d in m.dice_score(tp, fp, fn)[1:]]




@dataclass
class _Fold:
    """A finished fold, as kept in the resume archive."""

    fold: int
    dice: float
    epochs_run: int
    best_epoch: int
    stop_reason: str
    seconds: float
    probabilities: np.ndarray = field(repr=False)  # (n, H, W, C) float16 on the fold's valid slices

    def meta(self) -> dict[str, Any]:
        return {"fold": self.fold, "dice": self.dice, keys.EPOCHS_RUN: self.epochs_run,
                keys.BEST_EPOCH: self.best_epoch, keys.STOP_REASON: self.stop_reason, "seconds": self.seconds}


@dataclass
class CVResult:
    """What a finished cross-validated trial gives back to the objective."""

    pooled_dice: float
    fold_dice: list[float]
    model: Any  # the last fold's best model (for a latency objective)
    failure: str | None = None  # non-finite loss or no finite Dice: the trial fails


@dataclass
class CrossValidation:
    """Trains one trial's K folds in order; ``artifacts`` keeps its models and resume point."""

    trial: optuna.Trial
    config: cfg.Config
    data: FoldData
    artifacts: Store  # a folder or a bucket (search.store.artifacts)
    prune: bool = True
    _finished: dict[int, _Fold] = field(default_factory=dict)
    _network: Any = None
    _initial: list[np.ndarray] = field(default_factory=list)

    def run(self) -> CVResult:
        """Train every fold not finished yet; raise ``optuna.TrialPruned`` when pruned."""
        trial, k_total = self.trial, self.data.folds
        trial.set_user_attr(keys.FOLDS, k_total)
        max_epochs = self.config.train.epochs
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix=f"trial-{trial.number}-cv-") as tmp:
            work = Path(tmp)
            resume_fold, resume_best = self._restore(work)
            model = None
            for k in range(k_total):
                if k in self._finished:
                    continue
                trial.set_user_attr(keys.FOLD, k)
                folder = work / f"fold{k}"
                folder.mkdir(exist_ok=True)
                resume = k == resume_fold
                if not resume:
                    for name in CHECKPOINT_FILES:
                        (folder / name).unlink(missing_ok=True)
                train_data, valid_data = self.data.split(k)
                # Progress every epoch (progress_seconds 0), as a fold's epochs are few.
                reporter = PruningReporter(trial, prune=self.prune, progress_seconds=0, fold=k, max_epochs=max_epochs,
                                           finished=[f.dice for f in self._sorted()],
                                           best=resume_best if resume else -math.inf)
                outputs = TrainOutputs(model_path=folder / paths.MODEL_FILE, log_csv=folder / paths.LOG_FILE)
                fold_started = time.perf_counter()
                result = fit(self.config.model, self.config.train, train_data, valid_data, outputs=outputs,
                             extra_callbacks=[reporter], verbose=0, checkpoint_dir=folder, resume=resume,
                             network=None if resume else self._fresh_network(),
                             on_checkpoint=lambda f, epoch, k=k, r=reporter: self._save(work, k, r.best, epoch))
                if result.stop_reason.startswith("non-finite") or not math.isfinite(result.best_val_dice):
                    return CVResult(float("nan"), [f.dice for f in self._sorted()], result.model,
                                    failure=f"fold {k + 1}: {result.stop_reason}")
                reporter.hold(result.epochs_run)
                probabilities = result.model.predict(valid_data.images.astype(np.float32), batch_size=4,
                                                     verbose=0).astype(np.float16)
                assert valid_data.masks is not None
                fold = _Fold(k, pooled_foreground_dice(probabilities, valid_data.masks, self.config.model.num_classes),
                             result.epochs_run, result.best_epoch, reporter.stop_reason or result.stop_reason,
                             round(time.perf_counter() - fold_started, 1), probabilities)
                self._finish(work, fold, folder)
                model = result.model
                if reporter.stop_reason:
                    self._summarise(started)
                    raise optuna.TrialPruned(reporter.stop_reason)
            self._summarise(started)
            if model is None:  # every fold was finished before a retry: the last one's model
                model = keras.models.load_model(work / "done" / paths.fold_model(k_total - 1), compile=False)
            return self._pooled(work, model)

    def _fresh_network(self) -> Any:
        """The trial's model as first built, compiled: built once and reset for every later
        fold, because building and tracing a new one costs 5-40 s per fold on a CPU, often more
        than its epochs (the seed is the same, so the weights are those a new build would get)."""
        if self._network is None:
            keras.utils.set_random_seed(self.config.train.seed)
            self._network = build(self.config.model)
            # One compiled model serves every fold: its class weights (if any) come from the
            # whole development pool's masks, a label statistic, not an image.
            compile_model(self._network, self.config.model, self.data.data.masks)
            self._initial = self._network.get_weights()
            return self._network
        self._network.set_weights(self._initial)
        optimizer = self._network.optimizer
        for variable in optimizer.variables:  # iterations, moments and the learning rate
            variable.assign(np.zeros(variable.shape, variable.dtype))
        optimizer.learning_rate.assign(self.config.model.learning_rate)
        return self._network

    def _sorted(self) -> list[_Fold]:
        return [self._finished[k] for k in sorted(self._finished)]

    def _finish(self, work: Path, fold: _Fold, folder: Path) -> None:
        """Keep a finished fold: its artifacts, its Dice in the user attrs, and a resume point
        that holds it (a retry starts at the next fold)."""
        self._finished[fold.fold] = fold
        done = work / "done"
        done.mkdir(exist_ok=True)
        for source, name in ((paths.MODEL_FILE, paths.fold_model(fold.fold)), (paths.LOG_FILE, paths.fold_log(fold.fold))):
            if (folder / source).exists():
                shutil.copyfile(folder / source, done / name)
        np.save(done / paths.fold_predictions(fold.fold), fold.probabilities)
        self._upload_fold(done, fold.fold)
        self.trial.set_user_attr(keys.FOLD_DICE, [f.dice for f in self._sorted()])
        self._save(work, None, -math.inf, None)

    def _upload_fold(self, done: Path, k: int) -> None:
        for name in (paths.fold_model(k), paths.fold_log(k)):
            if (done / name).exists():
                upload_artifact(artifact_store=self.artifacts, file_path=str(done / name), study_or_trial=self.trial)

    def _summarise(self, started: float) -> None:
        folds = self._sorted()
        last = folds[-1].stop_reason if folds else "max_epochs"
        epochs = sum(f.epochs_run for f in folds)
        record_training(self.trial, TrainingRecord(
            seconds=time.perf_counter() - started, epochs_run=epochs,
            best_epoch=folds[-1].best_epoch if folds else 0,
            stop_reason=last if last.startswith("pruned") else ("folds_done" if len(folds) == self.data.folds else last),
            seconds_per_epoch=round(sum(f.seconds for f in folds) / epochs, 2) if epochs else None,
            fold_epochs_run=[f.epochs_run for f in folds], fold_best_epoch=[f.best_epoch for f in folds]))

    def _pooled(self, work: Path, model: Any) -> CVResult:
        folds = self._sorted()
        order = np.concatenate([self.data.valid_indices(f.fold) for f in folds])
        probabilities = np.concatenate([f.probabilities for f in folds])
        assert self.data.data.masks is not None
        masks = self.data.data.masks[order].astype(np.uint8)
        pooled = pooled_foreground_dice(probabilities, masks, self.config.model.num_classes)
        path = work / paths.OOF_PREDICTIONS
        np.savez_compressed(path, probabilities=probabilities, masks=masks,
                            names=np.array([self.data.data.names[i] for i in order]),
                            folds=np.concatenate([np.full(len(self.data.valid_indices(f.fold)), f.fold, np.int64)
                                                  for f in folds]))
        upload_artifact(artifact_store=self.artifacts, file_path=str(path), study_or_trial=self.trial)
        self.trial.set_user_attr(keys.POOLED_DICE, pooled)
        self.trial.set_user_attr(keys.CLASS_DICE, class_dice(probabilities, masks, self.config.model.num_classes))
        self.trial.set_user_attr(keys.BEST_VAL_DICE, pooled)
        return CVResult(pooled, [f.dice for f in folds], model)

    # --- resume point: one archive per trial, with the finished folds --------------------

    def _save(self, work: Path, fold: int | None, best: float, epoch: int | None) -> None:
        """Write the resume archive: every finished fold, and fold ``fold``'s checkpoint after
        ``epoch`` (0-based) if a fold is in progress."""
        state = {"folds": self.data.folds, "finished": [f.meta() for f in self._sorted()],
                 "in_progress": fold, "best": best if math.isfinite(best) else None}
        done = work / "done"
        members = [(done / name, _FINISHED + name) for f in self._sorted() for name in _fold_files(f.fold)]
        if fold is not None:
            members += [(work / f"fold{fold}" / name, _CURRENT + name) for name in CHECKPOINT_FILES]
        training.write_archive(self.artifacts, self.trial, members, texts={_STATE: json.dumps(state)},
                               epoch=epoch, fold=fold)

    def _restore(self, work: Path) -> tuple[int | None, float]:
        """Load the finished folds and the fold in progress from the trial's resume archive
        (a retry carries the attribute naming it); (fold to resume, its best Dice so far)."""
        def unpack(archive: zipfile.ZipFile) -> dict[str, Any]:
            state = json.loads(archive.read(_STATE))
            if state.get("folds") != self.data.folds:
                raise ValueError(f"it has {state.get('folds')} folds, the study {self.data.folds}")
            allowed = ({_STATE} | {_CURRENT + n for n in CHECKPOINT_FILES}
                       | {_FINISHED + n for f in state["finished"] for n in _fold_files(f["fold"])})
            names = set(archive.namelist())
            if names - allowed:
                raise ValueError(f"unexpected members {sorted(names - allowed)}")
            archive.extractall(work / "archive")
            return state

        state = training.read_archive(self.artifacts, self.trial, unpack)
        if state is None:
            return None, -math.inf
        done = work / "done"
        done.mkdir(exist_ok=True)
        for meta in state["finished"]:
            k = int(meta["fold"])
            for name in _fold_files(k):
                source = work / "archive" / _FINISHED / name
                if source.exists():
                    shutil.move(source, done / name)
            probabilities = np.load(done / paths.fold_predictions(k), allow_pickle=False)
            self._finished[k] = _Fold(k, float(meta["dice"]), int(meta[keys.EPOCHS_RUN]), int(meta[keys.BEST_EPOCH]),
                                      str(meta[keys.STOP_REASON]), float(meta["seconds"]), probabilities)
            self._upload_fold(done, k)  # a retry is a new trial: it carries the kept folds' artifacts
        self.trial.set_user_attr(keys.FOLD_DICE, [f.dice for f in self._sorted()])
        fold = state.get("in_progress")
        current = work / "archive" / _CURRENT
        resume_fold = None
        if fold is not None and (current / paths.LAST_CHECKPOINT).exists() and (current / paths.TRAIN_STATE).exists():
            resume_fold = int(fold)
            (work / f"fold{resume_fold}").mkdir(exist_ok=True)
            for name in CHECKPOINT_FILES:
                if (current / name).exists():
                    shutil.move(current / name, work / f"fold{resume_fold}" / name)
            training.mark_resumed(self.trial)
        first_open = next((k for k in range(self.data.folds) if k not in self._finished), None)
        self.trial.set_user_attr(keys.RESUMED_FROM_FOLD, resume_fold if resume_fold is not None else first_open)
        best = state.get("best")
        return resume_fold, float(best) if best is not None else -math.inf


def _fold_files(k: int) -> tuple[str, str, str]:
    """What a finished fold keeps in the resume archive: its model, its log, its predictions."""
    return paths.fold_model(k), paths.fold_log(k), paths.fold_predictions(k)


def train_folds(trial: optuna.Trial, config: cfg.Config, data: FoldData, artifacts: Store,
                prune: bool = True) -> CVResult:
    """Cross-validate one trial's config on ``data``; see :class:`CrossValidation`."""
    return CrossValidation(trial, config, data, artifacts, prune).run()


FoldDataCache = dict[tuple[int, int, int], FoldData]


def cached_fold_data(cache: FoldDataCache, config: cfg.Config, folds: int, folds_file: Path,
                     seed: int) -> FoldData:
    """The fold data of ``config``'s input shape, decoded once per worker (one shape kept)."""
    key = (*config.model.input_shape[:2], folds)
    if key not in cache:
        cache.clear()
        cache[key] = load_fold_data(config, folds, folds_file, seed)
    return cache[key]


"""What every kind of trial's training shares: its resume archive, its pruning reports and the
attributes that record how its training went.

A single-split trial (:mod:`search.trial.objective`), a cross-validated one
(:mod:`search.trial.cv`) and a refit model (:mod:`search.trial.refit`) all train with
``flexunet.train.fit``; they write their results and their resume points through this module
only, so that a retry, ``flexunet search status`` and the export read one format.

- **Resume archive**: one artifact per trial (:func:`artifact_id`), a ZIP of checkpoint files
  rewritten after the epochs ``fit`` checkpoints; the trial's ``resume_artifact`` attribute
  names it, and a retry (a copy of the trial's user attributes) reads it back.
- **Pruning**: :class:`PruningReporter` reports each epoch's validation Dice (single split) or
  the running cross-validated Dice (a fold of a K-fold trial) and stops the fit when the
  pruner says so.
- **Training result**: :func:`record_training` writes ``train_seconds``, ``epochs_run``,
  ``best_epoch``, ``stop_reason``, ``seconds_per_epoch`` and ``best_val_foreground_dice``.

Example (an in-memory study and a folder store; a retry of the trial finds its archive)::

    >>> import optuna, tempfile
    >>> from pathlib import Path
    >>> from search.store.artifacts import Location, open_store
    >>> tmp = Path(tempfile.mkdtemp())
    >>> store = open_store(Location(folder=tmp / "artifacts"), create=True)
    >>> study = optuna.create_study(study_name="demo")
    >>> trial = study.ask()
    >>> work = tmp / "work"; work.mkdir()
    >>> for name in CHECKPOINT_FILES:
    ...     _ = (work / name).write_text(name)
    >>> save_resume_point(store, trial, work, epoch=2)
    >>> trial.user_attrs[k.RESUME_EPOCH], trial.user_attrs[k.RESUME_ARTIFACT] == artifact_id(trial)
    (3, True)
    >>> again = tmp / "again"; again.mkdir()
    >>> restore_resume_point(store, trial, again), sorted(p.name for p in again.iterdir()) == sorted(CHECKPOINT_FILES)
    (True, True)
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import time
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import keras
import numpy as np
import optuna

from flexunet.callbacks import MONITOR
from search import keys as k
from search import paths
from search.store.artifacts import Store

_logger = logging.getLogger(__name__)
T = TypeVar("T")

# What a single-split checkpoint holds: the best model so far, the log, and fit's own resume
# files (the last epoch's model and the loop's state).
CHECKPOINT_FILES = (paths.MODEL_FILE, paths.LOG_FILE, paths.LAST_CHECKPOINT, paths.TRAIN_STATE)
PROGRESS_SECONDS = 2.0  # the most often a trial's progress attrs are written (they are for people)


# --- the resume archive -------------------------------------------------------------------------


def artifact_id(trial: optuna.Trial) -> str:
    """The id of the trial's resume archive: one per study and trial number, so that each
    write replaces the last."""
    study_key = hashlib.sha1(trial.study.study_name.encode()).hexdigest()[:12]
    return f"resume-{study_key}-{trial.number}"


def write_archive(artifacts: Store, trial: optuna.Trial, members: Iterable[tuple[Path, str]], *,
                  texts: dict[str, str] | None = None, epoch: int | None = None, fold: int | None = None) -> str:
    """Write the trial's resume archive: each existing file of ``members`` (path, name in the
    archive) and each text of ``texts``; record where it is and, after an epoch (0-based
    ``epoch``, of ``fold`` in a cross-validated trial), how far it got."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for name, text in (texts or {}).items():
            archive.writestr(name, text)
        for path, name in members:
            if path.exists():
                archive.write(path, name)
    buffer.seek(0)
    archive_id = artifact_id(trial)
    artifacts.write(archive_id, buffer)
    if trial.user_attrs.get(k.RESUME_ARTIFACT) != archive_id:
        trial.set_user_attr(k.RESUME_ARTIFACT, archive_id)
    if epoch is not None:
        if fold is not None:
            trial.set_user_attr(k.RESUME_FOLD, fold)
        trial.set_user_attr(k.RESUME_EPOCH, epoch + 1)
    return archive_id


def read_archive(artifacts: Store, trial: optuna.Trial, use: Callable[[zipfile.ZipFile], T]) -> T | None:
    """Hand the trial's resume archive (a retry carries the attribute naming it) to ``use``,
    which checks and unpacks it; None when there is none, or it cannot be read or ``use``
    refuses it (the trial then starts afresh, with a warning)."""
    archive_id = trial.user_attrs.get(k.RESUME_ARTIFACT)
    if not archive_id:
        return None
    try:
        with artifacts.open_reader(archive_id) as reader:
            data = reader.read()
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            return use(archive)
    except Exception as exc:  # a missing or damaged archive: start again from scratch
        _logger.warning("trial %d: cannot resume from %s (%s); starting afresh", trial.number, archive_id, exc)
        return None


def mark_resumed(trial: optuna.Trial) -> None:
    """Record that this trial resumed from the epoch its archive held."""
    trial.set_user_attr(k.RESUMED_FROM_EPOCH, trial.user_attrs.get(k.RESUME_EPOCH))


def save_resume_point(artifacts: Store, trial: optuna.Trial, folder: Path, epoch: int) -> None:
    """Keep a single fit's checkpoint (``folder``, after 0-based ``epoch``) as the trial's
    resume archive, so that a retry of this trial (another worker, after this one died)
    starts from here."""
    write_archive(artifacts, trial, [(folder / name, name) for name in CHECKPOINT_FILES], epoch=epoch)


def restore_resume_point(artifacts: Store, trial: optuna.Trial, folder: Path) -> bool:
    """Unpack the trial's single-fit checkpoint into ``folder``; False when there is none or it
    cannot be read (the trial starts afresh)."""
    def unpack(archive: zipfile.ZipFile) -> bool:
        names = set(archive.namelist())
        if not {paths.LAST_CHECKPOINT, paths.TRAIN_STATE} <= names or names - set(CHECKPOINT_FILES):
            raise ValueError(f"unexpected members {sorted(names)}")
        archive.extractall(folder)
        return True

    if read_archive(artifacts, trial, unpack) is None:
        return False
    mark_resumed(trial)
    return True


# --- pruning ------------------------------------------------------------------------------------


class PruningReporter(keras.callbacks.Callback):
    """Report validation foreground Dice to Optuna every epoch and stop when the pruner says so.

    Single split (``fold`` None): the epoch's value at step ``epoch``. A fold of a K-fold trial:
    the mean, over the folds finished (``finished``) and this one's best so far, at step
    ``fold * max_epochs + epoch`` (search/trial/cv.py says why).

    Unlike ``optuna_integration.KerasPruningCallback``, a missing metric is an error, not a
    warning (a misspelt monitor there silently never prunes), and the model stops cleanly so
    that the trial's artifacts can still be saved before it is marked PRUNED. The progress that
    ``flexunet search status`` shows (epoch, last validation Dice) is written after the first
    epoch and then at most every ``progress_seconds``: each is a storage write, and on a GPU an
    epoch of a small data set takes a fraction of a second. The report and the pruner's
    question are asked every epoch.
    """

    def __init__(self, trial: optuna.Trial, monitor: str = MONITOR, prune: bool = True,
                 progress_seconds: float = PROGRESS_SECONDS, *, fold: int | None = None, max_epochs: int = 0,
                 finished: Sequence[float] = (), best: float = -math.inf) -> None:
        super().__init__()
        self.trial, self.monitor, self.prune = trial, monitor, prune
        self.fold, self.max_epochs, self.finished, self.best = fold, max_epochs, list(finished), best
        self.stop_reason: str | None = None
        self._progress_seconds, self._progress_at = progress_seconds, -math.inf

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        logs = logs or {}
        if self.monitor not in logs:
            raise KeyError(f"{self.monitor!r} is not among the logged metrics {sorted(logs)}")
        value = float(logs[self.monitor])
        now = time.monotonic()
        if now - self._progress_at >= self._progress_seconds:
            self._progress_at = now
            self.trial.set_user_attr(k.EPOCH, epoch + 1)
            self.trial.set_user_attr(k.LAST_VAL_DICE, value if math.isfinite(value) else None)
        if math.isfinite(value):
            self.best = max(self.best, value)
        if self.fold is None:
            if not self.prune or not math.isfinite(value):
                return
            self.trial.report(value, step=epoch)
            reason = "pruned"
        else:
            if not self.prune or not math.isfinite(self.best):
                return
            self.trial.report(self._running(), step=self.fold * self.max_epochs + epoch)
            reason = f"pruned at fold {self.fold + 1}, epoch {epoch + 1}"
        if self.trial.should_prune():
            self.model.stop_training = True
            self.stop_reason = reason

    def hold(self, epochs_run: int) -> None:
        """A fold that stopped early keeps its best Dice for the steps it did not train, so
        that every trial has a value at every step of a fold it finished (a rung inside the
        fold compares like with like); the pruner may still stop the trial here."""
        if (self.fold is None or not self.prune or self.stop_reason or not math.isfinite(self.best)
                or epochs_run >= self.max_epochs):
            return
        for epoch in range(epochs_run, self.max_epochs):
            self.trial.report(self._running(), step=self.fold * self.max_epochs + epoch)
        if self.trial.should_prune():
            self.stop_reason = f"pruned at fold {self.fold + 1}, epoch {epochs_run}"

    def _running(self) -> float:
        return float(np.mean(self.finished + [self.best]))


# --- the training result ------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingRecord:
    """How a trial's training went, as its user attributes record it.

    >>> TrainingRecord.of_fit(seconds=12.34, epochs_run=3, best_epoch=2, stop_reason="max_epochs",
    ...                       seconds_per_epoch=[4.0, 4.1, 4.2], best_val_dice=float("nan")).best_val_dice
    nan
    """

    seconds: float
    epochs_run: int
    best_epoch: int
    stop_reason: str
    seconds_per_epoch: float | None
    best_val_dice: float | None = None  # None: not known here (a cross-validated trial's comes pooled)
    fold_epochs_run: list[int] | None = None
    fold_best_epoch: list[int] | None = None

    @classmethod
    def of_fit(cls, *, seconds: float, epochs_run: int, best_epoch: int, stop_reason: str,
               seconds_per_epoch: Sequence[float], best_val_dice: float) -> TrainingRecord:
        """The record of one ``fit`` (its result's fields)."""
        return cls(seconds, epochs_run, best_epoch, stop_reason,
                   round(float(np.mean(seconds_per_epoch)), 2) if seconds_per_epoch else None, best_val_dice)


def record_training(trial: optuna.Trial, record: TrainingRecord) -> None:
    """Write the record into the trial's user attributes (a non-finite Dice as None)."""
    trial.set_user_attr(k.TRAIN_SECONDS, round(record.seconds, 1))
    trial.set_user_attr(k.EPOCHS_RUN, record.epochs_run)
    if record.fold_epochs_run is not None:
        trial.set_user_attr(k.FOLD_EPOCHS_RUN, record.fold_epochs_run)
    if record.fold_best_epoch is not None:
        trial.set_user_attr(k.FOLD_BEST_EPOCH, record.fold_best_epoch)
    trial.set_user_attr(k.BEST_EPOCH, record.best_epoch)
    trial.set_user_attr(k.STOP_REASON, record.stop_reason)
    trial.set_user_attr(k.SECONDS_PER_EPOCH, record.seconds_per_epoch)
    if record.best_val_dice is not None:
        best = record.best_val_dice
        trial.set_user_attr(k.BEST_VAL_DICE, best if math.isfinite(best) else None)

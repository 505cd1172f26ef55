"""The one place where flexunet relies on what Optuna keeps private.

Optuna offers no public way to reach a study's storage, the ids behind a study or a trial, or
the stale-trial query of its heartbeat; flexunet needs them to fail and retry trials whose worker
died, and to extend that query. Everything private lives here, each with a test in
``tests/test_internals.py`` that fails loudly if a new Optuna or TensorFlow release renames
or changes it. Code elsewhere imports these names, never Optuna's private modules or attributes.

Why each is needed:

- ``study._storage``, ``study._study_id``, ``trial._trial_id``: a launcher fails the trial of a
  worker it saw die. That trial belongs to another process, so no ``optuna.Trial`` of this
  process holds it, and Optuna has no public call that sets an attribute on it.
- ``storage._get_stale_trial_ids``: the trials whose heartbeat stopped, so that a copy is
  queued *before* such a trial is failed (``fail_stale_trials`` fails first, and a process
  killed before its retry callback would lose the trial, or race another process's check).
- ``optuna.storages._heartbeat.is_heartbeat_enabled`` and ``_CachedStorage``: whether the storage
  sends heartbeats, and the RDB storage behind Optuna's read cache.
- Optuna's RDB heartbeat table: trials RUNNING that never sent a heartbeat (see search.storage).
- TensorFlow's ``ops._gradient_registry``: each trial's ``tf.custom_gradient`` entries keep that
  trial's whole training graph alive until they are removed (see ``search.objective``).

Sections: Optuna studies and trials; Optuna storages; Optuna's RDB schema; TensorFlow.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import optuna
from optuna.storages import BaseStorage, RDBStorage
from optuna.storages import _CachedStorage as CachedStorage
from optuna.storages._heartbeat import BaseHeartbeat, is_heartbeat_enabled

if TYPE_CHECKING:
    from optuna.trial import FrozenTrial, Trial

__all__ = ["BaseHeartbeat", "CACHED_BACKEND_CALLS", "CachedStorage", "backend", "grace_period", "gradient_registry",
           "heartbeat_interval", "is_heartbeat_enabled", "set_trial_system_attr", "set_trial_user_attr",
           "stale_trial_ids", "study_id", "study_storage", "trial_id", "trial_ids_with_heartbeat"]


# --- Optuna: studies and trials -----------------------------------------------------------------


def study_storage(study: optuna.Study) -> BaseStorage:
    """The storage a study reads and writes through (for an RDB storage, Optuna's read cache)."""
    return study._storage


def study_id(study: optuna.Study) -> int:
    """The storage's id of ``study`` (what the storage's methods take)."""
    return study._study_id


def trial_id(trial: FrozenTrial | Trial) -> int:
    """The storage's id of ``trial`` (a trial's number is only unique within its study)."""
    return trial._trial_id


def set_trial_user_attr(study: optuna.Study, trial: FrozenTrial, key: str, value: Any) -> None:
    """Set a user attr of any process's trial."""
    study_storage(study).set_trial_user_attr(trial_id(trial), key, value)


def set_trial_system_attr(study: optuna.Study, trial: FrozenTrial | Trial, key: str, value: Any) -> None:
    study_storage(study).set_trial_system_attr(trial_id(trial), key, value)


# --- Optuna: storages ---------------------------------------------------------------------------

# Private methods of RDBStorage that Optuna's read cache calls on its backend. A storage that
# changes how RDBStorage talks to the database (flexunet's retries) must cover these too.
CACHED_BACKEND_CALLS = frozenset({"_create_new_trial", "_set_trial_param", "_get_best_trial_id", "_get_trials",
                                  "_get_stale_trial_ids"})


def backend(storage: BaseStorage) -> BaseStorage:
    """The storage behind Optuna's read cache (``storage`` itself when it is not cached)."""
    return storage._backend if isinstance(storage, CachedStorage) else storage


def stale_trial_ids(storage: BaseStorage, study: int) -> list[int]:
    """Ids of the RUNNING trials of ``study`` whose heartbeat stopped, as the storage sees them
    (the query behind ``optuna.storages.fail_stale_trials``); [] when heartbeats are off."""
    if not is_heartbeat_enabled(storage):
        return []
    return storage._get_stale_trial_ids(study)  # type: ignore[attr-defined]


def heartbeat_interval(study: optuna.Study) -> int | None:
    """The storage's heartbeat interval in seconds, None without heartbeats."""
    storage = study_storage(study)
    if not is_heartbeat_enabled(storage):
        return None
    return storage.get_heartbeat_interval()  # type: ignore[attr-defined]


def grace_period(study: optuna.Study) -> int | None:
    """Seconds without a heartbeat after which a trial is stale (RDBStorage's ``grace_period``,
    behind Optuna's read cache where the study's storage is cached)."""
    return getattr(backend(study_storage(study)), "grace_period", None)


# --- Optuna's RDB schema ------------------------------------------------------------------------


def trial_ids_with_heartbeat(storage: RDBStorage, trial_ids: Iterable[int]) -> set[int]:
    """Which of ``trial_ids`` have recorded at least one heartbeat in ``storage``."""
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    wanted = list(trial_ids)
    if not wanted:
        return set()
    beat = models.TrialHeartbeatModel
    with _create_scoped_session(storage.scoped_session) as session:
        return {row[0] for row in session.query(beat.trial_id).filter(beat.trial_id.in_(wanted)).all()}


# --- TensorFlow ---------------------------------------------------------------------------------


def gradient_registry() -> dict[str, Any] | None:
    """TensorFlow's process-wide registry of gradient functions (None on another backend or a
    TensorFlow without it)."""
    try:
        from tensorflow.python.framework import ops
    except ImportError:
        return None
    registry = getattr(getattr(ops, "_gradient_registry", None), "_registry", None)
    return registry if isinstance(registry, dict) else None

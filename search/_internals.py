"""Every private attribute of Optuna or TensorFlow that flexunet relies on, behind one small
function each, so that a new release that renames one breaks here, and
``tests/test_internals.py`` says which.

Why each is needed:

- ``study._storage``, ``study._study_id``, ``trial._trial_id``: a launcher fails the trial of a
  worker it saw die. That trial belongs to another process, so no ``optuna.Trial`` of this
  process holds it, and Optuna has no public call that sets an attribute on it.
- ``storage._get_stale_trial_ids``: the trials whose heartbeat stopped, so that a copy is
  queued *before* such a trial is failed (``fail_stale_trials`` fails first, and a process
  killed before its retry callback would lose the trial, or race another process's check).
- ``optuna.storages._heartbeat.is_heartbeat_enabled``: whether the storage sends heartbeats
  (then a worker waiting for other workers' trials polls at that pace).
- TensorFlow's ``ops._gradient_registry``: each trial's ``tf.custom_gradient`` entries keep that
  trial's whole training graph alive until they are removed (see ``search.objective``).
"""

from __future__ import annotations

from typing import Any

import optuna
from optuna.trial import FrozenTrial


def storage_of(study: optuna.Study) -> optuna.storages.BaseStorage:
    """The storage object a study reads and writes through (Optuna's ``Study._storage``)."""
    return study._storage


def study_id(study: optuna.Study) -> int:
    return study._study_id


def trial_id(trial: FrozenTrial | optuna.Trial) -> int:
    """The storage's id of a trial (``_trial_id`` of both FrozenTrial and Trial)."""
    return trial._trial_id


def set_trial_user_attr(study: optuna.Study, trial: FrozenTrial, key: str, value: Any) -> None:
    """Set a user attr of any process's trial."""
    storage_of(study).set_trial_user_attr(trial_id(trial), key, value)


def set_trial_system_attr(study: optuna.Study, trial: FrozenTrial | optuna.Trial, key: str, value: Any) -> None:
    storage_of(study).set_trial_system_attr(trial_id(trial), key, value)


def heartbeat_interval(study: optuna.Study) -> int | None:
    """The storage's heartbeat interval in seconds, None without heartbeats."""
    from optuna.storages._heartbeat import is_heartbeat_enabled

    storage = storage_of(study)
    if not is_heartbeat_enabled(storage):
        return None
    return storage.get_heartbeat_interval()


def grace_period(study: optuna.Study) -> int | None:
    """Seconds without a heartbeat after which a trial is stale (RDBStorage's ``grace_period``,
    behind Optuna's ``_CachedStorage._backend`` where the study's storage is cached)."""
    storage = storage_of(study)
    storage = getattr(storage, "_backend", storage)
    return getattr(storage, "grace_period", None)


def stale_trial_ids(study: optuna.Study) -> list[int]:
    """The ids of the study's RUNNING trials whose heartbeat stopped (the storage's
    ``_get_stale_trial_ids``, which ``optuna.storages.fail_stale_trials`` uses too)."""
    return list(storage_of(study)._get_stale_trial_ids(study_id(study)))


def gradient_registry() -> dict[str, Any] | None:
    """TensorFlow's process-wide registry of gradient functions (None on another backend or a
    TensorFlow without it)."""
    try:
        from tensorflow.python.framework import ops
    except ImportError:
        return None
    registry = getattr(getattr(ops, "_gradient_registry", None), "_registry", None)
    return registry if isinstance(registry, dict) else None

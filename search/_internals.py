"""The one place where flexunet relies on what Optuna keeps private.

Optuna offers no public way to reach a study's storage, the ids behind a study or a trial, or
the stale-trial query of its heartbeat; flexunet needs them to fail and retry trials whose worker
died, and to extend that query. Everything private lives here, each with a test in
``tests/test__internals.py`` that fails loudly if a new Optuna release renames or changes it.
Code elsewhere imports these names, never Optuna's private modules or attributes.

Sections: Optuna studies and trials; Optuna storages; Optuna's RDB schema.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import optuna
from optuna.storages import BaseStorage, RDBStorage
from optuna.storages import _CachedStorage as CachedStorage
from optuna.storages._heartbeat import BaseHeartbeat, is_heartbeat_enabled

if TYPE_CHECKING:
    from optuna.trial import FrozenTrial, Trial

__all__ = ["BaseHeartbeat", "CACHED_BACKEND_CALLS", "CachedStorage", "backend", "is_heartbeat_enabled",
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

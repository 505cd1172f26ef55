"""search._internals against the installed Optuna: each private thing flexunet relies on is still
there and still means what flexunet takes it to mean. A failure here names what a new release changed."""

from __future__ import annotations

import inspect
import re
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from search import _internals


@pytest.fixture
def study(tmp_path: Path) -> optuna.Study:
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'study.db'}", heartbeat_interval=1, grace_period=1)
    study = optuna.create_study(storage=storage, study_name="internals")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    return study


def test_a_study_s_storage_and_id(study: optuna.Study) -> None:
    storage = _internals.study_storage(study)
    assert isinstance(storage, _internals.CachedStorage), "Optuna no longer caches an RDBStorage's reads"
    assert isinstance(_internals.backend(storage), optuna.storages.RDBStorage)
    assert _internals.backend(_internals.backend(storage)) is _internals.backend(storage)
    assert storage.get_study_id_from_name("internals") == _internals.study_id(study)


def test_a_trial_s_id(study: optuna.Study) -> None:
    storage, sid = _internals.study_storage(study), _internals.study_id(study)
    for frozen in study.trials:
        assert _internals.trial_id(frozen) == storage.get_trial_id_from_study_id_trial_number(sid, frozen.number)
    with pytest.warns(UserWarning):  # heartbeats are on and ask() runs no heartbeat thread
        trial = study.ask()
    assert _internals.trial_id(trial) == storage.get_trial_id_from_study_id_trial_number(sid, trial.number)


def test_the_calls_optunas_cache_makes_on_its_backend() -> None:
    called = set(re.findall(r"self\._backend\.(_\w+)\(", inspect.getsource(_internals.CachedStorage)))
    assert called == _internals.CACHED_BACKEND_CALLS, (
        "Optuna's _CachedStorage now calls other private methods of its backend: update "
        "CACHED_BACKEND_CALLS and search.storage.RETRIED_METHODS")


def test_stale_trial_ids_and_heartbeat_rows(study: optuna.Study) -> None:
    storage = _internals.backend(_internals.study_storage(study))
    assert isinstance(storage, _internals.BaseHeartbeat) and _internals.is_heartbeat_enabled(storage)
    with pytest.warns(UserWarning):
        quiet, silent = study.ask(), study.ask()
    storage.record_heartbeat(_internals.trial_id(quiet))
    ids = [_internals.trial_id(t) for t in study.trials]
    assert _internals.trial_ids_with_heartbeat(storage, ids) >= {_internals.trial_id(quiet)}
    assert _internals.trial_id(silent) not in _internals.trial_ids_with_heartbeat(storage, ids)
    assert _internals.trial_ids_with_heartbeat(storage, []) == set()
    time.sleep(2.5)  # SQLite's clock counts whole seconds: more than one second surely passed
    assert _internals.stale_trial_ids(storage, _internals.study_id(study)) == [_internals.trial_id(quiet)]
    optuna.storages.fail_stale_trials(study)  # the public call behind the same query
    assert [t.state for t in study.trials][-2:] == [TrialState.FAIL, TrialState.RUNNING]


def test_stale_trial_ids_without_heartbeats_is_empty(tmp_path: Path) -> None:
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'study.db'}")
    study = optuna.create_study(storage=storage)
    study.ask()
    assert not _internals.is_heartbeat_enabled(storage)
    assert _internals.stale_trial_ids(storage, _internals.study_id(study)) == []

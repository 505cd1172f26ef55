"""Optuna's own storage test cases, run against the storage flexunet uses, on SQLite and PostgreSQL.

``StorageTestCase`` (shipped by the installed Optuna, ``optuna.testing.pytest_storages``) is
parametrized here with what ``search.store.storage.open_storage`` returns, both as opened and as a
study sees it (wrapped in Optuna's read cache). The cases that Optuna keeps in its repository
(``tests/storages_tests/test_storages.py`` and ``test_heartbeat.py``) are restated below in our
own words for the same contracts. Each database (one SQLite file, one new PostgreSQL database)
serves the module and is emptied between tests.
"""

from __future__ import annotations

import pickle
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta

import optuna
import pytest
import sqlalchemy
from optuna.storages import BaseStorage, RetryHeartbeatStaleTrialCallback
from optuna.study import StudyDirection
from optuna.testing.pytest_storages import StorageTestCase
from optuna.trial import FrozenTrial, TrialState

from conftest import POSTGRES_URL, _fresh_database
from search.store import _internals
from search.trial import lifecycle
from search.store import storage as st

HEARTBEAT = {"FLEXUNET_HEARTBEAT_INTERVAL": "1", "FLEXUNET_GRACE_PERIOD": "1"}
BEAT_GONE = 2.5  # seconds after its last heartbeat a trial is surely stale (grace period 1 s)


@pytest.fixture(scope="module")
def _postgresql_database() -> Iterator[str]:
    yield from _fresh_database(POSTGRES_URL, "CREATE DATABASE {name}", "DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(scope="module")
def _sqlite_database(tmp_path_factory: pytest.TempPathFactory) -> str:
    # One file for the module, emptied between tests as the PostgreSQL database is: a new file
    # per test paid Optuna's schema creation each time (0.14 s against 0.02 s, ~15 s a run).
    return f"sqlite:///{tmp_path_factory.mktemp('contract') / 'study.db'}"


_TABLES: dict[str, list[str]] = {}  # per URL: Optuna's tables, parents first


def _empty(url: str) -> None:
    """Remove every study and trial, keeping Optuna's schema and its version rows."""
    engine = sqlalchemy.create_engine(url)
    if not _TABLES.get(url):  # a test that failed before opening the storage left no schema yet
        meta = sqlalchemy.MetaData()
        meta.reflect(engine)
        _TABLES[url] = [t.name for t in meta.sorted_tables if t.name not in ("version_info", "alembic_version")]
    tables = _TABLES[url]
    with engine.begin() as connection:
        if engine.dialect.name == "sqlite":  # no TRUNCATE: children first
            for table in reversed(tables):
                connection.execute(sqlalchemy.text(f"DELETE FROM {table}"))
        else:
            connection.execute(sqlalchemy.text(f"TRUNCATE {', '.join(tables)} CASCADE"))
    engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.db)])
def url(request: pytest.FixtureRequest) -> Iterator[str]:
    database = request.getfixturevalue(f"_{request.param}_database")
    yield database
    _empty(database)


@pytest.fixture(params=["as opened", "as a study sees it"])
def storage(request: pytest.FixtureRequest, url: str) -> Iterator[BaseStorage]:
    opened = st.open_storage(url, on_stale=lifecycle.stale_trial_callback)
    if request.param == "as opened":
        yield opened
    else:
        cached = optuna.storages.get_storage(opened)
        assert isinstance(cached, _internals.CachedStorage)
        yield cached
    opened.engine.dispose()


class TestOptunaStorageCases(StorageTestCase):
    """Every case Optuna ships for a storage, plus the two its repository restates."""

    def test_create_new_study_unique_id(self, storage: BaseStorage) -> None:
        first = storage.create_new_study([StudyDirection.MINIMIZE])
        second = storage.create_new_study([StudyDirection.MINIMIZE])
        storage.delete_study(second)
        third = storage.create_new_study([StudyDirection.MINIMIZE])
        assert {s._study_id for s in storage.get_all_studies()} == {first, third}
        # SQLite hands a deleted study's id out again; Optuna accepts that of RDBStorage.
        if not _internals.backend(storage).url.startswith("sqlite"):
            assert third not in (first, second)

    def test_pickle_storage(self, storage: BaseStorage) -> None:
        study = storage.create_new_study([StudyDirection.MINIMIZE])
        storage.set_study_system_attr(study, "key", "pickle")
        restored = pickle.loads(pickle.dumps(storage))
        assert restored.get_study_system_attrs(study) == {"key": "pickle"}
        inner, restored_inner = _internals.backend(storage), _internals.backend(restored)
        assert isinstance(restored_inner, st.RetryingStorage)
        assert (restored_inner.url, restored_inner.engine_kwargs, restored_inner.max_wait) == \
            (inner.url, inner.engine_kwargs, inner.max_wait)
        assert restored_inner.get_heartbeat_interval() == inner.get_heartbeat_interval()
        assert restored_inner.engine is not inner.engine  # a connection pool of its own
        restored_inner.engine.dispose()


# --- what Optuna's repository checks of RDB storages, in our words -------------------------------


def test_a_study_on_it_gets_optunas_read_cache(url: str) -> None:
    study = optuna.create_study(storage=st.open_storage(url, on_stale=lifecycle.stale_trial_callback))
    assert isinstance(_internals.study_storage(study), _internals.CachedStorage)
    study = optuna.load_study(study_name=study.study_name, storage=st.open_storage(url, on_stale=lifecycle.stale_trial_callback))
    assert isinstance(_internals.study_storage(study), _internals.CachedStorage)


def test_the_cache_reads_only_trials_it_does_not_hold(url: str) -> None:
    storage = st.open_storage(url, on_stale=lifecycle.stale_trial_callback)
    study = storage.create_new_study([StudyDirection.MINIMIZE])
    first = storage.create_new_trial(study)
    second = storage.create_new_trial(study)
    # The cache asks for the trials after the last finished one it holds, plus its unfinished
    # ones by id; a long list of ids once broke some databases (optuna/optuna#1457).
    unfinished = {first} | set(range(second + 1, second + 100_000))
    trials = storage._get_trials(study, states=None, included_trial_ids=unfinished, trial_id_greater_than=second)
    assert [_internals.trial_id(t) for t in trials] == [first]
    trials = storage._get_trials(study, states=None, included_trial_ids=set(), trial_id_greater_than=first)
    assert [_internals.trial_id(t) for t in trials] == [second]
    assert storage._get_trials(study, states=None, included_trial_ids=set(), trial_id_greater_than=second) == []


# --- heartbeats (Optuna's test_heartbeat.py, in our words) --------------------------------------


@pytest.fixture
def beating(url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[st.RetryingStorage]:
    """The storage a worker opens, with a heartbeat every second and a grace period of one."""
    for key, value in HEARTBEAT.items():
        monkeypatch.setenv(key, value)
    storage = st.open_storage(url, on_stale=lifecycle.stale_trial_callback)
    assert isinstance(storage, st.RetryingStorage)
    yield storage
    storage.engine.dispose()


def _asked(study: optuna.Study) -> optuna.Trial:
    with pytest.warns(UserWarning, match="[Hh]eartbeat"):  # ask() outside optimize() has no heartbeat thread
        return study.ask()


def test_heartbeat_settings_come_from_the_environment(beating: st.RetryingStorage) -> None:
    assert _internals.is_heartbeat_enabled(beating)
    assert (beating.get_heartbeat_interval(), beating.grace_period) == (1, 1)
    assert beating.get_heartbeat_stale_trial_callback() is not None


@pytest.mark.parametrize("key", ["heartbeat_interval", "grace_period"])
def test_a_heartbeat_setting_must_be_positive(url: str, key: str) -> None:
    with pytest.raises(ValueError, match=key):
        st.RetryingStorage(url, **{key: 0})


def test_a_trial_whose_heartbeat_stopped_is_failed_and_only_in_its_study(beating: st.RetryingStorage) -> None:
    quiet, other = optuna.create_study(storage=beating), optuna.create_study(storage=beating)
    beating.heartbeat_stale_trial_callback = None
    trials = [_asked(quiet), _asked(other)]
    for trial in trials:
        beating.record_heartbeat(_internals.trial_id(trial))
        beating.record_heartbeat(_internals.trial_id(trial))  # a second beat updates the first
    time.sleep(BEAT_GONE)
    quiet.optimize(lambda _: 1.0, n_trials=1)  # Optuna's stale-trial check runs first
    assert [t.state for t in quiet.trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert [t.state for t in other.trials] == [TrialState.RUNNING]


def test_settings_assigned_after_opening_apply(url: str) -> None:
    storage = st.open_storage(url, heartbeat=False)
    assert not _internals.is_heartbeat_enabled(storage)
    seen: list[FrozenTrial] = []
    storage.heartbeat_interval, storage.grace_period = 1, 1
    storage.heartbeat_stale_trial_callback = lambda study, trial: seen.append(trial)
    study = optuna.create_study(storage=storage)
    assert _internals.is_heartbeat_enabled(_internals.study_storage(study))
    trial = _asked(study)
    trial.set_user_attr("mark", "B")
    storage.record_heartbeat(_internals.trial_id(trial))
    assert _internals.stale_trial_ids(storage, _internals.study_id(study)) == []
    time.sleep(BEAT_GONE)
    assert _internals.stale_trial_ids(storage, _internals.study_id(study)) == [_internals.trial_id(trial)]
    optuna.storages.fail_stale_trials(study)
    assert [(t.number, t.state, t.user_attrs) for t in seen] == [(0, TrialState.FAIL, {"mark": "B"})]


def test_stale_trial_callbacks_see_the_failed_trial_and_queue_copies(url: str,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Optuna's retry callback (with and without retries) and flexunet's, each on a storage of
    its own; one wait serves all three."""
    for key, value in HEARTBEAT.items():
        monkeypatch.setenv(key, value)
    callbacks = {"no retry": RetryHeartbeatStaleTrialCallback(max_retry=0),
                 "optuna's retry": RetryHeartbeatStaleTrialCallback(max_retry=1), "flexunet's": None}
    studies = {}
    for name, callback in callbacks.items():
        storage = st.open_storage(url, on_stale=lifecycle.stale_trial_callback)
        if callback is not None:
            storage.heartbeat_stale_trial_callback = callback
        studies[name] = study = optuna.create_study(storage=storage, study_name=name)
        trial = _asked(study)
        trial.suggest_float("x", 0, 1)
        trial.set_user_attr("mark", "B")
        trial.report(0.5, step=1)
        storage.record_heartbeat(_internals.trial_id(trial))
    time.sleep(BEAT_GONE)
    for study in studies.values():
        optuna.storages.fail_stale_trials(study)
        optuna.storages.fail_stale_trials(study)  # nothing stale is left: no second copy
    copies = {}
    for name, study in studies.items():
        failed, *copies[name] = study.trials
        assert failed.state == TrialState.FAIL
        assert all((c.state, c.params, c.user_attrs) == (TrialState.WAITING, failed.params, {"mark": "B"})
                   for c in copies[name])
    assert copies["no retry"] == []
    (optunas,), (ours,) = copies["optuna's retry"], copies["flexunet's"]
    assert RetryHeartbeatStaleTrialCallback.retried_trial_number(optunas) == 0
    assert optunas.intermediate_values == {}  # Optuna's default: a retry starts over
    assert ours.system_attrs["failed_trial"] == 0 and ours.intermediate_values == {1: 0.5}  # ours resumes
    for study in studies.values():
        _internals.backend(_internals.study_storage(study)).engine.dispose()


def test_two_workers_failing_the_same_stale_trial_both_go_on(beating: st.RetryingStorage, url: str) -> None:
    study = optuna.create_study(storage=beating)
    trial = _asked(study)
    beating.record_heartbeat(_internals.trial_id(trial))
    time.sleep(BEAT_GONE)
    storages = [st.open_storage(url, on_stale=lifecycle.stale_trial_callback) for _ in range(2)]
    barrier, errors = threading.Barrier(2), []

    def check(storage: st.RetryingStorage) -> None:
        try:
            barrier.wait()
            optuna.storages.fail_stale_trials(optuna.load_study(study_name=study.study_name, storage=storage))
        except Exception as exc:  # noqa: BLE001 -- the assertion below names it
            errors.append(exc)

    threads = [threading.Thread(target=check, args=(s,)) for s in storages]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert study.trials[0].state == TrialState.FAIL
    for storage in storages:
        storage.engine.dispose()


def test_a_running_trial_that_never_beat_is_stale_once_old(beating: st.RetryingStorage) -> None:
    """Optuna ignores a trial without a heartbeat; flexunet fails it after the grace period plus
    two heartbeats (here 3 s), so a worker killed before its first beat loses no trial."""
    study = optuna.create_study(storage=beating)
    hour_ago = datetime.now() - timedelta(hours=1)
    for started in (hour_ago, hour_ago, datetime.now()):
        study.add_trial(FrozenTrial(number=0, state=TrialState.RUNNING, value=None, datetime_start=started,
                                    datetime_complete=None, params={}, distributions={}, user_attrs={},
                                    system_attrs={}, intermediate_values={}, trial_id=0))
    old, beat, young = (_internals.trial_id(t) for t in study.trials)
    beating.record_heartbeat(beat)  # old, but alive
    assert _internals.stale_trial_ids(beating, _internals.study_id(study)) == [old]

"""search.store.storage: calls that wait out a lost database, and studies created by many processes at once."""

from __future__ import annotations

import ast
import inspect
import logging
import textwrap
import threading

import optuna
import pytest
from optuna.trial import TrialState

from conftest import ThrowawayPostgres
from search.store import _internals
from search.trial import lifecycle
from search.store import storage as st
from search.store import retry


def _opens_a_session(function: object) -> bool:
    source = textwrap.dedent(inspect.getsource(function))  # type: ignore[arg-type]
    return any(isinstance(node, ast.Call) and getattr(node.func, "id", None) == "_create_scoped_session"
               for node in ast.walk(ast.parse(source)))


def test_every_rdb_method_that_reaches_the_database_is_retried() -> None:
    """A new Optuna release that adds a database call to RDBStorage must add it to the retries."""
    reaching = {name for name, function in vars(optuna.storages.RDBStorage).items()
                if inspect.isfunction(function) and _opens_a_session(function)
                and not name.endswith("_without_commit")}  # helpers called inside another call's session
    assert reaching, "RDBStorage no longer opens sessions with _create_scoped_session: check search/store/storage.py"
    assert reaching <= set(st.RETRIED_METHODS), sorted(reaching - set(st.RETRIED_METHODS))
    assert _internals.CACHED_BACKEND_CALLS <= set(st.RETRIED_METHODS)
    assert all(callable(getattr(optuna.storages.RDBStorage, name)) for name in st.RETRIED_METHODS)


@pytest.mark.db
def test_a_call_made_while_the_database_is_down_waits_for_it(postgres_server: ThrowawayPostgres,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    study = optuna.create_study(storage=st.open_storage(postgres_server.url, heartbeat=False), study_name="down")
    trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    postgres_server.stop()
    restarter = threading.Timer(2.0, postgres_server.start)  # the call below is made before it fires
    restarter.start()
    with caplog.at_level(logging.WARNING, logger="search.store.retry"):
        study.tell(trial, 0.5)  # a write, through Optuna's cache, on a connection that was closed
    restarter.join()
    assert "unreachable" in caplog.text and "retrying" in caplog.text
    reread = optuna.load_study(study_name="down", storage=st.open_storage(postgres_server.url, heartbeat=False))
    assert [(t.state, t.value) for t in reread.trials] == [(TrialState.COMPLETE, 0.5)]


@pytest.mark.db
def test_a_database_that_stays_down_fails_the_call_after_max_wait(postgres_server: ThrowawayPostgres,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    storage = st.RetryingStorage(postgres_server.url, max_wait=1.0)
    postgres_server.stop()
    with caplog.at_level(logging.WARNING, logger="search.store.retry"), \
            pytest.raises(optuna.exceptions.StorageInternalError):
        storage.get_all_studies()
    assert caplog.text.count("unreachable") >= 2  # waited 0.5 s, then 1 s, then gave up


@pytest.mark.db
def test_a_bad_write_is_not_retried(postgres_url: str, caplog: pytest.LogCaptureFixture) -> None:
    storage = st.open_storage(postgres_url, heartbeat=False)
    with caplog.at_level(logging.WARNING, logger="search.store.retry"), \
            pytest.raises(optuna.exceptions.StorageInternalError):
        storage.create_new_study([optuna.study.StudyDirection.MINIMIZE], study_name="x" * 1000)  # over 512
    assert "unreachable" not in caplog.text
    study = optuna.create_study(storage=storage)
    study.optimize(lambda t: 1.0, n_trials=1)
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        storage.set_trial_state_values(_internals.trial_id(study.trials[0]), TrialState.FAIL)


@pytest.mark.db
def test_processes_starting_together_on_a_new_database_create_one_study(postgres_url: str) -> None:
    """Optuna's tables and the study are created by whoever comes first; the others wait and load."""
    barrier, results, errors = threading.Barrier(6), [], []

    def start() -> None:
        try:
            barrier.wait()
            study, created = st.create_once(st.open_storage(postgres_url, on_stale=lifecycle.stale_trial_callback), "together", ["maximize"])
            results.append((study.study_name, created))
        except Exception as exc:  # noqa: BLE001 -- the assertion below names it
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(results) == [("together", False)] * 5 + [("together", True)]


def _lost_connection(statement: str, message: str) -> None:
    """Fail as Optuna reports a lost connection or a locked SQLite file: a StorageInternalError
    caused by SQLAlchemy's OperationalError."""
    import sqlalchemy.exc

    try:
        raise sqlalchemy.exc.OperationalError(statement, {}, Exception(message))
    except sqlalchemy.exc.OperationalError as exc:
        raise optuna.exceptions.StorageInternalError("An exception is raised during the commit.") from exc


def _busy_then_open(failures: int, message: str):  # type: ignore[no-untyped-def]
    """A RetryingStorage.__init__ that fails ``failures`` times as Optuna reports a server that
    is out of connections (a StorageInternalError caused by an OperationalError), then opens."""
    real = st.RetryingStorage.__init__
    calls = []

    def init(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) <= failures:
            _lost_connection("SELECT 1", message)
        real(self, *args, **kwargs)

    return init, calls


def test_a_busy_server_at_open_is_waited_for(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    init, calls = _busy_then_open(2, "FATAL: sorry, too many clients already")
    monkeypatch.setattr(st.RetryingStorage, "__init__", init)
    monkeypatch.setattr(st.time, "sleep", lambda seconds: None)
    storage = st.open_storage(f"sqlite:///{tmp_path / 'busy.db'}", heartbeat=False)
    assert isinstance(storage, st.RetryingStorage) and len(calls) == 3


def test_a_refused_connection_at_open_fails_at_once_naming_the_cause(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    init, calls = _busy_then_open(10, "connection refused (is the server running?)")
    monkeypatch.setattr(st.RetryingStorage, "__init__", init)
    with pytest.raises(st.ConfigError, match=r"cannot connect \(Exception: connection refused"):
        st.open_storage(f"sqlite:///{tmp_path / 'refused.db'}", heartbeat=False)
    assert len(calls) == 1


def _lose_the_first_write(monkeypatch: pytest.MonkeyPatch, meanwhile) -> list[str]:  # type: ignore[no-untyped-def]
    """Make the next ``set_trial_state_values`` of every RetryingStorage lose its connection once,
    before it commits, after ``meanwhile()`` ran (what another worker does in between)."""
    real = optuna.storages.RDBStorage.set_trial_state_values
    calls: list[str] = []

    def set_trial_state_values(self, trial_id, state, values=None):  # type: ignore[no-untyped-def]
        calls.append(state.name)
        if len(calls) == 1:
            meanwhile()
            _lost_connection("UPDATE trials", "database is locked")
        return real(self, trial_id, state, values)

    monkeypatch.setattr(st.RetryingStorage, "set_trial_state_values", retry.retried(set_trial_state_values))
    return calls


def test_a_waiting_trial_another_worker_finished_during_a_retried_pop_is_not_run_again(
        tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """CI once saw two workers run the enqueued baseline: one lost its write lock while popping
    it, and by the retry the other had finished it; the first was told it had popped it and
    died on Optuna's "Cannot tell a COMPLETE trial"."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(storage=st.open_storage(url, heartbeat=False), study_name="pop")
    study.enqueue_trial({"x": 0.5})
    other = optuna.load_study(study_name="pop", storage=st.open_storage(url, heartbeat=False))

    def the_other_worker_runs_it() -> None:
        with monkeypatch.context() as unpatched:
            unpatched.setattr(st.RetryingStorage, "set_trial_state_values",
                              retry.retried(optuna.storages.RDBStorage.set_trial_state_values))
            other.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)

    calls = _lose_the_first_write(monkeypatch, the_other_worker_runs_it)
    trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    assert calls[:2] == ["RUNNING", "RUNNING"]  # the pop was retried, and refused
    assert trial.number == 1  # a new trial, not the finished one
    study.tell(trial, trial.params["x"])
    assert [(t.number, t.state, t.value) for t in study.trials] == [(0, TrialState.COMPLETE, 0.5),
                                                                     (1, TrialState.COMPLETE, trial.params["x"])]


def test_a_retried_tell_whose_first_attempt_committed_succeeds(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """The connection broke after the commit: the retry finds the trial in the state it asked for."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(storage=st.open_storage(url, heartbeat=False), study_name="tell")
    trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    plain = optuna.storages.RDBStorage(url)
    calls = _lose_the_first_write(
        monkeypatch, lambda: plain.set_trial_state_values(_internals.trial_id(trial), TrialState.COMPLETE, [0.25]))
    study.tell(trial, 0.25)
    assert calls == ["COMPLETE", "COMPLETE"]
    assert [(t.state, t.value) for t in study.trials] == [(TrialState.COMPLETE, 0.25)]

    # Another process failed the next trial in between: the retry of our COMPLETE is refused.
    other = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    calls = _lose_the_first_write(
        monkeypatch, lambda: plain.set_trial_state_values(_internals.trial_id(other), TrialState.FAIL))
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        study.tell(other, 0.75)
    assert calls == ["COMPLETE", "COMPLETE"]
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.FAIL]


def test_an_interrupt_during_a_storage_call_is_raised_when_the_call_has_returned(
        tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """A worker's SIGTERM handler raises through interrupt_outside_calls: inside a storage call
    the interrupt waits for the call to finish, so no SQLite cursor is left half read, holding
    the lock that every other writer needs. Outside a call it is raised at once."""
    import sqlite3

    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(storage=st.open_storage(url, heartbeat=False), study_name="sigterm")
    trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    real = optuna.storages.RDBStorage.set_trial_intermediate_value

    def set_trial_intermediate_value(self, trial_id, step, value):  # type: ignore[no-untyped-def]
        if step == 1:
            retry.interrupt_outside_calls(KeyboardInterrupt("SIGTERM"))  # the signal arrives mid-call
        return real(self, trial_id, step, value)

    monkeypatch.setattr(st.RetryingStorage, "set_trial_intermediate_value", retry.retried(set_trial_intermediate_value))
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
        trial.report(0.25, step=1)
    assert study.trials[0].intermediate_values == {1: 0.25}  # the call finished, then the interrupt came
    other = sqlite3.connect(tmp_path / "study.db", timeout=0.1)  # and no lock is left behind
    other.execute("UPDATE studies SET study_name = study_name")
    other.commit()
    other.close()
    trial.report(0.5, step=2)  # nothing pending any more
    assert study.trials[0].intermediate_values == {1: 0.25, 2: 0.5}
    with pytest.raises(KeyboardInterrupt, match="now"):
        retry.interrupt_outside_calls(KeyboardInterrupt("now"))


def test_an_interrupt_while_a_call_waits_for_the_database_ends_the_wait(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """A worker waiting out a lost database (up to max_wait) stops at its next retry, not after."""
    storage = st.RetryingStorage(f"sqlite:///{tmp_path / 'study.db'}", max_wait=300)
    attempts: list[int] = []

    def get_all_studies(self):  # type: ignore[no-untyped-def]
        attempts.append(1)
        retry.interrupt_outside_calls(KeyboardInterrupt("SIGTERM"))
        _lost_connection("SELECT", "database is locked")

    monkeypatch.setattr(st.RetryingStorage, "get_all_studies", retry.retried(get_all_studies))
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
        storage.get_all_studies()
    assert attempts == [1]  # no second attempt: the interrupt ended the wait


def _locked_then_open(monkeypatch: pytest.MonkeyPatch, failures: int) -> tuple[list[int], list[float]]:
    """``get_all_studies`` of every RetryingStorage fails ``failures`` times as a lost connection
    (or a locked SQLite file) does, then answers; returns its attempts and the pauses between them."""
    real = optuna.storages.RDBStorage.get_all_studies
    attempts: list[int] = []
    pauses: list[float] = []

    def get_all_studies(self):  # type: ignore[no-untyped-def]
        attempts.append(1)
        if len(attempts) <= failures:
            _lost_connection("SELECT", "database is locked")
        return real(self)

    monkeypatch.setattr(st.RetryingStorage, "get_all_studies", retry.retried(get_all_studies))
    monkeypatch.setattr(st.time, "sleep", pauses.append)
    return attempts, pauses


def test_a_locked_sqlite_file_is_tried_again_within_a_second(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """SQLite's lock goes with the writer's next commit: no pause of a server's 15 s."""
    storage = st.RetryingStorage(f"sqlite:///{tmp_path / 'study.db'}", max_wait=300)
    attempts, pauses = _locked_then_open(monkeypatch, failures=6)
    assert storage.get_all_studies() == []
    assert len(attempts) == 7
    assert pauses == [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]


@pytest.mark.db
def test_a_lost_server_is_waited_for_with_pauses_growing_to_15_s(postgres_url: str,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    storage = st.RetryingStorage(postgres_url, max_wait=300)
    attempts, pauses = _locked_then_open(monkeypatch, failures=7)
    assert storage.get_all_studies() == []
    assert len(attempts) == 8
    assert pauses == [0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 15.0]
    storage.engine.dispose()


def test_a_retried_param_write_whose_first_attempt_committed_keeps_one_value(
        tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """The connection broke after the parameter's row was committed: the retry's duplicate row
    is refused by the table's unique key, which Optuna's parameter write ignores on purpose."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(storage=st.open_storage(url, heartbeat=False), study_name="param")
    real = optuna.storages.RDBStorage._set_trial_param
    calls: list[str] = []

    def set_trial_param(self, trial_id, name, value, distribution, previous):  # type: ignore[no-untyped-def]
        calls.append(name)
        real(self, trial_id, name, value, distribution, previous)
        if len(calls) == 1:
            _lost_connection("INSERT INTO trial_params", "server closed the connection unexpectedly")

    monkeypatch.setattr(st.RetryingStorage, "_set_trial_param", retry.retried(set_trial_param))
    trial = study.ask()
    x = trial.suggest_float("x", 0, 1)
    assert calls == ["x", "x"]
    study.tell(trial, x)
    assert [(t.state, t.params) for t in study.trials] == [(TrialState.COMPLETE, {"x": x})]

"""The connection budget on a real PostgreSQL: one connection per process, heartbeat included,
and a full server turns workers away with one line while the others finish the study."""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from conftest import run_cli, tiny_study
from search import keys as k
from search.trial import lifecycle
from search.store import storage as st
from search.store import urls

pytestmark = pytest.mark.db


def _connections(admin_url: str, database: str) -> int:
    import sqlalchemy as sa

    engine = sa.create_engine(admin_url, poolclass=sa.pool.NullPool)
    with engine.connect() as connection:
        return connection.execute(sa.text(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = :d AND backend_type = 'client backend'"),
                                  {"d": database}).scalar_one()


def test_a_worker_holds_one_connection_with_its_heartbeat_beating(postgres_url: str, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The heartbeat thread writes every second while the trial writes from the main thread:
    both go through the process's one connection (SQLAlchemy's default pool opened two)."""
    import sqlalchemy as sa

    from search.store import _internals

    monkeypatch.setenv("FLEXUNET_HEARTBEAT_INTERVAL", "1")
    url = urls.normalize(postgres_url)
    database = sa.engine.make_url(url).database
    admin = sa.engine.make_url(url).set(database="postgres").render_as_string(hide_password=False)
    storage = st.open_storage(url, on_stale=lifecycle.stale_trial_callback)
    study, _ = st.create_once(storage, "budget", ["maximize"])
    seen: list[int] = []

    def objective(trial: optuna.Trial) -> float:
        for step in range(12):  # about three heartbeats
            trial.set_user_attr("step", step)
            trial.report(step, step)
            seen.append(_connections(admin, database))
            time.sleep(0.25)
        return 1.0

    study.optimize(objective, n_trials=1)
    trial = study.trials[0]
    assert trial.state == TrialState.COMPLETE
    assert _internals.trial_ids_with_heartbeat(_internals.backend(storage), [_internals.trial_id(trial)])
    assert max(seen) == 1 and min(seen) == 1, seen


@contextmanager
def _held(url: str, count: int) -> Iterator[list]:
    """``count`` idle connections to the server (other clients of a shared database)."""
    import psycopg

    plain = url.replace("postgresql+psycopg://", "postgresql://")
    connections = [psycopg.connect(plain) for _ in range(count)]
    try:
        yield connections
    finally:
        for connection in connections:
            connection.close()


def _no_op_worker(url: str, name: str, n_trials: int, log: str, joined, go) -> None:  # type: ignore[no-untyped-def]
    """A worker's start-up (``search.runtime.worker.open_worker_storage``), then no-op trials."""
    os.environ[urls.ENV_VAR] = url
    from search.runtime import worker

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        storage = worker.open_worker_storage()
    except st.ServerFull as exc:
        Path(log).write_text(f"flexunet: error: {exc}\n", encoding="utf-8")
        sys.exit(st.EXIT_SERVER_FULL)
    study = st.load_study(storage, name)
    joined.put(os.getpid())
    go.wait()
    worker.run_trials(study, lambda trial: trial.suggest_float("x", 0.0, 1.0), n_trials)


def test_a_full_server_turns_workers_away_with_one_line_and_the_others_finish(small_postgres_server,  # type: ignore[no-untyped-def]
                                                                               tmp_path: Path) -> None:
    """max_connections = 20, taken by other clients but for two: of four workers two join
    and spend the budget exactly, two stop at start-up with one line and lose nothing."""
    url = small_postgres_server.url
    storage = st.open_storage(url, on_stale=lifecycle.stale_trial_callback)  # this process: one connection, as a launcher's
    study, _ = st.create_once(storage, "full", ["minimize"])
    in_use = st.connection_figures(storage)
    assert in_use is not None and in_use[0] == 20
    ctx = mp.get_context("spawn")
    joined, go = ctx.Queue(), ctx.Event()
    logs = [tmp_path / f"worker-{i}.log" for i in range(4)]
    with _held(url, 20 - in_use[1] - 2):
        workers = [ctx.Process(target=_no_op_worker, args=(url, "full", 30, str(logs[i]), joined, go))
                   for i in range(4)]
        for w in workers:
            w.start()
        members = [joined.get(timeout=300) for _ in range(2)]
        end = time.time() + 300
        while sum(w.exitcode is not None for w in workers) < 2 and time.time() < end:
            time.sleep(0.2)
        assert st.connection_figures(storage) == (20, 20)  # what a launcher's line then says
        line = st.full_server_line(url, "2 of 4 workers turned away", st.connection_figures(storage))
        go.set()
        for w in workers:
            w.join(timeout=300)
    assert sorted(w.exitcode for w in workers) == [0, 0, 3, 3]
    assert sorted(w.pid for w in workers if w.exitcode == 0) == sorted(members)
    for w, log in zip(workers, logs):
        if w.exitcode == st.EXIT_SERVER_FULL:
            lines = log.read_text(encoding="utf-8").splitlines()
            assert len(lines) == 1 and "the database server is full" in lines[0], lines
            assert "too many clients" in lines[0] and "max_connections" in lines[0]
            assert "flexunet search proxy" in lines[0] and "grpc://" in lines[0]
    assert "max_connections = 20, 20 in use" in line
    trials = study.get_trials()
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert len([t for t in trials if t.state == TrialState.COMPLETE]) == 30
    assert all(t.system_attrs.get(k.OVER_BUDGET) for t in trials if t.state != TrialState.COMPLETE)
    assert {t.user_attrs["pid"] for t in trials} <= set(members)


@pytest.mark.slow
def test_a_launcher_whose_workers_find_no_room_says_so_in_one_line(small_postgres_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Room for the launcher's one connection only: both its workers are turned away (before
    TensorFlow's import), and the launcher names the server's figures and exits 1."""
    url = small_postgres_server.url
    study_file = tiny_study(tmp_path / "study.toml", "no-room", n_trials=2, baseline=False)
    probe = st.open_storage(url, heartbeat=False)
    in_use = st.connection_figures(probe)
    assert in_use is not None
    with _held(url, 20 - in_use[1]):  # all but the probe's slot, which becomes the launcher's
        probe.engine.dispose()
        done = run_cli("search", "run", study_file, "--storage", url, "--workers", "2", "--out", tmp_path / "run")
    assert done.returncode == 1, done.stdout + done.stderr
    full = [line for line in done.stderr.splitlines() if "the database server is full" in line]
    assert len(full) == 1, done.stderr
    assert "max_connections = 20, 20 in use" in full[0] and "2 of 2 workers of this launcher turned away" in full[0]
    assert "flexunet search proxy" in full[0]
    logs = list((tmp_path / "run" / "logs").glob("worker-*.log"))
    assert len(logs) == 2 and all("too many clients" in log.read_text() for log in logs)
    study = optuna.load_study(study_name="no-room", storage=st.open_storage(url, heartbeat=False))
    assert study.trials == []  # nothing started, nothing lost

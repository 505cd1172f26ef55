"""Optuna's gRPC storage proxy (``flexunet search proxy``, ``--storage grpc://HOST:PORT``) keeps
every promise a database keeps: exact ``n_trials``, dead workers found (by the proxy client's own
heartbeat) and their trials resumed, and nothing lost when the proxy is killed and restarted.
Real proxy processes on a real PostgreSQL; no-op workers where the point is coordination."""

from __future__ import annotations

import inspect
import multiprocessing as mp
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from optuna.storages import GrpcStorageProxy
from optuna.trial import TrialState

from conftest import assert_user_error, run_cli, run_cli_here, shared_storage, start_cli, tiny_study
from search import keys as k
from search.trial import lifecycle
from search.store import proxy as px
from search.store import proxy_server
from search.store import urls
from search.store import storage as st

pytestmark = pytest.mark.db
FAST_HEARTBEAT = {"FLEXUNET_HEARTBEAT_INTERVAL": "1", "FLEXUNET_GRACE_PERIOD": "3"}


@pytest.fixture
def proxy(postgres_url: str, tmp_path: Path) -> Iterator:  # type: ignore[type-arg]
    from servers import Proxy

    server = Proxy(postgres_url, tmp_path / "proxy.log")
    try:
        yield server
    finally:
        server.stop()


def test_every_call_of_optunas_client_is_retried() -> None:
    """A new Optuna that adds a call to its client must add it to the retried ones too."""
    own = {name for name, member in vars(GrpcStorageProxy).items()
           if inspect.isfunction(member) and not name.startswith("__")}
    not_storage_calls = {"_setup", "wait_server_ready", "close"}
    assert own - not_storage_calls == set(px.RETRIED_METHODS) - {"record_heartbeat", "_get_stale_trial_ids"}


def test_grpc_urls_are_checked_and_a_missing_proxy_is_named() -> None:
    assert px.parse("grpc://proxy.local:13001") == ("proxy.local", 13001)
    assert px.parse("grpc://proxy.local") == ("proxy.local", px.DEFAULT_PORT)
    with pytest.raises(st.ConfigError, match="expected grpc://HOST:PORT"):
        px.parse("grpc://proxy.local:port")
    from servers import _free_port

    with pytest.raises(st.ConfigError, match="no proxy answers there"):
        px.connect(f"grpc://127.0.0.1:{_free_port()}", ready_seconds=1)


def test_the_dashboard_says_it_needs_the_database(proxy) -> None:  # type: ignore[no-untyped-def]
    assert_user_error(run_cli_here("search", "dashboard", "--storage", proxy.url),
                      "the dashboard needs the database itself, not the proxy")


def _no_op_worker(url: str, name: str, n_trials: int, barrier) -> None:  # type: ignore[no-untyped-def]
    from search.runtime.worker import run_trials

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = st.load_study(st.open_storage(url, on_stale=lifecycle.stale_trial_callback), name)
    barrier.wait()
    run_trials(study, lambda trial: trial.suggest_float("x", 0.0, 1.0), n_trials)


def _peak_connections(url: str, database: str, stop, out) -> None:  # type: ignore[no-untyped-def]
    import sqlalchemy as sa

    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    peak = 0
    while not stop.is_set():
        with engine.connect() as connection:
            peak = max(peak, connection.execute(sa.text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = :d AND backend_type = 'client backend'"),
                {"d": database}).scalar_one())
        time.sleep(0.1)
    out.put(peak)


def test_eight_workers_through_one_proxy_meet_n_trials_on_a_few_connections(proxy, postgres_url: str) -> None:  # type: ignore[no-untyped-def]
    import sqlalchemy as sa

    study, _ = st.create_once(st.open_storage(proxy.url, on_stale=lifecycle.stale_trial_callback), "proxied", ["minimize"])
    study.enqueue_trial({"x": 0.5})
    ctx = mp.get_context("spawn")
    barrier, stop, peak = ctx.Barrier(8), ctx.Event(), ctx.Queue()
    server = sa.engine.make_url(urls.normalize(postgres_url))
    watcher = ctx.Process(target=_peak_connections, args=(
        server.set(database="postgres").render_as_string(hide_password=False), server.database, stop, peak))
    watcher.start()
    workers = [ctx.Process(target=_no_op_worker, args=(proxy.url, "proxied", 40, barrier)) for _ in range(8)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=600)
    stop.set()
    watcher.join(timeout=60)
    assert [w.exitcode for w in workers] == [0] * 8
    trials = study.get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    surplus = [t for t in trials if t.system_attrs.get(k.OVER_BUDGET)]
    assert len(complete) == 40 and len(complete) + len(surplus) == len(trials), (len(complete), len(surplus))
    assert trials[0].params == {"x": 0.5}
    assert len({t.user_attrs[k.PID] for t in complete}) > 1
    assert peak.get(timeout=10) <= proxy_server.CONNECTIONS  # the proxy's, whatever the number of workers


def _victim(url: str, name: str, started) -> None:  # type: ignore[no-untyped-def]
    """A worker whose trial writes its resume checkpoint's attributes, then hangs until killed."""
    os.environ.update(FAST_HEARTBEAT)
    from search.runtime.worker import run_trials

    def objective(trial: optuna.Trial) -> float:
        trial.suggest_float("x", 0.0, 1.0)
        trial.set_user_attr(k.RESUME_ARTIFACT, "checkpoint-of-the-first-epoch")
        trial.set_user_attr(k.RESUME_EPOCH, 1)
        started.set()
        time.sleep(600)
        return 0.0

    run_trials(st.load_study(st.open_storage(url, on_stale=lifecycle.stale_trial_callback), name), objective, 3)


def _survivor(url: str, name: str) -> None:  # type: ignore[no-untyped-def]
    """A worker elsewhere: each trial records the checkpoint it would resume from."""
    os.environ.update(FAST_HEARTBEAT)
    from search.runtime.worker import run_trials

    def objective(trial: optuna.Trial) -> float:
        trial.set_user_attr("resumes_from", trial.user_attrs.get(k.RESUME_EPOCH))
        return trial.suggest_float("x", 0.0, 1.0)

    run_trials(st.load_study(st.open_storage(url, on_stale=lifecycle.stale_trial_callback), name), objective, 3)


def test_a_dead_worker_is_found_through_the_proxy_and_its_trial_resumes(proxy) -> None:  # type: ignore[no-untyped-def]
    """A worker on another machine is SIGKILLed mid-trial and the proxy then too; once the
    proxy is back, a worker elsewhere finds the trial's heartbeat stopped, and runs its copy
    from the checkpoint. Three trials count, no more."""
    study, _ = st.create_once(st.open_storage(proxy.url, on_stale=lifecycle.stale_trial_callback), "dead", ["minimize"])
    ctx = mp.get_context("spawn")
    started = ctx.Event()
    victim = ctx.Process(target=_victim, args=(proxy.url, "dead", started))
    victim.start()
    assert started.wait(timeout=120)
    time.sleep(1.5)  # a heartbeat or two through the proxy
    os.kill(victim.pid, signal.SIGKILL)
    victim.join()
    proxy.kill()
    proxy.start()
    survivor = ctx.Process(target=_survivor, args=(proxy.url, "dead"))
    survivor.start()
    survivor.join(timeout=300)
    assert survivor.exitcode == 0
    trials = study.get_trials()
    killed = trials[0]
    assert killed.state == TrialState.FAIL and killed.user_attrs[k.FAIL_REASON] == "heartbeat stopped"
    assert killed.system_attrs[px.HEARTBEAT_KEY] > 0  # it did beat, through the proxy
    copy = next(t for t in trials if t.system_attrs.get(k.FAILED_TRIAL) == killed.number)
    assert copy.state == TrialState.COMPLETE and copy.params == killed.params
    assert copy.user_attrs["resumes_from"] == 1
    assert len([t for t in trials if t.state == TrialState.COMPLETE]) == 3
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]


@pytest.mark.slow
def test_a_study_runs_through_the_proxy_while_a_worker_and_the_proxy_are_killed(proxy, postgres_url: str,  # type: ignore[no-untyped-def]
                                                                                 tmp_path: Path) -> None:
    """The real command through a proxy: its worker is SIGKILLed after an epoch checkpoint (the
    launcher retries the trial, which resumes), then the proxy is SIGKILLed and started again
    (launcher and worker wait for it). The run finishes with exactly n_trials."""
    study_file = tiny_study(tmp_path / "study.toml", "through", n_trials=2, max_epochs=4, baseline=False,
                            steps_per_epoch=4)
    log = tmp_path / "launcher.log"
    launcher = start_cli("search", "run", study_file, "--storage", proxy.url, "--workers", "1",
                         "--out", tmp_path / "run", log=log, env={"FLEXUNET_HEARTBEAT_INTERVAL": "1", "FLEXUNET_GRACE_PERIOD": "20"})
    from test_reliability import _running_at_epoch, _wait_for

    victim = _wait_for(_running_at_epoch(postgres_url, "through", 1), 300, "a trial past epoch 1", launcher, log)
    os.kill(victim.user_attrs[k.PID], signal.SIGKILL)
    _wait_for(lambda: next((t for t in optuna.load_study(study_name="through", storage=shared_storage(postgres_url))
                            .get_trials(states=(TrialState.RUNNING,)) if t.user_attrs.get(k.PID) != victim.user_attrs[k.PID]),
                           None), 300, "the replacement worker's trial", launcher, log)
    proxy.kill()
    time.sleep(2)
    proxy.start()
    assert launcher.wait(timeout=600) == 0, log.read_text()
    trials = optuna.load_study(study_name="through", storage=shared_storage(postgres_url)).get_trials()
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 2 and not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    killed = next(t for t in trials if t.number == victim.number)
    assert killed.state == TrialState.FAIL and killed.user_attrs[k.FAIL_REASON] == "worker killed (SIGKILL)"
    retry = next(t for t in trials if t.system_attrs.get(k.FAILED_TRIAL) == killed.number)
    assert retry.state == TrialState.COMPLETE and retry.user_attrs[k.RESUMED_FROM_EPOCH] >= 1
    status = run_cli("search", "status", "--study", "through", "--storage", proxy.url)
    assert status.returncode == 0 and "through" in status.stdout, status.stdout + status.stderr
    from search import load_study

    opened = load_study("through", proxy.url)  # the Python API through the proxy
    assert opened.best_trial.number in {t.number for t in finished}
    assert opened.status()[0].startswith("study 'through' on grpc://")
    # Export and report read the study through the proxy too (no refit in this study: the best
    # search trial, as --no-refit exports it).
    import json

    from search.paths import MODEL_FILE
    from search.results.report import REPORT_FILE

    export = run_cli("search", "export", study_file, "--storage", proxy.url, "--run-dir", tmp_path / "run",
                     "--out", tmp_path / "best")
    assert export.returncode == 0, export.stdout + export.stderr
    best = max((t for t in finished if t.value is not None), key=lambda t: t.value)
    assert json.loads((tmp_path / "best" / "metrics.json").read_text())["trial"] == best.number
    assert (tmp_path / "best" / MODEL_FILE).stat().st_size > 0
    report = run_cli("search", "report", study_file, "--storage", proxy.url, "--run-dir", tmp_path / "run",
                     "--out", tmp_path / "report")
    assert report.returncode == 0 and "warning" not in report.stderr, report.stdout + report.stderr
    page = (tmp_path / "report" / REPORT_FILE).read_text(encoding="utf-8")
    assert "Missing:" not in page and "through" in page

"""Nothing is lost when workers die, databases restart or trials run out of memory: real processes,
real signals, real servers."""

from __future__ import annotations

import os
import re
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import FrozenTrial, TrialState

from conftest import shared_storage, start_cli, tiny_study

pytestmark = pytest.mark.slow
FAST_HEARTBEAT = {"FLEXUNET_HEARTBEAT_INTERVAL": "1", "FLEXUNET_GRACE_PERIOD": "4"}
# Long enough trials to be caught mid-way: six epochs of four batches.
SLOW_TRIALS = dict(max_epochs=6, baseline=False, steps_per_epoch=4)


def _study(url: str, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=shared_storage(url))


def _wait_for(condition: Callable[[], Any], timeout: float, what: str,
              launcher: subprocess.Popen | None = None, log: Path | None = None) -> Any:
    """What ``condition`` returns once it is not None; ``timeout`` bounds the wait on a loaded
    machine, it measures nothing."""
    end = time.time() + timeout
    while time.time() < end:
        found = condition()
        if found is not None:
            return found
        if launcher is not None and launcher.poll() is not None:
            raise AssertionError(f"the run ended before {what}: {log.read_text() if log else ''}")
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}: {log.read_text() if log else ''}")


def _running_at_epoch(url: str, name: str, epoch: int) -> Callable[[], FrozenTrial | None]:
    def check() -> FrozenTrial | None:
        try:
            trials = _study(url, name).get_trials(states=(TrialState.RUNNING,))
        except (KeyError, optuna.exceptions.StorageInternalError):
            return None
        return next((t for t in trials if t.user_attrs.get("resume_epoch", 0) >= epoch), None)

    return check


def _check_complete(study: optuna.Study, n_trials: int) -> list[FrozenTrial]:
    trials = study.get_trials()
    assert not [t.number for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == n_trials, [(t.number, t.state.name) for t in trials]
    return trials


def _retry_of(trials: list[FrozenTrial], number: int) -> FrozenTrial:
    return next(t for t in trials if t.system_attrs.get("failed_trial") == number)


@pytest.mark.db
def test_a_killed_worker_is_caught_by_the_heartbeat_and_its_trial_resumes(tmp_path: Path,
                                                                          postgres_url: str) -> None:
    """A worker on "another machine" (no launcher watching it) is SIGKILLed mid-trial: its
    heartbeat stops, the trial is failed within the grace period, and a worker elsewhere
    retries it from its last epoch checkpoint."""
    # Six trials: the launcher's own worker must not finish them all before the other machine's
    # worker has started (a .ci/run saw it finish three in 45 s, before the other took one).
    study_file = tiny_study(tmp_path / "study.toml", "killed", n_trials=6, **SLOW_TRIALS)
    log = tmp_path / "launcher.log"
    launcher = start_cli("search", "run", study_file, "--storage", postgres_url, "--workers", "1",
                         "--out", tmp_path / "here", log=log, env=FAST_HEARTBEAT)
    check = _running_at_epoch(postgres_url, "killed", 1)
    _wait_for(lambda: _study(postgres_url, "killed") if _study_exists(postgres_url, "killed") else None, 120,
              "the study", launcher, log)
    # The lone worker of the other machine, with no launcher watching it, runs the plan the
    # launcher wrote (the prepared data is shared through the study folder).
    plan = _wait_for(lambda: next(iter((tmp_path / "here" / "logs").glob("plan-*.json")), None), 60,
                     "the launcher's worker plan", launcher, log)
    elsewhere = subprocess.Popen(
        [sys.executable, "-m", "search.runtime.worker", str(plan)],
        env={**os.environ, **FAST_HEARTBEAT, "FLEXUNET_STORAGE": postgres_url, "FLEXUNET_THREADS": "1"},
        stdout=(tmp_path / "elsewhere.log").open("w"), stderr=subprocess.STDOUT)
    victim = _wait_for(lambda: (lambda t: t if t and t.user_attrs.get("pid") == elsewhere.pid else None)(check()),
                       300, "the other machine's trial to pass epoch 1", launcher, log)
    elsewhere.send_signal(signal.SIGKILL)
    elsewhere.wait()
    # No launcher watches that worker: only its stopped heartbeat can fail the trial (the wait is
    # a bound, not a speed test: the grace period is 4 s, a loaded machine may take longer).
    failed = _wait_for(lambda: next((t for t in _study(postgres_url, "killed").get_trials(states=(TrialState.FAIL,))
                                     if t.number == victim.number), None), 300, "the heartbeat to fail the trial")
    assert launcher.wait(timeout=600) == 0, log.read_text()
    trials = _check_complete(_study(postgres_url, "killed"), 6)
    retry = _retry_of(trials, failed.number)
    assert retry.state == TrialState.COMPLETE and retry.params == failed.params
    assert retry.user_attrs["resumed_from_epoch"] >= 1  # not from scratch
    assert retry.user_attrs["epochs_run"] == 6


def _study_exists(url: str, name: str) -> bool:
    try:
        return name in [s.study_name for s in optuna.get_all_study_summaries(shared_storage(url))]
    except Exception:
        return False


@pytest.mark.db
def test_a_worker_killed_under_the_launcher_is_replaced_and_its_trial_resumes(tmp_path: Path,
                                                                             postgres_url: str) -> None:
    study_file = tiny_study(tmp_path / "study.toml", "reaped", n_trials=2, **SLOW_TRIALS)
    log = tmp_path / "launcher.log"
    launcher = start_cli("search", "run", study_file, "--storage", postgres_url, "--workers", "2",
                         "--out", tmp_path / "run", log=log, env=FAST_HEARTBEAT)
    victim = _wait_for(_running_at_epoch(postgres_url, "reaped", 1), 300, "a trial past epoch 1", launcher, log)
    os.kill(victim.user_attrs["pid"], signal.SIGKILL)
    assert launcher.wait(timeout=600) == 0, log.read_text()
    assert "died (SIGKILL); starting another" in log.read_text()
    trials = _check_complete(_study(postgres_url, "reaped"), 2)
    killed = next(t for t in trials if t.number == victim.number)
    assert killed.state == TrialState.FAIL and killed.user_attrs["fail_reason"] == "worker killed (SIGKILL)"
    retry = _retry_of(trials, killed.number)
    assert retry.state == TrialState.COMPLETE and retry.user_attrs["resumed_from_epoch"] >= 1


def test_a_database_restart_is_survived(tmp_path: Path, throwaway_postgres) -> None:  # type: ignore[no-untyped-def]
    url, restart = throwaway_postgres
    study_file = tiny_study(tmp_path / "study.toml", "restart", n_trials=2, **SLOW_TRIALS)
    log = tmp_path / "launcher.log"
    launcher = start_cli("search", "run", study_file, "--storage", url, "--workers", "2", "--out", tmp_path / "run",
                         log=log)
    _wait_for(_running_at_epoch(url, "restart", 1), 300, "a trial past epoch 1", launcher, log)

    def logs() -> str:
        return "".join(p.read_text() for p in (tmp_path / "run" / "logs").glob("*.log")) + log.read_text()

    # The database stays down until someone has noticed (not for a fixed time, which a busy
    # machine's workers may sleep through), then comes back.
    restart(lambda: _wait_for(lambda: "unreachable" in logs() or None, 300, "a process to notice the outage"))
    assert launcher.wait(timeout=600) == 0, log.read_text()
    assert "unreachable" in logs()  # they noticed, waited, and went on
    trials = _check_complete(_study(url, "restart"), 2)
    assert not [t for t in trials if t.state == TrialState.FAIL]


def test_a_non_finite_loss_fails_the_trial_and_the_worker_goes_on(tmp_path: Path) -> None:
    # Decoupled weight decay of lr * wd = 10 multiplies every weight by -9 at each step: the
    # loss overflows to inf within a few dozen batches, every time. The other choice is sane.
    study_file = tiny_study(tmp_path / "study.toml", "nan", n_trials=2, baseline=False,
                            steps_per_epoch=30, fixed='optimizer = "AdamW"\nweight_decay = 1.0',
                            space='learning_rate = { type = "categorical", choices = [10.0, 0.001] }')
    log = tmp_path / "run.log"
    run = start_cli("search", "run", study_file, "--out", tmp_path / "run", log=log)
    assert run.wait(timeout=600) == 0, log.read_text()
    trials = _study(f"sqlite:///{tmp_path / 'run' / 'study.db'}", "nan").get_trials()
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert failed and all("non-finite loss" in t.user_attrs["fail_reason"] for t in failed)
    assert all(t.params["learning_rate"] == 10.0 for t in failed)
    later = [t for t in trials if t.state == TrialState.COMPLETE and t.number > failed[0].number]
    assert later and later[0].user_attrs["pid"] == failed[0].user_attrs["pid"]  # the same worker went on


def test_out_of_memory_fails_the_trial_and_the_worker_slot_goes_on(tmp_path: Path) -> None:
    """A CPU worker runs out of memory in one of two ways, and which one depends on where the
    allocation fails: the process crashes (SIGSEGV, SIGBUS or SIGABRT), or TensorFlow raises
    (ResourceExhaustedError, MemoryError). Either way the trial fails with an out-of-memory
    reason and is not retried (it would run out again), and the remaining trial completes: in a
    new worker after a crash, in the same one after an error. The memory budget is lifted here
    so that the huge trial is not rejected before training, as it would be by default."""
    study_file = tiny_study(tmp_path / "study.toml", "oom", n_trials=2, baseline=False, steps_per_epoch=1,
                            space='batch_size = { type = "categorical", choices = [4096, 2] }')
    text = study_file.read_text().replace('base_filters = { type = "int", low = 4, high = 8, step = 4 }\n',
                                          'base_filters = { type = "categorical", choices = [512, 4] }\n')
    study_file.write_text(text.replace("[budget]", "[budget]\nmax_memory_gb = 1000"))
    # The huge trial first, then a small one: queued trials run in order, whatever the sampler.
    from search.runtime import context as runner
    from search.spec import study_file as sf

    spec = sf.load(study_file)
    ctx = runner.RunContext.resolve(spec, out=tmp_path / "run", storage=f"sqlite:///{tmp_path / 'run' / 'study.db'}",
                                    artifacts=None)
    ctx.prepare_dataset()
    study = runner.create_study(ctx, ctx.open_dataset())
    study.enqueue_trial({"base_filters": 512, "batch_size": 4096, "num_layers": 3})
    study.enqueue_trial({"base_filters": 4, "batch_size": 2, "num_layers": 2})
    log = tmp_path / "run.log"
    limit = 8 * 2**30

    run = subprocess.Popen([sys.executable, "-m", "flexunet.cli", "search", "run", str(study_file), "--out",
                            str(tmp_path / "run")], stdout=log.open("w"), stderr=subprocess.STDOUT,
                           preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)))
    assert run.wait(timeout=600) == 0, log.read_text()
    trials = _study(f"sqlite:///{tmp_path / 'run' / 'study.db'}", "oom").get_trials()
    # Not retried: exactly the two queued trials, the huge one FAIL, the sane one COMPLETE.
    assert [(t.number, t.state) for t in trials] == [(0, TrialState.FAIL), (1, TrialState.COMPLETE)], log.read_text()
    failed, completed = trials
    assert failed.params["batch_size"] == 4096 and completed.params["batch_size"] == 2
    reason = failed.user_attrs["fail_reason"]
    crash = re.fullmatch(r"worker crashed \((SIGSEGV|SIGBUS|SIGABRT)\), most likely out of memory", reason)
    if crash:
        assert f"died ({crash.group(1)}); starting another" in log.read_text()
        assert completed.user_attrs["pid"] != failed.user_attrs["pid"]  # the slot's new worker
    else:
        assert reason.startswith("out of memory"), reason
        assert completed.user_attrs["pid"] == failed.user_attrs["pid"]  # the same worker went on
        assert "starting another" not in log.read_text()


def test_device_out_of_memory_is_recognised_on_both_backends() -> None:
    """A GPU running out of memory raises (unlike a CPU): TensorFlow's ResourceExhaustedError, or
    JAX's runtime error whose message starts with RESOURCE_EXHAUSTED. Either fails the trial with
    an out-of-memory reason; any other error is left to propagate."""
    import tensorflow as tf

    from search.trial.objective import _out_of_device_memory

    assert _out_of_device_memory(tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor"))
    assert _out_of_device_memory(RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 4.0GiB"))
    assert not _out_of_device_memory(ValueError("a shape mismatch, not RESOURCE_EXHAUSTED"))
    assert not _out_of_device_memory(MemoryError())


def test_a_baseline_outside_the_searched_ranges_can_be_retried() -> None:
    """The seed baseline's values may lie outside the study's ranges (base 16 filters in a space
    of 4..8): its retry after a dead worker is queued, and runs with the same values."""
    from search.trial import lifecycle

    study = optuna.create_study()
    study.enqueue_trial({"base_filters": 16}, user_attrs={"baseline": True})
    trial = study.ask()
    with pytest.warns(UserWarning, match="out of range"):
        assert trial.suggest_int("base_filters", 4, 8, step=4) == 16
    assert lifecycle.retry(study, study.trials[0])
    lifecycle.fail(study, study.trials[0], "worker killed (SIGKILL)", retry_it=False)
    retry = study.ask()
    assert study.trials[1].system_attrs["failed_trial"] == 0 and retry.user_attrs["baseline"]
    with pytest.warns(UserWarning, match="out of range"):
        assert retry.suggest_int("base_filters", 4, 8, step=4) == 16

"""Interrupted runs resume: a launcher stopped with Ctrl-C or SIGTERM stops its workers in order,
and ``kill -9`` of its whole process group ends them too; the same command again resumes the
interrupted trials from their last epoch. Real processes, real signals, SQLite."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from optuna.trial import TrialState

from conftest import start_cli, tiny_study
from test_reliability import SLOW_TRIALS, _check_complete, _retry_of, _running_at_epoch, _study, _wait_for

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_run_fails_its_trials_and_queues_them_to_resume(tmp_path: Path, signum: int) -> None:
    """Either signal stops the workers and queues each stopped trial again; after SIGINT the
    rerun resumes it (SIGTERM leaves the same stored state, so one rerun covers both)."""
    study_file = tiny_study(tmp_path / "study.toml", "interrupted", n_trials=2, **SLOW_TRIALS)
    url = f"sqlite:///{tmp_path / 'run' / 'study.db'}"
    log = tmp_path / "first.log"
    launcher = start_cli("search", "run", study_file, "--workers", "2", "--out", tmp_path / "run", log=log)
    victim = _wait_for(_running_at_epoch(url, "interrupted", 2), 300, "a trial past epoch 2", launcher, log)
    pids = {t.user_attrs["pid"] for t in _study(url, "interrupted").get_trials(states=(TrialState.RUNNING,))}
    launcher.send_signal(signum)
    assert launcher.wait(timeout=120) == 130, log.read_text()
    assert "run the same command again to resume" in log.read_text()
    for pid in pids:  # the workers are gone, not orphaned
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    trials = _study(url, "interrupted").get_trials()
    stopped = next(t for t in trials if t.number == victim.number)
    assert stopped.state == TrialState.FAIL and stopped.user_attrs["fail_reason"] == "interrupted"
    assert _retry_of(trials, victim.number).state == TrialState.WAITING
    assert not [t for t in trials if t.state == TrialState.RUNNING]

    if signum == signal.SIGINT:  # the state left is the same for both signals: resuming it once is enough
        _rerun_resumes(study_file, tmp_path, url, "interrupted", victim.number)


def test_workers_end_with_a_killed_launcher_and_the_rerun_resumes_their_trial(tmp_path: Path) -> None:
    """``kill -9`` of a launcher's whole process group (a batch scheduler's cancel): its workers,
    each in a session of its own, learn it from the kernel (PR_SET_PDEATHSIG), interrupt their
    trials (queued to resume) and exit."""
    study_file = tiny_study(tmp_path / "study.toml", "orphans", n_trials=2, **SLOW_TRIALS)
    url = f"sqlite:///{tmp_path / 'run' / 'study.db'}"
    log = tmp_path / "first.log"
    launcher = subprocess.Popen([sys.executable, "-m", "flexunet.cli", "search", "run", str(study_file),
                                 "--workers", "2", "--out", str(tmp_path / "run")],
                                stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    victim = _wait_for(_running_at_epoch(url, "orphans", 2), 300, "a trial past epoch 2", launcher, log)
    pids = {t.user_attrs["pid"] for t in _study(url, "orphans").get_trials(states=(TrialState.RUNNING,))}
    os.killpg(launcher.pid, signal.SIGKILL)
    launcher.wait()
    end = time.time() + 10
    while time.time() < end and any(_alive(pid) for pid in pids):
        time.sleep(0.2)
    assert not [pid for pid in pids if _alive(pid)], "workers outlived their launcher by 10 s"
    trials = _study(url, "orphans").get_trials()
    stopped = next(t for t in trials if t.number == victim.number)
    assert stopped.state == TrialState.FAIL and stopped.user_attrs["fail_reason"] == "interrupted"

    _rerun_resumes(study_file, tmp_path, url, "orphans", victim.number)


def _rerun_resumes(study_file: Path, tmp_path: Path, url: str, name: str, victim: int) -> None:
    """Run the study again in the same folder: it completes, and the stopped trial's retry
    resumes from its checkpoint (epoch 2 or later), not from scratch. One worker does: the
    first run's two are what the stop is about."""
    log = tmp_path / "second.log"
    again = start_cli("search", "run", study_file, "--out", tmp_path / "run", log=log)
    assert again.wait(timeout=600) == 0, log.read_text()
    trials = _check_complete(_study(url, name), 2)
    retry = _retry_of(trials, victim)
    assert retry.state == TrialState.COMPLETE and retry.user_attrs["resumed_from_epoch"] >= 2


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead, only not yet reaped by its new parent.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False

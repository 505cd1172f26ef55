"""The launcher's view of a run: worker environments and progress lines."""

from __future__ import annotations

import io
import os

import optuna
from optuna.trial import TrialState

from search.runtime import run as runner
import time

from search.runtime.progress import Estimate, Watcher, estimate_left


def test_workers_get_a_gpu_each_or_a_share_of_the_cpu() -> None:
    envs = [runner.worker_env(i, 3, ("0", "1")) for i in range(3)]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["0", "1", "0"]
    # Three workers share the CPU's threads whether or not they train on a GPU.
    assert all(e["FLEXUNET_THREADS"] == str(max(1, (os.cpu_count() or 1) // 3)) for e in envs)
    cpu = runner.worker_env(0, 2, ())
    assert cpu["FLEXUNET_THREADS"] == cpu["OMP_NUM_THREADS"] == str(max(1, (os.cpu_count() or 1) // 2))
    assert 0 < float(cpu["FLEXUNET_MEMORY_GB"]) < os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def _study() -> optuna.Study:
    study = optuna.create_study(direction="maximize")
    done = study.ask()
    done.set_user_attr("params", 1234)
    study.tell(done, 0.25)
    running = study.ask()
    for key, value in {"host": "node7", "pid": 4242, "epoch": 3, "last_val_foreground_dice": 0.1875}.items():
        running.set_user_attr(key, value)
    return study


def test_live_lines_per_worker_and_a_study_line() -> None:
    stream = io.StringIO()
    watcher = Watcher(_study(), n_trials=4, max_epochs=10, stream=stream, live=True)
    watcher.update()
    text = stream.getvalue()
    assert "worker node7:4242" in text and "trial 1" in text and "epoch   3/10" in text and "0.1875" in text
    assert "study: 1/4 finished (1 complete, 0 pruned, 0 failed), best 0.2500" in text
    # The one finished trial ended before this launcher started: no pace to estimate from.
    assert "left" not in text
    watcher.update()
    assert "\x1b[" in stream.getvalue()  # redrawn in place, not appended


def test_plain_log_when_not_a_terminal() -> None:
    study = _study()
    stream = io.StringIO()
    watcher = Watcher(study, n_trials=4, max_epochs=10, stream=stream, live=False)
    watcher.update()
    trial = study.ask()
    study.tell(trial, state=TrialState.PRUNED)
    watcher.update()
    watcher.update(final=True)
    text = stream.getvalue()
    assert "\x1b[" not in text
    assert text.count("trial 2, PRUNED") == 1  # each finished trial once
    assert "best:" in text and "elapsed" in text


def test_estimate_from_the_pace_of_this_run() -> None:
    assert estimate_left(0, 10, 100.0, timeout_left=None) is None  # nothing finished yet
    assert estimate_left(4, 6, 120.0, timeout_left=None) == Estimate(180.0, by_timeout=False)
    assert estimate_left(4, 0, 120.0, timeout_left=None) == Estimate(0.0, by_timeout=False)


def test_estimate_never_exceeds_the_timeout_and_says_so() -> None:
    # The run: timeout 780 s; 20 trials at 8 minutes each would claim hours.
    estimate = estimate_left(1, 19, 480.0, timeout_left=300.0)
    assert estimate == Estimate(300.0, by_timeout=True)
    assert estimate.text() == "at most 5m00s left (the timeout ends the study first)"
    assert estimate_left(0, 20, 30.0, timeout_left=750.0) == Estimate(750.0, by_timeout=True)
    assert estimate_left(3, 3, 300.0, timeout_left=900.0) == Estimate(300.0, by_timeout=False)
    assert estimate_left(3, 3, 300.0, timeout_left=-5.0) == Estimate(0.0, by_timeout=True)
    assert estimate_left(3, 3, 300.0, timeout_left=900.0).text() == "about 5m00s left"


def test_study_line_counts_only_trials_finished_in_this_run_and_respects_the_timeout() -> None:
    study = optuna.create_study(direction="maximize")
    stream = io.StringIO()
    watcher = Watcher(study, n_trials=20, max_epochs=2, stream=stream, live=True, deadline=time.time() + 780)
    for value in (0.1, 0.2):
        trial = study.ask()
        study.tell(trial, value)
    # As if the two trials had taken ten minutes: set just before the update, so that a slow
    # moment of a loaded machine since the watcher was made cannot show as 10m01s.
    watcher.started = time.time() - 600
    watcher.update()
    line = [x for x in stream.getvalue().splitlines() if "study:" in x][-1]
    assert "2/20 finished" in line and "elapsed 10m00s" in line
    # 18 trials at 5 minutes each would be 1h30m; the timeout has at most 13 minutes left.
    left = line.split("at most ")[1].split(" left")[0]
    assert left.endswith("s") and int(left.split("m")[0]) <= 13
    assert "(the timeout ends the study first)" in line


def test_study_line_counts_a_retry_series_once_and_not_the_trials_over_budget() -> None:
    from search.store import _internals
    from search import keys as k

    study = optuna.create_study(direction="maximize")
    for _ in range(2):
        study.tell(study.ask(), 0.5)
    first = study.ask()
    study.tell(first, state=TrialState.FAIL)  # its worker died
    for value in (None, 0.75):  # retried twice: the first retry fails too
        retry = study.ask()
        _internals.set_trial_system_attr(study, retry, k.FAILED_TRIAL, first.number)
        study.tell(retry, value, state=TrialState.FAIL if value is None else TrialState.COMPLETE)
    late = study.ask()  # found the budget of 3 full: never trained
    _internals.set_trial_system_attr(study, late, k.OVER_BUDGET, True)
    study.tell(late, state=TrialState.FAIL)
    stream = io.StringIO()
    Watcher(study, n_trials=3, max_epochs=2, stream=stream, live=True).update()
    line = [x for x in stream.getvalue().splitlines() if "study:" in x][-1]
    assert "3/3 finished (3 complete, 0 pruned, 0 failed, 2 retried, 1 over budget)" in line, line

"""The launcher's view of a run: worker environments and progress lines."""

from __future__ import annotations

import io
import os

import optuna
import pytest
from optuna.trial import TrialState

from search import run as runner
from search.progress import Watcher


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
    assert "study: 1/4 finished (1 complete, 0 pruned, 0 failed), best 0.2500" in text and "left" in text
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

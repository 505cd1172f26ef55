"""The Python API (search.Study) end to end on SQLite with two real worker processes: a spec
changed in Python runs as given, and configurations the config rejects are PRUNED, not crashes."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from optuna.trial import TrialState

from conftest import tiny_study
from search import Study
from search import keys as k

pytestmark = pytest.mark.slow


def test_a_study_changed_in_python_runs_as_given_and_infeasible_configs_are_pruned(tmp_path: Path) -> None:
    path = tiny_study(tmp_path / "study.toml", "api", n_trials=3, baseline=False)
    # dropout_rate * (num_layers - 1) must stay below 1: many samples of this space break it.
    text = path.read_text().replace('num_layers = { type = "int", low = 2, high = 3 }',
                                    'num_layers = { type = "int", low = 2, high = 4 }\n'
                                    'dropout_rate = { type = "float", low = 0.4, high = 0.6 }')
    path.write_text(text)
    study = Study.from_file(path, out=tmp_path / "run", n_trials=5)
    # Changed in Python after loading: the workers must train with one batch per epoch.
    study.spec = dataclasses.replace(study.spec, fixed={**study.spec.fixed, "steps_per_epoch": 1})
    created = study.create().optuna_study
    created.enqueue_trial({"base_filters": 4, "num_layers": 4, "dropout_rate": 0.5})  # 0.5 * 3 >= 1
    # ... and one that fits (0.45 * 1 < 1): the other three samples may all be infeasible.
    created.enqueue_trial({"base_filters": 4, "num_layers": 2, "dropout_rate": 0.45})

    result = study.run(workers=2)  # raises unless the budget was spent

    opened = study.open()
    everything = opened.optuna_study.get_trials()
    # Two workers may each ask for a trial when one slot is left: the loser's trial ends FAIL,
    # untrained, marked over budget, and is not counted (README: n_trials is met exactly).
    surplus = [t for t in everything if t.system_attrs.get(k.OVER_BUDGET)]
    assert all(t.state == TrialState.FAIL and t.user_attrs[k.STOP_REASON] == k.STOP_OVER_BUDGET
               and not t.intermediate_values for t in surplus)
    trials = [t for t in everything if t not in surplus]
    assert {t.state for t in trials} <= {TrialState.COMPLETE, TrialState.PRUNED}, [(t.number, t.state) for t in trials]
    assert len(trials) == 5  # n_trials, as overridden, exactly
    assert all(t.number > max(c.number for c in trials) for t in surplus)  # the last ones
    infeasible = [t for t in trials if t.user_attrs.get(k.STOP_REASON) == k.STOP_INFEASIBLE]
    assert infeasible and infeasible[0].number == 0
    assert all(t.state == TrialState.PRUNED and "dropout_rate" in t.user_attrs[k.INFEASIBLE_REASON]
               for t in infeasible)
    trained = [t for t in trials if t.state == TrialState.COMPLETE]
    assert trained and all(t.user_attrs[k.SETTINGS]["steps_per_epoch"] == 1 for t in trained)
    assert all(t.params["dropout_rate"] * (t.params["num_layers"] - 1) < 1 for t in trained)
    # Two worker processes ran, and every trial was theirs. (Not "each took a trial": one worker
    # may run all five while the other waits out a SQLite lock.)
    logs = sorted((tmp_path / "run" / "logs").glob("worker-*.log"))
    pids = {int(pid) for log in logs for pid in re.findall(r" worker (\d+) ", log.read_text())}
    assert len(logs) == 2 and len(pids) == 2, [log.read_text()[:300] for log in logs]
    assert {t.user_attrs[k.PID] for t in everything} <= pids

    assert result.study_name == "api" and result.states.get("COMPLETE", 0) == len(trained)
    assert result.states.get("COMPLETE", 0) + result.states.get("PRUNED", 0) == 5
    assert result.best_number == opened.best_trial.number and result.best_value == opened.best_trial.value
    lines = opened.status()
    assert lines[0].startswith("study 'api'") and f"{len(everything)} trials" in lines[0]
    assert opened.best_trial.number in {t.number for t in trained}
    report = opened.report(tmp_path / "report")
    assert (report.out / "report.html").is_file() and report.best.number == opened.best_trial.number


def test_a_run_that_does_not_end_raises_and_the_command_maps_it_to_its_exit_status(tmp_path: Path,
                                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Study.run() raises what the launcher's exit status meant; `flexunet search run` returns
    that status again (130 interrupted, 1 a worker failed; bad input is the one-line error, 2)."""
    from search import BadInput, StudyInterrupted, TrialsFailed
    from search import cli
    from search.runtime import run as launcher

    study = Study.from_file(tiny_study(tmp_path / "study.toml", "raises", n_trials=1), out=tmp_path / "run")
    for code, error in ((130, StudyInterrupted), (1, TrialsFailed)):
        monkeypatch.setattr(launcher, "run", lambda spec, options, code=code: code)
        with pytest.raises(error) as raised:
            study.run()
        assert raised.value.exit_code == code
        assert cli._exit_status(study.run) == code
    monkeypatch.undo()  # the launcher itself refuses these, before any process starts
    with pytest.raises(BadInput, match="--workers 0: need at least 1"):
        study.run(workers=0)
    with pytest.raises(BadInput, match="--workers-per-gpu 2: needs --gpus"):
        study.run(workers_per_gpu=2)

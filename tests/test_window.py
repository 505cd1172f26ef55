"""search.spec.window.WindowedSampler: TPE shown only a window of the study's trials, from a study
file's [sampler] section. The behaviour tests also guard search.store._internals.TrialsView: if a new
Optuna's TPE stopped reading trials through ``Study._get_trials`` / ``get_trials``, the window
would silently stop applying, and the first test here would fail."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from flexunet.errors import ConfigError
from search.spec import study_file
from search.spec.algorithms import make_sampler
from search.spec.window import WindowedSampler
from test_study_file import MINIMAL as STUDY_FILE

X = optuna.distributions.FloatDistribution(0.0, 1.0)


def _study_with_history(sampler: optuna.samplers.BaseSampler) -> optuna.Study:
    """60 old trials that say x near 0.1 is best, then 20 recent ones that say x near 0.9 is.

    The recent ones are worse than any old one, so only a sampler that sees the old trials
    (all of them, or the best) is drawn to 0.1."""
    study = optuna.create_study(direction="minimize", sampler=sampler)
    trials = [(0.1 + 0.8 * ((i * 37) % 60) / 60, lambda x: abs(x - 0.1)) for i in range(60)]
    trials += [(0.1 + 0.8 * ((i * 7) % 20) / 20, lambda x: 2 + abs(x - 0.9)) for i in range(20)]
    study.add_trials([optuna.trial.create_trial(params={"x": x}, distributions={"x": X}, value=f(x))
                      for x, f in trials])
    return study


def _mean_of_asks(study: optuna.Study, n: int = 12) -> float:
    xs = []
    for _ in range(n):
        trial = study.ask({"x": X})
        xs.append(trial.params["x"])
        study.tell(trial, state=TrialState.FAIL)  # seen by the window as finished, by TPE not at all
    return sum(xs) / n


@pytest.mark.parametrize("multivariate", [False, True])
def test_tpe_sees_only_the_window(multivariate: bool) -> None:
    def tpe() -> optuna.samplers.TPESampler:
        return optuna.samplers.TPESampler(n_startup_trials=5, multivariate=multivariate, seed=1)

    everything = _mean_of_asks(_study_with_history(tpe()))
    recent = _mean_of_asks(_study_with_history(WindowedSampler(tpe(), last=20)))
    recent_and_best = _mean_of_asks(_study_with_history(WindowedSampler(tpe(), last=20, best=10)))
    assert everything < 0.35, everything
    assert recent > 0.6, recent  # the last 20 are the trials that favour 0.9
    assert recent_and_best < 0.35, recent_and_best  # the best old trials favour 0.1 again


def test_visible_keeps_the_last_finished_the_best_complete_and_every_unfinished() -> None:
    study = optuna.create_study(direction="maximize")
    values = [5.0, 1.0, 9.0, 2.0, None, 3.0, 4.0, None]  # None: a FAIL trial
    for value in values:
        study.add_trial(optuna.trial.create_trial(value=value, state=TrialState.COMPLETE if value is not None
                                                  else TrialState.FAIL))
    running = study.ask()
    trials = study.get_trials(deepcopy=False)
    sampler = WindowedSampler(optuna.samplers.RandomSampler(), last=3, best=2)
    assert [t.number for t in sampler.visible(trials, study)] == [0, 2, 5, 6, 7, running.number]
    assert [t.number for t in WindowedSampler(optuna.samplers.RandomSampler(), last=3).visible(trials, study)] == [
        5, 6, 7, running.number]
    minimizing = optuna.create_study(direction="minimize")
    minimizing.add_trials(trials[:7])
    assert [t.number for t in sampler.visible(minimizing.get_trials(deepcopy=False), minimizing)] == [1, 3, 4, 5, 6]
    small = WindowedSampler(optuna.samplers.RandomSampler(), last=10, best=2)
    assert small.visible(trials, study) == trials  # fewer finished trials than the window holds
    with pytest.raises(ValueError, match="last"):
        WindowedSampler(optuna.samplers.RandomSampler(), last=0)
    two = optuna.create_study(directions=["maximize", "minimize"])
    two.add_trials([optuna.trial.create_trial(values=[1.0, 1.0]) for _ in range(8)])
    with pytest.raises(ValueError, match="single-objective"):
        sampler.visible(two.get_trials(deepcopy=False), two)


MINIMAL = STUDY_FILE + """[sampler]
name = "TPESampler"
n_startup_trials = 7
"""


def _spec(tmp_path: Path, extra: str) -> study_file.StudySpec:
    path = tmp_path / "study.toml"
    path.write_text(MINIMAL + extra, encoding="utf-8")
    return study_file.load(path)


def test_the_study_file_sampler_section_selects_the_window(tmp_path: Path) -> None:
    sampler = make_sampler(_spec(tmp_path, "window = 500\nwindow_best = 25\n"))
    assert isinstance(sampler, WindowedSampler) and (sampler.last, sampler.best) == (500, 25)
    assert isinstance(sampler.sampler, optuna.samplers.TPESampler)
    assert sampler.sampler._n_startup_trials == 7  # the other keys still reach TPESampler
    assert isinstance(make_sampler(_spec(tmp_path, "")), optuna.samplers.TPESampler)
    study = optuna.create_study(sampler=sampler)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=10)
    assert len(study.trials) == 10


@pytest.mark.parametrize("extra, fragment", [
    ("window = 0\n", "[sampler] window: expected a whole number >= 1, got 0"),
    ("window = 2.5\n", "[sampler] window: expected a whole number >= 1, got 2.5"),
    ("window = true\n", "[sampler] window: expected a whole number >= 1"),
    ("window = 10\nwindow_best = -1\n", "[sampler] window_best: expected a whole number >= 0, got -1"),
    ("window_best = 5\n", "[sampler] window_best: needs window"),
])
def test_bad_window_settings_name_the_key(tmp_path: Path, extra: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        make_sampler(_spec(tmp_path, extra))
    assert fragment in str(info.value) and "study.toml" in str(info.value)


def test_window_best_needs_one_objective(tmp_path: Path) -> None:
    path = tmp_path / "study.toml"
    path.write_text(MINIMAL.replace('name = "s"', 'name = "s"\nsecond_objective = "params"', 1)
                    + "window = 10\nwindow_best = 5\n", encoding="utf-8")
    spec = study_file.load(path)
    with pytest.raises(ConfigError, match=r"\[sampler\] window_best: needs a single objective"):
        make_sampler(spec)
    path.write_text(path.read_text(encoding="utf-8").replace("window_best = 5\n", ""), encoding="utf-8")
    assert isinstance(make_sampler(study_file.load(path)), WindowedSampler)  # the window alone is fine

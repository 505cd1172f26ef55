"""search.store._internals.bulk_add_trials against the installed Optuna: it writes Optuna's RDB trial
tables directly, so a study it fills must read back exactly as one filled by ``study.add_trials``.
A failure here names what a new Optuna release changed in its schema."""

from __future__ import annotations

import math
from pathlib import Path

import optuna
import pytest
from optuna.trial import FrozenTrial, TrialState

from search.store import _internals
from search import keys as k
from search.spec import space as sp
from search.spec import study_file

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_STUDY = ROOT / "studies" / "ct_ich_sample.toml"


def made_trials(n: int) -> list[FrozenTrial]:
    """Finished trials of the sample study's space, with what flexunet stores on a trial: its
    parameters (conditional ones too), user attrs (nested ones among them), intermediate values
    (NaN and infinities too), a system attr; COMPLETE, PRUNED and FAIL, values infinite too."""
    space = sp.bounded(study_file.load(SAMPLE_STUDY).space, 96, "test")
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=3))
    for i in range(n):
        trial = study.ask()
        sp.suggest(trial, space)
        trial.set_user_attr(k.HOST, "host-a")
        trial.set_user_attr(k.SETTINGS, {"num_layers": 4, "metrics": ["foreground_dice"], "dropout": 0.05})
        trial.set_user_attr(k.FOLD_DICE, [0.1 * i, None])
        for epoch in range(3):
            value = [0.25 * epoch + 0.01 * i, math.nan, math.inf, -math.inf][(epoch + i) % 4]
            trial.report(value, step=epoch)
        if i % 5 == 2:
            _internals.set_trial_system_attr(study, trial, k.OVER_BUDGET, True)
        state = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)[i % 3]
        value = (math.inf if i == 3 else 0.01 * i) if state == TrialState.COMPLETE else None
        study.tell(trial, value, state=state)
    return study.trials


def _comparable(trial: FrozenTrial) -> tuple:
    """Everything a trial holds but its storage id, with NaN made comparable."""
    def same(x: object) -> object:
        return "nan" if isinstance(x, float) and math.isnan(x) else x

    return (trial.number, trial.state, trial.values, trial.params, trial.distributions, trial.user_attrs,
            trial.system_attrs, {s: same(v) for s, v in trial.intermediate_values.items()},
            trial.datetime_start, trial.datetime_complete)


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'bulk.db'}"
    return request.getfixturevalue("postgres_url")


def test_optunas_trial_tables_are_as_bulk_add_trials_writes_them() -> None:
    from optuna.storages._rdb import models

    expected = {
        models.TrialModel: {"trial_id", "number", "study_id", "state", "datetime_start", "datetime_complete"},
        models.TrialParamModel: {"trial_id", "param_name", "param_value", "distribution_json"},
        models.TrialValueModel: {"trial_id", "objective", "value", "value_type"},
        models.TrialIntermediateValueModel: {"trial_id", "step", "intermediate_value", "intermediate_value_type"},
        models.TrialUserAttributeModel: {"trial_id", "key", "value_json"},
        models.TrialSystemAttributeModel: {"trial_id", "key", "value_json"},
    }
    for model, columns in expected.items():
        have = {c.name for c in model.__table__.columns}
        assert columns <= have, f"Optuna's {model.__tablename__} table lost columns {sorted(columns - have)}"
    assert models.TrialValueModel.value_to_stored_repr(math.inf)[1].name == "INF_POS"
    assert models.TrialIntermediateValueModel.intermediate_value_to_stored_repr(math.nan)[1].name == "NAN"


def test_a_bulk_filled_study_reads_back_as_one_filled_by_add_trials(url: str) -> None:
    made = made_trials(12)
    assert {t.state for t in made} == {TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL}
    storage = optuna.storages.RDBStorage(url)
    by_optuna = optuna.create_study(storage=storage, study_name="add-trials", direction="maximize")
    by_optuna.add_trials(made[:5])
    by_optuna.add_trials(made[5:])
    bulk = optuna.create_study(storage=storage, study_name="bulk", direction="maximize")
    assert _internals.bulk_add_trials(bulk, made[:5]) == list(range(5))
    assert _internals.bulk_add_trials(bulk, made[5:]) == list(range(5, 12))  # numbering goes on
    assert _internals.bulk_add_trials(bulk, []) == []

    fresh = optuna.storages.RDBStorage(url)  # no cache of the writes above
    read_optuna = optuna.load_study(study_name="add-trials", storage=fresh).get_trials()
    read_bulk = optuna.load_study(study_name="bulk", storage=fresh).get_trials()
    assert [_comparable(t) for t in read_bulk] == [_comparable(t) for t in read_optuna]
    assert [_comparable(t) for t in read_bulk] == [_comparable(t) for t in made]
    assert optuna.load_study(study_name="bulk", storage=fresh).best_trial.number == 3  # value inf

    # The study goes on as any other: TPE reads the trials, the next trial is numbered after them.
    going_on = optuna.load_study(study_name="bulk", storage=url, sampler=optuna.samplers.TPESampler(
        n_startup_trials=2, multivariate=True, group=True, seed=0))
    trial = going_on.ask()
    sp.suggest(trial, sp.bounded(study_file.load(SAMPLE_STUDY).space, 96, "test"))
    going_on.tell(trial, 0.5)
    assert trial.number == 12 and len(going_on.trials) == 13


def test_bulk_add_trials_refuses_what_optuna_would_refuse(tmp_path: Path) -> None:
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'bulk.db'}")
    study = optuna.create_study(storage=storage)
    x = optuna.distributions.FloatDistribution(0, 1)
    study.add_trial(optuna.trial.create_trial(params={"x": 0.5}, distributions={"x": x}, value=1.0))
    other = optuna.distributions.CategoricalDistribution(["a", "b"])
    with pytest.raises(ValueError, match="compatible|Cannot set different distribution kind"):
        _internals.bulk_add_trials(study, [optuna.trial.create_trial(params={"x": "a"}, distributions={"x": other},
                                                                     value=1.0)])
    with pytest.raises(ValueError, match="only finished trials"):
        _internals.bulk_add_trials(study, [optuna.trial.create_trial(state=TrialState.RUNNING)])
    with pytest.raises(ValueError, match="2 values for 1 objectives"):
        _internals.bulk_add_trials(study, [optuna.trial.create_trial(values=[1.0, 2.0])])
    with pytest.raises(TypeError, match="RDB storage"):
        _internals.bulk_add_trials(optuna.create_study(), [])
    assert len(study.trials) == 1  # nothing half-written

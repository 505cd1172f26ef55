"""The seed baseline's values outside a categorical's choices: the baseline trains with them,
no searched trial can sample them, and Optuna's samplers go on with a baseline trial that lacks
the parameter (the sample study's 11x11 kernel, left out of its choices 3, 5, 7)."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from flexunet import config as cfg
from search.spec import space as sp
from search.spec import study_file

STUDY = Path(__file__).resolve().parents[1] / "studies" / "ct_ich_sample.toml"


def test_the_sample_study_baseline_keeps_the_seed_kernel_without_it_being_a_choice(prepared64: Path) -> None:
    spec = study_file.load(STUDY)
    space = sp.bounded(spec.space, 64, str(STUDY))
    kernels = next(p for p in space if p.name == "base_kernels")
    assert 11 not in kernels.choices
    unsampled = sp.baseline_unsampled(space, 64)
    assert unsampled == {"base_kernels": 11}
    enqueued = sp.baseline_params(spec, space, 64)
    assert "base_kernels" not in enqueued and enqueued["learning_rate"] == pytest.approx(7e-5)

    base = cfg.load(prepared64 / "train_eval_infer.config")
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=2))
    study.enqueue_trial(enqueued, user_attrs={"baseline": True})
    trial = study.ask()
    values = sp.suggest(trial, space, unsampled)
    config = sp.trial_config(base, spec, 64, values, baseline=True)
    assert config.model.base_kernels == (11, 11) and config.model.learning_rate == pytest.approx(7e-5)
    assert "base_kernels" not in trial.params  # Optuna cannot store 11 in CategoricalDistribution([3, 5, 7])
    with pytest.raises(ValueError):
        kernels_distribution = optuna.distributions.CategoricalDistribution(list(kernels.choices))
        kernels_distribution.to_internal_repr(11)
    study.tell(trial, 0.01)
    # TPE goes on past its startup trials with the baseline lacking the parameter, and draws
    # only the offered kernels.
    drawn = set()
    for i in range(8):
        searched = study.ask()
        drawn.add(sp.suggest(searched, space)["base_kernels"])
        study.tell(searched, 0.02 * i)
    assert drawn <= {3, 5, 7} and len(study.trials) == 9

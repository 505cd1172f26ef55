"""The private attributes of Optuna and TensorFlow that flexunet uses (search._internals) still
exist and mean what they meant: a new release that changes one fails here, loudly."""

from __future__ import annotations

from pathlib import Path

import optuna
from optuna.distributions import FloatDistribution

from search import _internals


def test_optuna_privates_reach_the_study_storage_and_trials(tmp_path: Path) -> None:
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'db'}", heartbeat_interval=7, grace_period=14)
    study = optuna.create_study(storage=storage, study_name="privates")
    trial = study.ask({"x": FloatDistribution(0, 1)})
    found = _internals.study_storage(study)
    assert isinstance(found, optuna.storages.BaseStorage), type(found)
    assert _internals.study_id(study) == found.get_study_id_from_name("privates")
    frozen = study.get_trials()[0]
    assert _internals.trial_id(trial) == _internals.trial_id(frozen) == found.get_trial_id_from_study_id_trial_number(
        _internals.study_id(study), 0)
    storage.record_heartbeat(_internals.trial_id(trial))
    _internals.set_trial_user_attr(study, frozen, "k", 1)
    _internals.set_trial_system_attr(study, frozen, "s", 2)
    again = study.get_trials()[0]
    assert again.user_attrs["k"] == 1 and again.system_attrs["s"] == 2
    assert _internals.heartbeat_interval(study) == 7 and _internals.grace_period(study) == 14
    assert _internals.stale_trial_ids(_internals.study_storage(study), _internals.study_id(study)) == []
    assert _internals.heartbeat_interval(optuna.create_study()) is None


def test_tensorflow_gradient_registry_holds_custom_gradients() -> None:
    import tensorflow as tf

    registry = _internals.gradient_registry()
    assert isinstance(registry, dict), "tensorflow.python.framework.ops._gradient_registry._registry is gone"
    before = {k for k in registry if k.startswith("CustomGradient-")}

    @tf.custom_gradient
    def double(x):  # type: ignore[no-untyped-def]
        return 2 * x, lambda dy: 2 * dy

    tf.function(double).get_concrete_function(tf.TensorSpec([], tf.float32))
    added = {k for k in _internals.gradient_registry() if k.startswith("CustomGradient-")} - before
    assert added, "tracing a tf.custom_gradient no longer registers CustomGradient-N entries"

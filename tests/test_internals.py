"""search.store._internals against the installed Optuna and TensorFlow: each private thing flexunet
relies on is still there and still means what flexunet takes it to mean. A failure here names
what a new release changed."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from search.store import _internals


@pytest.fixture
def study(tmp_path: Path) -> optuna.Study:
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'study.db'}", heartbeat_interval=1, grace_period=1)
    study = optuna.create_study(storage=storage, study_name="internals")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    return study


# --- Optuna ------------------------------------------------------------------------------------


def test_a_study_s_storage_and_id(study: optuna.Study) -> None:
    storage = _internals.study_storage(study)
    assert isinstance(storage, _internals.CachedStorage), "Optuna no longer caches an RDBStorage's reads"
    assert isinstance(_internals.backend(storage), optuna.storages.RDBStorage)
    assert _internals.backend(_internals.backend(storage)) is _internals.backend(storage)
    assert storage.get_study_id_from_name("internals") == _internals.study_id(study)


def test_a_trial_s_id(study: optuna.Study) -> None:
    storage, sid = _internals.study_storage(study), _internals.study_id(study)
    for frozen in study.trials:
        assert _internals.trial_id(frozen) == storage.get_trial_id_from_study_id_trial_number(sid, frozen.number)
    with pytest.warns(UserWarning):  # heartbeats are on and ask() runs no heartbeat thread
        trial = study.ask()
    assert _internals.trial_id(trial) == storage.get_trial_id_from_study_id_trial_number(sid, trial.number)


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


def test_the_calls_optunas_cache_makes_on_its_backend() -> None:
    called = set(re.findall(r"self\._backend\.(_\w+)\(", inspect.getsource(_internals.CachedStorage)))
    assert called == _internals.CACHED_BACKEND_CALLS, (
        "Optuna's _CachedStorage now calls other private methods of its backend: update "
        "CACHED_BACKEND_CALLS and search.store.storage.RETRIED_METHODS")


def test_stale_trial_ids_and_heartbeat_rows(study: optuna.Study) -> None:
    storage = _internals.backend(_internals.study_storage(study))
    assert isinstance(storage, _internals.BaseHeartbeat) and _internals.is_heartbeat_enabled(storage)
    with pytest.warns(UserWarning):
        quiet, silent = study.ask(), study.ask()
    storage.record_heartbeat(_internals.trial_id(quiet))
    ids = [_internals.trial_id(t) for t in study.trials]
    assert _internals.trial_ids_with_heartbeat(storage, ids) >= {_internals.trial_id(quiet)}
    assert _internals.trial_id(silent) not in _internals.trial_ids_with_heartbeat(storage, ids)
    assert _internals.trial_ids_with_heartbeat(storage, []) == set()
    time.sleep(2.5)  # SQLite's clock counts whole seconds: more than one second surely passed
    assert _internals.stale_trial_ids(storage, _internals.study_id(study)) == [_internals.trial_id(quiet)]
    optuna.storages.fail_stale_trials(study)  # the public call behind the same query
    assert [t.state for t in study.trials][-2:] == [TrialState.FAIL, TrialState.RUNNING]


def test_stale_trial_ids_without_heartbeats_is_empty(tmp_path: Path) -> None:
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'study.db'}")
    study = optuna.create_study(storage=storage)
    study.ask()
    assert not _internals.is_heartbeat_enabled(storage)
    assert _internals.stale_trial_ids(storage, _internals.study_id(study)) == []


def test_rdb_stale_trials_adds_its_hook_to_the_query_optuna_asks(tmp_path: Path) -> None:
    """RDBStaleTrials overrides RDBStorage._get_stale_trial_ids: what its public hook names is
    failed by Optuna's own fail_stale_trials, as the trials whose heartbeat stopped are."""
    class Extra(_internals.RDBStaleTrials):
        named: list[int] = []

        def extra_stale_trial_ids(self, study_id: int) -> list[int]:
            return self.named

    storage = Extra(f"sqlite:///{tmp_path / 'study.db'}", heartbeat_interval=60, grace_period=120)
    study = optuna.create_study(storage=storage)
    with pytest.warns(UserWarning):
        study.ask()  # stays RUNNING: its heartbeat is young
        named = study.ask()
    Extra.named = [_internals.trial_id(named)]
    assert "_get_stale_trial_ids" in _internals.HEARTBEAT_PRIVATE_CALLS
    optuna.storages.fail_stale_trials(study)
    assert [t.state for t in study.trials] == [TrialState.RUNNING, TrialState.FAIL]


def test_heartbeat_proxy_answers_optunas_stale_query_through_its_hook() -> None:
    """HeartbeatProxy is a GrpcStorageProxy and a BaseHeartbeat whose private stale-trial query
    is its public stale_trial_ids_of (no proxy needs to run for that)."""
    class Proxy(_internals.HeartbeatProxy):
        def __init__(self) -> None:  # no connection
            pass

        def stale_trial_ids_of(self, study_id: int) -> list[int]:
            return [study_id * 10]

        # BaseHeartbeat's abstract methods (search.store.proxy.ProxyStorage implements them)
        def record_heartbeat(self, trial_id: int) -> None:
            pass

        def get_heartbeat_interval(self) -> int | None:
            return 20

        def get_heartbeat_stale_trial_callback(self) -> None:
            return None

    proxy = Proxy()
    assert isinstance(proxy, optuna.storages.GrpcStorageProxy) and isinstance(proxy, _internals.BaseHeartbeat)
    assert proxy._get_stale_trial_ids(4) == [40]


# --- Keras (flexunet/_keras_internals.py: flexunet never imports search) -----------------------


def test_keras_symbolic_build_builds_the_compiled_state() -> None:
    import doctest

    import keras
    import numpy as np

    from flexunet import _keras_internals

    network = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(3, 1, activation="softmax")])
    network.compile(loss="categorical_crossentropy", metrics=["accuracy"])
    assert not network.metrics[1].built
    _keras_internals.build_compiled_state(network, (np.zeros((1, 8, 8, 1), np.float32),
                                                    np.zeros((1, 8, 8, 3), np.float32)))
    assert network.metrics[1].built
    assert doctest.testmod(_keras_internals).failed == 0


# --- TensorFlow --------------------------------------------------------------------------------


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


# --- what does not load TensorFlow -------------------------------------------------------------


def test_the_model_file_name_is_spelled_once_in_each_package() -> None:
    """search.paths spells flexunet.train's name instead of importing it (that loads TensorFlow)."""
    from flexunet.train import MODEL_FILE
    from search import paths

    assert paths.MODEL_FILE == MODEL_FILE and MODEL_FILE in paths.TRIAL_FILES


def test_a_usage_error_does_not_load_tensorflow(tmp_path: Path) -> None:
    """Every ``flexunet`` command builds the whole parser (the search commands included): a
    mistyped command or a bad storage URL is answered before TensorFlow's seconds of import."""
    check = ("import sys\nfrom flexunet.cli import main\n"
             "rc = main(['search', 'status', '--study', 's', '--storage', 'garbage://x'])\n"
             "print(rc, sorted(m for m in ('tensorflow', 'keras') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["2", "[]"], done.stdout + done.stderr
    assert "flexunet: error: storage garbage://x" in done.stderr

"""The one place where flexunet relies on what Optuna keeps private.

Optuna offers no public way to reach a study's storage, the ids behind a study or a trial, or
the stale-trial query of its heartbeat; flexunet needs them to fail and retry trials whose worker
died, and to extend that query. Everything private lives here, each with a test in
``tests/test_internals.py`` (the RDB trial tables and ``TrialsView``: ``tests/test_internals_bulk.py``
and ``tests/test_window.py``) that fails loudly if a new Optuna or TensorFlow release renames
or changes it. Code elsewhere imports these names, never Optuna's private modules or attributes.

Why each is needed:

- ``study._storage``, ``study._study_id``, ``trial._trial_id``: a launcher fails the trial of a
  worker it saw die. That trial belongs to another process, so no ``optuna.Trial`` of this
  process holds it, and Optuna has no public call that sets an attribute on it.
- ``storage._get_stale_trial_ids``: the trials whose heartbeat stopped, so that a copy is
  queued *before* such a trial is failed (``fail_stale_trials`` fails first, and a process
  killed before its retry callback would lose the trial, or race another process's check).
- ``optuna.storages._heartbeat.is_heartbeat_enabled`` and ``_CachedStorage``: whether the storage
  sends heartbeats, and the RDB storage behind Optuna's read cache.
- Optuna's RDB heartbeat table: trials RUNNING that never sent a heartbeat (see search.store.storage).
- Optuna's RDB trial tables: :func:`bulk_add_trials` writes finished trials straight into them,
  in one transaction (``study.add_trials`` takes 0.1-0.5 s a trial, a statement per parameter and
  attribute and a query for each parameter's earlier distribution: filling a 10,000-trial study
  for ``bench/coordination.py`` would take an hour).
- ``Study._get_trials``: what samplers read the study's trials through; :class:`TrialsView`
  shows a sampler only some of them (``search.spec.window``).
- TensorFlow's ``ops._gradient_registry``: each trial's ``tf.custom_gradient`` entries keep that
  trial's whole training graph alive until they are removed (see ``search.trial.objective``).

Sections: Optuna studies and trials (and what samplers see of them); Optuna storages; Optuna's RDB
schema; TensorFlow.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable, Container, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import optuna
from optuna.storages import BaseStorage, GrpcStorageProxy, RDBStorage
from optuna.storages import _CachedStorage as CachedStorage
from optuna.storages._heartbeat import BaseHeartbeat, is_heartbeat_enabled

if TYPE_CHECKING:
    from optuna.trial import FrozenTrial, Trial

__all__ = ["BaseHeartbeat", "CACHED_BACKEND_CALLS", "CachedStorage", "HEARTBEAT_PRIVATE_CALLS", "HeartbeatProxy",
           "RDBStaleTrials", "TrialsView", "backend", "bulk_add_trials",
           "grace_period", "gradient_registry", "heartbeat_interval", "is_heartbeat_enabled", "set_trial_system_attr",
           "set_trial_user_attr", "stale_trial_ids", "study_id", "study_storage", "trial_id",
           "trial_ids_with_heartbeat"]


# --- Optuna: studies and trials -----------------------------------------------------------------


def study_storage(study: optuna.Study) -> BaseStorage:
    """The storage a study reads and writes through (for an RDB storage, Optuna's read cache)."""
    return study._storage


def study_id(study: optuna.Study) -> int:
    """The storage's id of ``study`` (what the storage's methods take)."""
    return study._study_id


def trial_id(trial: FrozenTrial | Trial) -> int:
    """The storage's id of ``trial`` (a trial's number is only unique within its study)."""
    return trial._trial_id


def set_trial_user_attr(study: optuna.Study, trial: FrozenTrial, key: str, value: Any) -> None:
    """Set a user attr of any process's trial."""
    study_storage(study).set_trial_user_attr(trial_id(trial), key, value)


def set_trial_system_attr(study: optuna.Study, trial: FrozenTrial | Trial, key: str, value: Any) -> None:
    study_storage(study).set_trial_system_attr(trial_id(trial), key, value)


class TrialsView:
    """``study`` as a sampler sees it, with only the trials ``select`` keeps.

    Samplers read a study's trials through ``Study._get_trials`` (TPE, its search spaces) or
    ``get_trials``; both go through ``select`` here, which gets the trials (already filtered
    by state) in the order the study gives them and returns those the sampler may see.
    Everything else (the storage, the directions, the study id) is the study's own.

    Example::

        >>> import optuna
        >>> study = optuna.create_study()
        >>> study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=5)
        >>> view = TrialsView(study, lambda trials: trials[-2:])
        >>> [t.number for t in view.get_trials()], view.directions == study.directions
        ([3, 4], True)
    """

    def __init__(self, study: optuna.Study, select: Callable[[list[FrozenTrial]], list[FrozenTrial]]) -> None:
        self._study = study
        self._select = select

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)

    def _get_trials(self, deepcopy: bool = True, states: Container[Any] | None = None,
                    use_cache: bool = False) -> list[FrozenTrial]:
        return self._select(self._study._get_trials(deepcopy=deepcopy, states=states, use_cache=use_cache))

    def get_trials(self, deepcopy: bool = True, states: Container[Any] | None = None) -> list[FrozenTrial]:
        return self._select(self._study.get_trials(deepcopy=deepcopy, states=states))

    @property
    def trials(self) -> list[FrozenTrial]:
        return self.get_trials()


# --- Optuna: storages ---------------------------------------------------------------------------

# Private methods of RDBStorage that Optuna's read cache calls on its backend. A storage that
# changes how RDBStorage talks to the database (flexunet's retries) must cover these too.
CACHED_BACKEND_CALLS = frozenset({"_create_new_trial", "_set_trial_param", "_get_best_trial_id", "_get_trials",
                                  "_get_stale_trial_ids"})


# Private methods flexunet's storages wrap with their retries: RDBStorage's that the read cache
# calls (above), and the heartbeat's stale-trial query of any heartbeat storage.
HEARTBEAT_PRIVATE_CALLS = ("_get_stale_trial_ids",)


class RDBStaleTrials(RDBStorage):
    """An RDBStorage whose stale-trial query also names :meth:`extra_stale_trial_ids`.

    Optuna's ``fail_stale_trials`` asks a heartbeat storage through the private
    ``_get_stale_trial_ids``; this class overrides it here so that no other module does.
    """

    def extra_stale_trial_ids(self, study_id: int) -> list[int]:
        """Trials to count as stale beyond those whose heartbeat stopped (none here)."""
        return []

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        stale = super()._get_stale_trial_ids(study_id)
        return stale + [i for i in self.extra_stale_trial_ids(study_id) if i not in stale]


class HeartbeatProxy(GrpcStorageProxy, BaseHeartbeat):
    """Optuna's gRPC proxy client with a heartbeat of its own: Optuna asks it for stale trials
    through the private ``_get_stale_trial_ids``, answered by :meth:`stale_trial_ids_of`."""

    def stale_trial_ids_of(self, study_id: int) -> list[int]:
        raise NotImplementedError

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        return self.stale_trial_ids_of(study_id)


def backend(storage: BaseStorage) -> BaseStorage:
    """The storage behind Optuna's read cache (``storage`` itself when it is not cached)."""
    return storage._backend if isinstance(storage, CachedStorage) else storage


def stale_trial_ids(storage: BaseStorage, study: int) -> list[int]:
    """Ids of the RUNNING trials of ``study`` whose heartbeat stopped, as the storage sees them
    (the query behind ``optuna.storages.fail_stale_trials``); [] when heartbeats are off."""
    if not is_heartbeat_enabled(storage):
        return []
    return storage._get_stale_trial_ids(study)  # type: ignore[attr-defined]


def heartbeat_interval(study: optuna.Study) -> int | None:
    """The storage's heartbeat interval in seconds, None without heartbeats."""
    storage = study_storage(study)
    if not is_heartbeat_enabled(storage):
        return None
    return storage.get_heartbeat_interval()  # type: ignore[attr-defined]


def grace_period(study: optuna.Study) -> int | None:
    """Seconds without a heartbeat after which a trial is stale (RDBStorage's ``grace_period``,
    behind Optuna's read cache where the study's storage is cached)."""
    return getattr(backend(study_storage(study)), "grace_period", None)


# --- Optuna's RDB schema ------------------------------------------------------------------------


def trial_ids_with_heartbeat(storage: RDBStorage, trial_ids: Iterable[int]) -> set[int]:
    """Which of ``trial_ids`` have recorded at least one heartbeat in ``storage``."""
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    wanted = list(trial_ids)
    if not wanted:
        return set()
    beat = models.TrialHeartbeatModel
    with _create_scoped_session(storage.scoped_session) as session:
        return {row[0] for row in session.query(beat.trial_id).filter(beat.trial_id.in_(wanted)).all()}


def bulk_add_trials(study: optuna.Study, trials: Sequence[FrozenTrial]) -> list[int]:
    """Append finished ``trials`` to ``study`` (on an RDB storage) in one transaction; returns
    their new numbers.

    What ``study.add_trials`` stores, row for row (values, parameters with their
    distributions, user and system attributes, intermediate values, start and end times), but
    with a few multi-row statements instead of several statements and queries per trial. The
    trials must be valid and finished (from another study, or ``optuna.trial.create_trial``);
    each parameter's distribution must match the one the study already has, as Optuna requires.
    The study's row is locked for the transaction, as Optuna locks it to number a new trial, so
    workers may run meanwhile. For filling large studies in benchmarks and tests.

    Example::

        >>> import optuna
        >>> storage = optuna.storages.RDBStorage("sqlite:///:memory:")
        >>> study = optuna.create_study(storage=storage)
        >>> x = optuna.distributions.FloatDistribution(0, 1)
        >>> made = [optuna.trial.create_trial(params={"x": v}, distributions={"x": x}, value=v) for v in (0.2, 0.1)]
        >>> bulk_add_trials(study, made)
        [0, 1]
        >>> study.best_trial.params
        {'x': 0.1}
    """
    import sqlalchemy as sa
    from optuna.distributions import check_distribution_compatibility, distribution_to_json, json_to_distribution
    from optuna.storages._rdb import models

    storage = backend(study_storage(study))
    if not isinstance(storage, RDBStorage):
        raise TypeError(f"bulk_add_trials needs a study on an RDB storage, not {type(storage).__name__}")
    for trial in trials:
        if not trial.state.is_finished():
            raise ValueError(f"trial {trial.number}: only finished trials can be added, not {trial.state.name}")
        if trial.values is not None and len(trial.values) != len(study.directions):
            raise ValueError(f"trial {trial.number}: {len(trial.values)} values for {len(study.directions)} objectives")
    sid = study_id(study)
    table = {name: model.__table__ for name, model in (  # type: ignore[attr-defined]
        ("study", models.StudyModel), ("trial", models.TrialModel), ("param", models.TrialParamModel),
        ("value", models.TrialValueModel), ("step", models.TrialIntermediateValueModel),
        ("user", models.TrialUserAttributeModel), ("system", models.TrialSystemAttributeModel))}
    trial_t, param_t = table["trial"], table["param"]
    with storage.engine.begin() as connection:
        connection.execute(sa.select(table["study"].c.study_id).where(table["study"].c.study_id == sid)
                           .with_for_update())
        first = connection.execute(sa.select(sa.func.count()).select_from(trial_t)
                                   .where(trial_t.c.study_id == sid)).scalar_one()
        names = {name for trial in trials for name in trial.distributions}
        for name in sorted(names):  # the distribution each parameter already has in the study
            row = connection.execute(
                sa.select(param_t.c.distribution_json).join(trial_t, param_t.c.trial_id == trial_t.c.trial_id)
                .where(trial_t.c.study_id == sid, param_t.c.param_name == name).limit(1)).first()
            known = json_to_distribution(row[0]) if row else None
            for trial in trials:
                if name in trial.distributions:
                    known = known or trial.distributions[name]
                    check_distribution_compatibility(known, trial.distributions[name])
        if not trials:
            return []
        connection.execute(sa.insert(trial_t), [
            {"number": first + i, "study_id": sid, "state": trial.state,
             "datetime_start": _naive_utc(trial.datetime_start), "datetime_complete": _naive_utc(trial.datetime_complete)}
            for i, trial in enumerate(trials)])
        rows = connection.execute(sa.select(trial_t.c.trial_id, trial_t.c.number)
                                  .where(trial_t.c.study_id == sid, trial_t.c.number >= first)
                                  .order_by(trial_t.c.trial_id)).all()
        if [number for _, number in rows] != list(range(first, first + len(trials))):
            # Optuna numbers trials in the order of their ids (``count_past_trials``).
            raise RuntimeError("bulk_add_trials: the database gave the new trials ids out of order")
        ids = [trial_id for trial_id, _ in rows]
        value_m, step_m = models.TrialValueModel, models.TrialIntermediateValueModel
        children: dict[str, list[dict[str, Any]]] = {"param": [], "value": [], "step": [], "user": [], "system": []}
        for tid, trial in zip(ids, trials, strict=True):
            for objective, value in enumerate(trial.values or ()):
                stored, kind = value_m.value_to_stored_repr(value)
                children["value"].append({"trial_id": tid, "objective": objective, "value": stored, "value_type": kind})
            for name, value in trial.params.items():
                distribution = trial.distributions[name]
                children["param"].append({"trial_id": tid, "param_name": name,
                                          "param_value": distribution.to_internal_repr(value),
                                          "distribution_json": distribution_to_json(distribution)})
            for step, value in trial.intermediate_values.items():
                stored, kind = step_m.intermediate_value_to_stored_repr(value)
                children["step"].append({"trial_id": tid, "step": step, "intermediate_value": stored,
                                         "intermediate_value_type": kind})
            for which, attrs in (("user", trial.user_attrs), ("system", trial.system_attrs)):
                children[which].extend({"trial_id": tid, "key": key, "value_json": json.dumps(value)}
                                       for key, value in attrs.items())
        for which, rows_of in children.items():
            if rows_of:
                connection.execute(sa.insert(table[which]), rows_of)
    return list(range(first, first + len(trials)))


def _naive_utc(moment: datetime.datetime | None) -> datetime.datetime | None:
    """How Optuna's RDB schema stores a (naive, local) FrozenTrial time: naive UTC."""
    return None if moment is None else moment.astimezone(datetime.timezone.utc).replace(tzinfo=None)


# --- TensorFlow ---------------------------------------------------------------------------------


def gradient_registry() -> dict[str, Any] | None:
    """TensorFlow's process-wide registry of gradient functions (None on another backend or a
    TensorFlow without it)."""
    try:
        from tensorflow.python.framework import ops
    except ImportError:
        return None
    registry = getattr(getattr(ops, "_gradient_registry", None), "_registry", None)
    return registry if isinstance(registry, dict) else None


# --- Keras --------------------------------------------------------------------------------------


def ema_variables(optimizer: Any) -> list[Any]:
    """The moving averages a Keras 3 optimizer built with ``use_ema=True`` keeps of the model's
    trainable variables, in their order (``Optimizer._model_variables_moving_average``; Keras
    has no public accessor). tests/test_refit.py checks the refit's averaged weights with it."""
    return list(optimizer._model_variables_moving_average)

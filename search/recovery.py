"""Trials whose worker is gone: fail them and put one copy back in the queue.

A copy keeps the trial's parameters, its reported values and its pointer to the last epoch
checkpoint (user attrs), so the worker that picks it up resumes instead of starting again.
Every step is safe to repeat and to interrupt, because the processes doing it can be killed
too: the copy is queued *before* the original is failed, and a copy is never queued twice.
"""

from __future__ import annotations

from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

MAX_RETRY = 3  # attempts after the first, per trial
_NOT_INHERITED = ("fail_reason", "stop_reason")


def requeue(study: optuna.Study, trial: FrozenTrial, trials: list[FrozenTrial] | None = None) -> bool:
    """Queue a copy of ``trial`` (WAITING) unless one exists or it was retried ``MAX_RETRY``
    times; returns whether a copy was queued."""
    trials = study.get_trials(deepcopy=False) if trials is None else trials
    if any(t.system_attrs.get("failed_trial") == trial.number for t in trials):
        return False
    history = list(trial.system_attrs.get("retry_history", [])) + [trial.number]
    if len(history) > MAX_RETRY:
        return False
    # The parameters go in as fixed ones, as enqueue_trial does: the baseline's seed values may lie
    # outside the searched ranges, and create_trial refuses those as sampled parameters.
    study.add_trial(optuna.trial.create_trial(
        state=TrialState.WAITING,
        user_attrs={k: v for k, v in trial.user_attrs.items() if k not in _NOT_INHERITED},
        intermediate_values=trial.intermediate_values,
        system_attrs={"fixed_params": trial.params, "failed_trial": trial.number, "retry_history": history}))
    return True


def fail(study: optuna.Study, trial: FrozenTrial, reason: str | None = None, retry: bool = True) -> None:
    """Fail a running trial whose process is gone, queueing its copy first (a crash in
    between leaves a stale trial that already has its copy, never a failure without one)."""
    if retry:
        requeue(study, trial)
    storage = study._storage
    try:
        if reason:
            storage.set_trial_user_attr(trial._trial_id, "fail_reason", reason)
        storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        pass  # another process got there first


def recover(study: optuna.Study) -> None:
    """Fail and requeue the trials whose heartbeat stopped; requeue failures whose copy was
    lost with the process that failed them (Optuna fails a stale trial, then calls the retry
    callback: a kill in between would lose the trial)."""
    storage = study._storage
    if not (hasattr(storage, "_get_stale_trial_ids") and _heartbeat_enabled(storage)):
        return
    for trial_id in storage._get_stale_trial_ids(study._study_id):
        fail(study, storage.get_trial(trial_id))
    trials = study.get_trials(deepcopy=False)
    copied = {t.system_attrs.get("failed_trial") for t in trials}
    for trial in trials:
        # Our own failures carry a reason (non-finite loss, crash, interrupt...) and were
        # handled where they happened; a failure without one came from a stale heartbeat.
        if (trial.state == TrialState.FAIL and trial.number not in copied
                and "fail_reason" not in trial.user_attrs and "fail_reason" not in trial.system_attrs):
            requeue(study, trial, trials)


def stale_trial_callback(study: optuna.Study, trial: FrozenTrial) -> None:
    """For Optuna's own stale-trial check (run at the start of every ``optimize``)."""
    requeue(study, trial)


def _heartbeat_enabled(storage: Any) -> bool:
    interval = getattr(storage, "get_heartbeat_interval", lambda: None)()
    return interval is not None

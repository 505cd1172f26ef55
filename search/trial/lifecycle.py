"""A trial's life, in one place: start, report, prune, fail, retry, resume and interrupt.

::

    WAITING --(a worker pops it)--> RUNNING --> COMPLETE
       ^                              |  |----> PRUNED   (the pruner, or infeasible: infeasible_reason)
       |                              |  '----> FAIL     (fail_reason; not retried)
       '--- retry: a WAITING copy <---'--------> FAIL    (interrupted, killed, heartbeat stopped)

- **start**: the trial records its host and pid; a retry keeps its original's reason as
  ``previous_fail_reason``. A trial created after the budget is full ends at once (FAIL,
  ``over budget``) without training and without counting, so ``n_trials`` is met exactly
  however many workers ask at the same moment (:func:`over_budget`).
- **report / prune**: ``PruningReporter`` in :mod:`search.trial.objective` reports each epoch's
  validation Dice; Optuna's ``TrialPruned`` ends the trial.
- **infeasible**: a configuration the config checks, the model builder or the budget reject is
  PRUNED with its reason (:func:`infeasible`); the worker goes on.
- **fail**: a trial that cannot give a value is FAIL with ``fail_reason`` (:func:`failure`).
- **retry**: a trial whose worker is gone (interrupted, killed, silent) gets one WAITING copy,
  made by Optuna's ``RetryHeartbeatStaleTrialCallback``, at most :data:`MAX_RETRY` times per
  trial. The copy keeps the parameters, reported values and user attrs, among them the
  pointer to the last epoch checkpoint, so the worker that pops it **resumes**.
- **interrupt**: SIGINT or SIGTERM in a worker queues the copy, then Optuna fails the trial.

Every step is safe to repeat and to interrupt, because the processes doing it can be killed
too: where this module fails a trial (silent ones included), the copy is queued *before* the
original is failed, and a copy is never queued twice. Optuna's own check at the start of each
``optimize`` fails a silent trial first and calls the retry callback after; a kill in between
leaves a FAIL trial without a reason and without a copy, which :func:`sweep` queues again.

Example (in memory; a worker's trial is interrupted and queued again to resume)::

    >>> import optuna
    >>> from search.trial import lifecycle
    >>> study = optuna.create_study()
    >>> trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    >>> lifecycle.retry(study, lifecycle.frozen(study, trial.number))
    True
    >>> study.tell(trial, state=optuna.trial.TrialState.FAIL).state.name
    'FAIL'
    >>> [t.state.name for t in study.trials]
    ['FAIL', 'WAITING']
"""

from __future__ import annotations

import copy
import datetime
import logging
import os
import socket
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from search.store import _internals
from search import keys as k

_logger = logging.getLogger(__name__)
MAX_RETRY = 3  # attempts after the first, per trial
_NOT_INHERITED = (k.FAIL_REASON, k.STOP_REASON)
_FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


class TrialFailure(Exception):
    """The trial cannot give a value (non-finite loss, out of memory...); it is marked FAIL and
    the worker goes on to the next trial."""


class OverBudget(TrialFailure):
    """The trial was created after ``n_trials`` others had taken the budget; it is not trained."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM reached the worker: the running trial ends as FAIL ("interrupted")."""


# ------------------------------------------------------------------------------ the budget


def is_retry(trial: FrozenTrial) -> bool:
    return k.FAILED_TRIAL in trial.system_attrs


def _originals(trials: Sequence[FrozenTrial], n_trials: int, below: int | None = None) -> int:
    """How many of the study's ``n_trials`` slots are taken by trials numbered below ``below``.

    Every trial that is not a retry takes the next slot, in the order of trial numbers, until
    the budget is full; a retry runs in its original's slot. Trial numbers are given by the
    storage, one per trial, so every process counts the same slots for the same trial. A trial
    that found the budget full never counts (not even when a later run raises ``n_trials``)."""
    used = 0
    for trial in sorted(trials, key=lambda t: t.number):
        if below is not None and trial.number >= below:
            break
        if not is_retry(trial) and not trial.system_attrs.get(k.OVER_BUDGET) and used < n_trials:
            used += 1
    return used


def over_budget(trials: Sequence[FrozenTrial], number: int, n_trials: int) -> bool:
    """Whether trial ``number`` (not a retry) came after the budget was full."""
    return _originals(trials, n_trials, below=number) >= n_trials


def budget_left(study: optuna.Study, n_trials: int) -> bool:
    """Whether another trial may start: fewer than ``n_trials`` slots taken, or a trial waits
    (the enqueued baseline, or a retry of a trial whose worker died or was interrupted).

    Cheap and racy on purpose: two workers may both see the last slot free. The one whose trial
    comes second ends it at :func:`start` without training."""
    trials = study.get_trials(deepcopy=False)
    return any(t.state == TrialState.WAITING for t in trials) or _originals(trials, n_trials) < n_trials


# ------------------------------------------------------------------------------ one trial


def frozen(study: optuna.Study, number: int) -> FrozenTrial:
    """The stored state of trial ``number`` now (its latest user attrs)."""
    storage = _internals.study_storage(study)
    trial_id = storage.get_trial_id_from_study_id_trial_number(_internals.study_id(study), number)
    return storage.get_trial(trial_id)


def start(trial: optuna.Trial, n_trials: int | None = None) -> bool:
    """Record who runs the trial; end it if it came after the budget was full. Returns whether
    it is a copy that goes on (what :func:`settle` must check before its value is told).

    Raises :class:`OverBudget` (the worker catches it: the trial is FAIL with ``stop_reason``
    ``over budget`` and a system attr that says it never counted); so does a second copy of a
    trial already queued again (``stop_reason`` ``duplicate retry``)."""
    attrs = trial.user_attrs
    if attrs.get(k.PID) == os.getpid() and attrs.get(k.HOST) == socket.gethostname() and n_trials is None:
        return False  # started already (the worker's guard, then the objective)
    if attrs.get(k.FAIL_REASON):  # a retry carries the attributes of the trial it repeats
        trial.set_user_attr(k.PREVIOUS_FAIL_REASON, attrs[k.FAIL_REASON])
        trial.set_user_attr(k.FAIL_REASON, None)
    trial.set_user_attr(k.HOST, socket.gethostname())
    trial.set_user_attr(k.PID, os.getpid())
    if n_trials is None:
        return False
    trials = trial.study.get_trials(deepcopy=False)
    me = next((t for t in trials if t.number == trial.number), None)
    if me is not None and is_retry(me):
        twin = _earlier_copy(trials, me)
        if twin is not None:
            _never_counted(trial, k.STOP_DUPLICATE, f"duplicate: trial {twin} already repeats trial "
                                                    f"{RetryHeartbeatStaleTrialCallback.retry_history(me)[-1]}")
        _unless_original_finished(trials, me, trial)
        return True
    if over_budget(trials, trial.number, n_trials):
        _never_counted(trial, k.STOP_OVER_BUDGET, f"over budget: {n_trials} trials had started before it")
    return False


def _earlier_copy(trials: Sequence[FrozenTrial], copy_: FrozenTrial) -> int | None:
    """The number of a copy of the same trial made before ``copy_``, if any.

    Processes that find the same failure at the same moment may each queue a copy (each read
    the study before the others' copies landed: 297 copies of 9 trials with 128 workers on two
    overloaded cores). The first by number runs; every process agrees on which."""
    repeats = RetryHeartbeatStaleTrialCallback.retry_history(copy_)[-1:]
    return next((t.number for t in sorted(trials, key=lambda t: t.number)
                 if t.number < copy_.number and RetryHeartbeatStaleTrialCallback.retry_history(t)[-1:] == repeats),
                None)


def _unless_original_finished(trials: Sequence[FrozenTrial], copy_: FrozenTrial, trial: optuna.Trial) -> None:
    """End the copy ``trial`` untrained and uncounted if the trial it repeats finished after all.

    A copy is queued *before* its original is failed (:func:`fail`), so an original judged
    stale while its worker was alive but slow (an overloaded database) may still complete in
    between: then the original counts, and its copy must not (257 COMPLETE of 256 with 128
    workers on two overloaded cores, BENCHMARKS.md 14.3)."""
    number = RetryHeartbeatStaleTrialCallback.retry_history(copy_)[-1]
    original = next((t for t in trials if t.number == number), None)
    if original is not None and original.state in (TrialState.COMPLETE, TrialState.PRUNED):
        _never_counted(trial, k.STOP_DUPLICATE, f"duplicate: trial {number}, which it repeats, "
                                                f"ended {original.state.name} after all")


def settle(trial: optuna.Trial) -> None:
    """Before a copy's value is told: end it uncounted if its original finished meanwhile.

    The check of :func:`start` leaves a window: the original may still be RUNNING when its copy
    starts, and complete while the copy trains. Two reads of one trial each; :class:`Guarded`
    calls it for copies only."""
    me = frozen(trial.study, trial.number)
    if is_retry(me):
        original = frozen(trial.study, RetryHeartbeatStaleTrialCallback.retry_history(me)[-1])
        _unless_original_finished([original], me, trial)


def taken_over(study: optuna.Study, number: int | None) -> bool:
    """Whether trial ``number``, run by this process, was failed by another one meanwhile.

    Another worker fails a trial whose heartbeat looks stopped (:func:`sweep`, or Optuna's own
    check at the start of its ``optimize``): on an overloaded server a live worker's heartbeat
    can miss the grace period. That worker's ``tell`` then meets a finished trial and Optuna
    raises; the trial's copy carries on (queued by whoever failed it), so the worker drops its
    result and goes on instead of dying. Ask only when the exception is not the objective's own
    (:attr:`Guarded.raised`): this process's own failures are FAIL and its own too."""
    if number is None:
        return False
    stored = frozen(study, number)
    return (stored.state == TrialState.FAIL and stored.user_attrs.get(k.PID) == os.getpid()
            and stored.user_attrs.get(k.HOST) == socket.gethostname())


def _never_counted(trial: optuna.Trial, stop_reason: str, reason: str) -> None:
    _internals.set_trial_system_attr(trial.study, trial, k.OVER_BUDGET, True)
    trial.set_user_attr(k.STOP_REASON, stop_reason)
    trial.set_user_attr(k.FAIL_REASON, reason)
    raise OverBudget(f"trial {trial.number}: {reason}")


def infeasible(trial: optuna.Trial, reason: str) -> optuna.TrialPruned:
    """The exception that ends a trial whose configuration must not be trained (PRUNED)."""
    trial.set_user_attr(k.STOP_REASON, k.STOP_INFEASIBLE)
    trial.set_user_attr(k.INFEASIBLE_REASON, reason)
    return optuna.TrialPruned(f"infeasible: {reason}")


def failure(trial: optuna.Trial, reason: str) -> TrialFailure:
    """The exception that ends a trial as FAIL with ``reason``, not retried."""
    trial.set_user_attr(k.FAIL_REASON, reason)
    trial.set_user_attr(k.STOP_REASON, k.STOP_FAILED)
    return TrialFailure(reason)


def interrupt(trial: optuna.Trial) -> None:
    """SIGINT/SIGTERM stopped ``trial``: queue its copy to resume from the last checkpoint.
    Optuna fails the trial itself when the exception leaves the objective."""
    trial.set_user_attr(k.FAIL_REASON, k.FAIL_INTERRUPTED)
    if retry(trial.study, frozen(trial.study, trial.number)):
        _logger.info("trial %d interrupted; queued again to resume from its last epoch", trial.number)


@dataclass
class Guarded:
    """``objective`` run only in a trial that :func:`start` lets through, its value told only if
    :func:`settle` lets it count; an interrupt at any point of the trial (its start, its
    sampling, its training) queues it to resume. ``number`` and ``raised`` say which trial it
    ran last and what that raised, for :func:`taken_over`."""

    objective: Callable[[optuna.Trial], Any]
    n_trials: int
    number: int | None = None
    raised: BaseException | None = None  # what the last trial raised, if anything

    def __call__(self, trial: optuna.Trial) -> Any:
        self.number, self.raised = trial.number, None
        try:
            copy_ = start(trial, self.n_trials)
            value = self.objective(trial)
            if copy_:  # an original's own read would be wasted on every trial
                settle(trial)
            return value
        except Interrupted as exc:
            self.raised = exc
            interrupt(trial)
            raise
        except BaseException as exc:
            self.raised = exc
            raise


def guarded(objective: Callable[[optuna.Trial], Any], n_trials: int) -> Guarded:
    """``objective`` wrapped as :class:`Guarded`."""
    return Guarded(objective, n_trials)


# ------------------------------------------------------------------------------ retries


def _has_copy(trials: Sequence[FrozenTrial], number: int) -> bool:
    return any(RetryHeartbeatStaleTrialCallback.retry_history(t)[-1:] == [number] for t in trials)


def retry(study: optuna.Study, trial: FrozenTrial, trials: Sequence[FrozenTrial] | None = None) -> bool:
    """Queue a copy of ``trial`` (WAITING) unless one exists or it was retried ``MAX_RETRY``
    times; returns whether a copy was queued."""
    trials = study.get_trials(deepcopy=False) if trials is None else trials
    if _has_copy(trials, trial.number) or trial.system_attrs.get(k.OVER_BUDGET):
        return False
    if len(RetryHeartbeatStaleTrialCallback.retry_history(trial)) >= MAX_RETRY:
        return False
    template = copy.deepcopy(trial)  # the callback extends the trial's own retry history list
    template.user_attrs = {key: v for key, v in trial.user_attrs.items() if key not in _NOT_INHERITED}
    callback = RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY, inherit_intermediate_values=True)
    pristine = copy.deepcopy(template)  # a refused first attempt has extended the history already
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            callback(study, template)
        except ValueError:
            # The baseline's seed values may lie outside the searched ranges, and create_trial
            # refuses those as sampled parameters: they go in as fixed ones, as enqueue_trial
            # puts them.
            template = pristine
            template.system_attrs = {**template.system_attrs, "fixed_params": dict(trial.params)}
            template.params, template.distributions = {}, {}
            callback(study, template)
    return True


def fail(study: optuna.Study, trial: FrozenTrial, reason: str, *, retry_it: bool = True) -> None:
    """Fail another process's running trial (its worker is gone), queueing its copy first: a
    crash in between leaves a stale trial that already has its copy, never a failure without
    one."""
    if retry_it:
        retry(study, trial)
    try:
        _internals.set_trial_user_attr(study, trial, k.FAIL_REASON, reason)
    except optuna.exceptions.UpdateFinishedTrialError:
        return  # another process got there first
    try:
        study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
    except optuna.exceptions.UpdateFinishedTrialError:
        # skip_if_finished reads the state, then writes: a process that finishes the trial in
        # between (its own worker's last tell, another sweep) wins, and there is nothing to do.
        return


STALE_REASON = "heartbeat stopped"


def stale_trial_callback(study: optuna.Study, trial: FrozenTrial) -> None:
    """For the storage's ``heartbeat_stale_trial_callback``: Optuna's own check (at the start of
    every ``optimize``) has failed ``trial``, whose heartbeat stopped; queue its copy."""
    retry(study, trial)


def sweep(study: optuna.Study) -> None:
    """Fail (and retry) the trials whose heartbeat stopped, each copy queued first; then queue
    the failures whose copy was lost with the process that failed them.

    Optuna's ``fail_stale_trials`` fails a stale trial first and calls the retry callback after,
    so a FAIL trial without a reason and without a copy is normal for the instant in between:
    it is queued here only once it is older than the grace period (by then the callback has run,
    or its process is gone), or two processes would queue a copy each."""
    interval = _internals.heartbeat_interval(study)
    if interval is None:
        return
    for trial_id in _internals.stale_trial_ids(_internals.study_storage(study), _internals.study_id(study)):
        stale = _internals.study_storage(study).get_trial(trial_id)
        if stale.state == TrialState.RUNNING:
            fail(study, stale, STALE_REASON)
    grace = _internals.grace_period(study) or 2 * interval
    now = datetime.datetime.now()
    trials = study.get_trials(deepcopy=False)
    # The trials that have a copy, found once: asking retry() for each failure would scan the
    # whole study per failure, and every worker sweeps before every trial.
    copied = {history[-1] for t in trials if (history := RetryHeartbeatStaleTrialCallback.retry_history(t))}
    for trial in trials:
        # Failures flexunet decided carry a reason (non-finite loss, crash, interrupt, silence)
        # and were handled where they happened; one without a reason came from Optuna's check.
        if (trial.state == TrialState.FAIL and not trial.user_attrs.get(k.FAIL_REASON)
                and trial.number not in copied and trial.datetime_complete is not None
                and (now - trial.datetime_complete).total_seconds() > grace):
            retry(study, trial, trials)

"""Each transition of a trial's life (search.trial.lifecycle), in-process, on Optuna's in-memory storage
or on flexunet's own SQLite storage: start, budget, infeasible, fail, retry, interrupt, stale."""

from __future__ import annotations

import os
import time
from pathlib import Path

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from search import keys as k
from search.trial import lifecycle

X = {"x": FloatDistribution(0.0, 1.0)}


def _study() -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    return optuna.create_study()


def _heartbeat_study(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> optuna.Study:
    from search.store import storage as st

    monkeypatch.setenv("FLEXUNET_HEARTBEAT_INTERVAL", "1")
    monkeypatch.setenv("FLEXUNET_GRACE_PERIOD", "1")
    study, _ = st.create_once(st.open_storage(f"sqlite:///{tmp_path / 'study.db'}", on_stale=lifecycle.stale_trial_callback), "life", ["minimize"])
    return study


def test_start_records_the_worker_and_a_retry_keeps_its_previous_reason() -> None:
    study = _study()
    study.enqueue_trial({"x": 0.5}, user_attrs={k.FAIL_REASON: "interrupted", k.BASELINE: True})
    trial = study.ask(X)
    lifecycle.start(trial, n_trials=1)
    attrs = study.trials[0].user_attrs
    assert attrs[k.PID] == os.getpid() and attrs[k.HOST]
    assert attrs[k.PREVIOUS_FAIL_REASON] == "interrupted" and attrs[k.FAIL_REASON] is None
    assert attrs[k.BASELINE] is True


def test_a_trial_created_after_the_budget_is_full_ends_without_counting() -> None:
    study = _study()
    # Three workers ask at the same moment; the budget is two trials.
    trials = [study.ask(X) for _ in range(3)]
    lifecycle.start(trials[0], n_trials=2)
    lifecycle.start(trials[1], n_trials=2)
    with pytest.raises(lifecycle.OverBudget):
        lifecycle.start(trials[2], n_trials=2)
    frozen = study.tell(trials[2], state=TrialState.FAIL)
    assert frozen.system_attrs[k.OVER_BUDGET] is True
    assert frozen.user_attrs[k.STOP_REASON] == k.STOP_OVER_BUDGET
    assert not lifecycle.retry(study, frozen)  # nothing to retry: it never counted
    for t in trials[:2]:
        study.tell(t, 1.0)
    assert not lifecycle.budget_left(study, 2)
    assert lifecycle.budget_left(study, 3)  # the surplus trial took no slot


def test_optimize_through_guarded_meets_n_trials_exactly() -> None:
    study = _study()
    objective = lifecycle.guarded(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
    study.optimize(objective, n_trials=5, catch=(lifecycle.OverBudget,))
    states = [t.state for t in study.trials]
    assert states == [TrialState.COMPLETE] * 3 + [TrialState.FAIL] * 2
    assert all(t.system_attrs.get(k.OVER_BUDGET) for t in study.trials[3:])


def test_a_retry_runs_in_its_original_slot_even_when_the_budget_is_full() -> None:
    study = _study()
    first = study.ask(X)
    first.set_user_attr(k.RESUME_ARTIFACT, "resume-1")
    first.report(0.25, step=0)
    assert lifecycle.retry(study, lifecycle.frozen(study, first.number))
    study.tell(first, state=TrialState.FAIL)
    assert lifecycle.budget_left(study, 1)  # the copy waits
    copy = study.ask(X)
    lifecycle.start(copy, n_trials=1)  # a retry is never over budget
    assert copy.number == 1 and copy.params == first.params
    stored = study.trials[1]
    assert stored.system_attrs[k.FAILED_TRIAL] == 0 and stored.system_attrs[k.RETRY_HISTORY] == [0]
    assert stored.user_attrs[k.RESUME_ARTIFACT] == "resume-1" and stored.intermediate_values == {0: 0.25}


def test_retry_queues_one_copy_keeps_no_reasons_and_stops_after_max_retry() -> None:
    study = _study()
    trial = study.ask(X)
    trial.set_user_attr(k.STOP_REASON, "failed")
    trial.set_user_attr(k.FAIL_REASON, "worker killed (SIGKILL)")
    original = study.tell(trial, state=TrialState.FAIL)
    assert lifecycle.retry(study, original)
    assert not lifecycle.retry(study, original)  # never twice
    copy = study.trials[-1]
    assert copy.state == TrialState.WAITING
    assert k.FAIL_REASON not in copy.user_attrs and k.STOP_REASON not in copy.user_attrs
    # Each attempt fails in turn: attempts 1..3 are retries, the 4th failure is final.
    for attempt in range(lifecycle.MAX_RETRY):
        running = study.ask(X)
        assert lifecycle.frozen(study, running.number).system_attrs[k.RETRY_HISTORY] == list(range(attempt + 1))
        queued = lifecycle.retry(study, study.tell(running, state=TrialState.FAIL))
        assert queued == (attempt + 1 < lifecycle.MAX_RETRY)
    assert sum(1 for t in study.trials if t.state == TrialState.WAITING) == 0
    assert len(study.trials) == 1 + lifecycle.MAX_RETRY


def test_fail_queues_the_copy_first_and_the_oom_crash_is_not_retried() -> None:
    study = _study()
    killed, crashed = study.ask(X), study.ask(X)
    lifecycle.fail(study, lifecycle.frozen(study, killed.number), "worker killed (SIGKILL)")
    lifecycle.fail(study, lifecycle.frozen(study, crashed.number), "worker crashed (SIGSEGV)", retry_it=False)
    by_number = {t.number: t for t in study.trials}
    assert by_number[0].state == TrialState.FAIL and by_number[0].user_attrs[k.FAIL_REASON] == "worker killed (SIGKILL)"
    assert by_number[1].state == TrialState.FAIL
    copies = [t for t in study.trials if t.state == TrialState.WAITING]
    assert [t.system_attrs[k.FAILED_TRIAL] for t in copies] == [0]
    # Failing it again (another launcher saw the same death) changes nothing.
    lifecycle.fail(study, lifecycle.frozen(study, killed.number), "worker killed (SIGKILL)")
    assert len(study.trials) == 3


def test_infeasible_is_pruned_with_its_reason_and_failure_is_fail() -> None:
    study = _study()

    def objective(trial: optuna.Trial) -> float:
        trial.suggest_float("x", 0, 1)
        if trial.number == 0:
            raise lifecycle.infeasible(trial, "too big")
        raise lifecycle.failure(trial, "non-finite loss")

    study.optimize(objective, n_trials=2, catch=(lifecycle.TrialFailure,))
    pruned, failed = study.trials
    assert pruned.state == TrialState.PRUNED and pruned.user_attrs[k.INFEASIBLE_REASON] == "too big"
    assert pruned.user_attrs[k.STOP_REASON] == k.STOP_INFEASIBLE
    assert failed.state == TrialState.FAIL and failed.user_attrs[k.FAIL_REASON] == "non-finite loss"
    assert not [t for t in study.trials if t.state == TrialState.WAITING]  # a decided failure is final


def test_an_interrupted_trial_is_queued_to_resume_and_then_failed() -> None:
    study = _study()

    def objective(trial: optuna.Trial) -> float:
        trial.suggest_float("x", 0, 1)
        trial.set_user_attr(k.RESUME_ARTIFACT, "resume-0")
        trial.set_user_attr(k.RESUME_EPOCH, 2)
        lifecycle.interrupt(trial)
        raise lifecycle.Interrupted("SIGTERM")

    with pytest.raises(lifecycle.Interrupted):
        study.optimize(objective, n_trials=1)
    stopped, copy = study.trials
    assert stopped.state == TrialState.FAIL and stopped.user_attrs[k.FAIL_REASON] == k.FAIL_INTERRUPTED
    assert copy.state == TrialState.WAITING and copy.params == stopped.params
    assert copy.user_attrs[k.RESUME_ARTIFACT] == "resume-0" and copy.user_attrs[k.RESUME_EPOCH] == 2


def test_an_interrupt_anywhere_in_a_guarded_trial_queues_it_to_resume() -> None:
    """The worker's objective is guarded: a signal that lands while the trial samples its
    parameters (before any training) queues the copy as one during training does."""
    study = _study()

    def objective(trial: optuna.Trial) -> float:
        trial.suggest_float("x", 0, 1)
        raise lifecycle.Interrupted("SIGTERM")  # as the handler raises after the storage call

    with pytest.raises(lifecycle.Interrupted):
        study.optimize(lifecycle.guarded(objective, n_trials=2), n_trials=1)
    stopped, copy = study.trials
    assert stopped.state == TrialState.FAIL and stopped.user_attrs[k.FAIL_REASON] == k.FAIL_INTERRUPTED
    assert copy.state == TrialState.WAITING and copy.params == stopped.params


def test_a_silent_trial_gets_its_copy_queued_then_is_failed(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from search.store import _internals

    study = _heartbeat_study(tmp_path, monkeypatch)
    trial = study.ask(X)
    _internals.study_storage(study).record_heartbeat(_internals.trial_id(trial))
    time.sleep(2.5)  # past the 1 s grace period: the worker "died" after its first heartbeat
    lifecycle.sweep(study)
    stale, copy = study.get_trials()
    assert stale.state == TrialState.FAIL and stale.user_attrs[k.FAIL_REASON] == lifecycle.STALE_REASON
    assert copy.state == TrialState.WAITING and copy.system_attrs[k.FAILED_TRIAL] == 0
    lifecycle.sweep(study)
    assert len(study.get_trials()) == 2  # swept again: no second copy


def test_a_failure_whose_copy_was_lost_is_queued_by_the_sweep(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # Optuna's fail_stale_trials fails first and calls the retry callback after: a process
    # killed in between leaves a FAIL trial with no reason and no copy.
    study = _heartbeat_study(tmp_path, monkeypatch)
    trial = study.ask(X)
    study.tell(trial, state=TrialState.FAIL)
    lifecycle.sweep(study)
    # At first the process that failed it may still be about to queue the copy: not yet.
    assert len(study.get_trials()) == 1
    time.sleep(1.5)  # past the 1 s grace period: that process is gone
    lifecycle.sweep(study)
    original, copy = study.get_trials()
    assert copy.state == TrialState.WAITING and copy.params == original.params


def test_fail_loses_the_race_to_a_process_that_finishes_the_trial_meanwhile(monkeypatch: pytest.MonkeyPatch) -> None:
    from search.store import _internals

    study = _study()
    study.ask(X)
    running = study.trials[0]
    storage = _internals.study_storage(study)
    write = type(storage).set_trial_state_values

    def finished_meanwhile(self, trial_id, state, values=None):  # type: ignore[no-untyped-def]
        # The trial's own worker ends it after tell() checked it was running, before it writes.
        write(self, trial_id, TrialState.COMPLETE, [0.25])
        return write(self, trial_id, state, values)

    monkeypatch.setattr(type(storage), "set_trial_state_values", finished_meanwhile)
    lifecycle.fail(study, running, "heartbeat stopped", retry_it=False)
    monkeypatch.undo()
    assert study.trials[0].state == TrialState.COMPLETE and study.trials[0].value == 0.25


def test_a_trial_queued_again_twice_runs_once_and_counts_once() -> None:
    """Two processes that fail the same trial at the same moment may each queue a copy: the
    first copy by number runs, the second ends untrained and never counts."""
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    from search.runtime.worker import run_trials

    study = _study()
    trial = study.ask(X)
    study.tell(trial, state=TrialState.FAIL)
    failed = lifecycle.frozen(study, trial.number)
    for _ in range(2):  # what two processes' callbacks do, each before seeing the other's copy
        RetryHeartbeatStaleTrialCallback(max_retry=3)(study, failed)
    run_trials(study, lambda t: t.suggest_float("x", 0.0, 1.0), n_trials=2)
    trials = study.get_trials()
    first, second = trials[1], trials[2]
    assert first.state == TrialState.COMPLETE and first.params == trial.params
    assert second.state == TrialState.FAIL and second.system_attrs[k.OVER_BUDGET]
    assert second.user_attrs[k.STOP_REASON] == k.STOP_DUPLICATE
    assert second.user_attrs[k.FAIL_REASON] == f"duplicate: trial 1 already repeats trial {trial.number}"
    assert len([t for t in trials if t.state == TrialState.COMPLETE]) == 2  # the retry's slot, and one more


def test_a_copy_whose_original_completed_after_all_ends_uncounted() -> None:
    """The copy is queued before its original is failed; an original judged stale while its
    worker was only slow may complete in between. It counts; its copy never does."""
    from search.runtime.worker import run_trials

    study = _study()
    trial = study.ask(X)
    assert lifecycle.retry(study, lifecycle.frozen(study, trial.number))  # a sweep queued the copy ...
    study.tell(trial, 0.5)  # ... and the original's own worker completed it before it was failed
    run_trials(study, lambda t: t.suggest_float("x", 0.0, 1.0), n_trials=1)
    original, copy_ = study.get_trials()
    assert original.state == TrialState.COMPLETE
    assert copy_.state == TrialState.FAIL and copy_.system_attrs[k.OVER_BUDGET]
    assert copy_.user_attrs[k.STOP_REASON] == k.STOP_DUPLICATE
    assert copy_.user_attrs[k.FAIL_REASON] == f"duplicate: trial {trial.number}, which it repeats, ended COMPLETE after all"


def test_a_copy_whose_original_completes_while_it_trains_is_not_counted() -> None:
    from search.runtime.worker import run_trials

    study = _study()
    trial = study.ask(X)
    assert lifecycle.retry(study, lifecycle.frozen(study, trial.number))

    def objective(t: optuna.Trial) -> float:
        study.tell(trial, 0.5)  # the original's worker finishes while the copy trains
        return t.suggest_float("x", 0.0, 1.0)

    run_trials(study, objective, n_trials=1)
    states = [t.state for t in study.get_trials()]
    assert states == [TrialState.COMPLETE, TrialState.FAIL]
    assert study.get_trials()[1].user_attrs[k.STOP_REASON] == k.STOP_DUPLICATE


def test_a_live_worker_whose_trial_another_worker_failed_goes_on() -> None:
    """On an overloaded server a live worker's heartbeat can miss the grace period: another
    worker fails its trial (copy queued first). Its own tell then meets a FAIL trial; the worker
    drops that result and goes on, and the copy makes the count exact (3 workers died of "Cannot
    tell a FAIL trial" with 128 workers, BENCHMARKS.md 14.3)."""
    from search.runtime.worker import run_trials

    study = _study()
    calls: list[int] = []

    def objective(t: optuna.Trial) -> float:
        calls.append(t.number)
        x = t.suggest_float("x", 0.0, 1.0)
        if len(calls) == 1:  # another process judges this trial stale mid-training
            lifecycle.fail(study, lifecycle.frozen(study, t.number), lifecycle.STALE_REASON)
        return x

    run_trials(study, objective, n_trials=2)
    trials = study.get_trials()
    assert calls == [0, 1, 2]
    assert trials[0].state == TrialState.FAIL and trials[0].user_attrs[k.FAIL_REASON] == lifecycle.STALE_REASON
    assert trials[1].state == TrialState.COMPLETE and trials[1].params == trials[0].params  # the copy
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 2


def test_a_worker_still_stops_on_its_own_objectives_error() -> None:
    from search.runtime.worker import run_trials

    study = _study()

    def objective(t: optuna.Trial) -> float:
        raise RuntimeError("a bug in the objective")

    with pytest.raises(RuntimeError, match="a bug in the objective"):
        run_trials(study, objective, n_trials=1)


def test_a_worker_whose_trial_optunas_own_check_failed_goes_on() -> None:
    """Optuna's check at the start of another worker's ``optimize`` fails a trial without a
    reason and queues its copy only after: the slow worker goes on even before the copy exists."""
    from search.runtime.worker import run_trials

    study = _study()

    def objective(t: optuna.Trial) -> float:
        x = t.suggest_float("x", 0.0, 1.0)
        study.tell(t.number, state=TrialState.FAIL)  # what fail_stale_trials does elsewhere
        return x

    run_trials(study, objective, n_trials=1)
    assert [t.state for t in study.get_trials()] == [TrialState.FAIL]


def test_a_worker_still_stops_when_its_objective_fails_its_own_trial_and_raises() -> None:
    from search.runtime.worker import run_trials

    study = _study()

    def objective(t: optuna.Trial) -> float:
        raise ValueError("the objective's own error")

    with pytest.raises(ValueError, match="the objective's own error"):
        run_trials(study, objective, n_trials=1)

"""A sampler that sees only a window of the study's trials, so that its cost stops growing.

TPE reads every finished trial of the study at each ``ask`` and fits its Parzen estimators over
all of them: in a study of 10,000 trials an ask costs several times what it costs at 1,000
(BENCHMARKS.md section 8), and no TPESampler setting bounds the trials it reads.
:class:`WindowedSampler` hands the sampler it wraps a view of the study with only

- the ``last`` most recent finished trials (COMPLETE, PRUNED or FAIL, by trial number),
- plus the ``best`` best COMPLETE trials of the whole study (single objective only),
- plus every unfinished trial (for ``constant_liar``),

so an ask costs what it costs in a study of ``last + best`` trials. With ``best`` at 25 (TPE's
cap on its "good" group, ``default_gamma``), TPE's good group stays the study's 25 best trials
wherever they are; only the "bad" group is cut to the recent trials.

In a study file, the ``[sampler]`` keys ``window`` (``last``) and ``window_best`` (``best``)
wrap the sampler it names::

    [sampler]
    name = "TPESampler"
    n_startup_trials = 12
    window = 1000       # TPE sees the last 1,000 finished trials ...
    window_best = 25    # ... and the 25 best of the study

Example::

    >>> import optuna
    >>> from search.spec.window import WindowedSampler
    >>> sampler = WindowedSampler(optuna.samplers.TPESampler(seed=0, n_startup_trials=5), last=20, best=5)
    >>> study = optuna.create_study(sampler=sampler)
    >>> study.optimize(lambda t: (t.suggest_float("x", -3, 3) - 1) ** 2, n_trials=40)
    >>> len(sampler.visible(study.get_trials(deepcopy=False), study))
    25
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from search.store import _internals

__all__ = ["WindowedSampler"]
_FINISHED = frozenset((TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL))


class WindowedSampler(optuna.samplers.BaseSampler):
    """``sampler``, shown the ``last`` most recent finished trials, the ``best`` best complete
    ones and every unfinished one (see the module's docstring)."""

    def __init__(self, sampler: optuna.samplers.BaseSampler, last: int, best: int = 0) -> None:
        if isinstance(last, bool) or not isinstance(last, int) or last < 1:
            raise ValueError(f"last: expected a whole number >= 1, got {last!r}")
        if isinstance(best, bool) or not isinstance(best, int) or best < 0:
            raise ValueError(f"best: expected a whole number >= 0, got {best!r}")
        self.sampler, self.last, self.best = sampler, last, best

    def __repr__(self) -> str:
        return f"WindowedSampler({self.sampler.__class__.__name__}, last={self.last}, best={self.best})"

    def visible(self, trials: Sequence[FrozenTrial], study: optuna.Study) -> list[FrozenTrial]:
        """The trials of ``trials`` the wrapped sampler may see, in their order.

        ``trials`` come as a study gives them, in the order of their numbers, so the most
        recent are at the end: the window costs a pass over the older ones, not a sort."""
        if len(trials) <= self.last + self.best:
            return list(trials)
        cut, seen = len(trials), 0
        while cut > 0 and seen < self.last:  # trials[cut:] holds the last `last` finished ones
            cut -= 1
            seen += trials[cut].state in _FINISHED
        older = trials[:cut]
        kept = [t for t in older if t.state not in _FINISHED]  # running: for constant_liar
        if self.best:
            if len(study.directions) > 1:
                raise ValueError("WindowedSampler: best needs a single-objective study")
            sign = 1.0 if study.direction == StudyDirection.MAXIMIZE else -1.0
            complete = [t for t in older if t.state is TrialState.COMPLETE]
            kept += heapq.nlargest(self.best, complete, key=lambda t: sign * t.value)
            kept.sort(key=lambda t: t.number)
        return kept + list(trials[cut:])

    def _view(self, study: optuna.Study) -> Any:
        return _internals.TrialsView(study, lambda trials: self.visible(trials, study))

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self.sampler.infer_relative_search_space(self._view(study), trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        return self.sampler.sample_relative(self._view(study), trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        return self.sampler.sample_independent(self._view(study), trial, param_name, param_distribution)

    # Called around a trial, not to choose its parameters: the study as it is.
    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.sampler.before_trial(study, trial)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
                    values: Sequence[float] | None) -> None:
        self.sampler.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.sampler.reseed_rng()

"""What a study holds: trials by state, the best so far, the baseline, the running trials."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from search.store import artifacts
from search import keys


def _value(trial: FrozenTrial) -> str:
    if trial.values is None:
        return "-"
    return ", ".join(f"{v:,.0f}" if v == int(v) and abs(v) >= 100 else f"{v:.4f}" for v in trial.values)


def _params(trial: FrozenTrial) -> str:
    def fmt(v: Any) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    return ", ".join(f"{k}={fmt(v)}" for k, v in trial.params.items())


def best_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The best trial (single objective) or the Pareto front (two objectives)."""
    try:
        if len(study.directions) > 1:
            return sorted(study.best_trials, key=lambda t: -t.values[0])
        return [study.best_trial]
    except ValueError:  # no completed trial yet
        return []


def baseline_trial(study: optuna.Study) -> FrozenTrial | None:
    return next((t for t in study.get_trials(deepcopy=False) if t.user_attrs.get(keys.BASELINE)), None)


def class_text(trial: FrozenTrial) -> str | None:
    """A multi-class trial's validation Dice per class ("absent": no reference, no prediction,
    left out of the value), or None for one foreground class."""
    values = trial.user_attrs.get(keys.CLASS_DICE)
    if not values or len(values) < 2:
        return None
    return "per class: " + ", ".join(f"{c} {'absent' if v is None else f'{v:.4f}'}"
                                     for c, v in enumerate(values, start=1))


def describe(trial: FrozenTrial) -> str:
    attrs = trial.user_attrs
    bits = [f"trial {trial.number}", trial.state.name, f"value {_value(trial)}"]
    if attrs.get(keys.PARAMS):
        bits.append(f"{attrs[keys.PARAMS]:,} params")
    if attrs.get(keys.EPOCHS_RUN) is not None:
        bits.append(f"{attrs[keys.EPOCHS_RUN]} epochs ({attrs.get(keys.STOP_REASON, '?')})")
    elif attrs.get(keys.STOP_REASON):
        bits.append(str(attrs[keys.STOP_REASON]))
    return ", ".join(bits)


def summary_lines(study: optuna.Study, masked_storage: str | None = None) -> list[str]:
    trials = study.get_trials(deepcopy=False)
    counts = Counter(t.state.name for t in trials)
    lines = [f"study {study.study_name!r}" + (f" on {masked_storage}" if masked_storage else "")
             + f": {len(trials)} trials (" + ", ".join(
                 f"{counts.get(s.name, 0)} {s.name.lower()}" for s in
                 (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING, TrialState.WAITING)) + ")"]
    store = artifacts.recorded(study)
    if store is not None:
        lines.append(f"trial files in {store.describe()}")
    infeasible = sum(1 for t in trials if t.user_attrs.get(keys.STOP_REASON) == keys.STOP_INFEASIBLE)
    if infeasible:
        lines.append(f"  {infeasible} of the pruned trials were infeasible (rejected before training)")
    surplus = sum(1 for t in trials if t.system_attrs.get(keys.OVER_BUDGET))
    if surplus:
        lines.append(f"  {surplus} of the failed trials started after the budget was full (not trained, not counted)")
    best = best_trials(study)
    if best:
        title = f"Pareto front ({len(best)} trials)" if len(study.directions) > 1 else "best"
        lines.append(f"{title}:")
        for t in best[:10]:
            lines.append(f"  {describe(t)}")
            if t.params:
                lines.append(f"    {_params(t)}")
            per_class = class_text(t)
            if per_class:
                lines.append(f"    {per_class}")
    else:
        lines.append("best: none yet (no completed trial)")
    base = baseline_trial(study)
    if base is not None:
        lines.append(f"baseline (seed settings): {describe(base)}")
        if best and base.values is not None and best[0].number != base.number:
            delta = best[0].values[0] - base.values[0]
            lines.append(f"  the search {'beats' if delta > 0 else 'does not beat'} the baseline by {delta:+.4f}")
    from search.store import _internals
    from search.trial import refit

    lines += refit.status_lines(study, _internals.study_storage(study))
    running = [t for t in trials if t.state == TrialState.RUNNING]
    if running:
        lines.append("running:")
        for t in running:
            a = t.user_attrs
            dice = a.get(keys.LAST_VAL_DICE)
            dice_text = f"{dice:.4f}" if isinstance(dice, float) and math.isfinite(dice) else "-"
            lines.append(f"  trial {t.number} on {a.get(keys.HOST, '?')} pid {a.get(keys.PID, '?')}: epoch "
                         f"{a.get(keys.EPOCH, 0)}, val Dice {dice_text}, started {t.datetime_start:%H:%M:%S}")
    return lines

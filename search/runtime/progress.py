"""Following a running study from the launcher.

On a terminal: one live line per running worker (trial, epoch, current validation Dice) and a
study line (finished/pruned/failed, best so far, elapsed, estimated time left), redrawn in
place, with a line per finished trial scrolling above them. Elsewhere (a log file, CI): the
finished-trial lines and a status line every minute. Everything comes from the storage, so it
shows the workers of every machine in the study.
"""

from __future__ import annotations

import math
import sys
import time
from collections import Counter
from dataclasses import dataclass
from typing import TextIO

import optuna
from optuna.trial import FrozenTrial, TrialState

from search import keys as k
from search.results.status import describe, summary_lines

_FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
_PLAIN_STATUS_EVERY = 60.0


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def worker_line(trial: FrozenTrial, max_epochs: int) -> str:
    a = trial.user_attrs
    dice = a.get(k.LAST_VAL_DICE)
    dice_text = f"{dice:.4f}" if isinstance(dice, float) and math.isfinite(dice) else "-"
    who = f"{a.get(k.HOST, '?')}:{a.get(k.PID, '?')}"
    base = " (baseline)" if a.get(k.BASELINE) else ""
    if isinstance(a.get(k.FOLDS), int) and isinstance(a.get(k.FOLD), int):  # a cross-validated trial
        base = f" fold {a[k.FOLD] + 1}/{a[k.FOLDS]}{base}"
    return f"  worker {who:<22} trial {trial.number:<4} epoch {a.get(k.EPOCH, 0):>3}/{max_epochs:<4} val Dice {dice_text}{base}"


@dataclass(frozen=True)
class Estimate:
    """Time left in a study, and whether its timeout (not its trial count) is what ends it."""

    seconds: float
    by_timeout: bool

    def text(self) -> str:
        if self.by_timeout:
            return f"at most {_duration(self.seconds)} left (the timeout ends the study first)"
        return f"about {_duration(self.seconds)} left"


def estimate_left(finished: int, trials_left: int, elapsed: float, timeout_left: float | None) -> Estimate | None:
    """Time left from the pace of this run (``finished`` trials in ``elapsed`` seconds, all
    workers together), never beyond the study's timeout; None while nothing is known.

    >>> estimate_left(2, 18, 600.0, timeout_left=None).text()
    'about 1h30m left'
    >>> estimate_left(2, 18, 600.0, timeout_left=180.0).text()
    'at most 3m00s left (the timeout ends the study first)'
    """
    by_trials = max(0, trials_left) * elapsed / finished if finished > 0 else None
    if timeout_left is not None and (by_trials is None or by_trials > timeout_left):
        return Estimate(max(0.0, timeout_left), by_timeout=True)
    return None if by_trials is None else Estimate(by_trials, by_timeout=False)


def study_line(trials: list[FrozenTrial], n_trials: int, elapsed: float, best: float | None, *,
               finished_before: int = 0, timeout_left: float | None = None) -> str:
    """The study's summary line; the pace counts only trials finished since this launcher
    started (``finished_before`` were done already), so a resumed study is not timed by work
    done in an earlier run."""
    # A trial that found the budget full never trained, and a failed trial that is retried is
    # done again by its retry (a series shares one of the n_trials slots): only the latest
    # trial of each series counts, as lifecycle counts the budget.
    latest: dict[int, FrozenTrial] = {}
    over = 0
    for t in sorted(trials, key=lambda t: t.number):
        if t.system_attrs.get(k.OVER_BUDGET):
            over += 1
        else:
            latest[t.system_attrs.get(k.FAILED_TRIAL, t.number)] = t
    retried = len(trials) - over - len(latest)
    counts = Counter(t.state for t in latest.values())
    finished = sum(counts[s] for s in _FINISHED)
    others = "".join(f", {n} {what}" for n, what in ((retried, "retried"), (over, k.STOP_OVER_BUDGET)) if n)
    text = (f"  study: {finished}/{n_trials} finished ({counts[TrialState.COMPLETE]} complete, "
            f"{counts[TrialState.PRUNED]} pruned, {counts[TrialState.FAIL]} failed{others}), "
            f"best {'-' if best is None else f'{best:.4f}'}, elapsed {_duration(elapsed)}")
    estimate = estimate_left(finished - finished_before, n_trials - finished, elapsed, timeout_left)
    if estimate is not None:
        text += f", {estimate.text()}"
    return text


class Watcher:
    """Polls the storage (the only thing workers share) and reports what changed."""

    def __init__(self, study: optuna.Study, n_trials: int, max_epochs: int, stream: TextIO | None = None,
                 live: bool | None = None, deadline: float | None = None) -> None:
        self.study, self.n_trials, self.max_epochs = study, n_trials, max_epochs
        self.deadline = deadline  # epoch seconds when the study's timeout ends it, if it has one
        self.stream = stream or sys.stdout
        self.live = self.stream.isatty() if live is None else live
        self.started = time.time()
        self._drawn = 0
        self._last_plain = 0.0
        self._seen: dict[int, TrialState] = {
            t.number: t.state for t in study.get_trials(deepcopy=False) if t.state in _FINISHED}
        self._finished_before = len(self._seen)

    def _best(self) -> float | None:
        try:
            return self.study.best_trial.values[0] if len(self.study.directions) == 1 else max(
                t.values[0] for t in self.study.best_trials)
        except ValueError:
            return None

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def update(self, final: bool = False) -> None:
        trials = self.study.get_trials(deepcopy=False)
        elapsed = time.time() - self.started
        finished = []
        for trial in trials:
            if trial.state in _FINISHED and self._seen.get(trial.number) != trial.state:
                self._seen[trial.number] = trial.state
                finished.append(f"[{_duration(elapsed):>7}] {describe(trial)}")
        running = [t for t in trials if t.state == TrialState.RUNNING]
        block = [worker_line(t, self.max_epochs) for t in running]
        timeout_left = None if self.deadline is None else self.deadline - time.time()
        block.append(study_line(trials, self.n_trials, elapsed, self._best(),
                                finished_before=self._finished_before, timeout_left=timeout_left))
        if self.live:
            if self._drawn:
                self.stream.write(f"\x1b[{self._drawn}F\x1b[J")  # back to the block's first line, clear
            for line in finished:
                self._print(line)
            if not final:
                for line in block:
                    self._print(line)
                self._drawn = len(block)
            else:
                self._drawn = 0
        else:
            for line in finished:
                self._print(line)
            if not final and time.time() - self._last_plain >= _PLAIN_STATUS_EVERY:
                self._last_plain = time.time()
                for line in block:
                    self._print(line)
        if final:
            for line in summary_lines(self.study):
                self._print(line)
            self._print(f"elapsed {_duration(elapsed)}")


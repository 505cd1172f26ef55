"""Following a running study from the launcher: a line per finished trial, then a summary."""

from __future__ import annotations

import sys
import time
from typing import Any

import optuna
from optuna.trial import TrialState

from search.status import describe, summary_lines

_FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


class Watcher:
    """Polls the storage (the only thing workers share) and reports what changed."""

    def __init__(self, study: optuna.Study, n_trials: int, procs: list[Any], stream: Any = None) -> None:
        self.study, self.n_trials, self.procs = study, n_trials, procs
        self.stream = stream or sys.stdout
        self.started = time.time()
        self._seen: dict[int, TrialState] = {
            t.number: t.state for t in study.get_trials(deepcopy=False) if t.state in _FINISHED}

    def update(self, final: bool = False) -> None:
        for trial in self.study.get_trials(deepcopy=False):
            if trial.state in _FINISHED and self._seen.get(trial.number) != trial.state:
                self._seen[trial.number] = trial.state
                print(f"[{time.time() - self.started:6.0f}s] {describe(trial)}", file=self.stream, flush=True)
        if final:
            for line in summary_lines(self.study):
                print(line, file=self.stream)
            print(f"elapsed {time.time() - self.started:.0f}s", file=self.stream, flush=True)

"""The sampler and pruner a study file names, built from Optuna's classes."""

from __future__ import annotations

import zlib
from typing import Any

import optuna

from flexunet.errors import ConfigError
from search.spec.study_file import StudySpec


WINDOW_KEYS = ("window", "window_best")  # [sampler] keys of search.spec.window.WindowedSampler, not Optuna's


def make_sampler(spec: StudySpec, worker: str = "") -> optuna.samplers.BaseSampler:
    """The study's sampler. ``worker`` names this worker process: every worker but the first
    gets its own seed, or all of them would draw the same "random" trials. ``window`` (and
    ``window_best``) in ``[sampler]`` wrap it in :class:`search.spec.window.WindowedSampler`."""
    kwargs: dict[str, Any] = {key: v for key, v in spec.sampler.kwargs.items() if key not in WINDOW_KEYS}
    if worker and isinstance(kwargs.get("seed"), int):
        kwargs["seed"] = (kwargs["seed"] + zlib.crc32(worker.encode())) % 2**31
    if spec.sampler.name == "TPESampler" and any(p.when for p in spec.space):
        # Conditional parameters make the space dynamic; grouping keeps TPE multivariate.
        kwargs.setdefault("multivariate", True)
        kwargs.setdefault("group", True)
    sampler = _build(optuna.samplers, spec.sampler.name, kwargs, spec, "sampler")
    return _windowed(sampler, spec) if any(key in spec.sampler.kwargs for key in WINDOW_KEYS) else sampler


def _windowed(sampler: optuna.samplers.BaseSampler, spec: StudySpec) -> optuna.samplers.BaseSampler:
    from search.spec.window import WindowedSampler

    settings = spec.sampler.kwargs
    if "window" not in settings:
        raise ConfigError(f"{spec.path}: [sampler] window_best: needs window (the number of recent trials)")
    best = settings.get("window_best", 0)
    if best and spec.second_objective:
        raise ConfigError(f"{spec.path}: [sampler] window_best: needs a single objective (this study has "
                          f"second_objective = {spec.second_objective!r})")
    for key, value, low in (("window", settings["window"], 1), ("window_best", best, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"{spec.path}: [sampler] {key}: expected a whole number >= {low}, got {value!r}")
    return WindowedSampler(sampler, last=settings["window"], best=best)


def make_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    kwargs: dict[str, Any] = dict(spec.pruner.kwargs)
    if spec.pruner.name == "PatientPruner":
        kwargs.setdefault("wrapped_pruner", None)
    return _build(optuna.pruners, spec.pruner.name, kwargs, spec, "pruner")


def _build(module: Any, name: str, kwargs: dict[str, Any], spec: StudySpec, table: str) -> Any:
    try:
        return getattr(module, name)(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{spec.path}: [{table}] {name}: {exc}") from None

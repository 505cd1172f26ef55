"""The sampler and pruner a study file names, built from Optuna's classes."""

from __future__ import annotations

import zlib
from typing import Any

import optuna

from flexunet.errors import ConfigError
from search.study_file import StudySpec


def make_sampler(spec: StudySpec, worker: str = "") -> optuna.samplers.BaseSampler:
    """The study's sampler. ``worker`` names this worker process: every worker but the first
    gets its own seed, or all of them would draw the same "random" trials."""
    kwargs: dict[str, Any] = dict(spec.sampler.kwargs)
    if worker and isinstance(kwargs.get("seed"), int):
        kwargs["seed"] = (kwargs["seed"] + zlib.crc32(worker.encode())) % 2**31
    if spec.sampler.name == "TPESampler" and any(p.when for p in spec.space):
        # Conditional parameters make the space dynamic; grouping keeps TPE multivariate.
        kwargs.setdefault("multivariate", True)
        kwargs.setdefault("group", True)
    return _build(optuna.samplers, spec.sampler.name, kwargs, spec, "sampler")


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

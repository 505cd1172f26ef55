"""From a trial to a FlexUNet config, and whether that config is worth training at all."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial

from flexunet import config as cfg
from flexunet.errors import ConfigError, FlexUNetError
from flexunet.model import estimate_cost
from search import keys as k
from search.spec.study_file import SETTABLE, Budget, ParamSpec, StudySpec

# The seed project's hand-tuned ICH settings (train_eval_infer.config of 2026/01/20). Its 8
# levels at 512 px leave a 4 px bridge; scaled to another size, the levels change so that the
# bridge stays 4 px. Everything else is kept as the seed had it.
SEED_BASELINE: dict[str, Any] = {
    "base_filters": 16, "base_kernels": 11, "dropout_rate": 0.04, "dilation": 1, "normalization": False,
    "activation": "relu", "learning_rate": 7e-5, "optimizer": "Adam", "clipvalue": 0.5,
    "loss": "categorical_crossentropy", "batch_size": 2, "augmentation": False,
    "learning_rate_reducer": True, "reducer_factor": 0.5, "reducer_patience": 4,
    # The seed neither weighs classes nor draws batches by class.
    "class_weights": "none", "class_sampling": 0.0,
}
_SEED_SIZE, _SEED_LAYERS = 512, 8
# How long a trial trains, not what it is: the baseline takes these from the study's [fixed]
# like every trial, so that it costs what a searched trial of its size costs (the seed's full
# passes and patience of 10 made it 70% of the sample study's run).
FIDELITY = ("steps_per_epoch", "patience", "save_overhead", "seed")


def max_layers(size: int) -> int:
    """The most levels an input side allows: divisible by 2**(L-1), bridge >= 4 px."""
    layers = 2
    while layers < 12 and size % 2**layers == 0 and size // 2**layers >= 4:
        layers += 1
    return layers


def seed_layers(size: int) -> int:
    """The seed's depth scaled to ``size``: the same bridge size (4 px) where possible."""
    return scaled_layers(_SEED_LAYERS, _SEED_SIZE, size)


def scaled_layers(layers: int, from_size: int, size: int) -> int:
    """A depth chosen for ``from_size`` px images, scaled to ``size`` px: one level fewer per
    halving, so the bridge keeps its size, within what ``size`` allows."""
    wanted = layers - round(math.log2(from_size / size)) if size > 0 and from_size > 0 else 2
    return max(2, min(wanted, max_layers(size)))


def bounded(space: tuple[ParamSpec, ...], size: int, where: str) -> tuple[ParamSpec, ...]:
    """The space with num_layers capped by what the image size allows."""
    out = []
    for p in space:
        if p.name == "num_layers":
            if p.kind == "categorical":
                choices = tuple(c for c in p.choices if isinstance(c, int) and c <= max_layers(size))
                if not choices:
                    raise ConfigError(f"{where}: [space.num_layers] no choice fits {size} px images "
                                      f"(at most {max_layers(size)} levels)")
                p = dataclasses.replace(p, choices=choices)
            else:
                if p.low > max_layers(size):
                    raise ConfigError(f"{where}: [space.num_layers] low = {p.low} is more levels than "
                                      f"{size} px images allow ({max_layers(size)})")
                p = dataclasses.replace(p, high=min(p.high, max_layers(size)))
        out.append(p)
    return tuple(out)


def suggest(trial: optuna.Trial, space: tuple[ParamSpec, ...],
            given: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Sample every parameter whose conditions hold, in the order of the study file; a
    parameter in ``given`` takes that value without being sampled or stored as an Optuna
    parameter (the baseline's values outside a categorical's choices: see
    :func:`baseline_unsampled`)."""
    values: dict[str, Any] = {}
    given = given or {}
    for p in space:
        if any(values.get(parent, _MISSING) not in allowed for parent, allowed in p.when.items()):
            continue
        if p.name in given:
            values[p.name] = given[p.name]
        elif p.kind == "categorical":
            values[p.name] = trial.suggest_categorical(p.name, list(p.choices))
        elif p.kind == "int":
            values[p.name] = trial.suggest_int(p.name, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
        else:
            values[p.name] = trial.suggest_float(p.name, float(p.low), float(p.high), step=p.step, log=p.log)
    return values


_MISSING = object()


def apply(base: cfg.Config, settings: Mapping[str, Any], source: str) -> cfg.Config:
    """``base`` with searched/fixed settings applied through the config's own checks: all of a
    section's keys at once, so the result is validated once and never half-way (a dataset
    config's 8 levels are not checked against a new image size before the trial's own depth
    replaces them)."""
    config = base
    for section in ("model", "train"):
        values = {k: v for k, v in settings.items() if _SECTION_OF.get(k, SETTABLE.get(k)) == section}
        if values:
            config = cfg.override(config, section, values, source)
    return config


def _fits(model: cfg.ModelConfig, size: int) -> bool:
    """Whether a config's depth suits ``size`` px as it is: its own size, or within
    :func:`max_layers` (the same rule the search space obeys)."""
    return size == model.image_width == model.image_height or model.num_layers <= max_layers(size)


_SECTION_OF = {"image_width": "model", "image_height": "model", "epochs": "train"}


def trial_config(base: cfg.Config, spec: StudySpec, image_size: int, values: Mapping[str, Any],
                 baseline: bool = False) -> cfg.Config:
    """The full config of one trial: the dataset config with the image size, the fixed
    settings and the sampled values applied together (the baseline takes the seed's settings
    for everything it does not sample, and the study's ``FIDELITY`` settings). Where neither the
    trial nor the study sets the depth, the dataset config's depth is kept if it suits the image
    size, else scaled to it (see :func:`scaled_layers`)."""
    settings: dict[str, Any] = {"image_width": image_size, "image_height": image_size}
    if baseline:
        settings.update(SEED_BASELINE)
        settings["num_layers"] = seed_layers(image_size)
        settings.update({k: v for k, v in spec.fixed.items() if k in FIDELITY})
    else:
        settings.update(spec.fixed)
    settings.update(values)
    if "num_layers" not in settings and not _fits(base.model, image_size):
        settings["num_layers"] = scaled_layers(base.model.num_layers, base.model.image_width, image_size)
    settings["epochs"] = spec.budget.max_epochs
    return apply(base, settings, f"{spec.path}: trial settings")


def baseline_params(spec: StudySpec, space: tuple[ParamSpec, ...], image_size: int) -> dict[str, Any]:
    """The seed's values of the searched parameters, to enqueue as trial 0 (Optuna's fixed
    parameters); those outside a categorical's choices are left out (:func:`baseline_unsampled`)."""
    seed = _seed_values(image_size)
    unsampled = baseline_unsampled(space, image_size)
    return {p.name: seed[p.name] for p in space if p.name in seed and p.name not in unsampled}


def baseline_unsampled(space: tuple[ParamSpec, ...], image_size: int) -> dict[str, Any]:
    """The seed's values that lie outside their categorical's choices (the seed's 11x11 kernel
    where the space offers 3, 5 and 7): the baseline trial takes them without suggesting them.

    Optuna cannot hold them as parameters: an enqueued (fixed) value outside a numeric range
    is stored with a warning, but ``CategoricalDistribution.to_internal_repr`` raises for a
    value that is not among the choices. Keeping the value among the choices only for the
    baseline made every searched trial able to sample it (the sample study's kernel 11 is over
    its FLOP budget: a third of its trials were infeasible). The value stays in the trial's
    ``settings`` user attribute; samplers see a trial without that parameter, as for a
    conditional one.

    >>> from search.spec.study_file import ParamSpec
    >>> baseline_unsampled((ParamSpec("base_kernels", "categorical", choices=(3, 5, 7)),), 96)
    {'base_kernels': 11}
    """
    seed = _seed_values(image_size)
    return {p.name: seed[p.name] for p in space
            if p.kind == "categorical" and p.name in seed and seed[p.name] not in p.choices}


def _seed_values(image_size: int) -> dict[str, Any]:
    return {**SEED_BASELINE, "num_layers": seed_layers(image_size)}


def infeasible(config: cfg.Config, budget: Budget, *, baseline: bool = False) -> str | None:
    """Why a configuration must not be trained (None if it may): over the parameter, FLOP or
    memory budget. The baseline is exempt from the parameter and FLOP caps (it is the
    reference, whatever it costs) but never from memory."""
    cost = estimate_cost(config.model)
    if not baseline and budget.max_params and cost.params > budget.max_params:
        return f"{cost.params:,} parameters exceed the budget of {budget.max_params:,}"
    if not baseline and budget.max_gflops and cost.flops / 1e9 > budget.max_gflops:
        return f"{cost.flops / 1e9:.2f} GFLOPs per image exceed the budget of {budget.max_gflops}"
    memory = cost.train_bytes(config.train.batch_size) / 2**30 + _PROCESS_GB
    limit, what = (budget.max_memory_gb, "the study's budget") if budget.max_memory_gb else (
        _worker_share_gb(), "this worker's memory share")
    if limit and memory > limit:
        return f"about {memory:.2f} GiB of training memory exceed {what} ({limit:.2f} GiB)"
    return None


_PROCESS_GB = 0.7  # a worker's own footprint (TensorFlow, the data) before any model
MEMORY_ENV = "FLEXUNET_MEMORY_GB"


def _worker_share_gb() -> float | None:
    """Without a memory budget, a worker may use its share of the machine's memory, or of its
    GPU's (set by the launcher): TensorFlow on a CPU does not raise on exhaustion, it crashes,
    and a GPU worker's share is all it can allocate."""
    value = os.environ.get(MEMORY_ENV)
    try:
        return float(value) if value else None
    except ValueError:
        return None


def recorded_config(base: cfg.Config, trial: FrozenTrial, out: Path) -> cfg.Config:
    """The dataset's config with the settings a trial recorded (its ``settings`` user
    attribute), writing into ``out``: what the export, the report and the refit rebuild."""
    settings = dict(trial.user_attrs.get(k.SETTINGS) or {})
    if not settings:
        raise FlexUNetError(f"trial {trial.number} has no 'settings' user attribute")
    model_keys = {k: v for k, v in settings.items() if k in vars(base.model)}
    train_keys = {k: v for k, v in settings.items() if k in vars(base.train)}
    config = cfg.override(base, "model", model_keys, f"trial {trial.number}")
    config = cfg.override(config, "train", train_keys, f"trial {trial.number}")
    return config.replace(
        train=dataclasses.replace(config.train, model_dir=out, eval_dir=out / "eval", epoch_change_infer=False,
                       epoch_change_infer_dir=out / "epoch_change_infer"),
        eval=cfg.EvalConfig(out),
        infer=cfg.InferConfig(config.test.images_dir, out / "infer_output"),
    )

"""Study files (TOML) parsed once into a :class:`StudySpec`.

A study file names the dataset, the settings that stay fixed, the search space (with
conditional parameters), the objectives, the budget, and the sampler and pruner. Every
malformed entry raises :class:`~flexunet.errors.ConfigError` naming its key.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flexunet.config import searchable
from flexunet.errors import ConfigError
from flexunet.textfiles import read_text
from search.store.artifacts import Location
from search.store.artifacts import parse as parse_artifacts

# name -> the train_eval_infer.config section it sets: every model and training setting the
# config defines, less those the dataset or the budget decide (flexunet.config.searchable).
SETTABLE: dict[str, str] = searchable()
SECOND_OBJECTIVES = ("params", "latency")
SAMPLERS = ("TPESampler", "RandomSampler", "GPSampler", "NSGAIISampler", "QMCSampler")
PRUNERS = ("MedianPruner", "PercentilePruner", "SuccessiveHalvingPruner", "HyperbandPruner",
           "ThresholdPruner", "PatientPruner", "WilcoxonPruner", "NopPruner")
_KINDS = ("int", "float", "categorical")


@dataclass(frozen=True)
class ParamSpec:
    """One searched parameter; ``when`` makes it conditional on other parameters' values."""

    name: str
    kind: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()
    when: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class PrepareSpec:
    dataset: str
    source: Path
    size: int | None = None
    seed: int = 0
    split: tuple[float, float, float] = (0.7, 0.15, 0.15)
    hemorrhage_types: bool = False  # ct-ich: one class per hemorrhage type (prepare --hemorrhage-types)


@dataclass(frozen=True)
class Budget:
    n_trials: int = 20
    timeout: float | None = None  # seconds for the whole study
    max_epochs: int = 30
    max_params: int | None = None
    max_memory_gb: float | None = None
    max_gflops: float | None = None  # forward pass of one image


@dataclass(frozen=True)
class Component:
    """A sampler or pruner: an Optuna class name and its keyword arguments."""

    name: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)


# The test-time augmentations a refit may choose among (flexunet.ensemble.TTA_MODES): none, the
# horizontal flip, or every mirror of the image plane (nnU-Net's default).
TTA_CHOICES = ("none", "horizontal", "all")


@dataclass(frozen=True)
class RefitSpec:
    """``[refit]``: after the search, the ``top_k`` best configurations are trained again as
    ``folds`` x ``seeds`` models at a higher fidelity (search/trial/refit.py).

    ``folds`` None means the study's; ``image_size`` None the study's. ``tta`` lists the
    test-time augmentations the export chooses among on the refit's out-of-fold predictions.
    ``ema`` trains with the optimizer's exponential moving average of the weights (Keras'
    ``use_ema``), written into the model at every epoch's end, so that validation, early
    stopping and the saved model all see the averaged weights.
    """

    folds: int | None = None
    seeds: int = 1
    epochs: int = 30
    steps_per_epoch: int = 16
    patience: int = 8
    image_size: int | None = None
    ema: bool = False
    ema_momentum: float = 0.99
    tta: tuple[str, ...] = ("none", "horizontal", "all")
    top_k: int = 1


@dataclass(frozen=True)
class StudySpec:
    name: str
    path: Path
    dataset_config: Path | None
    prepare: PrepareSpec | None
    fixed: Mapping[str, Any]
    space: tuple[ParamSpec, ...]
    second_objective: str | None
    budget: Budget
    sampler: Component
    pruner: Component
    image_size: int | None = None
    baseline: bool = True
    storage: str | None = None
    out: Path | None = None
    folds: int = 1  # K >= 2: every trial is K-fold cross-validated (search/trial/cv.py); 1: one split
    artifacts: Location | None = None  # [study] artifacts: a folder or s3://BUCKET/PREFIX
    refit: RefitSpec | None = None  # [refit]: the winners trained again after the search

    def refit_folds(self) -> int:
        """The folds of the refit: its own, or the study's."""
        assert self.refit is not None
        return self.refit.folds or (self.folds if self.folds >= 2 else 3)

    @property
    def cross_validated(self) -> bool:
        return self.folds >= 2

    @property
    def directions(self) -> list[str]:
        return ["maximize"] + (["minimize"] if self.second_objective else [])

    def with_overrides(self, *, n_trials: int | None = None, timeout: float | None = None,
                       max_epochs: int | None = None, image_size: int | None = None,
                       refit: bool = True) -> StudySpec:
        """The spec with command-line overrides applied (smoke runs). ``max_epochs`` caps the
        refit's epochs (and patience) too: a smoke run stays one. ``refit=False`` searches only
        (``search run --no-refit``): the search keeps the whole timeout, and the file's
        ``[refit]`` is left for ``flexunet search refit``."""
        budget = self.budget
        refit = self.refit if refit else None
        if n_trials is not None:
            budget = dataclasses.replace(budget, n_trials=_positive_int(n_trials, "--n-trials"))
        if timeout is not None:
            budget = dataclasses.replace(budget, timeout=_positive_number(timeout, "--timeout"))
        if max_epochs is not None:
            budget = dataclasses.replace(budget, max_epochs=_positive_int(max_epochs, "--max-epochs"))
            if refit is not None:
                refit = dataclasses.replace(refit, epochs=min(refit.epochs, max_epochs),
                                            patience=min(refit.patience, max_epochs))
        size = self.image_size if image_size is None else _positive_int(image_size, "--image-size")
        return dataclasses.replace(self, budget=budget, image_size=size, refit=refit)


# The space a spec built in Python searches unless it names its own: the sample study's core
# (studies/ct_ich_sample.toml), whose sizes fit a CPU; num_layers is capped by the image size.
DEFAULT_SPACE = (
    ParamSpec("base_filters", "int", 8, 32, step=8),
    ParamSpec("num_layers", "int", 3, 5),
    ParamSpec("base_kernels", "categorical", choices=(3, 5, 7)),
    ParamSpec("dropout_rate", "float", 0.0, 0.1),
    ParamSpec("learning_rate", "float", 3e-4, 5e-3, log=True),
    ParamSpec("batch_size", "categorical", choices=(2, 4, 8)),
)


def for_dataset(dataset_config: str | Path, *, name: str | None = None, n_trials: int = 20,
                max_epochs: int = 30, timeout: float | None = None, folds: int = 1, image_size: int | None = None,
                space: tuple[ParamSpec, ...] = DEFAULT_SPACE, fixed: Mapping[str, Any] | None = None) -> StudySpec:
    """A spec built in Python from a prepared dataset (its ``train_eval_infer.config``) and a
    few choices, with the study file's defaults for the rest (TPE; the median pruner, or
    successive halving when ``folds >= 2``; the seed baseline as trial 0).

    >>> spec = for_dataset("runs/demo/data/train_eval_infer.config", name="demo", n_trials=8, folds=3)
    >>> spec.budget.n_trials, spec.folds, spec.sampler.name, spec.pruner.name, spec.cross_validated
    (8, 3, 'TPESampler', 'SuccessiveHalvingPruner', True)
    >>> [p.name for p in spec.space][:2], spec.dataset_config.name
    (['base_filters', 'num_layers'], 'train_eval_infer.config')
    >>> for_dataset("data.config", n_trials=0)
    Traceback (most recent call last):
    ...
    flexunet.errors.ConfigError: n_trials: expected a positive integer, got 0
    """
    config = Path(dataset_config).absolute()
    study_name = name or config.parent.name or "study"
    budget = Budget(n_trials=_positive_int(n_trials, "n_trials"), max_epochs=_positive_int(max_epochs, "max_epochs"),
                    timeout=None if timeout is None else _positive_number(timeout, "timeout"))
    folds = _positive_int(folds, "folds")
    fixed = dict(fixed or {})
    overlap = sorted(set(fixed) & {p.name for p in space})
    if overlap:
        raise ConfigError(f"fixed {overlap[0]!r}: is also in the space; keep it in one place")
    return StudySpec(
        name=study_name, path=Path(f"{study_name}.toml"), dataset_config=config, prepare=None, fixed=fixed,
        space=tuple(space), second_objective=None, budget=budget, sampler=Component("TPESampler"),
        pruner=Component("SuccessiveHalvingPruner" if folds >= 2 else "MedianPruner"),
        image_size=None if image_size is None else _positive_int(image_size, "image_size"), folds=folds)


def to_json(spec: StudySpec) -> str:
    """The spec as JSON, as a launcher hands it to its workers (:func:`from_json` reads it
    back unchanged: a spec built or changed in Python runs as given)."""
    return json.dumps(_plain(spec), allow_nan=False, indent=1)


def from_json(text: str) -> StudySpec:
    """The spec :func:`to_json` wrote.

    Example::

        >>> spec = loads('[study]\\nname = "s"\\n[dataset]\\nconfig = "d.config"\\n'
        ...              '[space]\\nnum_layers = { type = "int", low = 2, high = 4 }', Path("s.toml"))
        >>> from_json(to_json(spec)) == spec
        True
    """
    return _typed(StudySpec, json.loads(text))


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {key: _plain(v) for key, v in value.items()}
    return value


def _typed(kind: Any, value: Any) -> Any:
    """``value`` (plain JSON) as the type ``kind`` the spec's dataclasses declare."""
    if value is None:
        return None
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        return _typed(options[0], value) if len(options) == 1 else value
    if kind is Path:
        return Path(value)
    if dataclasses.is_dataclass(kind):
        hints = typing.get_type_hints(kind)
        return kind(**{f.name: _typed(hints[f.name], value[f.name]) for f in dataclasses.fields(kind)
                       if f.name in value})
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_typed(args[0], v) for v in value)
        return tuple(_typed(a, v) for a, v in zip(args, value))
    if origin in (dict, Mapping, typing.Mapping) or kind in (dict, Mapping):
        inner = args[1] if len(args) == 2 else Any
        return {key: _typed(inner, v) for key, v in value.items()}
    return value


def load(path: str | Path) -> StudySpec:
    """Read and check a study file."""
    path = Path(path)
    text = read_text(path, "study file", ConfigError)
    return loads(text, path)


def loads(text: str, path: Path) -> StudySpec:
    try:
        data = tomllib.loads(text)
    except ValueError as exc:  # TOMLDecodeError, or an integer of more than 4300 digits
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid TOML (nested too deeply)") from None
    base = path.resolve().parent
    where = _Where(str(path))
    _only(data, ("study", "dataset", "fixed", "space", "budget", "sampler", "pruner", "refit"), where)

    study = _table(data, "study", where, required=True)
    _only(study, ("name", "second_objective", "image_size", "baseline", "storage", "out", "folds", "artifacts"),
          where.sub("study"))
    name = _string(study, "name", where.sub("study"), required=True)
    if not name.strip() or len(name) > 200 or any(ord(c) < 32 for c in name):
        raise ConfigError(f"{where.sub('study').key('name')}: expected a printable name of 1..200 characters")
    second = study.get("second_objective")
    if second is not None and second not in SECOND_OBJECTIVES:
        raise ConfigError(f"{where.sub('study').key('second_objective')}: expected one of "
                          f"{', '.join(SECOND_OBJECTIVES)}, got {second!r}")
    image_size = study.get("image_size")
    if image_size is not None:
        image_size = _positive_int(image_size, where.sub("study").key("image_size"))
    baseline = study.get("baseline", True)
    if not isinstance(baseline, bool):
        raise ConfigError(f"{where.sub('study').key('baseline')}: expected true or false")
    storage = _string(study, "storage", where.sub("study"))
    out = _string(study, "out", where.sub("study"))
    folds = _positive_int(study.get("folds", 1), where.sub("study").key("folds"))
    artifacts = _string(study, "artifacts", where.sub("study"))

    dataset_config, prepare = _dataset(_table(data, "dataset", where, required=True), base, where.sub("dataset"))
    fixed = _fixed(_table(data, "fixed", where), where.sub("fixed"))
    space = _space(_table(data, "space", where, required=True), where.sub("space"))
    overlap = sorted(set(fixed) & {p.name for p in space})
    if overlap:
        raise ConfigError(f"{where.sub('fixed').key(overlap[0])}: is also in [space]; keep it in one place")
    budget = _budget(_table(data, "budget", where), where.sub("budget"))
    sampler = _component(_table(data, "sampler", where), SAMPLERS, "TPESampler", where.sub("sampler"))
    # A CV trial reports at a combined (fold, epoch) step; successive halving cuts weak trials
    # inside their first fold (search/trial/cv.py explains the choice).
    pruner = _component(_table(data, "pruner", where), PRUNERS,
                        "SuccessiveHalvingPruner" if folds >= 2 else "MedianPruner", where.sub("pruner"))
    return StudySpec(
        name=name, path=path, dataset_config=dataset_config, prepare=prepare, fixed=fixed, space=space,
        second_objective=second, budget=budget, sampler=sampler, pruner=pruner, image_size=image_size,
        baseline=baseline, storage=storage, out=(base / out) if out else None, folds=folds,
        artifacts=None if artifacts is None else parse_artifacts(artifacts, where=where.sub("study").key("artifacts"),
                                                                base=base),
        refit=_refit(data["refit"], where.sub("refit")) if "refit" in data else None,
    )


@dataclass(frozen=True)
class _Where:
    file: str
    table: str = ""

    def sub(self, name: str) -> _Where:
        return _Where(self.file, f"{self.table}.{name}" if self.table else name)

    def key(self, name: str) -> str:
        return f"{self.file}: [{self.table}] {name}" if self.table else f"{self.file}: {name}"


def _only(table: Mapping[str, Any], allowed: tuple[str, ...], where: _Where) -> None:
    for key in table:
        if key not in allowed:
            raise ConfigError(f"{where.key(key)}: unknown key; expected one of {', '.join(allowed)}")


def _table(data: Mapping[str, Any], name: str, where: _Where, required: bool = False) -> dict[str, Any]:
    value = data.get(name)
    if value is None:
        if required:
            raise ConfigError(f"{where.file}: [{name}] is missing")
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where.key(name)}: expected a table [{name}]")
    return value


def _string(table: Mapping[str, Any], key: str, where: _Where, required: bool = False) -> str | None:
    value = table.get(key)
    if value is None:
        if required:
            raise ConfigError(f"{where.key(key)}: is missing")
        return None
    if not isinstance(value, str):
        raise ConfigError(f"{where.key(key)}: expected a string, got {value!r}")
    if "\x00" in value:
        raise ConfigError(f"{where.key(key)}: holds a NUL character")
    return value


def _positive_int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where}: expected a positive integer, got {value!r}")
    return value


def _finite(value: int | float) -> bool:
    """A number a float can hold: not NaN or infinite, and (TOML integers have no size limit)
    not an integer too large to convert."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _positive_number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not _finite(value) or value <= 0:
        raise ConfigError(f"{where}: expected a positive number, got {value!r}")
    return float(value)


def _dataset(table: Mapping[str, Any], base: Path, where: _Where) -> tuple[Path | None, PrepareSpec | None]:
    _only(table, ("config", "prepare"), where)
    if ("config" in table) == ("prepare" in table):
        raise ConfigError(f"{where.file}: [dataset] needs exactly one of config (a train_eval_infer.config "
                          "naming train/valid/test folders) or prepare (a dataset to prepare)")
    if "config" in table:
        return base / _string(table, "config", where), None
    prep = table["prepare"]
    if not isinstance(prep, dict):
        raise ConfigError(f"{where.key('prepare')}: expected a table")
    pw = where.sub("prepare")
    _only(prep, ("dataset", "source", "size", "seed", "split", "hemorrhage_types"), pw)
    types = prep.get("hemorrhage_types", False)
    if not isinstance(types, bool):
        raise ConfigError(f"{pw.key('hemorrhage_types')}: expected true or false, got {types!r}")
    kind = _string(prep, "dataset", pw, required=True)
    if kind != "ct-ich":
        raise ConfigError(f"{pw.key('dataset')}: only 'ct-ich' can be prepared, got {kind!r}")
    size = prep.get("size")
    seed = prep.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"{pw.key('seed')}: expected an integer >= 0, got {seed!r}")
    split = prep.get("split", [0.7, 0.15, 0.15])
    if (not isinstance(split, list) or len(split) != 3
            or not all(isinstance(v, int | float) and not isinstance(v, bool) and 0 < v < 1 for v in split)
            or abs(sum(split) - 1) > 1e-6):
        raise ConfigError(f"{pw.key('split')}: expected three fractions in (0, 1) that sum to 1")
    return None, PrepareSpec(
        dataset=kind, source=base / _string(prep, "source", pw, required=True),
        size=None if size is None else _positive_int(size, pw.key("size")), seed=seed,
        split=(float(split[0]), float(split[1]), float(split[2])), hemorrhage_types=types)


def _fixed(table: Mapping[str, Any], where: _Where) -> dict[str, Any]:
    for key, value in table.items():
        if key not in SETTABLE:
            raise ConfigError(f"{where.key(key)}: not a setting the search can fix or sample; known: "
                              f"{', '.join(sorted(SETTABLE))}")
        if isinstance(value, dict):
            raise ConfigError(f"{where.key(key)}: expected a value, got a table")
    return dict(table)


def _space(table: Mapping[str, Any], where: _Where) -> tuple[ParamSpec, ...]:
    if not table:
        raise ConfigError(f"{where.file}: [space] has no parameters")
    params = []
    for name, entry in table.items():
        pw = where.sub(name)
        if name not in SETTABLE:
            raise ConfigError(f"{where.key(name)}: not a setting the search can sample; known: "
                              f"{', '.join(sorted(SETTABLE))}")
        if not isinstance(entry, dict):
            raise ConfigError(f"{where.key(name)}: expected a table like {{ type = \"int\", low = 1, high = 4 }}")
        _only(entry, ("type", "low", "high", "log", "step", "choices", "when"), pw)
        kind = entry.get("type")
        if kind not in _KINDS:
            raise ConfigError(f"{pw.key('type')}: expected one of {', '.join(_KINDS)}, got {kind!r}")
        when = _when(entry.get("when", {}), pw)
        if kind == "categorical":
            choices = entry.get("choices")
            if not isinstance(choices, list) or not choices or len(choices) > 1000:
                raise ConfigError(f"{pw.key('choices')}: expected a non-empty list")
            for choice in choices:
                if not isinstance(choice, bool | int | float | str) or (isinstance(choice, float)
                                                                        and not math.isfinite(choice)):
                    raise ConfigError(f"{pw.key('choices')}: {choice!r} is not a number, string or boolean")
            if len({repr(c) for c in choices}) != len(choices):
                raise ConfigError(f"{pw.key('choices')}: holds a value twice")
            for key in ("low", "high", "log", "step"):
                if key in entry:
                    raise ConfigError(f"{pw.key(key)}: not used by a categorical parameter")
            params.append(ParamSpec(name, kind, choices=tuple(choices), when=when))
            continue
        if "choices" in entry:
            raise ConfigError(f"{pw.key('choices')}: only categorical parameters have choices")
        number = int if kind == "int" else (int, float)
        bounds = []
        for key in ("low", "high"):
            value = entry.get(key)
            if isinstance(value, bool) or not isinstance(value, number) or not _finite(value):
                raise ConfigError(f"{pw.key(key)}: expected {'an integer' if kind == 'int' else 'a number'}, "
                                  f"got {value!r}")
            bounds.append(value)
        low, high = bounds
        if low > high:
            raise ConfigError(f"{pw.key('low')}: {low} is above high = {high}")
        log = entry.get("log", False)
        if not isinstance(log, bool):
            raise ConfigError(f"{pw.key('log')}: expected true or false")
        if log and low <= 0:
            raise ConfigError(f"{pw.key('low')}: a log scale needs low > 0")
        step = entry.get("step")
        if step is not None:
            if isinstance(step, bool) or not isinstance(step, number) or not _finite(step) or step <= 0:
                raise ConfigError(f"{pw.key('step')}: expected a positive {'integer' if kind == 'int' else 'number'}")
            if log:
                raise ConfigError(f"{pw.key('step')}: cannot be combined with log = true")
        params.append(ParamSpec(name, kind, low=low, high=high, log=log, step=step, when=when))
    names = {p.name for p in params}
    for p in params:
        for other in p.when:
            if other not in names or other == p.name:
                raise ConfigError(f"{where.sub(p.name).key('when')}: {other!r} is not another parameter of [space]")
    return tuple(params)


def _when(value: Any, where: _Where) -> dict[str, tuple[Any, ...]]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where.key('when')}: expected a table like {{ optimizer = \"AdamW\" }}")
    result = {}
    for key, allowed in value.items():
        options = tuple(allowed) if isinstance(allowed, list) else (allowed,)
        if not options or not all(isinstance(o, bool | int | float | str) for o in options):
            raise ConfigError(f"{where.key('when')}: {key} must be a value or a list of values")
        result[key] = options
    return result


def _budget(table: Mapping[str, Any], where: _Where) -> Budget:
    _only(table, ("n_trials", "timeout", "max_epochs", "max_params", "max_memory_gb", "max_gflops"), where)
    values: dict[str, Any] = {}
    for key in ("n_trials", "max_epochs", "max_params"):
        if key in table:
            values[key] = _positive_int(table[key], where.key(key))
    for key in ("timeout", "max_memory_gb", "max_gflops"):
        if key in table:
            values[key] = _positive_number(table[key], where.key(key))
    return Budget(**values)


def _refit(table: Any, where: _Where) -> RefitSpec:
    if not isinstance(table, dict):
        raise ConfigError(f"{where.file}: refit: expected a table [refit]")
    names = tuple(f.name for f in dataclasses.fields(RefitSpec))
    _only(table, names, where)
    values: dict[str, Any] = {}
    for key in ("folds", "seeds", "epochs", "steps_per_epoch", "patience", "image_size", "top_k"):
        if key in table:
            values[key] = _positive_int(table[key], where.key(key))
    if values.get("folds") == 1:
        raise ConfigError(f"{where.key('folds')}: expected at least 2 (a refit trains one model per fold "
                          "and chooses its post-processing on their out-of-fold predictions)")
    if "ema" in table:
        if not isinstance(table["ema"], bool):
            raise ConfigError(f"{where.key('ema')}: expected true or false, got {table['ema']!r}")
        values["ema"] = table["ema"]
    if "ema_momentum" in table:
        momentum = table["ema_momentum"]
        if isinstance(momentum, bool) or not isinstance(momentum, int | float) or not 0 < momentum < 1:
            raise ConfigError(f"{where.key('ema_momentum')}: expected a number between 0 and 1, got {momentum!r}")
        values["ema_momentum"] = float(momentum)
    if "tta" in table:
        tta = table["tta"]
        tta = [tta] if isinstance(tta, str) else tta
        if (not isinstance(tta, list) or not tta or not all(isinstance(t, str) and t in TTA_CHOICES for t in tta)
                or len(set(tta)) != len(tta)):
            raise ConfigError(f"{where.key('tta')}: expected a list of distinct values among "
                              f"{', '.join(TTA_CHOICES)}, got {table['tta']!r}")
        values["tta"] = tuple(tta)
    return RefitSpec(**values)


def _component(table: Mapping[str, Any], known: tuple[str, ...], default: str, where: _Where) -> Component:
    name = table.get("name", default)
    if name not in known:
        raise ConfigError(f"{where.key('name')}: expected one of {', '.join(known)}, got {name!r}")
    kwargs = {k: v for k, v in table.items() if k != "name"}
    for key, value in kwargs.items():
        if isinstance(value, dict | list):
            raise ConfigError(f"{where.key(key)}: expected a number, string or boolean")
    return Component(name, kwargs)

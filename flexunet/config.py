"""The seed's INI config (``train_eval_infer.config``) parsed once into typed objects.

Values are Python literals read with :func:`ast.literal_eval` (never ``eval``). Relative paths
are resolved against the folder that holds the config file, so a config works from any working
directory. Keys the project does not use are warned about once; wrong values raise
:class:`~flexunet.errors.ConfigError` naming the section and key.
"""

from __future__ import annotations

import ast
import configparser
import dataclasses
import json
import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flexunet.errors import ConfigError
from flexunet.postprocess import PostProcessing, check_classes
from flexunet.textfiles import read_text

_logger = logging.getLogger(__name__)

CONFIG_FILE = "train_eval_infer.config"  # the seed's file name, kept for what prepare and export write

LOSSES = ("categorical_crossentropy", "dice_loss", "categorical_crossentropy+dice_loss")
# Seed spellings of the same losses.
_LOSS_ALIASES = {
    "cce": "categorical_crossentropy",
    "binary_crossentropy": "categorical_crossentropy",
    "dice": "dice_loss",
    "cce_dice_loss": "categorical_crossentropy+dice_loss",
    "bce_dice_loss": "categorical_crossentropy+dice_loss",
    "categorical_crossentropy+dice": "categorical_crossentropy+dice_loss",
}
METRICS = ("foreground_dice", "dice_coef_multiclass")
OPTIMIZERS = ("Adam", "AdamW", "SGD", "RMSprop")
# How the loss weighs classes: "none", or "balanced" (each class by 1/sqrt of its pixel share
# in the training masks: flexunet.losses.class_weights).
CLASS_WEIGHTS = ("none", "balanced")
ACTIVATIONS = ("relu", "elu", "gelu", "selu", "silu", "swish", "mish", "leaky_relu")
MODEL_NAMES = ("TensorFlowFlexUNet", "FlexUNet")  # [model] model: the one architecture built here
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

Color = tuple[int, int, int]
# JPEG keeps flat colour within a few units of RGB distance, and class colours of real palettes
# are 100+ apart; the far mixes JPEG makes at class edges are handled apart (see
# flexunet.data.io.snap_colors).
DEFAULT_COLOUR_TOLERANCE = 48.0


# Settings the dataset, the command or the study's budget decide: a study file can neither fix
# nor search them (see searchable).
_NOT_SEARCHED = {"searched": False}


@dataclass(frozen=True)
class ModelConfig:
    """Architecture and optimisation settings of one FlexUNet ([model])."""

    image_width: int = field(metadata=_NOT_SEARCHED)
    image_height: int = field(metadata=_NOT_SEARCHED)
    num_classes: int = field(metadata=_NOT_SEARCHED)
    image_channels: int = field(default=3, metadata=_NOT_SEARCHED)
    input_normalize: bool = field(default=True, metadata=_NOT_SEARCHED)
    normalization: bool = False
    base_filters: int = 16
    base_kernels: tuple[int, int] = (3, 3)
    num_layers: int = 6
    dropout_rate: float = 0.0
    # The seed's option: every Dropout layer gets [train] seed, so its masks repeat run to run
    # even without a global seed.
    dropout_seed_fixing: bool = False
    dilation: tuple[int, int] = (1, 1)
    activation: str = "relu"
    optimizer: str = "Adam"
    learning_rate: float = 1e-4
    clipvalue: float | None = None
    weight_decay: float | None = None
    loss: str = "categorical_crossentropy"
    class_weights: str = "none"
    metrics: tuple[str, ...] = field(default=("dice_coef_multiclass",), metadata=_NOT_SEARCHED)
    show_summary: bool = field(default=False, metadata=_NOT_SEARCHED)
    # The seed's head of a one-class model (sigmoid, trained with binary cross-entropy); models
    # of more classes end in softmax whatever it says, as in the seed.
    final_activation: str = field(default="sigmoid", metadata=_NOT_SEARCHED)

    def __post_init__(self) -> None:
        _check_model(self)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.image_height, self.image_width, self.image_channels)


@dataclass(frozen=True)
class TrainConfig:
    """Training loop settings ([train])."""

    epochs: int = field(default=100, metadata=_NOT_SEARCHED)
    batch_size: int = 2
    # Batches per epoch; None means one pass over the training set. Small data sets train
    # better with a fixed number of augmented batches per epoch (as nnU-Net does).
    steps_per_epoch: int | None = None
    patience: int = 10
    model_dir: Path = field(default=Path("models"), metadata=_NOT_SEARCHED)
    eval_dir: Path = field(default=Path("eval"), metadata=_NOT_SEARCHED)
    images_dir: Path | None = field(default=None, metadata=_NOT_SEARCHED)
    masks_dir: Path | None = field(default=None, metadata=_NOT_SEARCHED)
    learning_rate_reducer: bool = True
    reducer_factor: float = 0.5
    reducer_patience: int = 4
    reducer_min_lr: float = field(default=1e-7, metadata=_NOT_SEARCHED)
    epoch_change_infer: bool = field(default=False, metadata=_NOT_SEARCHED)
    epoch_change_infer_dir: Path = field(default=Path("epoch_change_infer"), metadata=_NOT_SEARCHED)
    num_infer_images: int = field(default=6, metadata=_NOT_SEARCHED)
    seed: int = 137
    augmentation: bool = True
    augmentation_strength: float = 0.5
    # The most of the training time that each periodic save (best model, resume checkpoint,
    # learning curves) may take; 0 saves after every epoch. Final outputs are always written.
    save_overhead: float = 0.02
    # The share of each batch's slices drawn to hold a class, as nnU-Net oversamples
    # foreground: each such slot draws a class present in the training masks, then a slice that
    # holds it (flexunet.data.batches). None: 1/3, except where every training slice holds
    # every class (nothing to balance: a binary set of lesion slices trains as before).
    class_sampling: float | None = None


@dataclass(frozen=True)
class SplitDirs:
    """An images/masks folder pair ([valid], [test])."""

    images_dir: Path | None = None
    masks_dir: Path | None = None


@dataclass(frozen=True)
class EvalConfig:
    """Where ``flexunet evaluate`` writes ([eval])."""

    output_dir: Path = Path(".")


@dataclass(frozen=True)
class InferConfig:
    """Inputs and outputs of ``flexunet infer`` ([infer])."""

    images_dir: Path | None = None
    output_dir: Path = Path("infer_output")


@dataclass(frozen=True)
class ImageConfig:
    """How images are read ([image])."""

    color_order: str = "RGB"


@dataclass(frozen=True)
class MaskConfig:
    """How masks map to class indices ([mask])."""

    rgb_map: Mapping[Color, int]
    mask_file_format: str = ".png"
    # Lossy (JPEG) masks only: a colour within this Euclidean RGB distance of one rgb_map
    # colour is read as that colour (farther ones too, outside regions 7 px across: edge
    # artefacts); lossless masks must match exactly.
    colour_tolerance: float = DEFAULT_COLOUR_TOLERANCE

    def palette(self, num_classes: int) -> list[Color]:
        """One display colour per class: the first colour the map gives it, else a default."""
        colors: dict[int, Color] = {}
        for color, index in self.rgb_map.items():
            colors.setdefault(index, color)
        return [colors.get(i, _DEFAULT_PALETTE[i % len(_DEFAULT_PALETTE)]) for i in range(num_classes)]


@dataclass(frozen=True)
class DatasetConfig:
    """Dataset-level metadata ([dataset])."""

    # Named groups ``patient`` and ``slice`` read from a file stem, for per-patient figures.
    patient_pattern: str | None = None


@dataclass(frozen=True)
class Config:
    """A whole ``train_eval_infer.config``."""

    model: ModelConfig
    mask: MaskConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    valid: SplitDirs = field(default_factory=SplitDirs)
    test: SplitDirs = field(default_factory=SplitDirs)
    eval: EvalConfig = field(default_factory=EvalConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    # Rules chosen on out-of-fold predictions (flexunet.postprocess); none by default.
    postprocess: PostProcessing = field(default_factory=PostProcessing)
    path: Path | None = None

    def replace(self, **sections: Any) -> Config:
        return dataclasses.replace(self, **sections)


_DEFAULT_PALETTE: tuple[Color, ...] = (
    (0, 0, 0), (255, 255, 255), (210, 80, 0), (0, 200, 0), (0, 90, 255), (255, 220, 0),
    (200, 0, 200), (0, 220, 220), (128, 128, 128), (255, 128, 128),
)
BINARY_RGB_MAP: dict[Color, int] = {(0, 0, 0): 0, (255, 255, 255): 1}


# --- value parsers ---------------------------------------------------------------------------


class _Raw(str):
    """Text that is not a Python literal; only string-typed keys accept it."""


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text.strip())
    except Exception:  # literal_eval raises many types (ValueError, SyntaxError, MemoryError...)
        return _Raw(text.strip())


def _describe(value: Any) -> str:
    text = str(value) if isinstance(value, _Raw) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _int(lo: int | None = None, hi: int | None = None) -> Callable[[Any, str], int]:
    def parse(value: Any, where: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {_describe(value)}")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise ConfigError(f"{where}: {value} is out of range {_range(lo, hi)}")
        return value

    return parse


def _float(lo: float | None = None, hi: float | None = None, *, open_lo: bool = False,
           open_hi: bool = False, optional: bool = False) -> Callable[[Any, str], float | None]:
    def parse(value: Any, where: str) -> float | None:
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {_describe(value)}")
        try:
            value = float(value)
        except OverflowError:  # an integer beyond any float: refused below as infinite
            value = float("inf") if value > 0 else float("-inf")
        bad = value != value or value in (float("inf"), float("-inf"))
        if lo is not None:
            bad = bad or value < lo or (open_lo and value == lo)
        if hi is not None:
            bad = bad or value > hi or (open_hi and value == hi)
        if bad:
            left = "(" if open_lo else "["
            right = ")" if open_hi else "]"
            raise ConfigError(f"{where}: {value} is out of range {left}{lo}, {hi}{right}")
        return value

    return parse


def _bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, _Raw) and value.lower() in ("true", "false", "yes", "no", "on", "off"):
        return value.lower() in ("true", "yes", "on")
    raise ConfigError(f"{where}: expected True or False, got {_describe(value)}")


def _str(choices: tuple[str, ...] | None = None,
         aliases: Mapping[str, str] | None = None) -> Callable[[Any, str], str]:
    def parse(value: Any, where: str) -> str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {_describe(value)}")
        text = str(value)
        if aliases:
            text = aliases.get(text, text)
        if choices is not None and text not in choices:
            raise ConfigError(f"{where}: {text!r} is not one of {', '.join(choices)}")
        return text

    return parse


def _path(value: Any, where: str) -> Path:
    if not isinstance(value, str) or not str(value).strip():
        raise ConfigError(f"{where}: expected a folder path, got {_describe(value)}")
    if "\x00" in value:
        raise ConfigError(f"{where}: the path holds a NUL character")
    try:
        os.fsencode(value)
    except UnicodeEncodeError:  # a lone surrogate written as an escape, e.g. "\ud800"
        raise ConfigError(f"{where}: {_describe(value)} is not a file name this system can use") from None
    return Path(str(value))


def _pair(what: str, check: Callable[[int], bool]) -> Callable[[Any, str], tuple[int, int]]:
    def parse(value: Any, where: str) -> tuple[int, int]:
        if isinstance(value, int) and not isinstance(value, bool):
            value = (value, value)
        if (not isinstance(value, tuple | list) or len(value) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
            raise ConfigError(f"{where}: expected a pair of integers like (3,3), got {_describe(value)}")
        a, b = value
        if a != b:
            raise ConfigError(f"{where}: FlexUNet needs a square {what}, got ({a},{b})")
        if not check(a):
            raise ConfigError(f"{where}: ({a},{b}) is not a valid {what}")
        return (a, b)

    return parse


def _metrics(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: expected a list of metric names, got {_describe(value)}")
    for name in value:
        if name not in METRICS:
            raise ConfigError(f"{where}: unknown metric {name!r}; known: {', '.join(METRICS)}")
    return tuple(value)


def _color(key: Any, where: str) -> Color:
    if isinstance(key, int) and not isinstance(key, bool) and 0 <= key <= 255:
        return (key, key, key)
    if (isinstance(key, tuple) and len(key) == 3
            and all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in key)):
        return (key[0], key[1], key[2])
    raise ConfigError(f"{where}: {_describe(key)} is not a colour (r,g,b) of 0..255 values")


def _rgb_map(value: Any, where: str) -> dict[Color, int]:
    if not isinstance(value, dict) or not value:
        raise ConfigError(f"{where}: expected a dict like {{(0,0,0):0, (255,255,255):1}}, got {_describe(value)}")
    mapping: dict[Color, int] = {}
    for key, index in value.items():
        color = _color(key, where)
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise ConfigError(f"{where}: class of colour {color} must be an integer >= 0, got {_describe(index)}")
        mapping[color] = index
    return mapping


def _suffix(value: Any, where: str) -> str:
    text = _str()(value, where).lower()
    if not text.startswith("."):
        text = "." + text
    if text not in IMAGE_SUFFIXES:
        raise ConfigError(f"{where}: {text!r} is not one of {', '.join(IMAGE_SUFFIXES)}")
    return text


def _pattern(value: Any, where: str) -> str:
    text = _str()(value, where)
    try:
        compiled = re.compile(text)
    except (re.error, OverflowError, RecursionError) as exc:  # a{99999999999}, (((...))) nested too deep
        raise ConfigError(f"{where}: not a regular expression ({exc})") from None
    if "patient" not in compiled.groupindex:
        raise ConfigError(f"{where}: the pattern needs a named group (?P<patient>...)")
    return text


def _threshold(value: Any, where: str) -> float | None:
    return _float(0.0, 1.0, open_lo=True, open_hi=True, optional=True)(value, where)


def _component_sizes(value: Any, where: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,)
    if (not isinstance(value, tuple | list) or not value
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)):
        raise ConfigError(f"{where}: expected one size >= 0 per foreground class like (0, 12), got {_describe(value)}")
    return tuple(value)


def _range(lo: float | None, hi: float | None) -> str:
    return f"[{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"


_Spec = dict[str, Callable[[Any, str], Any]]

_MODEL: _Spec = {
    "image_width": _int(8, 8192),
    "image_height": _int(8, 8192),
    "num_classes": _int(1, 255),
    "image_channels": _int(1, 4),
    "input_normalize": _bool,
    "normalization": _bool,
    "base_filters": _int(1, 1024),
    "base_kernels": _pair("kernel size (odd, 3..31)", lambda k: 3 <= k <= 31 and k % 2 == 1),
    "num_layers": _int(2, 12),
    "dropout_rate": _float(0.0, 1.0, open_hi=True),
    "dilation": _pair("dilation (1..16)", lambda d: 1 <= d <= 16),
    "activation": _str(ACTIVATIONS),
    "optimizer": _str(OPTIMIZERS),
    "learning_rate": _float(0.0, 10.0, open_lo=True),
    "clipvalue": _float(0.0, None, open_lo=True, optional=True),
    "weight_decay": _float(0.0, 1.0, optional=True),
    "loss": _str(LOSSES, _LOSS_ALIASES),
    "class_weights": _str(CLASS_WEIGHTS),
    "metrics": _metrics,
    "show_summary": _bool,
    "dropout_seed_fixing": _bool,
    "final_activation": _str(),
}
_TRAIN: _Spec = {
    "epochs": _int(1, 100_000),
    "batch_size": _int(1, 4096),
    "steps_per_epoch": _int(1, 1_000_000),
    "patience": _int(0, 100_000),
    "model_dir": _path,
    "eval_dir": _path,
    "images_dir": _path,
    "masks_dir": _path,
    "learning_rate_reducer": _bool,
    "reducer_factor": _float(0.0, 1.0, open_lo=True, open_hi=True),
    "reducer_patience": _int(1, 100_000),
    "reducer_min_lr": _float(0.0, None),
    "epoch_change_infer": _bool,
    "epoch_change_infer_dir": _path,
    "num_infer_images": _int(0, 64),
    "seed": _int(0, 2**32 - 1),
    "augmentation": _bool,
    "augmentation_strength": _float(0.0, 1.0),
    "save_overhead": _float(0.0, 0.5),
    "class_sampling": _float(0.0, 1.0, optional=True),
}
_DIRS: _Spec = {"images_dir": _path, "masks_dir": _path}
_EVAL: _Spec = {"output_dir": _path}
_INFER: _Spec = {"images_dir": _path, "output_dir": _path}
_IMAGE: _Spec = {"color_order": _str(("RGB", "BGR"))}
_MASK: _Spec = {"rgb_map": _rgb_map, "mask_file_format": _suffix, "colour_tolerance": _float(0.0, 442.0)}
_DATASET: _Spec = {"patient_pattern": _pattern}
_POSTPROCESS: _Spec = {"threshold": _threshold, "min_component_size": _component_sizes}

_SECTIONS: dict[str, tuple[_Spec, type]] = {
    "model": (_MODEL, ModelConfig),
    "train": (_TRAIN, TrainConfig),
    "valid": (_DIRS, SplitDirs),
    "test": (_DIRS, SplitDirs),
    "eval": (_EVAL, EvalConfig),
    "infer": (_INFER, InferConfig),
    "image": (_IMAGE, ImageConfig),
    "mask": (_MASK, MaskConfig),
    "dataset": (_DATASET, DatasetConfig),
    "postprocess": (_POSTPROCESS, PostProcessing),
}
# Keys the seed's configs carry that this project reads but has no use for.
_SEED_ONLY = {
    "model": {"generator"},
    "train": {"metrics", "create_backup", "save_weights_only", "validation_steps",
              "epoch_changeinfer", "epoch_changeinfer_dir"},
    "dataset": {"class_name"},
}
_PATH_KEYS = {"model_dir", "eval_dir", "images_dir", "masks_dir", "epoch_change_infer_dir", "output_dir"}
_warned: set[tuple[str, str, str]] = set()


def _warn_once(source: str, section: str, key: str, message: str) -> None:
    if (source, section, key) not in _warned:
        _warned.add((source, section, key))
        _logger.warning("%s: %s", source, message)


# --- loading ---------------------------------------------------------------------------------


def load(path: str | os.PathLike[str]) -> Config:
    """Read a ``train_eval_infer.config`` file into a :class:`Config`."""
    path = Path(path)
    text = read_text(path, "config file", ConfigError)
    return loads(text, source=str(path), base_dir=path.resolve().parent, path=path)


def loads(text: str, *, source: str = "<config>", base_dir: Path | None = None,
          path: Path | None = None) -> Config:
    """Parse config text; relative paths are resolved against ``base_dir`` when given."""
    parser = configparser.ConfigParser(interpolation=None, strict=True, empty_lines_in_values=False)
    try:
        parser.read_string(text, source=source)
    except configparser.Error as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{source}: not a valid INI file ({first})") from None
    if not parser.has_section("model"):
        raise ConfigError(f"{source}: no [model] section")

    values: dict[str, dict[str, Any]] = {}
    for section in parser.sections():
        name = section.strip().lower()
        if name not in _SECTIONS:
            _warn_once(source, name, "", f"section [{section}] is not used by flexunet; ignored")
            continue
        spec, _ = _SECTIONS[name]
        parsed: dict[str, Any] = {}
        for key, raw in parser.items(section):
            where = f"{source}: [{name}] {key}"
            if name == "model" and key == "model":
                _architecture(_literal(raw), where)
                continue
            if key not in spec:
                known = key in _SEED_ONLY.get(name, set())
                reason = "a seed setting flexunet does not use" if known else "unknown key"
                _warn_once(source, name, key, f"[{name}] {key}: {reason}; ignored")
                continue
            value = _literal(raw)
            if key in _PATH_KEYS:
                value = _raw_text(value)
            parsed[key] = spec[key](value, where)
            if key in _PATH_KEYS and base_dir is not None:
                parsed[key] = (base_dir / parsed[key]).resolve()
        values[name] = parsed

    model_values = values.get("model", {})
    for required in ("image_width", "image_height", "num_classes"):
        if required not in model_values:
            raise ConfigError(f"{source}: [model] {required} is missing")
    mask_values = values.get("mask", {})
    if "rgb_map" not in mask_values:
        if model_values["num_classes"] > 2:
            raise ConfigError(f"{source}: [mask] rgb_map is missing (needed for more than 2 classes)")
        mask_values["rgb_map"] = dict(BINARY_RGB_MAP)

    def build(section: str) -> Any:
        spec, cls = _SECTIONS[section]
        try:
            return cls(**values.get(section, {}))
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None

    for section in ("train", "eval", "infer"):
        values.setdefault(section, {})
        for key in _PATH_KEYS & set(_SECTIONS[section][0]):
            default = getattr(_SECTIONS[section][1], key, None)
            if key not in values[section] and isinstance(default, Path) and base_dir is not None:
                values[section][key] = (base_dir / default).resolve()
    values["mask"] = mask_values
    config = Config(
        model=build("model"), mask=build("mask"), train=build("train"), valid=build("valid"),
        test=build("test"), eval=build("eval"), infer=build("infer"), image=build("image"),
        dataset=build("dataset"), postprocess=build("postprocess"), path=path,
    )
    _check_classes(config, source)
    return config


def _architecture(value: Any, where: str) -> None:
    """[model] model names the seed's architecture; only TensorFlowFlexUNet is built here."""
    if value not in MODEL_NAMES:
        raise ConfigError(f"{where}: {_describe(value)} is not supported; flexunet builds "
                          f"TensorFlowFlexUNet only: set model = \"TensorFlowFlexUNet\" (or remove the key)")


def _raw_text(value: Any) -> Any:
    # Paths are strings; the seed quotes them but unquoted text is just as clear.
    return str(value) if isinstance(value, _Raw) else value


def _check_model(model: ModelConfig) -> None:
    levels = model.num_layers - 1
    factor = 2 ** levels
    for key, side in (("image_width", model.image_width), ("image_height", model.image_height)):
        if side % factor:
            raise ConfigError(
                f"[model] {key}: {side} is not divisible by 2**(num_layers-1) = {factor} "
                f"(num_layers = {model.num_layers}); use a multiple of {factor} or fewer layers")
    if model.num_classes == 1 and model.final_activation != "sigmoid":
        raise ConfigError(
            f"[model] final_activation: {model.final_activation!r} cannot train a one-class model; flexunet "
            f"trains it as the seed does, with \"sigmoid\" and binary cross-entropy: set final_activation = "
            f"\"sigmoid\", or num_classes = 2 for softmax")
    if model.dropout_rate * levels >= 1.0:
        raise ConfigError(
            f"[model] dropout_rate: {model.dropout_rate} * {levels} (the deepest level) must stay below 1")


def _check_classes(config: Config, source: str) -> None:
    classes = set(config.mask.rgb_map.values())
    n = max(2, config.model.num_classes)
    too_big = sorted(c for c in classes if c >= n)
    if too_big:
        raise ConfigError(f"{source}: [mask] rgb_map: class {too_big[0]} is not below num_classes = "
                          f"{config.model.num_classes}")
    if 0 not in classes:
        raise ConfigError(f"{source}: [mask] rgb_map: no colour maps to the background class 0")
    try:
        check_classes(config.postprocess, config.model.num_classes)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def override(config: Config, section: str, values: Mapping[str, Any], source: str) -> Config:
    """A copy of ``config`` with some keys of one section replaced, each value checked by the
    same parser that reads the INI file (so a study file and a config file agree on what is
    valid)."""
    spec, _ = _SECTIONS[section]
    parsed = {}
    for key, value in values.items():
        if key not in spec:
            raise ConfigError(f"{source}: {key!r} is not a [{section}] setting")
        parsed[key] = spec[key](value, f"{source}: {key}")
    try:
        updated = dataclasses.replace(getattr(config, section), **parsed)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return dataclasses.replace(config, **{section: updated})


def searchable() -> dict[str, str]:
    """The settings a study may fix or search, each with its section ("model" or "train"):
    every field of :class:`ModelConfig` and :class:`TrainConfig` but those the dataset, the
    command or the budget decide."""
    return {f.name: section for section, kind in (("model", ModelConfig), ("train", TrainConfig))
            for f in dataclasses.fields(kind) if f.metadata.get("searched", True)}


def require_dir(path: Path | None, section: str, key: str) -> Path:
    """The folder a command needs, or a ConfigError naming the key that should point to it."""
    if path is None:
        raise ConfigError(f"[{section}] {key} is missing")
    if not path.is_dir():
        raise ConfigError(f"[{section}] {key}: folder not found: {path}")
    return path


# --- writing ---------------------------------------------------------------------------------


def dumps(config: Config, relative_to: Path | None = None) -> str:
    """The config as seed-format INI text; paths relative to ``relative_to`` when given."""
    lines = ["; train_eval_infer.config written by flexunet", ""]
    sections = {
        "model": config.model, "dataset": config.dataset, "train": config.train,
        "valid": config.valid, "test": config.test, "eval": config.eval, "infer": config.infer,
        "image": config.image, "mask": config.mask, "postprocess": config.postprocess,
    }
    for name, obj in sections.items():
        lines.append(f"[{name}]")
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if value is None:
                continue
            lines.append(f"{f.name:<22} = {_format(value, relative_to)}")
        lines.append("")
    return "\n".join(lines)


def dump(config: Config, path: Path) -> None:
    """Write the config to ``path`` with paths relative to its folder."""
    path.write_text(dumps(config, relative_to=path.resolve().parent), encoding="utf-8")


def _format(value: Any, relative_to: Path | None) -> str:
    if isinstance(value, Path):
        if relative_to is not None and value.is_absolute():
            value = Path(os.path.relpath(value, relative_to))
        return _quote(value.as_posix() if value.as_posix() != "." else "./")
    if isinstance(value, str):
        return _quote(value)
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{tuple(k)}: {v}" for k, v in value.items()) + "}"
    if isinstance(value, tuple) and all(isinstance(v, str) for v in value):
        return "[" + ", ".join(_quote(v) for v in value) + "]"
    return repr(value)


def _quote(text: str) -> str:
    """A string as a literal that ``ast.literal_eval`` reads back unchanged. JSON's ASCII
    escapes would write a character beyond U+FFFF as a surrogate pair (``"\\ud800\\udc00"``),
    which Python reads as two lone surrogates: non-ASCII text is written as it is (UTF-8)."""
    return json.dumps(text, ensure_ascii=False)

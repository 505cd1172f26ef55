"""Property-based tests: whatever text the config and study-file parsers are given, the only
exception they may raise is ConfigError (one line for the user), never a bare KeyError,
TypeError, ValueError, RecursionError, OverflowError... which would reach the user as a traceback.

Examples are derandomized so CI sees the same ones on every run.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from flexunet import config as cfg
from flexunet.errors import ConfigError
from search.spec import study_file

FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# Relative paths in a config are resolved against this folder; it need not exist.
BASE_DIR = Path(tempfile.gettempdir()) / "flexunet-fuzz-base"
STUDY_PATH = BASE_DIR / "study.toml"


# --- config (INI) ----------------------------------------------------------------------------

_BIG_INTS = st.sampled_from([2**31, 2**63, 2**1024, 10**400, -(10**400)])  # some overflow a float
# Text that Python's literal parser reads as every kind of value, and some it cannot read.
_LITERALS = st.one_of(
    st.integers(-(2**40), 2**40).map(str),
    _BIG_INTS.map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["True", "False", "None", "true", "off", "yes", "1e999", "-1e999", "0x10", "1_000",
                     "'x' * 9", "()", "[]", "{}", "set()", "b'ab'", "3j", "...", "(3,3)", "(11, 11)",
                     "(3,5)", "(-1,-1)", "[3, 3]", "(3, 3, 3)", "(True, True)", "(2**40, 2**40)",
                     "{(0,0,0):0, (255,255,255):1}", "{(0,0,0):0, (210,80,0):1}", "{0: 0, 255: 1}",
                     "{(0,0,0): -1}", "{(0,0,0): True}", "{(0,0,0,0): 0}", "{(256,0,0): 0}", "{[1]: 0}",
                     "{(0,0,0): 0, (1,1,1): 300}", "{(0,0,0): 1}", '"(?P<patient>\\\\d+)_(?P<slice>.+)"',
                     '"(?P<patient>a{4294967296})"', '"' + "(" * 400 + "(?P<patient>a)" + ")" * 400 + '"',
                     '"(?P<patient>"', '"[unclosed"', '"models"', '"../../x"', '"/abs/path"', "'\\x00'", '"\\ud800"',
                     '"a\\x00b"', "''", '""', "' '", '"foreground_dice"', '["foreground_dice", "nope"]',
                     '"dice_coef_multiclass"', '"Adam"', '"adam"', '"relu"', '"BGR"', '".PNG"', '"png"',
                     '".gif"', '"dice"', '"cce_dice_loss"', '"FlexUNet"', '"UNet"', "[" * 300 + "]" * 300,
                     "(" * 300 + ")" * 300, "{" * 50 + "}" * 50, "lambda: 0", "__import__('os')"]),
    st.text(max_size=30).map(lambda s: s.replace("\n", " ").replace("\r", " ")),
    st.text(max_size=20).map(repr),
    st.lists(st.integers(-5, 300), max_size=4).map(lambda v: repr(tuple(v))),
    st.dictionaries(st.tuples(*[st.integers(-2, 300)] * 3), st.integers(-2, 300), max_size=3).map(repr),
)
_KEYS = {name: sorted(spec) for name, (spec, _) in cfg._SECTIONS.items()}
# Valid values of every key (alone; together they may still break a cross-key rule, which is
# part of what is tested).
_VALID: dict[str, dict[str, list[str]]] = {
    "model": {"image_width": ["64", "128", "96"], "image_height": ["64", "128", "32"], "num_classes": ["2", "3", "1"],
              "image_channels": ["1", "3"], "input_normalize": ["True"], "normalization": ["False", "true"],
              "base_filters": ["8", "16"], "base_kernels": ["(3,3)", "(11,11)", "5"], "num_layers": ["3", "4", "6"],
              "dropout_rate": ["0.0", "0.05", "0.2"], "dilation": ["(1,1)", "2"], "activation": ['"relu"', "gelu"],
              "optimizer": ['"Adam"', '"SGD"'], "learning_rate": ["7e-5", "1e-3"], "clipvalue": ["0.5", "None"],
              "weight_decay": ["None", "1e-4"], "loss": ['"dice"', '"categorical_crossentropy+dice_loss"'],
              "metrics": ['["foreground_dice"]', '"dice_coef_multiclass"'], "show_summary": ["False"]},
    "train": {"epochs": ["2", "100"], "batch_size": ["2", "8"], "steps_per_epoch": ["16"], "patience": ["0", "10"],
              "model_dir": ['"./models"', "models"], "eval_dir": ['"./eval"'], "images_dir": ['"train/images"'],
              "masks_dir": ['"train/masks"'], "learning_rate_reducer": ["True"], "reducer_factor": ["0.5"],
              "reducer_patience": ["4"], "reducer_min_lr": ["1e-7"], "epoch_change_infer": ["False"],
              "epoch_change_infer_dir": ['"infer"'], "num_infer_images": ["4"], "seed": ["137"],
              "augmentation": ["True"], "augmentation_strength": ["0.5", "1"]},
    "valid": {"images_dir": ['"valid/images"'], "masks_dir": ['"valid/masks"']},
    "test": {"images_dir": ['"test/images"'], "masks_dir": ['"test/masks"']},
    "eval": {"output_dir": ['"evaluation"']},
    "infer": {"images_dir": ['"test/images"'], "output_dir": ['"out"']},
    "image": {"color_order": ['"RGB"', '"BGR"']},
    "mask": {"mask_file_format": ['".png"', "jpg"],
             "rgb_map": ["{(0,0,0):0, (255,255,255):1}", "{(0,0,0):0, (210,80,0):1, (0,255,0):2}"]},
    "dataset": {"patient_pattern": ['r"^(?P<patient>\\d+)_(?P<slice>.+)$"']},
}


@st.composite
def _ini_documents(draw: st.DrawFn) -> str:
    """A valid-looking train_eval_infer.config with up to four faults: a key given any literal
    (or none), an unknown key or section, a section dropped."""
    doc = {section: {key: draw(st.sampled_from(values)) for key, values in keys.items()
                     if section == "model" and key in ("image_width", "image_height", "num_classes")
                     or draw(st.booleans())}
           for section, keys in _VALID.items()}
    for _ in range(draw(st.integers(0, 4))):
        section = draw(st.sampled_from(sorted(doc) + ["extra", "Model"]))
        fault = draw(st.sampled_from(["value", "value", "value", "delete", "unknown", "drop-section"]))
        table = doc.setdefault(section, {})
        if fault == "drop-section":
            del doc[section]
            continue
        key = draw(st.sampled_from(_KEYS.get(section, ["x"]) + ["model", "generator", "unknown_key"]))
        if fault == "delete":
            table.pop(key, None)
        else:
            table[key if fault == "value" else "not_a_key"] = draw(_LITERALS)
    lines = []
    for section, table in doc.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {value}" for key, value in table.items()]
    return "\n".join(lines) + "\n"


def _parse_config(text: str) -> None:
    try:
        config = cfg.loads(text, source="fuzz.config", base_dir=BASE_DIR)
    except ConfigError as exc:
        assert str(exc).startswith("fuzz.config: "), exc  # every message names the file
        return
    # A config that loads is written back and reads the same.
    again = cfg.loads(cfg.dumps(config, relative_to=BASE_DIR), source="again.config", base_dir=BASE_DIR)
    assert again.model == config.model and again.mask == config.mask and again.train == config.train


_MODEL = "[model]\nimage_width = 64\nimage_height = 64\nnum_classes = 2\n"


@FUZZ
@given(st.text(max_size=400))
# Crashes found by these tests, kept as fixed examples.
@example(_MODEL + "learning_rate = " + "9" * 400)  # OverflowError: an int beyond a float
@example(_MODEL + "[dataset]\npatient_pattern = '(?P<patient>a{4294967296})'")  # OverflowError in re
@example(_MODEL + "[dataset]\npatient_pattern = '" + "(" * 1000 + "?P<patient>a" + ")" * 1000 + "'")  # RecursionError
@example(_MODEL + "[train]\nmodel_dir = '\\ud800'")  # UnicodeEncodeError resolving the path
def test_config_parser_only_raises_config_error_on_any_text(text: str) -> None:
    _parse_config(text)


@FUZZ
@given(st.lists(st.sampled_from(["[model]", "[mask]", "[train]", "image_width = 64", "image_height = 64",
                                 "num_classes = 2", "rgb_map = {(0,0,0):0}", "x", "= 1", "[", "]", "%(x)s",
                                 "  continued", "; comment", "# comment", "key: value", "[model]]",
                                 "\t", "\ufeff", "\x00", "[DEFAULT]", "a = 1\n  b = 2"]), max_size=14)
       .map("\n".join))
def test_config_parser_only_raises_config_error_on_ini_fragments(text: str) -> None:
    _parse_config(text)


@FUZZ
@given(_ini_documents())
def test_config_parser_only_raises_config_error_on_plausible_configs(text: str) -> None:
    _parse_config(text)


# --- study files (TOML) ----------------------------------------------------------------------

_SCALARS = st.one_of(
    st.integers(-(2**64), 2**64),
    _BIG_INTS,
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(max_size=12),
    st.sampled_from(["int", "float", "categorical", "ct-ich", "TPESampler", "RandomSampler", "MedianPruner",
                     "HyperbandPruner", "params", "latency", "Adam", "AdamW", "relu", "journal:", "", " ",
                     "a\x00b", "data/ct-ich", "../../outside", "/absolute", "x" * 300]),
)
_VALUES = st.recursive(_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4),
    st.dictionaries(st.text(max_size=8), inner, max_size=3),
), max_leaves=8)


_NUMBER = st.one_of(st.integers(-3, 2**12), st.floats(-1e3, 1e3), _BIG_INTS, _BIG_INTS,
                    st.sampled_from([math.inf, -math.inf, math.nan, 0, 0.0, 1e-300, 1e300]))
# Every value a fault may put in a study file: any TOML value, or (more often) a number of any size.
_ANY = st.one_of(_VALUES, _NUMBER, _NUMBER)


@st.composite
def _valid_param(draw: st.DrawFn, name: str, others: list[str]) -> dict[str, Any]:
    kind = draw(st.sampled_from(["int", "float", "categorical"]))
    if kind == "categorical":
        choices = st.lists(_SCALARS.filter(lambda v: not isinstance(v, float) or math.isfinite(v)),
                           min_size=1, max_size=4, unique_by=repr)
        param: dict[str, Any] = {"type": kind, "choices": draw(choices)}
    else:
        number = st.integers(1, 64) if kind == "int" else st.floats(1e-6, 10.0)
        low, high = sorted(draw(st.tuples(number, number)))
        param = {"type": kind, "low": low, "high": high}
        if draw(st.booleans()):
            param["log"] = True
        elif draw(st.booleans()):
            param["step"] = draw(number)
    if others and draw(st.booleans()):
        param["when"] = {draw(st.sampled_from(others)): draw(st.one_of(_SCALARS, st.lists(_SCALARS, max_size=2)))}
    return param


@st.composite
def _valid_study(draw: st.DrawFn) -> dict[str, Any]:
    """The tables of a valid study file (optional keys present or not)."""
    settable = sorted(study_file.SETTABLE)
    names = draw(st.lists(st.sampled_from(settable), min_size=1, max_size=4, unique=True))
    doc: dict[str, Any] = {
        "study": {"name": draw(st.from_regex(r"[A-Za-z0-9._-][A-Za-z0-9 ._-]{0,9}", fullmatch=True)),
                  "image_size": draw(st.sampled_from([32, 64, 512])), "baseline": draw(st.booleans()),
                  "second_objective": draw(st.sampled_from(["params", "latency"])),
                  "storage": "sqlite:///x.db", "out": "runs/x"},
        "dataset": draw(st.sampled_from([
            {"config": "data/train_eval_infer.config"},
            {"prepare": {"dataset": "ct-ich", "source": "data/ct-ich", "size": 64, "seed": 0,
                         "split": [0.7, 0.15, 0.15]}}])),
        "fixed": {n: draw(_SCALARS) for n in draw(st.lists(st.sampled_from(settable), max_size=3, unique=True))
                  if n not in names},
        "space": {n: draw(_valid_param(n, [o for o in names if o != n])) for n in names},
        "budget": {"n_trials": 3, "timeout": 60.5, "max_epochs": 2, "max_params": 10**6, "max_memory_gb": 4,
                   "max_gflops": 1.5},
        "sampler": {"name": draw(st.sampled_from(study_file.SAMPLERS)), "seed": 0},
        "pruner": {"name": draw(st.sampled_from(study_file.PRUNERS)), "n_startup_trials": 1},
    }
    for table in ("study", "budget", "sampler", "pruner"):
        for key in [k for k in doc[table] if k != "name" and draw(st.booleans())]:
            del doc[table][key]
    return doc


_DELETE = object()  # a fault value: remove the key (or table)
# Where a fault goes: a table, a table's key, or a field of the first [space] parameter ("*").
_FAULT_PATHS: list[tuple[str, ...]] = (
    [("space", "*", k) for k in ("low", "high", "step", "type", "log", "choices", "when", "x")]
    + [("budget", k) for k in ("n_trials", "timeout", "max_epochs", "max_params", "max_memory_gb", "max_gflops",
                               "x")]
    + [("study", k) for k in ("name", "image_size", "baseline", "second_objective", "storage", "out", "Name")]
    + [("dataset", "prepare", k) for k in ("dataset", "source", "size", "seed", "split", "x")]
    + [("dataset", k) for k in ("config", "prepare", "x")]
    + [("fixed", k) for k in ("learning_rate", "num_layers", "x")]
    + [("space", k) for k in ("learning_rate", "batch_size", "x")]
    + [(t, k) for t in ("sampler", "pruner") for k in ("name", "seed", "n_startup_trials")]
    + [(t,) for t in ("study", "dataset", "fixed", "space", "budget", "sampler", "pruner", "extra")]
)  # hypothesis favours the first entries: the numbers, where range checks live, come first


def _apply_fault(doc: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    """Set (or delete) the value at ``path``, creating tables on the way where possible."""
    node: Any = doc
    for i, key in enumerate(path[:-1]):
        if not isinstance(node, dict):
            return
        if key == "*":
            key = next(iter(node), "learning_rate")
        if i + 1 < len(path) and not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    if not isinstance(node, dict):
        return
    if value is _DELETE:
        node.pop(path[-1], None)
    else:
        node[path[-1]] = value


@st.composite
def _study_documents(draw: st.DrawFn) -> dict[str, Any]:
    """A valid study file with one to three faults: a key, a parameter's field or a whole table
    given any value (numbers of any size most often), or deleted."""
    doc = draw(_valid_study())
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_FAULT_PATHS))
        _apply_fault(doc, path, draw(st.one_of(_ANY, st.just(_DELETE))))
    return doc


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _toml_string(text: str) -> str:
    # JSON escapes are TOML escapes, except that TOML wants DEL escaped and no surrogate pairs.
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else _toml_string(key)


def _toml_value(value: Any) -> str:
    """TOML for one value (inline tables for dicts)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"


def _toml(doc: dict[str, Any]) -> str:
    lines = []
    for name, table in doc.items():
        if isinstance(table, dict):
            lines.append(f"[{_toml_key(name)}]")
            lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in table.items()]
        else:
            lines.insert(0, f"{_toml_key(name)} = {_toml_value(table)}")  # top-level keys go first
    return "\n".join(lines) + "\n"


def _parse_study(text: str) -> None:
    try:
        spec = study_file.loads(text, STUDY_PATH)
    except ConfigError as exc:
        assert str(STUDY_PATH) in str(exc), exc
        return
    assert spec.name and spec.space


_STUDY = """[study]\nname = "s"\n[dataset]\nconfig = "data.config"\n[space]\n"""


@FUZZ
@given(st.text(max_size=400))
# Crashes found by these tests, kept as fixed examples.
@example("a = " + "1" * 5000)  # ValueError: an integer of more than 4300 digits
@example(_STUDY + "seed = { type = 'int', low = " + str(2**1024) + ", high = 1 }")  # OverflowError
@example(_STUDY + "seed = { type = 'int', low = 1, high = 3, step = " + str(10**400) + " }")
@example(_STUDY + "seed = { type = 'int', low = 1, high = 3 }\n[budget]\ntimeout = " + str(10**400))
def test_study_parser_only_raises_config_error_on_any_text(text: str) -> None:
    _parse_study(text)


@FUZZ
@given(_study_documents())
def test_study_parser_only_raises_config_error_on_plausible_documents(doc: dict[str, Any]) -> None:
    _parse_study(_toml(doc))


def test_the_toml_writer_round_trips() -> None:
    """The fuzzer's own TOML writer, checked once, so a failure above is the parser's."""
    import tomllib

    doc = {"study": {"name": "a \"b\"\n\x7f\U0001f600", "weird key": [1, 2.5, -math.inf, True, {"x": "y"}]},
           "space": {"lr": {"type": "float", "low": 10**30}}}
    assert tomllib.loads(_toml(doc)) == doc

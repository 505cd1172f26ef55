from __future__ import annotations

import logging
from pathlib import Path

import pytest

from conftest import ROOT, SEED_CONFIG, assert_user_error, run_cli_here, set_keys
from flexunet import config as cfg
from flexunet.errors import ConfigError


def _seed_copy(tmp_path: Path, prepared64: Path, size: int = 128) -> Path:
    path = tmp_path / "train_eval_infer.config"
    path.write_text(SEED_CONFIG.read_text(encoding="utf-8"), encoding="utf-8")
    set_keys(path, image_width=str(size), image_height=str(size))
    text = path.read_text(encoding="utf-8")
    for part in ("train", "valid", "test"):
        text = text.replace(f"../../../dataset/Brain-Intracranial-Hemorrhage/{part}/", f"{prepared64}/{part}/")
    path.write_text(text, encoding="utf-8")
    return path


def test_seed_config_loads_with_its_values(tmp_path: Path, prepared64: Path) -> None:
    config = cfg.load(_seed_copy(tmp_path, prepared64))
    m = config.model
    assert (m.image_width, m.image_height, m.image_channels, m.num_classes) == (128, 128, 3, 2)
    assert (m.base_filters, m.base_kernels, m.num_layers, m.dilation) == (16, (11, 11), 8, (1, 1))
    assert m.dropout_rate == pytest.approx(0.04) and m.learning_rate == pytest.approx(7e-5)
    assert m.clipvalue == 0.5 and m.loss == "categorical_crossentropy" and not m.normalization
    assert config.train.epochs == 100 and config.train.patience == 10 and config.train.batch_size == 2
    assert config.train.images_dir == (prepared64 / "train" / "images").resolve()
    # Relative paths are resolved against the config's folder, not the working directory.
    assert config.train.model_dir == (tmp_path / "models").resolve()
    assert config.mask.rgb_map == {(0, 0, 0): 0, (210, 80, 0): 1}
    assert config.train.reducer_factor == 0.5 and config.train.reducer_patience == 4


def test_seed_only_keys_are_warned_once(tmp_path: Path, prepared64: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _seed_copy(tmp_path, prepared64)
    with caplog.at_level(logging.WARNING, logger="flexunet.config"):
        cfg.load(path)
        cfg.load(path)
    ignored = [r.getMessage() for r in caplog.records if "save_weights_only" in r.getMessage()]
    assert len(ignored) == 1 and "ignored" in ignored[0]


def test_round_trip_through_dump(tmp_path: Path, prepared64: Path) -> None:
    config = cfg.load(_seed_copy(tmp_path, prepared64))
    out = tmp_path / "again" / "train_eval_infer.config"
    out.parent.mkdir()
    cfg.dump(config, out)
    again = cfg.load(out)
    assert again.model == config.model and again.train == config.train and again.mask == config.mask
    assert str(tmp_path) not in out.read_text(encoding="utf-8").replace(str(prepared64), "")


@pytest.mark.parametrize("key, value, fragment", [
    ("base_kernels", "(4,4)", "[model] base_kernels"),
    ("base_kernels", "(3,5)", "square"),
    ("num_layers", "'six'", "[model] num_layers: expected an integer"),
    ("image_width", "100", "not divisible by 2**(num_layers-1)"),
    ("learning_rate", "-1", "[model] learning_rate"),
    ("loss", '"hinge"', "[model] loss"),
    ("rgb_map", "{(0,0,0):0, (1,2):1}", "[mask] rgb_map"),
    ("dropout_rate", "0.2", "dropout_rate"),
])
def test_bad_values_name_section_and_key(tmp_path: Path, prepared64: Path, key: str, value: str,
                                         fragment: str) -> None:
    path = _seed_copy(tmp_path, prepared64)
    set_keys(path, **{key: value})
    with pytest.raises(ConfigError) as info:
        cfg.load(path)
    assert fragment in str(info.value) and str(path) in str(info.value)


def test_eval_is_never_used(tmp_path: Path) -> None:
    path = tmp_path / "c.config"
    marker = tmp_path / "pwned"
    path.write_text(f"[model]\nimage_width = __import__('os').mkdir('{marker}')\n"
                    "image_height = 64\nnum_classes = 2\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="image_width: expected an integer"):
        cfg.load(path)
    assert not marker.exists()


def test_missing_folder_is_named_by_the_command(tiny_config: Path) -> None:
    set_keys(tiny_config, masks_dir='"nowhere/masks"')
    run = run_cli_here("train", tiny_config)
    assert_user_error(run, "[train] masks_dir", "folder not found")
    assert not (tiny_config.parent / "models").exists()


def test_cli_refuses_even_kernels_without_traceback(tiny_config: Path) -> None:
    set_keys(tiny_config, base_kernels="(4,4)")
    run = run_cli_here("train", tiny_config)
    assert_user_error(run, "[model] base_kernels", str(tiny_config))
    assert not (tiny_config.parent / "models").exists()


def test_cli_refuses_config_without_model_section(tmp_path: Path) -> None:
    path = tmp_path / "train_eval_infer.config"
    path.write_text("[train]\nepochs = 2\n", encoding="utf-8")
    run = run_cli_here("train", path)
    assert_user_error(run, "no [model] section", str(path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train_eval_infer.config"]


@pytest.mark.parametrize("text, fragment", [
    ("not an ini file", "not a valid INI file"),
    ("[model]\nimage_width = 64\nimage_width = 64\n", "not a valid INI file"),
    ("[model]\nimage_width = 64\nimage_height = 64\n", "num_classes is missing"),
])
def test_malformed_files(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "c.config"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[")):
        cfg.load(path)


def test_non_utf8_and_missing_files(tmp_path: Path) -> None:
    path = tmp_path / "c.config"
    path.write_bytes(b"[model]\nimage_width = \xff\xfe\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        cfg.load(path)
    with pytest.raises(ConfigError, match="not found"):
        cfg.load(tmp_path / "absent.config")


def test_every_key_of_the_seed_configs_works_or_is_listed_as_ignored_in_the_readme(
        caplog: pytest.LogCaptureFixture) -> None:
    import configparser

    from flexunet.config import _SECTIONS, _SEED_ONLY

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ignored_table = readme.split("Seed keys read and deliberately ignored")[1].split("FlexUNet: with L")[0]
    for path in (SEED_CONFIG,):  # the seed's ICH config as published
        parser = configparser.ConfigParser(interpolation=None)
        parser.read(path, encoding="utf-8")
        with caplog.at_level("WARNING", logger="flexunet.config"):
            cfg.load(path)
        assert "unknown key" not in caplog.text and "is not used by flexunet" not in caplog.text, caplog.text
        for section in parser.sections():
            for key in parser[section]:
                if key == "model" and section == "model":
                    continue  # checked: TensorFlowFlexUNet is the one architecture built
                if key in _SECTIONS[section][0]:
                    continue
                assert key in _SEED_ONLY[section], (path, section, key)
                assert f"`[{section}] {key}`" in ignored_table, (section, key)
    # The seed's own options from its source (TensorFlowFlexUNet.py) are read, not ignored.
    for key in ("dropout_seed_fixing", "final_activation"):
        assert key in _SECTIONS["model"][0]
    for section, keys in _SEED_ONLY.items():
        for key in keys:
            assert f"[{section}] {key}" in ignored_table or f"`{key}`" in ignored_table, (section, key)


def test_seed_model_options_and_the_colour_tolerance_are_read() -> None:
    text = """[model]
model = "TensorFlowFlexUNet"
image_width = 64
image_height = 64
num_classes = 3
num_layers = 4
dropout_seed_fixing = True
final_activation = "sigmoid"
[mask]
rgb_map = {(0,0,0):0, (255,0,0):1, (0,255,0):2}
mask_file_format = ".jpg"
colour_tolerance = 30
"""
    config = cfg.loads(text)
    assert config.model.dropout_seed_fixing and config.model.final_activation == "sigmoid"  # softmax: 3 classes
    assert config.mask.colour_tolerance == 30.0
    assert cfg.loads(text.replace("colour_tolerance = 30\n", "")).mask.colour_tolerance == cfg.DEFAULT_COLOUR_TOLERANCE
    with pytest.raises(ConfigError, match=r"\[mask\] colour_tolerance: -1.0 is out of range"):
        cfg.loads(text.replace("colour_tolerance = 30", "colour_tolerance = -1"))
    with pytest.raises(ConfigError, match=r"\[model\] model: 'TensorFlowFlexAttentionUNet' is not supported; "
                                          r"flexunet builds TensorFlowFlexUNet only"):
        cfg.loads(text.replace('"TensorFlowFlexUNet"', '"TensorFlowFlexAttentionUNet"'))
    one = text.replace("num_classes = 3", "num_classes = 1")
    one = one.replace("rgb_map = {(0,0,0):0, (255,0,0):1, (0,255,0):2}", "")
    assert cfg.loads(one).model.final_activation == "sigmoid"
    with pytest.raises(ConfigError, match="final_activation: 'softmax' cannot train a one-class model"):
        cfg.loads(one.replace('final_activation = "sigmoid"', 'final_activation = "softmax"'))


def test_loading_a_config_does_not_load_keras() -> None:
    """Every launcher and every `flexunet train` of a bad config loads a config first: it must
    not pay TensorFlow's import (seconds) to say what is wrong."""
    import subprocess
    import sys

    code = ("import sys; from flexunet import config; config.load(sys.argv[1]); "
            "print(sorted(m for m in ('keras', 'tensorflow') if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent / "data" / "seed_ich.config")],
                         capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "[]", run.stdout + run.stderr


def test_a_path_beyond_the_basic_multilingual_plane_survives_dump_and_load(tmp_path: Path) -> None:
    """Found by the fuzz test in CI: JSON's ASCII escapes wrote U+10000 as a surrogate pair,
    which the loader read as two lone surrogates and refused."""
    from flexunet import config as cfg

    text = ("[model]\nimage_width = 64\nimage_height = 64\nnum_classes = 2\n[eval]\noutput_dir = \U00010000\n"
            "[dataset]\npatient_pattern = \"^(?P<patient>\\\\d+)_\U0001F9E0\"\n")
    config = cfg.loads(text, source="a.config", base_dir=tmp_path)
    again = cfg.loads(cfg.dumps(config, relative_to=tmp_path), source="b.config", base_dir=tmp_path)
    assert again == config and again.eval.output_dir == tmp_path / "\U00010000"

from __future__ import annotations

import dataclasses

from pathlib import Path

import optuna
import pytest

from conftest import ROOT
from flexunet import config as cfg
from flexunet.errors import ConfigError
from search.spec import space as sp
from search.store import storage as st
from search.store import urls
from search.spec import study_file

MINIMAL = """
[study]
name = "s"
[dataset]
prepare = { dataset = "ct-ich", source = "data/ct-ich", size = 64 }
[space]
learning_rate = { type = "float", low = 1e-4, high = 1e-2, log = true }
"""


def _load(tmp_path: Path, text: str) -> study_file.StudySpec:
    path = tmp_path / "study.toml"
    path.write_text(text, encoding="utf-8")
    return study_file.load(path)


@pytest.mark.parametrize("name", ["ct_ich_sample.toml", "ct_ich.toml"])
def test_shipped_study_files_load(name: str) -> None:
    spec = study_file.load(ROOT / "studies" / name)
    assert spec.directions[0] == "maximize" and spec.space and spec.baseline
    assert spec.prepare is not None and spec.prepare.dataset == "ct-ich"
    from search.spec.algorithms import make_pruner, make_sampler

    assert make_sampler(spec) is not None and make_pruner(spec) is not None


def test_minimal_file_has_defaults(tmp_path: Path) -> None:
    spec = _load(tmp_path, MINIMAL)
    assert spec.name == "s" and spec.budget.n_trials == 20 and spec.sampler.name == "TPESampler"
    assert spec.prepare.source == (tmp_path / "data" / "ct-ich")
    assert spec.with_overrides(n_trials=3, max_epochs=2, image_size=32).budget.n_trials == 3


@pytest.mark.parametrize("patch, fragment", [
    (("[study]\nname = \"s\"", "[study]\nname = 3"), "[study] name: expected a string"),
    (("[space]", "[spaces]"), "spaces: unknown key"),
    (("log = true }", "log = true, low2 = 1 }"), "[space.learning_rate] low2: unknown key"),
    (("type = \"float\"", "type = \"floaty\""), "[space.learning_rate] type"),
    (("low = 1e-4", "low = -1.0"), "[space.learning_rate] low: a log scale needs low > 0"),
    (("learning_rate =", "learning_rat ="), "[space] learning_rat: not a setting"),
    (("size = 64", "size = -64"), "[dataset.prepare] size: expected a positive integer"),
    (("[space]", "[budget]\nn_trials = 0\n[space]"), "[budget] n_trials: expected a positive integer"),
    (("[space]", "[pruner]\nname = \"Nope\"\n[space]"), "[pruner] name"),
    (("[space]", "[fixed]\nlearning_rate = 0.1\n[space]"), "is also in [space]"),
    (("name = \"s\"", "name = \"s\"\nsecond_objective = \"speed\""), "second_objective"),
    (("[space]", "[space]\nweight_decay = { type = \"float\", low = 0.1, high = 0.2, when = { optimizer = \"AdamW\" } }"),
     "'optimizer' is not another parameter"),
    (("prepare = {", "config = \"x.config\"\nprepare = {"), "exactly one of"),
])
def test_malformed_study_files_name_the_key(tmp_path: Path, patch: tuple[str, str], fragment: str) -> None:
    old, new = patch
    assert old in MINIMAL
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, MINIMAL.replace(old, new, 1))
    assert fragment in str(info.value) and "study.toml" in str(info.value)


def test_not_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        _load(tmp_path, "[study\nname=")


def test_bad_sampler_arguments_name_the_table(tmp_path: Path) -> None:
    from search.spec.algorithms import make_sampler

    spec = _load(tmp_path, MINIMAL + "\n[sampler]\nname = \"TPESampler\"\nn_startup = 3\n")
    with pytest.raises(ConfigError, match=r"\[sampler\] TPESampler"):
        make_sampler(spec)


def test_conditional_parameters_are_sampled_only_when_their_condition_holds(tmp_path: Path) -> None:
    spec = _load(tmp_path, MINIMAL + """optimizer = { type = "categorical", choices = ["Adam", "AdamW"] }
weight_decay = { type = "float", low = 1e-5, high = 1e-2, log = true, when = { optimizer = "AdamW" } }
""")
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=1))
    seen = set()
    for _ in range(12):
        trial = study.ask()
        values = sp.suggest(trial, spec.space)
        assert ("weight_decay" in values) == (values["optimizer"] == "AdamW")
        seen.add(values["optimizer"])
        study.tell(trial, 0.0)
    assert seen == {"Adam", "AdamW"}


def test_num_layers_is_bounded_by_the_image_size() -> None:
    space = (study_file.ParamSpec("num_layers", "int", low=3, high=8),)
    assert sp.bounded(space, 64, "s")[0].high == 5  # 64 / 2**4 = 4 px bridge
    assert sp.bounded(space, 512, "s")[0].high == 8
    with pytest.raises(ConfigError, match="more levels than 16 px images allow"):
        sp.bounded((study_file.ParamSpec("num_layers", "int", low=4, high=6),), 16, "s")


def test_seed_baseline_is_scaled_by_depth() -> None:
    assert [sp.seed_layers(s) for s in (512, 256, 128, 64)] == [8, 7, 6, 5]


def test_a_seed_configs_depth_never_blocks_a_study_at_another_size(tmp_path: Path) -> None:
    spec = _load(tmp_path, MINIMAL)
    seed = cfg.Config(model=cfg.ModelConfig(image_width=512, image_height=512, num_classes=4, num_layers=8),
                      mask=cfg.MaskConfig(rgb_map={(0, 0, 0): 0, (255, 0, 0): 1, (0, 255, 0): 2, (0, 0, 255): 3}))
    for size, scaled in ((256, 7), (128, 6), (64, 5), (32, 4)):
        config = sp.trial_config(seed, spec, size, {})
        assert (config.model.image_width, config.model.num_layers) == (size, scaled)
        assert sp.trial_config(seed, spec, size, {}, baseline=True).model.num_layers == sp.seed_layers(size)
        assert sp.trial_config(seed, spec, size, {"num_layers": 3}).model.num_layers == 3
    assert sp.trial_config(seed, spec, 512, {}).model.num_layers == 8  # its own size: kept
    shallow = seed.replace(model=dataclasses.replace(seed.model, num_layers=4))
    assert sp.trial_config(shallow, spec, 64, {}).model.num_layers == 4  # fits: kept
    with pytest.raises(ConfigError, match="not divisible by 2\\*\\*\\(num_layers-1\\) = 128"):
        sp.trial_config(seed, spec, 64, {"num_layers": 8})  # the trial's own depth is still checked


def test_infeasible_configs_are_named_and_the_baseline_is_exempt_from_size_caps(tmp_path: Path) -> None:
    spec = _load(tmp_path, MINIMAL.replace("[space]", "[budget]\nmax_params = 100000\nmax_memory_gb = 2.0\n[space]"))
    base = cfg.Config(model=cfg.ModelConfig(image_width=64, image_height=64, num_classes=2, image_channels=1),
                      mask=cfg.MaskConfig(rgb_map=dict(cfg.BINARY_RGB_MAP)))
    big = sp.trial_config(base, spec, 64, {"base_filters": 32, "num_layers": 5})
    assert "exceed the budget of 100,000" in sp.infeasible(big, spec.budget)
    seed = sp.trial_config(base, spec, 64, {}, baseline=True)
    assert seed.model.num_layers == 5 and seed.model.base_kernels == (11, 11)
    assert sp.infeasible(seed, spec.budget, baseline=True) is None
    huge = sp.trial_config(base, spec, 64, {"batch_size": 4096})
    assert "GiB of training memory" in sp.infeasible(huge, spec.budget, baseline=True)
    with pytest.raises(ConfigError, match="dropout_rate"):
        sp.trial_config(base, spec, 64, {"dropout_rate": 0.5, "num_layers": 5})


def test_storage_urls_are_resolved_and_masked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(urls.ENV_VAR, raising=False)
    assert urls.resolve_url(None, None, tmp_path) == f"sqlite:///{tmp_path / 'study.db'}"
    assert urls.resolve_url(None, "mysql://root@h/db", tmp_path) == "mysql+pymysql://root@h/db"
    monkeypatch.setenv(urls.ENV_VAR, "postgresql://u:secret@h:5432/db")
    assert urls.resolve_url(None, None, tmp_path) == "postgresql+psycopg://u:secret@h:5432/db"
    assert urls.resolve_url("journal:x.log", None, tmp_path) == "journal:x.log"
    assert urls.mask("postgresql+psycopg://u:secret@h:5432/db") == "postgresql+psycopg://u:***@h:5432/db"
    assert urls.mask("redis://:pw@h:6379/0") == "redis://:***@h:6379/0"
    assert urls.public(f"sqlite:///{tmp_path}/study.db") == "sqlite:///study.db"
    assert [urls.kind(u) for u in ("sqlite:///a", "journal:a", "redis://h", "mysql+pymysql://h")] == [
        "sqlite", "journal-file", "journal-redis", "mysql"]


def test_unreachable_storage_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match=r"u:\*\*\*@127.0.0.1:1/none: cannot connect") as info:
        st.open_storage("postgresql+psycopg://u:secret@127.0.0.1:1/none", heartbeat=False)
    assert "secret" not in str(info.value)


def test_the_spec_a_launcher_hands_its_workers_reads_back_unchanged(tmp_path: Path) -> None:
    import dataclasses

    from search.runtime.context import WorkerPlan

    for path in sorted((ROOT / "studies").glob("*.toml")):
        spec = study_file.load(path).with_overrides(n_trials=3, image_size=32)
        spec = dataclasses.replace(spec, fixed={**spec.fixed, "base_kernels": [5, 5]})  # changed in Python
        back = study_file.from_json(study_file.to_json(spec))
        assert back == spec, path
        assert isinstance(back.space[0].choices, tuple) and isinstance(back.budget, study_file.Budget)
        spec = dataclasses.replace(spec, storage="postgresql+psycopg://user:s3cret@db/flexunet")
        plan = WorkerPlan(spec, tmp_path / "run", deadline=123.5).write(tmp_path / "plan.json")
        assert "s3cret" not in plan.read_text()  # workers take the URL from the environment
        assert WorkerPlan.read(plan) == WorkerPlan(dataclasses.replace(spec, storage=None), tmp_path / "run", 123.5)


def test_a_damaged_worker_plan_is_a_config_error(tmp_path: Path) -> None:
    from search.runtime.context import WorkerPlan

    (tmp_path / "plan.json").write_text('{"spec": {"name": "x"}}')
    with pytest.raises(ConfigError, match="plan.json: not a worker plan"):
        WorkerPlan.read(tmp_path / "plan.json")


def test_settable_keys_come_from_the_config_definition() -> None:
    import dataclasses

    fields = {f.name for kind in (cfg.ModelConfig, cfg.TrainConfig) for f in dataclasses.fields(kind)}
    assert set(study_file.SETTABLE) < fields
    assert study_file.SETTABLE["dropout_rate"] == "model" and study_file.SETTABLE["batch_size"] == "train"
    for decided in ("image_width", "num_classes", "epochs", "model_dir", "images_dir"):  # dataset, budget, paths
        assert decided not in study_file.SETTABLE


REFIT = MINIMAL + """
[refit]
folds = 4
seeds = 2
epochs = 40
steps_per_epoch = 12
patience = 6
image_size = 128
ema = true
ema_momentum = 0.95
tta = ["none", "all"]
top_k = 3
"""


def test_refit_section_is_parsed_once_into_a_typed_spec(tmp_path: Path) -> None:
    spec = _load(tmp_path, REFIT)
    assert spec.refit == study_file.RefitSpec(folds=4, seeds=2, epochs=40, steps_per_epoch=12, patience=6,
                                              image_size=128, ema=True, ema_momentum=0.95, tta=("none", "all"),
                                              top_k=3)
    assert spec.refit_folds() == 4
    assert study_file.from_json(study_file.to_json(spec)) == spec  # as a launcher hands it to its workers
    assert _load(tmp_path, MINIMAL).refit is None
    defaults = _load(tmp_path, MINIMAL.replace('name = "s"', 'name = "s"\nfolds = 5') + "[refit]\n")
    assert defaults.refit == study_file.RefitSpec() and defaults.refit_folds() == 5  # the study's folds


@pytest.mark.parametrize("line, fragment", [
    ("seeds = 0", "[refit] seeds: expected a positive integer, got 0"),
    ("epochs = 2.5", "[refit] epochs: expected a positive integer, got 2.5"),
    ("folds = 1", "[refit] folds: expected at least 2"),
    ("ema = \"yes\"", "[refit] ema: expected true or false, got 'yes'"),
    ("ema_momentum = 1", "[refit] ema_momentum: expected a number between 0 and 1, got 1"),
    ("tta = [\"flip\"]", "[refit] tta: expected a list of distinct values among none, horizontal, all"),
    ("tta = [\"none\", \"none\"]", "[refit] tta: expected a list of distinct values"),
    ("top_k = -1", "[refit] top_k: expected a positive integer, got -1"),
    ("rounds = 3", "[refit] rounds: unknown key; expected one of folds, seeds"),
])
def test_refit_section_refuses_bad_keys_and_values(tmp_path: Path, line: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as error:
        _load(tmp_path, MINIMAL + "[refit]\n" + line + "\n")
    assert fragment in str(error.value) and "study.toml" in str(error.value)


def test_refit_must_be_a_table(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"refit: expected a table \[refit\]"):
        _load(tmp_path, "refit = 3\n" + MINIMAL)

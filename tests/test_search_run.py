"""The search end to end with real worker processes on SQLite: run, status, Optuna's CLI,
pruning, export, and the exported model loaded the ways users load it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import optuna
import pytest
from optuna.artifacts import get_all_artifact_meta
from optuna.trial import TrialState

from conftest import ROOT, SAMPLE, run_cli, run_cli_here

pytestmark = pytest.mark.slow
SAMPLE_STUDY = ROOT / "studies" / "ct_ich_sample.toml"
ARTIFACTS = {"best_model.keras", "train_log.csv", "learning_curves.png", "validation_overlays.png"}
USER_ATTRS = {"host", "pid", "params", "gflops", "settings", "epochs_run", "best_epoch", "stop_reason",
              "seconds_per_epoch", "best_val_foreground_dice"}


def single_split_copy(folder: Path) -> Path:
    """The shipped sample study without ``[study] folds`` and without its ``[refit]``: one
    train/valid split, as every study had before cross-validation (tests/test_cv.py runs the
    shipped file as it is, tests/test_refit.py the refit)."""
    text = SAMPLE_STUDY.read_text(encoding="utf-8")
    assert "\nfolds = 3\n" in text and 'source = "data/ct-ich"' in text and "\n[refit]\n" in text
    text = text[:text.index("\n[refit]\n") + 1]
    path = folder / "ct_ich_sample_single_split.toml"
    path.write_text(text.replace("\nfolds = 3\n", "\n").replace('source = "data/ct-ich"', f'source = "{SAMPLE}"'),
                    encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample study (single split), shrunk by the command-line overrides, with two workers."""
    out = tmp_path_factory.mktemp("search") / "run"
    run = run_cli("search", "run", single_split_copy(out.parent), "--n-trials", "4", "--max-epochs", "2", "--image-size", "32",
                  "--workers", "2", "--out", out, timeout=900)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "baseline (seed settings): trial 0" in run.stdout
    return out


def _study(out: Path) -> optuna.Study:
    return optuna.load_study(study_name="ct-ich-sample", storage=f"sqlite:///{out / 'study.db'}")


def test_trials_have_baseline_attrs_and_artifacts(sample_run: Path) -> None:
    study = _study(sample_run)
    trials = study.get_trials()
    assert len(trials) >= 4 and not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    first = trials[0]
    assert first.number == 0 and first.user_attrs["baseline"] is True
    assert first.params["learning_rate"] == pytest.approx(7e-5)
    # The seed's 11x11 kernel is outside the space's choices: in the trial's settings, not a parameter.
    assert "base_kernels" not in first.params and first.user_attrs["settings"]["base_kernels"] == [11, 11]
    assert first.params["num_layers"] == 4  # the seed's 8 levels at 512 px, scaled to 32 px
    assert first.user_attrs["settings"]["clipvalue"] == 0.5 and first.user_attrs["settings"]["batch_size"] == 2
    assert len({t.user_attrs["pid"] for t in trials if "pid" in t.user_attrs}) == 2  # both workers ran trials
    finished = [t for t in trials if t.state == TrialState.COMPLETE]
    assert finished
    for t in trials:
        if t.user_attrs.get("stop_reason") == "infeasible":
            assert t.state == TrialState.PRUNED and t.user_attrs["infeasible_reason"]
            continue
        assert USER_ATTRS <= set(t.user_attrs), (t.number, set(t.user_attrs))
        assert 1 <= t.user_attrs["epochs_run"] <= 2 and t.user_attrs["seconds_per_epoch"] > 0
        names = {m.filename for m in get_all_artifact_meta(t, storage=study._storage)}
        assert names == ARTIFACTS, (t.number, names)
        assert len(t.intermediate_values) == t.user_attrs["epochs_run"]
    for path in (sample_run / "artifacts").iterdir():
        assert path.stat().st_size > 0


def test_status_and_optuna_cli_read_the_study(sample_run: Path) -> None:
    run = run_cli("search", "status", SAMPLE_STUDY, "--run-dir", sample_run)
    assert run.returncode == 0, run.stderr
    assert "study 'ct-ich-sample'" in run.stdout and "best:" in run.stdout and "baseline" in run.stdout
    optuna_cli = Path(sys.executable).parent / "optuna"
    done = subprocess.run([str(optuna_cli), "trials", "--storage", f"sqlite:///{sample_run / 'study.db'}",
                           "--study-name", "ct-ich-sample", "-f", "json"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert len(json.loads(done.stdout)) >= 4


def test_export_writes_everything_and_models_agree(sample_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "export"
    run = run_cli_here("search", "export", "--study", "ct-ich-sample", "--storage", f"sqlite:///{sample_run / 'study.db'}",
                  "--out", out)
    assert run.returncode == 0, run.stdout + run.stderr
    for name in ("best_model.keras", "saved_model", "model.onnx", "train_eval_infer.config", "model_card.md",
                 "metrics.json", "evaluation.csv", "evaluation.json"):
        assert (out / name).exists(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["test"]["foreground_dice_global"] <= 1.0
    best = _study(sample_run).best_trial
    assert metrics["trial"] == best.number
    # The settings are those the trial trained with, small numbers included (not rounded away).
    assert metrics["settings"]["reducer_min_lr"] == best.user_attrs["settings"]["reducer_min_lr"] > 0
    for path in out.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".md", ".config", ".csv", ".pbtxt", ".txt"):
            text = path.read_text(errors="replace")
            assert str(tmp_path) not in text and str(sample_run) not in text, path

    run = run_cli_here("infer", out / "train_eval_infer.config", "--out", tmp_path / "infer")
    assert run.returncode == 0, run.stderr
    check = """
import sys, json, numpy as np, cv2, keras, tensorflow as tf, onnxruntime
from pathlib import Path
images = sorted(Path(sys.argv[1]).glob('*.png'))
x = np.stack([cv2.resize(cv2.imread(str(p), cv2.IMREAD_GRAYSCALE), (32, 32), interpolation=cv2.INTER_AREA)
              for p in images])[..., None].astype('float32')
model = keras.models.load_model(sys.argv[2])   # plain Keras, safe mode, no custom objects
probs = model.predict(x, verbose=0)
loaded = tf.saved_model.load(sys.argv[3])  # keep a reference: its variables die with it
served = loaded.serve(tf.constant(x)).numpy()
session = onnxruntime.InferenceSession(sys.argv[4])
onnx = session.run(None, {session.get_inputs()[0].name: x})[0]
decided = np.abs(probs.max(-1) - 0.5) > 1e-2  # pixels not on a class boundary (2 classes)
print(json.dumps({"names": [p.stem for p in images], "classes": probs.argmax(-1).tolist(),
                  "saved": float(np.abs(served - probs).max()), "onnx": float(np.abs(onnx - probs).max()),
                  "onnx_same_classes": bool((onnx.argmax(-1) == probs.argmax(-1))[decided].all())}))
"""
    config_text = (out / "train_eval_infer.config").read_text()
    test_dir = (out / next(line.split("=", 1)[1].strip().strip('"') for line in config_text.splitlines()
                           if line.startswith("images_dir") and "test" in line)).resolve()
    done = subprocess.run([sys.executable, "-c", check, str(test_dir), str(out / "best_model.keras"),
                           str(out / "saved_model"), str(out / "model.onnx")],
                          capture_output=True, text=True, env={"TF_CPP_MIN_LOG_LEVEL": "3", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-3000:]
    fresh = json.loads(done.stdout.strip().splitlines()[-1])
    # SavedModel runs TensorFlow's own kernels: the same numbers. onnxruntime sums in another
    # order; through several 11x11 convolutions float32 rounding reaches ~1e-3 of a probability
    # (8.4e-4 seen), never enough to change a pixel's class away from a class boundary.
    assert fresh["saved"] < 1e-5 and fresh["onnx"] < 2e-3 and fresh["onnx_same_classes"]
    for name, classes in zip(fresh["names"], fresh["classes"]):
        mask = cv2.imread(str(tmp_path / "infer" / "masks" / f"{name}.png"), cv2.IMREAD_UNCHANGED)
        # infer writes masks at the original size (128 px here): the prediction, nearest-resized.
        expected = cv2.resize(np.array(classes, dtype=np.uint8), mask.shape[::-1], interpolation=cv2.INTER_NEAREST)
        np.testing.assert_array_equal(mask, expected)


PRUNE_STUDY = """
[study]
name = "prune-check"
image_size = 32
baseline = false
[dataset]
prepare = {{ dataset = "ct-ich", source = "{source}", size = 32 }}
[budget]
n_trials = 2
max_epochs = 4
[sampler]
name = "RandomSampler"
seed = 0
[pruner]
# Every trial is below a Dice of 2, so the pruner must stop each one after its warm-up epoch.
name = "ThresholdPruner"
lower = 2.0
n_warmup_steps = 1
[space]
base_filters = {{ type = "int", low = 4, high = 8, step = 4 }}
num_layers = {{ type = "int", low = 2, high = 3 }}
"""


def test_the_pruner_really_stops_trials(tmp_path: Path, sample: Path) -> None:
    study_path = tmp_path / "prune.toml"
    study_path.write_text(PRUNE_STUDY.format(source=sample), encoding="utf-8")
    run = run_cli("search", "run", study_path, "--out", tmp_path / "run", timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    trials = optuna.load_study(study_name="prune-check", storage=f"sqlite:///{tmp_path / 'run' / 'study.db'}").trials
    assert len(trials) == 2
    for t in trials:
        assert t.state == TrialState.PRUNED and t.user_attrs["stop_reason"] == "pruned"
        assert t.user_attrs["epochs_run"] == 2 < 4 and sorted(t.intermediate_values) == [0, 1]


def test_a_second_objective_makes_a_pareto_study(tmp_path: Path) -> None:
    from conftest import tiny_study

    path = tiny_study(tmp_path / "pareto.toml", "pareto", n_trials=3, baseline=False)
    path.write_text(path.read_text().replace('baseline = false', 'baseline = false\nsecond_objective = "params"'))
    run = run_cli("search", "run", path, "--out", tmp_path / "run", timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Pareto front" in run.stdout
    study = optuna.load_study(study_name="pareto", storage=f"sqlite:///{tmp_path / 'run' / 'study.db'}")
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    for t in study.trials:
        assert t.state == TrialState.COMPLETE and t.values[1] == t.user_attrs["params"]
    exported = run_cli_here("search", "export", "--study", "pareto", "--storage",
                       f"sqlite:///{tmp_path / 'run' / 'study.db'}", "--out", tmp_path / "export")
    assert exported.returncode == 0, exported.stdout + exported.stderr
    best_dice = max(t.values[0] for t in study.best_trials)
    assert json.loads((tmp_path / "export" / "metrics.json").read_text())["validation"]["foreground_dice"] == \
        pytest.approx(best_dice, abs=1e-6)

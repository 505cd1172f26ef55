"""The export of a cross-validated trial: one ensemble model (fold mean, horizontal-flip TTA in
the graph) that plain Keras loads, SavedModel and ONNX that agree with it, the post-processing
chosen on the out-of-fold predictions in its config, applied by ``flexunet infer``.

Until cross-validated search trials exist on this branch, the fixture makes one as a CV trial
stores it (INTERFACES.md): two tiny fold models trained on the bundled sample, uploaded with the
out-of-fold predictions as the trial's artifacts, on a SQLite study.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import optuna
import pytest
from optuna.artifacts import FileSystemArtifactStore, upload_artifact

from conftest import SAMPLE, assert_user_error, run_cli_here

pytestmark = pytest.mark.slow
FOLDS = 2


@dataclass(frozen=True)
class CVStudy:
    storage: str
    fold_models: list[Path]
    oof: Path
    data_config: Path


def _pool(config):  # -> SliceSet of train + valid, the slices cross-validation folds share
    from flexunet.data.dataset import SliceSet, load_split

    parts = [load_split(config, "train"), load_split(config, "valid")]
    return SliceSet(np.concatenate([p.images for p in parts]), np.concatenate([p.masks for p in parts]),
                    [n for p in parts for n in p.names], [s for p in parts for s in p.original_sizes])


@pytest.fixture(scope="module")
def cv_study(tmp_path_factory: pytest.TempPathFactory) -> CVStudy:
    from flexunet import config as cfg
    from flexunet.data import ct_ich
    from flexunet.data.dataset import patient_of
    from flexunet.model import estimate_cost
    from flexunet.postprocess import PostProcessing, pooled_dice
    from flexunet.train import fit
    from search import keys, paths

    root = tmp_path_factory.mktemp("cv")
    ct_ich.prepare(SAMPLE, root / "data", size=32, seed=0)
    data_config = root / "data" / "train_eval_infer.config"
    settings = {"base_filters": 4, "num_layers": 3, "batch_size": 8, "steps_per_epoch": 2, "epochs": 1, "patience": 0}
    config = cfg.load(data_config)
    config = cfg.override(config, "model", {k: settings[k] for k in ("base_filters", "num_layers")}, "test")
    config = cfg.override(config, "train", {k: settings[k] for k in ("batch_size", "steps_per_epoch", "epochs",
                                                                     "patience")}, "test")
    pool = _pool(config)
    patients = sorted({patient_of(n, config.dataset.patient_pattern)[0] for n in pool.names})
    fold_of = np.array([patients.index(patient_of(n, config.dataset.patient_pattern)[0]) % FOLDS for n in pool.names])
    probabilities = np.zeros((*pool.masks.shape, config.model.num_classes), np.float16)
    fold_models, fold_dice = [], []
    for k in range(FOLDS):
        valid = pool.subset(list(np.flatnonzero(fold_of == k)))
        result = fit(config.model, config.train, pool.subset(list(np.flatnonzero(fold_of != k))), valid, verbose=0)
        path = root / paths.fold_model(k)
        result.model.save(path)
        fold_models.append(path)
        fold_probabilities = result.model.predict(valid.images.astype(np.float32), verbose=0)
        probabilities[fold_of == k] = fold_probabilities
        fold_dice.append(pooled_dice(fold_probabilities, valid.masks, PostProcessing()))
    oof = root / paths.OOF_PREDICTIONS
    np.savez_compressed(oof, probabilities=probabilities, masks=pool.masks, names=np.array(pool.names),
                        folds=fold_of)

    storage = f"sqlite:///{root / 'study.db'}"
    study = optuna.create_study(study_name="cv-export", storage=storage, direction="maximize")
    study.set_user_attr("flexunet_dataset_config", str(data_config))
    study.set_user_attr("flexunet_artifact_dir", str(root / "artifacts"))
    (root / "artifacts").mkdir()
    store = FileSystemArtifactStore(str(root / "artifacts"))
    pooled = pooled_dice(probabilities, pool.masks, PostProcessing())
    cv_trial = study.ask()
    single = study.ask()  # a single-split trial in the same study: --trial exports it as one model
    for trial in (cv_trial, single):
        trial.set_user_attr("settings", settings)
        trial.set_user_attr("params", estimate_cost(config.model).params)
        trial.set_user_attr("gflops", round(estimate_cost(config.model).flops / 1e9, 3))
    cv_trial.set_user_attr(keys.FOLDS, FOLDS)
    cv_trial.set_user_attr(keys.FOLD_DICE, fold_dice)
    cv_trial.set_user_attr(keys.POOLED_DICE, pooled)
    for path in (*fold_models, oof):
        upload_artifact(artifact_store=store, file_path=str(path), study_or_trial=cv_trial)
    upload_artifact(artifact_store=store, file_path=str(fold_models[0]), study_or_trial=single)
    (root / "best_model.keras").write_bytes(fold_models[0].read_bytes())
    upload_artifact(artifact_store=store, file_path=str(root / "best_model.keras"), study_or_trial=single)
    study.tell(cv_trial, pooled)
    study.tell(single, pooled - 1.0)  # never the best
    return CVStudy(storage, fold_models, oof, data_config)


_CHECK = """
import sys, json, numpy as np, keras, tensorflow as tf, onnxruntime
out, x_file, tta = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
x = np.load(x_file)
model = keras.models.load_model(out + "/best_model.keras")   # plain Keras, safe mode, no custom objects
probs = model.predict(x, verbose=0)
members = [keras.models.load_model(p, compile=False) for p in sys.argv[4:]]
reference = np.mean([m.predict(x, verbose=0) for m in members]
                    + ([m.predict(x[:, :, ::-1], verbose=0)[:, :, ::-1] for m in members] if tta else []), axis=0)
loaded = tf.saved_model.load(out + "/saved_model")
served = loaded.serve(tf.constant(x)).numpy()
session = onnxruntime.InferenceSession(out + "/model.onnx")
onnx = session.run(None, {session.get_inputs()[0].name: x})[0]
decided = np.abs(probs.max(-1) - 0.5) > 1e-2
np.save(out + "/../probabilities.npy", probs)
print(json.dumps({"mean": float(np.abs(probs - reference).max()), "saved": float(np.abs(served - probs).max()),
                  "onnx": float(np.abs(onnx - probs).max()),
                  "onnx_same_classes": bool((onnx.argmax(-1) == probs.argmax(-1))[decided].all()),
                  "layers": [type(l).__name__ for l in model.layers]}))
"""


def _export(cv: CVStudy, out: Path, *extra: str) -> dict:
    run = run_cli_here("search", "export", "--study", "cv-export", "--storage", cv.storage, "--out", out, *extra)
    assert run.returncode == 0, run.stdout + run.stderr
    return json.loads((out / "metrics.json").read_text())


def _test_images(out: Path):  # -> SliceSet of the export's test images, as infer reads them
    from flexunet import config as cfg
    from flexunet.data.dataset import load_images

    config = cfg.load(out / "train_eval_infer.config")
    return config, load_images(config.test.images_dir, config.model, config.image)


def _check_in_fresh_python(out: Path, members: list[Path], tta: bool) -> tuple[dict, np.ndarray]:
    _, data = _test_images(out)
    x_file = out.parent / "x.npy"
    np.save(x_file, data.images.astype(np.float32))
    done = subprocess.run([sys.executable, "-c", _CHECK, str(out), str(x_file), "1" if tta else "0", *map(str, members)],
                          capture_output=True, text=True, env={"TF_CPP_MIN_LOG_LEVEL": "3", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), np.load(out.parent / "probabilities.npy")


def _infer_masks(config_path: Path, out: Path) -> dict[str, np.ndarray]:
    run = run_cli_here("infer", config_path, "--out", out)
    assert run.returncode == 0, run.stderr
    return {p.stem: cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in (out / "masks").glob("*.png")}


def _expected_masks(data, classes: np.ndarray) -> dict[str, np.ndarray]:
    from flexunet.data import io as imio

    return {name: imio.resize_mask(classes[i], data.original_sizes[i][1], data.original_sizes[i][0])
            for i, name in enumerate(data.names)}


def test_cv_export_is_one_ensemble_of_the_folds_with_flip_tta(cv_study: CVStudy, tmp_path: Path) -> None:
    from flexunet import postprocess
    from flexunet.model import estimate_cost
    from flexunet.postprocess import PostProcessing

    out = tmp_path / "export"
    metrics = _export(cv_study, out)
    for name in ("best_model.keras", "saved_model", "model.onnx", "train_eval_infer.config", "model_card.md",
                 "metrics.json", "evaluation.csv", "evaluation.json"):
        assert (out / name).exists(), name
    run = metrics["inference"]
    assert run["models"] == FOLDS and run["flip_tta"] is True and run["forward_passes"] == 2 * FOLDS
    assert run["ms_per_image"] > 0

    # The post-processing in the exported config is the one metrics.json and the card report
    # (how it is chosen, on flipped out-of-fold predictions: test_cv_export_chooses_postprocessing_on_flipped_out_of_fold_predictions below);
    # the trial's own pooled Dice, from its stored predictions, is kept beside it.
    with np.load(cv_study.oof) as arrays:
        raw = postprocess.pooled_dice(arrays["probabilities"], arrays["masks"], PostProcessing())
    config, data = _test_images(out)
    chosen = config.postprocess
    assert run["gflops_per_image"] == pytest.approx(2 * FOLDS * estimate_cost(config.model).flops / 1e9, rel=1e-5)
    assert metrics["postprocess"]["threshold"] == chosen.threshold
    assert metrics["cross_validation"]["oof_foreground_dice_pooled_stored"] == pytest.approx(raw, abs=1e-5)
    assert metrics["cross_validation"]["oof_foreground_dice_pooled_postprocessed"] >= \
        metrics["cross_validation"]["oof_foreground_dice_pooled"]
    card = (out / "model_card.md").read_text()
    assert f"Ensemble: the mean of the {FOLDS} fold models' outputs, each also on the horizontally flipped" in card
    assert f"{2 * FOLDS} forward pass(es)" in card and "ms (median of 10 single-image predictions" in card
    assert f"Post-processing ([postprocess] in train_eval_infer.config): {chosen.describe()}" in card
    assert f"out-of-fold over {FOLDS} folds" in card

    fresh, probabilities = _check_in_fresh_python(out, cv_study.fold_models, tta=True)
    assert fresh["layers"] == ["InputLayer", "Functional", "Functional", "Average"]
    assert fresh["mean"] < 1e-5 and fresh["saved"] < 1e-5
    assert fresh["onnx"] < 2e-3 and fresh["onnx_same_classes"]

    # The export's evaluation scored the post-processed ensemble.
    from flexunet.data.dataset import load_split

    test = load_split(config, "test")
    assert test.names == data.names
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["foreground_dice_global"] == pytest.approx(
        postprocess.pooled_dice(probabilities, test.masks, chosen), abs=1e-5)

    # infer applies the exported post-processing...
    masks = _infer_masks(out / "train_eval_infer.config", tmp_path / "infer")
    expected = _expected_masks(data, postprocess.apply(probabilities, chosen))
    assert masks.keys() == expected.keys()
    for name in expected:
        np.testing.assert_array_equal(masks[name], expected[name])
    # ... and whatever rule the config holds: a threshold at the median foreground probability
    # changes many pixels, and infer's masks follow it.
    threshold = round(float(np.median(1.0 - probabilities[..., 0])), 4)
    rule = PostProcessing(threshold, (3,))
    text = (out / "train_eval_infer.config").read_text()
    text = re.sub(r"(?ms)^\[postprocess\].*?(?=^\[|\Z)", "", text)
    (out / "train_eval_infer.config").write_text(text + f"\n[postprocess]\nthreshold = {threshold}\n"
                                                 "min_component_size = (3,)\n")
    masks = _infer_masks(out / "train_eval_infer.config", tmp_path / "infer-rule")
    expected = _expected_masks(data, postprocess.apply(probabilities, rule))
    plain = _expected_masks(data, postprocess.apply(probabilities, PostProcessing()))
    assert any((expected[n] != plain[n]).any() for n in expected)
    for name in expected:
        np.testing.assert_array_equal(masks[name], expected[name])


def test_no_tta_export_is_the_plain_fold_mean(cv_study: CVStudy, tmp_path: Path) -> None:
    out = tmp_path / "export"
    metrics = _export(cv_study, out, "--no-tta")
    assert metrics["inference"]["flip_tta"] is False and metrics["inference"]["forward_passes"] == FOLDS
    assert "horizontally flipped" not in (out / "model_card.md").read_text()
    fresh, _ = _check_in_fresh_python(out, cv_study.fold_models, tta=False)
    assert fresh["mean"] < 1e-5 and fresh["saved"] < 1e-5
    assert fresh["onnx"] < 2e-3 and fresh["onnx_same_classes"]


def test_trial_option_exports_a_single_split_trial_as_one_model(cv_study: CVStudy, tmp_path: Path) -> None:
    import keras

    out = tmp_path / "export"
    metrics = _export(cv_study, out, "--trial", "1")
    assert metrics["trial"] == 1 and metrics["cross_validation"] is None
    assert metrics["inference"]["models"] == 1 and metrics["inference"]["forward_passes"] == 1
    exported = keras.models.load_model(out / "best_model.keras", compile=False)
    fold0 = keras.models.load_model(cv_study.fold_models[0], compile=False)
    assert [w.shape for w in exported.get_weights()] == [w.shape for w in fold0.get_weights()]
    assert all(np.array_equal(a, b) for a, b in zip(exported.get_weights(), fold0.get_weights()))
    assert "Post-processing: none" in (out / "model_card.md").read_text()


def test_missing_fold_model_is_one_error_line(cv_study: CVStudy, tmp_path: Path) -> None:
    from search import paths

    study = optuna.load_study(study_name="cv-export", storage=cv_study.storage)
    artifacts = Path(study.user_attrs["flexunet_artifact_dir"])
    broken = tmp_path / "artifacts"
    broken.mkdir()
    for path in artifacts.iterdir():  # every artifact but fold 1's model
        if path.read_bytes() != cv_study.fold_models[1].read_bytes():
            (broken / path.name).write_bytes(path.read_bytes())
    run = run_cli_here("search", "export", "--study", "cv-export", "--storage", cv_study.storage, "--out",
                  tmp_path / "out", "--artifacts", broken)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert f"trial 0's {paths.fold_model(1)}" in run.stderr and "--artifacts" in run.stderr
    assert not (tmp_path / "out").exists()


def test_ensemble_docstring_example_runs() -> None:
    import doctest

    from flexunet import ensemble

    result = doctest.testmod(ensemble)
    assert result.attempted > 0 and result.failed == 0


# How the export of a cross-validated trial chooses its post-processing: on out-of-fold
# predictions made as the exported ensemble predicts (each fold model on the slices it did not
# train on, with the horizontal flip), under the guards of flexunet.postprocess; and --no-tta on
# a single-split trial is an error, not silently ignored. (Here, to share the module's trained
# study: a module of their own trained it again.)


def _flip_tta_oof(cv: CVStudy) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Out-of-fold probabilities recomputed here: each slice by its fold's model, averaged with
    that model's prediction of the mirrored slice (mirrored back)."""
    import keras

    from flexunet import config as cfg

    with np.load(cv.oof) as arrays:
        names, folds, masks = [str(n) for n in arrays["names"]], arrays["folds"], arrays["masks"]
    pool = _pool(cfg.load(cv.data_config))
    images = pool.images[[pool.names.index(n) for n in names]].astype(np.float32)
    out = np.zeros((*masks.shape, 2), np.float32)
    for k, path in enumerate(cv.fold_models):
        model = keras.models.load_model(path, compile=False)
        rows = folds == k
        x = images[rows]
        out[rows] = (model.predict(x, verbose=0) + model.predict(x[:, :, ::-1], verbose=0)[:, :, ::-1]) / 2
    return out, masks, folds


def test_cv_export_chooses_postprocessing_on_flipped_out_of_fold_predictions(cv_study: CVStudy,
                                                                           tmp_path: Path) -> None:
    from flexunet import config as cfg
    from flexunet import postprocess
    from flexunet.postprocess import PostProcessing

    out = tmp_path / "export"
    metrics = _export(cv_study, out)
    probabilities, masks, folds = _flip_tta_oof(cv_study)
    expected = postprocess.select(probabilities, masks, folds)
    config = cfg.load(out / "train_eval_infer.config")
    assert config.postprocess == expected.rules
    cv = metrics["cross_validation"]
    assert cv["oof_foreground_dice_pooled"] == pytest.approx(expected.dice, abs=1e-4)
    assert cv["oof_foreground_dice_pooled_postprocessed"] == pytest.approx(expected.dice_postprocessed, abs=1e-4)
    assert cv["oof_fold_foreground_dice"] == pytest.approx(list(expected.fold_dice), abs=1e-4)
    assert len(cv["oof_fold_foreground_dice_postprocessed"]) == FOLDS
    # The trial's own value (no flip) is kept beside it, from the stored predictions.
    with np.load(cv_study.oof) as arrays:
        stored = postprocess.pooled_dice(arrays["probabilities"], arrays["masks"], PostProcessing())
    assert cv["oof_foreground_dice_pooled_stored"] == pytest.approx(stored, abs=1e-6)
    pp = metrics["postprocess"]
    assert pp["chosen_on"] == f"out-of-fold predictions of the {FOLDS} fold models with the horizontal flip"
    assert pp["guards"] == {"min_gain": postprocess.TOLERANCE, "no_fold_worse": True,
                            "max_true_lesions_removed": postprocess.MAX_LESIONS_REMOVED,
                            "max_min_component_size": [postprocess.size_cap(masks == 1)]}
    card = (out / "model_card.md").read_text()
    assert f"chosen on the out-of-fold predictions of the {FOLDS} fold models with the horizontal flip" in card
    assert "leaves no fold worse" in card


def test_no_tta_on_a_single_split_trial_is_an_error(cv_study: CVStudy, tmp_path: Path) -> None:
    out = tmp_path / "export"
    run = run_cli_here("search", "export", "--study", "cv-export", "--storage", cv_study.storage, "--out", out,
                  "--trial", "1", "--no-tta")
    assert_user_error(run, "--no-tta", "trial 1", "single-split")
    assert not out.exists()
    # Without --no-tta the same trial exports as its one model.
    metrics = _export(cv_study, out, "--trial", "1")
    assert metrics["inference"]["models"] == 1 and metrics["cross_validation"] is None

"""Cross-validated trials (search/trial/cv.py) on the bundled sample at 32 px: per-fold attributes and
artifacts, the value recomputed from the stored out-of-fold predictions, pruning inside the
first fold, folds given by a file, and a killed worker's trial resumed with its finished folds."""

from __future__ import annotations

import hashlib
import os
import signal
from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.artifacts import download_artifact, get_all_artifact_meta
from optuna.trial import TrialState

from conftest import SAMPLE, assert_user_error, run_cli, shared_storage, start_cli

pytestmark = pytest.mark.slow

CV_STUDY = """
[study]
name = "{name}"
image_size = 32
baseline = false
folds = {folds}
[dataset]
prepare = {{ dataset = "ct-ich", source = "{source}", size = 32 }}
[fixed]
steps_per_epoch = {steps}
patience = 0
save_overhead = 0
[budget]
n_trials = {n_trials}
max_epochs = {max_epochs}
[sampler]
name = "RandomSampler"
seed = 0
[pruner]
{pruner}
[space]
base_filters = {{ type = "int", low = 4, high = 8, step = 4 }}
num_layers = {{ type = "int", low = 2, high = 3 }}
"""
# Rung 0 at combined step 1: fold 0's second epoch.
HALVING = 'name = "SuccessiveHalvingPruner"\nmin_resource = 1\nreduction_factor = 3'


def cv_study(path: Path, name: str, *, folds: int = 3, max_epochs: int = 2, steps: int = 2, n_trials: int = 3,
             pruner: str = HALVING) -> Path:
    path.write_text(CV_STUDY.format(name=name, folds=folds, source=SAMPLE, steps=steps, n_trials=n_trials,
                                    max_epochs=max_epochs, pruner=pruner), encoding="utf-8")
    return path


def _objective(study_path: Path, out: Path) -> tuple[optuna.Study, object]:
    """The study and the objective a worker builds for it (in this process)."""
    from search.spec import study_file
    from search.trial.objective import Objective
    from search.runtime.run import RunOptions, setup

    spec = study_file.load(study_path)
    study, ctx = setup(spec, RunOptions(out=out))
    data, out = ctx.open_dataset(), ctx.out
    artifacts = optuna.artifacts.FileSystemArtifactStore(str(out / "artifacts"))
    (out / "artifacts").mkdir(exist_ok=True)
    objective = Objective(spec=spec, base=data.base, image_size=data.image_size, artifacts=artifacts,
                          space=data.space, dataset_dir=ctx.dataset_dir)
    return study, objective


def _artifacts(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> dict[str, str]:
    return {m.filename: m.artifact_id for m in get_all_artifact_meta(trial, storage=study._storage)}


def test_a_cv_trial_is_scored_on_pooled_out_of_fold_predictions_and_a_weak_one_stops_in_fold_1(
        tmp_path: Path) -> None:
    from flexunet import metrics as m
    from flexunet.data.dataset import load_split
    from flexunet import config as cfg

    study, objective = _objective(cv_study(tmp_path / "cv.toml", "cv"), tmp_path / "run")
    study.optimize(objective, n_trials=1)
    first = study.trials[0]
    assert first.state == TrialState.COMPLETE, first.user_attrs
    attrs = first.user_attrs
    assert attrs["folds"] == 3 and len(attrs["fold_val_foreground_dice"]) == 3
    assert attrs["stop_reason"] == "folds_done" and attrs["fold_epochs_run"] == [2, 2, 2]
    assert attrs["val_foreground_dice_pooled"] == first.value
    assert sorted(first.intermediate_values) == [0, 1, 2, 3, 4, 5]  # step = fold * max_epochs + epoch
    names = _artifacts(study, first)
    assert {f"best_model_fold{k}.keras" for k in range(3)} | {f"train_log_fold{k}.csv" for k in range(3)} \
        | {"oof_predictions.npz"} == set(names)

    download_artifact(artifact_store=objective.artifacts, artifact_id=names["oof_predictions.npz"],
                      file_path=str(tmp_path / "oof.npz"))
    with np.load(tmp_path / "oof.npz") as oof:
        probabilities, masks, slices, folds = oof["probabilities"], oof["masks"], oof["names"], oof["folds"]
    assert probabilities.dtype == np.float16 and probabilities.shape == (len(masks), 32, 32, 2)
    assert masks.dtype == np.uint8 and sorted(set(folds.tolist())) == [0, 1, 2]
    # One global Dice over every out-of-fold slice, recomputed from what was stored.
    tp, fp, fn = m.confusion(m.to_classes(probabilities), masks, 2)
    assert first.value == pytest.approx(float(np.mean(m.dice_score(tp, fp, fn)[1:])), abs=0)
    # Every fold's Dice, recomputed from its own slices.
    for k, dice in enumerate(attrs["fold_val_foreground_dice"]):
        tp, fp, fn = m.confusion(m.to_classes(probabilities[folds == k]), masks[folds == k], 2)
        assert dice == pytest.approx(float(np.mean(m.dice_score(tp, fp, fn)[1:])), abs=1e-12)
    # The folds cover the train and valid slices once each; the test patients are in none.
    data = cfg.load(tmp_path / "run" / "data" / "train_eval_infer.config")
    development = load_split(data, "train").names + load_split(data, "valid").names
    assert sorted(slices.tolist()) == sorted(development)
    assert not set(slices.tolist()) & set(load_split(data, "test").names)
    patients = {}
    for name, k in zip(slices.tolist(), folds.tolist()):
        assert patients.setdefault(name.split("_")[0], k) == k  # patient-level folds

    # A competitor that passed the first rung with a perfect Dice (through Optuna's API): the
    # next trial is not in the best third there, so the pruner stops it in its first fold.
    study.add_trial(optuna.trial.create_trial(
        state=TrialState.COMPLETE, value=1.0, params=first.params, distributions=first.distributions,
        intermediate_values={s: 1.0 for s in range(6)}, system_attrs={"completed_rung_0": 1.0}))
    study.optimize(objective, n_trials=1)
    weak = study.trials[-1]
    assert weak.state == TrialState.PRUNED
    assert weak.user_attrs["stop_reason"] == "pruned at fold 1, epoch 2"
    assert len(weak.user_attrs["fold_val_foreground_dice"]) == 1 and sorted(weak.intermediate_values) == [0, 1]
    assert set(_artifacts(study, weak)) == {"best_model_fold0.keras", "train_log_fold0.csv"}


def test_folds_come_from_folds_csv_beside_the_dataset_config(tmp_path: Path) -> None:
    from search.trial import cv
    from flexunet import config as cfg
    from flexunet.data import ct_ich
    from flexunet.data.dataset import load_split

    ct_ich.prepare(SAMPLE, tmp_path / "data", size=32, seed=0)
    config = cfg.load(tmp_path / "data" / "train_eval_infer.config")
    names = load_split(config, "train").names + load_split(config, "valid").names
    folds_csv = tmp_path / "data" / "folds.csv"
    folds_csv.write_text("name,fold\n" + "".join(f"{n},{i % 2}\n" for i, n in enumerate(names)), encoding="utf-8")
    data = cv.load_fold_data(config, 2, folds_csv)
    assert data.fold_of.tolist() == [i % 2 for i in range(len(names))]
    train, valid = data.split(1)
    assert valid.names == names[1::2] and train.names == names[0::2]

    test_name = load_split(config, "test").names[0]
    folds_csv.write_text(folds_csv.read_text() + f"{test_name},0\n", encoding="utf-8")
    with pytest.raises(Exception, match=f"{test_name}.*not a train or valid slice"):
        cv.load_fold_data(config, 2, folds_csv)
    folds_csv.write_text("name,fold\n" + "".join(f"{n},{i % 3}\n" for i, n in enumerate(names)), encoding="utf-8")
    with pytest.raises(Exception, match=r"fold '2' is not one of 0..1"):
        cv.load_fold_data(config, 2, folds_csv)


def test_a_bad_folds_value_is_one_error_line(tmp_path: Path) -> None:
    path = cv_study(tmp_path / "bad.toml", "bad")
    path.write_text(path.read_text().replace("folds = 3", "folds = 0"), encoding="utf-8")
    assert_user_error(run_cli("search", "run", path, "--out", tmp_path / "run"), "bad.toml", "[study] folds", "0")


def _sha(study: optuna.Study, out: Path, trial: optuna.trial.FrozenTrial, name: str) -> str:
    store = optuna.artifacts.FileSystemArtifactStore(str(out / "artifacts"))
    with store.open_reader(_artifacts(study, trial)[name]) as reader:
        return hashlib.sha256(reader.read()).hexdigest()


def test_a_killed_cv_trial_resumes_in_its_fold_and_keeps_the_finished_ones(tmp_path: Path) -> None:
    from test_reliability import _wait_for

    study_path = cv_study(tmp_path / "resume.toml", "cv-resume", folds=2, max_epochs=6, steps=4, n_trials=1,
                          pruner='name = "NopPruner"')
    out = tmp_path / "run"
    url = f"sqlite:///{out / 'study.db'}"
    log = tmp_path / "launcher.log"
    launcher = start_cli("search", "run", study_path, "--out", out, log=log)

    def in_fold_2() -> optuna.trial.FrozenTrial | None:
        try:
            study = optuna.load_study(study_name="cv-resume", storage=shared_storage(url))
            running = study.get_trials(states=(TrialState.RUNNING,))
        except (KeyError, optuna.exceptions.StorageInternalError, Exception):
            return None
        return next((t for t in running if t.user_attrs.get("resume_fold") == 1
                     and t.user_attrs.get("resume_epoch", 0) >= 1), None)

    victim = _wait_for(in_fold_2, 600, "the trial's second fold to pass an epoch", launcher, log)
    os.kill(victim.user_attrs["pid"], signal.SIGKILL)
    assert launcher.wait(timeout=600) == 0, log.read_text()
    study = optuna.load_study(study_name="cv-resume", storage=shared_storage(url))
    killed = study.trials[victim.number]
    assert killed.state == TrialState.FAIL and len(killed.user_attrs["fold_val_foreground_dice"]) == 1
    retry = next(t for t in study.trials if t.system_attrs.get("failed_trial") == killed.number)
    assert retry.state == TrialState.COMPLETE, retry.user_attrs
    assert retry.user_attrs["resumed_from_fold"] == 1 and retry.user_attrs["resumed_from_epoch"] >= 1
    # Fold 1 was kept, not trained again: the same Dice and byte for byte the same model.
    assert retry.user_attrs["fold_val_foreground_dice"][0] == killed.user_attrs["fold_val_foreground_dice"][0]
    assert _sha(study, out, retry, "best_model_fold0.keras") == _sha(study, out, killed, "best_model_fold0.keras")
    assert retry.user_attrs["fold_epochs_run"] == [6, 6]
    assert len(retry.user_attrs["fold_val_foreground_dice"]) == 2 and "oof_predictions.npz" in _artifacts(study, retry)


def test_the_baseline_trains_at_the_study_fidelity(tmp_path: Path) -> None:
    """The seed's settings, but as many steps, as much patience and the same seed as every trial."""
    from flexunet import config as cfg
    from flexunet.data import ct_ich
    from search.spec import space as sp, study_file

    ct_ich.prepare(SAMPLE, tmp_path / "data", size=32, seed=0)
    base = cfg.load(tmp_path / "data" / "train_eval_infer.config")
    spec = study_file.load(cv_study(tmp_path / "cv.toml", "cv", steps=3))
    seed = sp.trial_config(base, spec, 32, {}, baseline=True)
    assert seed.train.steps_per_epoch == 3 and seed.train.patience == 0 and seed.train.save_overhead == 0
    assert seed.model.learning_rate == pytest.approx(7e-5) and seed.model.base_kernels == (11, 11)
    assert seed.model.normalization is False and seed.train.batch_size == 2


def test_the_shipped_sample_study_cross_validates_every_trial(tmp_path: Path) -> None:
    """The README's main command, shrunk by its overrides: the baseline and the searched trials
    are all 3-fold cross-validated, and the study records its folds. Its refit is left out
    (`--no-refit`; tests/test_refit.py runs one, killed worker included)."""
    from conftest import ROOT

    out = tmp_path / "run"
    run = run_cli("search", "run", ROOT / "studies" / "ct_ich_sample.toml", "--n-trials", "2", "--max-epochs", "2",
                  "--image-size", "32", "--no-refit", "--out", out, timeout=900)
    assert run.returncode == 0, run.stdout + run.stderr
    assert optuna.get_all_study_names(f"sqlite:///{out / 'study.db'}") == ["ct-ich-sample"]  # no refit study
    assert "refit" not in run.stdout
    study = optuna.load_study(study_name="ct-ich-sample", storage=f"sqlite:///{out / 'study.db'}")
    assert study.user_attrs["flexunet_folds"] == 3 and study.user_attrs["flexunet_pruner"] == "SuccessiveHalvingPruner"
    trials = [t for t in study.trials if t.user_attrs.get("stop_reason") != "infeasible"]
    assert len(trials) == 2, [(t.number, t.user_attrs.get("infeasible_reason")) for t in study.trials]  # one searched
    baseline = study.trials[0]
    assert baseline.user_attrs["baseline"] is True and baseline.state == TrialState.COMPLETE
    assert baseline.user_attrs["settings"]["steps_per_epoch"] == 8  # the study's fidelity
    for t in trials:
        assert t.user_attrs["folds"] == 3, t.user_attrs
        done = len(t.user_attrs["fold_val_foreground_dice"])
        names = set(_artifacts(study, t))
        assert {f"best_model_fold{k}.keras" for k in range(done)} <= names
        if t.state == TrialState.COMPLETE:
            assert done == 3 and "oof_predictions.npz" in names and t.value == t.user_attrs["val_foreground_dice_pooled"]
        else:
            assert t.state == TrialState.PRUNED and t.user_attrs["stop_reason"].startswith("pruned at fold ")

"""The refit (search/trial/refit.py): the best configurations trained again as fold x seed models in a
study of their own, run by real worker processes, resumed after a SIGKILL, and exported as one
ensemble chosen on out-of-fold predictions.

One module fixture does the expensive part once: a 2-trial cross-validated search at 32 px, then
``flexunet search refit`` in a fresh process whose worker is SIGKILLed in the middle of a model;
the tests read what it left.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from conftest import start_cli, tiny_study

pytestmark = pytest.mark.slow
REFIT_EPOCHS = 6


@dataclass(frozen=True)
class Refitted:
    study_file: Path
    out: Path
    url: str
    killed: int  # the refit trial whose worker was SIGKILLed
    launcher_output: str
    launcher_status: int


def _study_file(path: Path) -> Path:
    """The conftest's tiny study, 2-fold cross-validated, with a [refit] of 2 configurations."""
    tiny_study(path, "refit-test", n_trials=2, max_epochs=2, baseline=False)
    text = path.read_text(encoding="utf-8").replace("[study]\n", "[study]\nfolds = 2\n", 1)
    path.write_text(text + f"""
[refit]
seeds = 1
epochs = {REFIT_EPOCHS}
steps_per_epoch = 2
patience = {REFIT_EPOCHS}
tta = ["none", "horizontal"]
top_k = 2
""", encoding="utf-8")
    return path


def _load(url: str, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=url)


@pytest.fixture(scope="module")
def refitted(tmp_path_factory: pytest.TempPathFactory) -> Refitted:
    from search import Study

    root = tmp_path_factory.mktemp("refit")
    study_file = _study_file(root / "study.toml")
    out = root / "run"
    search = Study.from_file(study_file, out=out)
    search.spec = dataclasses.replace(search.spec, refit=None)  # the search alone; the refit below
    assert search.run(workers=2).states.get("COMPLETE") == 2  # raises unless the budget was spent
    url = f"sqlite:///{out / 'study.db'}"
    log = root / "refit.log"
    launcher = start_cli("search", "refit", study_file, "--out", out, "--workers", "1", log=log)
    victim = None
    end = time.time() + 600
    while victim is None and time.time() < end and launcher.poll() is None:
        try:
            running = _load(url, "refit-test:refit").get_trials(states=(TrialState.RUNNING,))
        except KeyError:
            running = []
        victim = next((t for t in running if 1 <= t.user_attrs.get("resume_epoch", 0) < REFIT_EPOCHS - 1), None)
        time.sleep(0.1)
    assert victim is not None, log.read_text()
    os.kill(victim.user_attrs["pid"], signal.SIGKILL)
    status = launcher.wait(timeout=900)
    return Refitted(study_file, out, url, victim.number, log.read_text(), status)


def test_a_killed_refit_worker_is_replaced_and_nothing_is_trained_twice_from_scratch(refitted: Refitted) -> None:
    assert refitted.launcher_status == 0, refitted.launcher_output
    assert "died (SIGKILL); starting another" in refitted.launcher_output
    refit = _load(refitted.url, "refit-test:refit")
    trials = refit.get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    keys = [(t.user_attrs["refit_rank"], t.user_attrs["refit_fold"], t.user_attrs["refit_seed"]) for t in complete]
    assert sorted(keys) == [(0, 0, 0), (0, 1, 0), (1, 0, 0), (1, 1, 0)]  # each model once
    killed = next(t for t in trials if t.number == refitted.killed)
    assert killed.state == TrialState.FAIL and killed.user_attrs["fail_reason"] == "worker killed (SIGKILL)"
    retry = next(t for t in trials if t.system_attrs.get("failed_trial") == killed.number)
    assert retry.state == TrialState.COMPLETE and retry.user_attrs["resumed_from_epoch"] >= 1
    assert [t for t in trials if t.state == TrialState.FAIL] == [killed]
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    # A model that ran its epochs in two processes still counts them once.
    assert retry.user_attrs["epochs_run"] <= REFIT_EPOCHS
    # `status` shows the refit.
    from search import load_study

    lines = "\n".join(load_study("refit-test", refitted.url).status())
    assert "4 of 4 models trained, 0 running" in lines and "refit ('refit-test:refit')" in lines


def test_the_search_study_holds_no_refit_value(refitted: Refitted) -> None:
    search = _load(refitted.url, "refit-test")
    refit = _load(refitted.url, "refit-test:refit")
    # What a sampler of the search reads: the search study's own trials, and only them.
    seen = search.get_trials(deepcopy=False)
    assert [t.number for t in seen] == [0, 1] and all(t.state == TrialState.COMPLETE for t in seen)
    assert not [t for t in seen if "refit_source_trial" in t.user_attrs]
    refit_values = {t.values[0] for t in refit.get_trials(states=(TrialState.COMPLETE,))}
    assert refit_values and not refit_values & {t.values[0] for t in seen}
    # The link, both ways, and what the refit retrains: the 2 best search trials, best first.
    record = search.user_attrs["flexunet_refit"]
    ranked = sorted(seen, key=lambda t: -t.values[0])
    assert record["study"] == "refit-test:refit" and record["configurations"] == [t.number for t in ranked]
    assert refit.user_attrs["flexunet_refit_of"] == "refit-test"
    # A TPE sampler asked on the search study fits on its 2 trials (the refit's 5 are not there).
    tpe = optuna.load_study(study_name="refit-test", storage=refitted.url,
                            sampler=optuna.samplers.TPESampler(n_startup_trials=1, seed=0))
    trial = tpe.ask()
    trial.suggest_int("base_filters", 4, 8, step=4)
    assert len(tpe.get_trials(deepcopy=False)) == 3


@pytest.fixture(scope="module")
def exports(refitted: Refitted, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from search import Study

    root = tmp_path_factory.mktemp("exports")
    study = Study.from_file(refitted.study_file, out=refitted.out).open()
    # As an install without the export extra: converting an ensemble to ONNX takes most of a
    # minute, and tests/test_search_export_ensemble.py checks the ONNX file of an ensemble.
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "tf2onnx", None)
        study.export(root / "refit")
        study.export(root / "search", refit=False)
    return root / "refit", root / "search"


def test_export_delivers_the_refit_ensemble_and_no_refit_the_search_trial(refitted: Refitted,
                                                                          exports: tuple[Path, Path]) -> None:
    import keras

    from flexunet.data.dataset import load_split
    from flexunet import config as cfg
    from search.store import artifacts as af
    from search.store import storage as st

    refit_dir, search_dir = exports
    metrics = json.loads((refit_dir / "metrics.json").read_text())
    refit = metrics["refit"]
    assert refit["study"] == "refit-test:refit" and len(refit["models"]) == 4 and len(refit["weights"]) == 2
    assert refit["tta"] in ("none", "horizontal") and set(refit["tta_candidates_oof_foreground_dice"]) == {
        "none", "horizontal"}
    low, high = metrics["expected"]["interval_95_over_patients"]
    assert low <= metrics["expected"]["oof_foreground_dice_pooled"] <= high
    test = json.loads((refit_dir / "evaluation.json").read_text())
    assert test["foreground_dice_interval"]["groups"] == 2  # the 2 test patients
    assert test["foreground_dice_interval"]["low"] <= test["foreground_dice_global"] <= \
        test["foreground_dice_interval"]["high"]
    assert test["classes"]["1"]["area_ratio"] >= 0  # predicted / true foreground area
    card = (refit_dir / "model_card.md").read_text()
    assert "refit of trial" in card and "Caruana" in card and "95% interval over 2 patients" in card

    # The exported model is the weighted mean of the refit's models (with the chosen mirroring).
    storage = st.open_storage(refitted.url, heartbeat=False, create=False)
    store = af.open_store(af.resolve(None, None, refitted.out), check=False)
    refit_study = st.load_study(storage, "refit-test:refit")
    by_number = {t.number: t for t in refit_study.get_trials()}
    config = cfg.load(refit_dir / "train_eval_infer.config")
    images = load_split(config, "test").images[:4].astype(np.float32)
    total, count = np.zeros((*images.shape[:3], 2), np.float64), 0
    weight_of = dict(zip(refit["configurations"], refit["weights"]))
    for row in refit["models"]:
        member = keras.models.load_model(store.download(storage, by_number[row["refit_trial"]], "best_model.keras",
                                                        refit_dir.parent), compile=False)
        weight = weight_of[row["configuration"]]
        predicted = member.predict(images, verbose=0)
        if refit["tta"] == "horizontal":
            predicted = (predicted + member.predict(images[:, :, ::-1], verbose=0)[:, :, ::-1]) / 2
        total += weight * predicted
        count += weight
    exported = keras.models.load_model(refit_dir / "best_model.keras").predict(images, verbose=0)
    np.testing.assert_allclose(exported, total / count, atol=1e-5)

    plain = json.loads((search_dir / "metrics.json").read_text())
    assert plain["refit"] is None and plain["inference"]["models"] == 2  # the search trial's 2 fold models
    assert "refit of trial" not in (search_dir / "model_card.md").read_text()


def test_refit_without_a_refit_section_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    from conftest import assert_user_error, run_cli_here

    study = tiny_study(tmp_path / "plain.toml", "plain")
    run = run_cli_here("search", "refit", study, "--out", tmp_path / "run")
    assert_user_error(run, "plain.toml: the study file has no [refit] section")
    assert not (tmp_path / "run").exists()


def test_averaged_weights_are_what_validation_sees_and_they_resume(tmp_path: Path) -> None:
    """``[refit] ema = true``: the optimizer's moving average is written into the model at each
    epoch's end (so validation, early stopping and the saved model see it), and a checkpoint of
    such a model resumes with its average."""
    import keras

    from conftest import SAMPLE
    from flexunet import config as cfg
    from flexunet.data import ct_ich
    from flexunet.data.dataset import load_split
    from flexunet.model import build
    from flexunet.train import TrainOutputs, compile_model, fit
    from search.store import _internals

    ct_ich.prepare(SAMPLE, tmp_path / "data", size=32, seed=0)
    config = cfg.load(tmp_path / "data" / "train_eval_infer.config")
    config = cfg.override(config, "model", {"base_filters": 4, "num_layers": 2}, "test")
    config = cfg.override(config, "train", {"epochs": 2, "steps_per_epoch": 3, "batch_size": 4, "patience": 0,
                                            "save_overhead": 0}, "test")
    train, valid = load_split(config, "train"), load_split(config, "valid")
    gaps: list[float] = []

    class Gap(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            average = _internals.ema_variables(self.model.optimizer)
            gaps.append(max(float(np.abs(w.numpy() - a.numpy()).max())
                            for w, a in zip(self.model.trainable_variables, average)))

    network = build(config.model, seed=0)
    compile_model(network, config.model, train.masks, ema_every=3, ema_momentum=0.9)
    outputs = TrainOutputs(model_path=tmp_path / "best.keras", log_csv=tmp_path / "log.csv", model_at_end=False)
    fit(config.model, config.train, train, valid, outputs=outputs, extra_callbacks=[Gap()], verbose=0,
        checkpoint_dir=tmp_path, network=network)
    assert len(gaps) == 2 and max(gaps) < 1e-6  # the model held the average at every epoch's end
    more = cfg.override(config, "train", {"epochs": 3}, "test")
    resumed = fit(more.model, more.train, train, valid, outputs=outputs, verbose=0, checkpoint_dir=tmp_path,
                  resume=True)
    assert resumed.epochs_run == 3 and resumed.model.optimizer.use_ema

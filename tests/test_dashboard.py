"""``flexunet search dashboard`` and the study note, on a small finished study built directly with
Optuna (no training): the real command serves it, and headless Chromium sees the study, a trial
and the trial's artifact image."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import optuna
import optuna_dashboard
import pytest
from optuna.artifacts import FileSystemArtifactStore, upload_artifact

from browser import dump_dom, screenshot
from conftest import assert_user_error, run_cli
from search.store import artifacts as af
from search.results import dashboard as db
from servers import Dashboard

STUDY = "dash-check"
DATASET = {"prepared": "ct-ich", "classes": 2, "channels": 1,
           "split": {"train": ["050", "051", "066"], "valid": ["049"], "test": ["052", "078"]},
           "slices": {"all": {"train": 30, "valid": 5, "test": 11}}}


@dataclass(frozen=True)
class TinyStudy:
    url: str
    artifacts: Path
    overlay: bytes  # the PNG uploaded for trial 1


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory: pytest.TempPathFactory) -> TinyStudy:
    """Two finished trials (0 is the baseline), each with a PNG overlay and a CSV log artifact,
    and the study attributes ``flexunet search run`` records."""
    root = tmp_path_factory.mktemp("dashboard")
    artifacts = root / "artifacts"
    artifacts.mkdir()
    store = FileSystemArtifactStore(str(artifacts))
    url = f"sqlite:///{root / 'study.db'}"
    study = optuna.create_study(storage=url, study_name=STUDY, direction="maximize")
    for key, value in {
        "flexunet_dataset": DATASET, "flexunet_image_size": 32, af.STUDY_ATTR: str(artifacts),
        "flexunet_study_file": "dash.toml", "flexunet_objectives": ["val_foreground_dice"],
        "flexunet_space": [{"name": "base_filters", "kind": "int", "low": 4, "high": 16, "step": 4},
                           {"name": "optimizer", "kind": "categorical", "choices": ["Adam", "SGD"]}],
        "flexunet_fixed": {"loss": "dice_loss"}, "flexunet_budget": {"n_trials": 2, "max_epochs": 3},
        "flexunet_sampler": "TPESampler", "flexunet_pruner": "MedianPruner",
    }.items():
        study.set_user_attr(key, value)
    overlay = b""
    for number, value in enumerate((0.31, 0.42)):
        trial = study.ask()
        trial.suggest_int("base_filters", 4, 16, step=4)
        trial.suggest_categorical("optimizer", ["Adam", "SGD"])
        trial.set_user_attr("baseline", number == 0)
        trial.set_user_attr("stop_reason", "max_epochs")
        picture = np.zeros((64, 128, 3), np.uint8)
        picture[:, :64] = (40, 40, 40)
        cv2.circle(picture, (96, 32), 12 + 6 * number, (0, 0, 255), -1)
        png = root / f"validation_overlays_{number}.png"
        cv2.imwrite(str(png), picture)
        csv = root / f"train_log_{number}.csv"
        csv.write_text("epoch,loss,val_foreground_dice\n0,0.9,0.1\n1,0.7,0.3\n", encoding="utf-8")
        for path in (png, csv):
            upload_artifact(artifact_store=store, file_path=str(path), study_or_trial=trial)
        study.tell(trial, value)
        overlay = png.read_bytes()
    return TinyStudy(url, artifacts, overlay)


def _load(tiny: TinyStudy) -> optuna.Study:
    return optuna.load_study(study_name=STUDY, storage=tiny.url)


def test_note_has_split_baseline_and_export(tiny_study: TinyStudy) -> None:
    study = _load(tiny_study)
    text = db.write_study_note(study, "postgresql+psycopg://alice:***@db.example/optuna")
    assert optuna_dashboard.get_note(study) == text
    assert "Split **by patient**" in text
    assert "| train | 3 | 30 | 050, 051, 066 |" in text and "| test | 2 | 11 | 052, 078 |" in text
    assert "Trial 0 runs the seed's hand-tuned settings: validation foreground Dice **0.3100**" in text
    assert "Best so far: trial 1, validation foreground Dice **0.4200** (+0.1100 against the baseline)" in text
    assert "| `base_filters` | int | 4 .. 16 step 4 |" in text and "Adam, SGD" in text
    assert "`loss` = `dice_loss`" in text and "n_trials 2, max_epochs 3" in text
    assert "TPESampler, MedianPruner" in text
    assert ("flexunet search export --study dash-check --storage "
            "'postgresql+psycopg://alice:***@db.example/optuna' --out dash-check-best") in text
    assert "in place of `***`" in text

    # Rewriting the same note changes nothing; a note a person edited is left alone.
    version = study._storage.get_study_system_attrs(study._study_id)["dashboard:note_ver"]
    db.write_study_note(study, "postgresql+psycopg://alice:***@db.example/optuna")
    assert study._storage.get_study_system_attrs(study._study_id)["dashboard:note_ver"] == version
    optuna_dashboard.save_note(study, "my own notes")
    db.write_study_note(study, "sqlite:///study.db")
    assert optuna_dashboard.get_note(study) == "my own notes"
    optuna_dashboard.save_note(study, "")  # back to flexunet's note for the other tests
    db.write_study_note(study, "sqlite:///study.db")
    assert db.NOTE_FOOTER in optuna_dashboard.get_note(study)


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("localhost", True), ("::1", True), ("127.0.1.1", True),
    ("0.0.0.0", False), ("::", False), ("192.168.1.20", False), ("dashboard.example.org", False)])
def test_non_loopback_hosts_are_warned_about(host: str, loopback: bool) -> None:
    assert db.is_loopback(host) is loopback
    warning = db.exposure_warning(host)
    assert (warning is None) is loopback
    if warning:
        assert host in warning and "no authentication" in warning


def test_the_command_warns_before_listening_everywhere(tmp_path: Path) -> None:
    # The study does not exist, so the command stops before it listens: only the warning matters.
    optuna.create_study(study_name="other", storage=f"sqlite:///{tmp_path / 'x.db'}")
    run = run_cli("search", "dashboard", "--study", "nope", "--storage", f"sqlite:///{tmp_path / 'x.db'}",
                  "--host", "0.0.0.0", "--port", "0")
    assert_user_error(run, "no study named 'nope'")
    assert "warning: the dashboard listens on 0.0.0.0" in run.stderr and "no authentication" in run.stderr


def test_the_command_never_shows_a_password() -> None:
    run = run_cli("search", "dashboard", "--storage", "postgresql://alice:s3cret@127.0.0.1:1/optuna")
    assert_user_error(run, "alice:***@127.0.0.1:1")
    assert "s3cret" not in run.stdout + run.stderr


def test_dashboard_shows_study_trials_and_artifacts(tiny_study: TinyStudy, tmp_path: Path) -> None:
    server = Dashboard("--storage", tiny_study.url, "--artifacts", str(tiny_study.artifacts), "--port", "0")
    try:
        assert server.base.startswith("http://127.0.0.1:")
        study_id = int(server.url.rsplit("/", 1)[1])
        detail = json.loads(server.get(f"/api/studies/{study_id}"))
        assert detail["name"] == STUDY
        trial = next(t for t in detail["trials"] if t["number"] == 1)
        images = [a for a in trial["artifacts"] if a["mimetype"] == "image/png"]
        assert [a["filename"] for a in images] == ["validation_overlays_1.png"]
        assert {a["filename"] for a in trial["artifacts"]} == {"validation_overlays_1.png", "train_log_1.csv"}
        src = f"/artifacts/{study_id}/{trial['trial_id']}/{images[0]['artifact_id']}"
        assert server.get(src) == tiny_study.overlay

        page = f"{server.url}/trials?numbers=1"
        dom = dump_dom(page)
        assert STUDY in dom and "Trial 1" in dom
        assert re.search(rf'<img[^>]*src="{re.escape(src)}"', dom), "the trial page shows no artifact image"
        assert "train_log_1.csv" in dom
        screenshot(page, tmp_path / "trial.png")

        note = dump_dom(f"{server.url}/note")
        assert "FlexUNet study" in note and "by patient" in note and "flexunet search export" in note
    finally:
        status = server.stop()
    assert status == 0, server.proc.stderr.read()  # type: ignore[union-attr]


def test_dashboard_of_a_study_name_finds_its_artifacts(tiny_study: TinyStudy) -> None:
    # No --artifacts: the folder comes from the study's record of its artifact store.
    server = Dashboard("--study", STUDY, "--storage", tiny_study.url, "--port", "0")
    try:
        study_id = int(server.url.rsplit("/", 1)[1])
        detail = json.loads(server.get(f"/api/studies/{study_id}"))
        trial = next(t for t in detail["trials"] if t["number"] == 1)
        png = next(a for a in trial["artifacts"] if a["mimetype"] == "image/png")
        assert server.get(f"/artifacts/{study_id}/{trial['trial_id']}/{png['artifact_id']}") == tiny_study.overlay
    finally:
        assert server.stop() == 0

"""``flexunet search report`` on a real (tiny) finished study: the page, its figures, the best
trial against the baseline on test slices, rendered in headless Chromium."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import cv2
import numpy as np
import optuna
import pytest

from browser import screenshot
from conftest import assert_user_error, run_cli, run_cli_here
from search.results import report

pytestmark = pytest.mark.slow
FIGURES = ("history.png", "importances.png", "parallel_coordinate.png", "learning_curves.png", "test_overlays.png")
SECTIONS = ("Optimisation history", "Parameter importances", "Parallel coordinates", "Best trial against the baseline",
            "Learning curves", "Test slices")
REPORT_STUDY = """
[study]
name = "report-check"
image_size = 32
baseline = true
[dataset]
prepare = {{ dataset = "ct-ich", source = "{source}", size = 32 }}
[budget]
n_trials = 3
max_epochs = 2
[sampler]
name = "RandomSampler"
seed = 0
[pruner]
name = "NopPruner"
[space]
base_filters = {{ type = "int", low = 4, high = 8, step = 4 }}
num_layers = {{ type = "int", low = 2, high = 3 }}
"""


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, sample: Path) -> tuple[Path, Path]:
    """The study file and its output folder, after three trials of two epochs (trial 0: baseline)."""
    root = tmp_path_factory.mktemp("report")
    study_file = root / "report.toml"
    study_file.write_text(REPORT_STUDY.format(source=sample), encoding="utf-8")
    run = run_cli("search", "run", study_file, "--out", root / "run", timeout=900)
    assert run.returncode == 0, run.stdout + run.stderr
    return study_file, root / "run"


def test_report_page_figures_and_comparison(finished: tuple[Path, Path], tmp_path: Path) -> None:
    study_file, run_dir = finished
    out = tmp_path / "report"
    run = run_cli_here("search", "report", study_file, "--run-dir", run_dir, "--out", out)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "against the baseline (trial 0)" in run.stdout
    page = (out / report.REPORT_FILE).read_text(encoding="utf-8")

    for name in FIGURES:
        picture = cv2.imread(str(out / name), cv2.IMREAD_COLOR)
        assert picture is not None and picture.std() > 5, name
    embedded = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert sorted(base64.b64decode(e) for e in embedded) == sorted((out / n).read_bytes() for n in FIGURES)
    for section in SECTIONS:
        assert f">{section}</h" in page, section
    # Self-contained: nothing to fetch, nothing to run.
    assert "<script" not in page and "<link" not in page and not re.search(r'src="(?!data:)', page)
    # No absolute path of this machine, and the storage by file name only.
    assert str(tmp_path) not in page and str(run_dir) not in page and "sqlite:///study.db" in page

    study = optuna.load_study(study_name="report-check", storage=f"sqlite:///{run_dir / 'study.db'}")
    best = study.best_trial
    assert f"<td>{best.number} (best)</td><td>0 (baseline)</td>" in page
    assert f"<td>{best.values[0]:.4f}</td>" in page and "test foreground Dice (11 slices)" in page
    # Four test slices side by side: input, ground truth, best, baseline (256 px tiles, 2 px gaps).
    overlays = cv2.imread(str(out / "test_overlays.png"), cv2.IMREAD_COLOR)
    assert overlays.shape[:2] == (4 * 256 + 3 * 2, 4 * 256 + 3 * 2)

    screenshot(f"file://{out / report.REPORT_FILE}", tmp_path / "report.png")


def test_run_leaves_a_dashboard_note_with_the_baselines_value(finished: tuple[Path, Path]) -> None:
    import optuna_dashboard

    _, run_dir = finished
    study = optuna.load_study(study_name="report-check", storage=f"sqlite:///{run_dir / 'study.db'}")
    note = optuna_dashboard.get_note(study)
    baseline = study.trials[0]
    assert baseline.user_attrs["baseline"] and baseline.values
    assert f"validation foreground Dice **{baseline.values[0]:.4f}**" in note
    assert "| test | 2 | 11 | 052, 078 |" in note and "flexunet search export --study report-check" in note


def test_report_by_study_name_and_all_or_nothing(finished: tuple[Path, Path], tmp_path: Path) -> None:
    _, run_dir = finished
    out = tmp_path / "by-name"
    args = ("search", "report", "--study", "report-check", "--storage", f"sqlite:///{run_dir / 'study.db'}",
            "--out", out, "--slices", "2")
    run = run_cli_here(*args)
    assert run.returncode == 0, run.stdout + run.stderr
    assert cv2.imread(str(out / "test_overlays.png")).shape[0] == 2 * 256 + 2
    assert_user_error(run_cli_here(*args), "folder exists and is not empty", "--force")
    assert run_cli_here(*args, "--force").returncode == 0
    # A missing artifact folder stops it before anything is written.
    failed = run_cli_here("search", "report", "--study", "report-check", "--storage", f"sqlite:///{run_dir / 'study.db'}",
                     "--out", tmp_path / "none", "--artifacts", tmp_path / "nowhere")
    assert_user_error(failed, "artifact folder not found")
    assert not (tmp_path / "none").exists()


def _synthetic(directions: list[str], completed: int) -> optuna.Study:
    study = optuna.create_study(directions=directions)
    for i in range(completed):
        trial = study.ask()
        x = trial.suggest_int("base_filters", 4, 32, step=4)
        trial.suggest_categorical("optimizer", ["Adam", "SGD"])
        values = [x / 40 + 0.01 * i] + ([1000.0 * x - i] if len(directions) == 2 else [])
        study.tell(trial, values if len(values) > 1 else values[0])
    return study


def test_too_few_trials_give_a_sentence_instead_of_a_plot() -> None:
    page = report._Page()
    one = _synthetic(["maximize"], 1)
    assert "too few to say" in report._importances(one, page)
    assert "Too few completed trials" in report._parallel(one, page)
    assert "No trial has completed yet" in report._history(_synthetic(["maximize"], 0), page)
    assert not page.figures


def test_two_objectives_draw_a_pareto_front() -> None:
    page = report._Page()
    study = _synthetic(["maximize", "minimize"], 6)
    for section in (report._history, report._importances, report._parallel, report._pareto):
        assert "data:image/png;base64," in section(study, page), section.__name__
    assert set(page.figures) == {"history.png", "importances.png", "parallel_coordinate.png", "pareto_front.png"}
    assert "nearer the Pareto front" in report._parallel(study, page)


def test_pick_slices_prefers_foreground_and_keeps_one_negative() -> None:
    masks = np.zeros((6, 8, 8), np.uint8)
    for i, pixels in enumerate((0, 5, 0, 9, 1, 3)):
        masks[i].flat[:pixels] = 1
    assert report.pick_slices(masks, 4) == [0, 1, 3, 5]  # the three largest lesions and one negative
    assert report.pick_slices(masks[[1, 3, 4, 5]], 2) == [0, 1]
    assert report.pick_slices(masks, 100) == [0, 1, 3, 4, 5]  # every lesion, one negative

"""Security: no code execution from user input, safe model loading, masked passwords."""

from __future__ import annotations

import ast
import json
import time
from pathlib import Path

import keras
import numpy as np
import optuna
import pytest

from conftest import ROOT, assert_user_error, run_cli, run_cli_here, start_cli, tiny_study

SOURCES = sorted((ROOT / "flexunet").rglob("*.py")) + sorted((ROOT / "search").rglob("*.py"))
FORBIDDEN_CALLS = {"eval", "exec", "compile", "__import__"}
FORBIDDEN_MODULES = {"pickle", "cPickle", "dill", "marshal", "shelve", "cloudpickle", "joblib"}


def test_no_eval_exec_or_pickle_in_the_code() -> None:
    found = []
    for path in SOURCES:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in FORBIDDEN_CALLS:
                found.append(f"{path.name}:{node.lineno} {node.func.id}()")
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                found += [f"{path.name}:{node.lineno} import {n}" for n in names if n and n.split(".")[0]
                          in FORBIDDEN_MODULES]
            if isinstance(node, ast.keyword) and node.arg in ("allow_pickle", "safe_mode"):
                if isinstance(node.value, ast.Constant) and node.value.value is not (node.arg == "safe_mode"):
                    found.append(f"{path.name}:{node.lineno} {node.arg}={node.value.value}")
    assert not found, found


def test_a_model_with_code_in_it_is_refused(tmp_path: Path) -> None:
    """A .keras file can carry a Lambda layer (Python bytecode); safe mode refuses to run it."""
    inputs = keras.Input((32, 32, 1))
    outputs = keras.layers.Lambda(lambda x: x * 0.0 + 1.0)(keras.layers.Conv2D(2, 1)(inputs))
    path = tmp_path / "lambda.keras"
    keras.Model(inputs, outputs).save(path)
    images = tmp_path / "images"
    images.mkdir()
    import cv2

    cv2.imwrite(str(images / "a.png"), np.zeros((32, 32), np.uint8))
    run = run_cli("infer", "--model", path, "--images", images, "--out", tmp_path / "out")
    assert_user_error(run, str(path), "not a loadable .keras model")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.db
def test_database_passwords_never_show(tmp_path: Path, postgres_url: str) -> None:
    """With a password in the storage URL (the test server trusts anyone, so any password
    works), nothing the project prints or stores shows it: not the launcher's or the workers'
    output, not the workers' command lines, not status, user attrs, the dashboard note, the
    report or the exported model card."""
    secret = "s3cr3t-Pa55"
    url = postgres_url.replace("postgres@", f"postgres:{secret}@")
    assert secret in url
    study_file = tiny_study(tmp_path / "study.toml", "secret", n_trials=2, max_epochs=1)
    log = tmp_path / "run.log"
    launcher = start_cli("search", "run", study_file, "--storage", url, "--workers", "2", "--out", tmp_path / "run",
                         log=log)
    command_lines = []
    import psutil

    end = time.time() + 300
    while launcher.poll() is None and time.time() < end:
        for child in psutil.Process(launcher.pid).children(recursive=True):
            try:
                command_lines.append(" ".join(child.cmdline()))
            except psutil.Error:
                pass
        time.sleep(1)
    assert launcher.wait(timeout=300) == 0, log.read_text()
    assert command_lines and not [c for c in command_lines if secret in c]

    status = run_cli_here("search", "status", "--study", "secret", "--storage", url)
    export = run_cli_here("search", "export", "--study", "secret", "--storage", url, "--out", tmp_path / "export",
                          "--artifacts", tmp_path / "run" / "artifacts", "--data", tmp_path / "run" / "data" /
                          "train_eval_infer.config")
    report = run_cli_here("search", "report", "--study", "secret", "--storage", url, "--out", tmp_path / "report",
                          "--artifacts", tmp_path / "run" / "artifacts", "--data", tmp_path / "run" / "data" /
                          "train_eval_infer.config")
    for run in (status, export, report):
        assert run.returncode == 0, run.stdout + run.stderr
    assert "***" in status.stdout

    from search.store import storage as st

    study = optuna.load_study(study_name="secret", storage=st.open_storage(url, heartbeat=False))
    system = study._storage.get_study_system_attrs(study._study_id)  # where the dashboard keeps its note
    stored = json.dumps([study.user_attrs, system] + [[t.user_attrs, t.system_attrs] for t in study.trials],
                        default=str)
    texts = {"launcher": log.read_text(), "status": status.stdout + status.stderr,
             "export": export.stdout + export.stderr, "report": report.stdout + report.stderr, "stored": stored}
    for folder in (tmp_path / "run" / "logs", tmp_path / "export", tmp_path / "report"):
        for path in folder.rglob("*"):
            if path.is_file() and path.suffix in (".log", ".md", ".json", ".config", ".csv", ".html"):
                texts[str(path.relative_to(tmp_path))] = path.read_text(errors="replace")
    assert any("note" in key for key in system)  # the dashboard note was written, and is checked
    leaks = [name for name, text in texts.items() if secret in text]
    assert not leaks, leaks

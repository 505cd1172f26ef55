"""Shared fixtures: the bundled CT-ICH sample, prepared once per session at 64 px, tiny
configs, and a helper that runs the real ``flexunet`` command in a subprocess."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "studies" / "data" / "ct-ich"
SEED_CONFIG = ROOT / "tests" / "data" / "seed_ich.config"

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str


def run_cli(*args: str | Path, cwd: Path | None = None, timeout: float = 600,
            env: dict[str, str] | None = None) -> Run:
    """Run ``flexunet ARGS`` as a user would, in a fresh interpreter."""
    command = [sys.executable, "-m", "flexunet.cli", *map(str, args)]
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    return Run(done.returncode, done.stdout, done.stderr)


def assert_user_error(run: Run, *fragments: str) -> str:
    """Exit code 2, one ``flexunet: error:`` line naming every fragment, no traceback."""
    assert run.returncode == 2, (run.returncode, run.stdout, run.stderr)
    assert "Traceback" not in run.stderr, run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("flexunet: error:")]
    assert len(errors) == 1, run.stderr
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


def set_keys(config_path: Path, **values: str) -> None:
    """Rewrite ``key = value`` lines of a seed-format config in place."""
    text = config_path.read_text(encoding="utf-8")
    for key, value in values.items():
        text, n = re.subn(rf"(?m)^{key}\s*=.*$", f"{key} = {value}", text)
        assert n, f"{key} not in {config_path}"
    config_path.write_text(text, encoding="utf-8")


@pytest.fixture(scope="session")
def sample() -> Path:
    return SAMPLE


@pytest.fixture(scope="session")
def prepared64(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled sample prepared at 64x64 with the default patient split (read-only)."""
    from flexunet.data import ct_ich

    out = tmp_path_factory.mktemp("prepared") / "ct-ich-64"
    ct_ich.prepare(SAMPLE, out, size=64, seed=0)
    return out


@pytest.fixture
def tiny_config(prepared64: Path, tmp_path: Path) -> Path:
    """A copy of the prepared data's config: 64 px, base 8, 4 levels, 2 epochs, outputs in tmp."""
    work = tmp_path / "work"
    shutil.copytree(prepared64, work)
    config = work / "train_eval_infer.config"
    set_keys(config, base_filters="8", epochs="2", batch_size="8")
    return config

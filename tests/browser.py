"""Headless Chromium for the dashboard and report tests: the DOM a page builds, and its
screenshot. Where Chromium is missing the tests skip, unless ``FLEXUNET_REQUIRE_SERVICES`` is set
(CI), where they fail."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import cv2
import numpy as np
import pytest

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium() -> str:
    """The Chromium executable; skips (or fails in CI) where there is none."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.environ.get("FLEXUNET_REQUIRE_SERVICES"):
        pytest.fail("chromium is not installed (FLEXUNET_REQUIRE_SERVICES is set): apt-get install -y chromium")
    pytest.skip("chromium is not installed")


def _run(url: str, *extra: str, budget_ms: int = 15000, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        return subprocess.run([chromium(), *FLAGS, f"--user-data-dir={profile}",
                               f"--virtual-time-budget={budget_ms}", *extra, url],
                              capture_output=True, text=True, timeout=timeout)


def dump_dom(url: str) -> str:
    """The page's DOM after its scripts ran (up to 15 s of virtual time)."""
    done = _run(url, "--dump-dom")
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def screenshot(url: str, path: Path, width: int = 1400, height: int = 1000) -> np.ndarray:
    """Save a screenshot of ``url`` to ``path``; returns it decoded, after checking that it is a
    real picture (a PNG of the window's size that is not one flat colour)."""
    done = _run(url, f"--screenshot={path}", f"--window-size={width},{height}")
    assert done.returncode == 0 and path.is_file(), done.stderr[-2000:]
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 10_000, path.stat().st_size
    picture = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert picture is not None and picture.shape[:2] == (height, width), None if picture is None else picture.shape
    assert float(picture.std()) > 10, "the screenshot is one flat colour"
    return picture

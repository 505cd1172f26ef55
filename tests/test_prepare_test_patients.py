"""``prepare --test-patients``: the test part is the patients given (an outer fold of nested
cross-validation, as bench/quality.py uses it); the others are split into train and valid."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_cli
from flexunet.config import load
from flexunet.data import ct_ich
from flexunet.data.split import PatientInfo, cv_folds, split_holding_out
from flexunet.errors import DataError


def _patients_of(root: Path, part: str) -> set[str]:
    return {p.stem.split("_")[0] for p in (root / part / "images").glob("*.png")}


def test_the_given_patients_are_the_test_part_and_no_one_else(tmp_path: Path, sample: Path) -> None:
    # 080 has slices in both the JPG and the HU part: all of them must land in test.
    out = tmp_path / "outer"
    run = run_cli("prepare", "ct-ich", sample, out, "--size", "32", "--test-patients", "80,49")
    assert run.returncode == 0, run.stderr
    split = json.loads((out / "split.json").read_text())
    assert split["test_patients_given"] is True
    assert split["parts"]["test"] == ["049", "080"]
    assert _patients_of(out, "test") == {"049", "080"}
    rest = _patients_of(out, "train") | _patients_of(out, "valid")
    assert len(rest) == 15 and not rest & {"049", "080"} and not _patients_of(out, "train") & _patients_of(out, "valid")
    # 080: 8 JPG slices + its HU slices; 049: its HU slices. Every slice of theirs is a test slice.
    slices = [line.split(",") for line in (out / "slices.csv").read_text().splitlines()[1:]]
    assert {row[-1] for row in slices if row[1] in ("049", "080")} == {"test"}
    assert split["slices"]["all"]["test"] == sum(1 for row in slices if row[1] in ("049", "080")) > 8
    config = load(out / "train_eval_infer.config")
    assert config.test.images_dir == (out / "test" / "images").resolve()


def test_outer_folds_cover_every_patient_once(tmp_path: Path, sample: Path) -> None:
    """Each cv_folds group held out in turn: the test parts partition the patients."""
    refs = ct_ich.find_slices(sample, ct_ich.PrepareReport())
    info: dict[str, PatientInfo] = {}
    for ref in refs:
        old = info.get(ref.patient, PatientInfo(0, 0))
        info[ref.patient] = PatientInfo(old.slices + 1, old.positive_slices + int(ref.positive))
    groups = cv_folds(info, 3, 0)
    tests = [split_holding_out(info, group, (0.7, 0.15, 0.15), 0)["test"] for group in groups]
    assert sorted(p for t in tests for p in t) == sorted(info)
    for group in groups:
        parts = split_holding_out(info, group, (0.7, 0.15, 0.15), 0)
        assert parts["train"] and parts["valid"]
        # train:valid follows 0.7:0.15 of the rest's slices, to within one patient.
        rest = sum(info[p].slices for p in parts["train"] + parts["valid"])
        valid = sum(info[p].slices for p in parts["valid"])
        assert abs(valid - rest * 0.15 / 0.85) <= max(info[p].slices for p in parts["valid"])


def test_unknown_or_conflicting_test_patients_are_refused(tmp_path: Path, sample: Path) -> None:
    # (In-process: the command line turns a DataError into one error line, see test_prepare.py.)
    with pytest.raises(DataError, match="test patients 999: not in the dataset"):
        ct_ich.prepare(sample, tmp_path / "x", size=32, test_patients=["049", "999"])
    assert not (tmp_path / "x").exists()
    with pytest.raises(DataError, match="--folds or --test-patients"):
        ct_ich.prepare(sample, tmp_path / "y", size=32, folds=3, test_patients=["049"])
    with pytest.raises(DataError, match="empty"):
        split_holding_out({"a": PatientInfo(1, 1)}, [], (0.7, 0.15, 0.15), 0)

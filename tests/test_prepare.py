from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import cv2
import nibabel as nib
import numpy as np
import pytest

from conftest import assert_user_error, run_cli
from flexunet.config import load
from flexunet.data import ct_ich
from flexunet.errors import DataError


def _stems(root: Path, part: str) -> set[str]:
    return {p.stem for p in (root / part / "images").glob("*.png")}


def test_prepare_accounts_for_every_slice_split_by_patient(tmp_path: Path, sample: Path) -> None:
    out = tmp_path / "prepared"
    run = run_cli("prepare", "ct-ich", sample, out, "--size", "64")
    assert run.returncode == 0, run.stderr
    assert "slices written: 46" in run.stdout and "hu 25, jpg 21" in run.stdout
    split = json.loads((out / "split.json").read_text())
    parts = {part: _stems(out, part) for part in ("train", "valid", "test")}
    assert sum(len(s) for s in parts.values()) == 46
    for part, stems in parts.items():
        assert stems == {p.stem for p in (out / part / "masks").glob("*.png")}
        patients = {s.split("_")[0] for s in stems}
        assert patients == set(split["parts"][part]) and stems, part
    # No patient in two parts, across the JPG and HU forms (077 and 080 are in both).
    everyone = [p for part in split["parts"].values() for p in part]
    assert len(everyone) == len(set(everyone)) == 17
    assert split["slices"]["all"] == {k: len(v) for k, v in parts.items()}
    image = cv2.imread(str(next((out / "train" / "images").glob("*.png"))), cv2.IMREAD_UNCHANGED)
    mask = cv2.imread(str(next((out / "train" / "masks").glob("*.png"))), cv2.IMREAD_UNCHANGED)
    assert image.shape == (64, 64) and mask.shape == (64, 64)
    assert set(np.unique(mask)) <= {0, 255}
    rows = list(csv.DictReader((out / "slices.csv").open()))
    assert len(rows) == 46 and all(int(r["foreground_pixels"]) > 0 for r in rows)
    # The written config trains on what was written.
    config = load(out / "train_eval_infer.config")
    assert config.train.images_dir == (out / "train" / "images").resolve()
    assert config.model.image_width == 64 and config.model.num_layers == 4


def test_same_seed_same_split_other_seed_other_split(tmp_path: Path, sample: Path) -> None:
    a = ct_ich.prepare(sample, tmp_path / "a", size=32, seed=3)
    ct_ich.prepare(sample, tmp_path / "b", size=32, seed=3)
    ct_ich.prepare(sample, tmp_path / "c", size=32, seed=4)
    parts = [json.loads((tmp_path / x / "split.json").read_text())["parts"] for x in "abc"]
    assert parts[0] == parts[1] != parts[2]
    assert all(a.positive[p] > 0 for p in ("train", "valid", "test"))


def test_folds_rotate_test_patients(tmp_path: Path, sample: Path) -> None:
    out = tmp_path / "folds"
    ct_ich.prepare(sample, out, size=32, folds=5, seed=0)
    split = json.loads((out / "split.json").read_text())
    tested = [p for fold in split["folds"] for p in fold["test"]]
    assert sorted(tested) == sorted(set(tested)) and len(tested) == 17
    for k, fold in enumerate(split["folds"]):
        assert not set(fold["train"]) & set(fold["test"]) and not set(fold["valid"]) & set(fold["test"])
        assert (out / f"fold_{k}" / "train_eval_infer.config").is_file()
        assert {s.split("_")[0] for s in _stems(out / f"fold_{k}", "test")} == set(fold["test"])


def _nifti_release(tmp_path: Path, sample: Path) -> Path:
    """A NIfTI-release folder built from the sample's HU slices (two slices per patient)."""
    src = tmp_path / "nifti"
    (src / "ct_scans").mkdir(parents=True)
    (src / "masks").mkdir()
    for patient in ("071", "094"):
        slices = sorted((sample / "hu_slices" / patient / "ct_hu").glob("*.npy"))[:2]
        hu = np.stack([np.load(s) for s in slices], axis=-1)
        labels = np.stack([(cv2.imread(str(sample / "hu_slices" / patient / "masks" / f"{s.stem}.png"), 0) > 0)
                           .astype(np.uint8) for s in slices], axis=-1)
        empty = np.full(hu.shape[:2] + (1,), -1000, np.int16)  # an air slice: hemorrhage-free
        nib.save(nib.Nifti1Image(np.concatenate([hu, empty], -1), np.eye(4)), src / "ct_scans" / f"{int(patient)}.nii")
        nib.save(nib.Nifti1Image(np.concatenate([labels, empty * 0], -1).astype(np.uint8), np.eye(4)),
                 src / "masks" / f"{int(patient)}.nii")
    return src


def test_nifti_release_matches_the_hu_form(tmp_path: Path, sample: Path) -> None:
    src = _nifti_release(tmp_path, sample)
    report = ct_ich.PrepareReport()
    refs = {r.name: r for r in ct_ich.find_slices(src, report)}
    assert len(refs) == 6 and sum(r.positive for r in refs.values()) == 4
    hu_refs = {r.name: r for r in ct_ich.find_slices(sample, ct_ich.PrepareReport()) if r.source == "hu"}
    # Volume slice z+1 of patient 071 is the sample's first 071 HU slice: same windowing, same view.
    first = sorted((sample / "hu_slices" / "071" / "ct_hu").glob("*.npy"))[0].stem
    image, mask = refs["071_nii1"].load()
    expected_image, expected_mask = hu_refs[f"071_nii{first}"].load()
    np.testing.assert_array_equal(image, expected_image)
    np.testing.assert_array_equal(mask, expected_mask)
    with pytest.raises(DataError, match="3 patients have foreground|parts each need one"):
        ct_ich.prepare(src, tmp_path / "out", size=32)


def test_unlisted_slices_and_orphan_masks_are_reported(tmp_path: Path, sample: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(sample, src)
    brain = src / "Patients_CT" / "078" / "brain"
    (brain / "11.jpg").unlink()  # its mask is now an orphan
    shutil.copy(brain / "12.jpg", brain / "99.jpg")  # on disk, not in the CSV
    out = tmp_path / "out"
    run = run_cli("prepare", "ct-ich", src, out, "--size", "32")
    assert run.returncode == 0, run.stderr
    assert "masks without their image (skipped): 1" in run.stdout
    assert "images on disk that the CSV does not list (skipped): 1" in run.stdout
    assert "slices written: 45" in run.stdout
    assert not list(out.glob("*/images/078_11.png")) and not list(out.glob("*/images/078_99.png"))


def test_a_listed_slice_without_mask_is_hemorrhage_free(tmp_path: Path, sample: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(sample, src)
    (src / "Patients_CT" / "080" / "brain" / "15_HGE_Seg.jpg").unlink()
    report = ct_ich.PrepareReport()
    refs = {r.name: r for r in ct_ich.find_slices(src, report)}
    assert not refs["080_15"].positive and not refs["080_15"].load()[1].any()
    assert report.listed_positive_without_mask == 1


def test_corrupt_jpeg_fails_cleanly_without_output(tmp_path: Path, sample: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(sample, src)
    bad = src / "Patients_CT" / "078" / "brain" / "13.jpg"
    bad.write_bytes(bad.read_bytes()[:2000])
    out = tmp_path / "out"
    run = run_cli("prepare", "ct-ich", src, out, "--size", "32")
    assert_user_error(run, str(bad), "JPEG")
    assert not out.exists() and not [p for p in tmp_path.iterdir() if "partial" in p.name]


def test_existing_output_is_not_overwritten(tmp_path: Path, sample: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    assert_user_error(run_cli("prepare", "ct-ich", sample, out), "not empty")
    assert (out / "precious.txt").read_text() == "keep me"


def test_manifest_path_traversal_is_refused(tmp_path: Path, sample: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(sample / "hu_slices", src / "hu_slices")
    manifest = src / "hu_slices" / "manifest.csv"
    manifest.write_text(manifest.read_text().replace("049/ct_hu/21.npy", "../../../etc/passwd"))
    with pytest.raises(DataError, match="leaves hu_slices"):
        ct_ich.find_slices(src, ct_ich.PrepareReport())


def test_window_is_brain_window() -> None:
    hu = np.array([-1000, 0, 40, 80, 2000], dtype=np.int16)
    np.testing.assert_array_equal(ct_ich.window(hu), [0, 0, 128, 255, 255])


def test_the_bundled_sample_reads_as_a_partial_copy_with_no_error_like_counts(tmp_path: Path, sample: Path) -> None:
    run = run_cli("prepare", "ct-ich", sample, tmp_path / "out", "--size", "32")
    assert run.returncode == 0, run.stderr
    assert ("reading a partial copy of CT-ICH: Patients_CT holds 4 of the 82 patients of "
            "hemorrhage_diagnosis.csv, with 21 of their 117 listed slices") in run.stdout
    assert "missing" not in run.stdout and "no folder" not in run.stdout
    assert "grey edge pixels (compression blur) thresholded at 127" in run.stdout


def test_a_complete_download_still_reports_a_missing_slice(tmp_path: Path, sample: Path) -> None:
    # A download that is complete for its patients (the CSV lists just those on disk), less one file.
    src = tmp_path / "ct-ich"
    shutil.copytree(sample / "Patients_CT", src / "Patients_CT")
    with (sample / "hemorrhage_diagnosis.csv").open(encoding="utf-8-sig") as handle:
        rows = list(csv.DictReader(handle))
    on_disk = {int(d.name) for d in (src / "Patients_CT").iterdir()}
    kept = [r for r in rows if int(r["PatientNumber"]) in on_disk
            and (src / "Patients_CT" / f"{int(r['PatientNumber']):03d}" / "brain" / f"{r['SliceNumber']}.jpg").exists()]
    with (src / "hemorrhage_diagnosis.csv").open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(kept)
    complete = ct_ich.prepare(src, tmp_path / "complete", size=32)
    assert not complete.partial and not any("missing" in line for line in complete.lines())
    victim = next(p for p in sorted((src / "Patients_CT").glob("*/brain/*.jpg")) if "_HGE_Seg" not in p.name)
    victim.unlink()
    report = ct_ich.prepare(src, tmp_path / "less_one", size=32)
    assert "listed in the CSV but missing on disk: 1" in report.lines()
    assert not any("partial copy" in line for line in report.lines())

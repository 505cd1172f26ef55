"""Hostile input: every kind of file flexunet reads, broken every way that applies (corrupt,
empty, missing, the wrong type, the wrong size, the wrong encoding, unknown colours, duplicate
stems, paths that leave their folder), through the command line.

Each case must end with exit status 2, one ``flexunet: error:`` line naming the culprit, no
traceback, and no output (not even a half-written one). The cases run the command line's own
entry point in the test's interpreter (``run_cli_here``: what a command prints, writes and
returns; ~0.5 s less per case than a fresh interpreter, over a hundred cases). One case of
each command also runs as a process of its own, for the exit status and the output that a shell
sees: ``test_each_command_exits_2_in_a_process_of_its_own`` (prepare, summary, search run) and
the two tests after it (search status, train).
"""

from __future__ import annotations

import io
import pickle
import shutil
import zlib
from collections.abc import Callable
from pathlib import Path

import cv2
import nibabel as nib
import numpy as np
import pytest

from conftest import ROOT, Run, assert_user_error, run_cli, run_cli_here
from flexunet.errors import ConfigError
from search.spec import study_file

SIDE = 16  # synthetic CT slices: tiny, so that a prepare run takes a second
GARBAGE = bytes(range(7, 37))  # 30 bytes that are no known file format


# --- helpers ---------------------------------------------------------------------------------


def _write_image(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), array)
    return path


def _blob(side: int = SIDE) -> np.ndarray:
    """A 0/255 mask with a square of foreground."""
    mask = np.zeros((side, side), np.uint8)
    mask[4:9, 5:11] = 255
    return mask


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def _assert_no_output(out: Path) -> None:
    """Neither the output folder nor a staging folder beside it was left behind."""
    assert not out.exists(), sorted(p.name for p in out.rglob("*"))
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    assert not leftovers, leftovers


def _set(path: Path, key: str, value: str) -> None:
    """Replace the value of ``key`` (the line ``key = ...``) in a config, backslashes kept."""
    lines = path.read_text(encoding="utf-8").splitlines()
    hits = [i for i, line in enumerate(lines) if line.split("=")[0].strip() == key]
    assert len(hits) == 1, key
    lines[hits[0]] = f"{key} = {value}"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _utf16(path: Path, *, bom: bool = True) -> None:
    text = path.read_text(encoding="utf-8-sig")
    path.write_bytes(text.encode("utf-16" if bom else "utf-16-le"))


def _latin1(path: Path) -> None:
    """The file in Latin-1 with one non-ASCII character (a comment or a name with an accent)."""
    text = path.read_text(encoding="utf-8-sig").replace("\n", "\n# Hôpital\n", 1)
    path.write_bytes(text.encode("latin-1"))


class _Payload:
    """A pickled object that would leave a marker file if it were ever unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[[Path], None], tuple[Path]]:
        return (Path.touch, (self.marker,))


# --- CT-ICH sources, tiny and synthetic (4 patients, each with hemorrhage) ------------------

PATIENTS = ("1", "2", "3", "4")


def _hu_source(root: Path) -> Path:
    """The sample's ``hu_slices`` form: int16 HU ``.npy`` slices, PNG masks, a manifest."""
    src = root / "hu-src"
    lines = ["patient_id,slice_nifti,ct,mask"]
    for patient in PATIENTS:
        pid = f"{int(patient):03d}"
        hu = np.full((SIDE, SIDE), 30, np.int16)
        hu[_blob() > 0] = 70
        (src / "hu_slices" / pid / "ct_hu").mkdir(parents=True)
        np.save(src / "hu_slices" / pid / "ct_hu" / "11.npy", hu)
        _write_image(src / "hu_slices" / pid / "masks" / "11.png", _blob())
        lines.append(f"{pid},11,{pid}/ct_hu/11.npy,{pid}/masks/11.png")
    (src / "hu_slices" / "manifest.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return src


def _jpg_source(root: Path) -> Path:
    """The JPG release: ``Patients_CT/<pid>/brain/<n>.jpg``, ``<n>_HGE_Seg.jpg``, the CSV."""
    src = root / "jpg-src"
    rows = ["PatientNumber,SliceNumber,Intraventricular,Intraparenchymal,Subarachnoid,Epidural,Subdural,"
            "No_Hemorrhage,Fracture_Yes_No"]
    for patient in PATIENTS:
        brain = src / "Patients_CT" / f"{int(patient):03d}" / "brain"
        for number in (1, 2):
            image = np.full((SIDE, SIDE), 60, np.uint8)
            _write_image(brain / f"{number}.jpg", image)
            if number == 1:
                _write_image(brain / f"{number}_HGE_Seg.jpg", _blob())
            rows.append(f"{patient},{number},0,1,0,0,0,{0 if number == 1 else 1},0")
    (src / "hemorrhage_diagnosis.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return src


def _nifti_source(root: Path) -> Path:
    """The NIfTI release: ``ct_scans/<n>.nii`` in HU and ``masks/<n>.nii``."""
    src = root / "nifti-src"
    (src / "ct_scans").mkdir(parents=True)
    (src / "masks").mkdir()
    for patient in PATIENTS:
        labels = np.stack([_blob() > 0, np.zeros((SIDE, SIDE), bool)], axis=-1).astype(np.uint8)
        scan = np.where(labels > 0, 70, 30).astype(np.int16)
        nib.save(nib.Nifti1Image(scan, np.eye(4)), src / "ct_scans" / f"{patient}.nii")
        nib.save(nib.Nifti1Image(labels, np.eye(4)), src / "masks" / f"{patient}.nii")
    return src


SOURCES: dict[str, Callable[[Path], Path]] = {"hu": _hu_source, "jpg": _jpg_source, "nifti": _nifti_source}


def _prepare(src: Path, out: Path) -> Run:
    return run_cli_here("prepare", "ct-ich", src, out, "--size", "16")


@pytest.mark.parametrize("form", sorted(SOURCES))
def test_the_synthetic_sources_prepare_cleanly(tmp_path: Path, form: str) -> None:
    """The sources the cases below break are valid to begin with (int16 HU slices included)."""
    out = tmp_path / "out"
    run = _prepare(SOURCES[form](tmp_path), out)
    assert run.returncode == 0, run.stderr
    assert "slices written" in run.stdout and (out / "train_eval_infer.config").is_file()


# --- hu_slices: manifest.csv, .npy slices, PNG masks ----------------------------------------


def _manifest(src: Path) -> Path:
    return src / "hu_slices" / "manifest.csv"


def _npy(src: Path) -> Path:
    return src / "hu_slices" / "002" / "ct_hu" / "11.npy"


def _hu_mask(src: Path) -> Path:
    return src / "hu_slices" / "002" / "masks" / "11.png"


def _rewrite_manifest(src: Path, old: str, new: str) -> None:
    manifest = _manifest(src)
    text = manifest.read_text(encoding="utf-8")
    assert old in text
    manifest.write_text(text.replace(old, new, 1), encoding="utf-8")


def _npz_named_npy(src: Path) -> None:
    with _npy(src).open("wb") as handle:
        np.savez(handle, hu=np.zeros((SIDE, SIDE), np.int16))


def _npy_lying_header(src: Path) -> None:
    # The header claims 200000 x 200000 int16 (75 GiB); the file holds 100 bytes.
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<i2", "fortran_order": False,
                                                  "shape": (200_000, 200_000)})
    _npy(src).write_bytes(header.getvalue() + b"\0" * 100)


def _npy_symlink_out(src: Path) -> None:
    outside = src.parent / "outside.npy"
    np.save(outside, np.zeros((SIDE, SIDE), np.int16))
    _npy(src).unlink()
    _npy(src).symlink_to(outside)


def _npy_symlink_loop(src: Path) -> None:
    _npy(src).unlink()
    _npy(src).symlink_to(_npy(src))


HU_FAULTS: dict[str, tuple[Callable[[Path], object], tuple[str, ...]]] = {
    # manifest.csv
    "manifest empty": (lambda s: _manifest(s).write_bytes(b""), ("manifest.csv", "missing column 'patient_id'")),
    "manifest utf-16": (lambda s: _utf16(_manifest(s)), ("manifest.csv", "not UTF-8")),
    "manifest utf-16 without BOM": (lambda s: _utf16(_manifest(s), bom=False), ("manifest.csv", "not UTF-8")),
    "manifest latin-1": (lambda s: _latin1(_manifest(s)), ("manifest.csv", "not UTF-8")),
    "manifest not CSV": (lambda s: _rewrite_manifest(s, "001,11", '"' + "x" * 200_000 + '",11'),
                         ("manifest.csv", "line 2", "not valid CSV")),
    "manifest non-integer patient": (lambda s: _rewrite_manifest(s, "003,11,", "\u00b2,11,"),
                                     ("manifest.csv", "line 4", "must be integers")),
    "manifest path with ../": (lambda s: _rewrite_manifest(s, "002/ct_hu/11.npy", "../../../etc/passwd"),
                               ("manifest.csv", "line 3", "'../../../etc/passwd' leaves hu_slices/")),
    "manifest absolute path": (lambda s: _rewrite_manifest(s, "002/masks/11.png", "/etc/hostname"),
                               ("manifest.csv", "line 3", "'/etc/hostname' leaves hu_slices/")),
    "manifest empty path": (lambda s: _rewrite_manifest(s, "002/masks/11.png", ""),
                            ("manifest.csv", "line 3", "'' is not a file path")),
    "symlink out of hu_slices": (_npy_symlink_out, ("manifest.csv", "line 3", "leaves hu_slices/")),
    "symlink loop": (_npy_symlink_loop, ("manifest.csv", "line 3", "cannot resolve")),
    "slice is a folder": (lambda s: (_npy(s).unlink(), _npy(s).mkdir()),
                          ("manifest.csv", "line 3", "11.npy is a folder")),
    # .npy slices
    "npy corrupt": (lambda s: _npy(s).write_bytes(b"\x93NUMPY garbage " * 8), ("11.npy", "not a readable .npy")),
    "npy empty": (lambda s: _npy(s).write_bytes(b""), ("11.npy", "not a readable .npy")),
    "npy text": (lambda s: _npy(s).write_text("-1000, 40, 80\n"), ("11.npy", "not a readable .npy")),
    "npy truncated": (lambda s: _npy(s).write_bytes(_npy(s).read_bytes()[:200]), ("11.npy", "not a readable .npy")),
    "npy header lies about the shape": (_npy_lying_header, ("11.npy", "not a readable .npy")),
    "npy 3-D": (lambda s: np.save(_npy(s), np.zeros((SIDE, SIDE, 2), np.int16)), ("11.npy", "expected a 2-D array")),
    "npy empty array": (lambda s: np.save(_npy(s), np.zeros((0, SIDE), np.int16)), ("11.npy", "expected a 2-D array")),
    "npy booleans": (lambda s: np.save(_npy(s), np.ones((SIDE, SIDE), bool)), ("11.npy", "expected a 2-D array")),
    "npy complex": (lambda s: np.save(_npy(s), np.ones((SIDE, SIDE), complex)), ("11.npy", "expected a 2-D array")),
    "npy NaN": (lambda s: np.save(_npy(s), np.full((SIDE, SIDE), np.nan, np.float32)), ("11.npy", "NaN")),
    "npz named .npy": (_npz_named_npy, ("11.npy", "an .npz archive")),
    # PNG masks
    "mask text file": (lambda s: _hu_mask(s).write_text("not a png"), ("masks/11.png", "not a readable image")),
    "mask empty": (lambda s: _hu_mask(s).write_bytes(b""), ("masks/11.png", "empty file")),
    "mask other size": (lambda s: _write_image(_hu_mask(s), _blob(SIDE * 2)), ("masks/11.png", "mask is (32, 32)")),
    "mask unknown colour": (lambda s: _write_image(_hu_mask(s), np.where(_blob() > 0, 77, 0).astype(np.uint8)),
                            ("masks/11.png", "colour (77, 77, 77)", "rgb_map")),
    "mask decompression bomb": (lambda s: _hu_mask(s).write_bytes(_png_header_only(60_000, 60_000)),
                                ("masks/11.png", "not a readable image")),
}


@pytest.mark.parametrize("fault", sorted(HU_FAULTS))
def test_hu_slices_faults(tmp_path: Path, fault: str) -> None:
    src = _hu_source(tmp_path)
    damage, culprit = HU_FAULTS[fault]
    damage(src)
    out = tmp_path / "out"
    assert_user_error(_prepare(src, out), *culprit)
    _assert_no_output(out)


def test_a_pickled_npy_is_refused_unread(tmp_path: Path) -> None:
    """np.load keeps allow_pickle=False: a pickled object array is refused, never unpickled."""
    src = _hu_source(tmp_path)
    marker = tmp_path / "unpickled"
    _npy(src).write_bytes(b"")
    np.save(_npy(src), np.array([_Payload(marker)], dtype=object), allow_pickle=True)
    out = tmp_path / "out"
    assert_user_error(_prepare(src, out), "11.npy", "not a readable .npy", "Python objects")
    _assert_no_output(out)
    # A plain pickle under a .npy name as well.
    _npy(src).write_bytes(pickle.dumps(_Payload(marker)))
    assert_user_error(_prepare(src, out), "11.npy", "not a readable .npy")
    assert not marker.exists()


# --- the JPG release: hemorrhage_diagnosis.csv, JPEG slices and masks ------------------------


def _csv(src: Path) -> Path:
    return src / "hemorrhage_diagnosis.csv"


def _brain(src: Path, patient: str = "002") -> Path:
    return src / "Patients_CT" / patient / "brain"


def _rewrite_csv(src: Path, old: str, new: str) -> None:
    text = _csv(src).read_text(encoding="utf-8")
    assert old in text
    _csv(src).write_text(text.replace(old, new, 1), encoding="utf-8")


JPG_FAULTS: dict[str, tuple[Callable[[Path], object], tuple[str, ...]]] = {
    "csv missing": (lambda s: _csv(s).unlink(), ("hemorrhage_diagnosis.csv", "not found")),
    "csv empty": (lambda s: _csv(s).write_bytes(b""), ("hemorrhage_diagnosis.csv", "missing column 'PatientNumber'")),
    "csv is a folder": (lambda s: (_csv(s).unlink(), _csv(s).mkdir()), ("hemorrhage_diagnosis.csv", "is a folder")),
    "csv utf-16": (lambda s: _utf16(_csv(s)), ("hemorrhage_diagnosis.csv", "not UTF-8")),
    "csv latin-1": (lambda s: _latin1(_csv(s)), ("hemorrhage_diagnosis.csv", "not UTF-8")),
    "csv not CSV": (lambda s: _rewrite_csv(s, "2,1,", '"' + "y" * 200_000 + '",1,'),
                    ("hemorrhage_diagnosis.csv", "not valid CSV")),
    "csv not integers": (lambda s: _rewrite_csv(s, "2,1,", "two,1,"),
                         ("hemorrhage_diagnosis.csv", "line 4", "expected integers")),
    "csv listed twice": (lambda s: _rewrite_csv(s, "2,2,", "2,1,"),
                         ("hemorrhage_diagnosis.csv", "patient 002 slice 1 is listed twice")),
    "image truncated": (lambda s: (_brain(s) / "1.jpg").write_bytes((_brain(s) / "1.jpg").read_bytes()[:150]),
                        ("002/brain/1.jpg", "truncated JPEG")),
    "image empty": (lambda s: (_brain(s) / "1.jpg").write_bytes(b""), ("002/brain/1.jpg", "empty file")),
    "image text file": (lambda s: (_brain(s) / "2.jpg").write_text("hello"), ("002/brain/2.jpg", "JPEG")),
    "image is a folder": (lambda s: ((_brain(s) / "2.jpg").unlink(), (_brain(s) / "2.jpg").mkdir()),
                          ("002/brain/2.jpg", "is a folder")),
    "mask corrupt": (lambda s: (_brain(s) / "1_HGE_Seg.jpg").write_bytes(b"\xff\xd8" + b"\x00" * 64 + b"\xff\xd9"),
                     ("002/brain/1_HGE_Seg.jpg", "not a readable image")),
    "mask other size": (lambda s: _write_image(_brain(s) / "1_HGE_Seg.jpg", _blob(SIDE * 2)),
                        ("002/brain/1_HGE_Seg.jpg", "mask is 32x32", "1.jpg is 16x16")),
    "duplicate slice stems": (lambda s: shutil.copy(_brain(s) / "1.jpg", _brain(s) / "01.jpg"),
                              ("002/brain", "two files for slice 1", "01.jpg", "1.jpg")),
    "duplicate slice suffixes": (lambda s: shutil.copy(_brain(s) / "2.jpg", _brain(s) / "2.jpeg"),
                                 ("002/brain", "two files for slice 2", "2.jpeg", "2.jpg")),
    "duplicate patient folders": (lambda s: shutil.copytree(s / "Patients_CT" / "002", s / "Patients_CT" / "2"),
                                  ("Patients_CT", "two folders for patient 002")),
}


@pytest.mark.parametrize("fault", sorted(JPG_FAULTS))
def test_jpg_release_faults(tmp_path: Path, fault: str) -> None:
    src = _jpg_source(tmp_path)
    damage, culprit = JPG_FAULTS[fault]
    damage(src)
    out = tmp_path / "out"
    assert_user_error(_prepare(src, out), *culprit)
    _assert_no_output(out)


# --- the NIfTI release: ct_scans/*.nii, masks/*.nii ------------------------------------------


def _scan(src: Path, patient: str = "2") -> Path:
    return src / "ct_scans" / f"{patient}.nii"


def _mask_volume(src: Path, patient: str = "2") -> Path:
    return src / "masks" / f"{patient}.nii"


def _save(path: Path, array: np.ndarray) -> None:
    nib.save(nib.Nifti1Image(array, np.eye(4)), path)


def _truncate(path: Path) -> None:
    # The header survives (the shape can be read) but the voxels do not: found only when loaded,
    # while the output folder is being written.
    path.write_bytes(path.read_bytes()[:400])


NIFTI_FAULTS: dict[str, tuple[Callable[[Path], object], tuple[str, ...]]] = {
    "scan corrupt": (lambda s: _scan(s).write_bytes(GARBAGE * 20), ("ct_scans/2.nii", "not a readable NIfTI")),
    "scan empty": (lambda s: _scan(s).write_bytes(b""), ("ct_scans/2.nii", "not a readable NIfTI")),
    "scan text file": (lambda s: _scan(s).write_text("not a volume\n" * 40),
                       ("ct_scans/2.nii", "not a readable NIfTI")),
    "scan is a folder": (lambda s: (_scan(s).unlink(), _scan(s).mkdir()), ("ct_scans/2.nii", "not a readable NIfTI")),
    "scan truncated": (lambda s: _truncate(_scan(s)), ("ct_scans/2.nii", "not a readable NIfTI")),
    "mask truncated": (lambda s: _truncate(_mask_volume(s)), ("masks/2.nii", "not a readable NIfTI")),
    "mask empty": (lambda s: _mask_volume(s).write_bytes(b""), ("masks/2.nii", "not a readable NIfTI")),
    "mask other shape": (lambda s: _save(_mask_volume(s), np.zeros((SIDE, SIDE, 3), np.uint8)),
                         ("masks/2.nii", "mask volume is (16, 16, 3) but 2.nii is (16, 16, 2)")),
    "mask 4-D": (lambda s: _save(_mask_volume(s), np.zeros((SIDE, SIDE, 2, 2), np.uint8)),
                 ("masks/2.nii", "expected a 3-D volume")),
    "mask NaN": (lambda s: _save(_mask_volume(s), np.full((SIDE, SIDE, 2), np.nan, np.float32)),
                 ("masks/2.nii", "NaN")),
    "duplicate volumes": (lambda s: shutil.copy(_scan(s), s / "ct_scans" / "002.nii"),
                          ("ct_scans", "two volumes for patient 002", "002.nii", "2.nii")),
    "duplicate suffixes": (lambda s: shutil.copy(_mask_volume(s), s / "masks" / "2.nii.gz"),
                           ("masks", "two volumes for patient 002", "2.nii.gz", "2.nii")),
}


@pytest.mark.parametrize("fault", sorted(NIFTI_FAULTS))
def test_nifti_release_faults(tmp_path: Path, fault: str) -> None:
    src = _nifti_source(tmp_path)
    damage, culprit = NIFTI_FAULTS[fault]
    damage(src)
    out = tmp_path / "out"
    assert_user_error(_prepare(src, out), *culprit)
    _assert_no_output(out)


# --- folder pairs read by train/evaluate: images and masks -----------------------------------


def _first(folder: Path) -> Path:
    return sorted(folder.glob("*.png"))[0]


def _swap_for_folder(path: Path) -> None:
    path.unlink()
    path.mkdir()


def _damage(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _cyan_mask(root: Path) -> Path:
    """A mask drawn in a colour that the config's rgb_map does not name."""
    blob = _blob(64)
    bgr = np.dstack([blob, blob, np.zeros_like(blob)])  # OpenCV writes BGR: this is RGB (0, 255, 255)
    return _write_image(_first(root / "train" / "masks"), bgr)


def _folder_mask(root: Path) -> Path:
    mask = _first(root / "train" / "masks")
    _swap_for_folder(mask)
    return root / "train" / "images" / mask.name  # the image whose mask is now a folder


def _duplicate_stem(root: Path) -> Path:
    image = _first(root / "train" / "images")
    shutil.copy(image, image.with_suffix(".jpg"))
    return image.parent


PAIR_FAULTS: dict[str, tuple[Callable[[Path], Path], tuple[str, ...]]] = {
    # Each damages the copy of the prepared data under ``root`` and returns the culprit file.
    "image corrupt": (lambda r: _damage(_first(r / "train" / "images"), GARBAGE * 10), ("not a readable image",)),
    "image empty": (lambda r: _damage(_first(r / "valid" / "images"), b""), ("empty file",)),
    "image decompression bomb": (lambda r: _damage(_first(r / "train" / "images"), _png_header_only(60_000, 60_000)),
                                 ("not a readable image",)),
    "mask text file": (lambda r: _damage(_first(r / "train" / "masks"), b"this is text, not an image"),
                       ("not a readable image",)),
    "mask other size": (lambda r: _write_image(_first(r / "valid" / "masks"), _blob(32)),
                        ("mask is 32x32 but its image",)),
    "mask unknown colour": (_cyan_mask, ("colour (0, 255, 255)", "rgb_map")),
    "mask is a folder": (_folder_mask, ("no mask",)),
    "duplicate stems": (_duplicate_stem, ("two files share the stem",)),
}


@pytest.mark.parametrize("fault", sorted(PAIR_FAULTS))
def test_image_and_mask_faults_stop_training_before_it_starts(tiny_config: Path, fault: str) -> None:
    damage, fragments = PAIR_FAULTS[fault]
    culprit = damage(tiny_config.parent)
    assert_user_error(run_cli_here("train", tiny_config), str(culprit), *fragments)
    for folder in ("models", "eval", "epoch_change_infer"):
        assert not (tiny_config.parent / folder).exists(), folder


# --- model files (.keras) --------------------------------------------------------------------


@pytest.mark.parametrize("fault, fragment", [
    ("corrupt", "not a loadable .keras model"),
    ("empty", "not a loadable .keras model"),
    ("folder", "model file not found"),
])
def test_model_file_faults(tmp_path: Path, prepared64: Path, fault: str, fragment: str) -> None:
    model = tmp_path / "best_model.keras"
    if fault == "corrupt":
        model.write_bytes(b"PK\x03\x04" + GARBAGE * 7)
    elif fault == "empty":
        model.write_bytes(b"")
    else:
        model.mkdir()
    out = tmp_path / "predictions"
    run = run_cli_here("infer", "--model", model, "--images", prepared64 / "test" / "images", "--out", out)
    assert_user_error(run, str(model), fragment)
    _assert_no_output(out)


# --- configs (train_eval_infer.config) -------------------------------------------------------


def _config_text(prepared64: Path) -> str:
    return (prepared64 / "train_eval_infer.config").read_text(encoding="utf-8")


CONFIG_FAULTS: dict[str, tuple[Callable[[Path], object], tuple[str, ...]]] = {
    "missing": (lambda p: p.unlink(), ("config file not found",)),
    "folder": (lambda p: (p.unlink(), p.mkdir()), ("is a folder",)),
    "empty": (lambda p: p.write_bytes(b""), ("no [model] section",)),
    "binary": (lambda p: p.write_bytes(b"\x80\x81\xfe\xff" * 16), ("not UTF-8",)),
    "utf-16": (lambda p: _utf16(p), ("not UTF-8",)),
    "utf-16 without BOM": (lambda p: _utf16(p, bom=False), ("not UTF-8", "NUL")),
    "latin-1": (lambda p: _latin1(p), ("not UTF-8",)),
    "not INI": (lambda p: p.write_text("image_width = 64\n[model\n", encoding="utf-8"), ("not a valid INI file",)),
    "huge number": (lambda p: _set(p, "learning_rate", "9" * 400), ("[model] learning_rate", "out of range")),
    "regex too large": (lambda p: _set(p, "patient_pattern", '"(?P<patient>a{4294967296})"'),
                        ("[dataset] patient_pattern", "not a regular expression")),
    "regex nested too deep": (lambda p: _set(p, "patient_pattern",
                                             '"' + "(" * 1000 + "?P<patient>a" + ")" * 1000 + '"'),
                              ("[dataset] patient_pattern", "not a regular expression")),
    "path unusable": (lambda p: _set(p, "model_dir", '"models\\ud800"'),
                      ("[train] model_dir", "not a file name this system can use")),
    "path with NUL": (lambda p: _set(p, "eval_dir", '"eval\\x00"'), ("[train] eval_dir", "NUL")),
}


@pytest.mark.parametrize("fault", sorted(CONFIG_FAULTS))
def test_config_faults(tmp_path: Path, prepared64: Path, fault: str) -> None:
    config = tmp_path / "train_eval_infer.config"
    config.write_text(_config_text(prepared64), encoding="utf-8")
    damage, fragments = CONFIG_FAULTS[fault]
    damage(config)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert_user_error(run_cli_here("summary", config), str(config), *fragments)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_config_in_utf16_stops_train_before_any_output(tiny_config: Path) -> None:
    _utf16(tiny_config)
    assert_user_error(run_cli("train", tiny_config), str(tiny_config), "not UTF-8")
    assert not (tiny_config.parent / "models").exists() and not (tiny_config.parent / "eval").exists()


# --- study files (TOML) ----------------------------------------------------------------------

STUDY = """\
[study]
name = "hostile"
[dataset]
prepare = { dataset = "ct-ich", source = "data/ct-ich", size = 32 }
[space]
learning_rate = { type = "float", low = 1e-4, high = 1e-2, log = true }
"""

STUDY_FAULTS: dict[str, tuple[Callable[[Path], object], tuple[str, ...]]] = {
    "missing": (lambda p: p.unlink(), ("study file not found",)),
    "folder": (lambda p: (p.unlink(), p.mkdir()), ("is a folder",)),
    "empty": (lambda p: p.write_bytes(b""), ("[study] is missing",)),
    "binary": (lambda p: p.write_bytes(b"\x80\x81\x00\xff" * 8), ("not UTF-8",)),
    "utf-16": (lambda p: _utf16(p), ("not UTF-8",)),
    "utf-16 without BOM": (lambda p: _utf16(p, bom=False), ("not UTF-8", "NUL")),
    "latin-1": (lambda p: _latin1(p), ("not UTF-8",)),
    "not TOML": (lambda p: p.write_text("[study\nname = ", encoding="utf-8"), ("not valid TOML",)),
    "integer of 5000 digits": (lambda p: p.write_text(STUDY.replace("size = 32", "size = " + "9" * 5000),
                                                      encoding="utf-8"),
                               ("not valid TOML", "4300 digits")),
    "integer beyond a float": (lambda p: p.write_text(STUDY.replace("low = 1e-4", f"low = {2**1024}"),
                                                      encoding="utf-8"),
                               ("[space.learning_rate] low", "expected a number")),
    "timeout beyond a float": (lambda p: p.write_text(STUDY + f"[budget]\ntimeout = {10**400}\n", encoding="utf-8"),
                               ("[budget] timeout", "expected a positive number")),
    "wrong types": (lambda p: p.write_text(STUDY.replace('name = "hostile"', "name = [1, 2]"), encoding="utf-8"),
                    ("[study] name", "expected a string")),
}


@pytest.mark.parametrize("command", ["run", "status"])
@pytest.mark.parametrize("fault", sorted(STUDY_FAULTS))
def test_study_file_faults(tmp_path: Path, fault: str, command: str) -> None:
    study = tmp_path / "study.toml"
    study.write_text(STUDY, encoding="utf-8")
    damage, fragments = STUDY_FAULTS[fault]
    damage(study)
    out = tmp_path / "runs"
    args = ["search", command, study] + (["--out", out] if command == "run" else ["--run-dir", out])
    assert_user_error(run_cli_here(*args, cwd=tmp_path), str(study), *fragments)
    assert not out.exists() and not (tmp_path / "runs" / "hostile").exists()


def test_a_study_file_may_name_a_source_outside_its_folder(tmp_path: Path) -> None:
    """``source`` is the user's own choice of dataset folder (unlike a manifest entry, it is not
    confined); it is resolved against the study file's folder."""
    folder = tmp_path / "studies"
    folder.mkdir()
    study = folder / "study.toml"
    study.write_text(STUDY.replace('source = "data/ct-ich"', 'source = "../../elsewhere/ct-ich"'), encoding="utf-8")
    spec = study_file.load(study)
    assert spec.prepare is not None
    assert spec.prepare.source.resolve() == (tmp_path.parent / "elsewhere" / "ct-ich").resolve()


def test_a_study_file_with_a_utf8_bom_loads(tmp_path: Path) -> None:
    """Windows editors save UTF-8 with a byte-order mark; the config reader accepts it, so does
    the study-file reader."""
    study = tmp_path / "study.toml"
    study.write_bytes(b"\xef\xbb\xbf" + STUDY.encode("utf-8"))
    assert study_file.load(study).name == "hostile"


def test_a_nul_in_a_study_file_is_not_toml(tmp_path: Path) -> None:
    study = tmp_path / "study.toml"
    study.write_text(STUDY.replace('"hostile"', '"host\x00ile"'), encoding="utf-8")
    with pytest.raises(ConfigError, match="study.toml"):
        study_file.load(study)


# --- storage URLs (--storage, $FLEXUNET_STORAGE) ---------------------------------------------


def _not_a_database(tmp_path: Path) -> str:
    path = tmp_path / "notes.db"
    path.write_text("these are my notes, not a database\n" * 50, encoding="utf-8")
    return f"sqlite:///{path}"


def _under_a_file(tmp_path: Path) -> str:
    (tmp_path / "plain-file").write_text("x", encoding="utf-8")
    return f"sqlite:///{tmp_path / 'plain-file' / 'study.db'}"


STORAGE_FAULTS: dict[str, tuple[Callable[[Path], str], tuple[str, ...]]] = {
    "garbage scheme": (lambda t: "garbage://host/db", ("storage garbage://host/db",)),
    "not a URL": (lambda t: "just some words", ("storage just some words",)),
    "journal without a path": (lambda t: "journal:", ("journal:PATH", "the path is missing")),
    "control characters": (lambda t: "sqlite:///a.db\nrm -rf", ("storage URL", "control characters")),
    "unreachable redis": (lambda t: "redis://127.0.0.1:1/0", ("storage redis://127.0.0.1:1/0", "cannot connect")),
    "unreachable postgresql": (lambda t: "postgresql://user:s3cret@127.0.0.1:1/db",
                               ("postgresql+psycopg://user:***@127.0.0.1:1/db", "cannot connect")),
    "sqlite file that is not a database": (_not_a_database, ("notes.db", "cannot connect")),
    "sqlite under a plain file": (_under_a_file, ("plain-file", "no study database there")),
    "sqlite file that does not exist": (lambda t: f"sqlite:///{t}/elsewhere/study.db",
                                        ("elsewhere/study.db", "no study database there")),
    "journal file that does not exist": (lambda t: f"journal:{t}/study.log", ("study.log", "no study database there")),
}


@pytest.mark.parametrize("fault", sorted(STORAGE_FAULTS))
def test_storage_url_faults(tmp_path: Path, fault: str) -> None:
    url_of, fragments = STORAGE_FAULTS[fault]
    url = url_of(tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    line = assert_user_error(run_cli_here("search", "status", "--study", "s", "--storage", url, cwd=tmp_path),
                             *fragments)
    assert "s3cret" not in line
    if url == "journal:":
        assert "cannot connect" not in line, line  # a missing path is not a connection problem
    # Nothing was created or changed: a file that is not a database stays as it was.
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_reading_a_study_that_never_ran_creates_nothing(tmp_path: Path) -> None:
    """status/export/report/dashboard with a study file whose run folder does not exist (run
    elsewhere, or not yet) say so, instead of leaving an empty database behind."""
    for command in ("status", "export", "report"):
        extra = ("--out", tmp_path / "out") if command in ("export", "report") else ()
        run = run_cli_here("search", command, ROOT / "studies" / "ct_ich_sample.toml", *extra, cwd=tmp_path)
        assert_user_error(run, "study.db", "no study database there", "--run-dir")
    assert not list(tmp_path.iterdir())


def test_each_command_exits_2_in_a_process_of_its_own(tmp_path: Path, prepared64: Path) -> None:
    """One case of each command the cases above run in the test's interpreter, as a shell runs
    it: a process of its own whose exit status is 2, with one error line and no traceback."""
    src = _hu_source(tmp_path / "hu")
    HU_FAULTS["npy truncated"][0](src)
    assert_user_error(run_cli("prepare", "ct-ich", src, tmp_path / "prepared", "--size", "16"), "11.npy",
                      "not a readable .npy")
    _assert_no_output(tmp_path / "prepared")

    config = tmp_path / "train_eval_infer.config"
    config.write_text(_config_text(prepared64), encoding="utf-8")
    CONFIG_FAULTS["not INI"][0](config)
    assert_user_error(run_cli("summary", config), str(config), "not a valid INI file")

    study = tmp_path / "study.toml"
    study.write_text(STUDY, encoding="utf-8")
    STUDY_FAULTS["not TOML"][0](study)
    assert_user_error(run_cli("search", "run", study, "--out", tmp_path / "runs", cwd=tmp_path), str(study),
                      "not valid TOML")
    assert not (tmp_path / "runs").exists()


def test_storage_from_the_environment_is_named_too(tmp_path: Path) -> None:
    run = run_cli("search", "status", "--study", "s", cwd=tmp_path, env={"FLEXUNET_STORAGE": "garbage://x"})
    assert_user_error(run, "storage garbage://x")
    assert not list(tmp_path.iterdir())

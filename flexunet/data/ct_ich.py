"""Prepare CT-ICH (Hssayeni 2019/2020, PhysioNet ``ct-ich``) as users download it.

Three forms are read, alone or together, from one source folder:

* the JPG release: ``Patients_CT/<pid>/brain/<n>.jpg`` with ``<n>_HGE_Seg.jpg`` masks and
  ``hemorrhage_diagnosis.csv``, the authority on which slices exist (a listed slice without a
  mask file is hemorrhage-free);
* the NIfTI release: ``ct_scans/<pid>.nii[.gz]`` and ``masks/<pid>.nii[.gz]`` in Hounsfield
  units, every axial slice;
* the sample's ``hu_slices/manifest.csv`` with ``.npy`` HU slices and PNG masks.

HU data are windowed to the brain window (level 40, width 80) and turned to the JPG release's
orientation. Patients are split (never slices) and written in the seed's layout.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from flexunet import config as cfg
from flexunet.data import io as imio
from flexunet.data.split import (PARTS, PatientInfo, check_disjoint, fold_patients, split_holding_out,
                                 split_patients)
from flexunet.errors import DataError
from flexunet.textfiles import read_text
from flexunet.outputs import staged_dir

_logger = logging.getLogger(__name__)

BRAIN_WINDOW = (40.0, 80.0)  # level, width in HU
DIAGNOSIS_CSV = "hemorrhage_diagnosis.csv"
SPLIT_FILE = "split.json"  # the patient split prepare records beside the config
# ``--hemorrhage-types``: one class per type, in the CSV's column order (class 1..5), each with
# its mask colour. The same class number means the same type on any copy of the dataset.
HEMORRHAGE_TYPES = ("Intraventricular", "Intraparenchymal", "Subarachnoid", "Epidural", "Subdural")
TYPE_COLOURS = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255))
PATIENT_PATTERN = r"^(?P<patient>\d+)_(?P<slice>.+)$"
_NIFTI_SUFFIXES = (".nii", ".nii.gz")


@dataclass(frozen=True)
class _SliceRef:
    patient: str
    slice: str  # "20" (JPG release numbering) or "nii16" (NIfTI numbering)
    source: str  # "jpg", "nifti" or "hu"
    positive: bool
    load: Callable[[], tuple[np.ndarray, np.ndarray]]  # (image HxW uint8, mask HxW 0/1 uint8)

    @property
    def name(self) -> str:
        return f"{self.patient}_{self.slice}"


@dataclass
class PrepareReport:
    """What was found, written and skipped; printed at the end of ``prepare``."""

    type_slices: dict[str, int] = field(default_factory=dict)  # --hemorrhage-types: type -> slices kept
    mixed_types_skipped: int = 0  # --hemorrhage-types: slices with hemorrhage of several (or unknown) types

    written: dict[str, int] = field(default_factory=dict)  # part -> slices
    positive: dict[str, int] = field(default_factory=dict)  # part -> slices with hemorrhage
    patients: dict[str, int] = field(default_factory=dict)  # part -> patients
    sources: dict[str, int] = field(default_factory=dict)  # jpg/nifti/hu -> slices
    listed_missing: int = 0  # CSV rows whose image is not on disk (patient folder present)
    patients_not_on_disk: int = 0  # CSV patients without any folder
    not_listed: list[str] = field(default_factory=list)  # images on disk the CSV does not list
    masks_without_image: list[str] = field(default_factory=list)
    listed_positive_without_mask: int = 0
    duplicates: list[str] = field(default_factory=list)
    volumes_without_mask: list[str] = field(default_factory=list)
    csv_patients: int = 0  # patients hemorrhage_diagnosis.csv lists
    csv_rows_on_disk_patients: int = 0  # its rows of the patients that have a folder
    jpg_found: int = 0  # JPG slices found of the listed ones
    snapped_pixels: int = 0  # grey JPEG mask pixels (compression blur) thresholded to 0 or 1

    @property
    def partial(self) -> bool:
        """Patients_CT holds only some of the CSV's patients: a partial copy (the bundled
        sample is one), whose absent rows are expected, not errors."""
        return self.patients_not_on_disk > 0

    def lines(self) -> list[str]:
        total = sum(self.written.values())
        pos = sum(self.positive.values())
        out = [f"slices written: {total} ({pos} with hemorrhage, {total - pos} without); "
               + ", ".join(f"{k} {v}" for k, v in sorted(self.sources.items()))]
        for part in self.written:
            out.append(f"  {part:<12} {self.patients[part]:>3} patients  {self.written[part]:>5} slices"
                       f"  ({self.positive[part]} with hemorrhage)")
        on_disk = self.csv_patients - self.patients_not_on_disk
        if self.partial:
            out.append(f"reading a partial copy of CT-ICH: Patients_CT holds {on_disk} of the {self.csv_patients} "
                       f"patients of {DIAGNOSIS_CSV}, with {self.jpg_found} of their "
                       f"{self.csv_rows_on_disk_patients} listed slices; the other rows are not on disk, as "
                       f"expected of a partial copy (the full download has them all)")
        if self.type_slices or self.mixed_types_skipped:
            kept = ", ".join(f"{t} {self.type_slices.get(t, 0)}" for t in HEMORRHAGE_TYPES)
            out.append(f"hemorrhage types (class 1-5): {kept} slices; {self.mixed_types_skipped} slices with "
                       "several types, or whose type the CSV cannot tell, skipped")
        if self.snapped_pixels:
            out.append(f"JPEG masks: {self.snapped_pixels} grey edge pixels (compression blur) thresholded at 127")
        issues = [
            ("listed in the CSV but missing on disk", 0 if self.partial else self.listed_missing),
            ("images on disk that the CSV does not list (skipped)", len(self.not_listed)),
            ("masks without their image (skipped)", len(self.masks_without_image)),
            ("slices marked hemorrhage in the CSV but without a mask (kept as empty)",
             self.listed_positive_without_mask),
            ("slices found twice (kept once)", len(self.duplicates)),
            ("volumes without a mask volume (skipped)", len(self.volumes_without_mask)),
        ]
        out += [f"{what}: {count}" for what, count in issues if count]
        for label, names in (("mask without image", self.masks_without_image),
                             ("volume without mask", self.volumes_without_mask)):
            out += [f"  {label}: {n}" for n in names[:10]]
        return out


def window(hu: np.ndarray, level: float = BRAIN_WINDOW[0], width: float = BRAIN_WINDOW[1]) -> np.ndarray:
    """Hounsfield units to uint8 through a display window."""
    lo = level - width / 2
    scaled = (hu.astype(np.float32) - lo) / width
    return (np.clip(scaled, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def _to_display(slice_2d: np.ndarray) -> np.ndarray:
    # NIfTI stores (x, y); transposing gives the JPG release's view (anterior up, patient's
    # right on the left of the image), so that both releases look alike to the model.
    return np.ascontiguousarray(slice_2d.T)


# --- the three source forms ------------------------------------------------------------------


def _is_number(text: str) -> bool:
    # str.isdigit() also accepts superscripts and other digits that int() refuses.
    return text.isascii() and text.isdigit()


def _read_csv(path: Path, columns: tuple[str, ...], missing: str = "") -> list[tuple[int, dict[str, str | None]]]:
    """(line number, row) of a UTF-8 CSV file that has ``columns``; whatever is wrong with the
    file (absent, a folder, another encoding, not CSV) is a DataError naming it."""
    text = read_text(path, "CSV file", DataError, missing)
    reader = csv.DictReader(io.StringIO(text))
    try:
        absent = [c for c in columns if c not in (reader.fieldnames or [])]
        if absent:
            raise DataError(f"{path}: missing column {absent[0]!r}")
        return [(reader.line_num, row) for row in reader]
    except csv.Error as exc:  # e.g. a field over csv.field_size_limit()
        # line_num counts the lines read whole; the faulty one is the next.
        raise DataError(f"{path}: line {reader.line_num + 1}: not valid CSV ({exc})") from None


def _read_diagnosis(path: Path) -> dict[tuple[str, str], bool]:
    """(patient, slice) -> has hemorrhage, from ``hemorrhage_diagnosis.csv``."""
    needed = ("PatientNumber", "SliceNumber", "No_Hemorrhage")
    rows: dict[tuple[str, str], bool] = {}
    for line, row in _read_csv(path, needed, " (the JPG release needs it: it lists every slice)"):
        try:
            patient, number, healthy = (int(str(row[c]).strip()) for c in needed)
        except (TypeError, ValueError):
            raise DataError(f"{path}: line {line}: expected integers in {', '.join(needed)}") from None
        if patient < 0 or number < 0 or healthy not in (0, 1):
            raise DataError(f"{path}: line {line}: out-of-range value")
        key = (f"{patient:03d}", str(number))
        if key in rows:
            raise DataError(f"{path}: line {line}: patient {key[0]} slice {key[1]} is listed twice")
        rows[key] = healthy == 0
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def _read_types(path: Path) -> dict[tuple[str, str], frozenset[int]]:
    """(patient, slice) -> the hemorrhage classes (1-5, :data:`HEMORRHAGE_TYPES`) the CSV marks."""
    needed = ("PatientNumber", "SliceNumber", *HEMORRHAGE_TYPES)
    rows: dict[tuple[str, str], frozenset[int]] = {}
    for line, row in _read_csv(path, needed, " (--hemorrhage-types reads each slice's types from it)"):
        try:
            patient, number, *flags = (int(str(row[c]).strip()) for c in needed)
        except (TypeError, ValueError):
            raise DataError(f"{path}: line {line}: expected integers in {', '.join(needed)}") from None
        if any(f not in (0, 1) for f in flags):
            raise DataError(f"{path}: line {line}: a hemorrhage type column holds a value other than 0 or 1")
        rows[(f"{patient:03d}", str(number))] = frozenset(c for c, f in enumerate(flags, start=1) if f)
    return rows


def _type_of(ref: _SliceRef, types: dict[tuple[str, str], frozenset[int]],
             by_patient: dict[str, frozenset[int]]) -> int | None:
    """The one hemorrhage class of a slice (0 for a slice without hemorrhage), or None where it
    has several or the CSV cannot tell. JPG slices have their own CSV row; NIfTI and HU slices
    are numbered otherwise (some patients' NIfTI volumes have more slices than the CSV lists),
    so they take their patient's type, where every hemorrhage of the patient is of one type."""
    if not ref.positive:
        return 0
    held = types.get((ref.patient, ref.slice), frozenset()) if ref.source == "jpg" else by_patient.get(ref.patient, frozenset())
    return next(iter(held)) if len(held) == 1 else None


def _jpg_slices(src: Path, report: PrepareReport) -> list[_SliceRef]:
    root = src / "Patients_CT"
    listed = _read_diagnosis(src / DIAGNOSIS_CSV)
    listed_patients = {p for p, _ in listed}
    folders = {d.name: d for d in root.iterdir() if d.is_dir()}
    by_int: dict[str, Path] = {}
    for name, folder in sorted(folders.items()):
        if _is_number(name):
            key = f"{int(name):03d}"
            if key in by_int:
                raise DataError(f"{root}: two folders for patient {key}: {by_int[key].name} and {name}")
            by_int[key] = folder
    report.patients_not_on_disk = len(listed_patients - set(by_int))
    report.csv_patients = len(listed_patients)
    report.csv_rows_on_disk_patients = sum(1 for p, _ in listed if p in by_int)
    refs: list[_SliceRef] = []
    for patient in sorted(set(by_int) & listed_patients):
        brain = by_int[patient] / "brain"
        if not brain.is_dir():
            report.listed_missing += sum(1 for p, _ in listed if p == patient)
            continue
        on_disk: dict[str, Path] = {}
        masks: dict[str, Path] = {}
        for path in sorted(brain.iterdir()):
            m = re.fullmatch(r"([0-9]+)(_HGE_Seg)?\.jpe?g", path.name, flags=re.IGNORECASE)
            if not m:
                continue
            number = str(int(m.group(1)))
            found = masks if m.group(2) else on_disk
            if number in found:  # 7.jpg and 07.jpg (or 7.jpeg): which one is slice 7?
                raise DataError(f"{brain}: two files for slice {number}: {found[number].name} and {path.name}")
            found[number] = path
        for number in sorted(masks, key=int):
            if number not in on_disk:
                report.masks_without_image.append(str(masks[number]))
        for number in sorted(on_disk, key=int):
            if (patient, number) not in listed:
                report.not_listed.append(str(on_disk[number]))
        for (p, number), positive in sorted(listed.items()):
            if p != patient:
                continue
            image_path = on_disk.get(number)
            if image_path is None:
                report.listed_missing += 1
                continue
            mask_path = masks.get(number)
            if positive and mask_path is None:
                report.listed_positive_without_mask += 1
            refs.append(_SliceRef(patient, number, "jpg", mask_path is not None,
                                  _jpg_loader(image_path, mask_path, report)))
    report.jpg_found = len(refs)
    return refs


def _jpg_loader(image_path: Path, mask_path: Path | None,
                report: PrepareReport) -> Callable[[], tuple[np.ndarray, np.ndarray]]:
    def load() -> tuple[np.ndarray, np.ndarray]:
        # The JPGs were re-saved as 3-channel files: read them as grayscale.
        image = imio.read_image(image_path, channels=1)[..., 0]
        if mask_path is None:
            return image, np.zeros(image.shape, np.uint8)
        decoded = imio.decode_mask(mask_path, cfg.BINARY_RGB_MAP, num_classes=2)
        mask = decoded.labels
        report.snapped_pixels += decoded.snapped
        if mask.shape != image.shape:
            raise DataError(f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image "
                            f"{image_path.name} is {image.shape[1]}x{image.shape[0]}")
        return image, mask

    return load


def _hu_slices(src: Path, report: PrepareReport) -> list[_SliceRef]:
    root = (src / "hu_slices").resolve()
    manifest = root / "manifest.csv"
    refs = []
    for line, row in _read_csv(manifest, ("patient_id", "slice_nifti", "ct", "mask")):
        patient, number = str(row["patient_id"]).strip(), str(row["slice_nifti"]).strip()
        if not _is_number(patient) or not _is_number(number):
            raise DataError(f"{manifest}: line {line}: patient_id and slice_nifti must be integers")
        ct = _inside(root, row["ct"], manifest, line)
        mask = _inside(root, row["mask"], manifest, line)
        for path in (ct, mask):
            if path.is_dir():
                raise DataError(f"{manifest}: line {line}: {path} is a folder, not a file")
        if not ct.is_file():
            report.listed_missing += 1
            continue
        if not mask.is_file():
            report.volumes_without_mask.append(str(ct))
            continue
        positive = bool(imio.read_mask(mask, cfg.BINARY_RGB_MAP, 2).any())
        refs.append(_SliceRef(f"{int(patient):03d}", f"nii{int(number)}", "hu", positive, _hu_loader(ct, mask)))
    return refs


def _inside(root: Path, relative: str | None, manifest: Path, line: int) -> Path:
    text = str(relative or "").strip()
    if not text or "\x00" in text:
        raise DataError(f"{manifest}: line {line}: {text!r} is not a file path")
    try:
        path = (root / text).resolve()
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop
        raise DataError(f"{manifest}: line {line}: cannot resolve {text!r} ({exc})") from None
    if not path.is_relative_to(root):
        raise DataError(f"{manifest}: line {line}: path {text!r} leaves {root.name}/")
    return path


def _hu_loader(ct: Path, mask: Path) -> Callable[[], tuple[np.ndarray, np.ndarray]]:
    def load() -> tuple[np.ndarray, np.ndarray]:
        try:
            # Memory-mapped: a header that claims a huge shape fails here instead of allocating it.
            loaded = np.load(ct, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise DataError(f"{ct}: not a readable .npy array ({exc})") from None
        if not isinstance(loaded, np.ndarray):  # np.load opens a .npz archive whatever its name
            loaded.close()
            raise DataError(f"{ct}: an .npz archive, not a .npy array")
        if loaded.ndim != 2 or 0 in loaded.shape or loaded.dtype.kind not in "iuf":
            raise DataError(f"{ct}: expected a 2-D array of Hounsfield units, got {loaded.dtype} {loaded.shape}")
        hu = np.array(loaded)
        del loaded  # closes the memory map
        if not np.isfinite(hu).all():
            raise DataError(f"{ct}: holds NaN or infinite values")
        labels = imio.read_mask(mask, cfg.BINARY_RGB_MAP, 2)
        if labels.shape != hu.shape:
            raise DataError(f"{mask}: mask is {labels.shape} but its slice {ct.name} is {hu.shape}")
        return window(_to_display(hu)), _to_display(labels)

    return load


def _nifti_slices(src: Path, report: PrepareReport) -> list[_SliceRef]:
    import nibabel as nib

    scans, masks = _nifti_files(src / "ct_scans"), _nifti_files(src / "masks")
    refs = []
    for patient, scan in sorted(scans.items()):
        mask_path = masks.get(patient)
        if mask_path is None:
            report.volumes_without_mask.append(str(scan))
            continue
        labels = _read_volume(nib, mask_path)
        volume_shape = _volume_shape(nib, scan)
        if volume_shape != labels.shape:
            raise DataError(f"{mask_path}: mask volume is {labels.shape} but {scan.name} is {volume_shape}")
        for z in range(labels.shape[2]):
            refs.append(_SliceRef(patient, f"nii{z + 1}", "nifti", bool(labels[..., z].any()),
                                  _nifti_loader(nib, scan, mask_path, z)))
    for patient, mask_path in sorted(masks.items()):
        if patient not in scans:
            report.masks_without_image.append(str(mask_path))
    return refs


def _nifti_files(folder: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    if not folder.is_dir():
        return found
    for path in sorted(folder.iterdir()):
        name = path.name
        suffix = next((s for s in _NIFTI_SUFFIXES if name.lower().endswith(s)), None)
        stem = name[: -len(suffix)] if suffix else ""
        if suffix and _is_number(stem):
            key = f"{int(stem):03d}"
            if key in found:  # 7.nii and 7.nii.gz (or 007.nii): which one is patient 7?
                raise DataError(f"{folder}: two volumes for patient {key}: {found[key].name} and {name}")
            found[key] = path
    return found


def _volume_shape(nib, path: Path) -> tuple[int, ...]:
    try:
        return tuple(nib.load(path).shape)
    except Exception as exc:  # nibabel raises many types for corrupt headers
        raise DataError(f"{path}: not a readable NIfTI file ({exc})") from None


def _read_volume(nib, path: Path) -> np.ndarray:
    try:
        data = np.asanyarray(nib.load(path).dataobj)
    except Exception as exc:  # corrupt header, truncated data, wrong type
        raise DataError(f"{path}: not a readable NIfTI file ({exc})") from None
    if data.ndim != 3 or 0 in data.shape:
        raise DataError(f"{path}: expected a 3-D volume, got shape {data.shape}")
    if not np.isfinite(data).all():
        raise DataError(f"{path}: holds NaN or infinite values")
    return data


def _nifti_loader(nib, scan: Path, mask: Path, z: int) -> Callable[[], tuple[np.ndarray, np.ndarray]]:
    def load() -> tuple[np.ndarray, np.ndarray]:
        hu = _read_volume(nib, scan)[..., z]
        labels = (_read_volume(nib, mask)[..., z] > 0).astype(np.uint8)
        return window(_to_display(hu)), _to_display(labels)

    return load


# --- prepare ---------------------------------------------------------------------------------


def find_slices(src: Path, report: PrepareReport) -> list[_SliceRef]:
    """Every slice of every CT-ICH form found under ``src``, one per (patient, slice)."""
    if not src.is_dir():
        raise DataError(f"{src}: source folder not found")
    forms = [
        ((src / "Patients_CT").is_dir(), _jpg_slices),
        ((src / "ct_scans").is_dir(), _nifti_slices),
        ((src / "hu_slices" / "manifest.csv").is_file(), _hu_slices),
    ]
    if not any(present for present, _ in forms):
        raise DataError(f"{src}: no CT-ICH data found (expected Patients_CT/, ct_scans/ or "
                        "hu_slices/manifest.csv)")
    refs: dict[str, _SliceRef] = {}
    for present, reader in forms:
        if not present:
            continue
        for ref in reader(src, report):
            if ref.name in refs:
                report.duplicates.append(ref.name)
                continue
            refs[ref.name] = ref
    if not refs:
        raise DataError(f"{src}: no slices with images were found")
    return [refs[name] for name in sorted(refs)]


def prepare(src: Path, out: Path, *, size: int | None = None, fractions: tuple[float, ...] = (0.7, 0.15, 0.15),
            folds: int | None = None, seed: int = 0, only_hemorrhage: bool = False,
            force: bool = False, test_patients: Sequence[str] | None = None,
            hemorrhage_types: bool = False) -> PrepareReport:
    """Write ``out/{train,valid,test}/{images,masks}`` (or ``out/fold_k/...``), ``split.json``,
    ``slices.csv`` and a ready-to-train ``train_eval_infer.config``.

    ``test_patients`` (3-digit ids, e.g. an outer fold of nested cross-validation) are the test
    part; the other patients are split into train and valid in the ratio of the first two
    ``fractions``. ``hemorrhage_types`` makes a multi-class dataset: one class per hemorrhage
    type (:data:`HEMORRHAGE_TYPES`, colour masks), from the slices whose hemorrhage is of one
    type; the split is then stratified by type."""
    if size is not None and not 8 <= size <= 4096:
        raise DataError(f"--size {size}: expected a side between 8 and 4096 pixels")
    if folds and test_patients is not None:
        raise DataError("give --folds or --test-patients, not both")
    report = PrepareReport()
    refs = find_slices(Path(src), report)
    if only_hemorrhage:
        refs = [r for r in refs if r.positive]
    label = slice_classes(Path(src), refs, report, hemorrhage_types)
    refs = [ref for ref in refs if ref.name in label]
    patients: dict[str, PatientInfo] = {}
    for ref in refs:
        classes = frozenset({label[ref.name]}) if label[ref.name] else frozenset()
        patients[ref.patient] = patients.get(ref.patient, PatientInfo(0, 0)).add(classes)
    layouts: dict[str, dict[str, list[str]]]
    if folds:
        layouts = {f"fold_{k}": parts for k, parts in enumerate(fold_patients(patients, folds, seed))}
    elif test_patients is not None:
        layouts = {"": split_holding_out(patients, test_patients, fractions, seed)}
    else:
        layouts = {"": split_patients(patients, fractions, seed)}
    for parts in layouts.values():
        check_disjoint(parts)

    part_of = {prefix: {p: part for part, ps in parts.items() for p in ps} for prefix, parts in layouts.items()}
    side = size or 512
    with staged_dir(Path(out), replace=force) as stage:
        for prefix in layouts:
            for part in PARTS:
                for kind in ("images", "masks"):
                    (stage / prefix / part / kind).mkdir(parents=True)
        rows = []
        for ref in refs:
            image, mask = ref.load()
            if size:
                image = imio.resize_image(image[..., None], size, size)[..., 0]
                mask = imio.resize_mask(mask, size, size)
            picture = _type_mask(mask, label[ref.name]) if hemorrhage_types else mask * 255
            for prefix in layouts:
                part = part_of[prefix][ref.patient]
                imio.write_png(stage / prefix / part / "images" / f"{ref.name}.png", image)
                imio.write_png(stage / prefix / part / "masks" / f"{ref.name}.png", picture)
            report.sources[ref.source] = report.sources.get(ref.source, 0) + 1
            rows.append((ref, int(mask.sum())))
        for prefix, parts in layouts.items():
            root = stage / prefix
            cfg.dump(_training_config(root, side, hemorrhage_types), root / cfg.CONFIG_FILE)
        _write_split(stage, layouts, rows, part_of, seed, fractions, folds, size, test_patients,
                     label if hemorrhage_types else None)
        first = next(iter(layouts))
        for part, ps in layouts[first].items():
            names = [ref for ref, _ in rows if ref.patient in set(ps)]
            report.patients[part] = len(ps)
            report.written[part] = len(names)
            report.positive[part] = sum(1 for ref, px in rows if ref.patient in set(ps) and px > 0)
    return report


def slice_classes(src: Path, refs: Sequence[_SliceRef], report: PrepareReport,
                  hemorrhage_types: bool = False) -> dict[str, int]:
    """Slice name -> the class its lesion pixels get: 1 for hemorrhage (0 without), or with
    ``hemorrhage_types`` its type's class, for the slices of one type (or none) only: the others
    are left out (counted in ``report``)."""
    if not hemorrhage_types:
        return {ref.name: int(ref.positive) for ref in refs}
    types = _read_types(src / DIAGNOSIS_CSV)
    by_patient: dict[str, frozenset[int]] = {}
    for (patient, _), held in types.items():
        by_patient[patient] = by_patient.get(patient, frozenset()) | held
    label = {}
    for ref in refs:
        c = _type_of(ref, types, by_patient)
        if c is None:
            report.mixed_types_skipped += 1
            continue
        label[ref.name] = c
        if c:
            report.type_slices[HEMORRHAGE_TYPES[c - 1]] = report.type_slices.get(HEMORRHAGE_TYPES[c - 1], 0) + 1
    if not any(label.values()):
        raise DataError(f"{src / DIAGNOSIS_CSV}: no slice with hemorrhage of a single type: --hemorrhage-types "
                        "has nothing to label")
    return label


def _type_mask(mask: np.ndarray, c: int) -> np.ndarray:
    """A 0/1 mask as an RGB mask whose lesion has class ``c``'s colour."""
    picture = np.zeros((*mask.shape, 3), np.uint8)
    if c:
        picture[mask > 0] = TYPE_COLOURS[c - 1]
    return picture


def _write_split(stage: Path, layouts: dict[str, dict[str, list[str]]], rows: Iterable[tuple[_SliceRef, int]],
                 part_of: dict[str, dict[str, str]], seed: int, fractions: tuple[float, ...],
                 folds: int | None, size: int | None, test_patients: Sequence[str] | None,
                 label: dict[str, int] | None = None) -> None:
    rows = list(rows)
    split = {
        "dataset": "ct-ich",
        "classes": ({"0": "background", **{str(i): t for i, t in enumerate(HEMORRHAGE_TYPES, start=1)}}
                    if label is not None else {"0": "background", "1": "hemorrhage"}),
        "seed": seed,
        "size": size,
        "unit": "patient",
        "test_patients_given": test_patients is not None,  # test part chosen by the caller
        "folds": [{"name": k, **v} for k, v in layouts.items()] if folds else None,
        "fractions": None if folds else list(fractions),
        "parts": None if folds else layouts[""],
        "slices": {
            (k or "all"): {part: sum(1 for ref, _ in rows if part_of[k][ref.patient] == part) for part in PARTS}
            for k in layouts
        },
    }
    (stage / SPLIT_FILE).write_text(json.dumps(split, indent=2) + "\n", encoding="utf-8")
    lines = ["name,patient,slice,source,foreground_pixels,class," + ",".join(k or "part" for k in layouts)]
    for ref, pixels in rows:
        c = label[ref.name] if label is not None else int(pixels > 0)
        lines.append(",".join([ref.name, ref.patient, ref.slice, ref.source, str(pixels), str(c if pixels else 0)]
                              + [part_of[k][ref.patient] for k in layouts]))
    (stage / "slices.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")


def default_num_layers(side: int) -> int:
    """Levels for a square input: the bridge stays >= 8 px and there are at most 5 levels,
    deep enough to see a lesion's context, shallow enough to train on a CPU."""
    layers = 2
    while layers < 5 and side % 2**layers == 0 and side // 2**layers >= 8:
        layers += 1
    return layers


def _training_config(root: Path, side: int, hemorrhage_types: bool = False) -> cfg.Config:
    layers = default_num_layers(side)
    rgb_map = ({(0, 0, 0): 0, **{colour: c for c, colour in enumerate(TYPE_COLOURS, start=1)}}
               if hemorrhage_types else dict(cfg.BINARY_RGB_MAP))
    model = cfg.ModelConfig(
        image_width=side, image_height=side, image_channels=1, num_classes=max(rgb_map.values()) + 1, base_filters=16,
        base_kernels=(3, 3), num_layers=layers, dropout_rate=0.05, normalization=True,
        learning_rate=1e-3, loss="categorical_crossentropy+dice_loss",
        metrics=("foreground_dice", "dice_coef_multiclass"),
    )
    train = cfg.TrainConfig(
        epochs=50, batch_size=4, patience=10, model_dir=root / "models", eval_dir=root / "eval",
        images_dir=root / "train" / "images", masks_dir=root / "train" / "masks",
        epoch_change_infer=True, epoch_change_infer_dir=root / "epoch_change_infer", num_infer_images=4,
    )
    return cfg.Config(
        model=model, mask=cfg.MaskConfig(rgb_map=rgb_map), train=train,
        valid=cfg.SplitDirs(root / "valid" / "images", root / "valid" / "masks"),
        test=cfg.SplitDirs(root / "test" / "images", root / "test" / "masks"),
        eval=cfg.EvalConfig(root / "evaluation"),
        infer=cfg.InferConfig(root / "test" / "images", root / "infer_output"),
        image=cfg.ImageConfig("RGB"), dataset=cfg.DatasetConfig(PATIENT_PATTERN),
    )


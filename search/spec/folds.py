"""Which fold validates each development slice of a cross-validated study.

From ``folds.csv`` beside the dataset's config (columns ``name,fold``) or, without that file, from
the slices' patients (:func:`flexunet.data.split.cv_folds`, seeded and stratified by class). No
Keras here: the launcher reads the folds too, to name the classes a fold cannot score.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from flexunet import config as cfg
from flexunet.data.dataset import patient_of
from flexunet.data.split import PatientInfo, cv_folds
from flexunet.errors import ConfigError
from flexunet.textfiles import read_text


def fold_of(names: list[str], masks: np.ndarray, config: cfg.Config, folds: int, folds_file: Path,
            seed: int) -> np.ndarray:
    """The fold (0..folds-1) of each slice: by ``folds_file`` if it exists, else by patient."""
    if folds_file.is_file():
        return _read_folds_file(folds_file, names, folds)
    return _patient_folds(names, masks, config.dataset.patient_pattern, folds, seed)


def missing_classes(config: cfg.Config, folds: int, folds_file: Path, seed: int) -> dict[int, list[int]]:
    """Fold (0-based) -> the foreground classes of the development slices that none of its
    validation slices holds; only folds that lack one. Reads the masks only, at ``config``'s
    size, and splits them as :func:`search.trial.cv.load_fold_data` does.

    The folds are stratified (:mod:`flexunet.data.split`), so a class is missing from a fold
    only where fewer patients hold it than there are folds: that fold cannot score it, and its
    mean leaves it out.
    """
    from flexunet.config import require_dir
    from flexunet.data.dataset import load_masks

    names: list[str] = []
    parts = []
    for dirs in ((config.train.images_dir, config.train.masks_dir), (config.valid.images_dir, config.valid.masks_dir)):
        n, masks = load_masks(require_dir(dirs[0], "dataset", "images_dir"), require_dir(dirs[1], "dataset", "masks_dir"),
                              config.model, config.mask)
        names += n
        parts.append(masks)
    masks = np.concatenate(parts)
    assigned = fold_of(names, masks, config, folds, folds_file, seed)
    every = _classes_in(masks)
    out = {}
    for k in range(folds):
        lacking = every - _classes_in(masks[assigned == k])
        if lacking:
            out[k] = sorted(lacking)
    return out


def _classes_in(masks: np.ndarray) -> set[int]:
    return {int(c) for c in np.unique(masks)} - {0}


def _patient_folds(names: list[str], masks: np.ndarray, pattern: str | None, folds: int, seed: int) -> np.ndarray:
    # Without a patient pattern every slice is its own group.
    groups = [patient_of(name, pattern)[0] or name for name in names]
    patients: dict[str, PatientInfo] = {}
    for group, mask in zip(groups, masks):
        patients[group] = patients.get(group, PatientInfo(0, 0)).add(frozenset(_classes_in(mask)))
    fold_of_patient = {p: k for k, members in enumerate(cv_folds(patients, folds, seed)) for p in members}
    return np.array([fold_of_patient[g] for g in groups], np.int64)


def _read_folds_file(path: Path, names: list[str], folds: int) -> np.ndarray:
    reader = csv.DictReader(io.StringIO(read_text(path, "folds file", ConfigError)))
    if not {"name", "fold"} <= set(reader.fieldnames or []):
        raise ConfigError(f"{path}: expected the columns name,fold")
    given: dict[str, int] = {}
    wanted = set(names)
    try:
        for row in reader:
            name, text = str(row["name"] or "").strip(), str(row["fold"] or "").strip()
            where = f"{path}: line {reader.line_num}"
            if not text.isascii() or not text.isdigit() or int(text) >= folds:
                raise ConfigError(f"{where}: fold {text!r} is not one of 0..{folds - 1} ([study] folds = {folds})")
            if name not in wanted:
                raise ConfigError(f"{where}: {name!r} is not a train or valid slice of the dataset "
                                  "(test slices stay out of every fold)")
            if name in given:
                raise ConfigError(f"{where}: {name!r} is listed twice")
            given[name] = int(text)
    except csv.Error as exc:
        raise ConfigError(f"{path}: line {reader.line_num + 1}: not valid CSV ({exc})") from None
    missing = [n for n in names if n not in given]
    if missing:
        raise ConfigError(f"{path}: {len(missing)} train/valid slices have no fold, e.g. {missing[0]!r}")
    fold_of = np.array([given[n] for n in names], np.int64)
    empty = sorted(set(range(folds)) - set(fold_of.tolist()))
    if empty:
        raise ConfigError(f"{path}: fold {empty[0]} has no slices")
    return fold_of

"""Patient-level splits: train/valid/test fractions or K folds, seeded, each part holding
foreground and, where the patients allow, every foreground class. A patient's slices always
stay together, so neighbouring slices cannot leak.

Stratification by class: before the parts are balanced by slice count, each class in turn (the
rarest first, by patients holding it) gets one patient that holds it into every part that lacks
it, while such patients remain. With one foreground class this is the one-positive-patient-per-
part rule of a binary split, so binary splits are the same as before classes were counted.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from flexunet.errors import DataError

PARTS = ("train", "valid", "test")


@dataclass(frozen=True)
class PatientInfo:
    slices: int
    positive_slices: int
    classes: frozenset[int] = frozenset()  # foreground classes in the patient's masks

    @property
    def positive(self) -> bool:
        return self.positive_slices > 0

    @property
    def held(self) -> frozenset[int]:
        """The foreground classes the patient holds (class 1 for a positive patient without a
        class list: a binary dataset)."""
        return self.classes or (frozenset({1}) if self.positive else frozenset())

    def add(self, mask_classes: frozenset[int]) -> PatientInfo:
        """This patient with one more slice, whose mask holds ``mask_classes``."""
        return PatientInfo(self.slices + 1, self.positive_slices + int(bool(mask_classes)),
                           self.classes | mask_classes)


def missing_classes(groups: Sequence[Sequence[str]], patients: Mapping[str, PatientInfo]) -> dict[int, list[int]]:
    """Group index -> the classes of the dataset that none of its patients holds (only groups
    that lack one).

    >>> info = {"a": PatientInfo(1, 1, frozenset({1, 2})), "b": PatientInfo(1, 1, frozenset({1}))}
    >>> missing_classes([["a"], ["b"]], info)
    {1: [2]}
    """
    every = set().union(*(info.held for info in patients.values())) if patients else set()
    out = {}
    for k, group in enumerate(groups):
        held = set().union(*(patients[p].held for p in group)) if group else set()
        if every - held:
            out[k] = sorted(every - held)
    return out


def parse_fractions(text: str) -> tuple[float, float, float]:
    """``"0.7,0.15,0.15"`` -> (0.7, 0.15, 0.15), checked to be positive and sum to 1."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise DataError(f"--split {text!r}: expected three numbers like 0.7,0.15,0.15") from None
    if len(values) != 3 or any(not (0 < v < 1) for v in values) or abs(sum(values) - 1) > 1e-6:
        raise DataError(f"--split {text!r}: expected three fractions in (0, 1) that sum to 1")
    return values  # type: ignore[return-value]


def split_patients(patients: Mapping[str, PatientInfo], fractions: Sequence[float],
                   seed: int) -> dict[str, list[str]]:
    """Assign each patient to train/valid/test, balancing slice counts towards the fractions."""
    groups = _balanced_groups(patients, fractions, seed, len(PARTS))
    return {part: sorted(group) for part, group in zip(PARTS, groups)}


def split_holding_out(patients: Mapping[str, PatientInfo], test: Sequence[str], fractions: Sequence[float],
                      seed: int) -> dict[str, list[str]]:
    """``test`` as the test part (an outer cross-validation fold, say); every other patient goes
    to train or valid, balanced by slice count in the ratio ``fractions[0] : fractions[1]``.

    >>> info = {p: PatientInfo(2, 1) for p in "abcde"}
    >>> split_holding_out(info, ["e"], (0.7, 0.15, 0.15), 0)["test"]
    ['e']
    """
    test_set = set(test)
    unknown = sorted(test_set - set(patients))
    if unknown:
        raise DataError(f"test patients {', '.join(unknown)}: not in the dataset "
                        f"(it has {', '.join(sorted(patients)) or 'none'})")
    if not test_set:
        raise DataError("test patients: the list is empty")
    rest = {p: info for p, info in patients.items() if p not in test_set}
    groups = _balanced_groups(rest, [fractions[0], fractions[1]], seed, 2)
    return {"train": sorted(groups[0]), "valid": sorted(groups[1]), "test": sorted(test_set)}


def fold_patients(patients: Mapping[str, PatientInfo], folds: int, seed: int) -> list[dict[str, list[str]]]:
    """K folds: fold k tests on group k, validates on group k+1 and trains on the rest."""
    if folds < 3:
        raise DataError(f"--folds {folds}: need at least 3 (each fold has a train, valid and test group)")
    groups = _balanced_groups(patients, [1.0 / folds] * folds, seed, folds)
    result = []
    for k in range(folds):
        valid = (k + 1) % folds
        train = [p for i, g in enumerate(groups) if i not in (k, valid) for p in g]
        result.append({"train": sorted(train), "valid": sorted(groups[valid]), "test": sorted(groups[k])})
    return result


def cv_folds(patients: Mapping[str, PatientInfo], folds: int, seed: int) -> list[list[str]]:
    """K patient groups for cross-validation (fold k validates on group k and trains on the
    others), balanced by slice count, each with a patient that has foreground.

    >>> cv_folds({"a": PatientInfo(2, 1), "b": PatientInfo(1, 1), "c": PatientInfo(3, 0)}, 2, 0)
    [['a'], ['b', 'c']]
    """
    if folds < 2:
        raise DataError(f"folds = {folds}: cross-validation needs at least 2")
    return [sorted(group) for group in _balanced_groups(patients, [1.0 / folds] * folds, seed, folds)]


def _classes_of(patients: Mapping[str, PatientInfo], group: Sequence[str]) -> set[int]:
    return set().union(*(patients[p].held for p in group)) if group else set()


def check_disjoint(parts: Mapping[str, Sequence[str]]) -> None:
    """Raise if any patient appears in two parts."""
    seen: dict[str, str] = {}
    for part, patients in parts.items():
        for patient in patients:
            if patient in seen:
                raise DataError(f"patient {patient} is in both {seen[patient]} and {part}")
            seen[patient] = part


def _balanced_groups(patients: Mapping[str, PatientInfo], fractions: Sequence[float], seed: int,
                     n: int) -> list[list[str]]:
    positive = sorted(p for p, info in patients.items() if info.positive)
    negative = sorted(p for p, info in patients.items() if not info.positive)
    if len(positive) < n:
        raise DataError(f"{len(positive)} patients have foreground, but {n} parts each need one: "
                        "add patients or use fewer parts")
    rng = random.Random(seed)
    rng.shuffle(positive)
    rng.shuffle(negative)
    total = sum(info.slices for info in patients.values())
    targets = [f * total for f in fractions]
    groups: list[list[str]] = [[] for _ in range(n)]
    counts = [0] * n
    # Every part gets a patient of every class while some remain, the rarest class first, so
    # that every part can be scored on every class (binary: one positive patient per part).
    free = list(positive)
    holders = {c: sum(1 for p in positive if c in patients[p].held) for c in set().union(*(patients[p].held for p in positive))}
    for c in sorted(holders, key=lambda c: (holders[c], c)):
        for k in range(n):
            if any(c in patients[p].held for p in groups[k]):
                continue
            lacking = _classes_of(patients, free) - _classes_of(patients, groups[k])
            candidates = [p for p in free if c in patients[p].held]
            if not candidates:
                break
            # The patient that brings the part most of what it lacks (the first in the seeded
            # order on ties, which is every patient of a binary dataset).
            patient = max(candidates, key=lambda p: len(patients[p].held & lacking))
            # A part that already has foreground takes no patient that an empty part needs.
            if groups[k] and len(free) <= sum(1 for g in groups if not g):
                continue
            free.remove(patient)
            groups[k].append(patient)
            counts[k] += patients[patient].slices
    for k in range(n):  # a part still without foreground (classes all taken): any positive left
        if not groups[k]:
            patient = free.pop(0)
            groups[k].append(patient)
            counts[k] += patients[patient].slices
    for patient in free + negative:
        k = max(range(n), key=lambda i: (targets[i] - counts[i]) / targets[i])
        groups[k].append(patient)
        counts[k] += patients[patient].slices
    return groups

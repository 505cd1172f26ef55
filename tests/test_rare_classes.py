"""Issue 23: folds that hold every class where the patients allow, rare classes drawn into
training batches, and a class-weighted loss."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import keras
import numpy as np
import pytest

from conftest import run_cli_here
from flexunet import config as cfg
from flexunet import losses
from flexunet.data.batches import Batches, resolve_class_sampling
from flexunet.data.dataset import SliceSet, load_split
from flexunet.data.split import PatientInfo, cv_folds, missing_classes
from search.spec import folds


def _info(classes: dict[str, set[int]]) -> dict[str, PatientInfo]:
    return {p: PatientInfo(2, 2 if c else 0, frozenset(c)) for p, c in classes.items()}


def test_every_fold_gets_a_patient_of_each_class_that_has_enough_patients() -> None:
    patients = _info({"a": {1}, "b": {1}, "c": {1}, "d": {1}, "e": {1}, "f": {1},
                      "g": {2}, "h": {2}, "i": {2},   # class 2: 3 patients, one per fold
                      "j": {3}, "k": {3}})            # class 3: 2 patients, one fold must lack it
    for seed in range(20):
        groups = cv_folds(patients, 3, seed)
        missing = missing_classes(groups, patients)
        assert sum(1 for c in missing.values() if 2 in c) == 0, (seed, groups)
        assert [c for c in missing.values()] == [[3]], (seed, groups)


def test_a_binary_split_is_the_one_positive_patient_per_part_rule() -> None:
    """With one class, the classes change nothing: the rule of a binary split is unchanged
    (one positive patient per part in the seeded order, then the rest by slice count)."""
    patients = {f"p{i}": PatientInfo(1 + i % 4, i % 3) for i in range(12)}   # negatives among them
    with_classes = {p: dataclasses.replace(v, classes=frozenset({1}) if v.positive else frozenset())
                    for p, v in patients.items()}
    for seed in range(20):
        assert cv_folds(patients, 3, seed) == cv_folds(with_classes, 3, seed)
    # The bundled sample's 3 folds at seed 0, as the search has always drawn them.
    assert cv_folds(_info({"051": {1}, "078": {1}}), 2, 0) == [["051"], ["078"]]


def _slices(masks: np.ndarray) -> SliceSet:
    n = len(masks)
    return SliceSet(np.zeros((n, *masks.shape[1:], 1), np.uint8), masks, [str(i) for i in range(n)], [(8, 8)] * n)


def test_batches_draw_the_rare_class_into_the_last_share_of_each_batch() -> None:
    masks = np.zeros((20, 8, 8), np.uint8)
    masks[:19, 0, 0] = 1
    masks[19, 0, 0] = 2          # one slice of 20 holds class 2
    batches = Batches(_slices(masks), 4, shuffle=True, seed=1, steps=50, class_sampling=0.5)
    order = batches.order(0).reshape(50, 4)
    drawn = order[:, 2:]         # slots 2 and 3 of every batch of 4 are drawn by class
    share = float(np.mean(drawn == 19))
    assert 0.35 < share < 0.65   # class 2 is drawn half the time, against 1/20 by chance
    assert float(np.mean(order[:, :2] == 19)) < 0.2
    assert np.array_equal(order, batches.order(0).reshape(50, 4))   # seeded: the same every time


def test_class_sampling_is_off_by_default_where_every_slice_holds_every_class() -> None:
    every = np.ones((6, 8, 8), np.uint8)
    assert Batches(_slices(every), 2, shuffle=True, seed=3, steps=5).class_sampling == 0.0
    some = every.copy()
    some[:3] = 0
    assert Batches(_slices(some), 2, shuffle=True, seed=3, steps=5).class_sampling == pytest.approx(1 / 3)
    assert resolve_class_sampling(0.0, {1: np.arange(3)}, 6) == 0.0


def test_the_class_weighted_loss_is_the_plain_loss_with_equal_weights_and_reloads(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    true = np.eye(3, dtype=np.float32)[rng.integers(0, 3, (2, 8, 8))]
    logits = rng.normal(size=true.shape).astype(np.float32)
    pred = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    for name in cfg.LOSSES:
        plain = float(losses.get(name)(true, pred))
        assert float(losses.get(name, (1.0, 1.0, 1.0))(true, pred)) == pytest.approx(plain, rel=1e-5), name
    heavy = float(losses.get("categorical_crossentropy", (1.0, 1.0, 10.0))(true, pred))
    assert heavy > float(losses.get("categorical_crossentropy")(true, pred))
    inputs = keras.Input((8, 8, 1))
    model = keras.Model(inputs, keras.layers.Conv2D(3, 1, activation="softmax")(inputs))
    model.compile(optimizer="adam", loss=losses.get("categorical_crossentropy+dice_loss", (0.5, 2.0, 4.0)))
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras", safe_mode=True)
    assert loaded.loss.weights == (0.5, 2.0, 4.0) and loaded.loss.base == "categorical_crossentropy+dice_loss"


def test_class_weights_and_sampling_are_settings_a_study_may_search() -> None:
    assert cfg.searchable()["class_weights"] == "model" and cfg.searchable()["class_sampling"] == "train"


@pytest.fixture(scope="module")
def typed64(tmp_path_factory: pytest.TempPathFactory, sample: Path) -> Path:
    # 64 px: at 32 px one lesion (079's slice 14) is lost to the resize.
    out = tmp_path_factory.mktemp("typed") / "data"
    run = run_cli_here("prepare", "ct-ich", sample, out, "--size", "64", "--hemorrhage-types")
    assert run.returncode == 0, run.stderr
    assert "Intraventricular 3, Intraparenchymal 3, Subarachnoid 0, Epidural 19, Subdural 0 slices" in run.stdout
    assert "21 slices with several types" in run.stdout
    return out


def test_hemorrhage_types_make_a_multiclass_sample_from_single_type_slices(typed64: Path) -> None:
    config = cfg.load(typed64 / "train_eval_infer.config")
    assert config.model.num_classes == 6 and len(config.mask.rgb_map) == 6
    masks = np.concatenate([load_split(config, part).masks for part in ("train", "valid", "test")])
    assert len(masks) == 25
    per_slice = [set(np.unique(mk).tolist()) - {0} for mk in masks]
    assert all(len(c) == 1 for c in per_slice)          # one type per slice, every slice a lesion
    counts = {c: sum(1 for s in per_slice if c in s) for c in range(1, 6)}
    assert counts == {1: 3, 2: 3, 3: 0, 4: 19, 5: 0}
    split = json.loads((typed64 / "split.json").read_text())
    assert split["classes"]["4"] == "Epidural"
    # 079 (JPG slice 14) is intraparenchymal in hemorrhage_diagnosis.csv; 080's JPG slices 16,
    # 18 and 20 are intraventricular only; its HU slices (other numbering, a patient of three
    # types) are left out.
    rows = {r.split(",")[0]: r.split(",") for r in (typed64 / "slices.csv").read_text().splitlines()[1:]}
    assert rows["079_14"][5] == "2" and {n for n in rows if n.startswith("080_")} == {"080_16", "080_18", "080_20"}


def test_the_launcher_names_the_classes_a_fold_cannot_hold(typed64: Path) -> None:
    config = cfg.load(typed64 / "train_eval_infer.config")
    missing = folds.missing_classes(config, 3, typed64 / "none.csv", 0)
    # Class 1 has one patient (080) and class 2 two (050, 079), one of them the test patients':
    # every fold lacks one at most as often as the patients force it, and never class 4.
    assert missing and all(set(c) <= {1, 2} for c in missing.values())
    assert sum(1 in c for c in missing.values()) == 2

"""``flexunet search plan`` (issue 21): the fingerprint, the resolution rule, the sizing and its
honest limits, and the study file it writes."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
from pathlib import Path

import cv2
import numpy as np
import optuna
import pytest

from conftest import assert_user_error, run_cli_here
from flexunet import config as cfg
from flexunet.errors import ConfigError, DataError
from search.spec import fingerprint, planner as plan, space
from search.spec.study_file import load as load_spec

# A CPU of this project's kind, measured at 128 px (seconds per training image at two model sizes).
THROUGHPUT = plan.Throughput(device="cpu", image_size=128, seconds_per_image=(0.012, 0.035),
                             gflops=(0.289, 1.151), build_seconds=12.0)


def _independent_counts(sample: Path) -> dict:
    """The bundled sample's slices, patients, sizes and lesions, read with OpenCV alone."""
    slices, patients, sizes, lesions, pixels, total = 0, set(), {}, 0, 0, 0
    masks = []
    for folder in sorted((sample / "Patients_CT").iterdir()):
        for path in sorted((folder / "brain").glob("*_HGE_Seg.jpg")):
            masks.append((folder.name, (cv2.imread(str(path), cv2.IMREAD_GRAYSCALE) > 127).astype(np.uint8)))
    with (sample / "hu_slices" / "manifest.csv").open() as f:
        for row in csv.DictReader(f):
            mask = cv2.imread(str(sample / "hu_slices" / row["mask"]), cv2.IMREAD_GRAYSCALE)
            masks.append((f"{int(row['patient_id']):03d}", (mask > 0).astype(np.uint8)))
    for patient, mask in masks:
        slices += 1
        patients.add(patient)
        key = f"{mask.shape[0]}x{mask.shape[1]}"
        sizes[key] = sizes.get(key, 0) + 1
        lesions += cv2.connectedComponents(mask, connectivity=8)[0] - 1
        pixels += int(mask.sum())
        total += mask.size
    return {"slices": slices, "patients": len(patients), "sizes": sizes, "lesions": lesions, "share": pixels / total}


def test_the_fingerprint_of_the_bundled_sample_matches_counts_made_independently(sample: Path) -> None:
    fp = fingerprint.of_ct_ich(sample)
    expected = _independent_counts(sample)
    assert (fp.images, fp.patients, fp.native_sizes) == (expected["slices"], expected["patients"], expected["sizes"])
    assert fp.images == 46 and fp.patients == 17 and fp.num_classes == 2 and fp.channels == 1
    lesion = fp.classes[1]
    assert lesion.lesions == expected["lesions"] and lesion.slice_share == 1.0 and lesion.patients == 17
    assert lesion.pixel_share == pytest.approx(expected["share"], rel=1e-9)
    assert len(lesion.lesion_shares) == lesion.lesions and list(lesion.lesion_shares) == sorted(lesion.lesion_shares)
    assert json.loads(fp.to_json())["classes"]["1"]["lesions"] == lesion.lesions


def _fingerprint(share: float, lesions: int = 20, side: int = 512) -> fingerprint.Fingerprint:
    masks, names = [], []
    radius = max(1, int(round((share * side * side) ** 0.5 / 2)))
    for i in range(lesions):
        mask = np.zeros((side, side), np.uint8)
        mask[100:100 + 2 * radius, 100:100 + 2 * radius] = 1
        masks.append(mask)
        names.append(f"{i:03d}_1")
    return fingerprint.from_masks(masks, names, [n[:3] for n in names], channels=1, num_classes=2)


def test_the_size_is_the_smallest_at_which_the_10th_percentile_lesion_covers_9_pixels() -> None:
    fp = _fingerprint(share=(16 * 16) / 512**2)    # 16x16 px lesions on 512 px slices
    choice = plan.choose_size(fp)
    assert choice.side == 96                       # 96 px: 3x3 = 9 px; 80 px: 2.5x2.5 = 6.25 px
    assert choice.lesions_under == 0 and choice.lesions == 20
    assert plan.choose_size(fp, ceiling=64).side == 64


def test_a_plan_fits_8_trials_and_its_space_wastes_at_most_5_percent(sample: Path, tmp_path: Path) -> None:
    fp = fingerprint.of_ct_ich(sample)
    sized = plan.size_study(fp, THROUGHPUT, 20, name="p")
    assert sized.expected_trials >= plan.MIN_TRIALS
    assert sized.refit is not None and sized.refit_seconds <= sized.timeout / 3
    assert sized.baseline_seconds + sized.search_seconds + sized.refit_seconds <= sized.timeout + 1e-6
    source = plan.Source(sample, prepare=True)
    out = tmp_path / "p.toml"
    out.write_text(plan.study_text(sized, fp, source, out))
    spec = load_spec(out)
    assert spec.image_size == sized.size.side and spec.budget.max_gflops == sized.max_gflops
    base = cfg.load(Path(__file__).parent / "data" / "seed_ich.config")
    bounded = space.bounded(spec.space, spec.image_size, "p")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    refused = 0
    for _ in range(300):
        trial = study.ask()
        config = space.trial_config(base, spec, spec.image_size, space.suggest(trial, bounded))
        refused += space.infeasible(config, spec.budget) is not None
        study.tell(trial, 0.0)
    assert refused / 300 <= 0.05
    # The configurations that did well on this data stay in the space (base 16, 4 levels, 3x3).
    assert sized.base_filters[0] <= 16 <= sized.base_filters[1]
    assert sized.num_layers[0] <= 4 <= sized.num_layers[1] and 3 in sized.kernels


def test_a_short_budget_gives_up_the_baseline_then_a_fold_before_the_lesions(sample: Path, tmp_path: Path) -> None:
    fp = fingerprint.of_ct_ich(sample)
    slow = plan.Throughput("cpu", 128, (0.1, 0.17), (0.289, 1.151), 7.0)   # this kind of VM, measured
    sized = {m: plan.size_study(fp, slow, m, name="p") for m in (10, 20, 40)}
    assert sized[40].baseline and sized[40].folds == 3 and sized[20].baseline
    short = sized[10]
    # At 10 minutes the baseline (seed settings trained in full) would leave only 48 px, where
    # 49 of the 70 lesions are under 9 px; without it the search keeps 64 px.
    assert not short.baseline and short.baseline_seconds == 0 and short.folds == 3
    assert short.size.side == 64 and short.size.lesions_under / short.size.lesions <= plan.MAX_LESIONS_LOST
    assert any("the baseline left out to keep 64 px" in note for note in short.notes)
    out = tmp_path / "s.toml"
    out.write_text(plan.study_text(short, fp, plan.Source(sample, prepare=True), out))
    spec = load_spec(out)
    assert spec.baseline is False and spec.image_size == 64
    # Slower still, a fold goes too before the lesions do.
    slower = plan.size_study(fp, dataclasses.replace(slow, seconds_per_image=(0.14, 0.24)), 10, name="p")
    assert (slower.folds, slower.baseline) == (2, False), slower.lines()


def test_a_budget_with_room_to_spare_trains_longer_rather_than_only_bigger(sample: Path, tmp_path: Path) -> None:
    fp = fingerprint.of_ct_ich(sample)
    cpu = plan.size_study(fp, THROUGHPUT, 20, name="p")
    assert (cpu.max_epochs, cpu.steps_per_epoch) == (8, 8)   # the sample on a CPU: the shortest fidelity
    # A GPU's throughput and a data set of 2,500 slices over 12 hours: models first get room up
    # to 4x the reference's cost, then trials train longer while 30 of them still fit.
    gpu = plan.Throughput("gpu", 256, (0.002, 0.004), (4.6, 18.4), 20.0)
    full = dataclasses.replace(fp, images=2500, patients=82)
    long = plan.size_study(full, gpu, 720, name="p", gpus=("0",))
    assert long.max_epochs > 8 and long.steps_per_epoch > 8, long.lines()
    assert long.steps_per_epoch <= math.ceil(2500 * 0.85 * 2 / 3 / 4)   # at most one pass over a fold's slices
    assert long.expected_trials >= plan.TARGET_TRIALS
    assert long.max_gflops >= plan.MODEL_ROOM * plan.reference_gflops(long.size.side, full)
    assert long.refit is not None and long.refit.epochs >= 2 * long.max_epochs
    out = tmp_path / "gpu.toml"
    out.write_text(plan.study_text(long, full, plan.Source(sample, prepare=True), out))
    spec = load_spec(out)
    assert spec.budget.max_epochs == long.max_epochs and spec.fixed["steps_per_epoch"] == long.steps_per_epoch
    assert spec.fixed["patience"] == long.max_epochs // 4 and spec.pruner.kwargs["min_resource"] == long.max_epochs // 4


def test_a_budget_too_small_says_how_many_minutes_it_needs(sample: Path) -> None:
    fp = fingerprint.of_ct_ich(sample)
    slow = plan.Throughput("cpu", 128, (1.0, 2.0), (0.3, 1.2), 60.0)
    with pytest.raises((ConfigError, DataError), match=r"minutes"):
        plan.size_study(fp, slow, 2, name="p")


def test_lesions_too_small_for_any_affordable_size_are_named() -> None:
    fp = _fingerprint(share=4 / 512**2)            # 2x2 px lesions on 512 px slices
    with pytest.raises(DataError, match=r"lesions are under 9 px .* need \d+ px \(\d+ minutes\)"):
        plan.size_study(fp, THROUGHPUT, 15, name="p")


def test_bad_datasets_get_one_line(tmp_path: Path, prepared64: Path) -> None:
    config = prepared64 / "train_eval_infer.config"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_user_error(run_cli_here("search", "plan", empty, "--minutes", "10", "--out", tmp_path / "a.toml"),
                      "no CT-ICH data found")
    flat = tmp_path / "flat"
    for part in ("train", "valid", "test"):
        for kind in ("images", "masks"):
            (flat / part / kind).mkdir(parents=True)
        for path in (prepared64 / part / "images").glob("*.png"):
            (flat / part / "images" / path.name).write_bytes(path.read_bytes())
            cv2.imwrite(str(flat / part / "masks" / path.name), np.zeros((64, 64), np.uint8))
    text = config.read_text().replace(str(prepared64.resolve()), str(flat.resolve()))
    (flat / "c.config").write_text(text)
    assert_user_error(run_cli_here("search", "plan", flat / "c.config", "--minutes", "10", "--out", tmp_path / "b.toml"),
                      "no mask holds any foreground")
    first = sorted((flat / "train" / "masks").glob("*.png"))[0]
    cv2.imwrite(str(first), np.zeros((32, 32), np.uint8))
    assert_user_error(run_cli_here("search", "plan", flat / "c.config", "--minutes", "10", "--out", tmp_path / "b.toml"),
                      "mask is 32x32 but its image")
    assert_user_error(run_cli_here("search", "plan", prepared64 / "train_eval_infer.config", "--minutes", "10",
                                   "--gpus", "0", "--out", tmp_path / "c.toml"), "no GPU to measure")
    assert not any((tmp_path / n).exists() for n in ("a.toml", "b.toml", "c.toml"))


def test_the_plan_command_writes_a_study_that_loads(tmp_path: Path, sample: Path) -> None:
    throughput = tmp_path / "tp.json"
    throughput.write_text(THROUGHPUT.to_json())
    out = tmp_path / "plans" / "sample.toml"
    run = run_cli_here("search", "plan", sample, "--minutes", "20", "--out", out, "--throughput", throughput)
    assert run.returncode == 0, run.stderr
    assert "image size" in run.stdout and "wrote" in run.stdout
    spec = load_spec(out)
    assert spec.prepare is not None and spec.prepare.source.resolve() == sample.resolve()
    assert spec.folds == 3 and spec.budget.timeout < 20 * 60
    # The refit's estimate fits the third of the timeout the launcher may keep for it.
    assert spec.refit is not None and "refit" in run.stdout
    assert json.loads((out.parent / "sample.fingerprint.json").read_text())["images"] == 46
    assert plan.Throughput.read(out.parent / "sample.throughput.json") == THROUGHPUT.at(THROUGHPUT.image_size)


def test_the_shipped_sample_study_is_what_plan_writes_for_it(sample: Path) -> None:
    """studies/ct_ich_sample.toml is `flexunet search plan studies/data/ct-ich --minutes 20
    --throughput studies/ct_ich_sample.throughput.json --out studies/ct_ich_sample.toml`, byte for
    byte, with the measurement and the fingerprint it was planned from beside it."""
    from conftest import ROOT
    from search import paths

    study = ROOT / "studies" / "ct_ich_sample.toml"
    throughput = plan.Throughput.read(paths.plan_throughput(study))
    fp = fingerprint.of_ct_ich(sample)
    shipped, counted = json.loads(paths.plan_fingerprint(study).read_text()), json.loads(fp.to_json())
    assert shipped.pop("source") == "studies/data/ct-ich" and {**counted, "source": None} == {**shipped, "source": None}
    sized = plan.size_study(fp, throughput, 20, name="ct-ich-sample")
    assert plan.study_text(sized, fp, plan.Source(sample, prepare=True), study) == study.read_text(), (
        "re-plan it: flexunet search plan studies/data/ct-ich --minutes 20 --throughput "
        "studies/ct_ich_sample.throughput.json --out studies/ct_ich_sample.toml")


def test_the_shipped_gpu_study_is_what_plan_writes_from_its_stated_tables(tmp_path: Path) -> None:
    """studies/ct_ich.toml is the 12-hour plan for one GPU of the full data set, which is not on
    this machine: planned from a stated throughput (BENCHMARKS.md section 6) and a stated
    fingerprint (--fingerprint), with DATA a folder that need not exist."""
    from conftest import ROOT
    from search import paths

    study = ROOT / "studies" / "ct_ich.toml"
    full = study.parent / "data" / "ct-ich-full"
    assert not full.exists()
    out = tmp_path / "ct_ich.toml"
    run = run_cli_here("search", "plan", full, "--minutes", "720", "--gpus", "0", "--out", out, "--name", "ct-ich",
                       "--throughput", paths.plan_throughput(study), "--fingerprint", paths.plan_fingerprint(study))
    assert run.returncode == 0, run.stderr
    spec = load_spec(out)
    assert spec.prepare is not None and spec.prepare.source.resolve() == full.resolve()
    assert spec.budget.max_epochs > 8 and "Throughput: stated, not measured" in out.read_text()
    assert out.read_text().replace(f'source = "{Path(os.path.relpath(full, tmp_path)).as_posix()}"',
                                   'source = "data/ct-ich-full"') == study.read_text()
    assert paths.plan_fingerprint(out).read_text() == paths.plan_fingerprint(study).read_text()
    assert_user_error(run_cli_here("search", "plan", full, "--minutes", "10", "--out", tmp_path / "x.toml"),
                      "no such dataset folder")

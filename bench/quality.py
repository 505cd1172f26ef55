"""Segmentation quality: the seed's hand-tuned configuration against the one the search found,
by patient-level K-fold cross-validation on the bundled CT-ICH sample.

The sample is prepared with ``--folds K`` (``flexunet.data.ct_ich.prepare``): fold k tests on
patient group k, validates (early stopping, best epoch) on group k+1 and trains on the rest.
Two configurations are trained on every fold with the same epoch budget:

- seed: ``search.space.SEED_BASELINE`` with ``seed_layers`` levels, built as
  ``search.space.trial_config(..., baseline=True)`` builds a study's trial 0;
- found: the best trial's ``settings`` of a finished sample study (``--study-db``/``--study-name``),
  or, without one, of a sample study this script runs first
  (``flexunet search run studies/ct_ich_sample.toml``; in --quick a tiny budget).

Each fold's model is evaluated on that fold's test patients with ``flexunet.evaluate.score``:
foreground Dice (global over the fold's test slices, and per image), and per patient the mean
Dice over the patient's hemorrhage slices (the figure Hssayeni et al. report, averaged over
patients).

    python bench/quality.py [--quick] [--size 128] [--folds 5] [--epochs 15]
                            [--study-db sqlite:///runs/ct-ich-sample/study.db --study-name ct-ich-sample]
                            [--json FILE]

Last line: ``found_cv_foreground_dice: X`` (the found configuration's foreground Dice, mean over
folds).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common as c

REFERENCES = [
    ("Hssayeni et al. 2020, U-Net, 5-fold CV by patient, full CT-ICH (82 patients, 36 with hemorrhage)",
     "0.31", "mean over patients of the mean Dice over each patient's hemorrhage slices"),
    ("HGI-SAM 2023 (weakly supervised), same data", "0.44", "as reported by its authors"),
    ("docs/design.md floor: seed-style FlexUNet (lr 7e-5, 11x11, 6 levels), this sample, 5-fold, 128 px, 40 epochs",
     "0.03 ± 0.03", "foreground Dice"),
    ("docs/design.md floor: plain batch-normed U-Net (lr 1e-3), same protocol", "0.07 ± 0.06", "foreground Dice"),
    ("the seed project's 0.998", "not comparable", "background-inclusive Dice on a slice-level leaking split"),
]


def found_settings(args: argparse.Namespace, work: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The best trial's settings and where they came from."""
    import optuna

    url, name = args.study_db, args.study_name
    command = None
    if not url:
        out = work / "sample-study"
        command = [sys.executable, "-m", "flexunet.cli", "search", "run", str(c.SAMPLE_STUDY), "--out", str(out),
                   "--image-size", str(args.size)]
        if args.quick:
            command += ["--n-trials", "2", "--max-epochs", "2"]
        c.log("running the sample study for its best configuration:", " ".join(command))
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
        if done.returncode != 0:
            raise SystemExit(f"search run failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        c.log(f"  finished in {time.perf_counter() - started:.0f} s")
        url, name = f"sqlite:///{out / 'study.db'}", "ct-ich-sample"
    study = optuna.load_study(study_name=name, storage=url)
    best = study.best_trial
    settings = dict(best.user_attrs["settings"])
    source = {"storage": url if command is None else "(temporary) " + url, "study": name, "trial": best.number,
              "val_foreground_dice": best.values[0], "params": best.params, "command": " ".join(command or []),
              "trials": len(study.trials)}
    c.log(f"found configuration: study {name!r} trial {best.number}, validation foreground Dice {best.values[0]:.4f}: "
          f"{best.params}")
    return settings, source


def configs_for_fold(fold_config: Path, settings: dict[str, Any], args: argparse.Namespace):  # -> dict[str, Config]
    from flexunet import config as cfg
    from search import space as sp
    from search import study_file

    base = cfg.load(fold_config)
    spec = study_file.load(c.SAMPLE_STUDY).with_overrides(max_epochs=args.epochs, image_size=args.size)
    seed = sp.trial_config(base, spec, args.size, {}, baseline=True)
    model_keys = {k: v for k, v in settings.items() if k in vars(base.model)}
    train_keys = {k: v for k, v in settings.items() if k in vars(base.train)}
    found = cfg.override(base, "model", model_keys, "found settings")
    found = cfg.override(found, "train", train_keys, "found settings")
    found = cfg.override(found, "train", {"epochs": args.epochs}, "bench epochs")
    if found.model.input_shape != seed.model.input_shape:
        raise SystemExit(f"the found configuration is for {found.model.input_shape} images, the folds are "
                         f"{seed.model.input_shape}: pass --size to match the study")
    return {"seed": seed, "found": found}


def train_and_score(config) -> dict[str, Any]:  # config: flexunet.config.Config
    import keras

    from flexunet.data.dataset import load_split
    from flexunet.evaluate import predict_classes, score
    from flexunet.model import count_params
    from flexunet.train import fit

    train, valid, test = (load_split(config, part) for part in ("train", "valid", "test"))
    started = time.perf_counter()
    result = fit(config.model, config.train, train, valid, verbose=0)
    seconds = time.perf_counter() - started
    pred = predict_classes(result.model, test, config.train.batch_size)
    evaluation = score(pred, test.masks, test.names, config.model.num_classes, config.dataset.patient_pattern)
    keras.backend.clear_session()
    s = evaluation.summary
    return {
        "train_slices": len(train), "valid_slices": len(valid), "test_slices": len(test),
        "params": count_params(config.model), "epochs_run": result.epochs_run, "best_epoch": result.best_epoch,
        "stop_reason": result.stop_reason, "best_val_dice": result.best_val_dice, "train_seconds": round(seconds, 1),
        "test_foreground_dice_global": s["foreground_dice_global"],
        "test_foreground_dice_mean_per_image": s["foreground_dice_mean_per_image"],
        "test_patient_mean_dice_over_positive_slices": s.get("patient_mean_dice_over_positive_slices"),
        "per_patient": {p: {"slices": v["slices"], "positive_slices": v["positive_slices"],
                            "dice_mean_over_positive_slices": v["dice_mean_over_positive_slices"],
                            "foreground_dice_global": v["foreground_dice_global"]}
                        for p, v in s.get("per_patient", {}).items()},
        "detection_sensitivity": s["detection"]["sensitivity"],
    }


def mean_sd(values: list[float]) -> str:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "n/a"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f} (min {min(values):.3f}, max {max(values):.3f}, n={len(values)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a run of under two minutes")
    parser.add_argument("--size", type=int)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--max-folds", type=int, help="evaluate only the first N folds")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--study-db", help="storage URL of a finished sample study")
    parser.add_argument("--study-name", default="ct-ich-sample")
    parser.add_argument("--json", help="write every figure to this file")
    args = parser.parse_args()
    defaults = dict(size=32, epochs=2, max_folds=2) if args.quick else dict(size=128, epochs=15, max_folds=None)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    c.quiet_tf()
    import optuna

    from flexunet.data import ct_ich

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    c.log("machine:", c.machine())
    work = Path(tempfile.mkdtemp(prefix="bench-quality-"))
    results: dict[str, Any] = {"quick": args.quick, "machine": c.machine(), "args": vars(args), "folds": []}
    try:
        settings, source = found_settings(args, work)
        results["found_source"], results["found_settings"] = source, settings
        folds_dir = work / "folds"
        ct_ich.prepare(c.SAMPLE, folds_dir, size=args.size, folds=args.folds, seed=0)
        c.log(f"prepared {args.folds} patient folds at {args.size} px (flexunet prepare ct-ich "
              f"studies/data/ct-ich OUT --folds {args.folds} --size {args.size}); {args.epochs} epochs per model")
        n = min(args.folds, args.max_folds or args.folds)
        for k in range(n):
            configs = configs_for_fold(folds_dir / f"fold_{k}" / "train_eval_infer.config", settings, args)
            row: dict[str, Any] = {"fold": k}
            for name in (("seed", "found") if k % 2 == 0 else ("found", "seed")):
                r = train_and_score(configs[name])
                row[name] = r
                c.log(f"fold {k} {name:<5} test Dice {r['test_foreground_dice_global']:.4f} (per image "
                      f"{r['test_foreground_dice_mean_per_image']:.4f}, per patient "
                      f"{r['test_patient_mean_dice_over_positive_slices']:.4f}); val {r['best_val_dice']:.4f}; "
                      f"epochs {r['epochs_run']} (best {r['best_epoch']}, {r['stop_reason']}); "
                      f"{r['test_slices']} test slices; {r['train_seconds']:.0f} s")
            results["folds"].append(row)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print()
    print("| fold | test patients (slices) | seed: test Dice | found: test Dice | seed: per patient | found: per patient |")
    print("|---|---|---|---|---|---|")
    for row in results["folds"]:
        s, f = row["seed"], row["found"]
        print(f"| {row['fold']} | {len(s['per_patient'])} ({s['test_slices']}) | {s['test_foreground_dice_global']:.4f} | "
              f"{f['test_foreground_dice_global']:.4f} | {s['test_patient_mean_dice_over_positive_slices']:.4f} | "
              f"{f['test_patient_mean_dice_over_positive_slices']:.4f} |")
    print()
    summary: dict[str, Any] = {}
    for name in ("seed", "found"):
        rows = [row[name] for row in results["folds"]]
        patients = {p: v["dice_mean_over_positive_slices"] for r in rows for p, v in r["per_patient"].items()}
        summary[name] = {
            "fold_dice_global": [r["test_foreground_dice_global"] for r in rows],
            "fold_dice_per_image": [r["test_foreground_dice_mean_per_image"] for r in rows],
            "fold_patient_dice": [r["test_patient_mean_dice_over_positive_slices"] for r in rows],
            "patients": patients,
            "params": rows[0]["params"] if rows else None,
        }
        c.log(f"{name}: {rows[0]['params']:,} parameters; foreground Dice over folds {mean_sd(summary[name]['fold_dice_global'])}")
        c.log(f"{name}: mean per image, over folds {mean_sd(summary[name]['fold_dice_per_image'])}")
        c.log(f"{name}: per patient (mean Dice over hemorrhage slices), all {len(patients)} test patients "
              f"{mean_sd(list(patients.values()))}")
        c.log(f"{name}: per patient: " + ", ".join(f"{p} {v:.2f}" for p, v in sorted(patients.items())))
    results["summary"] = summary
    c.log("published reference points (docs/design.md), beside these results:")
    for what, value, note in REFERENCES:
        c.log(f"  {value:<16} {what} [{note}]")
    c.log("comparable: the metric definitions (foreground Dice; per-patient mean over hemorrhage slices, as "
          "Hssayeni et al.) and the protocol (K-fold CV split by patient). Not comparable: the data -- this sample "
          "has 46 slices of 17 patients, all with hemorrhage, resized to "
          f"{args.size} px, against 82 patients (2,501 slices, 318 with hemorrhage) at full resolution; "
          "and the found configuration was chosen on validation patients of the study's own split, who are "
          "test patients of some folds here (an optimistic bias).")
    c.write_json(args.json, results)
    found = [v for v in summary["found"]["fold_dice_global"] if not math.isnan(v)]
    c.headline("found_cv_foreground_dice", statistics.mean(found) if found else float("nan"))


if __name__ == "__main__":
    main()

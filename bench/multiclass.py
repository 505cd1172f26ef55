"""What a multi-class study measures (issue 23): read a finished study and its export.

Run the multi-class sample study as a user would, export it, then point this script at both:

    flexunet search run studies/ct_ich_types_sample.toml --out runs/types
    flexunet search export studies/ct_ich_types_sample.toml --run-dir runs/types --out runs/types/best
    python bench/multiclass.py --run-dir runs/types --export runs/types/best

It prints:

- trials by state, the best pooled out-of-fold value and the baseline's;
- every trial whose value or any reported fold value came from an absent class: there must be
  none (a value above 0 needs true-positive pixels of a class present in the fold);
- the pruned trials that had found lesion pixels (a reported intermediate value above 0) when
  the pruner stopped them;
- the export's per-class test Dice, recomputed here from its masks with plain set counts (not
  flexunet's scoring) against ``evaluation.json``'s headline and per-class figures;
- what an all-background model scores on the same test slices and on the out-of-fold slices:
  0 for every class present, absent classes left out.

``--quick`` runs its own smoke study first (3 trials, 2 epochs, 32 px) into a temporary folder.
The last line is ``multiclass_export_test_dice: VALUE``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from _common import ROOT, headline, machine, quiet_tf, write_json

STUDY = ROOT / "studies" / "ct_ich_types_sample.toml"


def _flexunet(*args: str | Path) -> None:
    subprocess.run([sys.executable, "-m", "flexunet.cli", *map(str, args)], check=True, cwd=ROOT)


def _independent_dice(pred: Any, true: Any, classes: list[int]) -> dict[int, float | None]:
    """Per-class Dice from plain set counts of two class-map stacks (None: absent)."""
    out: dict[int, float | None] = {}
    for c in classes:
        p, t = pred == c, true == c
        denominator = int(p.sum()) + int(t.sum())
        out[c] = None if denominator == 0 else 2 * int((p & t).sum()) / denominator
    return out


def measure(run_dir: Path, export: Path) -> dict[str, Any]:
    quiet_tf()
    import numpy as np
    import optuna

    from flexunet import config as cfg
    from flexunet.data.dataset import load_split
    from flexunet.evaluate import load_model, predict_classes, score
    from search.store import artifacts, storage
    from search import keys, paths

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    db = storage.open_storage(f"sqlite:///{run_dir / paths.STUDY_DB}", heartbeat=False, create=False)
    study = optuna.load_study(study_name="ct-ich-types-sample", storage=db)
    trials = study.get_trials(deepcopy=False)
    states: dict[str, int] = {}
    for t in trials:
        states[t.state.name] = states.get(t.state.name, 0) + 1
    best = study.best_trial
    baseline = next((t for t in trials if t.user_attrs.get(keys.BASELINE)), None)
    pruned = [t for t in trials if t.state == optuna.trial.TrialState.PRUNED and keys.INFEASIBLE_REASON not in t.user_attrs]
    pruned_with_lesions = [t.number for t in pruned if any(v > 0 for v in t.intermediate_values.values())]
    # A value above 0 needs a present class with true positives; the old rule's 1 for an absent
    # class gave 1/K per absent class from the first epoch.
    from_absent = []
    for t in trials:
        per_class = t.user_attrs.get(keys.CLASS_DICE)
        if t.values and per_class is not None:
            present = [d for d in per_class if d is not None]
            mean = float(np.mean(present)) if present else 0.0
            if abs(mean - t.values[0]) > 1e-6:
                from_absent.append(t.number)

    config = cfg.load(export / "train_eval_infer.config")
    test = load_split(config, "test")
    network = load_model(export / "best_model.keras")
    predicted = predict_classes(network, test, config.train.batch_size, config.postprocess)
    classes = list(range(1, config.model.num_classes))
    recomputed = _independent_dice(predicted, test.masks, classes)
    present = [d for d in recomputed.values() if d is not None]
    evaluation = json.loads((export / "evaluation.json").read_text())
    nothing = np.zeros_like(test.masks)
    background_test = score(nothing, test.masks, test.names, config.model.num_classes).summary
    store = artifacts.open_store(artifacts.resolve(None, None, run_dir))
    import io

    oof = np.load(io.BytesIO(store.read(db, best, paths.OOF_PREDICTIONS)), allow_pickle=False)
    background_oof = score(np.zeros_like(oof["masks"]), oof["masks"], list(oof["names"]), config.model.num_classes).summary
    return {
        "trials": states, "best_trial": best.number, "best_pooled_oof_dice": best.values[0],
        "best_class_dice": best.user_attrs.get(keys.CLASS_DICE),
        "baseline_pooled_oof_dice": baseline.values[0] if baseline is not None and baseline.values else None,
        "trials_whose_value_is_not_the_mean_of_present_classes": from_absent,
        "pruned_trials": len(pruned), "pruned_with_lesion_pixels_found": pruned_with_lesions,
        "export_test": {
            "slices": len(test), "headline": evaluation["foreground_dice_global"],
            "averaged_classes": evaluation["averaged_classes"],
            "per_class": {c: evaluation["classes"][str(c)]["dice_global"] for c in classes},
            "recomputed_per_class": recomputed,
            "recomputed_headline": float(np.mean(present)) if present else 0.0,
        },
        "all_background": {
            "test": {"headline": background_test["foreground_dice_global"],
                     "per_class": {c: v["dice_global"] for c, v in background_test["classes"].items()}},
            "out_of_fold": {"headline": background_oof["foreground_dice_global"],
                            "per_class": {c: v["dice_global"] for c, v in background_oof["classes"].items()}},
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, help="the study's --out folder (with study.db and artifacts/)")
    parser.add_argument("--export", type=Path, help="the folder `flexunet search export` wrote")
    parser.add_argument("--quick", action="store_true", help="run a 3-trial smoke study first and read it")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="multiclass-") as tmp:
        if args.quick:
            args.run_dir, args.export = Path(tmp) / "run", Path(tmp) / "run" / "best"
            _flexunet("search", "run", STUDY, "--out", args.run_dir, "--n-trials", "3", "--max-epochs", "2",
                      "--image-size", "32")
            _flexunet("search", "export", STUDY, "--run-dir", args.run_dir, "--out", args.export)
        if args.run_dir is None or args.export is None:
            parser.error("give --run-dir and --export, or --quick")
        result = measure(args.run_dir, args.export)
    print(json.dumps(result, indent=1, default=str))
    write_json(None if args.json is None else str(args.json), {"machine": machine(), **result})
    headline("multiclass_export_test_dice", result["export_test"]["headline"], ".4f")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Why a post-processing rule chosen on out-of-fold predictions does or does not carry over to
the exported ensemble: component sizes of the true lesions, of the stored out-of-fold
predictions (each fold model alone, no flip), of the out-of-fold predictions re-made as the
export predicts (with the flip), and of the ensemble's test predictions; then the guarded and
unguarded choices and what each does to the test Dice.

It reads the test masks to *report* test Dice for each rule; nothing here chooses a rule (the
export's choice never sees the test split).

    python bench/postprocess_sizes.py studies/ct_ich_sample.toml --out runs/ct-ich-sample \\
        --export runs/ct-ich-sample/best [--trial N] [--rule none:2 --rule 0.4:4]

Last line: ``postprocess_sizes: guarded=... unguarded=...`` (the two rules' test Dice).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np


def _sizes(classes: np.ndarray, c: int = 1) -> np.ndarray:
    from scipy import ndimage

    out = []
    for image in classes:
        labels, n = ndimage.label(image == c, structure=np.ones((3, 3), bool))
        if n:
            out.append(np.bincount(labels.ravel())[1:])
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def _summary(sizes: np.ndarray) -> dict[str, object]:
    if not len(sizes):
        return {"components": 0}
    q = np.percentile(sizes, [10, 50, 90]).round(1).tolist()
    return {"components": int(len(sizes)), "p10_median_p90": q, "max": int(sizes.max()),
            "sorted": sorted(int(s) for s in sizes)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study_file")
    parser.add_argument("--out", help="the study's run folder (as given to search run --out)")
    parser.add_argument("--export", required=True, help="the export folder of the trial")
    parser.add_argument("--trial", type=int)
    parser.add_argument("--rule", action="append", default=[], metavar="THRESHOLD:SIZE",
                        help="also report the out-of-fold (with the flip) and test Dice of this rule, e.g. "
                             "none:2 or 0.4:4 (repeatable; reporting only)")
    args = parser.parse_args()

    from flexunet._tf import quiet_import

    quiet_import()
    from flexunet import config as cfg
    from flexunet import postprocess
    from flexunet.data.dataset import load_split
    from flexunet.evaluate import load_model
    from flexunet.metrics import to_classes
    from flexunet.postprocess import PostProcessing
    from search.store import _internals
    from search import paths
    from search.api import Study
    from search.results.export import _development_images, _package, _read_oof, choose_trial, oof_predictions
    from search.spec.space import recorded_config

    study = Study.from_file(args.study_file, out=args.out).open()
    base, store = study.files()
    optuna_study = study.optuna_study
    trial = choose_trial(optuna_study, args.trial)
    storage = _internals.study_storage(optuna_study)
    with tempfile.TemporaryDirectory() as tmp:
        package = _package(trial, storage, store, Path(tmp), tta=True)
        oof = _read_oof(store.download(storage, trial, paths.OOF_PREDICTIONS, Path(tmp)))
        config = recorded_config(base, trial, Path(tmp))
        flipped = oof_predictions(package.fold_models, oof, _development_images(config, oof.names), True)
    exported = cfg.load(Path(args.export) / paths.CONFIG_FILE)
    test = load_split(exported, "test")
    ensemble = load_model(Path(args.export) / "best_model.keras")
    test_probabilities = ensemble.predict(test.images.astype(np.float32), verbose=0)

    stored_sel = postprocess.select(oof.probabilities, oof.masks, oof.folds)
    flipped_sel = postprocess.select(flipped, oof.masks, oof.folds)
    report = {
        "trial": trial.number,
        "true_lesions": {"development": _summary(_sizes(oof.masks)), "test": _summary(_sizes(test.masks))},
        "predicted": {
            "oof_stored": _summary(_sizes(to_classes(oof.probabilities))),
            "oof_flip": _summary(_sizes(to_classes(flipped))),
            "ensemble_test": _summary(_sizes(to_classes(test_probabilities))),
        },
        "choices": {},
    }
    for label, sel in (("oof_stored", stored_sel), ("oof_flip", flipped_sel)):
        report["choices"][label] = {
            "size_caps": sel.size_caps,
            "guarded": repr(sel.rules), "guarded_oof_dice": [sel.dice, sel.dice_postprocessed],
            "guarded_fold_dice": [sel.fold_dice, sel.fold_dice_postprocessed],
            "unguarded": repr(sel.unguarded), "unguarded_oof_dice": sel.unguarded_dice,
            "test_dice_none": postprocess.pooled_dice(test_probabilities, test.masks, PostProcessing()),
            "test_dice_guarded": postprocess.pooled_dice(test_probabilities, test.masks, sel.rules),
            "test_dice_unguarded": postprocess.pooled_dice(test_probabilities, test.masks, sel.unguarded),
        }
    for text in args.rule:
        threshold, _, size = text.partition(":")
        rule = PostProcessing(None if threshold.lower() == "none" else float(threshold), (int(size or 0),))
        report.setdefault("rules", {})[text] = {
            "oof_flip_dice": postprocess.pooled_dice(flipped, oof.masks, rule),
            "oof_flip_fold_dice": [postprocess.pooled_dice(flipped[oof.folds == k], oof.masks[oof.folds == k], rule)
                                   for k in sorted(set(oof.folds.tolist()))],
            "test_dice": postprocess.pooled_dice(test_probabilities, test.masks, rule)}
    print(json.dumps(report, indent=1, default=float))
    chosen = report["choices"]["oof_flip"]
    print(f"postprocess_sizes: guarded={chosen['test_dice_guarded']:.4f} unguarded={chosen['test_dice_unguarded']:.4f}")


if __name__ == "__main__":
    main()

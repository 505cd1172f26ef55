"""Evaluation on the test split: per-image rows, a global/per-image/per-patient summary."""

from __future__ import annotations

import csv
import io
import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flexunet import metrics as m
from flexunet.config import Config
from flexunet import intervals
from flexunet.data.dataset import SliceSet, load_split, patient_of
from flexunet.errors import FlexUNetError
from flexunet.outputs import write_text_atomic
from flexunet.postprocess import PostProcessing, apply

SEED_DICE_LABEL = "seed_dice_coef_multiclass (background-inclusive, not comparable)"


@dataclass
class Evaluation:
    rows: list[dict[str, Any]]
    summary: dict[str, Any]

    def csv_text(self) -> str:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(self.rows[0]), lineterminator="\n")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({k: _cell(v) for k, v in row.items()})
        return buffer.getvalue()

    def json_text(self) -> str:
        return json.dumps(json_ready(self.summary), indent=2) + "\n"


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return "" if value is None else value


def json_ready(value: Any) -> Any:
    """Figures as JSON holds them: NaN (undefined) and infinities become null, numpy scalars Python numbers,
    floats keep 6 significant digits (not 6 decimals: a learning rate of 1e-7 stays 1e-7)."""
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(v) for v in value]
    if isinstance(value, float | np.floating):
        return float(f"{float(value):.6g}") if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def _nanmean(values: list[float], empty: float = float("nan")) -> float:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(finite)) if finite else empty


def score(pred: np.ndarray, true: np.ndarray, names: list[str], num_classes: int,
          patient_pattern: str | None = None) -> Evaluation:
    """Every metric of docs/design.md for predicted and true class maps (N,H,W)."""
    n_labels = m.num_labels(num_classes)
    classes = list(range(1, n_labels))
    rows: list[dict[str, Any]] = []
    total = [np.zeros(n_labels, np.int64) for _ in range(3)]
    seed_dice = []
    for i, name in enumerate(names):
        tp, fp, fn = m.confusion(pred[i], true[i], n_labels)
        for acc, value in zip(total, (tp, fp, fn)):
            acc += value
        dice, iou = m.dice_score(tp, fp, fn), m.iou_score(tp, fp, fn)
        precision, recall = m.precision_score(tp, fp), m.recall_score(tp, fn)
        seed_dice.append(m.seed_dice_of_classes(pred[i], true[i], num_classes))
        patient, slice_id = patient_of(name, patient_pattern)
        row: dict[str, Any] = {"image": name, "patient": patient, "slice": slice_id}
        for c in classes:
            row[f"dice_{c}"] = float(dice[c])
            row[f"iou_{c}"] = float(iou[c])
            row[f"precision_{c}"] = float(precision[c])
            row[f"recall_{c}"] = float(recall[c])
            h = m.hd95(pred[i] == c, true[i] == c)
            row[f"hd95_{c}"] = float("nan") if h is None else h
            row[f"true_pixels_{c}"] = int(tp[c] + fn[c])
            row[f"pred_pixels_{c}"] = int(tp[c] + fp[c])
        # Classes absent from this image (NaN) leave its mean; an image with none present is NaN
        # and leaves the mean per image (nnU-Net's and MONAI's ignore_empty convention).
        row["foreground_dice"] = float(m.class_mean(dice[1:])) if m.present_classes(tp, fp, fn).size else float("nan")
        row["has_foreground"] = int(bool((true[i] > 0).any()))
        row["predicted_foreground"] = int(bool((pred[i] > 0).any()))
        rows.append(row)

    tp, fp, fn = total
    dice, iou = m.dice_score(tp, fp, fn), m.iou_score(tp, fp, fn)
    precision, recall = m.precision_score(tp, fp), m.recall_score(tp, fn)
    per_class = {}
    for c in classes:
        true_pixels, pred_pixels = int(tp[c] + fn[c]), int(tp[c] + fp[c])
        per_class[c] = {
            "dice_global": float(dice[c]), "dice_mean_per_image": _nanmean([r[f"dice_{c}"] for r in rows]),
            "iou_global": float(iou[c]), "precision_global": float(precision[c]),
            "recall_global": float(recall[c]), "hd95_mean": _nanmean([r[f"hd95_{c}"] for r in rows]),
            "hd95_images": sum(1 for r in rows if not math.isnan(r[f"hd95_{c}"])),
            "reference_slices": sum(1 for r in rows if r[f"true_pixels_{c}"] > 0),
            "reference_pixels": true_pixels, "predicted_pixels": pred_pixels,
            # Predicted over true foreground area: 1 is right, above 1 over-segments; NaN where
            # the reference has none of the class.
            "area_ratio": pred_pixels / true_pixels if true_pixels else float("nan"),
        }
    averaged = [int(c) for c in m.present_classes(tp, fp, fn)]
    summary: dict[str, Any] = {
        "images": len(rows),
        "num_classes": num_classes,
        "foreground_dice_global": float(m.mean_foreground_dice(tp, fp, fn)),
        "foreground_dice_mean_per_image": _nanmean([r["foreground_dice"] for r in rows], empty=0.0),
        # The classes the means average (reference or predicted pixels); the others are absent.
        "averaged_classes": averaged,
        "absent_classes": [c for c in classes if c not in averaged],
        "classes": per_class,
        "detection": _detection(rows),
        SEED_DICE_LABEL: float(np.mean(seed_dice)),
    }
    patients = _per_patient(rows, pred, true, n_labels)
    if patients:
        summary["per_patient"] = patients
        positive = [p["dice_mean_over_positive_slices"] for p in patients.values()]
        summary["patient_mean_dice_over_positive_slices"] = _nanmean(positive)
    return Evaluation(rows, summary)


def _detection(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Slice-level detection: any predicted foreground against any true foreground."""
    tp = sum(1 for r in rows if r["has_foreground"] and r["predicted_foreground"])
    fn = sum(1 for r in rows if r["has_foreground"] and not r["predicted_foreground"])
    fp = sum(1 for r in rows if not r["has_foreground"] and r["predicted_foreground"])
    tn = sum(1 for r in rows if not r["has_foreground"] and not r["predicted_foreground"])
    return {
        "positives": tp + fn, "negatives": tn + fp, "tp": tp, "fn": fn, "fp": fp, "tn": tn,
        "sensitivity": tp / (tp + fn) if tp + fn else float("nan"),
        "specificity": tn / (tn + fp) if tn + fp else float("nan"),
    }


def _per_patient(rows: list[dict[str, Any]], pred: np.ndarray, true: np.ndarray,
                 n_labels: int) -> dict[str, dict[str, Any]]:
    groups: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        if row["patient"]:
            groups[row["patient"]].append(i)
    result = {}
    for patient in sorted(groups):
        idx = groups[patient]
        tp, fp, fn = m.confusion(pred[idx], true[idx], n_labels)
        positive = [rows[i]["foreground_dice"] for i in idx if rows[i]["has_foreground"]]
        result[patient] = {
            "slices": len(idx), "positive_slices": len(positive),
            "foreground_dice_global": float(m.mean_foreground_dice(tp, fp, fn)),
            "foreground_dice_mean_per_image": _nanmean([rows[i]["foreground_dice"] for i in idx], empty=0.0),
            # Hssayeni et al. average Dice over a patient's hemorrhage slices, then over patients.
            "dice_mean_over_positive_slices": _nanmean(positive),
        }
    return result


def predict_classes(network: Any, data: SliceSet, batch_size: int = 4,
                    postprocessing: PostProcessing = PostProcessing()) -> np.ndarray:
    """Class maps of the model's predictions, with the config's post-processing rules."""
    probabilities = network.predict(data.images.astype(np.float32), batch_size=batch_size, verbose=0)
    return apply(probabilities, postprocessing)


def load_model(path: Path) -> Any:
    """A saved .keras model, in safe mode, without its training objects."""
    import keras

    if not path.is_file():
        raise FlexUNetError(f"{path}: model file not found (train first, or pass --model)")
    try:
        return keras.models.load_model(path, compile=False, safe_mode=True)
    except Exception as exc:  # zip, HDF5 and deserialisation errors all end here
        raise FlexUNetError(f"{path}: not a loadable .keras model ({type(exc).__name__}: {exc})") from None


def evaluate(config: Config, model_path: Path | None = None) -> Evaluation:
    """``flexunet evaluate``: score the model on [test], after the [postprocess] rules, and write
    evaluation.csv/.json."""
    from flexunet.train import MODEL_FILE

    data = load_split(config, "test")
    network = load_model(model_path or config.train.model_dir / MODEL_FILE)
    _check_shapes(network, config)
    pred = predict_classes(network, data, config.train.batch_size, config.postprocess)
    result = score(pred, data.masks, data.names, config.model.num_classes, config.dataset.patient_pattern)
    # How sure the figure is: a bootstrap interval over the test patients (flexunet/intervals.py).
    groups = [row["patient"] or row["image"] for row in result.rows]
    result.summary.update(intervals.summary(pred, data.masks, groups, config.model.num_classes))
    out = config.eval.output_dir
    write_text_atomic(out / "evaluation.csv", result.csv_text())
    write_text_atomic(out / "evaluation.json", result.json_text())
    return result


def _check_shapes(network: Any, config: Config) -> None:
    expected = (None, *config.model.input_shape)
    got = tuple(network.input_shape)
    if got != expected:
        raise FlexUNetError(f"the model takes inputs {got[1:]} but [model] says {expected[1:]}")
    classes = network.output_shape[-1]
    if classes != config.model.num_classes:
        raise FlexUNetError(f"the model predicts {classes} classes but [model] num_classes = "
                            f"{config.model.num_classes}")


def averaged_text(summary: dict[str, Any]) -> str:
    """Which classes a summary's mean averages, in words (absent ones: no reference, no prediction)."""
    def named(classes: list[int]) -> str:
        return ("class " if len(classes) == 1 else "classes ") + ", ".join(map(str, classes))

    averaged, absent = summary["averaged_classes"], summary["absent_classes"]
    text = f"averages {named(averaged)}" if averaged else "no class present: 0 by definition"
    if absent:
        text += f"; absent (no reference, no prediction), left out: {named(absent)}"
    return text


def format_table(summary: dict[str, Any]) -> str:
    """The summary as a short table for the terminal."""

    def f(value: Any) -> str:
        return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"

    lines = [f"{'class':<8}{'Dice':>9}{'Dice/img':>10}{'IoU':>9}{'prec':>9}{'recall':>9}{'HD95 px':>9}"
             f"{'ref slices':>12}{'ref px':>9}{'pred/ref':>10}"]
    for c, v in summary["classes"].items():
        lines.append(f"{c!s:<8}{f(v['dice_global']):>9}{f(v['dice_mean_per_image']):>10}{f(v['iou_global']):>9}"
                     f"{f(v['precision_global']):>9}{f(v['recall_global']):>9}{f(v['hd95_mean']):>9}"
                     f"{v['reference_slices']:>12}{v['reference_pixels']:>9}{f(v['area_ratio']):>10}")
    lines.append(f"mean foreground Dice: {f(summary['foreground_dice_global'])} (global over "
                 f"{summary['images']} images), {f(summary['foreground_dice_mean_per_image'])} (mean per image); "
                 + averaged_text(summary))
    if "patient_mean_dice_over_positive_slices" in summary:
        lines.append(f"per patient ({len(summary['per_patient'])}): Dice over hemorrhage slices, mean "
                     f"{f(summary['patient_mean_dice_over_positive_slices'])}")
    d = summary["detection"]
    lines.append(f"detection: sensitivity {f(d['sensitivity'])} ({d['tp']}/{d['positives']}), "
                 f"specificity {f(d['specificity'])} ({d['tn']}/{d['negatives']})")
    interval = summary.get("foreground_dice_interval")
    if interval:
        lines.append(f"mean foreground Dice, {interval['level']:.0%} bootstrap interval over {interval['groups']} "
                     f"{interval['over']}: {f(interval['low'])} to {f(interval['high'])}")
    lines.append(f"{SEED_DICE_LABEL}: {f(summary[SEED_DICE_LABEL])}")
    return "\n".join(lines)

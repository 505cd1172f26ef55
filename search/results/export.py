"""``flexunet search export``: the best trial as a self-contained model folder.

It holds the model as ``best_model.keras`` (loads with plain ``keras.models.load_model``), a TF
SavedModel, ONNX when the ``export`` extra is installed, a seed-format
``train_eval_infer.config`` that ``flexunet evaluate``/``infer`` accept, ``metrics.json`` and
``model_card.md``, and the test-split evaluation. No file holds an absolute path.

A cross-validated trial exports as one ensemble model (:mod:`flexunet.ensemble`: the mean of its
fold models, with horizontal-flip test-time augmentation unless ``tta=False``) and the
post-processing chosen on its out-of-fold predictions (:mod:`flexunet.postprocess`), written to
the config's ``[postprocess]`` section. A single-split trial exports its one model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from flexunet import config as cfg
from flexunet import intervals, postprocess
from flexunet.ensemble import build_ensemble, forward_passes, select_greedy
from flexunet.errors import FlexUNetError
from flexunet.evaluate import evaluate, load_model
from flexunet.model import estimate_cost
from flexunet.outputs import staged_dir, write_text_atomic
from flexunet.postprocess import PostProcessing
from flexunet.train import MODEL_FILE
from flexunet.infer import latency_ms
from search import keys, paths
from search.store.artifacts import Store
from search.spec.space import recorded_config
from search.results.status import baseline_trial, best_trials

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportResult:
    trial: FrozenTrial
    out: Path
    files: list[str]
    test_summary: dict[str, Any]
    package: Package


@dataclass(frozen=True)
class Package:
    """What is exported besides the files: how many models it averages, with or without the
    flip, and the post-processing with the out-of-fold figures it was chosen on."""

    network: Any
    members: int = 1
    tta: bool = False
    postprocessing: PostProcessing = PostProcessing()
    selection: postprocess.Selection | None = None  # on the out-of-fold predictions, as exported
    stored_oof_dice: float | None = None  # the trial's value: out-of-fold, each fold model alone, no flip
    fold_models: tuple[Any, ...] = ()
    oof_interval: tuple[float, float] | None = None  # 95% bootstrap interval over patients, post-processed
    refit: RefitChoice | None = None  # what the refit's ensemble holds and how it was chosen
    tta_mode: str | None = None  # the test-time augmentation by name (flexunet.ensemble.TTA_MODES)


@dataclass(frozen=True)
class RefitChoice:
    """The refit ensemble: which configurations with which weights (Caruana's selection), the
    test-time augmentation chosen, and every single model's out-of-fold figures."""

    study: str
    configurations: tuple[int, ...]  # search trial numbers, best first
    weights: tuple[int, ...]  # one per configuration
    tta_dice: dict[str, float]  # pooled out-of-fold Dice of the selected ensemble per TTA candidate
    models: tuple[dict[str, Any], ...]  # per model: trial, configuration, fold, seed, validation Dice, epochs
    spec: dict[str, Any]


def choose_trial(study: optuna.Study, number: int | None) -> FrozenTrial:
    """The requested trial, else the best (highest Dice on the Pareto front for two objectives)."""
    if number is not None:
        trials = [t for t in study.get_trials(deepcopy=False) if t.number == number]
        if not trials:
            raise FlexUNetError(f"study {study.study_name!r} has no trial {number}")
        if trials[0].state != TrialState.COMPLETE:
            raise FlexUNetError(f"trial {number} is {trials[0].state.name}, not COMPLETE")
        return trials[0]
    best = best_trials(study)
    if not best:
        raise FlexUNetError(f"study {study.study_name!r} has no completed trial to export yet")
    return best[0]


def _download_artifact(trial: FrozenTrial, storage: Any, artifacts: Store, filename: str, into: Path) -> Path:
    """The trial's file called ``filename``, fetched into ``into`` (the one reader of artifacts
    here); a file that is not in the store stops the export in one line naming the store
    (search.store.artifacts.MissingArtifact)."""
    return artifacts.download(storage, trial, filename, into)


def fold_count(trial: FrozenTrial) -> int:
    """K for a cross-validated trial, 1 for a single-split one."""
    folds = trial.user_attrs.get(keys.FOLDS)
    return folds if isinstance(folds, int) and not isinstance(folds, bool) and folds >= 2 else 1


def _package(trial: FrozenTrial, storage: Any, artifacts: Store, into: Path, tta: bool) -> Package:
    """The trial's network (its model, or its fold models' ensemble), without post-processing."""
    folds = fold_count(trial)
    if folds == 1:
        return Package(load_model(_download_artifact(trial, storage, artifacts, MODEL_FILE, into)))
    members = [load_model(_download_artifact(trial, storage, artifacts, paths.fold_model(k), into))
               for k in range(folds)]
    try:
        network = build_ensemble(members, tta=tta)
    except ValueError as exc:  # fold models of different shapes
        raise FlexUNetError(f"cannot ensemble the fold models: {exc}") from None
    return Package(network, len(members), tta, fold_models=tuple(members))


def trial_network(trial: FrozenTrial, storage: Any, artifacts: Store, into: Path) -> Any:
    """The model a trial delivers: its best checkpoint, or for a cross-validated trial the
    ensemble of its fold models (with the flip), as the export builds it."""
    return _package(trial, storage, artifacts, into, tta=True).network


@dataclass(frozen=True)
class OutOfFold:
    """A cross-validated trial's stored out-of-fold predictions (search/trial/cv.py writes them)."""

    probabilities: np.ndarray  # (N,H,W,C), each slice by the fold model that did not train on it
    masks: np.ndarray  # (N,H,W)
    names: list[str]
    folds: np.ndarray  # (N,) the fold that validated each slice


def _with_postprocessing(package: Package, oof: OutOfFold, config: cfg.Config) -> Package:
    """The package with post-processing chosen on out-of-fold predictions made as the export
    predicts: each slice by the fold model that did not train on it, with the export's flip.

    The stored out-of-fold outputs (no flip) were what the trial was scored on; the ensemble
    averages 2K passes, which smooths the probabilities and the components. Re-predicting with
    the flip brings the choice nearer what the rules will see (the fold mean itself cannot be
    had out of fold: every slice trained all but one fold model)."""
    classes = package.fold_models[0].output_shape[-1]
    if oof.probabilities.shape[-1] != classes:
        raise FlexUNetError(f"{paths.OOF_PREDICTIONS}: {oof.probabilities.shape[-1]} probability channels, but the "
                            f"fold models predict {classes}")
    unknown = sorted(set(oof.folds.tolist()) - set(range(package.members)))
    if unknown:
        raise FlexUNetError(f"{paths.OOF_PREDICTIONS}: fold {unknown[0]} has no fold model (the trial has "
                            f"{package.members})")
    probabilities = oof_predictions(package.fold_models, oof, _development_images(config, oof.names), package.tta,
                                    config.train.batch_size)
    selection = postprocess.select(probabilities, oof.masks, oof.folds)
    stored = postprocess.pooled_dice(oof.probabilities, oof.masks, PostProcessing())
    return dataclasses.replace(package, postprocessing=selection.rules, selection=selection, stored_oof_dice=stored,
                               oof_interval=_oof_interval(probabilities, oof, selection.rules, config))


def _oof_interval(probabilities: np.ndarray, oof: OutOfFold, rules: PostProcessing,
                  config: cfg.Config) -> tuple[float, float]:
    """The 95% bootstrap interval over patients of the pooled out-of-fold Dice, post-processed."""
    from flexunet.data.dataset import patient_of

    groups = [patient_of(name, config.dataset.patient_pattern)[0] or name for name in oof.names]
    found = intervals.summary(postprocess.apply(probabilities, rules), oof.masks, groups,
                              config.model.num_classes)["foreground_dice_interval"]
    return found["low"], found["high"]


def _refit_package(study: optuna.Study, storage: Any, artifacts: Store, into: Path, base: cfg.Config,
                   tta: bool) -> tuple[Package, FrozenTrial, cfg.Config]:
    """The refit's ensemble: for each TTA candidate, each configuration's out-of-fold
    predictions (each slice by the seed models of the fold that did not train on it), Caruana's
    selection over the configurations on their pooled Dice; the candidate with the best
    selected ensemble (the cheapest within the post-processing's tolerance); then the
    post-processing chosen on that ensemble's out-of-fold predictions."""
    from search.trial import cv
    from search.trial import refit as rf

    refit_study = rf.load(study, storage)
    spec = rf.recorded_spec(study)
    assert refit_study is not None and spec is not None
    done, total = rf.finished(refit_study), rf.models(refit_study)
    if len(done) < total:
        raise FlexUNetError(f"the refit of study {study.study_name!r} has {len(done)} of its {total} models; finish "
                            "it with `flexunet search refit STUDY.toml`, or export a search trial with --no-refit")
    record = study.user_attrs[keys.STUDY_REFIT]
    numbers = [int(n) for n in record["configurations"]]
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    sources = [by_number[n] for n in numbers]
    config = recorded_config(base, sources[0], into)
    size = int(spec.image_size or config.model.image_width)
    config = cfg.override(config, "model", {"image_width": size, "image_height": size}, "[refit] image_size")
    members: dict[tuple[int, int], list[Any]] = {}
    oofs: dict[tuple[int, int], OutOfFold] = {}
    rows_of_model: list[dict[str, Any]] = []
    for t in done:
        rank, fold = int(t.user_attrs[keys.REFIT_RANK]), int(t.user_attrs[keys.REFIT_FOLD])
        folder = into / f"refit-{t.number}"
        folder.mkdir()
        members.setdefault((rank, fold), []).append(
            load_model(_download_artifact(t, storage, artifacts, MODEL_FILE, folder)))
        oof = _read_oof(_download_artifact(t, storage, artifacts, paths.OOF_PREDICTIONS, folder))
        oofs.setdefault((rank, fold), oof)
        rows_of_model.append({"refit_trial": t.number, "configuration": numbers[rank], "fold": fold,
                              "seed": int(t.user_attrs[keys.REFIT_SEED]), "val_foreground_dice": t.values[0],
                              keys.EPOCHS_RUN: t.user_attrs.get(keys.EPOCHS_RUN),
                              keys.STOP_REASON: t.user_attrs.get(keys.STOP_REASON),
                              "oof_foreground_dice": postprocess.pooled_dice(oof.probabilities, oof.masks,
                                                                             PostProcessing())})
    folds = sorted({fold for _, fold in members})
    first = [oofs[(0, fold)] for fold in folds]
    oof = OutOfFold(np.concatenate([o.probabilities for o in first]), np.concatenate([o.masks for o in first]),
                    [n for o in first for n in o.names], np.concatenate([o.folds for o in first]))
    images = _development_images(config, oof.names)
    classes = config.model.num_classes

    def score(probabilities: np.ndarray) -> float:
        return cv.pooled_foreground_dice(probabilities, oof.masks, classes)

    candidates = spec.tta if tta else ("none",)
    chosen: dict[str, tuple[list[int], np.ndarray, float]] = {}
    for mode in candidates:
        per_config = []
        for rank in range(len(numbers)):
            probabilities = np.zeros(oof.probabilities.shape, np.float32)
            for fold in folds:
                rows = np.flatnonzero(oof.folds == fold)
                network = build_ensemble(members[(rank, fold)], tta=mode, name=f"refit_{rank}_{fold}")
                probabilities[rows] = network.predict(images[rows].astype(np.float32),
                                                      batch_size=config.train.batch_size, verbose=0)
            per_config.append(probabilities)
        weights = select_greedy(per_config, score, rounds=2 * len(per_config)) if len(per_config) > 1 else [1]
        mean = sum(w * p for w, p in zip(weights, per_config)) / sum(weights)
        chosen[mode] = (weights, mean, score(mean))
    best = max(value for _, _, value in chosen.values())
    mode = min((m for m in candidates if chosen[m][2] >= best - postprocess.TOLERANCE),
               key=lambda m: forward_passes(1, m))
    weights, probabilities, _ = chosen[mode]
    selection = postprocess.select(probabilities, oof.masks, oof.folds)
    ensemble, member_weights = [], []
    for rank, weight in enumerate(weights):
        for fold in folds:
            for model in members[(rank, fold)]:
                ensemble.append(model)
                member_weights.append(weight)
    try:
        network = build_ensemble(ensemble, tta=mode, weights=member_weights)
    except ValueError as exc:
        raise FlexUNetError(f"cannot ensemble the refit's models: {exc}") from None
    choice = RefitChoice(refit_study.study_name, tuple(numbers), tuple(weights),
                         {m: value for m, (_, _, value) in chosen.items()}, tuple(rows_of_model), dict(record["spec"]))
    package = Package(network, sum(1 for w in member_weights if w), mode != "none", selection.rules, selection,
                      fold_models=tuple(ensemble), oof_interval=_oof_interval(probabilities, oof, selection.rules, config),
                      refit=choice, tta_mode=mode)
    return package, sources[0], config


def oof_predictions(members: tuple[Any, ...] | list[Any], oof: OutOfFold, images: np.ndarray, tta: bool,
                    batch_size: int = 4) -> np.ndarray:
    """Each slice of ``images`` (ordered as ``oof``) predicted by its fold's model, with the
    horizontal flip averaged in when ``tta`` (what the exported ensemble does with every member)."""
    out = np.zeros(oof.probabilities.shape, np.float32)
    for k, member in enumerate(members):
        rows = np.flatnonzero(oof.folds == k)
        if len(rows):
            network = build_ensemble([member], tta=tta, name=f"fold_{k}_oof")
            out[rows] = network.predict(images[rows].astype(np.float32), batch_size=batch_size, verbose=0)
    return out


def _development_images(config: cfg.Config, names: list[str]) -> np.ndarray:
    """The images of the named train/valid slices of the trial's dataset, at its model size."""
    from flexunet.data.dataset import load_split

    pool = [load_split(config, "train"), load_split(config, "valid")]
    where = {name: (part, i) for part in pool for i, name in enumerate(part.names)}
    missing = [n for n in names if n not in where]
    if missing:
        raise FlexUNetError(f"{paths.OOF_PREDICTIONS}: slice {missing[0]!r} (and {len(missing) - 1} more) is not "
                            "in the dataset's train or valid folders; export with the --data the study ran on")
    return np.stack([where[n][0].images[where[n][1]] for n in names])


def _read_oof(path: Path) -> OutOfFold:
    try:
        with np.load(path, allow_pickle=False) as arrays:
            probabilities, masks = arrays["probabilities"], arrays["masks"]
            names, folds = [str(n) for n in arrays["names"]], np.asarray(arrays["folds"], np.int64)
    except (OSError, ValueError, KeyError) as exc:
        raise FlexUNetError(f"{path.name}: not readable out-of-fold predictions ({exc})") from None
    if probabilities.ndim != 4 or masks.shape != probabilities.shape[:3]:
        raise FlexUNetError(f"{path.name}: probabilities {probabilities.shape} and masks {masks.shape} "
                            "are not (N,H,W,C) and (N,H,W)")
    if len(names) != len(masks) or folds.shape != (len(masks),):
        raise FlexUNetError(f"{path.name}: {len(names)} names and {folds.shape} folds for {len(masks)} slices")
    return OutOfFold(probabilities, masks, names, folds)






def export(study: optuna.Study, storage: Any, out: Path, *, base: cfg.Config, artifacts: Store, masked_storage: str,
           trial_number: int | None = None, force: bool = False, tta: bool = True, refit: bool = True) -> ExportResult:
    """Write the export folder (all or nothing) and evaluate the model on the test split. A
    study with a refit exports the refit's ensemble (unless ``refit`` is False or a trial is
    named); a cross-validated trial exports as the ensemble of its folds (flip TTA unless
    ``tta`` is False)."""
    refitted = refit and trial_number is None and bool(study.user_attrs.get(keys.STUDY_REFIT))
    with tempfile.TemporaryDirectory() as tmp:
        if refitted:
            package, trial, refit_config = _refit_package(study, storage, artifacts, Path(tmp), base, tta)
        else:
            trial = choose_trial(study, trial_number)
            if not tta and fold_count(trial) == 1:
                raise FlexUNetError(f"--no-tta: trial {trial.number} is a single-split trial, exported as its one "
                                    "model without test-time augmentation; only a cross-validated trial's ensemble "
                                    "has the flip to leave out")
            package = _package(trial, storage, artifacts, Path(tmp), tta)
            if package.members > 1:
                oof = _read_oof(_download_artifact(trial, storage, artifacts, paths.OOF_PREDICTIONS, Path(tmp)))
                package = _with_postprocessing(package, oof, recorded_config(base, trial, Path(tmp)))
    network = package.network
    with staged_dir(out, replace=force) as stage, _quiet_exporters():
        # Saved again uncompiled: no training objects, so plain Keras loads it with no imports.
        network.save(stage / MODEL_FILE)
        files = [MODEL_FILE]
        network.export(str(stage / "saved_model"), format="tf_saved_model", verbose=False)
        files.append("saved_model/")
        if _onnx_available():
            network.export(str(stage / "model.onnx"), format="onnx", verbose=False)
            files.append("model.onnx")
        else:
            _logger.info("ONNX skipped: install the 'export' extra (tf2onnx, onnxruntime)")
        config = recorded_config(base, trial, stage)
        if refitted:
            config = config.replace(model=refit_config.model)
        config = config.replace(postprocess=package.postprocessing)
        cfg.dump(config, stage / paths.CONFIG_FILE)
        files.append(paths.CONFIG_FILE)
        evaluation = evaluate(config, stage / MODEL_FILE)
        files += ["evaluation.csv", "evaluation.json"]
        metrics = _metrics(study, trial, evaluation.summary, masked_storage)
        if refitted:
            metrics["validation"] = {"foreground_dice": None, "search_trial_foreground_dice": trial.values[0]}
        metrics.update(_package_metrics(package, trial, config))
        write_text_atomic(stage / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        write_text_atomic(stage / "model_card.md", _model_card(study, trial, config, metrics, files))
        files += ["metrics.json", "model_card.md"]
    return ExportResult(trial, out, files, evaluation.summary, package)


def _package_metrics(package: Package, trial: FrozenTrial, config: cfg.Config) -> dict[str, Any]:
    from flexunet.evaluate import json_ready

    mode = package.tta_mode or ("horizontal" if package.tta else "none")
    passes = forward_passes(package.members, mode)
    pp, sel, refit = package.postprocessing, package.selection, package.refit
    return json_ready({
        "inference": {
            "models": package.members, "flip_tta": package.tta, "tta": mode, "forward_passes": passes,
            "gflops_per_image": estimate_cost(config.model).flops * passes / 1e9,
            # Median of single-image predictions on this machine's CPU, measured at export.
            "ms_per_image": latency_ms(package.network, config),
        },
        # What to expect on new patients: the pooled out-of-fold Dice as exported (post-processed),
        # with its 95% bootstrap interval over the development patients.
        "expected": None if sel is None else {
            "oof_foreground_dice_pooled": sel.dice_postprocessed,
            "interval_95_over_patients": list(package.oof_interval) if package.oof_interval else None},
        "refit": None if refit is None else {
            "study": refit.study, "configurations": list(refit.configurations), "weights": list(refit.weights),
            "selection": "Caruana et al. 2004: greedy, with replacement, on pooled out-of-fold foreground Dice",
            "tta_candidates_oof_foreground_dice": refit.tta_dice, "tta": mode, "settings": refit.spec,
            "models": list(refit.models),
            "single_model_oof_foreground_dice": _spread([m["oof_foreground_dice"] for m in refit.models]),
        },
        "cross_validation": None if sel is None else {
            "folds": len(sel.fold_dice),
            keys.FOLD_DICE: trial.user_attrs.get(keys.FOLD_DICE),
            # The trial's value: each fold model alone on its validation slices, no flip.
            "oof_foreground_dice_pooled_stored": package.stored_oof_dice,
            # Re-predicted as the export predicts (with the flip when it has it): the choice's basis.
            "oof_foreground_dice_pooled": sel.dice,
            "oof_foreground_dice_pooled_postprocessed": sel.dice_postprocessed,
            "oof_fold_foreground_dice": sel.fold_dice,
            "oof_fold_foreground_dice_postprocessed": sel.fold_dice_postprocessed,
        },
        "postprocess": {"threshold": pp.threshold, "min_component_size": pp.min_component_size,
                        "rule": pp.describe(),
                        "chosen_on": None if sel is None else (
                            f"out-of-fold predictions of the {package.members} fold models"
                            + (" with the horizontal flip" if package.tta else "")),
                        "guards": None if sel is None else {
                            "min_gain": postprocess.TOLERANCE, "no_fold_worse": True,
                            "max_true_lesions_removed": postprocess.MAX_LESIONS_REMOVED,
                            "max_min_component_size": sel.size_caps},
                        "refused": None if sel is None else sel.describe_refused(),
                        "unguarded": None if sel is None else {
                            "threshold": sel.unguarded.threshold,
                            "min_component_size": sel.unguarded.min_component_size,
                            "oof_foreground_dice_pooled": sel.unguarded_dice}},
    })


@contextlib.contextmanager
def _quiet_exporters() -> Iterator[None]:
    """SavedModel and tf2onnx log every asset and optimisation pass; keep the terminal for the
    results."""
    loggers = [logging.getLogger(n) for n in ("tensorflow", "absl", "tf2onnx")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            with contextlib.redirect_stdout(io.StringIO()):
                yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _onnx_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
        import tf2onnx  # noqa: F401
    except ImportError:
        return False
    return True


def _spread(values: list[float]) -> dict[str, float]:
    """Mean, standard deviation, min and max of single models' figures."""
    array = np.asarray(values, np.float64)
    return {"mean": float(array.mean()), "sd": float(array.std()), "min": float(array.min()),
            "max": float(array.max()), "models": len(values)}


def _metrics(study: optuna.Study, trial: FrozenTrial, test: dict[str, Any], masked_storage: str) -> dict[str, Any]:
    from collections import Counter

    from flexunet.evaluate import json_ready

    states = Counter(t.state.name.lower() for t in study.get_trials(deepcopy=False))
    base = baseline_trial(study)
    attrs = trial.user_attrs
    return json_ready({
        "study": study.study_name,
        "storage": masked_storage,
        "trial": trial.number,
        "params": trial.params,
        "parameters": attrs.get(keys.PARAMS),
        "gflops_per_image": attrs.get(keys.GFLOPS),
        keys.SETTINGS: attrs.get(keys.SETTINGS),
        "validation": {
            "foreground_dice": trial.values[0] if trial.values else None,
            keys.BEST_EPOCH: attrs.get(keys.BEST_EPOCH), keys.EPOCHS_RUN: attrs.get(keys.EPOCHS_RUN),
            keys.STOP_REASON: attrs.get(keys.STOP_REASON), keys.SECONDS_PER_EPOCH: attrs.get(keys.SECONDS_PER_EPOCH),
            "class_dice": attrs.get(keys.CLASS_DICE),
        },
        "test": {
            "foreground_dice_global": test["foreground_dice_global"],
            "foreground_dice_mean_per_image": test["foreground_dice_mean_per_image"],
            "patient_mean_dice_over_positive_slices": test.get("patient_mean_dice_over_positive_slices"),
            "classes": test["classes"], "averaged_classes": test["averaged_classes"],
            "absent_classes": test["absent_classes"], "detection": test["detection"], "images": test["images"],
            "per_patient": test.get("per_patient"),
            "foreground_dice_interval": test.get("foreground_dice_interval"),
        },
        "search": {
            "trials": dict(states),
            "baseline_trial": base.number if base else None,
            "baseline_val_foreground_dice": base.values[0] if base is not None and base.values else None,
            "objectives": study.user_attrs.get(keys.STUDY_OBJECTIVES),
            "sampler": study.user_attrs.get(keys.STUDY_SAMPLER),
            "pruner": study.user_attrs.get(keys.STUDY_PRUNER),
        },
        "dataset": study.user_attrs.get(keys.STUDY_DATASET),
        "image_size": study.user_attrs.get(keys.STUDY_IMAGE_SIZE),
    })


def _validation_label(metrics: dict[str, Any]) -> str:
    cv = metrics.get("cross_validation")
    return f"validation, out-of-fold over {cv['folds']} folds (search objective)" if cv else \
        "validation (search objective)"


def _package_lines(metrics: dict[str, Any], f: Any) -> list[str]:
    """The card's lines on the ensemble, its inference cost and the post-processing."""
    run, cv, pp = metrics["inference"], metrics.get("cross_validation"), metrics["postprocess"]
    refit = metrics.get("refit")
    lines = []
    if refit:
        spec, spread = refit["settings"], refit["single_model_oof_foreground_dice"]
        configs = ", ".join(f"trial {n} x{w}" for n, w in zip(refit["configurations"], refit["weights"]) if w)
        lines.append(f"- Ensemble: the refit (study `{refit['study']}`): {run['models']} models, the "
                     f"configurations {configs} (chosen by Caruana's greedy selection with replacement on pooled "
                     f"out-of-fold Dice among the {len(refit['configurations'])} best of the search), each trained "
                     f"again as {spec['folds']} folds x {spec['seeds']} seeds, {spec['epochs']} epochs of "
                     f"{spec['steps_per_epoch']} batches (patience {spec['patience']}) at {spec['image_size']} px"
                     + (", with averaged weights (EMA)" if spec.get("ema") else "") + ".")
        lines.append(f"- Single models' out-of-fold foreground Dice (each alone on its fold, no TTA): mean "
                     f"{f(spread['mean'])}, sd {f(spread['sd'])}, range {f(spread['min'])}-{f(spread['max'])}.")
        lines.append("- Test-time augmentation: " + run["tta"] + ", chosen on out-of-fold predictions (pooled Dice "
                     + ", ".join(f"{m} {f(v)}" for m, v in refit["tta_candidates_oof_foreground_dice"].items())
                     + f"; the cheapest within {postprocess.TOLERANCE:g} of the best).")
    elif cv:
        folds = ", ".join(f(d) for d in cv.get(keys.FOLD_DICE) or [])
        lines.append(f"- Ensemble: the mean of the {cv['folds']} fold models' outputs"
                     + (", each also on the horizontally flipped image (flipped back)" if run["flip_tta"] else "")
                     + f"; fold validation foreground Dice {folds or 'n/a'}.")
    lines.append(f"- Inference cost per image: {run['forward_passes']} forward pass(es), "
                 f"{f(run['gflops_per_image'])} GFLOPs, {f(run['ms_per_image'])} ms (median of 10 single-image "
                 "predictions, measured at export on the exporting machine).")
    if cv:
        guards = pp["guards"]
        lines.append(f"- Post-processing ([postprocess] in train_eval_infer.config): {pp['rule']}; chosen on the "
                     f"{pp['chosen_on'] if not refit else 'out-of-fold predictions of the refit ensemble'}: pooled foreground Dice {f(cv['oof_foreground_dice_pooled'])} without, "
                     f"{f(cv['oof_foreground_dice_pooled_postprocessed'])} with it (per fold "
                     f"{', '.join(f(d) for d in cv['oof_fold_foreground_dice'])} without, "
                     f"{', '.join(f(d) for d in cv['oof_fold_foreground_dice_postprocessed'])} with). A rule is kept "
                     f"only if it gains more than {guards['min_gain']:g}, leaves no fold worse, and (a size rule) "
                     f"removes at most {guards['max_true_lesions_removed']:.0%} of the true lesions of those slices "
                     f"(here: at most {', '.join(map(str, guards['max_min_component_size']))} px); of those, the "
                     "mildest within that gain of the best.")
        if pp.get("refused"):
            lines.append(f"- Refused: {pp['refused']}.")
    else:
        lines.append("- Post-processing: none (it is chosen on out-of-fold predictions, which only "
                     "cross-validated trials have).")
    return lines


def _classes_text(classes: list[Any]) -> str:
    return ("class " if len(classes) == 1 else "classes ") + ", ".join(map(str, classes))


def _class_lines(metrics: dict[str, Any], f: Any) -> list[str]:
    """Each class's Dice with the reference it was scored on, and which classes the means average."""
    test, validation = metrics["test"], metrics["validation"].get("class_dice") or []
    lines = ["| class | validation Dice | test Dice | test slices with it | its test pixels | predicted / true area |",
             "|---|---|---|---|---|---|"]
    for c, v in test["classes"].items():
        i = int(c) - 1
        val = validation[i] if i < len(validation) else None
        lines.append(f"| {c} | {f(val)} | {f(v['dice_global'])} | {v['reference_slices']} | {v['reference_pixels']} | "
                     f"{f(v['area_ratio'])} |")
    averaged, absent = test["averaged_classes"], test["absent_classes"]
    head = (f"The test means average {_classes_text(averaged)}: the classes with reference or predicted pixels "
            "in the test slices" if averaged else "No class has reference or predicted pixels in the test slices: "
            "the test means are 0 by definition")
    if absent:
        head += (f"; {_classes_text(absent)} {'has' if len(absent) == 1 else 'have'} neither there and "
                 f"{'is' if len(absent) == 1 else 'are'} left out (Dice undefined), as in nnU-Net's evaluation "
                 "and MONAI's `ignore_empty`")
    lines += ["", head + ". A class predicted where the reference has none counts 0."]
    return lines


def _model_card(study: optuna.Study, trial: FrozenTrial, config: cfg.Config, metrics: dict[str, Any],
                files: list[str]) -> str:
    def f(value: Any) -> str:
        return "n/a" if value is None else (f"{value:.4f}" if isinstance(value, float) else str(value))

    m, test, search = config.model, metrics["test"], metrics["search"]
    expected, interval = metrics.get("expected") or {}, test.get("foreground_dice_interval") or {}
    oof_interval = expected.get("interval_95_over_patients")
    dataset = metrics.get("dataset") or {}
    split = dataset.get("split") or {}
    lines = [
        f"# FlexUNet model card: study `{study.study_name}`, "
        + (f"refit of trial {trial.number}" if metrics.get("refit") else f"trial {trial.number}"),
        "",
        "Exported by `flexunet search export`. A research model trained on a small sample: it is",
        "not a medical device and its figures are not a clinical validation.",
        "",
        "## Model",
        f"- Input {m.image_width}x{m.image_height}x{m.image_channels} (0..255, scaled inside the model), "
        f"{m.num_classes} classes, softmax output." if m.num_classes > 1 else
        f"- Input {m.image_width}x{m.image_height}x{m.image_channels}, one sigmoid channel.",
        f"- {m.num_layers} levels, base {m.base_filters} filters, first kernel {m.base_kernels[0]}, "
        f"dilation {m.dilation[0]}, dropout {m.dropout_rate:g}, batch norm {m.normalization}, "
        f"activation {m.activation}.",
        f"- {f(metrics.get('parameters'))} parameters, {f(metrics.get('gflops_per_image'))} GFLOPs per forward pass.",
        *_package_lines(metrics, f),
        f"- Trained with {m.optimizer} (learning rate {m.learning_rate:.3g}), loss {m.loss}, batch "
        f"{config.train.batch_size}, augmentation {config.train.augmentation_strength if config.train.augmentation else 0:g}.",
        "",
        "## Results",
        "Foreground Dice counts only hemorrhage pixels (the seed's background-inclusive Dice is",
        "reported in evaluation.json as a labelled extra and is not comparable).",
        "",
        "| split | foreground Dice (global) | mean per image | patients: mean over hemorrhage slices |",
        "|---|---|---|---|",
        *([f"| {_validation_label(metrics)} | {f(metrics['validation']['foreground_dice'])} | | |"]
          if metrics["validation"].get("foreground_dice") is not None else []),
        *([f"| expected: pooled out-of-fold, as exported (95% interval over patients "
           f"{f(oof_interval[0])}-{f(oof_interval[1])}) | {f(expected['oof_foreground_dice_pooled'])} | | |"]
          if expected else []),
        f"| test ({test['images']} slices; 95% interval over {interval.get('groups', 'n/a')} patients "
        f"{f(interval.get('low'))}-{f(interval.get('high'))}) | {f(test['foreground_dice_global'])} | "
        f"{f(test['foreground_dice_mean_per_image'])} | {f(test.get('patient_mean_dice_over_positive_slices'))} |",
        "",
        "A 95% interval resamples patients with replacement (2,000 draws): with few patients it is wide, and",
        "two pipelines whose intervals overlap are not told apart by these figures.",
        *(["The out-of-fold figure is optimistic: each fold model's epoch was chosen by early stopping on the",
           "same validation patients that score it, and the ensemble, its test-time augmentation and",
           "post-processing were chosen on those predictions too; the test figure is the unbiased one, on",
           "few patients."]
          if expected else []),
        "",
        *_class_lines(metrics, f),
        "",
        f"Detection (any predicted hemorrhage): sensitivity {f(test['detection'].get('sensitivity'))}, "
        f"specificity {f(test['detection'].get('specificity'))} (n/a where the test split has no negative slices).",
        "",
        "## Search",
        f"- Trials: {', '.join(f'{v} {k}' for k, v in sorted(search['trials'].items()))}; "
        f"sampler {search.get('sampler')}, pruner {search.get('pruner')}.",
        f"- Baseline (the seed's hand-tuned settings, trial {f(search['baseline_trial'])}): validation "
        f"foreground Dice {f(search['baseline_val_foreground_dice'])}.",
        f"- Storage: `{metrics['storage']}`.",
        "",
        "## Data",
        f"- Split by patient; image size {metrics.get('image_size')} px.",
    ]
    for part in ("train", "valid", "test"):
        if part in split:
            lines.append(f"- {part}: patients {', '.join(split[part])}")
    lines += [
        "- CT-ICH: Hssayeni, M. (2019), PhysioNet, doi:10.13026/w8q8-ky94 (CC-BY 4.0).",
        "",
        "## Files",
        *[f"- `{name}`" for name in files],
        "",
        "Load in Python: `keras.models.load_model(\"best_model.keras\")` (no custom objects), or",
        "`tf.saved_model.load(\"saved_model\").serve(images)`; evaluate or infer with",
        "`flexunet evaluate train_eval_infer.config` / `flexunet infer train_eval_infer.config`.",
        "",
    ]
    return "\n".join(lines)

"""The refit: after the search, the best configurations trained again at a higher fidelity, as
``folds`` x ``seeds`` models each, for the export to ensemble (``[refit]`` in the study file).

Where it lives. A refit is a study of its own, ``<study>:refit``, in the same storage as the
search, linked both ways by study user attrs (``flexunet_refit`` on the search study names it,
its configurations and its settings; ``flexunet_refit_of`` on it names the search). Each fold x
seed model is one trial of it, enqueued when the refit is planned, with the search trial it
retrains, its rank, fold and seed as user attrs. Kept apart so that no sampler of the search
ever reads a refit value: the refit's values (one fold model's validation Dice after 30 epochs)
are of another fidelity than the search's, and TPE would take them for trials. Optuna's samplers
read every trial of their own study (``Study._get_trials``), and there is no supported way to
hide some from them; a separate study needs none.

How it runs. The launcher's workers run the refit study's trials exactly as they run search
trials (``search.runtime.worker`` with the plan's ``stage = "refit"``), through the same lifecycle:
heartbeats, the retry of a killed worker's trial, and the resume from its last epoch checkpoint
in the artifact store. Its trials have no parameters to sample (the refit study's sampler is
never asked for one), and are never pruned.

Example (the refit of a finished study, from Python; ``flexunet search refit STUDY.toml`` does
the same)::

    from search import Study

    study = Study.from_file("studies/ct_ich_sample.toml")
    study.refit(workers=1)
    study.export("runs/ct-ich-sample/best")   # the refit ensemble
"""

from __future__ import annotations

import dataclasses
import logging
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from flexunet import config as cfg
from flexunet.errors import FlexUNetError
from search.spec import budget
from search.trial import lifecycle
from search import paths
from search import keys as k
from search.store import storage as st
from search.spec.study_file import RefitSpec, StudySpec

_logger = logging.getLogger(__name__)
SUFFIX = ":refit"
SEED_STRIDE = 1000  # seed s of a model trains with the configuration's seed + s * SEED_STRIDE


def study_name(search_name: str) -> str:
    """The refit study's name.

    >>> study_name("ct-ich-sample")
    'ct-ich-sample:refit'
    """
    return search_name + SUFFIX


def configurations(study: optuna.Study, top_k: int) -> list[FrozenTrial]:
    """The ``top_k`` best completed trials of the search (by its first objective), best first."""
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if t.values and math.isfinite(t.values[0])]
    reverse = study.directions[0] == optuna.study.StudyDirection.MAXIMIZE
    return sorted(complete, key=lambda t: (-t.values[0] if reverse else t.values[0], t.number))[:top_k]


def estimate(study: optuna.Study, spec: StudySpec, workers: int = 1) -> float | None:
    """The refit's estimated seconds (search.spec.budget) for the configurations it would refit now;
    None before any of them has measured its epochs."""
    assert spec.refit is not None
    configs = configurations(study, spec.refit.top_k)
    measured = [float(t.user_attrs[k.SECONDS_PER_EPOCH]) for t in configs
                if isinstance(t.user_attrs.get(k.SECONDS_PER_EPOCH), int | float)]
    if not measured:
        return None
    steps = int((configs[0].user_attrs.get(k.SETTINGS) or {}).get("steps_per_epoch") or spec.refit.steps_per_epoch)
    size = int(study.user_attrs.get(k.STUDY_IMAGE_SIZE) or spec.image_size or 1)
    return budget.refit_seconds(measured, search_steps=steps, search_size=size, refit=spec.refit,
                                folds=spec.refit_folds(), workers=workers)


def recorded_spec(study: optuna.Study) -> RefitSpec | None:
    """The refit settings the search study recorded when its refit was planned."""
    record = study.user_attrs.get(k.STUDY_REFIT)
    if not record:
        return None
    spec = dict(record["spec"])
    spec["tta"] = tuple(spec.get("tta") or ())
    return RefitSpec(**spec)


def plan(study: optuna.Study, storage: optuna.storages.BaseStorage, spec: StudySpec) -> optuna.Study:
    """Create the refit study with one WAITING trial per configuration x fold x seed (once:
    a refit already planned is returned as it is, to be resumed)."""
    refit = spec.refit
    if refit is None:
        raise FlexUNetError(f"{spec.path}: the study file has no [refit] section")
    configs = configurations(study, refit.top_k)
    if not configs:
        raise FlexUNetError(f"study {study.study_name!r} has no completed trial to refit")
    name = study_name(study.study_name)
    refit_study, created = st.create_once(storage, name, ["maximize"], optuna.samplers.RandomSampler(seed=0),
                                          optuna.pruners.NopPruner())
    if not created:
        return refit_study
    folds = spec.refit_folds()
    resolved = dataclasses.replace(refit, folds=folds, image_size=refit.image_size or _image_size(study, spec))
    # The link first: a launcher killed while enqueueing leaves a refit that says what it is.
    study.set_user_attr(k.STUDY_REFIT, {"study": name, "configurations": [t.number for t in configs],
                                        "spec": {f.name: (list(v) if isinstance(v := getattr(resolved, f.name), tuple)
                                                          else v) for f in dataclasses.fields(resolved)}})
    refit_study.set_user_attr(k.STUDY_REFIT_OF, study.study_name)
    refit_study.set_user_attr(k.STUDY_REFIT_MODELS, len(configs) * folds * refit.seeds)
    for rank, trial in enumerate(configs):
        for fold in range(folds):
            for seed in range(refit.seeds):
                refit_study.enqueue_trial({}, user_attrs={k.REFIT_SOURCE: trial.number, k.REFIT_RANK: rank,
                                                          k.REFIT_FOLD: fold, k.REFIT_SEED: seed})
    return refit_study


def _image_size(study: optuna.Study, spec: StudySpec) -> int:
    return int(study.user_attrs.get(k.STUDY_IMAGE_SIZE) or spec.image_size)


def load(study: optuna.Study, storage: optuna.storages.BaseStorage) -> optuna.Study | None:
    """The search study's refit study, or None when none was planned."""
    record = study.user_attrs.get(k.STUDY_REFIT)
    if not record:
        return None
    return st.load_study(storage, record["study"])


def models(refit_study: optuna.Study) -> int:
    """How many fold x seed models the refit trains."""
    return int(refit_study.user_attrs.get(k.STUDY_REFIT_MODELS) or 0)


def finished(refit_study: optuna.Study) -> list[FrozenTrial]:
    """The refit's trained models: one COMPLETE trial per configuration x fold x seed (the last
    of a retry series)."""
    done: dict[tuple[int, int, int], FrozenTrial] = {}
    for t in refit_study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        done[(int(t.user_attrs[k.REFIT_RANK]), int(t.user_attrs[k.REFIT_FOLD]), int(t.user_attrs[k.REFIT_SEED]))] = t
    return [done[key] for key in sorted(done)]


def status_lines(study: optuna.Study, storage: optuna.storages.BaseStorage) -> list[str]:
    """What ``status`` says of the refit: progress, and the models' validation Dice."""
    record = study.user_attrs.get(k.STUDY_REFIT)
    if not record:
        return []
    try:
        refit_study = load(study, storage)
    except FlexUNetError:
        return [f"refit: planned as {record['study']!r}, not in this storage"]
    assert refit_study is not None
    trials = refit_study.get_trials(deepcopy=False)
    done = finished(refit_study)
    running = [t for t in trials if t.state == TrialState.RUNNING]
    spec = record["spec"]
    lines = [f"refit ({record['study']!r}): {len(done)} of {models(refit_study)} models trained, "
             f"{len(running)} running; configurations of trials {', '.join(map(str, record['configurations']))}, "
             f"{spec['folds']} folds x {spec['seeds']} seeds, {spec['epochs']} epochs of {spec['steps_per_epoch']} "
             f"batches at {spec['image_size']} px" + (", averaged weights" if spec.get("ema") else "")]
    if done:
        values = [t.values[0] for t in done]
        lines.append(f"  models' validation foreground Dice: mean {np.mean(values):.4f}, "
                     f"min {min(values):.4f}, max {max(values):.4f}")
    for t in running:
        a = t.user_attrs
        lines.append(f"  refit trial {t.number} (trial {a.get(k.REFIT_SOURCE)}, fold {a.get(k.REFIT_FOLD)}, seed "
                     f"{a.get(k.REFIT_SEED)}) on {a.get(k.HOST, '?')} pid {a.get(k.PID, '?')}: epoch {a.get(k.EPOCH, 0)}")
    return lines


def refit_config(base: cfg.Config, source: FrozenTrial, refit: RefitSpec, seed: int, out: Path) -> cfg.Config:
    """The configuration of search trial ``source`` at the refit's fidelity, for seed ``seed``."""
    from search.spec.space import recorded_config

    config = recorded_config(base, source, out)
    size = refit.image_size or config.model.image_width
    config = cfg.override(config, "model", {"image_width": size, "image_height": size}, "[refit] image_size")
    return cfg.override(config, "train", {
        "epochs": refit.epochs, "steps_per_epoch": refit.steps_per_epoch, "patience": refit.patience,
        "seed": config.train.seed + seed * SEED_STRIDE}, "[refit]")


@dataclass
class RefitObjective:
    """For ``study.optimize`` on the refit study: train the one fold x seed model a trial names,
    resumable from its last epoch checkpoint, and keep its model and its out-of-fold
    predictions as the trial's artifacts. Its value is the model's best validation Dice."""

    spec: StudySpec
    base: cfg.Config
    search: optuna.Study
    artifacts: Any  # search.store.artifacts.Store
    dataset_dir: Path | None = None
    _folds: dict = field(default_factory=dict)

    def __call__(self, trial: optuna.Trial) -> float:
        from search.trial import objective as obj

        lifecycle.start(trial)
        attrs = trial.user_attrs
        if k.REFIT_SOURCE not in attrs:
            raise lifecycle.failure(trial, "not a refit trial (no refit_source_trial): refit trials are enqueued "
                                           "by the refit's plan")
        refit = recorded_spec(self.search)
        assert refit is not None
        source = lifecycle.frozen(self.search, int(attrs[k.REFIT_SOURCE]))
        fold, seed = int(attrs[k.REFIT_FOLD]), int(attrs[k.REFIT_SEED])
        with obj.training_memory(trial), tempfile.TemporaryDirectory(prefix=f"refit-{trial.number}-") as tmp:
            return self._train(trial, refit, source, fold, seed, Path(tmp))

    def _train(self, trial: optuna.Trial, refit: RefitSpec, source: FrozenTrial, fold: int, seed: int,
               work: Path) -> float:
        from optuna.artifacts import upload_artifact

        from flexunet.model import build
        from flexunet.train import TrainOutputs, compile_model, fit
        from search.trial import cv, training

        config = refit_config(self.base, source, refit, seed, work)
        folds_file = (self.dataset_dir or Path(".")) / paths.FOLDS_FILE
        data = cv.cached_fold_data(self._folds, config, int(refit.folds or 2), folds_file,
                                   self.spec.prepare.seed if self.spec.prepare else 0)
        train_data, valid_data = data.split(fold)
        resume = training.restore_resume_point(self.artifacts, trial, work)
        network = None
        if not resume:
            network = build(config.model, seed=config.train.seed)
            compile_model(network, config.model, train_data.masks,
                          ema_every=config.train.steps_per_epoch if refit.ema else None,
                          ema_momentum=refit.ema_momentum)
        outputs = TrainOutputs(model_path=work / paths.MODEL_FILE, log_csv=work / paths.LOG_FILE, model_at_end=False)
        started = time.perf_counter()
        result = fit(config.model, config.train, train_data, valid_data, outputs=outputs,
                     extra_callbacks=[training.PruningReporter(trial, prune=False)], verbose=0, checkpoint_dir=work,
                     resume=resume, network=network,
                     on_checkpoint=lambda folder, epoch: training.save_resume_point(self.artifacts, trial, folder, epoch))
        best = result.best_val_dice
        training.record_training(trial, training.TrainingRecord.of_fit(
            seconds=time.perf_counter() - started, epochs_run=result.epochs_run, best_epoch=result.best_epoch,
            stop_reason=result.stop_reason, seconds_per_epoch=result.seconds_per_epoch, best_val_dice=best))
        if result.stop_reason.startswith("non-finite") or not math.isfinite(best):
            raise lifecycle.failure(trial, result.stop_reason)
        result.model.save(work / paths.MODEL_FILE)
        probabilities = result.model.predict(valid_data.images.astype(np.float32), batch_size=4, verbose=0)
        assert valid_data.masks is not None
        np.savez_compressed(work / paths.OOF_PREDICTIONS, probabilities=probabilities.astype(np.float16),
                            masks=valid_data.masks.astype(np.uint8), names=np.array(valid_data.names),
                            folds=np.full(len(valid_data), fold, np.int64))
        for name in (paths.MODEL_FILE, paths.LOG_FILE, paths.OOF_PREDICTIONS):
            if (work / name).exists():
                upload_artifact(artifact_store=self.artifacts, file_path=str(work / name), study_or_trial=trial)
        return best

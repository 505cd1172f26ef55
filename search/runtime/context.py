"""What every process of a study shares: its run folder, its dataset, its search space, the
study in the storage, and the plan a launcher hands its workers.

A launcher (``search.runtime.run``) and its workers (``search.runtime.worker``) both build on this module and
never on each other.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import optuna

from flexunet import config as cfg
from flexunet.data import ct_ich
from flexunet.errors import ConfigError, FlexUNetError
from search.spec import algorithms, space as sp
from search.store import artifacts as af
from search import keys as k
from search.store import storage as st
from search.store import urls
from search.spec import study_file
from search.paths import SPLIT_FILE, RunFolder
from search.spec.study_file import ParamSpec, StudySpec
from search.trial import lifecycle

_logger = logging.getLogger(__name__)
LAUNCHER_ENV = "FLEXUNET_LAUNCHER_PID"  # a local worker's launcher: the worker ends with it
SLOT_ENV = "FLEXUNET_WORKER_SLOT"
SEARCH, REFIT = "search", "refit"  # the stages a worker runs  # "<slot>.<launch>" of a local worker, to give each its own seed


def out_dir(spec: StudySpec, out: Path | None) -> Path:
    """The study's run folder: ``out``, the study file's ``out``, or ``runs/<name>``."""
    return (out or spec.out or Path("runs") / _slug(spec.name)).absolute()


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name).strip(".") or "study"


def _dataset_config(spec: StudySpec, out: Path) -> Path:
    """The study's dataset config: the study file's, or the one prepared into the run folder."""
    return spec.dataset_config if spec.dataset_config is not None else RunFolder(out).dataset_config


@dataclass(frozen=True)
class Dataset:
    """A study's dataset as its trials see it: the dataset's config, the (square) image size,
    and the search space bounded for that size."""

    base: cfg.Config
    image_size: int
    space: tuple[ParamSpec, ...]


@dataclass(frozen=True)
class RunContext:
    """What a launch resolves once and hands down: the spec, the run folder, the storage URL,
    the artifact store and the dataset's config. A launcher resolves it from the spec and its
    options (:meth:`resolve`); a worker rebuilds it from its plan (:meth:`WorkerPlan.context`),
    never from the study file.

    >>> from search.spec.study_file import for_dataset
    >>> ctx = RunContext.resolve(for_dataset("/data/d.config", name="demo"), out=Path("/runs/demo"),
    ...                          storage=None, artifacts=None)
    >>> ctx.url, ctx.artifacts.url, ctx.dataset_dir
    ('sqlite:////runs/demo/study.db', '/runs/demo/artifacts', PosixPath('/data'))
    """

    spec: StudySpec
    out: Path
    url: str
    artifacts: af.Location
    dataset_config: Path

    @classmethod
    def resolve(cls, spec: StudySpec, *, out: Path | None, storage: str | None, artifacts: str | None) -> RunContext:
        """``--out``, ``--storage`` and ``--artifacts`` (None: the spec's, then the defaults)."""
        run_dir = out_dir(spec, out)
        return cls(spec, run_dir, urls.resolve_url(storage, spec.storage, run_dir),
                   af.resolve(artifacts, spec.artifacts, run_dir), _dataset_config(spec, run_dir))

    @property
    def dataset_dir(self) -> Path:
        """The folder of the dataset's config (where ``split.json`` and ``folds.csv`` are)."""
        return self.dataset_config.parent

    def prepare_dataset(self) -> None:
        """Prepare the study's dataset into ``out/data`` unless it is there already."""
        if self.spec.prepare is None or self.dataset_config.exists():
            return
        p = self.spec.prepare
        data = RunFolder(self.out).data
        print(f"preparing {p.dataset} from {p.source} into {data}", flush=True)
        try:
            report = ct_ich.prepare(p.source, data, size=p.size, fractions=p.split, seed=p.seed,
                                    hemorrhage_types=p.hemorrhage_types)
        except FlexUNetError:
            if self.dataset_config.exists():  # another process on this machine prepared it first
                return
            raise
        for line in report.lines():
            print(f"  {line}")

    def open_dataset(self) -> Dataset:
        """The dataset's config, the study's (square) image size and its bounded space."""
        spec = self.spec
        base = cfg.load(self.dataset_config)
        size = spec.image_size
        if size is None:
            if base.model.image_width != base.model.image_height:
                raise ConfigError(f"{spec.path}: the dataset's images are not square; set [study] image_size")
            size = base.model.image_width
        return Dataset(base, size, sp.bounded(spec.space, size, str(spec.path)))


def objectives(spec: StudySpec) -> list[str]:
    return ["val_foreground_dice"] + ([spec.second_objective] if spec.second_objective else [])


def _study_attrs(ctx: RunContext, data: Dataset) -> dict[str, object]:
    spec, base = ctx.spec, data.base
    split_file = ctx.dataset_dir / SPLIT_FILE
    try:
        split = json.loads(split_file.read_text(encoding="utf-8")) if split_file.exists() else None
    except (ValueError, OSError) as exc:
        raise ConfigError(f"{split_file}: not a readable split file ({exc})") from None
    if split is not None and not isinstance(split, dict):
        raise ConfigError(f"{split_file}: not a split file written by flexunet prepare")
    return {
        k.STUDY_IMAGE_SIZE: data.image_size,
        k.STUDY_DATASET_CONFIG: str(ctx.dataset_config.absolute()),
        k.STUDY_ARTIFACTS: ctx.artifacts.url,
        k.STUDY_FILE: spec.path.name,
        k.STUDY_OBJECTIVES: objectives(spec),
        k.STUDY_DATASET: {
            "prepared": spec.prepare.dataset if spec.prepare else None,
            "classes": base.model.num_classes, "channels": base.model.image_channels,
            "split": split.get("parts") if split else None,
            "slices": split.get("slices") if split else None,
        },
        k.STUDY_FOLDS: spec.folds,  # K >= 2: trials are cross-validated (search/trial/cv.py)
        k.STUDY_BUDGET: vars(spec.budget),
        k.STUDY_SPACE: [
            {key: (list(v) if isinstance(v, tuple) else v) for key, v in vars(p).items() if v not in (None, (), {})}
            for p in spec.space],
        k.STUDY_FIXED: dict(spec.fixed),
        k.STUDY_SAMPLER: spec.sampler.name, k.STUDY_PRUNER: spec.pruner.name,
    }


def create_study(ctx: RunContext, data: Dataset, storage: optuna.storages.BaseStorage | None = None) -> optuna.Study:
    """Create (or join) the study, record what it searches and where its trials keep their
    files, and enqueue the seed baseline."""
    spec, size = ctx.spec, data.image_size
    storage = storage or st.open_storage(ctx.url, on_stale=lifecycle.stale_trial_callback)
    study, created = st.create_once(storage, spec.name, spec.directions, algorithms.make_sampler(spec),
                                    algorithms.make_pruner(spec))
    existing = study.user_attrs.get(k.STUDY_IMAGE_SIZE)
    if existing is not None and existing != size:
        raise ConfigError(f"study {spec.name!r} searches {existing} px images; this run asks for {size} px")
    if existing is None:
        for key, value in _study_attrs(ctx, data).items():
            study.set_user_attr(key, value)
        study.set_metric_names(objectives(spec))
    if spec.baseline and created:
        # Only the process that created the study enqueues: launchers started together on
        # one new study would otherwise each add a baseline.
        study.enqueue_trial(sp.baseline_params(spec, data.space, size), user_attrs={k.BASELINE: True})
    return study


@dataclass(frozen=True)
class WorkerPlan:
    """What a launcher hands each of its workers, written once as JSON: the resolved spec
    (overrides and changes made in Python included), the run folder, and the time after
    which no trial starts, and the artifact store (a folder or ``s3://``: credentials come from
    the environment, as the storage's password does). The storage URL travels in ``$FLEXUNET_STORAGE`` instead (the plan
    leaves the spec's ``storage`` out), so that its password is in no file and no process list."""

    spec: StudySpec
    out: Path
    deadline: float | None = None
    artifacts: af.Location | None = None  # None: the spec's store, or <out>/artifacts
    stage: str = SEARCH  # SEARCH: the search's trials; REFIT: the refit study's (search/trial/refit.py)

    @property
    def store(self) -> af.Location:
        """Where this plan's trials keep their files."""
        return self.artifacts or af.resolve(None, self.spec.artifacts, self.out)

    def context(self, url: str) -> RunContext:
        """The launcher's context, as its workers rebuild it (the URL comes from the environment)."""
        return RunContext(self.spec, self.out, url, self.store, _dataset_config(self.spec, self.out))

    def write(self, path: Path) -> Path:
        # Without the study file's storage URL, which may hold a password: workers take theirs
        # from the environment.
        spec = dataclasses.replace(self.spec, storage=None)
        text = json.dumps({"spec": json.loads(study_file.to_json(spec)), "out": str(self.out),
                           "deadline": self.deadline, "stage": self.stage,
                           "artifacts": self.artifacts.url if self.artifacts else None}, indent=1)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)  # a worker never reads half a plan
        return path

    @classmethod
    def read(cls, path: Path) -> WorkerPlan:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            spec, out = study_file.from_json(json.dumps(data["spec"])), Path(data["out"])
            store = data.get("artifacts")
            stage = data.get("stage", SEARCH)
            if stage not in (SEARCH, REFIT):
                raise ValueError(f"stage {stage!r}")
            return cls(spec, out, data.get("deadline"),
                       af.parse(store, where=f"{path}: artifacts") if store else None, stage)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{path}: not a worker plan written by flexunet search run ({exc})") from None

"""``flexunet search run``: prepare the data, create the study once, enqueue the baseline,
start K local worker processes and follow them until the budget is spent."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import optuna

from flexunet import config as cfg
from flexunet.data import ct_ich
from flexunet.errors import ConfigError, FlexUNetError
from search import algorithms, dashboard, progress, space as sp
from search import storage as st
from search.study_file import ParamSpec, StudySpec

_logger = logging.getLogger(__name__)
DATA_DIR = "data"


@dataclass(frozen=True)
class RunOptions:
    storage: str | None = None
    workers: int = 1
    gpus: tuple[str, ...] = ()
    out: Path | None = None


def out_dir(spec: StudySpec, out: Path | None) -> Path:
    return (out or spec.out or Path("runs") / _slug(spec.name)).absolute()


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name).strip(".") or "study"


def dataset_config_path(spec: StudySpec, out: Path) -> Path:
    if spec.dataset_config is not None:
        return spec.dataset_config
    return out / DATA_DIR / "train_eval_infer.config"


def ensure_dataset(spec: StudySpec, out: Path) -> Path:
    """Prepare the study's dataset into ``out/data`` unless it is there already."""
    path = dataset_config_path(spec, out)
    if spec.prepare is None or path.exists():
        return path
    p = spec.prepare
    print(f"preparing {p.dataset} from {p.source} into {out / DATA_DIR}", flush=True)
    try:
        report = ct_ich.prepare(p.source, out / DATA_DIR, size=p.size, fractions=p.split, seed=p.seed)
    except FlexUNetError:
        if path.exists():  # another process on this machine prepared it first
            return path
        raise
    for line in report.lines():
        print(f"  {line}")
    return path


def open_dataset(spec: StudySpec, out: Path) -> tuple[cfg.Config, int]:
    """The dataset's config and the study's (square) image size."""
    base = cfg.load(dataset_config_path(spec, out))
    size = spec.image_size
    if size is None:
        if base.model.image_width != base.model.image_height:
            raise ConfigError(f"{spec.path}: the dataset's images are not square; set [study] image_size")
        size = base.model.image_width
    return base, size


def study_space(spec: StudySpec, image_size: int) -> tuple[ParamSpec, ...]:
    return sp.bounded(spec.space, image_size, str(spec.path))


def _study_attrs(spec: StudySpec, out: Path, base: cfg.Config, size: int) -> dict[str, object]:
    split_file = dataset_config_path(spec, out).parent / "split.json"
    split = json.loads(split_file.read_text(encoding="utf-8")) if split_file.exists() else None
    return {
        "flexunet_image_size": size,
        "flexunet_dataset_config": str(dataset_config_path(spec, out).absolute()),
        "flexunet_artifact_dir": str((out / "artifacts").absolute()),
        "flexunet_study_file": spec.path.name,
        "flexunet_objectives": ["val_foreground_dice"] + ([spec.second_objective] if spec.second_objective else []),
        "flexunet_dataset": {
            "prepared": spec.prepare.dataset if spec.prepare else None,
            "classes": base.model.num_classes, "channels": base.model.image_channels,
            "split": split.get("parts") if split else None,
            "slices": split.get("slices") if split else None,
        },
        "flexunet_budget": vars(spec.budget),
        "flexunet_space": [
            {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(p).items() if v not in (None, (), {})}
            for p in spec.space],
        "flexunet_fixed": dict(spec.fixed),
        "flexunet_sampler": spec.sampler.name, "flexunet_pruner": spec.pruner.name,
    }


def create_study(spec: StudySpec, url: str, out: Path) -> optuna.Study:
    """Create (or join) the study, record what it searches, and enqueue the seed baseline."""
    base, size = open_dataset(spec, out)
    space = study_space(spec, size)
    storage = st.open_storage(url)
    study = st.create_once(storage, spec.name, spec.directions, algorithms.make_sampler(spec),
                           algorithms.make_pruner(spec))
    existing = study.user_attrs.get("flexunet_image_size")
    if existing is not None and existing != size:
        raise ConfigError(f"study {spec.name!r} searches {existing} px images; this run asks for {size} px")
    if existing is None:
        for key, value in _study_attrs(spec, out, base, size).items():
            study.set_user_attr(key, value)
        study.set_metric_names(["val_foreground_dice"] + ([spec.second_objective] if spec.second_objective else []))
    if spec.baseline and not any(t.user_attrs.get("baseline") for t in study.get_trials(deepcopy=False)):
        study.enqueue_trial(sp.baseline_params(spec, space, size), user_attrs={"baseline": True})
    return study


def worker_env(index: int, workers: int, gpus: tuple[str, ...]) -> dict[str, str]:
    """Environment of local worker ``index``: its GPU, or its share of the CPU's threads."""
    env = dict(os.environ)
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = gpus[index % len(gpus)]
    else:
        env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "")
        share = max(1, (os.cpu_count() or 1) // workers)
        env["FLEXUNET_THREADS"] = str(share)
        env["OMP_NUM_THREADS"] = str(share)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    return env


def run(spec: StudySpec, options: RunOptions) -> int:
    """Run the study with ``options.workers`` local processes; returns the exit status."""
    if options.workers < 1:
        raise ConfigError(f"--workers {options.workers}: need at least 1")
    out = out_dir(spec, options.out)
    out.mkdir(parents=True, exist_ok=True)
    url = st.resolve_url(options.storage, spec.storage, out)
    ensure_dataset(spec, out)
    study = create_study(spec, url, out)
    dashboard.write_study_note(study, st.mask(url))
    print(f"study {spec.name!r} on {st.mask(url)}; output in {out}", flush=True)
    deadline = time.time() + spec.budget.timeout if spec.budget.timeout else None
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    command = [sys.executable, "-m", "search.worker", str(spec.path.absolute()), "--storage", url,
               "--out", str(out), "--n-trials", str(spec.budget.n_trials),
               "--max-epochs", str(spec.budget.max_epochs)]
    if spec.image_size:
        command += ["--image-size", str(spec.image_size)]
    if deadline:
        command += ["--deadline", str(deadline)]
    procs = []
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for i in range(options.workers):
        log_path = logs / f"worker-{os.uname().nodename}-{stamp}-{i}.log"
        handle = log_path.open("w", encoding="utf-8")
        procs.append((subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT,
                                       env=worker_env(i, options.workers, options.gpus),
                                       start_new_session=True), log_path, handle))
    watcher = progress.Watcher(study, spec.budget.n_trials, [p for p, _, _ in procs])
    try:
        while any(p.poll() is None for p, _, _ in procs):
            watcher.update()
            time.sleep(1.0)
    except KeyboardInterrupt:
        _stop(procs)
        raise
    finally:
        for _, _, handle in procs:
            handle.close()
    watcher.update(final=True)
    dashboard.write_study_note(study, st.mask(url))  # now with the baseline's final value
    failed = [(p, path) for p, path, _ in procs if p.returncode != 0]
    for p, path in failed:
        tail = path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-1:] or [""]
        print(f"worker {p.pid} exited with status {p.returncode}: {tail[0]} (log: {path})", file=sys.stderr)
    return 1 if failed else 0


def _stop(procs: list) -> None:  # type: ignore[type-arg]
    for p, _, _ in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
    for p, _, _ in procs:
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()

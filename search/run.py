"""``flexunet search run``: prepare the data, create the study once, enqueue the baseline,
start K local worker processes and follow them until the budget is spent."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import optuna

from flexunet import config as cfg
from flexunet.data import ct_ich
from flexunet.errors import ConfigError, FlexUNetError
from search import algorithms, dashboard, progress, recovery, space as sp
from search import artifacts as af
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
    artifacts: str | None = None  # --artifacts: a folder or s3://BUCKET/PREFIX


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


def _study_attrs(spec: StudySpec, out: Path, base: cfg.Config, size: int,
                 artifacts: af.Location) -> dict[str, object]:
    split_file = dataset_config_path(spec, out).parent / "split.json"
    try:
        split = json.loads(split_file.read_text(encoding="utf-8")) if split_file.exists() else None
    except (ValueError, OSError) as exc:
        raise ConfigError(f"{split_file}: not a readable split file ({exc})") from None
    if split is not None and not isinstance(split, dict):
        raise ConfigError(f"{split_file}: not a split file written by flexunet prepare")
    return {
        "flexunet_image_size": size,
        "flexunet_dataset_config": str(dataset_config_path(spec, out).absolute()),
        af.STUDY_ATTR: artifacts.url,
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


def create_study(spec: StudySpec, url: str, out: Path, storage: optuna.storages.BaseStorage | None = None,
                 artifacts: af.Location | None = None) -> optuna.Study:
    """Create (or join) the study, record what it searches and where its trials keep their files
    (default: the study file's store, or ``out/artifacts``), and enqueue the seed baseline."""
    artifacts = artifacts or af.resolve(None, spec.artifacts, out)
    base, size = open_dataset(spec, out)
    space = study_space(spec, size)
    storage = storage or st.open_storage(url)
    study, created = st.create_once(storage, spec.name, spec.directions, algorithms.make_sampler(spec),
                                    algorithms.make_pruner(spec))
    existing = study.user_attrs.get("flexunet_image_size")
    if existing is not None and existing != size:
        raise ConfigError(f"study {spec.name!r} searches {existing} px images; this run asks for {size} px")
    if existing is None:
        for key, value in _study_attrs(spec, out, base, size, artifacts).items():
            study.set_user_attr(key, value)
        study.set_metric_names(["val_foreground_dice"] + ([spec.second_objective] if spec.second_objective else []))
    if spec.baseline and created:
        # Only the process that created the study enqueues: launchers started together on
        # one new study would otherwise each add a baseline.
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
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        env.setdefault(sp.MEMORY_ENV, f"{0.8 * memory / workers:.2f}")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    return env


class _Workers:
    """The local worker processes: started, restarted when killed, stopped on a signal."""

    def __init__(self, command: list[str], out: Path, url: str, options: RunOptions) -> None:
        self.command, self.url, self.options = command, url, options
        self.logs = out / "logs"
        self.logs.mkdir(exist_ok=True)
        self.stamp = time.strftime("%Y%m%d-%H%M%S")
        self.procs: list[subprocess.Popen | None] = [None] * options.workers
        self.log_paths: list[Path] = [self.logs / f"worker-{os.uname().nodename}-{self.stamp}-{i}.log"
                                      for i in range(options.workers)]
        self.restarts = 0
        self.stopping = False
        self._reaped: set[int] = set()
        self.started = [0] * options.workers  # launches per slot, to give each its own seed

    def start(self, index: int) -> None:
        env = worker_env(index, self.options.workers, self.options.gpus)
        env[st.ENV_VAR] = self.url  # not on the command line, where `ps` would show a password
        env["FLEXUNET_WORKER_SLOT"] = f"{index}.{self.started[index]}"
        self.started[index] += 1
        with self.log_paths[index].open("a", encoding="utf-8") as handle:
            self.procs[index] = subprocess.Popen(self.command, stdout=handle, stderr=subprocess.STDOUT, env=env,
                                                 start_new_session=True)

    def alive(self) -> bool:
        return any(p is not None and p.poll() is None for p in self.procs)

    def restart_killed(self, study: optuna.Study, n_trials: int, deadline: float | None) -> None:
        """A worker killed by a signal (the kernel's OOM killer, a crash, an operator) has its
        trial failed with the reason and queued again, and is replaced while the study still
        has budget."""
        from search.worker import budget_left

        for i, p in enumerate(self.procs):
            if p is None or p.poll() is None or p.returncode >= 0 or self.stopping or i in self._reaped:
                continue
            self._reaped.add(i)
            sig = signal.Signals(-p.returncode)
            crashed = sig in (signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT)
            name = sig.name
            for trial in _running_trials_of(study, p.pid):
                # TensorFlow on a CPU crashes when memory runs out; running that trial again
                # would crash again. A killed worker's trial (operator, OOM killer) is retried.
                reason = (f"worker crashed ({name}), most likely out of memory" if crashed
                          else f"worker killed ({name})")
                recovery.fail(study, trial, reason, retry=not crashed)
            if self.restarts >= 3 * self.options.workers or (deadline and time.time() >= deadline):
                continue
            if not budget_left(study, n_trials):
                continue
            print(f"worker {p.pid} died ({name}); starting another", file=sys.stderr, flush=True)
            self.restarts += 1
            self._reaped.discard(i)
            self.start(i)

    def stop(self, timeout: float = 120.0) -> None:
        """SIGTERM every worker: each ends its trial as FAIL ("interrupted"), queues it again
        to resume from its last epoch, and exits."""
        self.stopping = True
        for p in self.procs:
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
        end = time.time() + timeout
        for p in self.procs:
            if p is None:
                continue
            try:
                p.wait(timeout=max(1.0, end - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def failures(self) -> list[tuple[subprocess.Popen, Path]]:
        ok = (0, 130) if self.stopping else (0,)
        return [(p, path) for p, path in zip(self.procs, self.log_paths)
                if p is not None and p.returncode not in ok and p.returncode is not None and p.returncode > 0]


def _running_trials_of(study: optuna.Study, pid: int) -> list[optuna.trial.FrozenTrial]:
    host = socket.gethostname()
    return [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
            if t.user_attrs.get("pid") == pid and t.user_attrs.get("host") == host]


def _on_signal(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def setup(spec: StudySpec, options: RunOptions) -> tuple[optuna.Study, str, Path]:
    """Everything before the workers: the dataset, the study (created once, with its
    baseline) and its dashboard note. ``flexunet search create`` stops here."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out = out_dir(spec, options.out)
    url = st.resolve_url(options.storage, spec.storage, out)
    # The stores are opened first: a wrong URL must not leave a study folder behind, and a wrong
    # bucket fails here, once, not in every worker (they make an artifact folder themselves).
    artifacts = af.resolve(options.artifacts, spec.artifacts, out)
    af.open_store(artifacts, check=artifacts.folder is None)
    storage = st.open_storage(url)
    out.mkdir(parents=True, exist_ok=True)
    ensure_dataset(spec, out)
    study = create_study(spec, url, out, storage, artifacts)
    warning = af.mismatch_warning(study, artifacts)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    dashboard.write_study_note(study, st.mask(url))
    print(f"study {spec.name!r} on {st.mask(url)}; output in {out}; trial files in {artifacts}", flush=True)
    return study, url, out


def run(spec: StudySpec, options: RunOptions) -> int:
    """Run the study with ``options.workers`` local processes; returns the exit status."""
    if options.workers < 1:
        raise ConfigError(f"--workers {options.workers}: need at least 1")
    study, url, out = setup(spec, options)
    deadline = time.time() + spec.budget.timeout if spec.budget.timeout else None
    command = [sys.executable, "-m", "search.worker", str(spec.path.absolute()), "--out", str(out),
               "--artifacts", af.resolve(options.artifacts, spec.artifacts, out).url,
               "--n-trials", str(spec.budget.n_trials), "--max-epochs", str(spec.budget.max_epochs)]
    if spec.image_size:
        command += ["--image-size", str(spec.image_size)]
    if deadline:
        command += ["--deadline", str(deadline)]
    workers = _Workers(command, out, url, options)
    previous = signal.signal(signal.SIGTERM, _on_signal)
    watcher = progress.Watcher(study, spec.budget.n_trials, spec.budget.max_epochs)
    interrupted = False
    try:
        for i in range(options.workers):
            workers.start(i)
        last_check = 0.0
        while True:
            watcher.update()
            if time.time() - last_check > 5.0:
                # Any launcher (on any machine) fails trials whose worker stopped sending
                # heartbeats, so a dead worker's trial is retried even while the others are busy.
                recovery.recover(study)
                last_check = time.time()
            workers.restart_killed(study, spec.budget.n_trials, deadline)
            if not workers.alive():
                break
            time.sleep(1.0)
    except KeyboardInterrupt:
        interrupted = True
        print("interrupted: stopping the workers (their trials are queued to resume)", file=sys.stderr, flush=True)
        workers.stop()
    finally:
        signal.signal(signal.SIGTERM, previous)
    watcher.update(final=True)
    dashboard.write_study_note(study, st.mask(url))  # now with the baseline's final value
    for p, path in workers.failures():
        tail = path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-1:] or [""]
        print(f"worker {p.pid} exited with status {p.returncode}: {tail[0]} (log: {path})", file=sys.stderr)
    if interrupted:
        print("run the same command again to resume the study", file=sys.stderr)
        return 130
    return 1 if workers.failures() else 0

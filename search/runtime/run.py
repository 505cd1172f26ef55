"""``flexunet search run``: prepare the data, create the study once, enqueue the baseline,
start K local worker processes and follow them until the budget is spent.

The launcher hands its workers one plan (``logs/plan-*.json``: the resolved spec, the run folder,
the deadline) and its pid; a worker ends when its launcher does, however the launcher died.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import optuna

from flexunet import devices
from flexunet.errors import ConfigError
from search.store import _internals
from search.store import artifacts as af
from search.results import dashboard
from search.spec import folds
from search.trial import lifecycle
from search import paths
from search.runtime import progress
from search import keys as k
from search.spec import space as sp
from search.store import storage as st
from search.store import retry
from search.store import urls
from search.spec import budget
from search.trial import refit as rf
from search.runtime.context import (LAUNCHER_ENV, REFIT, SEARCH, SLOT_ENV, Dataset, RunContext, WorkerPlan,
                                    create_study)
from search.paths import RunFolder
from search.spec.study_file import StudySpec

_logger = logging.getLogger(__name__)
_FULL_SETTLE_SECONDS = 10.0  # a full server turns a worker away within ~6 s of its start (three tries)


@dataclass(frozen=True)
class RunOptions:
    storage: str | None = None
    workers: int = 1
    gpus: tuple[str, ...] = ()
    out: Path | None = None
    artifacts: str | None = None  # --artifacts: a folder or s3://BUCKET/PREFIX


def worker_env(index: int, workers: int, gpus: tuple[str, ...],
               gpu_memory_mib: dict[str, float] | None = None) -> dict[str, str]:
    """Environment of local worker ``index``: its share of the CPU's threads and, with GPUs, its
    GPU (round robin) and its share of that GPU's memory (``gpu_memory_mib``: each GPU's total,
    see :func:`flexunet.devices.gpu_memory_mib`); without, its share of the machine's memory."""
    env = dict(os.environ)
    share = max(1, (os.cpu_count() or 1) // workers)
    env["FLEXUNET_THREADS"] = str(share)
    env["OMP_NUM_THREADS"] = str(share)
    if gpus:
        gpu = devices.shares(workers, gpus, gpu_memory_mib or {})[index]
        env.update(gpu.env())
        if gpu.mib is not None:
            env[sp.MEMORY_ENV] = f"{gpu.mib / 1024:.2f}"
    else:
        env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "")
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        env.setdefault(sp.MEMORY_ENV, f"{0.8 * memory / workers:.2f}")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    return env


class _Workers:
    """The local worker processes: started, restarted when killed, stopped on a signal."""

    def __init__(self, plan: WorkerPlan, url: str, options: RunOptions) -> None:
        self.url, self.options = url, options
        self.logs = RunFolder(plan.out).logs
        self.logs.mkdir(exist_ok=True)
        self.stamp = time.strftime("%Y%m%d-%H%M%S") + ("" if plan.stage == SEARCH else f"-{plan.stage}")
        # Written once: every worker of this launcher (restarts too) runs exactly this spec.
        self.plan_path = plan.write(self.logs / f"plan-{os.uname().nodename}-{self.stamp}-{os.getpid()}.json")
        self.command = [sys.executable, "-m", "search.runtime.worker", str(self.plan_path)]
        self.procs: list[subprocess.Popen | None] = [None] * options.workers
        self.log_paths: list[Path] = [self.logs / f"worker-{os.uname().nodename}-{self.stamp}-{i}.log"
                                      for i in range(options.workers)]
        self.restarts = 0
        self.stopping = False
        self.turned_away_seen = self.turned_away_count = 0  # reported; seen so far
        self.turned_away_changed = 0.0
        self._reaped: set[int] = set()
        self.started = [0] * options.workers  # launches per slot, to give each its own seed
        self.gpu_memory = devices.gpu_memory_mib() if options.gpus else {}

    def start(self, index: int) -> None:
        env = worker_env(index, self.options.workers, self.options.gpus, self.gpu_memory)
        env[urls.ENV_VAR] = self.url  # not on the command line, where `ps` would show a password
        env[SLOT_ENV] = f"{index}.{self.started[index]}"
        env[LAUNCHER_ENV] = str(os.getpid())
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
                lifecycle.fail(study, trial, reason, retry_it=not crashed)
            if self.restarts >= 3 * self.options.workers or (deadline and time.time() >= deadline):
                continue
            if not lifecycle.budget_left(study, n_trials):
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

    def turned_away(self) -> list[subprocess.Popen]:
        """The workers the database server turned away at start-up (it was full)."""
        return [p for p in self.procs if p is not None and p.returncode == st.EXIT_SERVER_FULL]

    def report_turned_away(self, study: optuna.Study, final: bool = False) -> None:
        """One line when workers were turned away, with the server's figures read through this
        launcher's own connection (the turned-away workers have none to read them with). Workers
        started together are turned away within seconds of each other: the line waits until no
        more has been for ``_FULL_SETTLE_SECONDS`` (or the run ends), and counts them all."""
        count = len(self.turned_away())
        if count != self.turned_away_count:
            self.turned_away_count, self.turned_away_changed = count, time.time()
        settled = final or time.time() - self.turned_away_changed >= _FULL_SETTLE_SECONDS
        if count <= self.turned_away_seen or not settled:
            return
        self.turned_away_seen = count
        turned = self.turned_away()
        try:
            figures = st.connection_figures(_internals.study_storage(study))
        except Exception:  # the launcher's own connection went too: say what is known
            figures = None
        others = "the others go on" if self.alive() else "none is left"
        print(st.full_server_line(self.url, f"{len(turned)} of {self.options.workers} workers of this launcher "
                                            f"turned away at start-up, {others}", figures), file=sys.stderr, flush=True)

    def failures(self) -> list[tuple[subprocess.Popen, Path]]:
        ok = (0, 130, st.EXIT_SERVER_FULL) if self.stopping else (0, st.EXIT_SERVER_FULL)
        return [(p, path) for p, path in zip(self.procs, self.log_paths)
                if p is not None and p.returncode not in ok and p.returncode is not None and p.returncode > 0]


def _running_trials_of(study: optuna.Study, pid: int) -> list[optuna.trial.FrozenTrial]:
    host = socket.gethostname()
    return [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
            if t.user_attrs.get(k.PID) == pid and t.user_attrs.get(k.HOST) == host]


def _on_signal(signum: int, frame: object) -> None:
    # Raised when the storage call in progress (the progress line reads the study every second)
    # has returned: raised inside it, it left a SQLite cursor half read, whose lock kept the
    # workers from booking their interrupted trials while this process waited for them.
    retry.interrupt_outside_calls(KeyboardInterrupt(signal.Signals(signum).name))


def context(spec: StudySpec, options: RunOptions) -> RunContext:
    """The launch's run folder, storage URL, artifact store and dataset config, resolved once
    from the spec and the options."""
    return RunContext.resolve(spec, out=options.out, storage=options.storage, artifacts=options.artifacts)


def setup(spec: StudySpec, options: RunOptions) -> tuple[optuna.Study, RunContext]:
    """Everything before the workers: the dataset, the study (created once, with its
    baseline) and its dashboard note. ``flexunet search create`` stops here."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    ctx = context(spec, options)
    # The stores are opened first: a wrong URL must not leave a study folder behind, and a wrong
    # bucket fails here, once, not in every worker (they make an artifact folder themselves).
    af.open_store(ctx.artifacts, check=ctx.artifacts.folder is None)
    storage = st.open_storage(ctx.url, on_stale=lifecycle.stale_trial_callback)
    ctx.out.mkdir(parents=True, exist_ok=True)
    ctx.prepare_dataset()
    data = ctx.open_dataset()
    for line in _fold_class_warnings(ctx, data):
        print(line, file=sys.stderr, flush=True)
    study = create_study(ctx, data, storage)
    warning = af.mismatch_warning(study, ctx.artifacts)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    dashboard.write_study_note(study, urls.mask(ctx.url))
    print(f"study {spec.name!r} on {urls.mask(ctx.url)}; output in {ctx.out}; trial files in {ctx.artifacts}", flush=True)
    return study, ctx


def _fold_class_warnings(ctx: RunContext, data: Dataset) -> list[str]:
    """One line per fold whose validation patients hold no slice of some class: that fold
    cannot score the class, and its mean leaves it out (the folds are stratified, so this
    happens only where fewer patients hold the class than there are folds)."""
    spec = ctx.spec
    if not spec.cross_validated:
        return []
    base, size = data.base, data.image_size
    config = dataclasses.replace(base, model=dataclasses.replace(base.model, image_width=size, image_height=size))
    folds_file = ctx.dataset_dir / paths.FOLDS_FILE
    missing = folds.missing_classes(config, spec.folds, folds_file, spec.prepare.seed if spec.prepare else 0)
    return [f"warning: fold {k + 1} of {spec.folds}: no validation slice holds class "
            f"{', '.join(map(str, classes))} (too few patients hold it); that fold's Dice leaves it out"
            for k, classes in sorted(missing.items())]


def run(spec: StudySpec, options: RunOptions) -> int:
    """Run the study with ``options.workers`` local processes, then its refit when the study
    file has a ``[refit]`` section; returns the exit status.

    One timeout covers both: the search stops starting trials early enough to leave the refit
    the time search.spec.budget estimates for it (at most a third of the timeout), an estimate
    updated as the search measures the configurations it will refit."""
    if options.workers < 1:
        raise ConfigError(f"--workers {options.workers}: need at least 1")
    study, ctx = setup(spec, options)
    started = time.time()
    timeout = spec.budget.timeout
    if spec.refit is None:
        deadline = started + timeout if timeout else None
    else:
        deadline = budget.search_deadline(started, timeout, rf.estimate(study, spec, options.workers))
        study.set_user_attr(k.STUDY_SEARCH_DEADLINE, deadline)
    workers = _Workers(WorkerPlan(spec, ctx.out, deadline, ctx.artifacts), ctx.url, options)
    watcher = progress.Watcher(study, spec.budget.n_trials, spec.budget.max_epochs, deadline=deadline)
    clock = _SearchClock(study, spec, options.workers, started) if spec.refit is not None and timeout else None
    code = _follow(study, workers, watcher, spec.budget.n_trials, deadline, clock)
    dashboard.write_study_note(study, urls.mask(ctx.url))  # now with the baseline's final value
    if code != 0 or spec.refit is None:
        return code
    return _run_refit(ctx, options, study, deadline=started + timeout if timeout else None)


def refit(spec: StudySpec, options: RunOptions) -> int:
    """``flexunet search refit``: plan the refit of a searched study (once) and run its
    unfinished models with ``options.workers`` local processes; returns the exit status."""
    if options.workers < 1:
        raise ConfigError(f"--workers {options.workers}: need at least 1")
    if spec.refit is None:
        raise ConfigError(f"{spec.path}: the study file has no [refit] section (add one: README, \"The refit\")")
    study, ctx = setup(spec, options)
    return _run_refit(ctx, options, study)


def _run_refit(ctx: RunContext, options: RunOptions, study: optuna.Study, deadline: float | None = None) -> int:
    spec, url = ctx.spec, ctx.url
    refit_study = rf.plan(study, st.open_storage(url, on_stale=lifecycle.stale_trial_callback), spec)
    total = rf.models(refit_study)
    done = len(rf.finished(refit_study))
    record = study.user_attrs[k.STUDY_REFIT]
    print(f"refit: {total} models ({len(record['configurations'])} configurations: trials "
          f"{', '.join(map(str, record['configurations']))}; {record['spec']['folds']} folds x "
          f"{record['spec']['seeds']} seeds), {done} trained already, in study {refit_study.study_name!r}", flush=True)
    if done < total:
        estimate = rf.estimate(study, spec, options.workers)
        if estimate is not None:
            left = "" if deadline is None else f"; {max(0.0, deadline - time.time()):.0f} s of the timeout left"
            print(f"refit: estimated at most {estimate:.0f} s{left}", flush=True)
        workers = _Workers(WorkerPlan(spec, ctx.out, None, ctx.artifacts, stage=REFIT), url, options)
        watcher = progress.Watcher(refit_study, total, int(record["spec"]["epochs"]))
        code = _follow(refit_study, workers, watcher, total, None, None,
                       resume_hint=f"run `flexunet search refit {spec.path}` to finish the refit (a model in "
                                   "training resumes from its last epoch)")
        if code != 0:
            return code
    dashboard.write_study_note(study, urls.mask(url))
    for line in rf.status_lines(study, st.open_storage(url, heartbeat=False, create=False)):
        print(line)
    return 0


class _SearchClock:
    """Moves the search's deadline as the configurations it will refit are measured (the
    workers read it from the study: it reaches workers on other machines too)."""

    def __init__(self, study: optuna.Study, spec: StudySpec, workers: int, started: float) -> None:
        self.study, self.spec, self.workers, self.started = study, spec, workers, started
        self.deadline = study.user_attrs.get(k.STUDY_SEARCH_DEADLINE)
        self.warned = False

    def update(self, watcher: progress.Watcher) -> float | None:
        timeout = self.spec.budget.timeout
        estimate = rf.estimate(self.study, self.spec, self.workers)
        deadline = budget.search_deadline(self.started, timeout, estimate)
        if estimate is not None and budget.over_share(estimate, timeout) and not self.warned:
            self.warned = True
            print(f"warning: the refit is estimated at {estimate:.0f} s, more than a third of the "
                  f"{timeout:.0f} s timeout; the run will end late (lower [refit] epochs, seeds or top_k)",
                  file=sys.stderr, flush=True)
        if deadline is not None and (self.deadline is None or abs(deadline - self.deadline) > 1.0):
            self.deadline = deadline
            self.study.set_user_attr(k.STUDY_SEARCH_DEADLINE, deadline)
            watcher.deadline = deadline
        return self.deadline


def _follow(study: optuna.Study, workers: _Workers, watcher: progress.Watcher, n_trials: int,
            deadline: float | None, clock: _SearchClock | None,
            resume_hint: str = "run the same command again to resume the study") -> int:
    """Start the workers and follow them until they end; returns the exit status."""
    # SIGINT only where Python would raise KeyboardInterrupt for it (not in a job started with it ignored).
    caught = (signal.SIGTERM,) + ((signal.SIGINT,) if signal.getsignal(signal.SIGINT) is signal.default_int_handler else ())
    previous = {sig: signal.signal(sig, _on_signal) for sig in caught}
    interrupted = False
    try:
        for i in range(workers.options.workers):
            workers.start(i)
        last_check = 0.0
        while True:
            watcher.update()
            if time.time() - last_check > 5.0:
                # Any launcher (on any machine) fails trials whose worker stopped sending
                # heartbeats, so a dead worker's trial is retried even while the others are busy.
                lifecycle.sweep(study)
                if clock is not None:
                    deadline = clock.update(watcher)
                last_check = time.time()
            workers.restart_killed(study, n_trials, deadline)
            workers.report_turned_away(study)
            if not workers.alive():
                break
            time.sleep(1.0)
    except KeyboardInterrupt:
        interrupted = True
        print("interrupted: stopping the workers (their trials are queued to resume)", file=sys.stderr, flush=True)
        workers.stop()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    watcher.update(final=True)
    for p, path in workers.failures():
        tail = path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-1:] or [""]
        print(f"worker {p.pid} exited with status {p.returncode}: {tail[0]} (log: {path})", file=sys.stderr)
    if interrupted:
        print(resume_hint, file=sys.stderr)
        return 130
    workers.report_turned_away(study, final=True)
    # Workers turned away by a full server lose nothing (they never had a trial): the run is done
    # if the others spent the budget, and failed if none could join.
    every_one_turned_away = len(workers.turned_away()) == workers.options.workers
    return 1 if workers.failures() or every_one_turned_away else 0

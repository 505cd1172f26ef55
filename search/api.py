"""The Python API, in Optuna's manner: a :class:`Study` to create and run from a spec, and an
:class:`OpenedStudy` read back from its storage (``Study.open()``, or :func:`load_study` by name
without the study file), as ``flexunet search ...`` does from the command line.

``Study.run()`` raises when the study does not end with its budget spent
(:class:`search.errors.StudyInterrupted`, :class:`search.errors.TrialsFailed`,
:class:`search.errors.BadInput`) and returns a :class:`RunResult`; ``export()`` and ``report()``
return what they wrote. The spec the workers run is the one ``Study.spec`` holds when
:meth:`Study.run` is called: it is written once into the run folder for them, never read again
from the study file.

Example (the bundled sample, created in a temporary run folder without training a trial; a
bad request raises)::

    >>> import tempfile
    >>> from search import Study, load_study
    >>> from search.errors import BadInput
    >>> study = Study.from_file("studies/ct_ich_sample.toml", image_size=32, out=tempfile.mkdtemp())
    >>> opened = study.create()  # doctest: +ELLIPSIS
    preparing ct-ich from ...
    >>> for line in opened.status(): print(line)  # doctest: +ELLIPSIS
    study 'ct-ich-sample' on sqlite:///.../study.db: 1 trials (0 complete, 0 pruned, 0 fail, 0 running, 1 waiting)
    trial files in artifact folder .../artifacts
    best: none yet (no completed trial)
    baseline (seed settings): trial 0, WAITING, value -
    >>> load_study("ct-ich-sample", study.url).optuna_study.trials[0].user_attrs["baseline"]
    True
    >>> try:
    ...     study.run(workers=0)
    ... except BadInput as exc:
    ...     print(exc)
    --workers 0: need at least 1
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from flexunet.errors import ConfigError, FlexUNetError
from search import keys as k
from search.errors import BadInput, StudyInterrupted, TrialsFailed
from search.spec import study_file
from search.spec.study_file import StudySpec
from search.store import _internals
from search.store import storage as st
from search.store import urls

if TYPE_CHECKING:
    from flexunet import config as cfg
    from search.results.export import ExportResult
    from search.results.report import ReportResult
    from search.runtime.context import RunContext
    from search.runtime.run import RunOptions
    from search.store.artifacts import Location, Store

__all__ = ["OpenedStudy", "RunResult", "Study", "load_study"]


@dataclass(frozen=True)
class RunResult:
    """What a finished run (or refit) left in the study: its trials by state and the best.

    >>> RunResult("demo", {"COMPLETE": 3, "PRUNED": 1}, best_number=2, best_value=0.41).finished
    4
    """

    study_name: str
    states: dict[str, int]  # trial state name -> count, over the whole study
    best_number: int | None = None
    best_value: float | None = None

    @property
    def finished(self) -> int:
        return sum(n for state, n in self.states.items() if TrialState[state].is_finished())


@dataclass
class OpenedStudy:
    """A study in a storage, to read, export and report: from ``Study.open()`` (which knows the
    run folder and the spec's stores) or :func:`load_study` (which reads what the study
    recorded)."""

    name: str
    url: str  # the storage URL, resolved
    run_dir: Path | None = None
    dataset_config: Path | None = None  # the spec's dataset config (None: as the study recorded)
    store: Location | None = None  # the spec's artifact store, or the one named (None: as recorded)
    store_named: bool = False  # the store was named by the caller: it must be reachable
    _optuna: optuna.Study | None = field(default=None, repr=False)

    @property
    def optuna_study(self) -> optuna.Study:
        """The Optuna study, read-only use (no heartbeats)."""
        if self._optuna is None:
            storage = st.open_storage(self.url, heartbeat=False, create=False)
            self._optuna = st.load_study(storage, self.name)
        return self._optuna

    def status(self) -> list[str]:
        """What ``flexunet search status`` prints: trials by state, the best, the baseline, the
        running trials."""
        from search.results.status import summary_lines

        return summary_lines(self.optuna_study, urls.mask(self.url))

    @property
    def best_trial(self) -> FrozenTrial:
        """The best trial (of the first objective on a two-objective study)."""
        from search.results.status import best_trials

        best = best_trials(self.optuna_study)
        if not best:
            raise FlexUNetError(f"study {self.name!r} has no completed trial yet")
        return best[0]

    def files(self, data: str | Path | None = None, artifacts: str | None = None) -> tuple[cfg.Config, Store]:
        """The study's dataset config (loaded) and artifact store: given, from the spec, or as
        the study recorded them. Only a store named here (or to :func:`load_study`) must be
        reachable: without one, a report draws what it can and an export names the store it
        looked in."""
        from flexunet import config as cfg
        from search.store import artifacts as af

        study = self.optuna_study
        data_config = Path(data) if data else self.dataset_config or Path(study.user_attrs.get(k.STUDY_DATASET_CONFIG, ""))
        if not data_config.is_file():
            raise FlexUNetError(f"{data_config}: the study's dataset config is not on this machine (pass --data)")
        if artifacts:
            store = af.open_store(af.parse(str(artifacts), where="--artifacts"))
        elif self.store is not None:
            store = af.open_store(self.store, check=self.store_named)
        else:
            location = af.recorded(study)
            if location is None:
                raise FlexUNetError(f"study {study.study_name!r} records no artifact store ({af.HINT})")
            store = af.open_store(location, check=False)
        return cfg.load(data_config), store

    def export(self, out: str | Path, *, trial: int | None = None, force: bool = False,
               data: str | Path | None = None, artifacts: str | None = None,
               tta: bool = True, refit: bool = True) -> ExportResult:
        """Export the best trial (or ``trial``) into ``out`` and evaluate it on the test split,
        as ``flexunet search export`` does. A study with a refit exports the refit's ensemble
        (unless ``refit=False`` or a ``trial`` is named); a cross-validated trial exports as one
        ensemble of its fold models, with horizontal-flip test-time augmentation unless
        ``tta=False``."""
        from flexunet._tf import quiet_import
        from flexunet.outputs import check_target

        check_target(Path(out), replace=force)  # before the study's files and TensorFlow's import
        base, store = self.files(data, artifacts)
        quiet_import()
        from search.results.export import export

        study = self.optuna_study
        return export(study, _internals.study_storage(study), Path(out), base=base, artifacts=store,
                      masked_storage=urls.public(self.url), trial_number=trial, force=force, tta=tta,
                      refit=refit and trial is None)

    def report(self, out: str | Path, *, slices: int = 4, force: bool = False,
               data: str | Path | None = None, artifacts: str | None = None) -> ReportResult:
        """Write the study's HTML report into ``out``, as ``flexunet search report`` does."""
        from flexunet._tf import quiet_import
        from flexunet.outputs import check_target

        if slices < 1:
            raise FlexUNetError(f"--slices {slices}: need at least 1")
        check_target(Path(out), replace=force)  # before the whole report is drawn
        base, store = self.files(data, artifacts)
        quiet_import()
        from search.results.report import write_report

        study = self.optuna_study
        return write_report(study, _internals.study_storage(study), Path(out), base=base, artifacts=store,
                            public_storage=urls.public(self.url), slices=slices, force=force)


def load_study(name: str, storage: str | None = None, artifacts: str | None = None) -> OpenedStudy:
    """An existing study by name, without its study file (to read, export or report it);
    ``storage`` defaults to ``$FLEXUNET_STORAGE``, ``artifacts`` to the store it recorded."""
    from search.store import artifacts as af

    url = storage or os.environ.get(urls.ENV_VAR)
    if not url:
        raise FlexUNetError(f"--study needs --storage URL (or ${urls.ENV_VAR})")
    store = af.parse(str(artifacts), where="--artifacts") if artifacts else None
    return OpenedStudy(name, urls.normalize(url), store=store, store_named=store is not None)


@dataclass
class Study:
    """One flexunet study to create and run: a spec, where it is stored, and its run folder.

    Args:
        spec: the study (``search.spec.study_file.load(path)``, ``study_file.for_dataset(...)``,
            or built or changed in Python).
        storage: a storage URL (``grpc://HOST:PORT`` for ``flexunet search proxy``); default
            ``$FLEXUNET_STORAGE``, the spec's, or SQLite in the run folder.
        out: the run folder; default the spec's ``out``, or ``runs/<study name>``.
        artifacts: where trials keep their files: a folder or ``s3://BUCKET/PREFIX`` (credentials
            and endpoint from the AWS environment variables); default the spec's, or
            ``<out>/artifacts``.
        name: the study's name in the storage, when it is not the spec's.
    """

    spec: StudySpec
    storage: str | None = None
    out: Path | str | None = None
    artifacts: str | None = None
    name: str | None = None

    @classmethod
    def from_file(cls, path: str | Path, *, storage: str | None = None, out: str | Path | None = None,
                  artifacts: str | None = None, **overrides: Any) -> Study:
        """The study of a study file, with the command line's overrides (``n_trials``,
        ``timeout``, ``max_epochs``, ``image_size``: see ``StudySpec.with_overrides``)."""
        return cls(study_file.load(path).with_overrides(**overrides), storage=storage, out=out, artifacts=artifacts)

    # --------------------------------------------------------------------- where it lives

    @property
    def study_name(self) -> str:
        return self.name or self.spec.name

    def context(self) -> RunContext:
        """The run folder, storage URL, artifact store and dataset config this study resolves
        to, as the launcher resolves them."""
        from search.runtime.context import RunContext

        return RunContext.resolve(self.spec, out=Path(self.out) if self.out else None, storage=self.storage,
                                  artifacts=self.artifacts)

    @property
    def run_dir(self) -> Path:
        """The run folder."""
        return self.context().out

    @property
    def url(self) -> str:
        """The storage URL, resolved as the command line resolves ``--storage``."""
        return self.context().url

    def open(self) -> OpenedStudy:
        """The stored study, to read, export and report, with this spec's run folder, dataset
        config and artifact store."""
        ctx = self.context()
        return OpenedStudy(self.study_name, ctx.url, ctx.out, ctx.dataset_config, ctx.artifacts,
                           store_named=self.artifacts is not None)

    def _options(self, workers: int = 1, gpus: tuple[str, ...] = ()) -> RunOptions:
        from search.runtime.run import RunOptions

        return RunOptions(storage=self.storage, workers=workers, gpus=tuple(gpus),
                          out=Path(self.out) if self.out else None, artifacts=self.artifacts)

    # --------------------------------------------------------------------- doing

    def create(self) -> OpenedStudy:
        """Prepare the data and create the study with its baseline, without running a trial
        (before a batch launch: workers on other machines then join it)."""
        from search.runtime.run import setup

        created, _ = _as_bad_input(setup, self.spec, self._options())
        opened = self.open()
        opened._optuna = created
        return opened

    def run(self, workers: int | None = None, gpus: tuple[str, ...] | list[str] = (),
            workers_per_gpu: int | None = None) -> RunResult:
        """Run the study with ``workers`` local worker processes (default 1; with ``gpus``, round
        robin over those GPU ids), or ``workers_per_gpu`` on each GPU of ``gpus``, until its
        budget is spent, then its ``[refit]``, if any.

        Raises :class:`~search.errors.StudyInterrupted` (run it again to resume),
        :class:`~search.errors.TrialsFailed` (a worker failed) or
        :class:`~search.errors.BadInput`."""
        from search.runtime.run import run

        count = _as_bad_input(_local_workers, workers, tuple(gpus), workers_per_gpu)
        return self._finished(_as_bad_input(run, self.spec, self._options(count, tuple(gpus))))

    def refit(self, workers: int | None = None, gpus: tuple[str, ...] | list[str] = (),
              workers_per_gpu: int | None = None) -> RunResult:
        """Train the ``[refit]`` of a searched study (``run`` does it when the search ends) with
        local workers, as ``flexunet search refit``; a refit begun before is resumed. Raises as
        :meth:`run` does; the result is the refit study's."""
        from search.runtime.run import refit
        from search.trial import refit as rf

        count = _as_bad_input(_local_workers, workers, tuple(gpus), workers_per_gpu)
        code = _as_bad_input(refit, self.spec, self._options(count, tuple(gpus)))
        return self._finished(code, rf.study_name(self.study_name))

    def _finished(self, code: int, name: str | None = None) -> RunResult:
        if code == StudyInterrupted.exit_code:
            raise StudyInterrupted(f"study {self.study_name!r} interrupted: run it again to resume")
        if code != 0:
            raise TrialsFailed(f"study {self.study_name!r}: a worker failed (exit status {code}; see its log)")
        return _result(OpenedStudy(name or self.study_name, self.url).optuna_study)


def _result(study: optuna.Study) -> RunResult:
    from search.results.status import best_trials

    states: dict[str, int] = {}
    for trial in study.get_trials(deepcopy=False):
        states[trial.state.name] = states.get(trial.state.name, 0) + 1
    best = next(iter(best_trials(study)), None)
    return RunResult(study.study_name, states, best.number if best else None,
                     best.values[0] if best and best.values else None)


def _as_bad_input(call: Any, *args: Any) -> Any:
    """``call(*args)``, a user error raised as :class:`~search.errors.BadInput`."""
    try:
        return call(*args)
    except BadInput:
        raise
    except FlexUNetError as exc:
        raise BadInput(str(exc)) from exc


def _local_workers(workers: int | None, gpus: tuple[str, ...], workers_per_gpu: int | None) -> int:
    """``workers``, or ``workers_per_gpu`` times the GPUs of ``gpus``."""
    if workers_per_gpu is None:
        return 1 if workers is None else workers
    if not gpus:
        raise ConfigError(f"--workers-per-gpu {workers_per_gpu}: needs --gpus")
    if workers is not None:
        raise ConfigError("give --workers or --workers-per-gpu, not both")
    if workers_per_gpu < 1:
        raise ConfigError(f"--workers-per-gpu {workers_per_gpu}: need at least 1")
    return len(gpus) * workers_per_gpu

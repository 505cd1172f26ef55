"""The Python API: a study from a study file (or a spec built in Python), created, run with
local workers, and read back, as ``flexunet search ...`` does from the command line.

Example (the bundled sample, shrunk to a smoke run, on SQLite in ``runs/demo``)::

    import dataclasses
    from search import Study

    study = Study.from_file("studies/ct_ich_sample.toml", n_trials=4, max_epochs=2, image_size=32,
                            out="runs/demo")
    study.spec = dataclasses.replace(study.spec, fixed={**study.spec.fixed, "patience": 1})
    study.run(workers=2)          # 0 when the budget is spent
    print("\\n".join(study.status()))
    print(study.best_trial.params)
    study.export("runs/demo/best")
    study.report("runs/demo/report")

The spec the workers run is the one ``study.spec`` holds when :meth:`Study.run` is called: it
is written once into the run folder for them, never read again from the study file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial

from flexunet.errors import ConfigError, FlexUNetError
from search.store import _internals
from search import keys as k
from search.store import storage as st
from search.store import urls
from search.spec import study_file
from search.spec.study_file import StudySpec

__all__ = ["Study"]


@dataclass
class Study:
    """One flexunet study: a spec, where it is stored, and its run folder.

    Args:
        spec: the study (``search.spec.study_file.load(path)``, or built or changed in Python).
        storage: a storage URL (``grpc://HOST:PORT`` for ``flexunet search proxy``); default
            ``$FLEXUNET_STORAGE``, the spec's, or SQLite in the run folder.
        out: the run folder; default the spec's ``out``, or ``runs/<study name>``.
        artifacts: where trials keep their files: a folder or ``s3://BUCKET/PREFIX`` (credentials
            and endpoint from the AWS environment variables); default the spec's, or
            ``<out>/artifacts``; a study opened by name reads the store it recorded.
    """

    spec: StudySpec | None
    storage: str | None = None
    out: Path | str | None = None
    name: str | None = None  # the study's name when it is opened without a spec
    artifacts: str | None = None
    _optuna: optuna.Study | None = field(default=None, repr=False)

    @classmethod
    def from_file(cls, path: str | Path, *, storage: str | None = None, out: str | Path | None = None,
                  artifacts: str | None = None, **overrides: Any) -> Study:
        """The study of a study file, with the command line's overrides (``n_trials``,
        ``timeout``, ``max_epochs``, ``image_size``: see ``StudySpec.with_overrides``)."""
        return cls(study_file.load(path).with_overrides(**overrides), storage=storage, out=out, artifacts=artifacts)

    @classmethod
    def load(cls, name: str, storage: str, artifacts: str | None = None) -> Study:
        """An existing study by name, without its study file (to read, export or report it)."""
        return cls(None, storage=storage, name=name, artifacts=artifacts)

    # --------------------------------------------------------------------- where it lives

    @property
    def study_name(self) -> str:
        if self.spec is not None:
            return self.name or self.spec.name
        if not self.name:
            raise FlexUNetError("name the study: give STUDY.toml or --study NAME")
        return self.name

    @property
    def run_dir(self) -> Path | None:
        """The run folder (None for a study opened by name only)."""
        from search.runtime.context import out_dir

        if self.spec is None:
            return Path(self.out).absolute() if self.out else None
        return out_dir(self.spec, Path(self.out) if self.out else None)

    @property
    def url(self) -> str:
        """The storage URL, resolved as the command line resolves ``--storage``."""
        if self.spec is not None:
            return urls.resolve_url(self.storage, self.spec.storage, self.run_dir)
        url = self.storage or os.environ.get(urls.ENV_VAR)
        if not url:
            raise FlexUNetError(f"--study needs --storage URL (or ${urls.ENV_VAR})")
        return urls.normalize(url)

    def _options(self, workers: int = 1, gpus: tuple[str, ...] = ()):  # -> search.runtime.run.RunOptions
        from search.runtime.run import RunOptions

        return RunOptions(storage=self.storage, workers=workers, gpus=tuple(gpus),
                          out=Path(self.out) if self.out else None, artifacts=self.artifacts)

    def _need_spec(self, what: str) -> StudySpec:
        if self.spec is None:
            raise ConfigError(f"{what} needs the study file (a spec), not only the study's name")
        return self.spec

    # --------------------------------------------------------------------- doing

    def create(self) -> optuna.Study:
        """Prepare the data and create the study with its baseline, without running a trial
        (before a batch launch: workers on other machines then join it)."""
        from search.runtime.run import setup

        self._optuna, _, _ = setup(self._need_spec("create"), self._options())
        return self._optuna

    def run(self, workers: int | None = None, gpus: tuple[str, ...] | list[str] = (),
            workers_per_gpu: int | None = None) -> int:
        """Run the study with ``workers`` local worker processes (default 1; with ``gpus``, round
        robin over those GPU ids), or ``workers_per_gpu`` on each GPU of ``gpus``, until its
        budget is spent. Returns the exit status ``flexunet search run`` would: 0 done, 1 a
        worker failed, 130 interrupted (run again to resume)."""
        from search.runtime.run import run

        self._optuna = None
        count = _local_workers(workers, tuple(gpus), workers_per_gpu)
        return run(self._need_spec("run"), self._options(count, tuple(gpus)))

    def refit(self, workers: int | None = None, gpus: tuple[str, ...] | list[str] = (),
              workers_per_gpu: int | None = None) -> int:
        """Train the ``[refit]`` of a searched study (``run`` does it when the search ends) with
        local workers, as ``flexunet search refit``; a refit begun before is resumed. Returns
        the exit status (0 done, 1 a worker failed, 130 interrupted)."""
        from search.runtime.run import refit

        self._optuna = None
        count = _local_workers(workers, tuple(gpus), workers_per_gpu)
        return refit(self._need_spec("refit"), self._options(count, tuple(gpus)))

    # --------------------------------------------------------------------- reading

    @property
    def optuna_study(self) -> optuna.Study:
        """The Optuna study, read-only use (no heartbeats)."""
        if self._optuna is None:
            storage = st.open_storage(self.url, heartbeat=False, create=False)
            self._optuna = st.load_study(storage, self.study_name)
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
            raise FlexUNetError(f"study {self.study_name!r} has no completed trial yet")
        return best[0]

    def files(self, data: str | Path | None = None, artifacts: str | None = None) -> tuple[Any, Any]:
        """The study's dataset config (loaded) and artifact store (``search.store.artifacts.Store``):
        given, from the run folder, or as the study recorded them. Only a store named here (or
        in ``Study(artifacts=)``) must be reachable: without one, a report draws what it can and
        an export names the store it looked in."""
        from flexunet import config as cfg
        from search.store import artifacts as af
        from search.runtime.context import dataset_config_path

        study = self.optuna_study
        if data:
            data_config = Path(data)
        elif self.spec is not None:
            data_config = dataset_config_path(self.spec, self.run_dir)
        else:
            data_config = Path(study.user_attrs.get(k.STUDY_DATASET_CONFIG, ""))
        if not data_config.is_file():
            raise FlexUNetError(f"{data_config}: the study's dataset config is not on this machine (pass --data)")
        named = artifacts or self.artifacts
        if named:
            store = af.open_store(af.parse(str(named), where="--artifacts"))
        elif self.run_dir is not None:
            store = af.open_store(af.resolve(None, self.spec.artifacts if self.spec else None, self.run_dir),
                                  check=False)
        else:
            location = af.recorded(study)
            if location is None:
                raise FlexUNetError(f"study {study.study_name!r} records no artifact store ({af.HINT})")
            store = af.open_store(location, check=False)
        return cfg.load(data_config), store

    def export(self, out: str | Path, *, trial: int | None = None, force: bool = False,
               data: str | Path | None = None, artifacts: str | None = None,
               tta: bool = True, refit: bool = True):  # -> ExportResult
        """Export the best trial (or ``trial``) into ``out`` and evaluate it on the test split,
        as ``flexunet search export`` does. A study with a refit exports the refit's ensemble
        (unless ``refit=False`` or a ``trial`` is named); a cross-validated trial exports as one
        ensemble of its fold models, with horizontal-flip test-time augmentation unless
        ``tta=False``."""
        from flexunet._tf import quiet_import
        from flexunet.outputs import check_target

        check_target(Path(out), replace=force)  # before the study's files and TensorFlow's import
        base, folder = self.files(data, artifacts)
        quiet_import()
        from search.results.export import export

        study = self.optuna_study
        return export(study, _internals.study_storage(study), Path(out), base=base, artifacts=folder,
                      masked_storage=urls.public(self.url), trial_number=trial, force=force, tta=tta,
                      refit=refit and trial is None)

    def report(self, out: str | Path, *, slices: int = 4, force: bool = False,
               data: str | Path | None = None, artifacts: str | None = None):  # -> ReportResult
        """Write the study's HTML report into ``out``, as ``flexunet search report`` does."""
        from flexunet._tf import quiet_import
        from flexunet.outputs import check_target

        if slices < 1:
            raise FlexUNetError(f"--slices {slices}: need at least 1")
        check_target(Path(out), replace=force)  # before the whole report is drawn
        base, folder = self.files(data, artifacts)
        quiet_import()
        from search.results.report import write_report

        study = self.optuna_study
        return write_report(study, _internals.study_storage(study), Path(out), base=base, artifacts=folder,
                            public_storage=urls.public(self.url), slices=slices, force=force)


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

"""One study, two launchers of two workers each, started at once on a new database: what many
machines sharing one database look like, with real processes and real servers. On PostgreSQL the
machines share nothing else (each has its own ``--out``): report marks what the other machine's
folder holds, and export says where it looked."""

from __future__ import annotations

import html
import re
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from conftest import POSTGRES_URL, _fresh_database, assert_user_error, run_cli_here, shared_storage, start_cli, tiny_study
from search.store import artifacts as af
from search.trial import lifecycle
# search.paths, not flexunet.train or search.trial.objective: the eight spawned no-op workers import
# this module, and those two load TensorFlow (~4 CPU seconds each).
from search.paths import LOG_FILE, MODEL_FILE

pytestmark = [pytest.mark.slow, pytest.mark.db]


def _two_launchers(tmp_path: Path, url: str, baseline: bool = False, workers: int = 2) -> optuna.Study:
    study_file = tiny_study(tmp_path / "study.toml", "distributed", n_trials=6, baseline=baseline)
    launchers = [start_cli("search", "run", study_file, "--storage", url, "--workers", str(workers),
                           "--out", tmp_path / f"machine-{i}", log=tmp_path / f"launcher-{i}.log")
                 for i in range(2)]
    for i, launcher in enumerate(launchers):
        assert launcher.wait(timeout=900) == 0, (tmp_path / f"launcher-{i}.log").read_text()
    from search.store import storage as st
    from search.store import urls

    study = optuna.load_study(study_name="distributed", storage=st.open_storage(urls.normalize(url), heartbeat=False))
    trials = study.get_trials()
    assert not [t.number for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert sorted(t.number for t in trials) == list(range(len(trials)))  # unique, no gaps
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) >= 6 and len(trials) <= 6 + 2 * workers - 1  # each worker may start one last trial
    # Every machine's workers ran trials, and each trial names its host and process.
    trial_pids = {t.user_attrs["pid"] for t in trials}
    assert all(t.user_attrs.get("host") for t in trials)
    for i in range(2):
        logs = "".join(p.read_text() for p in (tmp_path / f"machine-{i}" / "logs").glob("*.log"))
        pids = {int(m) for m in re.findall(r"worker pid (\d+) on", logs)}
        assert len(pids) == workers and pids & trial_pids, (i, pids, trial_pids)
    return study


@pytest.fixture(scope="module")
def postgres_machines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """The two machines' folders and the database URL, after their run (baseline included)."""
    root = tmp_path_factory.mktemp("machines")
    database = _fresh_database(POSTGRES_URL, "CREATE DATABASE {name}", "DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    url = next(database)
    try:
        _two_launchers(root, url, baseline=True)
        yield root, url
    finally:
        database.close()  # drops the database


def _no_op_worker(url: str, name: str, n_trials: int, barrier) -> None:  # type: ignore[no-untyped-def]
    from search.store import storage as st
    from search.runtime.worker import run_trials

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = st.load_study(st.open_storage(url, on_stale=lifecycle.stale_trial_callback), name)
    barrier.wait()  # every worker asks for its first trial at the same moment
    run_trials(study, lambda trial: trial.suggest_float("x", 0.0, 1.0), n_trials)


def test_n_trials_is_met_exactly_by_eight_workers(postgres_url: str) -> None:
    """Eight worker processes race for the last slots of a 40-trial budget with trials that take
    no time: a trial created after the budget is full ends untrained and uncounted."""
    import multiprocessing as mp

    from search import keys as k
    from search.store import storage as st
    from search.store import urls

    url = urls.normalize(postgres_url)
    study, _ = st.create_once(st.open_storage(url, on_stale=lifecycle.stale_trial_callback), "exact", ["minimize"])
    study.enqueue_trial({"x": 0.5})  # an enqueued trial (the baseline) takes the first slot
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(8)
    workers = [ctx.Process(target=_no_op_worker, args=(url, "exact", 40, barrier)) for _ in range(8)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=600)
    assert [w.exitcode for w in workers] == [0] * 8
    trials = study.get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    surplus = [t for t in trials if t.system_attrs.get(k.OVER_BUDGET)]
    assert len(complete) == 40, (len(complete), len(surplus))
    assert trials[0].params == {"x": 0.5} and trials[0].state == TrialState.COMPLETE
    assert all(t.state == TrialState.FAIL and t.user_attrs[k.STOP_REASON] == k.STOP_OVER_BUDGET for t in surplus)
    assert len(complete) + len(surplus) == len(trials)
    assert all(t.number > max(c.number for c in complete) for t in surplus)  # the last ones


def test_postgresql(postgres_machines: tuple[Path, str]) -> None:
    root, url = postgres_machines  # the fixture's run made every check of _two_launchers
    trials = optuna.load_study(study_name="distributed", storage=shared_storage(url)).get_trials()
    assert trials[0].user_attrs["baseline"] and trials[0].state == TrialState.COMPLETE
    assert {t.user_attrs["host"] for t in trials} and (root / "machine-1" / "artifacts").is_dir()


# One worker per machine on the other servers: two processes racing on a new database is what
# they must survive; four workers sharing one machine's two cores is what test_postgresql shows.
def test_mariadb(tmp_path: Path, mysql_url: str) -> None:
    _two_launchers(tmp_path, mysql_url, workers=1)


def test_journal_on_redis(tmp_path: Path, redis_url: str) -> None:
    _two_launchers(tmp_path, redis_url, workers=1)


def test_slurm_array_script_runs_as_written(tmp_path: Path, postgres_url: str) -> None:
    """The README's batch launch: `search create` once, then two array tasks of the shipped
    sbatch script (run by bash, as SLURM would, with the variables SLURM sets)."""
    import os
    import subprocess
    import sys

    from conftest import ROOT, run_cli

    study_file = tiny_study(tmp_path / "study.toml", "slurm", n_trials=4, baseline=False)
    created = run_cli("search", "create", study_file, "--storage", postgres_url, "--out", tmp_path / "shared")
    assert created.returncode == 0, created.stdout + created.stderr
    assert "0 trials" in created.stdout  # created, and nothing run yet
    env = {**os.environ, "FLEXUNET_STORAGE": postgres_url, "STUDY": str(study_file), "OUT": str(tmp_path / "shared"),
           "SLURM_SUBMIT_DIR": str(ROOT), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    tasks = [subprocess.Popen(["bash", str(ROOT / "examples" / "slurm" / "flexunet-array.sbatch")],
                              env={**env, "SLURM_ARRAY_TASK_ID": str(i)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = [task.communicate(timeout=900)[0] for task in tasks]
    assert [task.returncode for task in tasks] == [0, 0], outputs
    from search.store import storage as st

    study = optuna.load_study(study_name="slurm", storage=st.open_storage(postgres_url, heartbeat=False))
    finished = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) >= 4 and not [t for t in study.trials if t.state == TrialState.RUNNING]
    assert len({t.user_attrs["pid"] for t in study.trials}) == 2


def test_without_a_shared_store_report_marks_what_is_missing_and_export_says_where_it_looked(
        postgres_machines: tuple[Path, str], tmp_path: Path) -> None:
    root, postgres_url = postgres_machines
    study = optuna.load_study(study_name="distributed", storage=shared_storage(postgres_url))
    best = study.best_trial
    baseline = next(t for t in study.get_trials() if t.user_attrs.get("baseline"))
    shown = {best.number: best, baseline.number: baseline}  # the report's comparison

    missing_anywhere = 0
    for i in range(2):
        folder = root / f"machine-{i}" / "artifacts"
        # Each trial's files are in the folder of the machine that ran it, and only there.
        expected = sorted((n, name) for n, trial in shown.items() for name in (MODEL_FILE, LOG_FILE)
                          if not (folder / af.find(study._storage, trial, name)).exists())
        missing_anywhere += len(expected)
        out = tmp_path / f"report-{i}"
        run = run_cli_here("search", "report", "--study", "distributed", "--storage", postgres_url, "--out", out,
                      "--artifacts", folder)
        assert run.returncode == 0, run.stdout + run.stderr
        page = html.unescape((out / "report.html").read_text(encoding="utf-8"))
        marks = re.findall(r'<p class="missing">Missing: trial (\d+)\'s (\S+) is not in the artifact folder '
                           rf'machine-{i}/artifacts\.</p>', page)
        assert sorted((int(n), name) for n, name in marks) == expected, (i, marks, expected)
        assert page.count('class="missing"') == len(expected)
        assert str(root) not in page and str(tmp_path) not in page
        warnings = [line for line in run.stderr.splitlines() if line.startswith("warning:")]
        if expected:
            assert len(warnings) == 1 and f"lacks {len(expected)} trial file(s)" in warnings[0], run.stderr
            assert str(folder) in warnings[0] and "--artifacts" in warnings[0]
        else:
            assert not warnings, run.stderr
        assert (out / "history.png").is_file()  # drawn from the database alone
        assert (out / "test_overlays.png").is_file() == any(
            (n, MODEL_FILE) not in expected for n in shown)

    assert missing_anywhere  # every trial's files are on one machine only: the other lacks them

    # Export of the best trial from the folder of the machine that did not run it.
    lacking = next(root / f"machine-{i}" / "artifacts" for i in range(2)
                   if not (root / f"machine-{i}" / "artifacts" / af.find(study._storage, best, MODEL_FILE)).exists())
    failed = run_cli_here("search", "export", "--study", "distributed", "--storage", postgres_url, "--artifacts", lacking,
                     "--out", tmp_path / "export")
    assert_user_error(failed, f"trial {best.number}'s {MODEL_FILE} is not in the artifact folder {lacking}",
                      "--artifacts")
    assert not (tmp_path / "export").exists()

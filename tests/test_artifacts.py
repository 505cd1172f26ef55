"""Trial files in an artifact store named by URL (search.store.artifacts): a folder, or a bucket on a
real S3-compatible server process (moto's). Two launchers with separate ``--out`` folders and one
PostgreSQL study: with one bucket, export, report, the dashboard and a killed trial's resume all
work from it. (With local folders only, report marks what it cannot find and export says where it
looked: tests/test_distributed.py, on the two-machine PostgreSQL study run there.)"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import optuna
import pytest
from optuna.trial import FrozenTrial, TrialState

from conftest import assert_user_error, run_cli, run_cli_here, shared_storage, start_cli, tiny_study
from flexunet.errors import ConfigError
from flexunet.train import MODEL_FILE
from search.store import artifacts as af
from search.spec import study_file
from search.keys import RESUME_ARTIFACT as RESUME_ATTR
from search.paths import LOG_FILE, OVERLAYS_FILE
from servers import Dashboard

BUCKET = "flexunet-test"
PREFIX = "studies/one"
FIGURES = ("history.png", "learning_curves.png", "test_overlays.png")


def _study(url: str, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=shared_storage(url))


def _with_study_keys(path: Path, **keys: str) -> Path:
    lines = "".join(f'{k} = "{v}"\n' for k, v in keys.items())
    path.write_text(path.read_text(encoding="utf-8").replace("[study]\n", "[study]\n" + lines, 1), encoding="utf-8")
    return path


def _wait_for_running_trial(url: str, name: str, epoch: int, launchers: list, logs: list[Path]) -> FrozenTrial:
    import time

    end = time.time() + 600
    while time.time() < end:
        try:
            running = _study(url, name).get_trials(states=(TrialState.RUNNING,))
        except (KeyError, optuna.exceptions.StorageInternalError):
            running = []
        found = next((t for t in running if t.user_attrs.get("resume_epoch", 0) >= epoch), None)
        if found is not None:
            return found
        if all(p.poll() is not None for p in launchers):
            break
        time.sleep(0.5)
    raise AssertionError("no trial reached epoch %d: %s" % (epoch, "".join(p.read_text() for p in logs)))


# ---------------------------------------------------------------------------------------------
# URLs


@pytest.mark.parametrize("text, fragment", [
    ("gs://bucket/x", "gs:// is not a supported artifact store"),
    ("s3://AKIA:s3cret@bucket/x", "takes no credentials"),
    ("s3://bucket/x?endpoint_url=http://h", "takes no credentials, query or endpoint"),
    ("s3://No_Such/x", "'No_Such' is not a valid bucket name"),
    ("s3://bucket/../x", "holds '.' or '..'"),
    ("", "expected a folder or s3://BUCKET/PREFIX"),
])
def test_bad_urls_are_refused_without_echoing_secrets(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        af.parse(text, where="--artifacts")
    message = str(caught.value)
    assert message.startswith("--artifacts: ") and fragment in message and "s3cret" not in message


def test_urls_parse_to_folders_and_prefixes(tmp_path: Path) -> None:
    location = af.parse("s3://my.bucket-1//a/b/", where="x")
    assert (location.bucket, location.prefix, location.url, location.public) == \
        ("my.bucket-1", "a/b/", "s3://my.bucket-1/a/b", "s3://my.bucket-1/a/b")
    assert af.parse("s3://bucket", where="x").url == "s3://bucket"
    folder = af.parse("runs/x/artifacts", where="x", base=tmp_path)
    assert folder.folder == tmp_path / "runs/x/artifacts" and folder.public == "x/artifacts"
    # --artifacts wins over the study file, which wins over OUT/artifacts.
    assert af.resolve("s3://cli", location, tmp_path).url == "s3://cli"
    assert af.resolve(None, location, tmp_path) == location
    assert af.resolve(None, None, tmp_path).folder == tmp_path / "artifacts"


def test_the_study_file_names_its_store(tmp_path: Path) -> None:
    path = _with_study_keys(tiny_study(tmp_path / "s.toml", "s"), artifacts="s3://bucket/runs/s")
    assert study_file.load(path).artifacts == af.Location(bucket="bucket", prefix="runs/s/")
    relative = _with_study_keys(tiny_study(tmp_path / "r.toml", "r"), artifacts="shared/artifacts")
    assert study_file.load(relative).artifacts == af.Location(folder=tmp_path.resolve() / "shared/artifacts")
    secret = _with_study_keys(tiny_study(tmp_path / "k.toml", "k"), artifacts="s3://AKIA:s3cret@bucket/x")
    with pytest.raises(ConfigError) as caught:
        study_file.load(secret)
    assert "[study] artifacts: " in str(caught.value) and "s3cret" not in str(caught.value)


def test_a_launcher_writing_elsewhere_than_the_study_is_warned() -> None:
    study = optuna.create_study(study_name="w")
    here = af.Location(bucket="bucket", prefix="p/")
    assert af.mismatch_warning(study, here) is None  # nothing recorded
    study.set_user_attr(af.STUDY_ATTR, here.url)
    assert af.recorded(study) == here and af.mismatch_warning(study, here) is None
    warning = af.mismatch_warning(study, af.Location(folder=Path("/m1/artifacts")))
    assert warning and "bucket s3://bucket/p" in warning and "artifact folder /m1/artifacts" in warning


def test_a_missing_bucket_stops_the_run_before_anything_is_made(tmp_path: Path, s3_server) -> None:  # type: ignore[no-untyped-def]
    study = tiny_study(tmp_path / "study.toml", "nobucket")
    run = run_cli("search", "run", study, "--out", tmp_path / "run", "--artifacts", "s3://no-such-bucket/x",
                  env=s3_server.env)
    assert_user_error(run, "s3://no-such-bucket/x", "no bucket 'no-such-bucket'", s3_server.endpoint)
    assert s3_server.env["AWS_SECRET_ACCESS_KEY"] not in run.stdout + run.stderr
    assert not (tmp_path / "run").exists()
    wrong = run_cli("search", "run", study, "--out", tmp_path / "run", "--artifacts", "s3://bucket/x",
                    env={**s3_server.env, "AWS_ENDPOINT_URL": "http://127.0.0.1:1"})
    assert_user_error(wrong, "cannot reach http://127.0.0.1:1", "AWS_ENDPOINT_URL")
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# Two machines, one database, one bucket


@pytest.mark.slow
@pytest.mark.db
def test_two_launchers_share_only_the_database_and_the_bucket(tmp_path: Path, postgres_url: str, s3_server,  # type: ignore[no-untyped-def]
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    s3_server.client().create_bucket(Bucket=BUCKET)
    env = s3_server.env
    url = f"s3://{BUCKET}/{PREFIX}"
    # Machine 0 takes the store from the study file, machine 1 from --artifacts.
    study_path = _with_study_keys(tiny_study(tmp_path / "study.toml", "bucket", n_trials=3, max_epochs=6,
                                             steps_per_epoch=4), artifacts=url)
    logs = [tmp_path / f"launcher-{i}.log" for i in range(2)]
    launchers = [start_cli("search", "run", study_path, "--storage", postgres_url, "--out", tmp_path / "machine-0",
                           log=logs[0], env=env),
                 start_cli("search", "run", study_path, "--storage", postgres_url, "--out", tmp_path / "machine-1",
                           "--artifacts", url, log=logs[1], env=env)]
    victim = _wait_for_running_trial(postgres_url, "bucket", 1, launchers, logs)
    os.kill(victim.user_attrs["pid"], signal.SIGKILL)
    for launcher, log in zip(launchers, logs):
        assert launcher.wait(timeout=900) == 0, log.read_text()
    assert "died (SIGKILL); starting another" in "".join(p.read_text() for p in logs)

    study = _study(postgres_url, "bucket")
    trials = study.get_trials()
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert len([t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]) == 3
    killed = next(t for t in trials if t.number == victim.number)
    assert killed.state == TrialState.FAIL and killed.user_attrs["fail_reason"] == "worker killed (SIGKILL)"
    retry = next(t for t in trials if t.system_attrs.get("failed_trial") == killed.number)
    # Resumed from the checkpoint in the bucket: no machine has an artifact folder.
    assert retry.state == TrialState.COMPLETE and retry.user_attrs["resumed_from_epoch"] >= 1
    assert not (tmp_path / "machine-0" / "artifacts").exists() and not (tmp_path / "machine-1" / "artifacts").exists()
    objects = s3_server.keys(BUCKET)
    assert all(key.startswith(PREFIX + "/") for key in objects)
    assert f"{PREFIX}/{killed.user_attrs[RESUME_ATTR]}" in objects
    for trial in (t for t in trials if t.state == TrialState.COMPLETE):
        for name in (MODEL_FILE, LOG_FILE, OVERLAYS_FILE):
            assert f"{PREFIX}/{af.find(study._storage, trial, name)}" in objects, (trial.number, name)
    # The study records the bucket and no secret; neither the launchers nor status print one.
    assert study.user_attrs[af.STUDY_ATTR] == url
    secret = env["AWS_SECRET_ACCESS_KEY"]
    assert secret not in json.dumps([study.user_attrs, study._storage.get_study_system_attrs(study._study_id),
                                    [t.user_attrs for t in trials], [t.system_attrs for t in trials]])
    status = run_cli("search", "status", "--study", "bucket", "--storage", postgres_url, env=env)
    assert status.returncode == 0 and f"trial files in bucket {url}" in status.stdout, status.stdout + status.stderr
    assert secret not in "".join(p.read_text() for p in logs) + status.stdout + status.stderr

    # From a folder of neither machine: export, report and the dashboard read the bucket.
    # In this interpreter (no second TensorFlow import), given the bucket's environment.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    exported = run_cli_here("search", "export", "--study", "bucket", "--storage", postgres_url, "--out", elsewhere / "best")
    assert exported.returncode == 0, exported.stdout + exported.stderr
    assert json.loads((elsewhere / "best" / "metrics.json").read_text())["trial"] == study.best_trial.number
    assert (elsewhere / "best" / MODEL_FILE).stat().st_size > 0
    reported = run_cli_here("search", "report", "--study", "bucket", "--storage", postgres_url, "--out",
                            elsewhere / "report")
    assert reported.returncode == 0 and "warning" not in reported.stderr, reported.stdout + reported.stderr
    page = (elsewhere / "report" / "report.html").read_text(encoding="utf-8")
    assert "Missing:" not in page and all((elsewhere / "report" / name).is_file() for name in FIGURES)

    server = Dashboard("--study", "bucket", "--storage", postgres_url, "--port", "0", env=env)
    try:
        study_id = int(server.url.rsplit("/", 1)[1])
        detail = json.loads(server.get(f"/api/studies/{study_id}"))
        shown = next(t for t in detail["trials"] if t["number"] == retry.number)
        overlay = next(a for a in shown["artifacts"] if a["filename"] == OVERLAYS_FILE)
        served = server.get(f"/artifacts/{study_id}/{shown['trial_id']}/{overlay['artifact_id']}")
        assert served == objects[f"{PREFIX}/{overlay['artifact_id']}"] and served.startswith(b"\x89PNG")
    finally:
        assert server.stop() == 0

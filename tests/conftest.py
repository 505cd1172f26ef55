"""Shared fixtures: the bundled CT-ICH sample, prepared once per session at 64 px, tiny
configs, and a helper that runs the real ``flexunet`` command in a subprocess."""

from __future__ import annotations

import collections
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "studies" / "data" / "ct-ich"
SEED_CONFIG = ROOT / "tests" / "data" / "seed_ich.config"

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str


def run_cli(*args: str | Path, cwd: Path | None = None, timeout: float = 600,
            env: dict[str, str] | None = None) -> Run:
    """Run ``flexunet ARGS`` as a user would, in a fresh interpreter."""
    command = [sys.executable, "-m", "flexunet.cli", *map(str, args)]
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    return Run(done.returncode, done.stdout, done.stderr)


def run_cli_here(*args: str | Path, cwd: Path | None = None) -> Run:
    """Run ``flexunet ARGS`` in this interpreter: what it prints, and the exit status that
    :func:`flexunet.cli.main` returns (or that argparse exits with).

    For tests about what a command reads, writes and prints rather than about its process. A
    fresh interpreter costs ~0.5 CPU s to start, and ~5 more for the commands that load
    TensorFlow (train, evaluate, infer, export, report): about a tenth of the suite's CPU when
    every call paid it. The CLI's log lines (INFO and above) go to its stderr, as they do in a
    terminal; ``cwd`` is the folder it runs in. Tests of signals, exits, environment or a clean
    interpreter use :func:`run_cli`.
    """
    import contextlib
    import io
    import logging

    from flexunet import cli

    out, err = io.StringIO(), io.StringIO()
    root = logging.getLogger()
    handler = logging.StreamHandler(err)
    handler.setLevel(logging.INFO)
    level = root.level
    root.addHandler(handler)
    root.setLevel(min(level, logging.INFO) if level else logging.INFO)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
                contextlib.chdir(cwd or os.getcwd()):
            try:
                code = cli.main([str(a) for a in args])
            except SystemExit as exc:  # argparse's usage errors
                code = exc.code if isinstance(exc.code, int) else 1
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    return Run(code, out.getvalue(), err.getvalue())


def assert_user_error(run: Run, *fragments: str) -> str:
    """Exit code 2, one ``flexunet: error:`` line naming every fragment, no traceback."""
    assert run.returncode == 2, (run.returncode, run.stdout, run.stderr)
    assert "Traceback" not in run.stderr, run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("flexunet: error:")]
    assert len(errors) == 1, run.stderr
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


def set_keys(config_path: Path, **values: str) -> None:
    """Rewrite ``key = value`` lines of a seed-format config in place."""
    text = config_path.read_text(encoding="utf-8")
    for key, value in values.items():
        text, n = re.subn(rf"(?m)^{key}\s*=.*$", f"{key} = {value}", text)
        assert n, f"{key} not in {config_path}"
    config_path.write_text(text, encoding="utf-8")


def pytest_configure(config: pytest.Config) -> None:
    # pytest-xdist's --dist loadfile hands out the files with the most tests first (here: the
    # storage contract's 256 quick ones) and the few-test files that train last, where one of
    # them keeps a process busy for minutes while the other has nothing left to do. Handing them
    # out in collection order instead lets pytest_collection_modifyitems put the slow ones first.
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked ``slow`` first; then the other files, those with the most tests first.

    With ``-n 2 --dist loadfile`` a file goes to a process where its first test stands in this
    order, and a process is handed its next file while it still has two tests to run. The files
    that train start first; the many-test files (the storage contract's 256 cases, the 125
    hostile inputs: a minute or two each) come next, not last, where one of them, queued behind
    a process's last long test, kept that process busy two minutes after the other had finished
    (a `.ci/run`, 2026-12-02). The run ends with files of a few quick tests. The sort is stable
    and the same in every process.
    """
    per_file = collections.Counter(item.path for item in items)

    def order(item: pytest.Item) -> tuple[bool, int]:
        if item.get_closest_marker("slow") is not None:
            return (False, 0)
        return (True, -per_file[item.path])

    items.sort(key=order)


@pytest.fixture(scope="session")
def sample() -> Path:
    return SAMPLE


@pytest.fixture(scope="session")
def prepared64(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled sample prepared at 64x64 with the default patient split (read-only)."""
    from flexunet.data import ct_ich

    out = tmp_path_factory.mktemp("prepared") / "ct-ich-64"
    ct_ich.prepare(SAMPLE, out, size=64, seed=0)
    return out


@pytest.fixture
def tiny_config(prepared64: Path, tmp_path: Path) -> Path:
    """A copy of the prepared data's config: 64 px, base 8, 4 levels, 2 epochs, outputs in tmp."""
    work = tmp_path / "work"
    shutil.copytree(prepared64, work)
    config = work / "train_eval_infer.config"
    set_keys(config, base_filters="8", epochs="2", batch_size="8")
    return config


# --- database services: mandatory in CI (FLEXUNET_REQUIRE_SERVICES=1), optional on a laptop ---

REQUIRE_SERVICES = os.environ.get("FLEXUNET_REQUIRE_SERVICES") == "1"
POSTGRES_URL = os.environ.get("FLEXUNET_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
MYSQL_URL = os.environ.get("FLEXUNET_TEST_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306/test")
REDIS_URL = os.environ.get("FLEXUNET_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def _unavailable(what: str, exc: BaseException) -> None:
    message = f"{what} is not reachable ({type(exc).__name__}: {exc})"
    if REQUIRE_SERVICES:
        pytest.fail(message + "; FLEXUNET_REQUIRE_SERVICES=1 makes it mandatory")
    pytest.skip(message)


_SHARED_STORAGES: dict[str, object] = {}


def shared_storage(url: str):  # type: ignore[no-untyped-def]
    """One storage per database URL for a test's polling loops.

    A new RDBStorage per poll keeps its connection pool open until the garbage collector finds
    it: a test that polls every half second for minutes runs the server out of connections
    (PostgreSQL's "too many clients", seen by Optuna as a failed commit). The database fixtures
    close these before they drop their database.
    """
    from search.store import storage as st

    if url not in _SHARED_STORAGES:
        _SHARED_STORAGES[url] = st.open_storage(url, heartbeat=False)
    return _SHARED_STORAGES[url]


def _close_shared_storage(url: str) -> None:
    storage = _SHARED_STORAGES.pop(url, None)
    engine = getattr(storage, "engine", None)
    if engine is not None:
        engine.dispose()


def _fresh_database(url: str, create: str, drop: str):  # type: ignore[no-untyped-def]
    """A new, empty database on the server ``url`` points to; dropped afterwards."""
    import uuid

    import sqlalchemy

    name = f"flexunet_{uuid.uuid4().hex[:12]}"
    server = sqlalchemy.engine.make_url(url)
    admin_db = "postgres" if server.get_backend_name() == "postgresql" else None
    try:
        engine = sqlalchemy.create_engine(server.set(database=admin_db), isolation_level="AUTOCOMMIT")
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text(create.format(name=name)))
    except Exception as exc:  # connection refused, auth, driver missing
        _unavailable(server.get_backend_name(), exc)
    fresh = server.set(database=name).render_as_string(hide_password=False)
    try:
        yield fresh
    finally:
        _close_shared_storage(fresh)
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text(drop.format(name=name)))
        engine.dispose()


@pytest.fixture
def postgres_url():  # type: ignore[no-untyped-def]
    yield from _fresh_database(POSTGRES_URL, "CREATE DATABASE {name}", "DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def mysql_url():  # type: ignore[no-untyped-def]
    yield from _fresh_database(MYSQL_URL, "CREATE DATABASE {name}", "DROP DATABASE IF EXISTS {name}")


@pytest.fixture
def redis_url():  # type: ignore[no-untyped-def]
    """A Redis database of its own (index 7, emptied before and after)."""
    import redis

    url = REDIS_URL.rsplit("/", 1)[0] + "/7" if REDIS_URL.count("/") >= 3 else REDIS_URL + "/7"
    try:
        client = redis.Redis.from_url(url)
        client.flushdb()
    except Exception as exc:
        _unavailable("redis", exc)
    yield url
    client.flushdb()


class ThrowawayPostgres:
    """A PostgreSQL server of a test's own (initdb + pg_ctl, on another port), to stop and start."""

    def __init__(self, bin_dir: Path, root: Path, settings: str = "") -> None:
        self._bin_dir, self._root, self._data = bin_dir, root, root / "data"
        self._as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        port = 55000 + os.getpid() % 1000
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
        self._options = f"-o -p {port} -k {root} -c listen_addresses=127.0.0.1 {settings}"
        subprocess.run([*self._as_postgres, str(bin_dir / "initdb"), "-D", str(self._data), "-A", "trust",
                        "-U", "postgres"], check=True, capture_output=True)

    def _pg_ctl(self, *args: str, check: bool = True) -> None:
        subprocess.run([*self._as_postgres, str(self._bin_dir / "pg_ctl"), "-D", str(self._data), *args],
                       check=check, capture_output=True)

    def start(self) -> None:
        self._pg_ctl("-w", "-t", "60", "-l", str(self._root / "server.log"), self._options, "start")

    def stop(self) -> None:
        self._pg_ctl("-w", "-t", "60", "-m", "fast", "stop")

    def restart(self, while_down: Callable[[], None] | None = None) -> None:
        """Stop the server, wait (for ``while_down`` to return, else 3 s: the database is really
        gone for a while), start it again."""
        self.stop()
        if while_down is None:
            time.sleep(3)
        else:
            while_down()
        self.start()

    def remove(self) -> None:
        self._pg_ctl("-m", "immediate", "stop", check=False)
        shutil.rmtree(self._root, ignore_errors=True)


@pytest.fixture
def postgres_server() -> Iterator[ThrowawayPostgres]:
    """A running PostgreSQL server of the test's own; removed afterwards."""
    yield from _throwaway_postgres()


@pytest.fixture
def small_postgres_server() -> Iterator[ThrowawayPostgres]:
    """A running PostgreSQL server of the test's own that allows 20 connections."""
    yield from _throwaway_postgres("-c max_connections=20")


def _throwaway_postgres(settings: str = "") -> Iterator[ThrowawayPostgres]:
    bins = sorted(Path("/usr/lib/postgresql").glob("*/bin"))
    if not bins or shutil.which("runuser") is None:
        if REQUIRE_SERVICES:
            pytest.fail("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
        pytest.skip("PostgreSQL server binaries are not installed")
    root = Path(tempfile.mkdtemp(prefix="flexunet-pg-", dir="/tmp"))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
    server = ThrowawayPostgres(bins[-1], root, settings)
    try:
        server.start()
        yield server
    finally:
        server.remove()


@pytest.fixture
def throwaway_postgres(postgres_server: ThrowawayPostgres) -> tuple[str, Callable[..., None]]:
    """A server's URL and a function that restarts it."""
    return postgres_server.url, postgres_server.restart
@pytest.fixture
def s3_server(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A local S3-compatible server of the test's own (moto's standalone server, a process on a
    free port of 127.0.0.1), stopped afterwards."""
    try:
        import boto3  # noqa: F401
        import moto.server  # noqa: F401
    except ImportError as exc:
        _unavailable("moto's S3 server (pip install 'flexunet-search[test]')", exc)
    from servers import S3Server

    server = S3Server(tmp_path / "s3-server.log")
    try:
        yield server
    finally:
        server.stop()


def tiny_study(path: Path, name: str, *, n_trials: int = 6, max_epochs: int = 1, baseline: bool = True,
               pruner: str = 'name = "NopPruner"', fixed: str = "", space: str = "",
               steps_per_epoch: int = 2) -> Path:
    """A study file that trains in seconds: 32 px, two batches per epoch, a resume checkpoint
    after every epoch (so that what a retried trial resumes from does not depend on timing)."""
    path.write_text(f"""
[study]
name = "{name}"
image_size = 32
baseline = {str(baseline).lower()}
[dataset]
prepare = {{ dataset = "ct-ich", source = "{SAMPLE}", size = 32 }}
[fixed]
steps_per_epoch = {steps_per_epoch}
patience = 0
save_overhead = 0
{fixed}
[budget]
n_trials = {n_trials}
max_epochs = {max_epochs}
[sampler]
name = "RandomSampler"
seed = 0
[pruner]
{pruner}
[space]
base_filters = {{ type = "int", low = 4, high = 8, step = 4 }}
num_layers = {{ type = "int", low = 2, high = 3 }}
{space}
""", encoding="utf-8")
    return path


def ctrl_c_as_from_a_terminal() -> None:
    """``preexec_fn`` for commands a test stops with SIGINT. A shell that starts a job in the
    background (``./.ci/run &``) makes it ignore SIGINT, and every child inherits that: a test
    that presses Ctrl-C must not depend on how the test run itself was started."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_cli(*args: str | Path, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start ``flexunet ARGS`` in the background, output to ``log``."""
    handle = log.open("w", encoding="utf-8")
    return subprocess.Popen([sys.executable, "-m", "flexunet.cli", *map(str, args)], stdout=handle,
                            stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                            preexec_fn=ctrl_c_as_from_a_terminal)

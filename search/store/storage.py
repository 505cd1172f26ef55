"""Storage URLs: resolve, mask, open, and create a study exactly once.

Accepted URLs: any SQLAlchemy URL (``sqlite:///file.db``, ``postgresql+psycopg://...``,
``mysql+pymysql://...``), ``journal:PATH`` for a journal file (one host), and ``redis://...`` for
a journal in Redis (many hosts), and ``grpc://HOST:PORT`` for a study served by ``flexunet search
proxy`` (:mod:`search.store.proxy`). ``postgresql://`` and ``mysql://`` get the drivers this project
installs.

The connection budget: a process holds at most one connection to a database server (its
heartbeat thread waits for the main thread's session, which lasts milliseconds), so a server
holds ``max_connections`` less what others use of workers and launchers together. One that is
full refuses a worker at start-up with :class:`ServerFull`, whose message says both ways out.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import optuna

from flexunet.errors import ConfigError
from search.store import _internals
from search.store.retry import RECONNECT_SECONDS, first_line, retried
from search.store.urls import journal_path, kind, mask, sqlite_path

_logger = logging.getLogger(__name__)
HEARTBEAT_INTERVAL = 20  # seconds between a running trial's heartbeats
GRACE_PERIOD = 60  # a trial silent this long is failed (and retried) by the next worker
CONNECTIONS = 1  # database connections per process (the proxy takes more: search.store.proxy)
FULL_ATTEMPTS = 3  # tries to connect to a full server, a few seconds apart, before giving up
# What PostgreSQL and MySQL/MariaDB say when every connection slot is taken (MySQL's error 1040).
_FULL_SERVER = ("too many clients", "remaining connection slots are reserved", "too many connections")


StaleCallback = Callable[[optuna.Study, "optuna.trial.FrozenTrial"], None]
EXIT_SERVER_FULL = 3  # the exit status of a worker that a full server turned away


class ServerFull(ConfigError):
    """The database server refused a connection because every slot of its ``max_connections``
    is taken. The process stops at once (no trial of it exists yet); a launcher that holds a
    connection adds the server's figures (:func:`full_server_line`)."""
















def open_storage(url: str, *, heartbeat: bool = True, on_stale: StaleCallback | None = None, create: bool = True,
                 connections: int = CONNECTIONS) -> optuna.storages.BaseStorage:
    """An Optuna storage for ``url``; RDB storages (and the proxy's clients) get heartbeats, and
    ``on_stale`` is called for a trial whose heartbeat stopped (the trial layer's retry:
    ``search.trial.lifecycle.stale_trial_callback``; the storage knows nothing of trials' lives).
    A database server gets at most ``connections`` connections from this storage (one: a
    worker's heartbeat shares its connection).

    With ``create=False`` (commands that only read a study) a SQLite or journal file that does
    not exist is an error, rather than an empty database left behind.
    """
    what = kind(url)
    path = sqlite_path(url) if what == "sqlite" else journal_path(url) if what == "journal-file" else None
    if path is not None and not create and not path.is_file():
        raise ConfigError(f"{path}: no study database there (has the study run? its folder may be "
                          "elsewhere: pass --run-dir DIR or --storage URL)")
    try:
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        if what == "journal-file":
            from optuna.storages.journal import JournalFileBackend

            return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
        if what == "journal-redis":
            from optuna.storages.journal import JournalRedisBackend

            return optuna.storages.JournalStorage(JournalRedisBackend(url))
        if what == "grpc":
            from search.store import proxy

            return proxy.connect(url, **(heartbeat_settings(on_stale) if heartbeat else {}))
        # One connection, never more: SQLAlchemy's default pool lets the heartbeat thread open a
        # second one beside the main thread's (2 per worker, measured in pg_stat_activity).
        kwargs: dict[str, Any] = ({"engine_kwargs": {"pool_pre_ping": True, "pool_size": connections,
                                                     "max_overflow": 0}} if what != "sqlite" else {})
        if heartbeat:
            kwargs.update(heartbeat_settings(on_stale))
        return _create_rdb(url, kwargs)
    except ConfigError:  # already names what is wrong (journal: without a path)
        raise
    except (ImportError, ValueError, TypeError) as exc:
        raise ConfigError(f"storage {mask(url)}: {first_line(exc)}") from None
    except Exception as exc:  # sqlalchemy.exc.*, redis errors: the server is not reachable
        raise ConfigError(f"storage {mask(url)}: cannot connect ({first_line(_root_cause(exc))})") from None


def _create_schema_once(url: str) -> None:
    """Optuna's tables on a database that has none yet (the first process of a new database:
    for that moment it holds two connections), one connection at a time otherwise."""
    import sqlalchemy as sa

    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as connection:
            present = sa.inspect(connection).has_table("alembic_version")
    finally:
        engine.dispose()
    if not present:
        optuna.storages.RDBStorage(url, engine_kwargs={"poolclass": sa.pool.NullPool}).engine.dispose()


def _check_schema(storage: RetryingStorage) -> None:
    current, head = storage.get_current_version(), storage.get_head_version()
    if current != head:
        raise ConfigError(f"storage {mask(storage.url)}: its tables have Optuna's schema {current}, this Optuna "
                          f"({optuna.__version__}) needs {head}: run `optuna storage upgrade --storage URL`, or use "
                          "the Optuna that made them")


def heartbeat_settings(on_stale: StaleCallback | None = None) -> dict[str, Any]:
    """A worker's heartbeat: interval, grace period ($FLEXUNET_HEARTBEAT_INTERVAL,
    $FLEXUNET_GRACE_PERIOD) and what is done with a trial whose heartbeat stopped."""
    return {"heartbeat_interval": _env_seconds("FLEXUNET_HEARTBEAT_INTERVAL", HEARTBEAT_INTERVAL),
            "grace_period": _env_seconds("FLEXUNET_GRACE_PERIOD", GRACE_PERIOD),
            "heartbeat_stale_trial_callback": on_stale}


def _create_rdb(url: str, kwargs: dict[str, Any], attempts: int = 6) -> RetryingStorage:
    """RDBStorage creates Optuna's tables on first use; processes that start together on a new
    database race to do so and the losers fail (a duplicate key, a table that already exists).
    A server that is briefly out of connections fails the same way. Both are retried after a
    short random wait; a server that refuses connections is not (there is no race to wait out)."""
    from sqlalchemy import exc as sa_exc

    full, server = 0, kind(url) != "sqlite"
    for attempt in range(attempts):
        try:
            if not server:
                return RetryingStorage(url, **kwargs)
            # Optuna's schema check holds a session while it opens a second connection (and so
            # does its creation of a new schema): with one connection it would wait for itself.
            _create_schema_once(url)
            storage = RetryingStorage(url, skip_compatibility_check=True, **kwargs)
            _check_schema(storage)
            return storage
        except (sa_exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as exc:
            # Optuna wraps SQLAlchemy's errors in StorageInternalError: look at what caused it.
            raced = (sa_exc.IntegrityError, sa_exc.ProgrammingError, sa_exc.OperationalError)
            if not (isinstance(exc, raced) or isinstance(exc.__cause__, raced)):
                raise  # not a race nor a busy server: a file that is not a database, a bad schema
            cause = _root_cause(exc)
            if server_full(cause):
                # A slot may free in a moment (a worker that just finished); hundreds of workers
                # asking again and again would only keep the server busy refusing them.
                full += 1
                if full >= FULL_ATTEMPTS:
                    raise ServerFull(full_server_line(url, cause)) from None
                time.sleep(1.0 + 2.0 * random.random())
                continue
            refused = any(words in str(cause).lower() for words in (
                "refused", "could not connect", "can't connect", "name or service not known",
                "connection failed", "does not exist", "unknown database", "authentication failed",
                "access denied"))
            if refused or attempt == attempts - 1:
                raise
            _logger.info("opening storage %s failed (%s); retrying", mask(url), first_line(cause))
            time.sleep(0.2 + random.random() * (attempt + 1))
    raise AssertionError("unreachable")


def server_full(exc: BaseException) -> bool:
    """Whether the server refused a connection because all its connection slots are taken."""
    text = str(exc).lower()
    return any(words in text for words in _FULL_SERVER)


def connection_figures(storage: optuna.storages.BaseStorage) -> tuple[int, int] | None:
    """``(max_connections, connections in use)`` of the PostgreSQL or MySQL server behind
    ``storage``, read through its own connection; None for other storages."""
    import sqlalchemy as sa

    engine = getattr(_internals.backend(storage), "engine", None)
    if engine is None or engine.dialect.name not in ("postgresql", "mysql", "mariadb"):
        return None
    postgres = engine.dialect.name == "postgresql"
    queries = (("SHOW max_connections", "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'")
               if postgres else ("SELECT @@max_connections", "SELECT count(*) FROM information_schema.processlist"))
    with engine.connect() as connection:
        return tuple(int(connection.execute(sa.text(query)).scalar_one()) for query in queries)  # type: ignore[return-value]


def full_server_line(url: str, cause: BaseException | str, figures: tuple[int, int] | None = None) -> str:
    """The one line that says a server is full, its figures where known, and both ways out."""
    numbers = (f"max_connections = {figures[0]}, {figures[1]} in use" if figures else
               "its max_connections and the count in use cannot be read without a free connection")
    reason = cause if isinstance(cause, str) else first_line(cause)
    return (f"storage {mask(url)}: the database server is full ({numbers}; {reason}); each worker holds one "
            "connection: raise the server's max_connections (less what other clients use is how many workers "
            "it holds), or serve the study through one proxy (flexunet search proxy --storage URL, then every "
            "worker --storage grpc://HOST:PORT)")


def _root_cause(exc: BaseException) -> BaseException:
    """The innermost error under Optuna's and SQLAlchemy's wrappers: the one that says what went wrong."""
    seen = {id(exc)}
    while True:
        inner = getattr(exc, "orig", None) or exc.__cause__ or exc.__context__
        if inner is None or id(inner) in seen:
            return exc
        seen.add(id(inner))
        exc = inner


def _env_seconds(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(f"${name}: expected a whole number of seconds >= 1, got {value!r}")
    return int(value)


class RetryingStorage(_internals.RDBStaleTrials):
    """An RDBStorage whose calls wait for a lost database connection to come back.

    A study runs for days; a database restart or a network blip must not kill the trials in
    flight, nor the heartbeat thread (if heartbeats stop, a live trial is declared stale and run
    twice). Each call that reaches the database is retried with exponential backoff for up to
    ``max_wait`` seconds. Being an RDBStorage, it behaves as one everywhere Optuna looks: a study
    opened on it gets Optuna's read cache, and it pickles, copies and takes heartbeat settings
    as RDBStorage does.

    It also counts as stale a RUNNING trial that never recorded a heartbeat once it is older than
    the grace period plus two heartbeat intervals: Optuna skips such trials, so a worker killed
    between creating a trial and its first heartbeat would leave that trial RUNNING for ever.

    Example::

        import optuna
        from search.store.storage import RetryingStorage

        storage = RetryingStorage("sqlite:///:memory:", max_wait=30)
        study = optuna.create_study(storage=storage)
        study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=3)
        assert len(study.trials) == 3
    """

    def __init__(self, url: str, engine_kwargs: dict[str, Any] | None = None,
                 skip_compatibility_check: bool = False, *, max_wait: float = RECONNECT_SECONDS,
                 **kwargs: Any) -> None:
        self.max_wait = max_wait
        super().__init__(url, engine_kwargs, skip_compatibility_check, **kwargs)

    def extra_stale_trial_ids(self, study_id: int) -> list[int]:
        interval = self.heartbeat_interval or 0
        limit = timedelta(seconds=(self.grace_period or 2 * interval) + 2 * interval)
        now = datetime.now()  # Optuna stamps datetime_start with the creating host's local time
        running = self.get_all_trials(study_id, deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        old = {_internals.trial_id(t) for t in running
               if t.datetime_start is not None and now - t.datetime_start > limit}
        return sorted(old - _internals.trial_ids_with_heartbeat(self, old))


# Every method of RDBStorage that opens a database session, and the private ones that Optuna's
# read cache calls (tests/test_storage.py checks this list against the installed Optuna).
RETRIED_METHODS = (
    "create_new_study", "delete_study", "set_study_user_attr", "set_study_system_attr", "get_study_id_from_name",
    "get_study_name_from_id", "get_study_directions", "get_study_user_attrs", "get_study_system_attrs",
    "get_all_studies", "create_new_trial", "set_trial_param",
    "get_trial_param", "set_trial_state_values", "set_trial_intermediate_value", "set_trial_user_attr",
    "set_trial_system_attr", "get_trial_id_from_study_id_trial_number", "get_trial_number_from_id",
    "get_trial", "get_all_trials", "get_best_trial", "get_n_trials",
    "get_trial_params", "get_trial_user_attrs", "get_trial_system_attrs", "check_trial_is_updatable",
    "record_heartbeat", "get_current_version", "upgrade",
    *sorted(_internals.CACHED_BACKEND_CALLS | set(_internals.HEARTBEAT_PRIVATE_CALLS)),
)










for _name in RETRIED_METHODS:
    setattr(RetryingStorage, _name, retried(getattr(RetryingStorage, _name)))












def create_once(storage: optuna.storages.BaseStorage, name: str, directions: list[str],
                sampler: optuna.samplers.BaseSampler | None = None,
                pruner: optuna.pruners.BasePruner | None = None,
                attempts: int = 8) -> tuple[optuna.Study, bool]:
    """Create the study, or load it if it exists; returns (study, whether this call created it).

    Two processes that start together on a brand-new database race to create Optuna's tables
    and one of them fails; losing that race is retried after a short random wait.
    """
    for attempt in range(attempts):
        try:
            try:
                study = optuna.create_study(storage=storage, study_name=name, directions=directions,
                                            sampler=sampler, pruner=pruner)
                created = True
            except optuna.exceptions.DuplicatedStudyError:
                study = optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
                created = False
        except (ValueError, TypeError, ConfigError):
            raise
        except Exception as exc:  # IntegrityError, ProgrammingError, OperationalError: the schema race
            if attempt == attempts - 1:
                raise ConfigError(f"cannot create study {name!r}: {first_line(exc)}") from None
            _logger.debug("creating study %s lost a race (%s); retrying", name, exc)
            time.sleep(0.2 + random.random() * (attempt + 1))
            continue
        if [d.name.lower() for d in study.directions] != directions:
            raise ConfigError(f"study {name!r} exists with directions "
                              f"{[d.name.lower() for d in study.directions]}, not {directions}")
        return study, created
    raise AssertionError("unreachable")


def load_study(storage: optuna.storages.BaseStorage, name: str,
               sampler: optuna.samplers.BaseSampler | None = None,
               pruner: optuna.pruners.BasePruner | None = None) -> optuna.Study:
    try:
        return optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
        raise ConfigError(f"no study named {name!r} in this storage (it has: {', '.join(names) or 'none'})") from None

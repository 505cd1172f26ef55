"""Storage URLs: resolve, mask, open, and create a study exactly once.

Accepted URLs: any SQLAlchemy URL (``sqlite:///file.db``, ``postgresql+psycopg://...``,
``mysql+pymysql://...``), ``journal:PATH`` for a journal file (one host), and ``redis://...`` for
a journal in Redis (many hosts). ``postgresql://`` and ``mysql://`` get the drivers this project
installs.
"""

from __future__ import annotations

import logging
import os
import random
import re
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import optuna
from optuna.storages._heartbeat import BaseHeartbeat

from flexunet.errors import ConfigError
from search import lifecycle
from search.paths import RunFolder

_logger = logging.getLogger(__name__)
ENV_VAR = "FLEXUNET_STORAGE"
HEARTBEAT_INTERVAL = 20  # seconds between a running trial's heartbeats
GRACE_PERIOD = 60  # a trial silent this long is failed (and retried) by the next worker
RECONNECT_SECONDS = 300.0  # how long a call waits for a lost database to come back


def resolve_url(cli_value: str | None, study_value: str | None, out_dir: Path) -> str:
    """``--storage``, then ``$FLEXUNET_STORAGE``, then the study file, then SQLite in ``out_dir``."""
    url = cli_value or os.environ.get(ENV_VAR) or study_value
    if not url:
        return RunFolder(out_dir).sqlite_url()
    return normalize(url)


def normalize(url: str) -> str:
    url = url.strip()
    if not url or any(c in url for c in "\x00\n\r"):
        raise ConfigError("storage URL: empty or holds control characters")
    for plain, driver in (("postgresql://", "postgresql+psycopg://"), ("postgres://", "postgresql+psycopg://"),
                          ("mysql://", "mysql+pymysql://"), ("mariadb://", "mysql+pymysql://")):
        if url.startswith(plain):
            return driver + url[len(plain):]
    return url


def kind(url: str) -> str:
    """'sqlite', 'postgresql', 'mysql', 'journal-file', 'journal-redis' (or the URL's scheme)."""
    if url.startswith("journal:"):
        return "journal-file"
    if url.startswith(("redis://", "rediss://", "unix://")):
        return "journal-redis"
    scheme = url.split(":", 1)[0]
    return scheme.split("+", 1)[0]


def mask(url: str) -> str:
    """The URL with its password replaced by ***, safe for logs, notes and reports."""
    return re.sub(r"(//[^/@:]*:)[^@/]*@", r"\1***@", url) if "@" in url else url


def public(url: str) -> str:
    """The URL as exported files may show it: masked, and a local file reduced to its name (an
    absolute path of the machine that made the file says nothing useful elsewhere)."""
    what = kind(url)
    if what == "sqlite":
        return "sqlite:///" + _sqlite_path(url).name
    if what == "journal-file":
        return "journal:" + _journal_path(url).name
    return mask(url)


def _sqlite_path(url: str) -> Path:
    return Path(url.split("///", 1)[-1])


def _journal_path(url: str) -> Path:
    path = url[len("journal:"):]
    if path.startswith("///"):
        path = path[2:]
    if not path:
        raise ConfigError("storage URL journal:PATH: the path is missing")
    return Path(path)


def open_storage(url: str, *, heartbeat: bool = True, create: bool = True) -> optuna.storages.BaseStorage:
    """An Optuna storage for ``url``; RDB storages get heartbeats and the retry of stale trials.

    With ``create=False`` (commands that only read a study) a SQLite or journal file that does
    not exist is an error, rather than an empty database left behind.
    """
    what = kind(url)
    path = _sqlite_path(url) if what == "sqlite" else _journal_path(url) if what == "journal-file" else None
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
        kwargs: dict[str, Any] = {"engine_kwargs": {"pool_pre_ping": True}} if what != "sqlite" else {}
        if heartbeat:
            kwargs.update(
                heartbeat_interval=_env_seconds("FLEXUNET_HEARTBEAT_INTERVAL", HEARTBEAT_INTERVAL),
                grace_period=_env_seconds("FLEXUNET_GRACE_PERIOD", GRACE_PERIOD),
                heartbeat_stale_trial_callback=lifecycle.stale_trial_callback)
        return RetryingStorage(_create_rdb(url, kwargs), mask(url))
    except ConfigError:  # already names what is wrong (journal: without a path)
        raise
    except (ImportError, ValueError, TypeError) as exc:
        raise ConfigError(f"storage {mask(url)}: {_first_line(exc)}") from None
    except Exception as exc:  # sqlalchemy.exc.*, redis errors: the server is not reachable
        raise ConfigError(f"storage {mask(url)}: cannot connect ({_first_line(exc)})") from None


def _create_rdb(url: str, kwargs: dict[str, Any], attempts: int = 6) -> optuna.storages.RDBStorage:
    """RDBStorage creates Optuna's tables on first use; processes that start together on a new
    database race to do so and the losers fail (a duplicate key, a table that already exists).
    Losing that race is retried after a short random wait."""
    from sqlalchemy import exc as sa_exc

    for attempt in range(attempts):
        try:
            return optuna.storages.RDBStorage(url, **kwargs)
        except (sa_exc.IntegrityError, sa_exc.ProgrammingError, sa_exc.OperationalError) as exc:
            refused = isinstance(exc, sa_exc.OperationalError) and any(
                words in str(exc).lower() for words in ("refused", "could not connect", "can't connect",
                                                       "name or service not known", "connection failed"))
            if refused or attempt == attempts - 1:  # no server there: no race to wait out
                raise
            time.sleep(0.2 + random.random() * (attempt + 1))
    raise AssertionError("unreachable")


def _env_seconds(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(f"${name}: expected a whole number of seconds >= 1, got {value!r}")
    return int(value)


class RetryingStorage(optuna.storages.BaseStorage, BaseHeartbeat):
    """An RDB storage whose calls wait for a lost database connection to come back.

    A study runs for days; a database restart or a network blip must not kill the trials in
    flight, nor the heartbeat thread (if heartbeats stop, a live trial is declared stale and run
    twice). Each call is retried with exponential backoff for up to ``RECONNECT_SECONDS``.
    """

    def __init__(self, inner: optuna.storages.RDBStorage, masked_url: str,
                 max_wait: float = RECONNECT_SECONDS) -> None:
        self._inner, self._masked_url, self._max_wait = inner, masked_url, max_wait

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self._call_fn(lambda *a, **k: getattr(self._inner, name)(*a, **k), *args, _name=name, **kwargs)

    def _call_fn(self, fn: Any, *args: Any, _name: str = "", **kwargs: Any) -> Any:
        from sqlalchemy import exc as sa_exc

        name = _name or getattr(fn, "__name__", "")
        waited, delay, attempt = 0.0, 0.5, 0
        while True:
            try:
                return fn(*args, **kwargs)
            except optuna.exceptions.UpdateFinishedTrialError:
                # A retried write whose first attempt did commit before the connection broke.
                if attempt and name == "set_trial_state_values":
                    return True
                raise
            except (sa_exc.SQLAlchemyError, optuna.exceptions.StorageInternalError, ConnectionError) as exc:
                # Optuna wraps SQLAlchemy's errors in StorageInternalError; only a lost
                # connection is worth waiting for, not a bad write.
                if not _connection_lost(exc) or waited >= self._max_wait:
                    raise
                _logger.warning("storage %s unreachable (%s); retrying in %.1fs", self._masked_url,
                                _first_line(exc), delay)
                time.sleep(delay)
                waited += delay
                delay = min(delay * 2, 15.0)
                attempt += 1


def _connection_lost(exc: BaseException) -> bool:
    """Whether an error (or what caused it: Optuna wraps SQLAlchemy's errors, which wrap the
    driver's) means the database went away, rather than that a statement was wrong."""
    from sqlalchemy import exc as sa_exc

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, sa_exc.DBAPIError) and current.connection_invalidated:
            return True
        if isinstance(current, sa_exc.OperationalError | sa_exc.InterfaceError | sa_exc.DisconnectionError
                      | sa_exc.PendingRollbackError | ConnectionError | TimeoutError):
            return True
        if type(current).__name__ in ("OperationalError", "InterfaceError"):  # psycopg, pymysql
            return True
        current = getattr(current, "orig", None) or current.__cause__ or current.__context__
    return False


def _stale_without_heartbeat(storage: RetryingStorage, study_id: int) -> list[int]:
    """RUNNING trials that never recorded a heartbeat and started longer ago than the grace
    period. Optuna skips such trials, so a worker killed between creating a trial and its first
    heartbeat would leave that trial RUNNING for ever."""
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    inner = storage._inner
    interval = inner.heartbeat_interval or 0
    limit = timedelta(seconds=(inner.grace_period or 2 * interval) + 2 * interval)
    now = datetime.now()
    running = storage.get_all_trials(study_id, deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    old = [t for t in running if t.datetime_start is not None and now - t.datetime_start > limit]
    if not old:
        return []
    with _create_scoped_session(inner.scoped_session) as session:
        return [t._trial_id for t in old if models.TrialHeartbeatModel.where_trial_id(t._trial_id, session) is None]


def _retrying(name: str) -> Any:
    def method(self: RetryingStorage, *args: Any, **kwargs: Any) -> Any:
        return self._call(name, *args, **kwargs)

    method.__name__ = name
    return method


for _name in sorted(optuna.storages.BaseStorage.__abstractmethods__ | BaseHeartbeat.__abstractmethods__
                    | {"get_trial_id_from_study_id_trial_number", "get_trial_number_from_id", "get_n_trials",
                       "get_best_trial", "get_trial_params", "get_trial_user_attrs", "get_trial_system_attrs",
                       "check_trial_is_updatable", "get_trial_param"}):
    setattr(RetryingStorage, _name, _retrying(_name))
RetryingStorage.__abstractmethods__ = frozenset()


def _stale_trial_ids(self: RetryingStorage, study_id: int) -> list[int]:
    stale = self._call("_get_stale_trial_ids", study_id)
    return stale + [i for i in self._call_fn(_stale_without_heartbeat, self, study_id) if i not in stale]


RetryingStorage._get_stale_trial_ids = _stale_trial_ids  # type: ignore[method-assign]


def _first_line(exc: BaseException) -> str:
    text = mask(str(exc)).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


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
                raise ConfigError(f"cannot create study {name!r}: {_first_line(exc)}") from None
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

"""Storage calls that wait for a lost connection (a database or the proxy) to come back.

:func:`retried` wraps a storage method: a call that fails because the server went away is tried
again with growing pauses for up to the storage's ``max_wait`` seconds; a statement that is
wrong fails at once. A signal's interrupt that arrives inside such a call waits for the call to
end (:func:`interrupt_outside_calls`).

>>> class Flaky:
...     url, max_wait, tries = "sqlite:///x.db", 5.0, 0
...     @retried
...     def read(self):
...         self.tries += 1
...         if self.tries < 2:
...             raise ConnectionError("server closed the connection")
...         return "read"
>>> storage = Flaky()
>>> storage.read(), storage.tries
('read', 2)
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import optuna

from search.store.urls import kind, mask

_logger = logging.getLogger(__name__)

RECONNECT_SECONDS = 300.0  # how long a call waits for a lost database to come back

# The longest pause between two attempts of a call. A server that went away comes back in
# seconds to minutes, so waits grow to 15 s; SQLite's "database is locked" has already waited
# out the driver's busy timeout (5 s) and the lock goes with the writer's next commit, so a
# SQLite call tries again within a second.
MAX_PAUSE_SECONDS = 15.0

SQLITE_MAX_PAUSE_SECONDS = 1.0

_calls = threading.local()  # per thread: whether a retried call is already running


def interrupt_outside_calls(exc: BaseException) -> None:
    """Raise ``exc`` (a signal handler's interrupt) now, or, if this thread is inside a call of
    :class:`RetryingStorage`, as soon as that call returns or waits to retry.

    A worker's SIGTERM handler raises where the main thread happens to be. Raised inside
    SQLAlchemy, it left a SQLite cursor half read, whose shared lock outlived the call while the
    exception was handled: every writer of the study, the worker's own bookkeeping of the
    interrupted trial included, then failed with "database is locked" for minutes (a `.ci/run`:
    two workers still alive ~3 minutes after their launcher was killed)."""
    if getattr(_calls, "active", False):
        _calls.interrupt = exc
        return
    raise exc


def _raise_deferred_interrupt() -> None:
    pending = getattr(_calls, "interrupt", None)
    if pending is not None:
        _calls.interrupt = None
        raise pending


def retried(method: Callable[..., Any]) -> Callable[..., Any]:
    """``method`` of a storage (with ``url`` and ``max_wait``) retried while its server is
    unreachable; a retried method that calls another retries as one call."""
    @functools.wraps(method)
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        if getattr(_calls, "active", False):  # a method called by a retried one: the outer call retries
            return method(self, *args, **kwargs)
        _calls.active = True
        try:
            result = _with_retries(method, self, args, kwargs)
        finally:
            _calls.active = False
            _raise_deferred_interrupt()
        return result

    return call


def _with_retries(method: Callable[..., Any], storage: Any, args: tuple, kwargs: dict[str, Any]) -> Any:
    from sqlalchemy import exc as sa_exc

    waited, delay, attempt = 0.0, 0.5, 0
    while True:
        try:
            return method(storage, *args, **kwargs)
        except optuna.exceptions.UpdateFinishedTrialError:
            if attempt and method.__name__ == "set_trial_state_values" and _first_attempt_committed(storage, args, kwargs):
                return True
            raise
        except (sa_exc.SQLAlchemyError, optuna.exceptions.StorageInternalError, ConnectionError,
                _grpc_error()) as exc:
            # Optuna wraps SQLAlchemy's errors in StorageInternalError; only a lost
            # connection (to the database, or to the proxy) is worth waiting for, not a bad write.
            if not _connection_lost(exc) or waited >= storage.max_wait:
                raise
            _logger.warning("storage %s unreachable (%s); retrying in %.1fs", mask(storage.url),
                            first_line(exc), delay)
            storage.unreachable_at = time.time()
            _raise_deferred_interrupt()  # between attempts no cursor is open: a waiting worker stops now
            time.sleep(delay)
            waited += delay
            delay = min(delay * 2, SQLITE_MAX_PAUSE_SECONDS if kind(storage.url) == "sqlite" else MAX_PAUSE_SECONDS)
            attempt += 1


def _first_attempt_committed(storage: Any, args: tuple, kwargs: dict[str, Any]) -> bool:
    """Whether a ``set_trial_state_values`` retried after a lost connection finds the trial
    finished because its own first attempt committed that very state.

    Only a finishing write can be recognised as ours. A worker that lost the connection while
    popping a WAITING trial (state RUNNING) and finds it finished on the retry must not be told
    it popped it: another worker popped it and finished it meanwhile (under a long SQLite lock,
    in CI), and running it again ends in Optuna's "Cannot tell a COMPLETE trial"."""
    names = ("trial_id", "state", "values")
    given = {**dict(zip(names, args)), **kwargs}
    state, values = given.get("state"), given.get("values")
    if state is None or not state.is_finished():
        return False
    stored = storage.get_trial(given["trial_id"])
    return stored.state == state and (values is None or stored.values == [float(v) for v in values])


def _grpc_error() -> type[BaseException]:
    """grpc's error type once grpc is loaded (a client of the proxy loaded it), else a stand-in
    that nothing raises: the other storages never load grpc."""
    import sys

    grpc = sys.modules.get("grpc")
    return grpc.RpcError if grpc is not None else _NoError


class _NoError(Exception):
    pass


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
        if isinstance(current, sa_exc.TimeoutError):
            # The process's one connection stayed busy past the pool's 30 s (the other thread's
            # call on an overloaded server): wait for it, as for a lost one. Raised, it killed
            # the heartbeat thread of 53 of 128 workers on two overloaded cores.
            return True
        if type(current).__name__ in ("OperationalError", "InterfaceError"):  # psycopg, pymysql
            return True
        code = getattr(current, "code", None)  # a grpc.RpcError: the proxy is down or restarting
        if callable(code) and getattr(code(), "name", "") in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
            return True
        current = getattr(current, "orig", None) or current.__cause__ or current.__context__
    return False


def first_line(exc: BaseException) -> str:
    code, details = getattr(exc, "code", None), getattr(exc, "details", None)
    if callable(code) and callable(details):  # a grpc.RpcError: its repr spans many lines
        return f"gRPC {getattr(code(), 'name', code())}: {details()}"
    text = mask(str(exc)).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__

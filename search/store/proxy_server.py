"""The server side of ``flexunet search proxy``: Optuna's ``run_grpc_proxy_server`` over
flexunet's retrying storage (a database restart is waited out) and Optuna's read cache. Its
clients are :class:`search.store.proxy.ProxyStorage`.

>>> backend_storage("journal:runs/x.log")
Traceback (most recent call last):
...
flexunet.errors.ConfigError: --storage journal:runs/x.log: the proxy serves a relational database (PostgreSQL, MySQL, SQLite), not a journal or another proxy (Optuna's proxy has no journal support)
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import optuna

from flexunet.errors import ConfigError
from search.store import storage as st
from search.store.proxy import DEFAULT_PORT
from search.store.urls import kind, mask

THREADS = 16  # the proxy's request threads

CONNECTIONS = 4  # the proxy's database connections (requests wait for a free one)


def backend_storage(url: str, connections: int = CONNECTIONS) -> optuna.storages.BaseStorage:
    """What the proxy serves: flexunet's retrying storage on ``url`` (``connections`` database
    connections, no heartbeat of its own: its clients beat) behind Optuna's read cache."""
    if kind(url) not in ("postgresql", "mysql", "sqlite"):
        raise ConfigError(f"--storage {mask(url)}: the proxy serves a relational database (PostgreSQL, "
                          "MySQL, SQLite), not a journal or another proxy (Optuna's proxy has no journal support)")
    return optuna.storages.get_storage(st.open_storage(url, heartbeat=False, connections=connections))


def serve(url: str, *, host: str = "127.0.0.1", port: int = DEFAULT_PORT, threads: int = THREADS,
          connections: int = CONNECTIONS, ready: Callable[[str], None] | None = None) -> None:
    """Serve the study database ``url`` on ``host:port`` with Optuna's ``run_grpc_proxy_server``
    until the process is interrupted; ``ready`` gets the clients' URL once the port is free."""
    storage = backend_storage(url, connections)
    _check_port_free(host, port)
    if ready is not None:
        ready(f"grpc://{host}:{port}")
    try:
        optuna.storages.run_grpc_proxy_server(storage, host=host, port=port,
                                              thread_pool=ThreadPoolExecutor(max_workers=threads))
    except RuntimeError as exc:  # grpc: "Failed to bind to address"
        raise ConfigError(f"--host {host} --port {port}: cannot listen there ({exc})") from None
    except KeyboardInterrupt:
        pass


def _check_port_free(host: str, port: int) -> None:
    import socket

    try:
        with socket.create_server((host, port), reuse_port=False):
            pass
    except OSError as exc:
        raise ConfigError(f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc})") from None

"""Optuna's gRPC storage proxy: one server process holds a few database connections for any
number of workers, which reach the study with ``--storage grpc://HOST:PORT``.

``flexunet search proxy --storage URL`` serves the study's database through Optuna's
``run_grpc_proxy_server``, over flexunet's retrying storage (a database restart is waited out)
and Optuna's read cache. Workers connect with :class:`ProxyStorage`, Optuna's
``GrpcStorageProxy`` with flexunet's retries (a proxy restart is waited out too) and a
heartbeat of its own.

Optuna's heartbeat lives in RDBStorage's tables and its calls are not part of the proxy's
protocol: a worker behind the proxy would never be found dead. :class:`ProxyStorage` records
its heartbeat as a trial system attr (:data:`HEARTBEAT_KEY`, the worker's clock in seconds
since the epoch) every ``heartbeat_interval`` seconds, and counts as stale a RUNNING trial whose
last heartbeat (or, before the first one, its start) is older than ``grace_period``. Optuna's
own machinery does the rest, as on a database: the stale-trial check at the start of every
``optimize``, ``search.trial.lifecycle.sweep`` in every worker and launcher, and the retry callback
that queues the trial again to resume from its checkpoint. The hosts' clocks must agree to well
within the grace period (60 s; NTP keeps them within milliseconds).

Example (a proxy in a thread of this process, over a SQLite file)::

    import threading
    import optuna
    from search.store import proxy, proxy_server

    threading.Thread(target=proxy_server.serve, args=("sqlite:///proxied.db",), kwargs={"port": 13099},
                     daemon=True).start()
    storage = proxy.connect("grpc://127.0.0.1:13099")
    study = optuna.create_study(storage=storage)
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=3)
    assert len(study.trials) == 3
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import datetime

import optuna
from optuna.trial import FrozenTrial, TrialState

from flexunet.errors import ConfigError
from search.store import _internals
from search.store.retry import RECONNECT_SECONDS, retried

_logger = logging.getLogger(__name__)
DEFAULT_PORT = 13000  # Optuna's
READY_SECONDS = 30.0  # how long a client waits for the proxy at start-up
HEARTBEAT_KEY = "flexunet_heartbeat"  # trial system attr: the worker's last heartbeat (epoch seconds)


def parse(url: str) -> tuple[str, int]:
    """``grpc://HOST:PORT`` -> (host, port); a missing port is Optuna's 13000."""
    rest = url[len("grpc://"):].strip("/")
    host, _, port = rest.rpartition(":") if ":" in rest else (rest, "", str(DEFAULT_PORT))
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536 or "/" in host or "@" in host:
        raise ConfigError(f"storage {url}: expected grpc://HOST:PORT (the address `flexunet search proxy` listens on)")
    return host, int(port)


class ProxyStorage(_internals.HeartbeatProxy):
    """A client of ``flexunet search proxy``: Optuna's ``GrpcStorageProxy`` whose calls wait for
    a proxy that went away (up to ``max_wait`` seconds, as :class:`search.store.storage.RetryingStorage`
    waits for a database), with a heartbeat through trial system attrs (see the module's doc).

    Without ``heartbeat_interval`` it records no heartbeat and finds no trial stale (what
    commands that only read a study use)."""

    def __init__(self, *, host: str, port: int, heartbeat_interval: int | None = None,
                 grace_period: int | None = None,
                 heartbeat_stale_trial_callback: Callable[[optuna.Study, FrozenTrial], None] | None = None,
                 max_wait: float = RECONNECT_SECONDS) -> None:
        super().__init__(host=host, port=port)
        self.url = f"grpc://{host}:{port}"
        self.max_wait = max_wait
        self.heartbeat_interval = heartbeat_interval
        self.grace_period = grace_period
        self._stale_callback = heartbeat_stale_trial_callback
        self.unreachable_at = 0.0  # when a call of this client last found the proxy gone

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            self.set_trial_system_attr(trial_id, HEARTBEAT_KEY, time.time())
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # the trial ended (or another process failed it) between two beats

    def stale_trial_ids_of(self, study_id: int) -> list[int]:
        if self.heartbeat_interval is None:
            return []
        grace = self.grace_period or 2 * self.heartbeat_interval
        now = time.time()
        if now - self.unreachable_at < grace:
            # This client was cut off from the proxy a moment ago, and so were the others: their
            # heartbeats stopped with the proxy, not with their workers, and resume within a
            # retry's pause (at most 15 s). Judged now, live trials would be failed and run twice.
            return []
        stale = []
        for trial in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            beat = trial.system_attrs.get(HEARTBEAT_KEY)
            if beat is None:  # killed before its first beat: give it two intervals more
                start = trial.datetime_start or datetime.now()
                beat = start.timestamp() - 2 * self.heartbeat_interval
            if now - float(beat) > grace:
                stale.append(_internals.trial_id(trial))
        return stale

    def get_heartbeat_interval(self) -> int | None:
        return self.heartbeat_interval

    def get_heartbeat_stale_trial_callback(self) -> Callable[[optuna.Study, FrozenTrial], None] | None:
        return self._stale_callback


# Every call of GrpcStorageProxy that talks to the proxy (BaseStorage's others go through these),
# and the heartbeat's (tests/test_proxy.py checks this list against the installed Optuna).
RETRIED_METHODS = (
    "create_new_study", "delete_study", "set_study_user_attr", "set_study_system_attr", "get_study_id_from_name",
    "get_study_name_from_id", "get_study_directions", "get_study_user_attrs", "get_study_system_attrs",
    "get_all_studies", "create_new_trial", "set_trial_param", "get_trial_id_from_study_id_trial_number",
    "set_trial_state_values", "set_trial_intermediate_value", "set_trial_user_attr", "set_trial_system_attr",
    "get_trial", "get_all_trials", "record_heartbeat", *_internals.HEARTBEAT_PRIVATE_CALLS,
)
for _name in RETRIED_METHODS:
    setattr(ProxyStorage, _name, retried(getattr(ProxyStorage, _name)))


def connect(url: str, *, heartbeat_interval: int | None = None, grace_period: int | None = None,
            heartbeat_stale_trial_callback: Callable[[optuna.Study, FrozenTrial], None] | None = None,
            ready_seconds: float = READY_SECONDS) -> ProxyStorage:
    """A :class:`ProxyStorage` for ``grpc://HOST:PORT``, once the proxy answers (a clear error
    after ``ready_seconds`` if it does not)."""
    host, port = parse(url)
    storage = ProxyStorage(host=host, port=port, heartbeat_interval=heartbeat_interval, grace_period=grace_period,
                           heartbeat_stale_trial_callback=heartbeat_stale_trial_callback)
    try:
        storage.wait_server_ready(timeout=ready_seconds)
    except ConnectionError:
        storage.close()
        raise ConfigError(f"storage {url}: no proxy answers there after {ready_seconds:.0f} s (start one with "
                          "`flexunet search proxy --storage URL --host HOST --port PORT`)") from None
    return storage







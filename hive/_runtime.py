"""``hive.init()`` / ``hive.shutdown()``: start or join a Ray cluster and its Coordinator."""

from __future__ import annotations

import json
import os
from dataclasses import fields
from pathlib import Path
from typing import Any

import ray

from hive._client import Client, _call
from hive._config import COORDINATOR_NAME, NAMESPACE, HiveConfig, resolve_home
from hive._coordinator import Coordinator
from hive._eventlog import EventLog
from hive._exceptions import ConfigError, NotInitializedError

__all__ = ["client", "init", "is_initialized", "running_cluster", "shutdown", "use_auth_mode"]

_CLIENT: Client | None = None
_OWNS_RAY = False
CLUSTER_FILE = "cluster.json"  # written by `hive up` in the home: address, dashboard, pid


def running_cluster(home: Path) -> dict[str, Any] | None:
    """The record ``hive up`` left in ``home`` if its Ray head process is still alive."""
    path = home / CLUSTER_FILE
    if not path.exists():
        return None
    info = json.loads(path.read_text())
    try:
        os.kill(int(info["pid"]), 0)
    except (OSError, KeyError, ValueError):
        return None
    return info


def use_auth_mode(info: dict[str, Any]) -> None:
    """Speak the authentication mode of the Ray head `hive up` started, in this process and its children.

    Ray 2.60 turns token authentication on for a head whenever a token exists (``~/.ray/auth_token``,
    ``$RAY_AUTH_TOKEN`` or ``$RAY_AUTH_TOKEN_PATH``), but a client that joins by an explicit address
    (``ray.init(address=...)``, the Job Submission client) only sends the token when
    ``RAY_AUTH_MODE=token``. Ray caches the mode when it is imported, so refresh its config too.
    """
    mode = info.get("auth_mode")
    if not mode or os.environ.get("RAY_AUTH_MODE") == mode:
        return
    os.environ["RAY_AUTH_MODE"] = mode
    from ray._raylet import Config  # type: ignore[attr-defined]  # (no stub)

    Config.initialize("")


def init(address: str | None = None, home: str | os.PathLike[str] | None = None, *,
         num_cpus: int | None = None, **settings: Any) -> Client:
    """Join a Ray cluster at ``address`` or start the embedded one, and connect to the Coordinator.

    With no ``address``: ``$RAY_ADDRESS`` if set, else the cluster ``hive up`` started for this
    home, else a new local Ray instance (the embedded default). The Coordinator is a named,
    detached Ray actor: created if absent, joined if present.

    Args:
        address: a Ray address (``"auto"``, ``"ray://host:10001"``, ``"host:6379"``), or None.
        home: state directory (default ``$HIVE_HOME`` or ``./.hive``).
        num_cpus: CPUs for a new embedded Ray instance (default: all).
        **settings: HiveConfig fields, e.g. ``max_queue=1000``, ``heartbeat_timeout_s=3``.

    Returns:
        The Client (also available as ``hive.client()``).

    Raises:
        ConfigError: an unknown setting, or a running Coordinator that uses another home.

    Example:
        >>> # import hive; c = hive.init(); c.status()["home"]
    """
    global _CLIENT, _OWNS_RAY
    known = {f.name for f in fields(HiveConfig)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ConfigError(f"unknown hive setting(s) {unknown}; known: {sorted(known - {'home'})}", setting=unknown[0])
    home_path = resolve_home(home)
    config = HiveConfig(home=home_path, **settings)
    # Open the log here first so a corrupt or foreign events.db fails in the caller with a clear
    # EventLogCorruptError instead of inside the Coordinator actor's constructor.
    EventLog(config.events_path, durability=config.durability, busy_timeout_s=config.event_busy_timeout_s).close()
    if not ray.is_initialized():
        target = address or os.environ.get("RAY_ADDRESS")
        if target is None:
            up = running_cluster(home_path)
            if up:
                use_auth_mode(up)
            target = up["address"] if up else None
        if target:
            ray.init(address=target, namespace=NAMESPACE, log_to_driver=True)
            _OWNS_RAY = False
        else:
            ray.init(address="local", namespace=NAMESPACE, num_cpus=num_cpus, include_dashboard=False)
            _OWNS_RAY = True
    handle = ray.remote(Coordinator).options(
        name=COORDINATOR_NAME, namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
        max_restarts=-1, max_task_retries=-1, max_concurrency=10_000, num_cpus=0,
    ).remote(config)
    info = _call(handle.ping)
    if Path(info["home"]) != home_path:
        raise ConfigError(
            f"the running Coordinator keeps its state in {info['home']}, not {home_path}; "
            f"pass home={info['home']!r} (or set HIVE_HOME), or run `hive down` first",
            setting="home", running_home=info["home"])
    _CLIENT = Client(handle, config)
    return _CLIENT


def is_initialized() -> bool:
    """Whether ``init()`` has connected this process to a Coordinator."""
    return _CLIENT is not None


def client() -> Client:
    """The Client from the last ``init()``.

    Raises:
        NotInitializedError: ``hive.init()`` was not called in this process.
    """
    if _CLIENT is None:
        raise NotInitializedError("hive is not initialized: call hive.init() first (or `hive up` then hive.init())")
    return _CLIENT


def shutdown(stop_cluster: bool | None = None) -> None:
    """Stop the Coordinator and its agents, and the embedded Ray instance if this process started it.

    Args:
        stop_cluster: also kill the Coordinator and agents on a joined cluster (default: only
            when this process started Ray itself).
    """
    global _CLIENT, _OWNS_RAY
    if _CLIENT is None:
        if stop_cluster and ray.is_initialized():  # an earlier shutdown() only let go of the client
            try:
                coord = ray.get_actor(COORDINATOR_NAME, namespace=NAMESPACE)
            except ValueError:
                return
            try:
                ray.get(coord.shutdown.remote(), timeout=60)
            finally:
                ray.kill(coord, no_restart=True)
        return
    stop = _OWNS_RAY if stop_cluster is None else stop_cluster
    if stop or _OWNS_RAY:
        try:
            _call(_CLIENT.coordinator.shutdown, timeout=60)
        finally:
            ray.kill(_CLIENT.coordinator, no_restart=True)
    _CLIENT = None
    if _OWNS_RAY:
        ray.shutdown()
        _OWNS_RAY = False

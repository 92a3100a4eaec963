"""hive: a distributed compute cluster on Ray.

Agents are Ray actors managed by a Coordinator that matches tasks to them, survives their
death and records everything in a durable EventLog.

Example:
    >>> import hive
    >>> from hive.testing import EchoAgent
    >>> # client = hive.init(); client.spawn(EchoAgent, count=2)
    >>> # hive.submit("echo", "hello").result()
"""

from __future__ import annotations

from typing import Any

from hive import _events as events
from hive._agent import Agent, RespawnPolicy
from hive._client import Client
from hive._config import HiveConfig, resolve_home
from hive._eventlog import EventLog
from hive._exceptions import (
    AgentError,
    AgentNotFoundError,
    AgentSpawnError,
    ConfigError,
    EventDecodeError,
    EventLogCorruptError,
    EventLogError,
    EventLogLockedError,
    HiveError,
    IllegalTransitionError,
    NotInitializedError,
    PayloadNotSerializableError,
    QueueFullError,
    TaskCancelledError,
    TaskDeadLetteredError,
    TaskError,
    TaskFailedError,
    TaskNotFoundError,
    TaskTimeoutError,
    UnknownTaskTypeError,
    UnsatisfiableTaskError,
)
from hive._lifecycle import AgentState
from hive._reputation import AutonomyLevel, ReputationBook, ReputationPolicy
from hive._runtime import client, init, is_initialized, shutdown
from hive._tasks import TaskContext, TaskHandle, TaskSpec, TaskStatus, current_task, handler

__version__ = "0.1.0"

# The cross-site gateway imports p2p (py-libp2p: ~0.6 s); load it on first use only.
_LAZY = {"SiteGateway": "hive._site_gateway", "SiteService": "hive._site_gateway"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hive' has no attribute {name!r}")


def submit(task_type: str, payload: Any = None, **options: Any) -> TaskHandle:
    """Submit a task through the current client (see ``Client.submit``)."""
    return client().submit(task_type, payload, **options)


def spawn(cls: type, count: int = 1, *args: Any, **kwargs: Any) -> list[str]:
    """Spawn agents through the current client (see ``Client.spawn``)."""
    return client().spawn(cls, count, *args, **kwargs)


def gather(handles: list[TaskHandle], timeout: float | None = None) -> list[Any]:
    """Wait for tasks through the current client (see ``Client.gather``)."""
    return client().gather(handles, timeout=timeout)


__all__ = [
    "Agent",
    "AgentError",
    "AgentNotFoundError",
    "AgentSpawnError",
    "AgentState",
    "AutonomyLevel",
    "Client",
    "ConfigError",
    "EventDecodeError",
    "EventLog",
    "EventLogCorruptError",
    "EventLogError",
    "EventLogLockedError",
    "HiveConfig",
    "HiveError",
    "IllegalTransitionError",
    "NotInitializedError",
    "PayloadNotSerializableError",
    "QueueFullError",
    "ReputationBook",
    "ReputationPolicy",
    "RespawnPolicy",
    "SiteGateway",
    "SiteService",
    "TaskCancelledError",
    "TaskContext",
    "TaskDeadLetteredError",
    "TaskError",
    "TaskFailedError",
    "TaskHandle",
    "TaskNotFoundError",
    "TaskSpec",
    "TaskStatus",
    "TaskTimeoutError",
    "UnknownTaskTypeError",
    "UnsatisfiableTaskError",
    "client",
    "current_task",
    "events",
    "gather",
    "handler",
    "init",
    "is_initialized",
    "resolve_home",
    "shutdown",
    "spawn",
    "submit",
]

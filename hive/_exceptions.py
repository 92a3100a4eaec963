"""Errors raised by the hive runtime.

Every error carries its context as attributes (agent id, task id, path tried, ...) and
survives pickling between Ray processes: ``__reduce__`` rebuilds it from the message and
the context, whatever the subclass's own ``__init__`` signature.

Tree::

    HiveError
    ├── ConfigError                    bad setting, flag or argument
    ├── NotInitializedError            hive.init() was not called / no cluster running
    ├── EventLogError                  the durable event store
    │   ├── EventLogCorruptError       not a database, or failed integrity check
    │   ├── EventLogLockedError        another process holds the write lock too long
    │   └── EventDecodeError           a stored event of unknown type or newer version
    ├── AgentError
    │   ├── IllegalTransitionError     lifecycle transition not allowed
    │   ├── AgentNotFoundError         no agent with that id
    │   └── AgentSpawnError            the agent's actor could not be started
    └── TaskError
        ├── UnknownTaskTypeError       no agent kind handles this task type
        ├── UnsatisfiableTaskError     no agent offers the resources the task asks for
        ├── PayloadNotSerializableError
        ├── QueueFullError             backpressure: the bounded queue is full
        ├── TaskFailedError            the task raised; carries the remote traceback
        ├── TaskCancelledError
        ├── TaskDeadLetteredError      out of attempts; carries every cause
        ├── TaskTimeoutError           result() waited longer than its timeout
        └── TaskNotFoundError
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AgentError",
    "AgentNotFoundError",
    "AgentSpawnError",
    "ConfigError",
    "EventDecodeError",
    "EventLogCorruptError",
    "EventLogError",
    "EventLogLockedError",
    "HiveError",
    "IllegalTransitionError",
    "NotInitializedError",
    "PayloadNotSerializableError",
    "QueueFullError",
    "TaskCancelledError",
    "TaskDeadLetteredError",
    "TaskError",
    "TaskFailedError",
    "TaskNotFoundError",
    "TaskTimeoutError",
    "UnknownTaskTypeError",
    "UnsatisfiableTaskError",
]


def _rebuild(cls: type[HiveError], message: str, context: dict[str, Any]) -> HiveError:
    err = cls.__new__(cls)
    HiveError.__init__(err, message, **context)
    return err


class HiveError(Exception):
    """Base of every hive error. ``context`` keys become attributes."""

    def __init__(self, message: str, **context: Any) -> None:
        super().__init__(message)
        self.message = message
        self.context = context
        for key, value in context.items():
            setattr(self, key, value)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.message, self.context))

    def __str__(self) -> str:
        return self.message


class ConfigError(HiveError):
    """A setting, flag or argument is invalid; the message names it."""


class NotInitializedError(HiveError):
    """No hive runtime: call ``hive.init()`` or start one with ``hive up``."""


class EventLogError(HiveError):
    """The event store failed; ``path`` names the database."""


class EventLogCorruptError(EventLogError):
    """The event database is damaged; nothing was overwritten."""


class EventLogLockedError(EventLogError):
    """Another process held the database lock longer than the busy timeout."""


class EventDecodeError(EventLogError):
    """A stored event has an unknown type or a version newer than this code."""


class AgentError(HiveError):
    """An agent-level failure; ``agent_id`` names the agent."""


class IllegalTransitionError(AgentError):
    """A lifecycle transition that the state machine forbids."""

    def __init__(self, agent_id: str, current: str, target: str) -> None:
        super().__init__(
            f"agent {agent_id}: illegal lifecycle transition {current} -> {target}",
            agent_id=agent_id,
            current=current,
            target=target,
        )


class AgentNotFoundError(AgentError):
    """No agent with that id is registered."""


class AgentSpawnError(AgentError):
    """The agent's Ray actor could not be created or did not become ready."""


class TaskError(HiveError):
    """A task-level failure; ``task_id`` names the task when known."""


class UnknownTaskTypeError(TaskError):
    """No registered agent kind declares a handler for this task type."""


class UnsatisfiableTaskError(TaskError):
    """No registered agent declares the resources the task asks for."""


class PayloadNotSerializableError(TaskError):
    """The task payload cannot be pickled, so it cannot cross a process boundary."""


class QueueFullError(TaskError):
    """Backpressure: the coordinator's bounded queue is full."""


class TaskFailedError(TaskError):
    """The task's handler raised. ``remote_traceback`` holds the agent-side traceback."""

    def __str__(self) -> str:
        tb = self.context.get("remote_traceback")
        return f"{self.message}\n\nRemote traceback (agent {self.context.get('agent_id')}):\n{tb}" if tb else self.message


class TaskCancelledError(TaskError):
    """The task was cancelled before it completed."""


class TaskDeadLetteredError(TaskError):
    """The task ran out of attempts; ``causes`` lists why each attempt failed."""


class TaskTimeoutError(TaskError):
    """Waiting for a result took longer than the given timeout (the task goes on)."""


class TaskNotFoundError(TaskError):
    """No task with that id is known to the coordinator."""

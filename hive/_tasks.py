"""Task specs, the wire messages between Coordinator and agents, and the caller's TaskHandle."""

from __future__ import annotations

import contextvars
import uuid
from enum import Enum
from typing import TYPE_CHECKING, Any, Literal, TypeVar
from collections.abc import Callable

import cloudpickle
from pydantic import BaseModel, ConfigDict, Field

from hive._exceptions import (
    PayloadNotSerializableError,
    TaskCancelledError,
    TaskDeadLetteredError,
    TaskFailedError,
    TaskTimeoutError,
)

if TYPE_CHECKING:
    from hive._client import Client

__all__ = [
    "TaskContext",
    "TaskEnvelope",
    "TaskHandle",
    "TaskOutcome",
    "TaskSpec",
    "TaskStatus",
    "current_task",
    "handler",
    "pack_payload",
]

F = TypeVar("F", bound=Callable[..., Any])


class TaskStatus(str, Enum):
    """Where a task is. The last four are final."""

    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    DEAD_LETTERED = "dead_lettered"

    @property
    def final(self) -> bool:
        """True once the task will not change again."""
        return self not in (TaskStatus.QUEUED, TaskStatus.RUNNING)


class TaskSpec(BaseModel):
    """What a caller asks for. Crosses the driver → Coordinator boundary (payload pickled).

    Example:
        >>> TaskSpec(type="echo", resources={"GPU": 1}, critical=True).type
        'echo'
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    type: str = Field(min_length=1, description="task type; an agent declares it with @hive.handler")
    payload: bytes = b""  # pickled payload (see pack_payload)
    task_id: str = Field(default_factory=lambda: uuid.uuid4().hex[:16])
    idempotency_key: str = ""  # defaults to task_id; re-submitting a known key returns the first task
    resources: dict[str, float] = Field(default_factory=dict)  # what the agent must offer, e.g. {"GPU": 1}
    critical: bool = False  # only agents at or above the critical reputation threshold run it
    cross_check: bool = True  # results from low-reputation agents are re-run elsewhere and compared
    max_attempts: int | None = Field(default=None, ge=1)  # None: the Coordinator's default

    def model_post_init(self, __context: Any) -> None:
        if not self.idempotency_key:
            object.__setattr__(self, "idempotency_key", self.task_id)


class TaskEnvelope(BaseModel):
    """One attempt of a task, sent Coordinator → agent."""

    model_config = ConfigDict(frozen=True)

    task_id: str
    type: str
    payload: bytes
    idempotency_key: str
    attempt: int
    role: Literal["primary", "cross_check"] = "primary"


class TaskOutcome(BaseModel):
    """What an agent reports for one attempt, agent → Coordinator."""

    model_config = ConfigDict(frozen=True)

    task_id: str
    agent_id: str
    ok: bool
    result: bytes = b""  # pickled return value when ok
    error: str = ""  # "ExcType: message" when not ok
    traceback: str = ""
    exception: bytes | None = None  # the pickled exception, when it pickles
    latency_s: float = 0.0
    deduplicated: bool = False  # replayed from the agent's idempotency cache


class TaskContext(BaseModel):
    """What a running handler can learn about its task via ``hive.current_task()``."""

    model_config = ConfigDict(frozen=True)

    task_id: str
    idempotency_key: str
    attempt: int
    agent_id: str
    role: str


_CURRENT: contextvars.ContextVar[TaskContext | None] = contextvars.ContextVar("hive_task", default=None)


def current_task() -> TaskContext | None:
    """The task the calling handler is running, or None outside a handler.

    Use ``idempotency_key`` to make side effects safe when a task is retried elsewhere.

    Example:
        >>> current_task() is None
        True
    """
    return _CURRENT.get()


def handler(task_type: str) -> Callable[[F], F]:
    """Mark an Agent method as the handler of ``task_type`` (declares the capability).

    Args:
        task_type: the name callers submit, e.g. ``"echo"``.

    Returns:
        A decorator that leaves the method unchanged.

    Example:
        >>> class Echo:
        ...     @handler("echo")
        ...     def echo(self, payload):
        ...         return payload
        >>> Echo.echo._hive_task_type
        'echo'
    """
    if not task_type or not isinstance(task_type, str):
        raise ValueError(f"task type must be a non-empty string, got {task_type!r}")

    def mark(fn: F) -> F:
        fn._hive_task_type = task_type  # type: ignore[attr-defined]
        return fn

    return mark


def pack_payload(payload: Any, task_type: str = "") -> bytes:
    """Pickle a payload with cloudpickle, with a clear error when it cannot be.

    Raises:
        PayloadNotSerializableError: names the payload's type and the pickling error.

    Example:
        >>> len(pack_payload({"x": 1})) > 0
        True
    """
    try:
        return cloudpickle.dumps(payload)
    except Exception as exc:
        raise PayloadNotSerializableError(
            f"payload of task type {task_type!r} ({type(payload).__name__}) cannot be serialized: {exc}. "
            "Pass plain data (numbers, strings, lists, dicts, numpy arrays, tensors) or objects that pickle; "
            "open files, locks, sockets and generators do not.",
            task_type=task_type, payload_type=type(payload).__name__,
        ) from exc


class TaskHandle:
    """The caller's view of a submitted task.

    Example:
        >>> # h = hive.submit("echo", 41); h.result(timeout=10)
    """

    def __init__(self, task_id: str, client: Client, task_type: str = "") -> None:
        self.task_id = task_id
        self.task_type = task_type
        self._client = client

    def __repr__(self) -> str:
        return f"TaskHandle({self.task_id!r}, type={self.task_type!r})"

    def status(self) -> TaskStatus:
        """The task's status now."""
        return TaskStatus(self._client.task_info(self.task_id)["status"])

    def info(self) -> dict[str, Any]:
        """Everything the Coordinator knows of the task (status, attempt, agent, causes...)."""
        return self._client.task_info(self.task_id)

    def cancel(self) -> bool:
        """Cancel the task. Returns False if it had already finished."""
        return self._client.cancel(self.task_id)

    def result(self, timeout: float | None = None) -> Any:
        """Wait for the task and return its value.

        Args:
            timeout: seconds to wait; None waits for ever.

        Raises:
            TaskFailedError: the handler raised (the remote traceback is in the message).
            TaskDeadLetteredError: every attempt failed; ``causes`` lists why.
            TaskCancelledError: the task was cancelled.
            TaskTimeoutError: it did not finish within ``timeout`` (it goes on running).
        """
        return self._client.gather([self], timeout=timeout)[0]


def unpack_record(record: dict[str, Any]) -> Any:
    """Turn a final task record from the Coordinator into a value or the right exception."""
    status = TaskStatus(record["status"])
    tid = record["task_id"]
    if status is TaskStatus.COMPLETED:
        return cloudpickle.loads(record["result"])
    if status is TaskStatus.FAILED:
        err = TaskFailedError(
            f"task {tid} ({record['type']}) raised {record['error']}",
            task_id=tid, agent_id=record.get("agent_id"), remote_traceback=record.get("traceback", ""),
        )
        cause = None
        if record.get("exception"):
            try:
                cause = cloudpickle.loads(record["exception"])
            except Exception:
                cause = None
        raise err from cause
    if status is TaskStatus.DEAD_LETTERED:
        causes = record.get("causes", [])
        raise TaskDeadLetteredError(
            f"task {tid} ({record['type']}) dead-lettered after {record['attempt']} attempt(s): "
            + "; ".join(causes) + ". Raise max_attempts or fix the agents.",
            task_id=tid, causes=causes,
        )
    if status is TaskStatus.CANCELLED:
        raise TaskCancelledError(f"task {tid} ({record['type']}) was cancelled", task_id=tid)
    raise TaskTimeoutError(f"task {tid} ({record['type']}) still {status.value} at timeout", task_id=tid)

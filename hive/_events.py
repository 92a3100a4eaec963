"""Versioned event models: everything the runtime records in the EventLog.

Each event is a frozen pydantic model with a ``type`` (a dotted name) and a ``version``.
``decode_event`` turns a stored row back into the right model; a stored version newer than
this code's is refused rather than half-read. To change an event: add a field with a
default (same version) or bump ``version`` and teach ``decode_event`` to upcast the old one.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from hive._exceptions import EventDecodeError

__all__ = [
    "EVENT_TYPES",
    "AgentFailed",
    "AgentHeartbeatMissed",
    "AgentReady",
    "AgentRestarted",
    "AgentResumed",
    "AgentSpawned",
    "AgentSuspended",
    "AgentTerminated",
    "CheckpointCreated",
    "CoordinatorStarted",
    "Event",
    "ResourceAllocated",
    "ResourceReleased",
    "RollbackExecuted",
    "TaskCancelled",
    "TaskCompleted",
    "TaskCrossChecked",
    "TaskDeadLettered",
    "TaskFailed",
    "TaskRetried",
    "TaskStarted",
    "TaskSubmitted",
    "decode_event",
]


class _EventBase(BaseModel):
    """Fields every event has. ``seq`` is assigned by the EventLog on append."""

    model_config = ConfigDict(frozen=True, extra="forbid", ser_json_bytes="base64", val_json_bytes="base64")

    type: str
    version: int = 1
    ts: float = Field(default_factory=time.time)
    seq: int | None = None
    agent_id: str | None = None
    task_id: str | None = None

    KIND: ClassVar[str] = ""


# ---- agent lifecycle -------------------------------------------------------------------


class AgentSpawned(_EventBase):
    """An agent's actor was created. Holds what is needed to spawn it again."""

    type: Literal["agent.spawned"] = "agent.spawned"
    kind: str
    actor_name: str
    capabilities: list[str]
    resources: dict[str, float]
    max_concurrency: int = 1
    spec: bytes  # cloudpickled (agent class, init args, init kwargs)
    respawn_max: int = 3
    node_id: str | None = None  # preferred Ray node (soft affinity: a restart may land elsewhere)


class AgentReady(_EventBase):
    type: Literal["agent.ready"] = "agent.ready"
    restored_from: str | None = None  # checkpoint path, when restore() ran


class AgentSuspended(_EventBase):
    type: Literal["agent.suspended"] = "agent.suspended"


class AgentResumed(_EventBase):
    type: Literal["agent.resumed"] = "agent.resumed"


class AgentTerminated(_EventBase):
    type: Literal["agent.terminated"] = "agent.terminated"
    reason: str = "requested"


class AgentFailed(_EventBase):
    type: Literal["agent.failed"] = "agent.failed"
    cause: str
    will_restart: bool


class AgentRestarted(_EventBase):
    type: Literal["agent.restarted"] = "agent.restarted"
    restart: int  # 1 for the first restart of this agent id


class AgentHeartbeatMissed(_EventBase):
    type: Literal["agent.heartbeat_missed"] = "agent.heartbeat_missed"
    silent_for_s: float


# ---- tasks -----------------------------------------------------------------------------


class TaskSubmitted(_EventBase):
    type: Literal["task.submitted"] = "task.submitted"
    task_type: str
    idempotency_key: str
    payload: bytes  # pickled payload, so pending tasks survive a coordinator restart
    resources: dict[str, float] = {}
    critical: bool = False
    cross_check: bool = True
    max_attempts: int = 3


class TaskStarted(_EventBase):
    type: Literal["task.started"] = "task.started"
    attempt: int
    idempotency_key: str
    role: Literal["primary", "cross_check"] = "primary"


class TaskCompleted(_EventBase):
    type: Literal["task.completed"] = "task.completed"
    attempt: int
    idempotency_key: str
    result: bytes  # pickled result, so a caller can fetch it after a coordinator restart
    latency_s: float
    deduplicated: bool = False  # the agent had already completed this key and replayed it


class TaskFailed(_EventBase):
    type: Literal["task.failed"] = "task.failed"
    attempt: int
    error: str
    traceback: str
    exception: bytes | None = None  # pickled original exception, when it pickles


class TaskRetried(_EventBase):
    type: Literal["task.retried"] = "task.retried"
    attempt: int  # the attempt that will run next
    cause: str


class TaskDeadLettered(_EventBase):
    type: Literal["task.dead_lettered"] = "task.dead_lettered"
    attempts: int
    causes: list[str]


class TaskCancelled(_EventBase):
    type: Literal["task.cancelled"] = "task.cancelled"


class TaskCrossChecked(_EventBase):
    """A low-reputation agent's result was re-run on ``checker_id`` and compared."""

    type: Literal["task.cross_checked"] = "task.cross_checked"
    checker_id: str
    agreed: bool
    arbiter_id: str | None = None  # third agent asked when the first two disagreed
    outvoted: str | None = None  # agent charged with the disagreement (counts against its reputation)


# ---- resources, checkpoints, coordinator -------------------------------------------------


class ResourceAllocated(_EventBase):
    type: Literal["resource.allocated"] = "resource.allocated"
    resources: dict[str, float]


class ResourceReleased(_EventBase):
    type: Literal["resource.released"] = "resource.released"
    resources: dict[str, float]


class CheckpointCreated(_EventBase):
    type: Literal["checkpoint.created"] = "checkpoint.created"
    path: str
    sha256: str
    size_bytes: int


class RollbackExecuted(_EventBase):
    type: Literal["rollback.executed"] = "rollback.executed"
    target: str  # what was rolled back (an agent checkpoint, a champion model, ...)
    restored: str  # the path or version restored
    reason: str


class ExtensionEvent(_EventBase):
    """An event of a package built on hive (inference, evolution, p2p bridge).

    ``topic`` names it (dotted, e.g. ``inference.kv_rebuilt``); ``data`` holds JSON-able details.
    """

    type: Literal["ext.event"] = "ext.event"
    topic: str
    data: dict[str, Any] = {}


class CoordinatorStarted(_EventBase):
    type: Literal["coordinator.started"] = "coordinator.started"
    replayed_events: int
    pending_tasks: int
    agents: int


Event = Annotated[
    Union[
        AgentSpawned, AgentReady, AgentSuspended, AgentResumed, AgentTerminated, AgentFailed,
        AgentRestarted, AgentHeartbeatMissed, TaskSubmitted, TaskStarted, TaskCompleted,
        TaskFailed, TaskRetried, TaskDeadLettered, TaskCancelled, TaskCrossChecked,
        ResourceAllocated, ResourceReleased, CheckpointCreated, RollbackExecuted,
        ExtensionEvent, CoordinatorStarted,
    ],
    Field(discriminator="type"),
]

_ADAPTER: TypeAdapter[Any] = TypeAdapter(Event)

EVENT_TYPES: dict[str, type[_EventBase]] = {
    cls.model_fields["type"].default: cls
    for cls in _EventBase.__subclasses__()
}


def decode_event(body: str | bytes | dict[str, Any], seq: int | None = None) -> _EventBase:
    """Rebuild an event from its stored JSON.

    Args:
        body: the JSON text (or dict) written by the EventLog.
        seq: the row's sequence number, set on the returned event.

    Returns:
        The event model instance.

    Raises:
        EventDecodeError: unknown type, a version newer than this code, or invalid fields.

    Example:
        >>> ev = decode_event('{"type": "agent.ready", "version": 1, "ts": 0, "agent_id": "a"}')
        >>> ev.agent_id
        'a'
    """
    data = json.loads(body) if isinstance(body, (str, bytes)) else dict(body)
    kind = data.get("type")
    cls = EVENT_TYPES.get(kind)  # type: ignore[arg-type]
    if cls is None:
        raise EventDecodeError(
            f"unknown event type {kind!r}; known: {sorted(EVENT_TYPES)}. "
            "Was the log written by a newer hive? Upgrade hive to read it.",
            event_type=kind, seq=seq,
        )
    known = cls.model_fields["version"].default
    if int(data.get("version", 1)) > known:
        raise EventDecodeError(
            f"event {kind!r} has version {data.get('version')}, this hive reads up to {known}; "
            "upgrade hive to read this log.",
            event_type=kind, seq=seq,
        )
    if seq is not None:
        data["seq"] = seq
    try:
        return _ADAPTER.validate_json(json.dumps(data))
    except ValidationError as exc:
        raise EventDecodeError(f"event {kind!r} (seq {seq}) does not validate: {exc}", event_type=kind, seq=seq) from exc

"""The Coordinator's durable state, folded from events.

Every change the Coordinator makes to its registry or task table is an event: it is
applied here and appended to the EventLog. A restarted Coordinator replays the log through
the same ``apply`` and gets the same registry and pending tasks back. Run-time only things
(actor handles, futures, heartbeats) live in the Coordinator, not here.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from hive import _events as ev
from hive._lifecycle import AgentState
from hive._tasks import TaskStatus

__all__ = ["AgentRecord", "ClusterState", "TaskRecord"]


@dataclass
class AgentRecord:
    """One agent id in the registry (survives restarts of its actor)."""

    agent_id: str  # stable id, kept across restarts
    kind: str  # agent kind (class attribute ``kind``)
    actor_name: str  # Ray actor name of the first incarnation
    capabilities: frozenset[str]  # task types it handles
    resources: dict[str, float]  # what it offers / reserved from Ray
    max_concurrency: int  # tasks it runs at once
    spec: bytes  # cloudpickled (class, args, kwargs) to spawn it again
    respawn_max: int  # restarts allowed
    state: AgentState = AgentState.SPAWNING  # lifecycle state
    restarts: int = 0  # how many times it was restarted
    checkpoint_path: str | None = None  # last checkpoint written
    spawned_ts: float = 0.0  # when the agent id was first spawned
    node_id: str | None = None  # preferred Ray node, if any

    @property
    def incarnation_name(self) -> str:
        """Ray actor name of the current incarnation."""
        return self.actor_name if self.restarts == 0 else f"{self.actor_name}-r{self.restarts}"


@dataclass
class TaskRecord:
    """One task in the task table."""

    task_id: str  # unique id
    type: str  # task type
    payload: bytes  # pickled payload
    idempotency_key: str  # de-duplication key, stable across attempts
    resources: dict[str, float]  # resources the agent must offer
    critical: bool  # only trusted agents may run it
    cross_check: bool  # re-run results of low-reputation agents
    max_attempts: int  # attempts before dead-lettering
    submitted_ts: float  # submission time
    status: TaskStatus = TaskStatus.QUEUED  # where it is
    attempt: int = 0  # attempts started so far
    agent_id: str | None = None  # agent of the current / last attempt
    causes: list[str] = field(default_factory=list)  # why earlier attempts failed
    result: bytes = b""  # pickled result when completed
    error: str = ""  # "Type: message" when failed
    traceback: str = ""  # remote traceback when failed
    exception: bytes | None = None  # pickled exception when failed
    finished_ts: float | None = None  # when it reached a final status

    def public(self, with_result: bool = False) -> dict[str, Any]:
        """A plain dict for callers (result bytes only when asked)."""
        out: dict[str, Any] = {
            "task_id": self.task_id, "type": self.type, "status": self.status.value,
            "attempt": self.attempt, "agent_id": self.agent_id, "idempotency_key": self.idempotency_key,
            "causes": list(self.causes), "error": self.error, "critical": self.critical,
            "submitted_ts": self.submitted_ts, "finished_ts": self.finished_ts,
        }
        if with_result:
            out.update(result=self.result, traceback=self.traceback, exception=self.exception)
        return out


class ClusterState:
    """Registry + task table, changed only by ``apply(event)``."""

    def __init__(self) -> None:
        self.agents: dict[str, AgentRecord] = {}
        self.tasks: dict[str, TaskRecord] = {}
        self.by_key: dict[str, str] = {}  # idempotency key -> task id
        self.queue: OrderedDict[str, None] = OrderedDict()  # queued task ids, FIFO
        self.events_applied = 0

    def apply(self, e: Any) -> None:
        """Fold one event into the state (unknown-to-state events are ignored)."""
        self.events_applied += 1
        handler = getattr(self, "_on_" + e.type.replace(".", "_"), None)
        if handler is not None:
            handler(e)

    # agents
    def _on_agent_spawned(self, e: ev.AgentSpawned) -> None:
        self.agents[e.agent_id or ""] = AgentRecord(
            agent_id=e.agent_id or "", kind=e.kind, actor_name=e.actor_name, capabilities=frozenset(e.capabilities),
            resources=dict(e.resources), max_concurrency=e.max_concurrency, spec=e.spec, respawn_max=e.respawn_max,
            spawned_ts=e.ts, node_id=e.node_id)

    def _set_agent(self, e: Any, state: AgentState) -> None:
        rec = self.agents.get(e.agent_id or "")
        if rec is not None:
            rec.state = state

    def _on_agent_ready(self, e: ev.AgentReady) -> None:
        self._set_agent(e, AgentState.READY)

    def _on_agent_suspended(self, e: ev.AgentSuspended) -> None:
        self._set_agent(e, AgentState.SUSPENDED)

    def _on_agent_resumed(self, e: ev.AgentResumed) -> None:
        self._set_agent(e, AgentState.READY)

    def _on_agent_terminated(self, e: ev.AgentTerminated) -> None:
        self._set_agent(e, AgentState.TERMINATED)

    def _on_agent_failed(self, e: ev.AgentFailed) -> None:
        self._set_agent(e, AgentState.FAILED)

    def _on_agent_restarted(self, e: ev.AgentRestarted) -> None:
        rec = self.agents.get(e.agent_id or "")
        if rec is not None:
            rec.state, rec.restarts = AgentState.SPAWNING, e.restart

    def _on_checkpoint_created(self, e: ev.CheckpointCreated) -> None:
        rec = self.agents.get(e.agent_id or "")
        if rec is not None:
            rec.checkpoint_path = e.path

    # tasks
    def _on_task_submitted(self, e: ev.TaskSubmitted) -> None:
        tid = e.task_id or ""
        self.tasks[tid] = TaskRecord(
            task_id=tid, type=e.task_type, payload=e.payload, idempotency_key=e.idempotency_key,
            resources=dict(e.resources), critical=e.critical, cross_check=e.cross_check,
            max_attempts=e.max_attempts, submitted_ts=e.ts)
        self.by_key[e.idempotency_key] = tid
        self.queue[tid] = None

    def _on_task_started(self, e: ev.TaskStarted) -> None:
        rec = self.tasks.get(e.task_id or "")
        if rec is not None and e.role == "primary":
            rec.status, rec.attempt, rec.agent_id = TaskStatus.RUNNING, e.attempt, e.agent_id
            self.queue.pop(rec.task_id, None)

    def _finish(self, tid: str, status: TaskStatus, ts: float) -> TaskRecord | None:
        rec = self.tasks.get(tid)
        if rec is not None:
            rec.status, rec.finished_ts = status, ts
            self.queue.pop(tid, None)
        return rec

    def _on_task_completed(self, e: ev.TaskCompleted) -> None:
        rec = self._finish(e.task_id or "", TaskStatus.COMPLETED, e.ts)
        if rec is not None:
            rec.result, rec.agent_id = e.result, e.agent_id or rec.agent_id

    def _on_task_failed(self, e: ev.TaskFailed) -> None:
        rec = self._finish(e.task_id or "", TaskStatus.FAILED, e.ts)
        if rec is not None:
            rec.error, rec.traceback, rec.exception = e.error, e.traceback, e.exception

    def _on_task_retried(self, e: ev.TaskRetried) -> None:
        rec = self.tasks.get(e.task_id or "")
        if rec is not None:
            rec.status = TaskStatus.QUEUED
            rec.causes.append(e.cause)
            self.queue[rec.task_id] = None
            self.queue.move_to_end(rec.task_id, last=False)  # retries go first

    def _on_task_dead_lettered(self, e: ev.TaskDeadLettered) -> None:
        rec = self._finish(e.task_id or "", TaskStatus.DEAD_LETTERED, e.ts)
        if rec is not None:
            rec.causes = list(e.causes)

    def _on_task_cancelled(self, e: ev.TaskCancelled) -> None:
        self._finish(e.task_id or "", TaskStatus.CANCELLED, e.ts)

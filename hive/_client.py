"""The caller's side: a Client wraps the Coordinator actor handle.

Client code never imports Coordinator internals; it talks to the actor through Ray calls
and turns errors raised there back into the original hive exceptions.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import ray
from ray.exceptions import RayTaskError

from hive._config import HiveConfig
from hive._eventlog import EventLog
from hive._exceptions import HiveError, TaskTimeoutError
from hive._tasks import TaskHandle, TaskSpec, TaskStatus, pack_payload, unpack_record

__all__ = ["Client"]


def _call(method: Any, *args: Any, timeout: float | None = None, **kwargs: Any) -> Any:
    """Call a Coordinator method and re-raise hive errors as themselves (not RayTaskError)."""
    try:
        return ray.get(method.remote(*args, **kwargs), timeout=timeout)
    except RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, HiveError):
            raise cause from None
        raise


class Client:
    """Submit tasks, spawn agents, and inspect the cluster.

    Get one from ``hive.init()``; ``hive.client()`` returns the current one.

    Example:
        >>> # client = hive.init(); client.spawn(hive.testing.EchoAgent, count=2)
        >>> # client.submit("echo", "hi").result()
    """

    def __init__(self, coordinator: Any, config: HiveConfig) -> None:
        self.coordinator = coordinator
        self.config = config

    # agents
    def spawn(self, cls: type, count: int = 1, *args: Any, resources: dict[str, float] | None = None,
              node_id: str | None = None, **kwargs: Any) -> list[str]:
        """Start ``count`` agents of an Agent subclass and wait until they are ready.

        Args:
            cls: a ``hive.Agent`` subclass.
            count: how many.
            *args, **kwargs: passed to ``cls(...)`` in each actor.
            resources: override the class's declared resources.
            node_id: prefer this Ray node (soft affinity: a restart may land elsewhere).

        Returns:
            The new agent ids.

        Raises:
            AgentSpawnError: an actor failed to start (the message says why).
        """
        from hive._agent import Agent

        if not (isinstance(cls, type) and issubclass(cls, Agent)):
            raise HiveError(f"spawn() needs a hive.Agent subclass, got {cls!r}", setting="cls")
        return _call(self.coordinator.spawn, cls, args, kwargs, count, resources, node_id)

    def agent_handle(self, agent_id: str) -> Any:
        """The Ray actor handle of an agent's live incarnation, or None while it is down/restarting.

        For packages built on hive that call their agents' own methods directly (e.g. pipeline
        stages passing activations to each other).
        """
        return _call(self.coordinator.agent_handle, agent_id)

    def report_lost(self, agent_id: str, cause: str) -> bool:
        """Tell the Coordinator an agent's actor died (it checks, then restarts it at once)."""
        return _call(self.coordinator.report_lost, agent_id, cause)

    def agents(self) -> list[dict[str, Any]]:
        """The registry: one dict per agent (state, reputation, load, node, ...)."""
        return _call(self.coordinator.agents)

    def suspend(self, agent_id: str) -> str:
        """Suspend an agent (checkpointed; takes no new tasks)."""
        return _call(self.coordinator.suspend_agent, agent_id)

    def resume(self, agent_id: str) -> str:
        """Resume a suspended agent."""
        return _call(self.coordinator.resume_agent, agent_id)

    def terminate(self, agent_id: str) -> None:
        """Stop an agent gracefully (running tasks finish or move elsewhere)."""
        _call(self.coordinator.terminate_agent, agent_id)

    def checkpoint(self, agent_id: str) -> dict[str, Any] | None:
        """Checkpoint an agent now; returns path, sha256, size (None if it has no state)."""
        return _call(self.coordinator.checkpoint_agent, agent_id)

    # tasks
    def submit(self, task_type: str, payload: Any = None, *, resources: dict[str, float] | None = None,
               critical: bool = False, cross_check: bool = True, max_attempts: int | None = None,
               idempotency_key: str | None = None) -> TaskHandle:
        """Submit one task; returns once the Coordinator has durably accepted it.

        Args:
            task_type: a type some agent declares with ``@hive.handler``.
            payload: any picklable value handed to the handler.
            resources: what the agent must offer, e.g. ``{"GPU": 1}``.
            critical: run only on agents at or above the critical reputation threshold.
            cross_check: allow re-running on a second agent when the first has low reputation.
            max_attempts: attempts before dead-lettering (default HiveConfig.max_attempts).
            idempotency_key: re-submitting a key returns the original task instead of a new one.

        Returns:
            A TaskHandle (``result()``, ``status()``, ``cancel()``).

        Raises:
            UnknownTaskTypeError, UnsatisfiableTaskError, PayloadNotSerializableError, QueueFullError.

        Example:
            >>> # hive.client().submit("echo", {"x": 1}).result(timeout=30)
        """
        spec = TaskSpec(type=task_type, payload=pack_payload(payload, task_type), resources=resources or {},
                        critical=critical, cross_check=cross_check, max_attempts=max_attempts,
                        idempotency_key=idempotency_key or "")
        return self.submit_specs([spec])[0]

    def submit_many(self, task_type: str, payloads: Iterable[Any], **options: Any) -> list[TaskHandle]:
        """Submit one task per payload in a single round trip (same options for all)."""
        specs = [TaskSpec(type=task_type, payload=pack_payload(p, task_type), **options) for p in payloads]
        return self.submit_specs(specs)

    def submit_specs(self, specs: Sequence[TaskSpec]) -> list[TaskHandle]:
        """Submit prepared TaskSpecs (payloads already packed) in one round trip."""
        ids = _call(self.coordinator.submit_many, list(specs))
        return [TaskHandle(tid, self, s.type) for tid, s in zip(ids, specs)]

    def gather(self, handles: Sequence[TaskHandle], timeout: float | None = None) -> list[Any]:
        """Wait for several tasks; returns their values in order, raising the first failure.

        Raises:
            TaskTimeoutError: some task was not final within ``timeout`` seconds.
        """
        ids = [h.task_id for h in handles]
        records = _call(self.coordinator.wait, ids, timeout, timeout=None if timeout is None else timeout + 30)
        pending = [r["task_id"] for r in records if not TaskStatus(r["status"]).final]
        if pending:
            raise TaskTimeoutError(f"{len(pending)} task(s) not finished after {timeout}s: {pending[:5]}",
                                   task_ids=pending)
        return [unpack_record(r) for r in records]

    def task_info(self, task_id: str) -> dict[str, Any]:
        """The Coordinator's record of a task (status, attempts, agent, causes)."""
        return _call(self.coordinator.task_info, task_id)

    def cancel(self, task_id: str) -> bool:
        """Cancel a task; False if it had already finished."""
        return _call(self.coordinator.cancel, task_id)

    # cluster
    def status(self) -> dict[str, Any]:
        """Agent and task counts, queue depth, scheduling latency, paths."""
        return _call(self.coordinator.status)

    def events(self, **filters: Any) -> list[Any]:
        """Query the EventLog (same filters as ``EventLog.query``)."""
        with EventLog(self.config.events_path, readonly=True) as log:
            return log.query(**filters)

    def record_event(self, event: Any) -> int:
        """Append an event model (or its dict) through the Coordinator; returns its seq."""
        body = event.model_dump_json() if hasattr(event, "model_dump_json") else dict(event)
        return _call(self.coordinator.record_event, body)

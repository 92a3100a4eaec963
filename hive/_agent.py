"""The Agent base class: every long-lived hive actor derives from it.

An Agent is a plain class turned into a Ray actor by the Coordinator (``Client.spawn``).
Subclasses declare task handlers with ``@hive.handler("type")`` (these are the agent's
capabilities), the resources they offer, and optionally ``checkpoint()`` / ``restore()``.
The ``_hive_*`` methods are the Coordinator's control surface; users do not call them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import cloudpickle

from hive._config import COORDINATOR_NAME, NAMESPACE
from hive._exceptions import UnknownTaskTypeError
from hive._lifecycle import AgentState, check_transition
from hive._tasks import _CURRENT, TaskContext, TaskEnvelope, TaskOutcome

__all__ = ["Agent", "RespawnPolicy"]

log = logging.getLogger("hive.agent")


@dataclass(frozen=True)
class RespawnPolicy:
    """How the Coordinator restarts an agent kind that died."""

    max_restarts: int = 3  # restarts per agent id before it stays failed; 0 = never restart
    restore_checkpoint: bool = True  # pass the last checkpoint to restore() on restart


class Agent:
    """Base class of every long-lived hive actor.

    Class attributes a subclass may set:
        kind: name of the agent kind (default: the class name).
        resources: what one agent offers and reserves from Ray, e.g. ``{"CPU": 1, "GPU": 1}``.
        max_concurrency: tasks one agent runs at once.
        respawn: the RespawnPolicy for this kind.

    Example:
        >>> import hive
        >>> class Echo(hive.Agent):
        ...     @hive.handler("echo")
        ...     def echo(self, payload):
        ...         return payload
        >>> sorted(Echo.capabilities())
        ['echo']
    """

    kind: ClassVar[str] = ""
    resources: ClassVar[dict[str, float]] = {}
    max_concurrency: ClassVar[int] = 1
    respawn: ClassVar[RespawnPolicy] = RespawnPolicy()
    idempotency_cache_size: ClassVar[int] = 4096  # completed keys remembered for replays
    # Ray concurrency groups (name -> threads) for methods marked @ray.method(concurrency_group=...);
    # e.g. {"compute": 1} runs those methods one at a time, in call order, beside the control calls.
    concurrency_groups: ClassVar[dict[str, int]] = {}

    _handlers: ClassVar[dict[str, str]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        handlers: dict[str, str] = {}
        for klass in reversed(cls.__mro__):
            for name, attr in vars(klass).items():
                task_type = getattr(attr, "_hive_task_type", None)
                if task_type:
                    handlers[task_type] = name
        cls._handlers = handlers
        if not cls.kind:
            cls.kind = cls.__name__

    @classmethod
    def capabilities(cls) -> frozenset[str]:
        """The task types this kind handles."""
        return frozenset(cls._handlers)

    # ---- hooks for subclasses ------------------------------------------------------------

    def checkpoint(self) -> Any:
        """Return state to persist (any picklable object), or None for nothing."""
        return None

    def restore(self, state: Any) -> None:
        """Receive the state returned by the last ``checkpoint()`` after a restart."""

    def on_start(self) -> None:
        """Called once the agent is bound to hive, before it turns ready."""

    def on_stop(self) -> None:
        """Called before the agent terminates."""

    # ---- properties available inside the actor ------------------------------------------

    @property
    def agent_id(self) -> str:
        """This agent's id (set when the Coordinator starts it)."""
        return self.__dict__.get("_hive_agent_id", "")

    @property
    def state(self) -> AgentState:
        """The lifecycle state as the agent sees it."""
        return self.__dict__.get("_hive_state", AgentState.SPAWNING)

    # ---- control surface (called by the Coordinator) --------------------------------------

    def _hive_start(self, agent_id: str, heartbeat_interval_s: float, checkpoint_path: str | None) -> dict[str, Any]:
        import ray

        self._hive_agent_id = agent_id
        self._hive_lock = threading.Lock()
        self._hive_state = AgentState.SPAWNING
        self._hive_running = 0
        self._hive_done: OrderedDict[str, TaskOutcome] = OrderedDict()
        self._hive_stop = threading.Event()
        self._hive_hb_paused = threading.Event()
        restored = None
        if checkpoint_path and type(self).respawn.restore_checkpoint and Path(checkpoint_path).exists():
            self.restore(cloudpickle.loads(Path(checkpoint_path).read_bytes()))
            restored = checkpoint_path
        self.on_start()
        self._set_state(AgentState.READY)
        hb = threading.Thread(target=self._hive_heartbeat_loop, args=(heartbeat_interval_s,), daemon=True, name="hive-heartbeat")
        hb.start()
        return {
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "restored_from": restored,
        }

    def _set_state(self, target: AgentState) -> None:
        self._hive_state = check_transition(self.agent_id, self._hive_state, target)

    def _hive_heartbeat_loop(self, interval: float) -> None:
        import ray

        coord = None
        while not self._hive_stop.wait(interval):
            if self._hive_hb_paused.is_set():
                continue
            try:
                if coord is None:
                    coord = ray.get_actor(COORDINATOR_NAME, namespace=NAMESPACE)
                coord.heartbeat.remote(self.agent_id, self._hive_state.value, self._hive_running)
            except Exception:
                coord = None

    def _hive_run(self, envelope: TaskEnvelope) -> TaskOutcome:
        started = time.perf_counter()
        cached = self._hive_done.get(envelope.idempotency_key) if envelope.role == "primary" else None
        if cached is not None:
            return cached.model_copy(update={"task_id": envelope.task_id, "deduplicated": True, "latency_s": 0.0})
        method = self._handlers.get(envelope.type)
        if method is None:
            raise UnknownTaskTypeError(
                f"agent {self.agent_id} ({self.kind}) has no handler for {envelope.type!r}; it handles {sorted(self._handlers)}",
                agent_id=self.agent_id, task_type=envelope.type)
        with self._hive_lock:
            if self._hive_state is AgentState.READY:
                self._set_state(AgentState.BUSY)
            self._hive_running += 1
        token = _CURRENT.set(TaskContext(task_id=envelope.task_id, idempotency_key=envelope.idempotency_key,
                                         attempt=envelope.attempt, agent_id=self.agent_id, role=envelope.role))
        try:
            payload = cloudpickle.loads(envelope.payload)
            value = getattr(self, method)(payload)
            outcome = TaskOutcome(task_id=envelope.task_id, agent_id=self.agent_id, ok=True,
                                  result=cloudpickle.dumps(value), latency_s=time.perf_counter() - started)
        except Exception as exc:
            try:
                pickled: bytes | None = cloudpickle.dumps(exc)
            except Exception:
                pickled = None
            outcome = TaskOutcome(task_id=envelope.task_id, agent_id=self.agent_id, ok=False,
                                  error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc(),
                                  exception=pickled, latency_s=time.perf_counter() - started)
        finally:
            _CURRENT.reset(token)
            with self._hive_lock:
                self._hive_running -= 1
                if self._hive_running == 0 and self._hive_state is AgentState.BUSY:
                    self._set_state(AgentState.READY)
        if outcome.ok and envelope.role == "primary":
            self._hive_done[envelope.idempotency_key] = outcome
            while len(self._hive_done) > self.idempotency_cache_size:
                self._hive_done.popitem(last=False)
        return outcome

    def _hive_run_many(self, envelopes: list[TaskEnvelope]) -> list[TaskOutcome]:
        return [self._hive_run(e) for e in envelopes]

    def _hive_checkpoint(self, path: str) -> dict[str, Any] | None:
        state = self.checkpoint()
        if state is None:
            return None
        data = cloudpickle.dumps(state)
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".tmp")
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        return {"path": str(target), "sha256": hashlib.sha256(data).hexdigest(), "size_bytes": len(data)}

    def _hive_suspend(self) -> str:
        with self._hive_lock:
            self._set_state(AgentState.SUSPENDED)
        return self._hive_state.value

    def _hive_resume(self) -> str:
        with self._hive_lock:
            self._set_state(AgentState.READY)
            if self._hive_running:
                self._set_state(AgentState.BUSY)
        return self._hive_state.value

    def _hive_terminate(self) -> str:
        try:
            self.on_stop()
        finally:
            self._hive_stop.set()
            with self._hive_lock:
                if not self._hive_state.terminal:
                    self._set_state(AgentState.TERMINATED)
        return self._hive_state.value

    def _hive_info(self) -> dict[str, Any]:
        return {"agent_id": self.agent_id, "state": self._hive_state.value, "running": self._hive_running, "pid": os.getpid()}

    def _hive_pause_heartbeats(self, paused: bool = True) -> None:
        """Test hook: stop (or restart) heartbeats to simulate a hung agent."""
        if paused:
            self._hive_hb_paused.set()
        else:
            self._hive_hb_paused.clear()


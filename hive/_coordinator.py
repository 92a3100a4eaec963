"""The Coordinator: a named, restartable Ray actor that owns the registry and the task queue.

It matches tasks to agents (capability, resources, reputation-weighted load), runs each
attempt on an agent's actor, notices dead agents (actor death, missed heartbeats), restarts
them per their kind's RespawnPolicy, retries their in-flight tasks under the same
idempotency key and dead-letters a task once its attempts run out. Every change is an event:
it is applied to ``ClusterState`` and group-committed to the EventLog, and a task's
submission is acknowledged (and its result released) only once its event is durable. A
restarted Coordinator rebuilds registry and queue by replaying the log.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import statistics
import time
import uuid
from collections import defaultdict, deque
from typing import Any

import cloudpickle
import ray
from ray.exceptions import RayActorError

from hive import _events as ev
from hive._config import NAMESPACE, HiveConfig
from hive._eventlog import EventLog
from hive._exceptions import (
    AgentNotFoundError,
    AgentSpawnError,
    HiveError,
    QueueFullError,
    TaskNotFoundError,
    UnknownTaskTypeError,
    UnsatisfiableTaskError,
)
from hive._lifecycle import AgentState
from hive._matching import AgentView, TaskDemand, choose_agent, unmet_reason
from hive._reputation import ReputationBook, ReputationPolicy
from hive._state import AgentRecord, ClusterState, TaskRecord
from hive._tasks import TaskEnvelope, TaskOutcome, TaskSpec, TaskStatus

__all__ = ["Coordinator"]

log = logging.getLogger("hive.coordinator")

_SPAWN_TIMEOUT_S = 180.0  # an agent that is not ready after this long failed to spawn
_BATCH_BELOW_S = 0.002  # task types faster than this (median) may share one actor call
_BATCH_MAX = 32  # most tasks carried by one actor call


def _same_result(a: bytes, b: bytes) -> bool:
    """Whether two pickled results are equal (by value when they unpickle and compare)."""
    if a == b:
        return True
    try:
        x, y = cloudpickle.loads(a), cloudpickle.loads(b)
        eq = x == y
        return bool(eq.all()) if hasattr(eq, "all") else bool(eq)
    except Exception:
        return False


def _actor_options(resources: dict[str, float]) -> dict[str, Any]:
    """Ray actor options that reserve an agent's declared resources."""
    custom = {k: v for k, v in resources.items() if k not in ("CPU", "GPU", "memory")}
    opts: dict[str, Any] = {"num_cpus": resources.get("CPU", 0), "num_gpus": resources.get("GPU", 0)}
    if custom:
        opts["resources"] = custom
    if "memory" in resources:
        opts["memory"] = resources["memory"]
    return opts


class Coordinator:
    """Registry, queue and fault handling. Create it through ``hive.init()``, not directly."""

    def __init__(self, config: HiveConfig) -> None:
        self.config = config
        self.log = EventLog(config.events_path, durability=config.durability,
                            busy_timeout_s=config.event_busy_timeout_s)
        self.state = ClusterState()
        self.book = ReputationBook(ReputationPolicy(
            half_life_s=config.reputation_half_life_s, critical_threshold=config.critical_threshold,
            cross_check_threshold=config.cross_check_threshold))
        replayed = 0
        for event in self.log.iter_events():
            self.state.apply(event)
            self._replay_reputation(event)
            replayed += 1
        self._replayed = replayed
        self.handles: dict[str, Any] = {}  # agent id -> actor handle of the live incarnation
        self.node: dict[str, dict[str, Any]] = {}  # agent id -> pid, node id
        self.calls: dict[str, dict[int, list[str]]] = defaultdict(dict)  # agent id -> call id -> task ids in it
        self._call_ids = 0
        self.inflight: dict[str, tuple[str, int, Any]] = {}  # task id -> (agent id, attempt, ObjectRef)
        self.last_hb: dict[str, float] = {}  # agent id -> monotonic time of last heartbeat
        self.waiters: dict[str, list[asyncio.Future[None]]] = defaultdict(list)
        self.submit_t: dict[str, float] = {}  # task id -> monotonic submit time (for scheduling latency)
        self.sched_latency: deque[float] = deque(maxlen=100_000)
        self.degraded: str | None = None  # last EventLog error while it persists
        self._pending: list[tuple[Any, asyncio.Future[None], bool]] = []
        self._flush_scheduled = False
        self._journal_stats = {"batches": 0, "events": 0}
        self._started = False
        self._start_lock: asyncio.Lock | None = None
        self._wake: asyncio.Event | None = None
        self._bg: list[asyncio.Task[Any]] = []
        self._started_at = time.time()

    def _replay_reputation(self, e: Any) -> None:
        if isinstance(e, ev.TaskCompleted) and e.agent_id and not e.deduplicated:
            rec = self.state.tasks.get(e.task_id or "")
            self.book.record_outcome(e.agent_id, rec.type if rec else "?", True, e.latency_s, now=e.ts)
        elif isinstance(e, ev.TaskFailed) and e.agent_id:
            rec = self.state.tasks.get(e.task_id or "")
            self.book.record_outcome(e.agent_id, rec.type if rec else "?", False, 0.0, now=e.ts)
        elif isinstance(e, ev.TaskCrossChecked) and e.outvoted:
            self.book.record_disagreement(e.outvoted, now=e.ts)

    # ---- journal: apply + group commit ---------------------------------------------------

    def _emit(self, event: Any) -> asyncio.Future[None]:
        """Apply an event now and queue it for the next group commit; await for durability."""
        self.state.apply(event)
        return self._journal(event, admission=False)

    def _journal(self, event: Any, admission: bool) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._pending.append((event, fut, admission))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return fut

    def _flush(self) -> None:
        self._flush_scheduled = False
        batch, self._pending = self._pending, []
        if not batch:
            return
        try:
            self.log.append_many([e for e, _, _ in batch])
        except HiveError as exc:
            # Admissions fail back to their callers (nothing was acknowledged); every other
            # event stays queued and is retried, so nothing already applied is lost.
            self.degraded = str(exc)
            log.error("event log write failed, will retry: %s", exc)
            keep = []
            for e, fut, admission in batch:
                if admission:
                    if not fut.done():
                        fut.set_exception(exc)
                else:
                    keep.append((e, fut, admission))
            self._pending = keep + self._pending
            if self._pending:
                asyncio.get_running_loop().call_later(0.5, self._schedule_flush)
            return
        self.degraded = None
        self._journal_stats["batches"] += 1
        self._journal_stats["events"] += len(batch)
        for _, fut, _ in batch:
            if not fut.done():
                fut.set_result(None)

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    # ---- start-up and recovery -------------------------------------------------------------

    async def _ensure_started(self) -> None:
        if self._started:
            return
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if self._started:
                return
            self._wake = asyncio.Event()
            await self._recover()
            self._bg.append(asyncio.create_task(self._dispatch_loop()))
            self._bg.append(asyncio.create_task(self._monitor_loop()))
            self._started = True

    async def _recover(self) -> None:
        """After a restart: requeue attempts that were in flight, re-attach or respawn agents."""
        for rec in list(self.state.tasks.values()):
            if rec.status is TaskStatus.RUNNING:
                self._retry_or_dead_letter(rec, f"attempt {rec.attempt} on agent {rec.agent_id}: coordinator restarted")
        live = [r for r in self.state.agents.values() if not r.state.terminal]
        await asyncio.gather(*(self._reattach(r) for r in live))
        await self._emit(ev.CoordinatorStarted(
            replayed_events=self._replayed, pending_tasks=len(self.state.queue), agents=len(live)))

    async def _reattach(self, rec: AgentRecord) -> None:
        try:
            handle = ray.get_actor(rec.incarnation_name, namespace=NAMESPACE)
            info = await asyncio.wait_for(handle._hive_info.remote(), timeout=10)
            self.handles[rec.agent_id] = handle
            self.node[rec.agent_id] = {"pid": info["pid"]}
            self.last_hb[rec.agent_id] = time.monotonic()
        except Exception as exc:
            await self._agent_lost(rec.agent_id, f"not reachable after coordinator restart ({type(exc).__name__})")

    # ---- agents ---------------------------------------------------------------------------

    async def spawn(self, cls: type, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None,
                    count: int = 1, resources: dict[str, float] | None = None,
                    node_id: str | None = None) -> list[str]:
        """Create ``count`` agents of ``cls`` and wait until they are ready; returns their ids."""
        await self._ensure_started()
        if count < 1:
            raise HiveError(f"count must be >= 1, got {count}", setting="count")
        res = dict(cls.resources if resources is None else resources)  # type: ignore[attr-defined]
        spec = cloudpickle.dumps((cls, tuple(args), dict(kwargs or {})))
        ids = []
        for _ in range(count):
            aid = f"{cls.kind.lower()}-{uuid.uuid4().hex[:8]}"  # type: ignore[attr-defined]
            spawned = ev.AgentSpawned(
                agent_id=aid, kind=cls.kind, actor_name=f"hive-agent-{aid}",  # type: ignore[attr-defined]
                capabilities=sorted(cls.capabilities()), resources=res,  # type: ignore[attr-defined]
                max_concurrency=cls.max_concurrency, spec=spec,  # type: ignore[attr-defined]
                respawn_max=cls.respawn.max_restarts, node_id=node_id)  # type: ignore[attr-defined]
            self._emit(spawned)
            self._emit(ev.ResourceAllocated(agent_id=aid, resources=res))
            ids.append(aid)
        results = await asyncio.gather(*(self._start_incarnation(self.state.agents[a]) for a in ids),
                                       return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise errors[0]
        return ids

    async def _start_incarnation(self, rec: AgentRecord) -> None:
        cls, args, kwargs = cloudpickle.loads(rec.spec)
        opts = _actor_options(rec.resources)
        groups = getattr(cls, "concurrency_groups", None)
        actor_cls = ray.remote(concurrency_groups=dict(groups))(cls) if groups else ray.remote(cls)  # type: ignore[call-overload]
        if rec.node_id:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(rec.node_id, soft=True)
        try:
            handle = actor_cls.options(
                name=rec.incarnation_name, namespace=NAMESPACE, lifetime="detached",
                max_concurrency=rec.max_concurrency + 2, max_restarts=0, **opts,
            ).remote(*args, **kwargs)
            info = await asyncio.wait_for(
                handle._hive_start.remote(rec.agent_id, self.config.heartbeat_interval_s, rec.checkpoint_path),
                timeout=_SPAWN_TIMEOUT_S)
        except Exception as exc:
            self._emit(ev.AgentFailed(agent_id=rec.agent_id, cause=f"spawn failed: {exc}", will_restart=False))
            self._emit(ev.ResourceReleased(agent_id=rec.agent_id, resources=rec.resources))
            raise AgentSpawnError(
                f"agent {rec.agent_id} ({rec.kind}) did not start: {type(exc).__name__}: {exc}. "
                f"Check that the cluster has the resources {rec.resources} free (`hive status`) and that "
                "the agent's __init__/restore() do not raise.", agent_id=rec.agent_id) from exc
        self.handles[rec.agent_id] = handle
        self.node[rec.agent_id] = {"pid": info["pid"], "node_id": info["node_id"]}
        self.last_hb[rec.agent_id] = time.monotonic()
        await self._emit(ev.AgentReady(agent_id=rec.agent_id, restored_from=info.get("restored_from")))
        self._poke()

    async def _agent_lost(self, agent_id: str, cause: str) -> None:
        """An agent's actor died or went silent: fail it, retry its tasks, maybe respawn."""
        rec = self.state.agents.get(agent_id)
        if rec is None or rec.state.terminal:
            return
        will_restart = rec.restarts < rec.respawn_max
        self._emit(ev.AgentFailed(agent_id=agent_id, cause=cause, will_restart=will_restart))
        self._emit(ev.ResourceReleased(agent_id=agent_id, resources=rec.resources))
        handle = self.handles.pop(agent_id, None)
        if handle is not None:
            try:
                ray.kill(handle, no_restart=True)
            except Exception:
                pass
        self.last_hb.pop(agent_id, None)
        for tid in [t for call in self.calls.pop(agent_id, {}).values() for t in call]:
            current = self.inflight.get(tid)
            task = self.state.tasks.get(tid)
            if current is None or current[0] != agent_id or task is None or task.status.final:
                continue
            self.inflight.pop(tid, None)
            self._retry_or_dead_letter(task, f"attempt {current[1]} on agent {agent_id}: {cause}")
        self._poke()
        if will_restart:
            self._bg.append(asyncio.create_task(self._respawn(rec)))

    async def _respawn(self, rec: AgentRecord) -> None:
        self._emit(ev.AgentRestarted(agent_id=rec.agent_id, restart=rec.restarts + 1))
        self._emit(ev.ResourceAllocated(agent_id=rec.agent_id, resources=rec.resources))
        try:
            await self._start_incarnation(rec)
        except AgentSpawnError as exc:
            log.error("%s", exc)

    async def report_lost(self, agent_id: str, cause: str) -> bool:
        """Someone calling an agent's actor directly saw it die: handle it now, not at heartbeat timeout.

        Returns True if the agent was live and is now being failed over.
        """
        await self._ensure_started()
        rec = self.state.agents.get(agent_id)
        handle = self.handles.get(agent_id)
        if rec is None or handle is None or rec.state.terminal:
            return False
        try:
            await asyncio.wait_for(handle._hive_info.remote(), timeout=2.0)
            return False  # it answers: not dead
        except Exception:  # noqa: BLE001 - dead or hung: fail it over
            await self._agent_lost(agent_id, f"reported lost: {cause}")
            return True

    async def heartbeat(self, agent_id: str, state: str, running: int) -> None:
        """Called by each agent's heartbeat thread."""
        if agent_id in self.handles:
            self.last_hb[agent_id] = time.monotonic()

    async def _monitor_loop(self) -> None:
        period = min(0.5, self.config.heartbeat_interval_s / 2)
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for aid, seen in list(self.last_hb.items()):
                silent = now - seen
                if silent > self.config.heartbeat_timeout_s:
                    self._emit(ev.AgentHeartbeatMissed(agent_id=aid, silent_for_s=round(silent, 3)))
                    await self._agent_lost(aid, f"missed heartbeats for {silent:.1f}s")

    async def _control(self, agent_id: str) -> tuple[AgentRecord, Any]:
        await self._ensure_started()
        rec = self.state.agents.get(agent_id)
        if rec is None:
            raise AgentNotFoundError(f"no agent {agent_id!r}; see `hive agents` for the ids", agent_id=agent_id)
        handle = self.handles.get(agent_id)
        if handle is None or rec.state.terminal:
            raise AgentNotFoundError(f"agent {agent_id} is {rec.state.value}, not running", agent_id=agent_id)
        return rec, handle

    async def checkpoint_agent(self, agent_id: str) -> dict[str, Any] | None:
        """Ask the agent for its checkpoint and record it; None if it has no state."""
        _, handle = await self._control(agent_id)
        path = self.config.checkpoints_dir / agent_id / f"{int(time.time() * 1000)}.pkl"
        info = await handle._hive_checkpoint.remote(str(path))
        if info is not None:
            await self._emit(ev.CheckpointCreated(agent_id=agent_id, **info))
        return info

    async def suspend_agent(self, agent_id: str) -> str:
        """Stop giving the agent tasks (running ones finish); checkpoints it."""
        _, handle = await self._control(agent_id)
        state = await handle._hive_suspend.remote()
        await self._emit(ev.AgentSuspended(agent_id=agent_id))
        await self.checkpoint_agent(agent_id)
        return state

    async def resume_agent(self, agent_id: str) -> str:
        """Let a suspended agent take tasks again."""
        _, handle = await self._control(agent_id)
        state = await handle._hive_resume.remote()
        await self._emit(ev.AgentResumed(agent_id=agent_id))
        self._poke()
        return state

    async def terminate_agent(self, agent_id: str, timeout_s: float = 30.0) -> None:
        """Gracefully stop an agent: no new tasks, running ones finish (else retried elsewhere)."""
        rec, handle = await self._control(agent_id)
        if rec.state is not AgentState.SUSPENDED:
            await handle._hive_suspend.remote()
            self._emit(ev.AgentSuspended(agent_id=agent_id))
        deadline = time.monotonic() + timeout_s
        while self.calls.get(agent_id) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        try:
            await self.checkpoint_agent(agent_id)
            await asyncio.wait_for(handle._hive_terminate.remote(), timeout=10)
        except Exception as exc:
            log.warning("agent %s did not stop cleanly: %s", agent_id, exc)
        for tid in [t for call in self.calls.pop(agent_id, {}).values() for t in call]:
            task = self.state.tasks.get(tid)
            if task is not None and not task.status.final and self.inflight.pop(tid, None) is not None:
                self._retry_or_dead_letter(task, f"attempt {task.attempt} on agent {agent_id}: agent terminated")
        self.handles.pop(agent_id, None)
        self.last_hb.pop(agent_id, None)
        self._emit(ev.AgentTerminated(agent_id=agent_id))
        await self._emit(ev.ResourceReleased(agent_id=agent_id, resources=rec.resources))
        ray.kill(handle, no_restart=True)
        self._poke()

    async def agent_handle(self, agent_id: str) -> Any:
        """The actor handle of an agent's live incarnation (None while it is down)."""
        await self._ensure_started()
        return self.handles.get(agent_id)

    async def agents(self) -> list[dict[str, Any]]:
        """The registry, one dict per agent id."""
        await self._ensure_started()
        now = time.monotonic()
        out = []
        for rec in self.state.agents.values():
            hb = self.last_hb.get(rec.agent_id)
            out.append({
                "agent_id": rec.agent_id, "kind": rec.kind, "state": rec.state.value,
                "capabilities": sorted(rec.capabilities), "resources": rec.resources,
                "outstanding": len(self.calls.get(rec.agent_id, ())), "max_concurrency": rec.max_concurrency,
                "restarts": rec.restarts, "reputation": round(self.book.score(rec.agent_id), 4),
                "autonomy": self.book.level(rec.agent_id).value,
                "heartbeat_age_s": None if hb is None else round(now - hb, 3), **self.node.get(rec.agent_id, {}),
            })
        return out

    # ---- tasks ----------------------------------------------------------------------------

    def _views(self) -> dict[str, AgentView]:
        return {
            r.agent_id: AgentView(agent_id=r.agent_id, kind=r.kind, capabilities=r.capabilities,
                                  resources=r.resources, state=r.state.value,
                                  outstanding=len(self.calls.get(r.agent_id, ())),
                                  max_concurrency=r.max_concurrency)
            for r in self.state.agents.values() if r.agent_id in self.handles or not r.state.terminal
        }

    def _check_satisfiable(self, spec: TaskSpec) -> None:
        views = [v for v in self._views().values() if v.state not in ("terminated", "failed")
                 or self.state.agents[v.agent_id].restarts < self.state.agents[v.agent_id].respawn_max]
        demand = TaskDemand(task_type=spec.type, resources=spec.resources, critical=spec.critical)
        reason = unmet_reason(demand, views, self.book)
        if reason is None:
            return
        known = sorted({c for v in views for c in v.capabilities})
        if spec.type not in known:
            raise UnknownTaskTypeError(
                f"unknown task type {spec.type!r}: no agent handles it (known types: {known}). "
                "Spawn an agent with a @hive.handler for it, or fix the type name.", task_type=spec.type)
        raise UnsatisfiableTaskError(f"task {spec.task_id} cannot run: {reason}", task_type=spec.type)

    async def submit_many(self, specs: list[TaskSpec]) -> list[str]:
        """Admit tasks durably; returns their ids (a known idempotency key returns the first task)."""
        await self._ensure_started()
        fresh: list[TaskSpec] = []
        ids: list[str] = []
        seen: set[str] = set()
        for spec in specs:
            spec = TaskSpec.model_validate(spec)
            known = self.state.by_key.get(spec.idempotency_key)
            if known is not None or spec.idempotency_key in seen:
                ids.append(known or next(s.task_id for s in fresh if s.idempotency_key == spec.idempotency_key))
                continue
            self._check_satisfiable(spec)
            seen.add(spec.idempotency_key)
            fresh.append(spec)
            ids.append(spec.task_id)
        if len(self.state.queue) + len(fresh) > self.config.max_queue:
            raise QueueFullError(
                f"task queue is full ({len(self.state.queue)} queued, limit {self.config.max_queue}); "
                "wait for results before submitting more, add agents, or raise HiveConfig.max_queue",
                queued=len(self.state.queue), max_queue=self.config.max_queue)
        if not fresh:
            return ids
        events = [ev.TaskSubmitted(
            task_id=s.task_id, task_type=s.type, idempotency_key=s.idempotency_key, payload=s.payload,
            resources=s.resources, critical=s.critical, cross_check=s.cross_check,
            max_attempts=s.max_attempts or self.config.max_attempts) for s in fresh]
        futs = [self._journal(e, admission=True) for e in events]
        await asyncio.gather(*futs)
        now = time.monotonic()
        for e in events:
            self.state.apply(e)
            self.submit_t[e.task_id or ""] = now
        self._poke()
        return ids

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def _dispatch_loop(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                self._dispatch_pass()
            except Exception:
                log.exception("dispatch pass failed")

    def _dispatch_pass(self) -> None:
        """Hand queued tasks to agents with free slots.

        A slot is one in-flight call to an agent (``max_concurrency`` per agent). When the queue
        is deeper than the free slots and a task type is cheap (median latency under
        ``_BATCH_BELOW_S``), one call carries several queued tasks of that type, so per-call Ray
        overhead is paid once per batch; expensive tasks always go one per call.
        """
        if not self.state.queue:
            return
        views = {a: v for a, v in self._views().items() if a in self.handles}
        free = sum(max(0, v.max_concurrency - v.outstanding) for v in views.values()
                   if v.state in ("ready", "busy"))
        assigned: set[str] = set()
        for tid in list(self.state.queue):
            if free <= 0:
                break
            if tid in assigned:
                continue
            rec = self.state.tasks[tid]
            demand = TaskDemand(task_type=rec.type, resources=rec.resources, critical=rec.critical)
            aid = choose_agent(demand, list(views.values()), self.book)
            if aid is None:
                continue
            batch = [rec]
            ref_latency = self.book.reference_latency(rec.type)
            if ref_latency is not None and ref_latency < _BATCH_BELOW_S:
                size = min(_BATCH_MAX, -(-(len(self.state.queue) - len(assigned)) // free))
                for other in self.state.queue:
                    if len(batch) >= size:
                        break
                    o = self.state.tasks[other]
                    if (other != tid and other not in assigned and o.type == rec.type
                            and o.resources == rec.resources and o.critical == rec.critical):
                        batch.append(o)
            assigned.update(t.task_id for t in batch)
            self._start_call(batch, aid, "primary")
            views[aid] = dataclasses.replace(views[aid], outstanding=views[aid].outstanding + 1)
            free -= 1

    def _start_call(self, recs: list[TaskRecord], agent_id: str, role: str) -> Any:
        """Start one attempt of each task in ``recs`` on ``agent_id`` in a single actor call."""
        envelopes = []
        now = time.monotonic()
        for rec in recs:
            attempt = rec.attempt + 1 if role == "primary" else rec.attempt
            self._emit(ev.TaskStarted(task_id=rec.task_id, agent_id=agent_id, attempt=attempt,
                                      idempotency_key=rec.idempotency_key, role=role))  # type: ignore[arg-type]
            if role == "primary" and attempt == 1 and rec.task_id in self.submit_t:
                self.sched_latency.append(now - self.submit_t.pop(rec.task_id))
            envelopes.append(TaskEnvelope(task_id=rec.task_id, type=rec.type, payload=rec.payload,
                                          idempotency_key=rec.idempotency_key, attempt=attempt, role=role))  # type: ignore[arg-type]
        self._call_ids += 1
        call_id = self._call_ids
        self.calls[agent_id][call_id] = [r.task_id for r in recs] if role == "primary" else []
        ref = self.handles[agent_id]._hive_run_many.remote(envelopes)
        if role == "primary":
            for rec, env in zip(recs, envelopes):
                self.inflight[rec.task_id] = (agent_id, env.attempt, ref)
            asyncio.create_task(self._await_call(recs, agent_id, call_id, [e.attempt for e in envelopes], ref))
        return call_id, ref

    async def _await_call(self, recs: list[TaskRecord], agent_id: str, call_id: int, attempts: list[int],
                          ref: Any) -> None:
        try:
            outcomes: list[TaskOutcome] = await ref
        except RayActorError as exc:
            await self._agent_lost(agent_id, f"actor died ({type(exc).__name__})")
            return
        except Exception as exc:
            outcomes = [TaskOutcome(task_id=r.task_id, agent_id=agent_id, ok=False,
                                    error=f"{type(exc).__name__}: {exc}", traceback=str(exc)) for r in recs]
        finally:
            self.calls[agent_id].pop(call_id, None)
            self._poke()
        await asyncio.gather(*(self._finish_attempt(r, agent_id, a, o) for r, a, o in zip(recs, attempts, outcomes)))

    async def _finish_attempt(self, rec: TaskRecord, agent_id: str, attempt: int, outcome: TaskOutcome) -> None:
        current = self.inflight.get(rec.task_id)
        if current is None or current[:2] != (agent_id, attempt) or rec.status.final:
            return  # cancelled, or already retried elsewhere after a missed heartbeat
        # decide before recording: a restricted agent's unchecked successes must not lift it
        # above the threshold while its earlier results are still being checked
        if outcome.ok and rec.cross_check and not outcome.deduplicated and self.book.needs_cross_check(agent_id):
            outcome, outvoted = await self._cross_check(rec, outcome)
            if outvoted != agent_id:  # an outvoted result is charged a disagreement, not a success
                self.book.record_outcome(agent_id, rec.type, True, outcome.latency_s)
        else:
            self.book.record_outcome(agent_id, rec.type, outcome.ok, outcome.latency_s)
        self.inflight.pop(rec.task_id, None)
        if outcome.ok:
            done = self._emit(ev.TaskCompleted(
                task_id=rec.task_id, agent_id=outcome.agent_id, attempt=attempt, idempotency_key=rec.idempotency_key,
                result=outcome.result, latency_s=outcome.latency_s, deduplicated=outcome.deduplicated))
        else:
            done = self._emit(ev.TaskFailed(task_id=rec.task_id, agent_id=agent_id, attempt=attempt,
                                            error=outcome.error, traceback=outcome.traceback,
                                            exception=outcome.exception))
        await done
        self._resolve(rec.task_id)

    def _pick_checker(self, rec: TaskRecord, exclude: set[str]) -> str | None:
        demand = TaskDemand(task_type=rec.type, resources=rec.resources, critical=rec.critical)
        views = [v for a, v in self._views().items() if a in self.handles]
        checker = choose_agent(demand, views, self.book, exclude=exclude)
        if checker is None:  # all busy: oversubscribe a capable agent rather than skip the check
            relaxed = [dataclasses.replace(v, outstanding=0) for v in views]
            checker = choose_agent(demand, relaxed, self.book, exclude=exclude)
        return checker

    async def _run_check(self, rec: TaskRecord, agent_id: str) -> TaskOutcome | None:
        call_id, ref = self._start_call([rec], agent_id, "cross_check")
        try:
            out: TaskOutcome = (await ref)[0]
            return out if out.ok else None
        except Exception as exc:
            log.warning("cross-check of %s on %s failed: %s", rec.task_id, agent_id, exc)
            return None
        finally:
            self.calls[agent_id].pop(call_id, None)

    async def _cross_check(self, rec: TaskRecord, first: TaskOutcome) -> tuple[TaskOutcome, str | None]:
        """Re-run a low-reputation agent's result on a second agent and compare.

        Agreement delivers the result. On disagreement a third agent arbitrates when one exists
        (majority wins; the outvoted agent is charged a disagreement); without one, the
        better-reputed of the two wins and the other is charged.

        Returns:
            The outcome to deliver and the id of the outvoted agent (None when none was).
        """
        checker = self._pick_checker(rec, {first.agent_id})
        second = await self._run_check(rec, checker) if checker else None
        if checker is None or second is None:
            return first, None
        if _same_result(first.result, second.result):
            self._emit(ev.TaskCrossChecked(task_id=rec.task_id, agent_id=first.agent_id, checker_id=checker, agreed=True))
            return first, None
        arbiter = self._pick_checker(rec, {first.agent_id, checker})
        third = await self._run_check(rec, arbiter) if arbiter else None
        winner, loser = first, checker
        if third is not None and _same_result(third.result, second.result) or third is None and self.book.score(checker) > self.book.score(first.agent_id):
            winner, loser = second, first.agent_id
        self.book.record_disagreement(loser)
        self._emit(ev.TaskCrossChecked(task_id=rec.task_id, agent_id=first.agent_id, checker_id=checker,
                                       agreed=False, arbiter_id=arbiter if third else None, outvoted=loser))
        return winner, loser

    def _retry_or_dead_letter(self, rec: TaskRecord, cause: str) -> None:
        if rec.attempt >= rec.max_attempts:
            self._emit(ev.TaskDeadLettered(task_id=rec.task_id, attempts=rec.attempt, causes=[*rec.causes, cause])
                       ).add_done_callback(lambda _f: self._resolve(rec.task_id))
        else:
            self._emit(ev.TaskRetried(task_id=rec.task_id, attempt=rec.attempt + 1, cause=cause))
        self._poke()

    def _resolve(self, task_id: str) -> None:
        for fut in self.waiters.pop(task_id, []):
            if not fut.done():
                fut.set_result(None)

    async def wait(self, task_ids: list[str], timeout: float | None = None) -> list[dict[str, Any]]:
        """Wait until every task is final (or ``timeout``); returns their records with results."""
        await self._ensure_started()
        futs = []
        for tid in task_ids:
            rec = self.state.tasks.get(tid)
            if rec is None:
                raise TaskNotFoundError(f"no task {tid!r} is known to this coordinator", task_id=tid)
            if not rec.status.final:
                fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                self.waiters[tid].append(fut)
                futs.append(fut)
        if futs:
            try:
                await asyncio.wait_for(asyncio.gather(*futs), timeout=timeout)
            except asyncio.TimeoutError:
                pass
        return [self.state.tasks[t].public(with_result=True) for t in task_ids]

    async def task_info(self, task_id: str) -> dict[str, Any]:
        """The task's record without its result."""
        await self._ensure_started()
        rec = self.state.tasks.get(task_id)
        if rec is None:
            raise TaskNotFoundError(f"no task {task_id!r} is known to this coordinator", task_id=task_id)
        return rec.public()

    async def cancel(self, task_id: str) -> bool:
        """Cancel a queued or running task; False if it had already finished."""
        await self._ensure_started()
        rec = self.state.tasks.get(task_id)
        if rec is None:
            raise TaskNotFoundError(f"no task {task_id!r} is known to this coordinator", task_id=task_id)
        if rec.status.final:
            return False
        current = self.inflight.pop(task_id, None)
        if current is not None:
            try:
                ray.cancel(current[2])
            except Exception:
                pass
        await self._emit(ev.TaskCancelled(task_id=task_id))
        self._resolve(task_id)
        return True

    async def record_event(self, event: str | dict[str, Any]) -> int:
        """Append an event from elsewhere (e.g. a rollback by the evolution scheduler); returns its seq."""
        await self._ensure_started()
        model = ev.decode_event(event)
        await self._emit(model)
        return self.log.last_seq()

    async def status(self) -> dict[str, Any]:
        """Counts of agents and tasks, queue depth, scheduling latency, where state lives."""
        await self._ensure_started()
        agents: dict[str, int] = defaultdict(int)
        for r in self.state.agents.values():
            agents[r.state.value] += 1
        tasks: dict[str, int] = defaultdict(int)
        for t in self.state.tasks.values():
            tasks[t.status.value] += 1
        lat = sorted(self.sched_latency)
        return {
            "home": str(self.config.home), "events_path": str(self.config.events_path),
            "last_seq": self.log.last_seq(), "agents": dict(agents), "tasks": dict(tasks),
            "queued": len(self.state.queue), "max_queue": self.config.max_queue,
            "degraded": self.degraded, "uptime_s": round(time.time() - self._started_at, 1),
            "sched_p50_ms": round(1000 * statistics.median(lat), 4) if lat else None,
            "sched_p99_ms": round(1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], 4) if lat else None,
            "journal": dict(self._journal_stats),
        }

    async def scheduling_latencies(self, reset: bool = False) -> list[float]:
        """Seconds from admission to dispatch of each first attempt (for benchmarks)."""
        out = list(self.sched_latency)
        if reset:
            self.sched_latency.clear()
        return out

    async def shutdown(self) -> None:
        """Kill every agent and flush the log (the caller then kills this actor)."""
        await self._ensure_started()
        for aid, handle in list(self.handles.items()):
            self._emit(ev.AgentTerminated(agent_id=aid, reason="hive shutdown"))
            self._emit(ev.ResourceReleased(agent_id=aid, resources=self.state.agents[aid].resources))
            try:
                ray.kill(handle, no_restart=True)
            except Exception:
                pass
        self.handles.clear()
        self.last_hb.clear()
        while self._pending:
            self._flush()
            await asyncio.sleep(0)
        for t in self._bg:
            t.cancel()

    async def ping(self) -> dict[str, Any]:
        """Liveness check."""
        await self._ensure_started()
        return {"ok": True, "home": str(self.config.home)}

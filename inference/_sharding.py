"""ShardingCoordinator: the hive Agent that owns a deployment's stages and runs its generations.

Each ``generate`` call runs the pipeline scheduler in one of the agent's threads over a
RayTransport whose stage handles come from the hive Coordinator, so a stage that hive has
restarted is picked up on recovery. Tokens stream back to the caller as they are sampled.
"""

from __future__ import annotations

import itertools
import threading
import time
from typing import Any

import ray

import hive
from hive._config import COORDINATOR_NAME, NAMESPACE
from inference._exceptions import StageError
from inference._pipeline import GenerationStats, run_generation_steps
from inference._sampling import SamplingParams
from inference._transport import RayTransport

__all__ = ["ShardingCoordinator"]


class ShardingCoordinator(hive.Agent):
    """Routes generations through a deployment's StageActors; health-checks and measures them."""

    kind = "sharding-coordinator"
    max_concurrency = 8  # concurrent generate() calls
    respawn = hive.RespawnPolicy(max_restarts=5, restore_checkpoint=False)

    def __init__(self, name: str, plan_json: str, stage_ids: list[str]) -> None:
        self.name = name
        self.plan_json = plan_json
        self.stage_ids = list(stage_ids)
        self._tags = itertools.count()
        self._lock = threading.Lock()
        self.last_stats: dict[str, Any] = {}
        self.recoveries: list[float] = []

    def _hive(self) -> Any:
        return ray.get_actor(COORDINATOR_NAME, namespace=NAMESPACE)

    def _handles(self) -> list[Any]:
        coord = self._hive()
        return ray.get([coord.agent_handle.remote(aid) for aid in self.stage_ids])

    def _event(self, topic: str, **data: Any) -> None:
        body = hive.events.ExtensionEvent(agent_id=self.agent_id, topic=topic, data={"deployment": self.name, **data})
        self._hive().record_event.remote(body.model_dump_json())

    @ray.method(num_returns="streaming")  # type: ignore[misc]
    def generate(self, prompts: list[list[int]], max_new_tokens: int, sampling: dict[str, Any],
                 microbatches: int, stop_ids: list[int], pad_id: int) -> Any:
        """Stream, per pipeline step, a list of (request, token_id, index, finished, finish_reason)."""
        handles = self._handles()
        if any(h is None for h in handles):
            raise StageError(f"deployment {self.name}: a stage is down; retry shortly or see `hive agents`",
                             stage=[i for i, h in enumerate(handles) if h is None])
        transport = RayTransport(self._handles, on_lost=self._report_dead_stages)
        stats = GenerationStats()
        with self._lock:
            tag = f"{self.agent_id}-{next(self._tags)}"
        before = 0
        for step in run_generation_steps(transport, prompts, max_new_tokens=max_new_tokens,
                                         sampling=SamplingParams(**sampling), microbatches=microbatches,
                                         stop_ids=stop_ids, pad_id=pad_id, tag=tag, stats=stats):
            if len(stats.recoveries) > before:
                before = len(stats.recoveries)
                self.recoveries.append(stats.recoveries[-1])
                self._event("inference.kv_rebuilt", recovery_s=round(stats.recoveries[-1], 4),
                            groups=microbatches, note="stage restarted; histories replayed into every stage")
            # one streamed item per step (not per token): fewer Ray round trips
            yield [(ev.request, ev.token_id, ev.index, ev.finished, ev.finish_reason) for ev in step]
        self.last_stats = {"wall_s": stats.wall_s, "tokens": stats.tokens, "steps": stats.steps,
                           "ttft_s": stats.ttft_s, "recoveries": stats.recoveries}

    def _report_dead_stages(self) -> None:
        """Tell hive at once which stages stopped answering, so it restarts them now."""
        coord = self._hive()
        for aid, handle in zip(self.stage_ids, self._handles()):
            if handle is None:
                continue
            try:
                ray.get(handle.ping.remote(), timeout=2.0)
            except Exception as exc:  # noqa: BLE001 - dead or hung
                self._event("inference.stage_lost", stage_agent=aid, error=type(exc).__name__)
                ray.get(coord.report_lost.remote(aid, f"pipeline step lost ({type(exc).__name__})"))

    def health(self) -> list[dict[str, Any]]:
        """Ping every stage; ``ok`` False for a stage that is down or not answering."""
        out = []
        for i, handle in enumerate(self._handles()):
            t0 = time.perf_counter()
            try:
                info = ray.get(handle.ping.remote(), timeout=10) if handle is not None else None
                out.append({"stage": i, "ok": info is not None, "rtt_ms": round(1000 * (time.perf_counter() - t0), 3),
                            **(info or {})})
            except Exception as exc:  # noqa: BLE001 - report, don't raise
                out.append({"stage": i, "ok": False, "error": f"{type(exc).__name__}: {exc}"})
        return out

    def stage_stats(self) -> list[dict[str, Any]]:
        """Per-stage busy time, calls, parameter bytes and RSS."""
        return ray.get([h.stats.remote() for h in self._handles()])

    def reset_stats(self) -> None:
        """Zero every stage's busy counters."""
        ray.get([h.reset_stats.remote() for h in self._handles()])

    def info(self) -> dict[str, Any]:
        """The deployment: name, plan, stage ids, last generation's stats, recoveries."""
        return {"name": self.name, "plan_json": self.plan_json, "stage_ids": self.stage_ids,
                "last_stats": self.last_stats, "recoveries": self.recoveries}

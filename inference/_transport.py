"""How one pipeline step travels through the stages.

A transport takes a micro-batch step (token ids, attention mask, positions) into stage 0 and
hands back the last stage's logits. Three implementations share one interface, so the same
scheduler drives them all and GPU timing never depends on Ray:

* ``LocalTransport``   — every stage in this process, run one after another (reference path).
* ``ThreadedTransport`` — every stage in this process, one worker thread per stage, so several
  micro-batches are in flight at once (in-process pipelining).
* ``RayTransport``     — each stage a StageActor; a step is a chain of actor calls, each
  taking the previous call's ObjectRef (small activations are inlined by Ray through the
  submitting process, large ones go through the object store).
"""

from __future__ import annotations

import queue
import threading
import time
from abc import ABC, abstractmethod
from concurrent.futures import FIRST_COMPLETED, Future
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass, field
from typing import Any

import torch

from inference._exceptions import StageError
from inference._sampling import SampleSpec, pick_tokens

__all__ = ["LocalTransport", "RayTransport", "StageLostError", "StepInput", "ThreadedTransport", "Transport"]


class StageLostError(StageError):
    """A stage died during a step; ``stage`` names it. The scheduler replays after recovery."""


@dataclass(frozen=True)
class StepInput:
    """One forward step of one micro-batch."""

    slot: str  # the micro-batch's KV-cache slot on every stage
    input_ids: torch.Tensor  # [B, T] token ids fed this step
    attention_mask: torch.Tensor  # [B, past + T], 1 = real token, 0 = padding
    position_ids: torch.Tensor  # [B, T]
    sample: SampleSpec | None = None  # the last stage picks tokens ([B]) instead of returning logits
    fresh: bool = False  # every stage starts the slot afresh (a replay: the whole history)


@dataclass
class StageTimes:
    """Busy seconds per stage, for the measured pipeline bubble."""

    busy: list[float] = field(default_factory=list)  # seconds each stage spent computing
    calls: list[int] = field(default_factory=list)  # forward calls per stage


class Transport(ABC):
    """Carries steps through the stages; subclasses decide where stages run."""

    num_stages: int

    @abstractmethod
    def submit(self, step: StepInput) -> Any:
        """Start a step; returns a handle to wait on."""

    @abstractmethod
    def wait(self, handles: list[Any], timeout: float | None = None) -> list[Any]:
        """Block until at least one handle is done; returns the done ones."""

    @abstractmethod
    def fetch(self, handle: Any) -> torch.Tensor:
        """For a done handle: the picked tokens [B] when the step had a ``sample`` spec, else the
        last stage's logits [B, 1, V]; raises StageLostError."""

    @abstractmethod
    def drop(self, slot: str) -> None:
        """Free a slot's KV cache on every stage."""

    def recover(self) -> None:
        """After a StageLostError: wait for the replacement stage (default: nothing to do)."""

    def stage_times(self) -> StageTimes:
        """Busy time per stage so far."""
        return StageTimes()

    def close(self) -> None:
        """Release resources."""


def _run_stage(stage: Any, step: StepInput, x: torch.Tensor) -> torch.Tensor:
    out = stage.forward(step.slot, x, step.attention_mask, step.position_ids, last_only=stage.is_last,
                        fresh=step.fresh)
    return pick_tokens(out, step.sample) if stage.is_last and step.sample is not None else out


class LocalTransport(Transport):
    """All stages in-process, sequentially (one stage busy at a time)."""

    def __init__(self, stages: list[Any]) -> None:
        self.stages = stages
        self.num_stages = len(stages)
        self._times = StageTimes(busy=[0.0] * len(stages), calls=[0] * len(stages))

    def submit(self, step: StepInput) -> Future[torch.Tensor]:
        fut: Future[torch.Tensor] = Future()
        x = step.input_ids
        for i, stage in enumerate(self.stages):
            t0 = time.perf_counter()
            x = _run_stage(stage, step, x)
            self._times.busy[i] += time.perf_counter() - t0
            self._times.calls[i] += 1
        fut.set_result(x)
        return fut

    def wait(self, handles: list[Any], timeout: float | None = None) -> list[Any]:
        return [h for h in handles if h.done()]

    def fetch(self, handle: Any) -> torch.Tensor:
        return handle.result()

    def drop(self, slot: str) -> None:
        for stage in self.stages:
            stage.drop_slot(slot)

    def stage_times(self) -> StageTimes:
        return self._times


class ThreadedTransport(Transport):
    """All stages in-process, one worker thread per stage (micro-batches overlap)."""

    def __init__(self, stages: list[Any]) -> None:
        self.stages = stages
        self.num_stages = len(stages)
        self._queues: list[queue.Queue[Any]] = [queue.Queue() for _ in stages]
        self._times = StageTimes(busy=[0.0] * len(stages), calls=[0] * len(stages))
        self._threads = [threading.Thread(target=self._worker, args=(i,), daemon=True, name=f"stage-{i}")
                         for i in range(len(stages))]
        for t in self._threads:
            t.start()

    def _worker(self, i: int) -> None:
        stage, inbox = self.stages[i], self._queues[i]
        while True:
            item = inbox.get()
            if item is None:
                return
            step, x, fut = item
            if callable(step):  # a control message (drop)
                step(stage)
                continue
            try:
                t0 = time.perf_counter()
                y = _run_stage(stage, step, x)
                self._times.busy[i] += time.perf_counter() - t0
                self._times.calls[i] += 1
            except BaseException as exc:  # noqa: BLE001 - hand it to the waiter
                fut.set_exception(exc)
                continue
            if i + 1 < self.num_stages:
                self._queues[i + 1].put((step, y, fut))
            else:
                fut.set_result(y)

    def submit(self, step: StepInput) -> Future[torch.Tensor]:
        fut: Future[torch.Tensor] = Future()
        self._queues[0].put((step, step.input_ids, fut))
        return fut

    def wait(self, handles: list[Any], timeout: float | None = None) -> list[Any]:
        done, _ = futures_wait(handles, timeout=timeout, return_when=FIRST_COMPLETED)
        return list(done)

    def fetch(self, handle: Any) -> torch.Tensor:
        return handle.result()

    def drop(self, slot: str) -> None:
        for q in self._queues:  # queued behind any in-flight step of that slot
            q.put((lambda s, slot=slot: s.drop_slot(slot), None, None))

    def stage_times(self) -> StageTimes:
        return self._times

    def close(self) -> None:
        for q in self._queues:
            q.put(None)
        for t in self._threads:
            t.join(timeout=10)


class RayTransport(Transport):
    """Stages are StageActors; a step is a chain of actor calls through Ray's object store.

    Args:
        resolve: returns the current actor handle of each stage, in order (after a stage is
            restarted its handle changes; ``recover`` calls it again).
        on_lost: called when a step was lost, before waiting for the stages to come back.
    """

    def __init__(self, resolve: Any, recover_timeout_s: float = 120.0, on_lost: Any = None) -> None:
        self._resolve = resolve
        self._on_lost = on_lost  # called first in recover(): e.g. report the dead stage to hive
        self.handles: list[Any] = resolve()
        self.num_stages = len(self.handles)
        self.recover_timeout_s = recover_timeout_s
        self._stage_of: dict[Any, int] = {}

    def submit(self, step: StepInput) -> Any:
        from inference._wire import to_wire

        x: Any = to_wire(step.input_ids)
        mask, pos = to_wire(step.attention_mask), to_wire(step.position_ids)
        for handle in self.handles:
            x = handle.forward.remote(step.slot, x, mask, pos, step.sample, step.fresh)
        return x

    def wait(self, handles: list[Any], timeout: float | None = None) -> list[Any]:
        import ray

        done, _ = ray.wait(handles, num_returns=1, timeout=timeout)
        return list(done)

    def fetch(self, handle: Any) -> torch.Tensor:
        import ray
        from ray.exceptions import RayActorError

        from inference._wire import from_wire

        try:
            return from_wire(ray.get(handle))
        except RayActorError as exc:
            raise StageLostError(f"a pipeline stage died: {type(exc).__name__}", stage=None) from exc

    def drop(self, slot: str) -> None:
        for handle in self.handles:
            handle.drop_slot.remote(slot)

    def recover(self) -> None:
        """Wait until every stage has a live handle again (hive restarts dead stage agents)."""
        import ray

        if self._on_lost is not None:
            self._on_lost()
        deadline = time.monotonic() + self.recover_timeout_s
        while True:
            handles = self._resolve()
            if all(h is not None for h in handles):
                try:
                    ray.get([h.ping.remote() for h in handles], timeout=30)
                    self.handles = handles
                    return
                except Exception:  # noqa: BLE001 - one of them died again; keep waiting
                    pass
            if time.monotonic() > deadline:
                raise StageError(f"pipeline stages not back after {self.recover_timeout_s}s; "
                                 "check `hive agents` for failed stage agents", stage=None)
            time.sleep(0.05)

    def stage_times(self) -> StageTimes:
        import ray

        stats = ray.get([h.stats.remote() for h in self.handles])
        return StageTimes(busy=[s["busy_s"] for s in stats], calls=[s["calls"] for s in stats])

"""StageActor: one pipeline stage as a hive Agent (a Ray actor holding its layer range)."""

from __future__ import annotations

import os
import time
from typing import Any

import ray
import torch

import hive
from inference._wire import from_wire, to_wire

__all__ = ["StageActor"]


class StageActor(hive.Agent):
    """Holds layers [layer_start, layer_end) of a checkpoint and runs them for every micro-batch.

    ``forward`` and ``drop_slot`` share the ``compute`` concurrency group (one thread), so steps
    of a slot run in the order they were sent; ``ping``/``stats`` stay answerable meanwhile.
    If hive restarts a dead stage, ``on_start`` reloads its shard from disk (the KV cache is
    rebuilt by the caller replaying each sequence's history).
    """

    kind = "stage"
    max_concurrency = 1
    concurrency_groups = {"compute": 1}
    respawn = hive.RespawnPolicy(max_restarts=5, restore_checkpoint=False)

    def __init__(self, checkpoint: str, layer_start: int, layer_end: int, stage: int,
                 dtype: str = "float32", threads: int | None = None) -> None:
        self.spec: dict[str, Any] = {"checkpoint": checkpoint, "layer_start": layer_start, "layer_end": layer_end,
                     "stage": stage, "dtype": dtype}
        self.threads = threads
        self.compute: Any = None
        self.busy_s = 0.0
        self.calls = 0
        self.load_s = 0.0

    def on_start(self) -> None:
        from inference._stage import StageCompute

        if self.threads:
            torch.set_num_threads(self.threads)
        device = "cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu"
        t0 = time.perf_counter()
        self.compute = StageCompute(self.spec["checkpoint"], self.spec["layer_start"], self.spec["layer_end"],
                                    dtype=getattr(torch, self.spec["dtype"]), device=device)
        self.load_s = time.perf_counter() - t0

    @ray.method(concurrency_group="compute")
    def forward(self, slot: str, x: Any, attention_mask: Any, position_ids: Any, sample: Any = None,
                fresh: bool = False) -> Any:
        """Run this stage's layers for one step of one micro-batch (hidden states out; the last
        stage returns logits, or with a ``SampleSpec`` only the picked token ids).

        Tensors arrive and leave as numpy arrays (``inference._wire``): far cheaper to pickle.
        """
        from inference._sampling import pick_tokens

        t0 = time.perf_counter()
        out = self.compute.forward(slot, from_wire(x), from_wire(attention_mask), from_wire(position_ids),
                                   last_only=self.compute.is_last, fresh=fresh)
        if sample is not None and self.compute.is_last:
            out = pick_tokens(out, sample)
        wire = to_wire(out)
        self.busy_s += time.perf_counter() - t0
        self.calls += 1
        return wire

    @ray.method(concurrency_group="compute")
    def drop_slot(self, slot: str) -> None:
        """Free a micro-batch's KV cache."""
        self.compute.drop_slot(slot)

    def ping(self) -> dict[str, Any]:
        """Liveness and identity."""
        return {"stage": self.spec["stage"], "pid": os.getpid(), "agent_id": self.agent_id}

    def stats(self) -> dict[str, Any]:
        """Busy time, calls, resident parameter bytes, RSS, shard load time."""
        import psutil

        return {**self.spec, "busy_s": self.busy_s, "calls": self.calls,
                "param_bytes": self.compute.param_bytes(), "rss_bytes": psutil.Process().memory_info().rss,
                "load_s": self.load_s, "slots": len(self.compute.slots()), "pid": os.getpid()}

    def reset_stats(self) -> None:
        """Zero the busy counters (benchmarks call this between runs)."""
        self.busy_s, self.calls = 0.0, 0

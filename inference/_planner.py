"""``plan()``: a ``ShardingPlan`` for a checkpoint (or bare ``LayerCosts``) over a set of devices.

The pieces: ``inventory()`` finds the devices (or the caller passes ``devices=``), a checkpoint
or ``LayerCosts`` gives the byte counts, ``partition()`` splits the layers (or the caller fixes
them with ``layer_ranges=``), and the result is checked against every device's free memory.

Example:
    >>> from inference._plan import DeviceInfo
    >>> devs = [DeviceInfo(device_id=f"n/gpu:{i}", node_id="n", kind="gpu", name="sim",
    ...                    total_bytes=2**20, free_bytes=2**20) for i in range(2)]
    >>> costs = LayerCosts([1000] * 6, 500, 500, 8, 0, max_batch=1, max_seq_len=16)
    >>> plan(costs, devices=devs).layer_ranges
    [(0, 3), (3, 6)]
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

from inference._costs import LayerCosts, dtype_bytes, dtype_name, layer_costs_from_config
from inference._exceptions import PlanError
from inference._partition import (
    Order,
    fit_advice,
    overflow_text,
    partition,
    stage_cost,
    stage_memory,
)
from inference._plan import DeviceInfo, ShardingPlan, StagePlan

__all__ = ["DEFAULT_MAX_BATCH", "DEFAULT_MAX_SEQ_LEN", "costs_from_checkpoint", "plan"]

DEFAULT_MAX_BATCH = 8  # sequences the KV cache is sized for when planning from a checkpoint
DEFAULT_MAX_SEQ_LEN = 2048  # tokens per sequence the KV cache is sized for


def costs_from_checkpoint(
    path: str | os.PathLike[str],
    dtype: str | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_seq_len: int = DEFAULT_MAX_SEQ_LEN,
) -> LayerCosts:
    """``LayerCosts`` of a checkpoint directory (via ``inference._checkpoint.Checkpoint``).

    Args:
        path: checkpoint directory.
        dtype: dtype the stages will run in; default the config's dtype, else "float32".
            Byte counts are those of the tensors cast to it.
        max_batch: sequences the KV cache is sized for.
        max_seq_len: tokens per sequence the KV cache is sized for.

    Returns:
        The checkpoint's costs.

    Raises:
        CheckpointError: the checkpoint cannot be read.
        PlanError: unknown dtype, or a config without an attention shape.
    """
    from inference._checkpoint import Checkpoint  # lazy: model I/O is only needed for paths

    ckpt: Any = Checkpoint.open(os.fspath(path))
    config = ckpt.config
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    stored = str(stored).removeprefix("torch.") if stored is not None else None
    if stored is not None and stored not in {"float64", "float32", "float16", "bfloat16"}:
        stored = None  # quantized or unusual storage: take the counts as they are
    target = dtype or stored or "float32"
    dtype_bytes(target)  # fail early on an unknown dtype
    if hasattr(ckpt, "tensor_bytes"):  # exact bytes once cast to the target dtype
        import torch

        cast = getattr(torch, dtype_name(target))
        per_layer = list(ckpt.param_bytes_per_layer(cast))
        embedding = ckpt.tensor_bytes(ckpt.embedding_tensor_names(), cast)
        head = ckpt.tensor_bytes(ckpt.head_tensor_names(), cast)
        stored = None  # already in the target dtype
    else:  # the documented minimum: stored bytes, rescaled from the config's dtype
        per_layer, embedding, head = list(ckpt.param_bytes_per_layer()), ckpt.embedding_bytes, ckpt.head_bytes
    if len(per_layer) != int(ckpt.num_layers):
        raise PlanError(f"checkpoint {path} reports {ckpt.num_layers} layers but bytes for {len(per_layer)}")
    costs = layer_costs_from_config(
        config, per_layer, int(embedding), int(head), target, max_batch, max_seq_len, source_dtype=stored,
    )
    return costs.replace(arch=str(ckpt.arch))


def _check_ranges(ranges: Sequence[Sequence[int]], n: int) -> list[tuple[int, int]]:
    """Validate manual ranges: in order, non-empty, within 0..n, contiguous and covering."""
    out: list[tuple[int, int]] = []
    for k, r in enumerate(ranges):
        if len(r) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in r):
            raise PlanError(f"layer_ranges[{k}] = {r!r} is not a (start, end) pair of ints", range_index=k)
        a, b = int(r[0]), int(r[1])
        if a < 0 or b > n:
            raise PlanError(
                f"layer_ranges[{k}] = ({a}, {b}) is out of range: the model has {n} layers, so "
                f"0 <= start < end <= {n} (end is exclusive)", range_index=k)
        if b <= a:
            raise PlanError(f"layer_ranges[{k}] = ({a}, {b}) is empty; every stage needs start < end", range_index=k)
        out.append((a, b))
    if not out:
        raise PlanError("layer_ranges is empty; give one (start, end) per stage or leave it None")
    if out[0][0] != 0:
        raise PlanError(f"layers 0-{out[0][0] - 1} are in no range: layer_ranges[0] = {out[0]} must start at 0",
                        range_index=0)
    for k in range(1, len(out)):
        (_, prev_end), (start, end) = out[k - 1], out[k]
        if start > prev_end:
            raise PlanError(
                f"gap: layers {prev_end}-{start - 1} are in no range between layer_ranges[{k - 1}] = "
                f"{out[k - 1]} and layer_ranges[{k}] = {out[k]}; ranges must be contiguous", range_index=k)
        if start < prev_end:
            raise PlanError(
                f"overlap: layer_ranges[{k}] = {out[k]} starts inside layer_ranges[{k - 1}] = {out[k - 1]} "
                f"(layers {start}-{min(prev_end, end) - 1} twice); list ranges in order without overlap",
                range_index=k)
    if out[-1][1] != n:
        raise PlanError(
            f"layers {out[-1][1]}-{n - 1} are in no range: layer_ranges[{len(out) - 1}] = {out[-1]} must end "
            f"at {n} (the model has {n} layers)", range_index=len(out) - 1)
    return out


def _build(costs: LayerCosts, ranges: Sequence[tuple[int, int]], devices: Sequence[DeviceInfo],
           model_path: str) -> ShardingPlan:
    p = len(ranges)
    stages = []
    for s, ((i, j), d) in enumerate(zip(ranges, devices)):
        params, kv, act = stage_memory(costs, i, j, s == 0, s == p - 1)
        stages.append(StagePlan(
            stage=s, device=d, layer_start=i, layer_end=j, has_embeddings=s == 0, has_head=s == p - 1,
            param_bytes=params, kv_bytes=kv, activation_bytes=act,
            est_cost=stage_cost(costs, i, j, s == p - 1, d.throughput),
        ))
    return ShardingPlan(
        model_path=model_path, arch=costs.arch, num_layers=costs.num_layers, dtype=costs.dtype,
        max_batch=costs.max_batch, max_seq_len=costs.max_seq_len, stages=tuple(stages),
        bottleneck=max(s.est_cost for s in stages), created_ts=time.time(),
    )


def plan(
    model: str | os.PathLike[str] | LayerCosts,
    *,
    devices: Sequence[DeviceInfo] | None = None,
    num_stages: int | None = None,
    layer_ranges: Sequence[Sequence[int]] | None = None,
    max_batch: int | None = None,
    max_seq_len: int | None = None,
    dtype: str | None = None,
    order: Order = "auto",
) -> ShardingPlan:
    """Plan pipeline-parallel inference: contiguous layer ranges, one stage per device.

    Args:
        model: a checkpoint directory, or ``LayerCosts`` (no checkpoint read).
        devices: devices to use; default ``inventory()`` of the connected Ray cluster.
        num_stages: stages to make; default one per device, at most one per layer. With fewer
            stages than devices, the best subset of devices is used.
        layer_ranges: manual split, ``[(start, end), ...]`` half-open and in pipeline order; stage
            i runs on ``devices[i]``, so give exactly one range per device. Still checked for fit.
        max_batch: sequences the KV cache is sized for (default 8, or the ``LayerCosts``' own).
        max_seq_len: tokens per sequence the KV cache is sized for (default 2048, or the costs').
        dtype: dtype the stages run in (default the checkpoint's, or the costs'; costs are rescaled).
        order: ``"auto"`` searches device orders, ``"given"`` keeps the order of ``devices``
            (see ``inference._partition``).

    Returns:
        A validated ``ShardingPlan``; ``print(plan)`` shows it as a table.

    Raises:
        PlanError: the model does not fit (the message says how much memory is missing on which
            stage and device, and which setting to change), bad ``layer_ranges`` (the message names
            the range), a ``num_stages`` / device count mismatch, or no devices.
        CheckpointError: ``model`` is a path that cannot be read.

    Example:
        >>> p = plan("/models/llama-3-8b", max_batch=4, dtype="bfloat16")  # doctest: +SKIP
        >>> print(p)  # doctest: +SKIP
    """
    if isinstance(model, LayerCosts):
        costs, model_path = model, ""
        if dtype is not None:
            costs = costs.with_dtype(dtype)
        costs = costs.replace(
            max_batch=costs.max_batch if max_batch is None else max_batch,
            max_seq_len=costs.max_seq_len if max_seq_len is None else max_seq_len,
        )
    else:
        model_path = os.fspath(model)
        costs = costs_from_checkpoint(
            model_path, dtype, DEFAULT_MAX_BATCH if max_batch is None else max_batch,
            DEFAULT_MAX_SEQ_LEN if max_seq_len is None else max_seq_len,
        )
    if devices is None:
        from inference._inventory import inventory

        wanted = num_stages or (len(layer_ranges) if layer_ranges is not None else None)
        devices = inventory()
        if wanted and len(devices) < wanted and all(d.kind == "cpu" for d in devices):
            # CPU-only cluster: split each node's RAM budget into enough slots for the stages asked for
            nodes = len({d.node_id for d in devices})
            devices = inventory(cpu_slots=-(-wanted // nodes))
    devices = list(devices)
    if layer_ranges is None:
        placement = partition(costs, devices, num_stages, order=order)
        return _build(costs, placement.ranges, placement.devices, model_path)
    ranges = _check_ranges(layer_ranges, costs.num_layers)
    if num_stages is not None and num_stages != len(ranges):
        raise PlanError(f"num_stages={num_stages} but layer_ranges has {len(ranges)} ranges; drop one of them")
    if len(ranges) != len(devices):
        raise PlanError(
            f"layer_ranges has {len(ranges)} range(s) but {len(devices)} device(s) were given; stage i runs on "
            f"devices[i], so pass exactly one range per device (devices=[...] to choose them)")
    ids = [d.device_id for d in devices]
    if len(set(ids)) != len(ids):
        raise PlanError(f"a device is listed twice in {ids}; each device runs at most one stage")
    result = _build(costs, ranges, devices, model_path)
    short = [s for s in result.stages if s.headroom_bytes < 0]
    if short:
        detail = "; ".join(overflow_text(s.stage, s.layer_start, s.layer_end, s.device, s.needed_bytes) for s in short)
        raise PlanError(
            f"the manual layer_ranges do not fit: {detail}. To fix: move layers off that device "
            f"(layer_ranges), leave layer_ranges=None to let the planner split, or {fit_advice(costs)}.",
            stage=short[0].stage, device=short[0].device.device_id, missing_bytes=-short[0].headroom_bytes,
        )
    return result

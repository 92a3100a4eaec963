"""Contiguous layer partitioning: which devices run which layers so the slowest stage is fastest.

Stage ``s`` of ``p`` holds layers ``[i, j)`` on device ``d``. It needs memory
``params(i, j) + (j - i) × kv_per_layer + activation_bytes`` plus the embeddings on the first
stage and the head on the last (a tied matrix once when one stage holds both), and that must
be ``<= d.free_bytes``. Its time per token is modelled as
``est_cost = (params(i, j) + head_bytes if last) / d.throughput`` (decode reads every weight
once; the embedding lookup reads one row, so it costs nothing). A pipeline runs at the pace of
its slowest stage, so the partition minimises ``max(est_cost)``.

Algorithm: for one device order, an exact dynamic programme over (layer prefix, stage),
vectorised over all ``(i, j)`` with numpy (``O(p·L²)``). A second pass keeps that bottleneck and
minimises the sum of squared stage costs, so spare capacity is spread evenly instead of left
on the last stage. Device order matters (stage ``i`` runs on ``devices[i]``; only the first holds
the embeddings and the last the head): ``order="given"`` keeps the caller's order, while
``order="auto"`` (default) tries every distinct order when there are at most ``EXHAUSTIVE_LIMIT``
(devices of equal free memory and throughput are interchangeable) and otherwise a few sorted
orders (by throughput, by free memory, both ways); among equally good orders it prefers fewer
node changes along the pipeline, then the order closest to the one given (devices are first
grouped by node). With more devices than stages, the subset is chosen the same way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations, pairwise, permutations
from typing import Literal

import numpy as np

from inference._costs import LayerCosts
from inference._exceptions import PlanError
from inference._plan import DeviceInfo, format_bytes

__all__ = [
    "EXHAUSTIVE_LIMIT", "Placement", "fit_advice", "overflow_text", "partition", "stage_cost", "stage_memory",
]

EXHAUSTIVE_LIMIT = 720  # most device orders (or subsets) searched exhaustively; beyond, heuristic orders
_TIE = 1e-9  # relative tolerance when comparing bottlenecks
Order = Literal["auto", "given"]


@dataclass(frozen=True)
class Placement:
    """Result of ``partition``: stage ``i`` runs layers ``ranges[i]`` on ``devices[i]``."""

    ranges: tuple[tuple[int, int], ...]  # [start, end) per stage, contiguous, covering all layers
    devices: tuple[DeviceInfo, ...]  # the device of each stage, in pipeline order
    bottleneck: float  # the largest stage est_cost


def stage_memory(costs: LayerCosts, start: int, end: int, first: bool, last: bool) -> tuple[int, int, int]:
    """``(param_bytes, kv_bytes, activation_bytes)`` of a stage holding layers ``[start, end)``."""
    params = sum(costs.param_bytes[start:end])
    if first:
        params += costs.embedding_bytes
    if last:
        params += costs.head_bytes
    if first and last:
        params -= costs.tied_bytes
    return params, (end - start) * costs.kv_bytes_per_layer, costs.activation_bytes


def stage_cost(costs: LayerCosts, start: int, end: int, last: bool, throughput: float) -> float:
    """Relative time per token of a stage: its compute bytes over the device's throughput."""
    return float(sum(costs.param_bytes[start:end]) + (costs.head_bytes if last else 0)) / throughput


class _Tables:
    """Per-(device kind of position) cost and memory matrices over all ranges ``[i, j)``."""

    def __init__(self, costs: LayerCosts) -> None:
        self.costs = costs
        self.n = costs.num_layers
        prefix = np.concatenate([[0], np.cumsum(np.asarray(costs.param_bytes, dtype=np.int64))])
        idx = np.arange(self.n + 1)
        self.span = prefix[None, :] - prefix[:, None]  # [i, j] = params of layers i..j-1
        self.count = idx[None, :] - idx[:, None]  # [i, j] = j - i
        self.valid = self.count > 0
        self._cache: dict[tuple[int, float, bool, bool], tuple[np.ndarray, np.ndarray]] = {}

    def memory(self, first: bool, last: bool) -> np.ndarray:
        c = self.costs
        extra = (c.embedding_bytes if first else 0) + (c.head_bytes if last else 0) - (c.tied_bytes if first and last else 0)
        return self.span + self.count * c.kv_bytes_per_layer + c.activation_bytes + extra

    def mats(self, d: DeviceInfo, first: bool, last: bool) -> tuple[np.ndarray, np.ndarray]:
        """(cost with inf where the range does not fit or is empty, memory overflow) for ``d``."""
        key = (d.free_bytes, d.throughput, first, last)
        if key not in self._cache:
            overflow = self.memory(first, last) - d.free_bytes
            cost = (self.span + (self.costs.head_bytes if last else 0)) / d.throughput
            cost = np.where(self.valid & (overflow <= 0), cost, np.inf)
            self._cache[key] = (cost, np.where(self.valid, overflow.astype(np.float64), np.inf))
        return self._cache[key]

    def bottleneck(self, seq: Sequence[DeviceInfo]) -> float:
        """Smallest achievable max stage cost with stage i on seq[i] (inf: nothing fits)."""
        dp = np.full(self.n + 1, np.inf)
        dp[0] = 0.0
        for s, d in enumerate(seq):
            cost, _ = self.mats(d, s == 0, s == len(seq) - 1)
            dp = np.min(np.maximum(dp[:, None], cost), axis=0)  # dp[j]: best max over ranges ending at j
        return float(dp[self.n])

    def solve(self, seq: Sequence[DeviceInfo], bound: float | None) -> tuple[float, list[tuple[int, int]]]:
        """With ``bound``: min sum of squared costs, each <= bound. Without: min max overflow."""
        dp = np.full(self.n + 1, np.inf)
        dp[0] = 0.0 if bound is not None else -np.inf
        args = []
        cols = np.arange(self.n + 1)
        for s, d in enumerate(seq):
            cost, overflow = self.mats(d, s == 0, s == len(seq) - 1)
            if bound is not None:
                value = dp[:, None] + np.where(cost <= bound, cost, np.inf) ** 2
            else:
                value = np.maximum(dp[:, None], overflow)
            arg = np.argmin(value, axis=0)
            dp = value[arg, cols]
            args.append(arg)
        ranges, end = [], self.n
        for arg in reversed(args):
            start = int(arg[end])
            ranges.append((start, end))
            end = start
        return float(dp[self.n]), ranges[::-1]


def _signature(d: DeviceInfo) -> tuple[int, float]:
    return (d.free_bytes, d.throughput)  # all the planner looks at: equal signatures are interchangeable


def _grouped(devices: Sequence[DeviceInfo]) -> list[DeviceInfo]:
    """Devices with each node's together, nodes in order of first appearance (stable)."""
    nodes = list(dict.fromkeys(d.node_id for d in devices))
    return sorted(devices, key=lambda d: nodes.index(d.node_id))


def _assign(key: Sequence[tuple[int, float]], base: Sequence[DeviceInfo]) -> tuple[DeviceInfo, ...]:
    """Concrete devices for a signature sequence, staying on the previous stage's node when possible."""
    pools: dict[tuple[int, float], list[DeviceInfo]] = {}
    for d in base:
        pools.setdefault(_signature(d), []).append(d)
    out: list[DeviceInfo] = []
    for sig in key:
        pool = pools[sig]
        prev = out[-1].node_id if out else None
        out.append(pool.pop(next((k for k, d in enumerate(pool) if d.node_id == prev), 0)))
    return tuple(out)


def _candidates(devices: Sequence[DeviceInfo], p: int, order: Order) -> list[tuple[DeviceInfo, ...]]:
    base = list(devices) if order == "given" else _grouped(devices)
    n = len(base)
    if order == "given":
        if math.comb(n, p) <= EXHAUSTIVE_LIMIT:
            return [tuple(base[i] for i in idx) for idx in combinations(range(n), p)]
        subsets = _heuristic_subsets(base, p)
        return list(dict.fromkeys(tuple(sorted(s, key=base.index)) for s in subsets))
    if math.perm(n, p) <= EXHAUSTIVE_LIMIT:
        keys = (tuple(_signature(base[i]) for i in idx) for idx in permutations(range(n), p))
    else:
        sorts = [lambda d: 0.0, lambda d: -d.throughput, lambda d: d.throughput,
                 lambda d: -d.free_bytes, lambda d: d.free_bytes]
        keys = (tuple(_signature(d) for d in sorted(sorted(sub, key=base.index), key=k))
                for sub in _heuristic_subsets(base, p) for k in sorts)
    return [_assign(key, base) for key in dict.fromkeys(keys)]


def _heuristic_subsets(base: list[DeviceInfo], p: int) -> list[list[DeviceInfo]]:
    """The first ``p`` devices, the ``p`` fastest, and the ``p`` with the most free memory."""
    fastest = sorted(base, key=lambda d: (-d.throughput, -d.free_bytes))[:p]
    roomiest = sorted(base, key=lambda d: (-d.free_bytes, -d.throughput))[:p]
    return [base[:p], fastest, roomiest]


def _node_changes(seq: Sequence[DeviceInfo]) -> int:
    return sum(a.node_id != b.node_id for a, b in pairwise(seq))


def partition(
    costs: LayerCosts,
    devices: Sequence[DeviceInfo],
    num_stages: int | None = None,
    *,
    order: Order = "auto",
) -> Placement:
    """Split the layers into contiguous stages over ``devices``, minimising the slowest stage.

    Args:
        costs: the model's byte counts (``LayerCosts``).
        devices: candidate devices; each runs at most one stage.
        num_stages: stages to make; default ``min(len(devices), num_layers)``. With fewer stages
            than devices the best subset is used.
        order: ``"auto"`` searches device orders; ``"given"`` runs stage i on the i-th chosen
            device in the order given (see the module docstring).

    Returns:
        A ``Placement`` (ranges, devices, bottleneck), optimal for the orders searched.

    Raises:
        PlanError: no devices, a bad ``num_stages``, a device listed twice, or no split fits
            (the message says how much memory is missing on which device and what to change).

    Example:
        >>> dev = DeviceInfo(device_id="n/cpu:0", node_id="n", kind="cpu", name="cpu",
        ...                  total_bytes=10**6, free_bytes=10**6)
        >>> partition(LayerCosts([10] * 4, 5, 5, 1, 0, max_batch=1, max_seq_len=1), [dev]).ranges
        ((0, 4),)
    """
    devices = list(devices)
    n = costs.num_layers
    if not devices:
        raise PlanError("no devices to plan on: start a Ray cluster with GPUs or pass devices=[DeviceInfo(...)]")
    ids = [d.device_id for d in devices]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise PlanError(f"device(s) {dup} listed twice; each device runs at most one stage", device=dup[0])
    p = min(len(devices), n) if num_stages is None else num_stages
    if not 1 <= p <= len(devices):
        raise PlanError(f"num_stages={p} but {len(devices)} device(s) were given; pass 1..{len(devices)}")
    if p > n:
        raise PlanError(f"num_stages={p} exceeds the model's {n} layers; every stage needs a layer: pass <= {n}")
    tables = _Tables(costs)
    candidates = _candidates(devices, p, order)
    scored = [(tables.bottleneck(seq), _node_changes(seq), k) for k, seq in enumerate(candidates)]
    best = min(b for b, _, _ in scored)
    if not math.isfinite(best):
        raise _does_not_fit(tables, candidates)
    _, k = min((changes, k) for b, changes, k in scored if b <= best * (1 + _TIE))
    seq = candidates[k]
    _, ranges = tables.solve(seq, best * (1 + _TIE))
    worst = max(stage_cost(costs, i, j, s == p - 1, d.throughput) for s, ((i, j), d) in enumerate(zip(ranges, seq)))
    return Placement(ranges=tuple(ranges), devices=seq, bottleneck=worst)


def fit_advice(costs: LayerCosts) -> str:
    """What a user can change when a model does not fit (names the settings)."""
    return (f"add a device, lower max_batch ({costs.max_batch}) or max_seq_len ({costs.max_seq_len}), "
            f"or use a smaller dtype ({costs.dtype} now)")


def overflow_text(stage: int, start: int, end: int, device: DeviceInfo, needed: int) -> str:
    """``"stage 1 (layers 6-11) on node-x/gpu:0 lacks 3.40 GiB (needs 12.1 GiB, 8.70 GiB free)"``."""
    layers = f"layer {start}" if end - start == 1 else f"layers {start}-{end - 1}"
    return (f"stage {stage} ({layers}) on {device.device_id} lacks {format_bytes(needed - device.free_bytes)} "
            f"(needs {format_bytes(needed)}, {format_bytes(device.free_bytes)} free)")


def _does_not_fit(tables: _Tables, candidates: list[tuple[DeviceInfo, ...]]) -> PlanError:
    """A PlanError for the split that comes closest to fitting (smallest worst overflow)."""
    costs = tables.costs
    solved = [(tables.solve(seq, None), seq) for seq in candidates]
    (worst, ranges), seq = min(solved, key=lambda item: item[0][0])
    p = len(seq)
    needs = [sum(stage_memory(costs, i, j, s == 0, s == p - 1)) for s, (i, j) in enumerate(ranges)]
    short = [s for s in range(p) if needs[s] > seq[s].free_bytes]
    total, free = costs.total_bytes(p), sum(d.free_bytes for d in seq)
    kv = costs.num_layers * costs.kv_bytes_per_layer
    parts = [
        f"{'the model' if costs.arch == 'unknown' else costs.arch} does not fit: it needs {format_bytes(total)} across {p} stage(s) "
        f"(KV cache for max_batch={costs.max_batch} × max_seq_len={costs.max_seq_len}: {format_bytes(kv)}; "
        f"activation reserve {format_bytes(costs.activation_bytes)} per stage) "
        f"but the devices offer {format_bytes(free)} free"
        + (f", {format_bytes(total - free)} short" if total > free else ""),
        "the closest split still overflows: "
        + "; ".join(overflow_text(s, *ranges[s], seq[s], needs[s]) for s in short),
    ]
    first = short[0] if short else 0
    return PlanError(
        "; ".join(parts) + f". To fix: {fit_advice(costs)}.",
        stage=first, device=seq[first].device_id, missing_bytes=int(max(worst, total - free, 1)),
    )

"""Rebalancing: turn measured per-stage latency into device throughputs and plan again."""

from __future__ import annotations

from collections.abc import Sequence

from inference._plan import ShardingPlan

__all__ = ["replan_with_throughput"]


def replan_with_throughput(plan: ShardingPlan, latencies: Sequence[float]) -> ShardingPlan:
    """A new plan for the same devices whose throughputs come from measured stage latencies.

    Stage i did ``est_cost_i × throughput_i`` units of work (its compute bytes) in
    ``latencies[i]`` seconds per call, so its device's measured throughput is work / latency.
    The planner then splits the layers again with those weights, keeping the device order.

    Args:
        plan: the plan now deployed.
        latencies: mean seconds per forward call of each stage (same order as ``plan.stages``).

    Returns:
        The proposed plan (it may equal the current split when that is already best).

    Example:
        >>> # proposal = replan_with_throughput(session.plan, session.stage_latencies())
    """
    from inference._planner import plan as make_plan

    if len(latencies) != len(plan.stages):
        raise ValueError(f"need one latency per stage ({len(plan.stages)}), got {len(latencies)}")
    devices = []
    for st, lat in zip(plan.stages, latencies):
        work = st.est_cost * st.device.throughput  # compute bytes of the stage
        measured = work / lat if lat > 0 else st.device.throughput
        devices.append(st.device.model_copy(update={"throughput": measured}))
    scale = max(d.throughput for d in devices)
    devices = [d.model_copy(update={"throughput": d.throughput / scale}) for d in devices]
    return make_plan(plan.model_path, devices=devices, max_batch=plan.max_batch, max_seq_len=plan.max_seq_len,
                     dtype=plan.dtype, order="given")

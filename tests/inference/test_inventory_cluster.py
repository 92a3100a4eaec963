"""Inventory and planning on the simulated 3-node cluster (head + w1 + w2 with 2 ``sim_gpu`` each)."""

from __future__ import annotations

from itertools import pairwise
from typing import Any

import pytest

from inference._costs import LayerCosts
from inference._inventory import DEFAULT_GPU_MEMORY_BYTES, inventory
from inference._planner import plan
from tests.factories import SIM_GPU, SimCluster

pytestmark = pytest.mark.integration

GiB = 2**30


def costs(n_layers: int = 16, layer: int = GiB) -> LayerCosts:
    return LayerCosts([layer] * n_layers, GiB // 2, GiB // 2, 0, GiB // 4, max_batch=1, max_seq_len=1, arch="llama")


def test_sim_gpus_are_listed_per_node(ray_cluster: SimCluster) -> None:
    devices = inventory(gpu_resource=SIM_GPU, gpu_memory_bytes=8 * GiB)
    ids = ray_cluster.node_ids
    by_node = {node: [d for d in devices if d.node_id == ids[node]] for node in ("head", "w1", "w2")}
    assert [len(by_node[n]) for n in ("head", "w1", "w2")] == [0, 2, 2]
    assert all(d.kind == "gpu" and d.free_bytes == d.total_bytes == 8 * GiB for d in devices)
    assert {d.ray_resource for d in devices} == {SIM_GPU}  # what a stage actor there must request
    assert len({d.device_id for d in devices}) == 4
    assert by_node["w1"][0].device_id == f"node-{ids['w1'][:8]}/gpu:0"


def test_plan_spans_both_nodes_and_keeps_each_node_contiguous(ray_cluster: SimCluster) -> None:
    devices = inventory(gpu_resource=SIM_GPU, gpu_memory_bytes=8 * GiB)
    # 16 GiB of layers + 1 GiB of embeddings/head + reserves: more than one node's 2 × 8 GiB
    p = plan(costs(), devices=devices)
    nodes = [s.device.node_id for s in p.stages]
    w1, w2 = ray_cluster.node_ids["w1"], ray_cluster.node_ids["w2"]
    assert p.num_stages == 4 and set(nodes) == {w1, w2}
    assert sum(a != b for a, b in pairwise(nodes)) == 1  # one hop between the nodes
    assert all(s.headroom_bytes >= 0 for s in p.stages)
    assert ray_cluster.node_ids["head"] not in nodes
    two = plan(costs(8), devices=devices, num_stages=2)  # fits on one node: no network hop
    assert len({s.device.node_id for s in two.stages}) == 1


def test_per_node_gpu_memory_moves_layers_to_the_bigger_node(ray_cluster: SimCluster) -> None:
    ids = ray_cluster.node_ids
    devices = inventory(gpu_resource=SIM_GPU, gpu_memory_bytes={ids["w1"]: 3 * GiB, ids["w2"]: 12 * GiB})
    assert {d.free_bytes for d in devices if d.node_id == ids["w1"]} == {3 * GiB}
    p = plan(costs(), devices=devices)
    on = {node: sum(s.num_layers for s in p.stages if s.device.node_id == ids[node]) for node in ("w1", "w2")}
    assert on["w1"] + on["w2"] == 16 and on["w2"] > on["w1"]
    assert all(s.num_layers <= 2 for s in p.stages if s.device.node_id == ids["w1"])  # 3 GiB each


def test_unknown_gpu_memory_uses_documented_default(ray_cluster: SimCluster) -> None:
    with pytest.warns(UserWarning, match="gpu_memory_bytes"):
        devices = inventory(gpu_resource=SIM_GPU)
    assert {d.free_bytes for d in devices} == {DEFAULT_GPU_MEMORY_BYTES}


def test_cpu_fallback_lists_every_node(ray_cluster: SimCluster) -> None:
    devices = inventory(cpu_slots=2)  # no node has Ray's "GPU" resource
    assert {d.node_id for d in devices} == set(ray_cluster.node_ids.values())
    assert len(devices) == 2 * 3 and all(d.kind == "cpu" and d.free_bytes > 0 for d in devices)
    head = [d for d in devices if d.node_id == ray_cluster.head_node_id]
    assert devices[:2] == head  # the driver's node comes first
    p: Any = plan(costs(6, layer=2**20), devices=inventory(ram_budget_bytes=GiB))
    assert p.num_stages == 3 and len({s.device.node_id for s in p.stages}) == 3

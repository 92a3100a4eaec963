"""Sharding planner: plan models, cost model, partition optimality, manual ranges, local inventory."""

from __future__ import annotations

import itertools
import json
import math
import pickle
import random
import time
from typing import Any

import pytest
from pydantic import ValidationError

from inference._costs import LayerCosts, layer_costs_from_config
from inference._exceptions import PlanError
from inference._inventory import inventory, measure_throughput
from inference._plan import DeviceInfo, ShardingPlan, format_bytes
from inference._planner import plan
from tests.factories import tiny_config

MiB = 2**20
GiB = 2**30


def dev(i: int, free: int, throughput: float = 1.0, node: str = "n0", kind: str = "gpu") -> DeviceInfo:
    return DeviceInfo(device_id=f"node-{node}/{kind}:{i}", node_id=node, kind=kind, name="sim",  # type: ignore[arg-type]
                      total_bytes=free, free_bytes=free, throughput=throughput)


def uniform(n: int, layer: int = 100 * MiB, emb: int = 0, head: int = 0, kv: int = 0, act: int = 0,
            **kw: Any) -> LayerCosts:
    return LayerCosts([layer] * n, emb, head, kv, act, max_batch=1, max_seq_len=1, **kw)


# ------------------------------------------------------------------------------- reference model


def need(c: LayerCosts, i: int, j: int, first: bool, last: bool) -> int:
    """Memory of a stage, written out independently of the planner."""
    total = sum(c.param_bytes[i:j]) + (j - i) * c.kv_bytes_per_token_per_layer * c.max_batch * c.max_seq_len
    total += c.activation_bytes + (c.embedding_bytes if first else 0) + (c.head_bytes if last else 0)
    return total - (c.tied_bytes if first and last else 0)


def brute_force(c: LayerCosts, devices: list[DeviceInfo], p: int, order: str) -> float:
    """Best bottleneck over every device sequence and every contiguous split (inf: none fits)."""
    n, best = c.num_layers, math.inf
    seqs = (itertools.permutations(devices, p) if order == "auto" else itertools.combinations(devices, p))
    seqs = list(seqs)
    for cuts in itertools.combinations(range(1, n), p - 1):
        bounds = list(zip((0, *cuts), (*cuts, n)))
        for seq in seqs:
            worst = 0.0
            for s, ((i, j), d) in enumerate(zip(bounds, seq)):
                if need(c, i, j, s == 0, s == p - 1) > d.free_bytes:
                    worst = math.inf
                    break
                worst = max(worst, (sum(c.param_bytes[i:j]) + (c.head_bytes if s == p - 1 else 0)) / d.throughput)
            best = min(best, worst)
    return best


def random_instance(rng: random.Random) -> tuple[LayerCosts, list[DeviceInfo], int]:
    n_layers, n_dev = rng.randint(1, 12), rng.randint(1, 4)
    emb, head = rng.randint(0, 300) * MiB, rng.randint(0, 300) * MiB
    costs = LayerCosts(
        [rng.randint(1, 200) * MiB for _ in range(n_layers)], emb, head,
        kv_bytes_per_token_per_layer=rng.randint(0, 4096), activation_bytes=rng.randint(0, 64) * MiB,
        tied_bytes=rng.choice([0, min(emb, head)]), max_batch=rng.randint(1, 4), max_seq_len=rng.choice([16, 1024]),
    )
    share = costs.total_bytes(min(n_dev, n_layers)) / n_dev
    devices = [dev(k, int(share * rng.uniform(0.4, 1.8)), rng.choice([0.5, 1.0, 1.0, 2.0, 3.7]),
                   node=rng.choice("ab")) for k in range(n_dev)]
    p = rng.randint(1, min(n_dev, n_layers)) if rng.random() < 0.3 else min(n_dev, n_layers)
    return costs, devices, p


# ------------------------------------------------------------------------------- models


@pytest.fixture
def two_stage_plan() -> ShardingPlan:
    return plan(uniform(6, emb=10 * MiB, head=10 * MiB, kv=1000, act=MiB, arch="llama"),
                devices=[dev(0, GiB), dev(1, GiB, node="n1")], max_batch=2, max_seq_len=64)


def test_json_round_trip(two_stage_plan: ShardingPlan, tmp_path: Any) -> None:
    p = two_stage_plan
    assert ShardingPlan.from_json(p.to_json()) == p
    assert ShardingPlan.model_validate_json(p.model_dump_json()) == p
    assert ShardingPlan.load(p.save(tmp_path / "sub" / "plan.json")) == p
    assert pickle.loads(pickle.dumps(p)) == p
    d = p.stages[1].device
    assert DeviceInfo.model_validate_json(d.model_dump_json()) == d
    assert (p.max_batch, p.max_seq_len, p.arch) == (2, 64, "llama")
    assert p.stages[0].kv_bytes == 3 * 1000 * 2 * 64
    with pytest.raises(ValidationError):
        p.stages[0].layer_end = 5  # type: ignore[misc]  # frozen


@pytest.mark.parametrize("edit, match", [
    (lambda d: d["stages"][1].update(layer_start=4), "not contiguous"),
    (lambda d: d["stages"][1].update(layer_start=2), "not contiguous"),
    (lambda d: d["stages"][1].update(layer_end=5), "cover layers"),
    (lambda d: d["stages"][1].update(layer_end=d["stages"][1]["layer_start"]), "empty layer range"),
    (lambda d: d["stages"][1].update(stage=3), "numbered"),
    (lambda d: d["stages"][1].update(has_embeddings=True), "embeddings"),
    (lambda d: d["stages"][0].update(has_head=True), "head"),
    (lambda d: d["stages"][1].update(device=d["stages"][0]["device"]), "more than one stage"),
    (lambda d: d.update(bottleneck=d["bottleneck"] * 2), "bottleneck"),
    (lambda d: d.update(stages=[]), "at least 1"),
])
def test_validation_rejects_broken_plans(two_stage_plan: ShardingPlan, edit: Any, match: str) -> None:
    data = two_stage_plan.model_dump()
    edit(data)
    with pytest.raises(ValidationError, match=match):
        ShardingPlan.model_validate(data)
    with pytest.raises(ValidationError, match=match):  # the same on arrival as JSON
        ShardingPlan.from_json(json.dumps(data))


def test_print_shows_every_stage(capsys: pytest.CaptureFixture[str]) -> None:
    p = plan(uniform(10), devices=[dev(0, GiB), dev(1, GiB), dev(2, GiB)])
    print(p)
    out = capsys.readouterr().out
    for s in p.stages:
        assert f"{s.layer_start}-{s.layer_end - 1}" in out and s.device.device_id in out
    assert "headroom" in out and format_bytes(p.stages[0].headroom_bytes) in out
    assert "\x1b[" not in out  # plain text, no ANSI codes


# ------------------------------------------------------------------------------- partition


@pytest.mark.parametrize("order", ["auto", "given"])
def test_random_instances_match_brute_force(order: str) -> None:
    rng = random.Random(1234 if order == "auto" else 99)
    fitted = 0
    for _ in range(300):
        costs, devices, p = random_instance(rng)
        best = brute_force(costs, devices, p, order)
        if math.isinf(best):
            with pytest.raises(PlanError, match="lacks"):
                plan(costs, devices=devices, num_stages=p, order=order)  # type: ignore[arg-type]
            continue
        fitted += 1
        result = plan(costs, devices=devices, num_stages=p, order=order)  # type: ignore[arg-type]
        ranges = result.layer_ranges
        assert ranges[0][0] == 0 and ranges[-1][1] == costs.num_layers and len(ranges) == p
        assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges)) and all(j > i for i, j in ranges)
        for s in result.stages:
            assert need(costs, s.layer_start, s.layer_end, s.has_embeddings, s.has_head) <= s.device.free_bytes
            assert s.headroom_bytes >= 0
        if order == "given":  # chosen devices keep the order they were given in
            positions = [devices.index(s.device) for s in result.stages]
            assert positions == sorted(positions)
        assert best * (1 - 1e-9) <= result.bottleneck <= best * 1.05
    assert 60 < fitted < 280  # the generator exercises both outcomes


def test_faster_device_gets_more_layers() -> None:
    devices = [dev(0, 10 * GiB, throughput=1.0), dev(1, 10 * GiB, throughput=3.0)]
    for order in ("auto", "given"):
        p = plan(uniform(12), devices=devices, order=order)  # type: ignore[arg-type]
        layers = {s.device.device_id: s.num_layers for s in p.stages}
        assert layers == {"node-n0/gpu:0": 3, "node-n0/gpu:1": 9}
    equal = plan(uniform(12), devices=[dev(0, 10 * GiB), dev(1, 10 * GiB)])
    assert [s.num_layers for s in equal.stages] == [6, 6]


def test_memory_bound_moves_layers_off_small_device() -> None:
    small, big = dev(0, 350 * MiB), dev(1, 10 * GiB)
    p = plan(uniform(12), devices=[small, big], order="given")
    on_small = p.stages[0]
    assert on_small.device == small and on_small.num_layers == 3 and on_small.headroom_bytes >= 0
    assert p.stages[1].num_layers == 9


def test_embeddings_head_and_tied_matrix_are_counted() -> None:
    costs = uniform(4, layer=100, emb=1000, head=1200, tied_bytes=1000)
    one = plan(costs, devices=[dev(0, GiB)])
    assert one.stages[0].param_bytes == 400 + 1000 + 1200 - 1000  # the shared matrix once
    two = plan(costs, devices=[dev(0, GiB), dev(1, GiB)], layer_ranges=[(0, 2), (2, 4)])
    assert [s.param_bytes for s in two.stages] == [200 + 1000, 200 + 1200]  # each stage holds its copy
    # the head is compute on the last stage: with a big head it gets fewer layers
    heavy = plan(uniform(8, layer=100, head=400), devices=[dev(0, GiB), dev(1, GiB)], order="given")
    assert [s.num_layers for s in heavy.stages] == [6, 2]


def test_num_stages_picks_best_subset_and_limits() -> None:
    devices = [dev(0, 200 * MiB, throughput=0.5), dev(1, 10 * GiB), dev(2, 10 * GiB, node="n1")]
    p = plan(uniform(8), devices=devices, num_stages=2)
    assert {s.device.device_id for s in p.stages} == {"node-n0/gpu:1", "node-n1/gpu:2"}
    assert plan(uniform(2), devices=devices).num_stages == 2  # never more stages than layers
    with pytest.raises(PlanError, match="exceeds the model's 2 layers"):
        plan(uniform(2), devices=devices, num_stages=3)
    with pytest.raises(PlanError, match="3 device"):
        plan(uniform(8), devices=devices, num_stages=4)
    with pytest.raises(PlanError, match="no devices"):
        plan(uniform(8), devices=[])


def test_auto_order_keeps_nodes_together() -> None:
    devices = [dev(0, GiB, node="a"), dev(1, GiB, node="b"), dev(2, GiB, node="a"), dev(3, GiB, node="b")]
    nodes = [s.device.node_id for s in plan(uniform(8), devices=devices).stages]
    assert nodes in (["a", "a", "b", "b"], ["b", "b", "a", "a"])
    given = [s.device.node_id for s in plan(uniform(8), devices=devices, order="given").stages]
    assert given == ["a", "b", "a", "b"]


def test_does_not_fit_names_missing_bytes_and_device() -> None:
    costs = uniform(4, layer=1000, emb=100, head=100, kv=1, act=0).replace(max_batch=2, max_seq_len=50)
    gpu = dev(7, 3000, node="x")
    with pytest.raises(PlanError) as info:
        plan(costs, devices=[gpu])
    err, missing = info.value, costs.total_bytes(1) - 3000  # 4000 + 200 + 4 * 100 - 3000
    assert missing == 1600 and err.missing_bytes == missing  # type: ignore[attr-defined]
    assert err.device == "node-x/gpu:7" and err.stage == 0  # type: ignore[attr-defined]
    text = str(err)
    for part in (format_bytes(missing), "node-x/gpu:7", "max_batch (2)", "max_seq_len (50)", "dtype", "add a device"):
        assert part in text
    back = pickle.loads(pickle.dumps(err))  # crosses Ray processes with its context
    assert type(back) is PlanError and back.missing_bytes == missing and str(back) == text  # type: ignore[attr-defined]
    # lowering max_batch as the message suggests is enough here
    assert plan(costs, devices=[gpu], max_batch=1, dtype="float16").stages[0].headroom_bytes >= 0


def test_layer_too_big_for_any_device_is_reported() -> None:
    costs = LayerCosts([100, 5000, 100, 100], 0, 0, 0, 0, max_batch=1, max_seq_len=1)
    with pytest.raises(PlanError) as info:
        plan(costs, devices=[dev(0, 4000), dev(1, 4000, node="n1")])
    # the closest split puts layers 0-1 on one device: 5100 bytes where 4000 are free
    assert "stage 0 (layers 0-1) on node-n0/gpu:0 lacks 1.07 KiB" in str(info.value)
    assert info.value.missing_bytes == 1100  # type: ignore[attr-defined]


def test_manual_layer_ranges_are_honored() -> None:
    devices = [dev(0, GiB, node="b"), dev(1, GiB, node="a")]
    p = plan(uniform(6), devices=devices, layer_ranges=[(0, 1), (1, 6)])
    assert p.layer_ranges == [(0, 1), (1, 6)] and [s.device for s in p.stages] == devices
    assert plan(uniform(6), devices=devices[:1], layer_ranges=[[0, 6]]).layer_ranges == [(0, 6)]


@pytest.mark.parametrize("ranges, match", [
    ([(0, 2), (3, 6)], r"gap: layers 2-2 .*\(3, 6\)"),
    ([(0, 4), (3, 6)], r"overlap: layer_ranges\[1\] = \(3, 6\)"),
    ([(0, 4), (4, 7)], r"layer_ranges\[1\] = \(4, 7\) is out of range"),
    ([(0, 4), (4, 4)], r"layer_ranges\[1\] = \(4, 4\) is empty"),
    ([(1, 3), (3, 6)], r"layers 0-0 are in no range"),
    ([(0, 2), (2, 5)], r"layers 5-5 are in no range"),
    ([(0, 6)], r"1 range\(s\) but 2 device"),
    ([(0, 2), (2, 4), (4, 6)], r"3 range\(s\) but 2 device"),
    ([(0, "x"), (2, 6)], r"not a \(start, end\) pair"),
])
def test_bad_manual_ranges_are_rejected(ranges: list[Any], match: str) -> None:
    with pytest.raises(PlanError, match=match):
        plan(uniform(6), devices=[dev(0, GiB), dev(1, GiB)], layer_ranges=ranges)


def test_manual_ranges_that_do_not_fit() -> None:
    with pytest.raises(PlanError, match=r"stage 0 \(layers 0-4\) on node-n0/gpu:0 lacks 100\.00 MiB") as info:
        plan(uniform(6), devices=[dev(0, 400 * MiB), dev(1, GiB)], layer_ranges=[(0, 5), (5, 6)])
    assert info.value.missing_bytes == 100 * MiB  # type: ignore[attr-defined]
    with pytest.raises(PlanError, match="num_stages=1"):
        plan(uniform(6), devices=[dev(0, GiB), dev(1, GiB)], layer_ranges=[(0, 3), (3, 6)], num_stages=1)


def test_larger_problem_is_fast() -> None:
    rng = random.Random(5)
    costs = LayerCosts([rng.randint(90, 110) * MiB for _ in range(80)], GiB, GiB, 4096, GiB)
    devices = [dev(k, rng.choice([24, 40, 80]) * GiB, rng.choice([1.0, 1.5, 2.0]), node=f"n{k // 4}")
               for k in range(8)]
    t0 = time.perf_counter()
    p = plan(costs, devices=devices)
    assert time.perf_counter() - t0 < 10 and p.num_stages == 8
    lower = (sum(costs.param_bytes) + costs.head_bytes) / sum(d.throughput for d in devices)
    assert p.bottleneck < 1.6 * lower  # close to a perfect proportional split


# ------------------------------------------------------------------------------- cost model


def test_layer_costs_from_llama_and_gpt2_configs() -> None:
    llama = layer_costs_from_config(tiny_config("llama"), [1000] * 4, 500, 600, "float32", 2, 16)
    assert llama.kv_bytes_per_token_per_layer == 2 * 2 * 16 * 4  # K+V × kv heads × head_dim × fp32
    assert llama.kv_bytes_per_layer == 256 * 2 * 16 and llama.tied_bytes == 0 and llama.arch == "llama"
    gpt2 = layer_costs_from_config(tiny_config("gpt2"), [1000] * 4, 40000, 256, "bfloat16", 1, 8,
                                   source_dtype="float32")
    assert gpt2.kv_bytes_per_token_per_layer == 2 * 4 * 16 * 2  # no GQA: kv heads = n_head
    matrix = 128 * 64 * 2
    assert gpt2.param_bytes == (500,) * 4 and gpt2.embedding_bytes == 20000  # rescaled to bf16
    assert gpt2.head_bytes == 128 + matrix and gpt2.tied_bytes == matrix  # the head needs the tied matrix
    assert gpt2.activation_bytes > 0 and gpt2.dtype == "bfloat16"
    assert llama.with_dtype("float16").kv_bytes_per_token_per_layer == 128
    with pytest.raises(PlanError, match="unknown dtype"):
        layer_costs_from_config(tiny_config("llama"), [1] * 4, 1, 1, "float7", 1, 1)


def test_plan_from_checkpoint(tiny_llama: Any) -> None:
    pytest.importorskip("inference._checkpoint")
    p = plan(tiny_llama, devices=[dev(0, GiB), dev(1, GiB)], max_batch=1, max_seq_len=16)
    assert p.arch == "llama" and p.num_layers == 4 and p.model_path == str(tiny_llama)
    assert p.stages[0].kv_bytes == 2 * 256 * 16 and p.stages[1].param_bytes > 0


# ------------------------------------------------------------------------------- inventory


def test_inventory_local_cpu_slots(ray_local: Any) -> None:
    import ray

    devices = inventory()
    here = ray.get_runtime_context().get_node_id()
    assert devices and all(d.kind == "cpu" and d.free_bytes > 0 and d.ray_resource is None for d in devices)
    assert devices[0].node_id == here
    slots = inventory(ram_budget_bytes=3 * GiB, cpu_slots=3)
    assert [d.free_bytes for d in slots] == [GiB] * 3
    assert len({d.device_id for d in slots}) == 3
    p = plan(uniform(6, layer=10 * MiB), devices=slots)
    assert p.num_stages == 3 and {s.device.node_id for s in p.stages} == {here}
    with pytest.raises(PlanError, match="cpu_slots"):
        inventory(cpu_slots=0)


def test_gpu_memory_sources_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    from inference import _inventory

    node = {"NodeID": "ab" * 28, "Resources": {"GPU": 2.0, "accelerator_type:H100": 1.0}}
    monkeypatch.setattr(_inventory, "_local_cuda", lambda count: [(70 * GiB, 80 * GiB, "NVIDIA H100")] * count)
    live = _inventory._gpu_devices(node, 2, True, "GPU", None)  # the driver's node: measured
    assert [(d.free_bytes, d.total_bytes, d.name) for d in live] == [(70 * GiB, 80 * GiB, "NVIDIA H100")] * 2
    assert [d.device_id for d in live] == ["node-abababab/gpu:0", "node-abababab/gpu:1"]
    assert _inventory._gpu_devices(node, 2, True, "GPU", 5 * GiB)[0].free_bytes == 5 * GiB  # explicit wins
    remote = dict(node, Resources={**node["Resources"], "gpu_memory_bytes": float(40 * GiB)})
    far = _inventory._gpu_devices(remote, 2, False, "GPU", None)  # another node: its resource
    assert {(d.free_bytes, d.name) for d in far} == {(40 * GiB, "H100")}
    with pytest.warns(UserWarning, match="assuming 16 GiB"):
        assert _inventory._gpu_devices(node, 1, False, "GPU", None)[0].free_bytes == 16 * GiB


def test_inventory_needs_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    with pytest.raises(PlanError, match="ray.init"):
        inventory()


def test_measure_throughput_is_positive() -> None:
    fast = measure_throughput("cpu", size=64, repeats=3)
    assert fast > 0 and math.isfinite(fast)

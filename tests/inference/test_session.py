"""Sharded generation on real Ray: stage actors, pipelined micro-batches, sampling, failover."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import ray
import torch
from transformers import AutoModelForCausalLM

import hive
import inference
from tests.factories import make_tiny_model

pytestmark = pytest.mark.integration

PROMPTS = [[5, 6, 7, 8], [9, 10], [11, 12, 13], [14], [15, 16, 17, 18, 19], [20, 21]]


@pytest.fixture(scope="module")
def llama8(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model("llama", tmp_path_factory.mktemp("llama8"), n_layers=8)


@pytest.fixture
def client(ray_local: Any, hive_home: Path) -> Iterator[hive.Client]:
    c = hive.init(home=hive_home, heartbeat_interval_s=0.5, heartbeat_timeout_s=10.0)  # a SIGKILL is seen at once; loaded CI machines stall heartbeats
    yield c
    hive.shutdown(stop_cluster=True)


def _reference(path: Path, prompts: list[list[int]], n: int) -> list[list[int]]:
    model = AutoModelForCausalLM.from_pretrained(path)
    return [model.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False, eos_token_id=[])[0, len(p):].tolist()
            for p in prompts]


@pytest.mark.parametrize("stages", [1, 2, 3])
def test_greedy_matches_hf_generate(client: hive.Client, llama8: Path, stages: int) -> None:
    plan = inference.plan(str(llama8), max_batch=8, max_seq_len=128, num_stages=stages)
    session = inference.deploy(plan, name=f"g{stages}")
    try:
        out = session.generate(PROMPTS, max_new_tokens=32, stop=[], microbatches=3)
        assert [c.token_ids for c in out] == _reference(llama8, PROMPTS, 32)
        assert all(c.finish_reason == "length" for c in out)
        stats = session.status()["stages"]
        assert [(s["layer_start"], s["layer_end"]) for s in stats] == plan.layer_ranges
        assert len({s["pid"] for s in stats}) == stages  # one process per stage
    finally:
        session.undeploy()
    assert inference.deployments() == []


def test_microbatches_in_flight_overlap(client: hive.Client, llama8: Path) -> None:
    session = inference.deploy(inference.plan(str(llama8), max_batch=8, max_seq_len=64, num_stages=2), name="ov")
    try:
        one = session.generate(PROMPTS, max_new_tokens=8, stop=[], microbatches=1)
        many = session.generate(PROMPTS, max_new_tokens=8, stop=[], microbatches=6)
        assert [c.token_ids for c in one] == [c.token_ids for c in many]  # grouping never changes results
        steps = ray.get(session.coordinator.info.remote())["last_stats"]["steps"]
        assert steps == 6 * 8  # each micro-batch stepped on its own
    finally:
        session.undeploy()


def test_sampling_seeded_reproducible_and_streaming(client: hive.Client, llama8: Path) -> None:
    session = inference.deploy(inference.plan(str(llama8), max_batch=8, max_seq_len=64, num_stages=2), name="smp")
    try:
        kw = dict(max_new_tokens=12, stop=[], temperature=0.9, top_k=40, top_p=0.95)
        a = session.generate(PROMPTS[:3], seed=7, **kw)
        b = session.generate(PROMPTS[:3], seed=7, microbatches=1, **kw)
        c = session.generate(PROMPTS[:3], seed=8, **kw)
        assert [x.token_ids for x in a] == [x.token_ids for x in b]
        assert [x.token_ids for x in a] != [x.token_ids for x in c]
        chunks = list(session.generate(PROMPTS[0], max_new_tokens=5, stop=[], stream=True))
        assert [ch.request for ch in chunks] == [0] * 5 and chunks[-1].finished and not chunks[0].finished
        stop_tok = _reference(llama8, [PROMPTS[0]], 3)[0][2]
        stopped = session.generate([PROMPTS[0]], max_new_tokens=20, stop=[stop_tok])[0]
        assert stopped.token_ids[-1] == stop_tok and stopped.finish_reason == "stop"
    finally:
        session.undeploy()


def test_stage_sigkill_mid_generation_same_output(client: hive.Client, llama8: Path) -> None:
    session = inference.deploy(inference.plan(str(llama8), max_batch=8, max_seq_len=128, num_stages=2), name="kill")
    try:
        expected = [c.token_ids for c in session.generate(PROMPTS, max_new_tokens=40, stop=[], microbatches=3)]
        victim = session.status()["stages"][1]["pid"]
        seen: list[Any] = []

        def killer() -> None:
            while len(seen) < 30:
                time.sleep(0.005)
            os.kill(victim, signal.SIGKILL)

        t = threading.Thread(target=killer)
        t.start()
        got: dict[int, list[int]] = {i: [] for i in range(len(PROMPTS))}
        for ch in session.generate(PROMPTS, max_new_tokens=40, stop=[], microbatches=3, stream=True):
            seen.append(ch)
            got[ch.request].append(ch.token_id)
        t.join()
        assert [got[i] for i in range(len(PROMPTS))] == expected
        info = ray.get(session.coordinator.info.remote())
        assert info["recoveries"] and info["recoveries"][-1] < 30
        stage_id = session.record["stages"][1]
        types = [e.type for e in client.events(agent_id=stage_id)]
        assert "agent.failed" in types and "agent.restarted" in types and types.count("agent.ready") == 2
        rebuilt = [e for e in client.events(types="ext.event") if e.topic == "inference.kv_rebuilt"]
        assert rebuilt and rebuilt[-1].data["deployment"] == "kill"
    finally:
        session.undeploy()


def test_rebalance_proposes_when_stages_are_uneven(client: hive.Client, llama8: Path) -> None:
    plan = inference.plan(str(llama8), max_batch=8, max_seq_len=64, num_stages=2)
    skewed = inference.plan(str(llama8), max_batch=8, max_seq_len=64, devices=[s.device for s in plan.stages],
                            layer_ranges=[(0, 1), (1, 8)])
    session = inference.deploy(skewed, name="reb")
    try:
        ray.get(session.coordinator.reset_stats.remote())
        session.generate(PROMPTS, max_new_tokens=16, stop=[], microbatches=2)
        proposal = session.rebalance(margin=0.2)
        assert proposal["needed"] and proposal["imbalance"] > 1.2
        new = proposal["proposal"]
        assert new is not None and new.layer_ranges[0][1] > 1  # moves layers onto the light stage
        applied = session.rebalance(margin=0.2, apply=True)
        assert applied["applied"] and session.plan.layer_ranges == applied["proposal"].layer_ranges
        out = session.generate(PROMPTS[:2], max_new_tokens=8, stop=[])
        assert [c.token_ids for c in out] == _reference(llama8, PROMPTS[:2], 8)
    finally:
        session.undeploy()


def test_deploy_errors(client: hive.Client, llama8: Path) -> None:
    plan = inference.plan(str(llama8), max_batch=8, max_seq_len=64, num_stages=1)
    session = inference.deploy(plan, name="dup")
    try:
        with pytest.raises(inference.InferenceError, match="exists"):
            inference.deploy(plan, name="dup")
        with pytest.raises(inference.InferenceError, match="known: \\['dup'\\]"):
            inference.attach("nope")
        with pytest.raises(inference.InferenceError, match="max_new_tokens"):
            session.generate([[1, 2]], max_new_tokens=0)
        assert inference.attach("dup").generate([[3, 4]], max_new_tokens=2, stop=[])[0].token_ids
    finally:
        session.undeploy()

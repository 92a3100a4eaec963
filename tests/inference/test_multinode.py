"""Sharded inference on the simulated multi-node cluster: stages land on different nodes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import hive
import inference
from tests.factories import SIM_GPU, SimCluster

pytestmark = pytest.mark.integration


def test_stages_placed_on_different_nodes(ray_cluster: SimCluster, hive_home: Path, tiny_llama: Path) -> None:
    client = hive.init(home=hive_home)
    try:
        devices = inference.inventory(gpu_resource=SIM_GPU, gpu_memory_bytes=2**30)
        w1, w2 = ray_cluster.node_ids["w1"], ray_cluster.node_ids["w2"]
        chosen = [next(d for d in devices if d.node_id == w1), next(d for d in devices if d.node_id == w2)]
        plan = inference.plan(str(tiny_llama), devices=chosen, max_batch=4, max_seq_len=64, order="given")
        session = inference.deploy(plan, name="multi")
        try:
            nodes = {a["agent_id"]: a["node_id"] for a in client.agents()}
            assert [nodes[aid] for aid in session.record["stages"]] == [w1, w2]
            prompt = [5, 6, 7, 8]
            out = session.generate([prompt], max_new_tokens=12, stop=[])[0].token_ids
            model = AutoModelForCausalLM.from_pretrained(tiny_llama)
            ref = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=[])
            assert out == ref[0, len(prompt):].tolist()
        finally:
            session.undeploy()
    finally:
        hive.shutdown(stop_cluster=True)

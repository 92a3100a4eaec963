"""The shared test harness does what conftest.py / factories.py promise.

Tiny checkpoints are real, loadable and reproducible; the Ray fixtures give a working local
instance and a simulated cluster whose custom resources steer placement; the gpu marker skips
without CUDA; the polling helpers fail when they should.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from tests.conftest import GPU_SKIP_REASON
from tests.factories import (
    RAY_STATE,
    REPO_ROOT,
    SimCluster,
    WorkerSpec,
    ensure_local_ray,
    file_sha256,
    free_port,
    make_tiny_model,
    wait_until,
)

PROMPT = torch.tensor([[1, 72, 105, 33, 10, 65]])  # "<s>Hi!\nA" in the tiny ASCII vocab


def _logits(path: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        return model(PROMPT).logits  # (batch=1, seq=6, vocab=128)


# --------------------------------------------------------------------------------------------
# Tiny models
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fixture_name", ["tiny_gpt2", "tiny_llama"])
def test_tiny_model_is_a_loadable_reproducible_checkpoint(
    fixture_name: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    path: Path = request.getfixturevalue(fixture_name)
    arch = fixture_name.removeprefix("tiny_")
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()

    logits = _logits(path)
    assert logits.shape == (1, PROMPT.shape[1], 128)
    assert torch.isfinite(logits).all()

    same = make_tiny_model(arch, tmp_path / "same", seed=0)
    assert file_sha256(same / "model.safetensors") == file_sha256(path / "model.safetensors")
    assert torch.equal(_logits(same), logits)

    other = make_tiny_model(arch, tmp_path / "other", seed=1)
    assert file_sha256(other / "model.safetensors") != file_sha256(path / "model.safetensors")
    assert not torch.allclose(_logits(other), logits)


def test_tiny_configs_have_the_promised_shapes(tiny_gpt2: Path, tiny_llama: Path) -> None:
    from transformers import AutoConfig

    gpt2 = AutoConfig.from_pretrained(tiny_gpt2)
    assert (gpt2.model_type, gpt2.n_layer, gpt2.n_embd, gpt2.n_head) == ("gpt2", 4, 64, 4)
    assert (gpt2.vocab_size, gpt2.n_positions) == (128, 128)

    llama = AutoConfig.from_pretrained(tiny_llama)
    assert llama.model_type == "llama"
    assert (llama.num_hidden_layers, llama.hidden_size, llama.intermediate_size) == (4, 64, 128)
    assert (llama.num_attention_heads, llama.num_key_value_heads) == (4, 2)  # GQA
    assert llama.vocab_size == 128 and llama.tie_word_embeddings is False
    for cfg in (gpt2, llama):  # generation needs special ids inside the tiny vocab
        assert 0 <= cfg.eos_token_id < cfg.vocab_size and 0 <= cfg.bos_token_id < cfg.vocab_size


def test_layer_count_and_dtype_are_honoured(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    path = make_tiny_model("llama", tmp_path / "m", n_layers=2, dtype=torch.bfloat16)
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
        dtypes = {f.get_tensor(k).dtype for k in keys}
    assert dtypes == {torch.bfloat16}
    assert {k.split(".")[2] for k in keys if k.startswith("model.layers.")} == {"0", "1"}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    assert len(model.model.layers) == 2


def test_tied_llama_variant_shares_embedding_and_head(
    tiny_llama_tied: Path, tiny_llama: Path
) -> None:
    from transformers import AutoModelForCausalLM

    tied: Any = AutoModelForCausalLM.from_pretrained(tiny_llama_tied)
    assert tied.config.tie_word_embeddings is True
    assert tied.lm_head.weight.data_ptr() == tied.get_input_embeddings().weight.data_ptr()
    with safe_open(str(tiny_llama_tied / "model.safetensors"), framework="pt") as f:
        assert "lm_head.weight" not in set(f.keys())  # stored once, as the embedding

    untied: Any = AutoModelForCausalLM.from_pretrained(tiny_llama)
    assert untied.lm_head.weight.data_ptr() != untied.get_input_embeddings().weight.data_ptr()
    assert not torch.equal(untied.lm_head.weight, untied.get_input_embeddings().weight)
    with safe_open(str(tiny_llama / "model.safetensors"), framework="pt") as f:
        assert "lm_head.weight" in set(f.keys())


def test_tiny_tokenizer_round_trips_and_generates(tiny_gpt2: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_gpt2)
    text = "Hello, hive!\n  x"
    ids = tok(text)["input_ids"]
    assert ids == [ord(c) for c in text]  # one token per ASCII character
    assert tok.decode(ids) == text
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 3)

    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()
    out = model.generate(
        torch.tensor([ids]), max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=3
    )
    assert out.shape == (1, len(ids) + 5)
    assert int(out.max()) < 128


# --------------------------------------------------------------------------------------------
# Helpers and markers
# --------------------------------------------------------------------------------------------


def test_wait_until_returns_value_and_times_out_with_message() -> None:
    start = time.monotonic()
    calls: list[int] = []

    def third_time() -> int | None:
        calls.append(1)
        return 42 if len(calls) >= 3 else None

    assert wait_until(third_time, timeout_s=5, interval_s=0.01) == 42
    with pytest.raises(AssertionError, match="the moon to turn blue"):
        wait_until(lambda: False, timeout_s=0.1, interval_s=0.01, message="the moon to turn blue")
    assert time.monotonic() - start < 3


def test_free_port_can_be_bound() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


@pytest.mark.gpu
def test_gpu_marker_runs_only_with_cuda() -> None:
    assert torch.cuda.is_available()  # only reached on a CUDA machine
    assert torch.ones(2, device="cuda").sum().item() == 2.0


def test_gpu_marked_tests_are_skipped_without_cuda(tmp_path: Path) -> None:
    """Runs an inner pytest session that uses this conftest, in a subprocess."""
    (tmp_path / "conftest.py").write_text("from tests.conftest import *  # noqa: F403\n")
    (tmp_path / "test_inner.py").write_text(
        textwrap.dedent(
            """
            import pytest

            @pytest.mark.gpu
            def test_needs_gpu():
                import torch
                assert torch.cuda.is_available()

            @pytest.mark.slow
            def test_slow_runs_by_default():
                pass
            """
        )
    )
    (tmp_path / "pytest.ini").write_text(
        "[pytest]\naddopts = --strict-markers -rs -p no:cacheprovider\n"
        "markers =\n    gpu: needs a GPU\n    slow: slow\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(tmp_path)],
        check=False,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    if torch.cuda.is_available():
        assert "2 passed" in out, out
    else:
        assert "1 passed, 1 skipped" in out, out
        assert GPU_SKIP_REASON in out, out


# --------------------------------------------------------------------------------------------
# Ray: local instance
# --------------------------------------------------------------------------------------------


def test_ray_local_runs_tasks_in_the_hive_namespace(ray_local: Any) -> None:
    import ray

    @ray.remote
    def add(a: int, b: int) -> tuple[int, str, str]:
        import tests.factories  # workers see the checkout on PYTHONPATH

        return a + b, ray.get_runtime_context().namespace, tests.factories.SIM_GPU

    assert ray.get(add.remote(2, 3)) == (5, "hive", "sim_gpu")
    assert ray.cluster_resources()["CPU"] == 4
    assert ray_local.address_info["gcs_address"] == RAY_STATE.gcs_address


def test_ray_local_is_reused_and_restarted_when_gone(ray_local: Any) -> None:
    import ray

    assert ensure_local_ray() is ray_local  # same instance, no restart
    first = RAY_STATE.gcs_address
    ray.shutdown()  # e.g. a test (or hive itself) shut Ray down
    again = ensure_local_ray()
    assert ray.is_initialized() and RAY_STATE.gcs_address != first
    assert ray.get(ray.put("still works")) == "still works"
    assert again.address_info["gcs_address"] == RAY_STATE.gcs_address


def test_ray_local_refuses_to_replace_a_connected_cluster(
    ray_local: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(RAY_STATE, "kind", "cluster")
    monkeypatch.setattr(RAY_STATE, "owner", "a ray_cluster fixture")
    with pytest.raises(RuntimeError, match="not both"):
        ensure_local_ray()


def test_hive_home_is_an_empty_env_dir(hive_home: Path) -> None:
    assert os.environ["HIVE_HOME"] == str(hive_home)
    assert hive_home.is_dir() and not any(hive_home.iterdir())


# --------------------------------------------------------------------------------------------
# Ray: simulated multi-node cluster (these are last in the module; ray_cluster tears
# ray_local's instance down, and the next ray_local user starts it again)
# --------------------------------------------------------------------------------------------


def _node_of(resources: dict[str, float]) -> str:
    import ray

    @ray.remote(num_cpus=0)
    class Where:
        def node_id(self) -> str:
            return ray.get_runtime_context().get_node_id()

    where: Any = Where
    actor = where.options(resources=resources).remote()
    try:
        return str(ray.get(actor.node_id.remote(), timeout=60))
    finally:
        ray.kill(actor)


@pytest.mark.integration
def test_custom_resources_steer_actors_to_nodes(ray_cluster: SimCluster) -> None:
    import ray

    ids = ray_cluster.node_ids
    assert set(ids) == {"head", "w1", "w2"} and len(set(ids.values())) == 3
    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert alive == set(ids.values())
    assert ray.cluster_resources()["sim_gpu"] == 4 and ray.cluster_resources()["CPU"] == 5

    assert ray_cluster.node_resources == {"head": "head", "w1": "node_w1", "w2": "node_w2"}
    on_w1 = _node_of({"node_w1": 1})
    on_w2 = _node_of({"node_w2": 1})
    assert (on_w1, on_w2) == (ids["w1"], ids["w2"])
    assert _node_of({"head": 1}) == ray_cluster.head_node_id
    for _ in range(3):
        assert _node_of({"sim_gpu": 1}) in {ids["w1"], ids["w2"]}


@pytest.mark.integration
def test_cluster_nodes_can_be_added_and_removed(ray_cluster: SimCluster) -> None:
    import ray

    new_id = ray_cluster.add_worker(WorkerSpec("w3", num_cpus=1, sim_gpus=1))
    assert ray_cluster.node_ids["w3"] == new_id
    assert _node_of({"node_w3": 1}) == new_id

    removed = ray_cluster.remove_worker("w3", allow_graceful=False)
    assert removed == new_id and "w3" not in ray_cluster.node_ids
    assert new_id not in {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert ray.cluster_resources()["sim_gpu"] == 4
    with pytest.raises(KeyError, match="w3"):
        ray_cluster.remove_worker("w3")

"""Checkpoint: facts and byte counts from headers, selective reads, sharded files, clear errors."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from inference._checkpoint import Checkpoint
from inference._exceptions import CheckpointError
from inference._stage import StageCompute
from tests.inference.helpers import CUTS, pipeline, prompts, reference


@pytest.mark.parametrize(
    "model_dir,arch,architecture,tied",
    [
        ("tiny_gpt2", "gpt2", "GPT2LMHeadModel", True),
        ("tiny_llama", "llama", "LlamaForCausalLM", False),
        ("tiny_llama_tied", "llama", "LlamaForCausalLM", True),
        ("tiny_qwen2", "llama", "Qwen2ForCausalLM", False),
        ("tiny_mistral", "llama", "MistralForCausalLM", False),
    ],
    indirect=["model_dir"],
)
def test_facts(model_dir: Path, arch: str, architecture: str, tied: bool) -> None:
    ckpt = Checkpoint.open(model_dir)
    assert (ckpt.arch, ckpt.architecture, ckpt.tied_embeddings) == (arch, architecture, tied)
    assert (ckpt.num_layers, ckpt.hidden_size, ckpt.vocab_size) == (4, 64, 128)


@pytest.mark.parametrize("model_dir", ["tiny_gpt2", "tiny_llama", "tiny_llama_tied"], indirect=True)
def test_byte_counts_match_the_model(model_dir: Path) -> None:
    ckpt = Checkpoint.open(model_dir)
    model = reference(model_dir)
    params = dict(model.named_parameters())  # a tied matrix appears once

    def nbytes(prefix: str) -> int:
        return sum(p.numel() * 4 for n, p in params.items() if n.startswith(prefix))

    base = ckpt.spec.base
    per_layer = ckpt.param_bytes_per_layer()
    assert per_layer == [nbytes(f"{base}.{ckpt.spec.layers}.{i}.") for i in range(4)]
    assert ckpt.param_bytes_per_layer(torch.bfloat16) == [b // 2 for b in per_layer]
    embedding = model.get_input_embeddings().weight
    assert ckpt.embedding_bytes == sum(
        p.numel() * 4 for n, p in params.items() if n in ckpt.spec.embedding_names()
    )
    head = embedding.numel() * 4 + nbytes(f"{base}.{ckpt.spec.norm}.")  # the head is V x H
    assert ckpt.head_bytes == head
    stored = sum(per_layer) + ckpt.embedding_bytes + ckpt.head_bytes
    extra = embedding.numel() * 4 if ckpt.tied_embeddings else 0  # counted for both ends
    assert stored - extra == sum(p.numel() * 4 for p in params.values())


def test_read_returns_only_what_was_asked(tiny_llama: Path) -> None:
    ckpt = Checkpoint.open(tiny_llama)
    names = ["model.layers.2.mlp.up_proj.weight", "model.norm.weight"]
    got = ckpt.read(names, dtype=torch.bfloat16)
    assert sorted(got) == sorted(names)
    assert all(t.dtype == torch.bfloat16 for t in got.values())
    ref = dict(reference(tiny_llama).named_parameters())
    assert torch.equal(got["model.norm.weight"], ref["model.norm.weight"].bfloat16())
    assert ckpt.tensors[names[0]].shape == (128, 64)


def test_sharded_checkpoint(tiny_llama: Path, tmp_path: Path) -> None:
    sharded = tmp_path / "sharded"
    reference(tiny_llama).save_pretrained(sharded, max_shard_size="40KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 2 and not (sharded / "model.safetensors").exists()
    ckpt = Checkpoint.open(sharded)
    assert set(ckpt.tensors) == set(Checkpoint.open(tiny_llama).tensors)
    assert {info.file for info in ckpt.tensors.values()} == files
    ids = torch.tensor(prompts([7], seed=9))
    with torch.no_grad():
        want = reference(tiny_llama)(ids).logits
    assert (pipeline(sharded, CUTS[2]).forward("s", ids) - want).abs().max().item() <= 1e-5


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist") as info:
        Checkpoint.open(tmp_path / "nope")
    assert info.value.path == str(tmp_path / "nope")


def test_missing_config(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no config.json"):
        Checkpoint.open(tmp_path)


def test_no_safetensors_says_how_to_convert(tiny_llama: Path, tmp_path: Path) -> None:
    shutil.copy(tiny_llama / "config.json", tmp_path / "config.json")
    (tmp_path / "model.Q4_1.gguf").write_bytes(b"GGUF")
    with pytest.raises(
        CheckpointError, match=r"no safetensors weights .*model\.Q4_1\.gguf"
    ) as info:
        Checkpoint.open(tmp_path)
    assert "inference.convert_gguf(" in str(info.value)
    assert "save_pretrained(" in str(info.value)


def test_unsupported_architecture_lists_supported(tiny_llama: Path, tmp_path: Path) -> None:
    from transformers import BertConfig

    BertConfig(architectures=["BertForMaskedLM"]).save_pretrained(tmp_path)
    shutil.copy(tiny_llama / "model.safetensors", tmp_path)
    with pytest.raises(CheckpointError, match="unsupported architecture BertForMaskedLM") as info:
        Checkpoint.open(tmp_path)
    assert "LlamaForCausalLM" in str(info.value) and "GPT2LMHeadModel" in str(info.value)
    assert info.value.architecture == "BertForMaskedLM"


def test_missing_tensor_is_named(tiny_llama: Path, tmp_path: Path) -> None:
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(tiny_llama / name, tmp_path / name)
    tensors = load_file(tiny_llama / "model.safetensors")
    del tensors["model.layers.3.mlp.down_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    StageCompute(tmp_path, 0, 2)  # the other layers are intact
    with pytest.raises(
        CheckpointError, match=r"'model\.layers\.3\.mlp\.down_proj\.weight' is missing"
    ) as info:
        StageCompute(tmp_path, 2, 4)
    assert info.value.tensor == "model.layers.3.mlp.down_proj.weight"
    with pytest.raises(CheckpointError, match="'nope' is missing"):
        Checkpoint.open(tmp_path).read(["nope"])


def test_truncated_file(tiny_llama: Path, tmp_path: Path) -> None:
    shutil.copy(tiny_llama / "config.json", tmp_path / "config.json")
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00")
    with pytest.raises(CheckpointError, match="cannot read the safetensors header"):
        Checkpoint.open(tmp_path)


def test_error_survives_pickling(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError) as info:
        Checkpoint.open(tmp_path / "nope")
    clone = pickle.loads(pickle.dumps(info.value))
    assert type(clone) is CheckpointError and clone.path == info.value.path
    assert str(clone) == str(info.value)


def test_gpt2_checkpoint_without_base_prefix(tiny_gpt2: Path, tmp_path: Path) -> None:
    """Old hub GPT-2 files store ``h.0.attn.c_attn.weight``, not ``transformer.h.0.…``."""
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(tiny_gpt2 / name, tmp_path / name)
    tensors = load_file(tiny_gpt2 / "model.safetensors")
    short = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    save_file(short, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ckpt = Checkpoint.open(tmp_path)
    assert ckpt.param_bytes_per_layer() == Checkpoint.open(tiny_gpt2).param_bytes_per_layer()
    assert ckpt.embedding_tensor_names() == ["wte.weight", "wpe.weight"]
    ids = torch.tensor(prompts([7], seed=12))
    with torch.no_grad():
        want = reference(tiny_gpt2)(ids).logits
    assert (pipeline(tmp_path, CUTS[2]).forward("s", ids) - want).abs().max().item() <= 1e-5

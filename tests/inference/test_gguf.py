"""GGUF conversion caching, and the real SmolLM2 model sharded end to end (slow)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import torch

import inference._gguf as gguf_mod
from inference._checkpoint import Checkpoint, convert_gguf, smollm2_checkpoint
from inference._exceptions import CheckpointError
from tests.inference.helpers import hf_greedy, pipeline, reference


@pytest.fixture
def fake_convert(tiny_llama: Path, monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Replace the transformers conversion with a copy of ``tiny_llama``; records each call."""
    calls: list[Path] = []

    def convert(gguf: Path, out: Path, dtype: torch.dtype) -> None:
        calls.append(gguf)
        shutil.copytree(tiny_llama, out)

    monkeypatch.setattr(gguf_mod, "_convert", convert)
    return calls


def test_conversion_runs_once_per_source(tmp_path: Path, fake_convert: list[Path]) -> None:
    source, out = tmp_path / "m.gguf", tmp_path / "models" / "m"
    source.write_bytes(b"GGUF v1")
    assert convert_gguf(source, out) == out.resolve()
    assert Checkpoint.open(out).num_layers == 4
    convert_gguf(source, out)
    assert len(fake_convert) == 1  # the marker matched: skipped
    source.write_bytes(b"GGUF v2, longer")  # a different file: converted again, replaced
    convert_gguf(source, out)
    assert len(fake_convert) == 2
    assert sorted(p.name for p in out.parent.iterdir()) == [".m.lock", "m"]  # no partial dirs


def test_conversion_refuses_a_foreign_directory(tmp_path: Path, fake_convert: list[Path]) -> None:
    source, out = tmp_path / "m.gguf", tmp_path / "mine"
    source.write_bytes(b"GGUF")
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="not a hive GGUF conversion"):
        convert_gguf(source, out)
    assert (out / "notes.txt").read_text() == "keep me" and not fake_convert
    with pytest.raises(CheckpointError, match="does not exist"):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "x")


def test_failed_conversion_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(gguf: Path, out: Path, dtype: torch.dtype) -> None:
        out.mkdir()
        (out / "half.safetensors").write_bytes(b"")
        raise CheckpointError("transformers cannot load it", path=str(gguf))

    monkeypatch.setattr(gguf_mod, "_convert", broken)
    source = tmp_path / "m.gguf"
    source.write_bytes(b"GGUF")
    with pytest.raises(CheckpointError, match="cannot load"):
        convert_gguf(source, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.lock", "m.gguf"]


def test_default_model_dir(hive_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert gguf_mod.default_model_dir("x") == hive_home / "models" / "x"
    monkeypatch.delenv("HIVE_HOME")
    assert gguf_mod.default_model_dir("x") == Path.home() / ".cache" / "hive" / "models" / "x"


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("models") / "smollm2"
    path = smollm2_checkpoint(cache)
    t0 = time.perf_counter()
    assert smollm2_checkpoint(cache) == path
    assert time.perf_counter() - t0 < 1.0  # cached: no second conversion
    return path


@pytest.mark.slow
def test_smollm2_conversion(smollm2: Path) -> None:
    ckpt = Checkpoint.open(smollm2)
    assert (ckpt.arch, ckpt.num_layers, ckpt.tied_embeddings) == ("llama", 30, True)
    assert {info.dtype for info in ckpt.tensors.values()} == {"F32"}
    assert (smollm2 / "tokenizer.json").is_file() and (smollm2 / gguf_mod.MARKER).is_file()


@pytest.mark.slow
@pytest.mark.parametrize("cuts", [[0, 15, 30], [0, 10, 20, 30]], ids=["2-stages", "3-stages"])
def test_smollm2_sharded_greedy_matches_unsharded(smollm2: Path, cuts: list[int]) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt")
    ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
    want = hf_greedy(reference(smollm2), ids, 16)  # eos disabled: 16 tokens exactly
    got = pipeline(smollm2, cuts).greedy_generate(ids, 16)
    assert got.tolist() == want.tolist()
    answer = tokenizer.decode(got[0, ids.shape[1] :], skip_special_tokens=False)
    assert "Paris" in answer.split(tokenizer.eos_token)[0], answer

"""StageCompute / LocalPipeline numerics against the unsharded HF model, caches, residency."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from inference._checkpoint import Checkpoint
from inference._exceptions import PlanError, StageError
from inference._local import LocalPipeline
from inference._stage import StageCompute, position_ids_from_mask
from tests.inference.helpers import ARCHES, CUTS, left_pad, pipeline, prompts, reference

TOL = 1e-5


@pytest.mark.parametrize("model_dir", ARCHES, indirect=True)
@pytest.mark.parametrize("n_stages", [1, 2, 3, 4])
def test_logits_match_unsharded(model_dir: Path, n_stages: int) -> None:
    ids = torch.tensor(prompts([11, 11], seed=n_stages))
    with torch.no_grad():
        want = reference(model_dir)(ids).logits
    got = pipeline(model_dir, CUTS[n_stages]).forward("s", ids)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert (got - want).abs().max().item() <= TOL


@pytest.mark.parametrize("model_dir", ARCHES, indirect=True)
def test_left_padded_batch_matches_each_prompt_alone(model_dir: Path) -> None:
    batch = prompts([3, 9, 6, 12], seed=1)
    ids, mask = left_pad(batch)
    ref = reference(model_dir)
    got = pipeline(model_dir, CUTS[2]).forward("s", ids, mask, last_only=True)  # [B, 1, V]
    assert got.shape == (len(batch), 1, ref.config.vocab_size)
    for row, prompt in enumerate(batch):
        with torch.no_grad():
            alone = ref(torch.tensor([prompt])).logits[0, -1]
        assert (got[row, 0] - alone).abs().max().item() <= TOL


@pytest.mark.parametrize("model_dir", ARCHES, indirect=True)
def test_kv_cache_decode_equals_full_recompute(model_dir: Path) -> None:
    ids, mask = left_pad(prompts([5, 3], seed=2))
    pipe = pipeline(model_dir, CUTS[3])
    steps = torch.tensor(prompts([7, 7], seed=3))  # 7 decode steps: past the 4-token window
    cached = pipe.forward("cache", ids, mask)
    full_ids, full_mask = ids, mask
    for t in range(steps.shape[1]):
        full = pipe.forward(f"nocache-{t}", full_ids, full_mask)
        pipe.drop_slot(f"nocache-{t}")
        assert (cached[:, -1] - full[:, -1]).abs().max().item() <= TOL
        new = steps[:, t : t + 1]
        full_ids = torch.cat([full_ids, new], dim=1)
        full_mask = torch.cat([full_mask, torch.ones_like(new)], dim=1)
        cached = pipe.forward("cache", new, full_mask)  # [B, 1, V]
        assert all(s.slot_length("cache") == full_ids.shape[1] for s in pipe.stages)
    full = pipe.forward("last", full_ids, full_mask)
    assert (cached[:, -1] - full[:, -1]).abs().max().item() <= TOL


def test_eager_attention_matches_eager_reference(tiny_llama: Path) -> None:
    ids, mask = left_pad(prompts([4, 8], seed=4))
    with torch.no_grad():
        want = reference(tiny_llama, "eager")(ids, attention_mask=mask).logits
    got = pipeline(tiny_llama, CUTS[2], attn_implementation="eager").forward("s", ids, mask)
    real = mask.bool()
    assert (got[real] - want[real]).abs().max().item() <= TOL


def test_slots_are_independent(tiny_llama: Path) -> None:
    pipe = pipeline(tiny_llama, CUTS[2])
    a, b = torch.tensor(prompts([5], seed=5)), torch.tensor(prompts([8], seed=6))
    alone_a = pipe.forward("solo", a)
    pipe.drop_slot("solo")
    pipe.forward("b", b)
    interleaved = pipe.forward("a", a)
    assert torch.equal(alone_a, interleaved)
    stage = pipe.stages[1]
    assert sorted(stage.slots()) == ["a", "b"]
    assert (stage.slot_length("a"), stage.slot_length("b"), stage.slot_length("none")) == (5, 8, 0)
    stage.drop_slot("b")
    assert stage.slots() == ["a"]


def _layer_of(name: str) -> int | None:
    match = re.match(r"model\.layers\.(\d+)\.", name)
    return int(match.group(1)) if match else None


def test_stage_holds_only_its_share(tiny_llama8: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = Checkpoint.open(tiny_llama8)
    read: list[set[str]] = []
    original = Checkpoint.read

    def spy(self: Checkpoint, names: object, *args: object, **kwargs: object) -> object:
        names = list(names)  # type: ignore[call-overload]
        read.append(set(names))
        return original(self, names, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Checkpoint, "read", spy)
    layer_share = sum(ckpt.param_bytes_per_layer()) / 4
    for start in range(0, 8, 2):
        stage = StageCompute(ckpt, start, start + 2)
        budget = 1.1 * layer_share
        budget += ckpt.embedding_bytes if stage.is_first else 0
        budget += ckpt.head_bytes if stage.is_last else 0
        assert stage.param_bytes() <= budget
        names = [n for n, _ in stage.named_parameters()]
        assert {_layer_of(n) for n in names} - {None} == {start, start + 1}
        assert ("model.embed_tokens.weight" in names) == stage.is_first
        assert ("lm_head.weight" in names) == stage.is_last
        assert not any(p.is_meta for _, p in stage.named_parameters())
        assert {_layer_of(n) for n in read[-1]} - {None} == {start, start + 1}


def test_tied_head_reads_the_embedding(tiny_llama_tied: Path) -> None:
    ckpt = Checkpoint.open(tiny_llama_tied)
    embedding = ckpt.read(["model.embed_tokens.weight"])["model.embed_tokens.weight"]
    last = StageCompute(ckpt, 2, 4)
    assert torch.equal(dict(last.named_parameters())["lm_head.weight"], embedding)
    whole = StageCompute(ckpt, 0, 4)  # holds both: one shared matrix, as the checkpoint does
    assert whole.param_bytes() == ckpt.tensor_bytes(ckpt.tensors)


def test_bfloat16_stage(tiny_llama: Path) -> None:
    fp32, bf16 = (
        StageCompute(tiny_llama, 0, 2),
        StageCompute(tiny_llama, 0, 2, dtype=torch.bfloat16),
    )
    assert bf16.param_bytes() * 2 == fp32.param_bytes()
    ids = torch.tensor(prompts([6], seed=7))
    mask = torch.ones_like(ids)
    hidden = bf16.forward("s", ids, mask, position_ids_from_mask(mask, 6))
    assert hidden.dtype == torch.bfloat16 and hidden.shape == (1, 6, bf16.hidden_size)
    logits = StageCompute(tiny_llama, 2, 4, dtype=torch.bfloat16).forward(
        "s", hidden, mask, position_ids_from_mask(mask, 6)
    )
    assert logits.dtype == torch.float32 and logits.shape == (1, 6, 128)


def test_bad_inputs_raise_stage_error_and_keep_the_slot(tiny_llama: Path) -> None:
    first, last = StageCompute(tiny_llama, 0, 2), StageCompute(tiny_llama, 2, 4)
    ids = torch.tensor(prompts([4], seed=8))
    mask, pos = torch.ones_like(ids), position_ids_from_mask(torch.ones_like(ids), 4)
    first.forward("s", ids, mask, pos)
    with pytest.raises(StageError, match=r"attention_mask must be \[B, past \+ T\]") as info:
        first.forward("s", ids[:, :1], mask, pos[:, :1])  # mask lacks the new column
    assert (info.value.stage, info.value.slot) == ("layers[0:2]", "s")
    assert first.slot_length("s") == 4
    with pytest.raises(StageError, match="hidden states"):
        last.forward("s", ids, mask, pos)  # token ids given to a middle/last stage
    with pytest.raises(StageError, match="input ids"):
        first.forward("t", torch.zeros(1, 4, 64), mask, pos)
    with pytest.raises(StageError, match="slot holds 1 rows"):
        first.forward(
            "s",
            ids.repeat(2, 1)[:, :1],
            torch.ones(2, 5, dtype=torch.long),
            pos.repeat(2, 1)[:, :1],
        )


def test_a_fresh_step_restarts_a_slot_that_still_holds_positions(tiny_llama: Path) -> None:
    """A replay after a stage loss carries the whole history with ``fresh``: a stage that still
    holds the slot (its drop not yet arrived) restarts it instead of refusing the step."""
    stage = StageCompute(tiny_llama, 0, 4)
    ids = torch.tensor(prompts([6], seed=3))
    mask = torch.ones_like(ids)
    pos = position_ids_from_mask(mask, 6)
    want = stage.forward("s", ids, mask, pos)
    with pytest.raises(StageError, match="slot has 6 cached positions"):
        stage.forward("s", ids, mask, pos)  # the same prefill again, not fresh
    got = stage.forward("s", ids, mask, pos, fresh=True)
    assert stage.slot_length("s") == 6 and torch.equal(got, want)


def test_bad_layer_ranges(tiny_llama: Path) -> None:
    for start, end in [(2, 2), (3, 1), (-1, 2), (0, 5)]:
        with pytest.raises(PlanError, match="bad layer range"):
            StageCompute(tiny_llama, start, end)
    with pytest.raises(PlanError, match="contiguously"):
        LocalPipeline([StageCompute(tiny_llama, 0, 1), StageCompute(tiny_llama, 2, 4)])
    with pytest.raises(PlanError, match="contiguously"):
        LocalPipeline([StageCompute(tiny_llama, 0, 2)])


def test_position_ids_from_mask() -> None:
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert position_ids_from_mask(mask, 5).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]
    assert position_ids_from_mask(mask, 1).tolist() == [[2], [4]]


@pytest.mark.gpu
def test_cuda_stages_match_cpu(tiny_llama: Path) -> None:
    ids, mask = left_pad(prompts([5, 9], seed=13))
    want = pipeline(tiny_llama, CUTS[2]).forward("s", ids, mask)
    got = pipeline(tiny_llama, CUTS[2], device="cuda").forward("s", ids, mask)
    assert got.device.type == "cuda"
    real = mask.bool()
    assert (got.cpu()[real] - want[real]).abs().max().item() <= 1e-4

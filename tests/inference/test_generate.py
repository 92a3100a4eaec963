"""LocalPipeline.greedy_generate (prefill + cached decode) against HF ``generate``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.inference.helpers import (
    ARCHES,
    CUTS,
    PAD,
    hf_greedy,
    left_pad,
    pipeline,
    prompts,
    reference,
)


@pytest.mark.parametrize("model_dir", ARCHES, indirect=True)
@pytest.mark.parametrize("n_stages", [1, 3])
def test_greedy_32_tokens_match_generate(model_dir: Path, n_stages: int) -> None:
    ids = torch.tensor(prompts([6], seed=10))
    want = hf_greedy(reference(model_dir), ids, 32)
    assert want.shape == (1, 6 + 32)  # HF did not stop early
    got = pipeline(model_dir, CUTS[n_stages]).greedy_generate(ids, 32)
    assert got.tolist() == want.tolist()


@pytest.mark.parametrize("model_dir", ["tiny_gpt2", "tiny_llama", "tiny_mistral"], indirect=True)
def test_batched_left_padded_generation_with_eos(model_dir: Path) -> None:
    ids, mask = left_pad(prompts([4, 9, 6], seed=11))
    ref, pipe = reference(model_dir), pipeline(model_dir, CUTS[2])
    free = pipe.greedy_generate(ids, 20, mask)
    assert free.tolist() == hf_greedy(ref, ids, 20, mask).tolist()
    eos = int(
        free[0, ids.shape[1] + 5]
    )  # a token row 0 emits mid-way: rows stop at different steps
    want = hf_greedy(ref, ids, 20, mask, eos_token_id=eos)
    got = pipe.greedy_generate(ids, 20, mask, eos_token_id=eos, pad_token_id=PAD)
    assert got.tolist() == want.tolist()
    assert (got[0, ids.shape[1] + 6 :] == PAD).all()  # row 0 finished and was padded
    assert all(stage.slots() == [] for stage in pipe.stages)  # generation frees its slot

"""Helpers shared by the inference tests: tiny models from any config, the HF reference, padding."""

from __future__ import annotations

import copy
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch

from inference._local import LocalPipeline
from inference._stage import StageCompute
from tests.factories import TINY_VOCAB_SIZE, make_tiny_tokenizer

ARCHES = ["tiny_gpt2", "tiny_llama", "tiny_llama_tied", "tiny_qwen2", "tiny_mistral"]  # fixtures
PAD, EOS = 3, 2  # ids of the tiny ASCII tokenizer
# cut points of the 1..4-stage partitions of a 4-layer model
CUTS = {1: [0, 4], 2: [0, 2, 4], 3: [0, 1, 3, 4], 4: [0, 1, 2, 3, 4]}
# config kwargs shared by the tiny Llama-family models built here
TINY_LLAMA_LIKE: dict[str, Any] = {
    "num_hidden_layers": 4,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "max_position_embeddings": 128,
    "vocab_size": TINY_VOCAB_SIZE,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": EOS,
    "pad_token_id": PAD,
}


def make_tiny_from_config(config: Any, path: Path, seed: int = 0) -> Path:
    """Like ``tests.factories.make_tiny_model`` for any config: seeded weights + ASCII tokenizer."""
    from transformers import AutoModelForCausalLM

    path.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    model.eval().save_pretrained(path)
    make_tiny_tokenizer(path)
    return path


def reference(path: Path, attn_implementation: str = "sdpa") -> Any:
    """The unsharded HF model, loaded as a user would."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        path, attn_implementation=attn_implementation
    ).eval()


def pipeline(path: Path, cuts: list[int], **kwargs: Any) -> LocalPipeline:
    """A LocalPipeline with one StageCompute per ``[cuts[i], cuts[i+1])``."""
    return LocalPipeline([StageCompute(path, a, b, **kwargs) for a, b in pairwise(cuts)])


def hf_greedy(
    model: Any,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    attention_mask: torch.Tensor | None = None,
    eos_token_id: int | None = None,
) -> torch.Tensor:
    """``model.generate`` greedy decoding; ``eos_token_id=None`` never stops early."""
    config = copy.deepcopy(model.generation_config)
    config.do_sample = False
    config.max_new_tokens = max_new_tokens
    config.eos_token_id = [] if eos_token_id is None else eos_token_id  # None would mean "default"
    if config.pad_token_id is None:
        config.pad_token_id = PAD
    with torch.no_grad():
        out: torch.Tensor = model.generate(
            input_ids, attention_mask=attention_mask, generation_config=config
        )
    return out


def left_pad(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``input_ids`` and ``attention_mask``, both ``[B, longest]``."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    return ids, mask


def prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    """Random prompts of the given lengths over the tiny vocab's printable ids."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(32, 127, (n,), generator=gen).tolist() for n in lengths]

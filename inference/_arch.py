"""Where each supported transformers architecture keeps its pieces, and how to cut a stage out.

A pipeline stage runs transformers' own modules (decoder layers, norms, rotary embedding); this
module only knows their attribute names. ``ArchSpec`` describes one family, ``SUPPORTED`` maps
the class names of ``config.architectures`` to it, ``build_skeleton`` instantiates the whole
model on the meta device (no memory) and ``carve`` keeps the modules one stage needs, under the
same parameter names as the full model (``model.layers.10.mlp.up_proj.weight``).

Example:
    >>> spec = SUPPORTED["LlamaForCausalLM"]
    >>> spec.family, spec.layer_prefix(3)
    ('llama', 'model.layers.3.')
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["SUPPORTED", "ArchSpec", "architecture_of", "build_skeleton", "carve"]


@dataclass(frozen=True)
class ArchSpec:
    """Attribute names of one architecture family inside its ``*ForCausalLM`` class."""

    family: str  # normalized family name: "llama" (Llama, Mistral, Qwen2) or "gpt2"
    base: str  # attribute of the *ForCausalLM holding the decoder stack: "model" / "transformer"
    layers: str  # ModuleList of decoder layers inside ``base``: "layers" / "h"
    token_embedding: str  # token embedding inside ``base``: "embed_tokens" / "wte"
    position_embedding: str | None  # learned absolute positions inside ``base`` ("wpe") or None
    norm: str  # final norm inside ``base``: "norm" / "ln_f"
    rotary: str | None  # rotary embedding module inside ``base`` ("rotary_emb") or None
    head: str = "lm_head"  # output projection on the *ForCausalLM itself

    def layer_prefix(self, index: int) -> str:
        """Parameter-name prefix of decoder layer ``index``: ``"model.layers.3."``."""
        return f"{self.base}.{self.layers}.{index}."

    def embedding_names(self) -> list[str]:
        """Full-model names of the input embedding parameters (first stage)."""
        names = [f"{self.base}.{self.token_embedding}.weight"]
        if self.position_embedding is not None:
            names.append(f"{self.base}.{self.position_embedding}.weight")
        return names

    @property
    def head_weight(self) -> str:
        """Full-model name of the LM head weight (``lm_head.weight``)."""
        return f"{self.head}.weight"


_LLAMA = ArchSpec(
    family="llama",
    base="model",
    layers="layers",
    token_embedding="embed_tokens",
    position_embedding=None,
    norm="norm",
    rotary="rotary_emb",
)
_GPT2 = ArchSpec(
    family="gpt2",
    base="transformer",
    layers="h",
    token_embedding="wte",
    position_embedding="wpe",
    norm="ln_f",
    rotary=None,
)

# transformers class name (config.architectures[0]) -> the family's layout
SUPPORTED: dict[str, ArchSpec] = {
    "GPT2LMHeadModel": _GPT2,
    "LlamaForCausalLM": _LLAMA,
    "MistralForCausalLM": _LLAMA,
    "Qwen2ForCausalLM": _LLAMA,
}
# config.model_type -> class name, for configs written without ``architectures``
_BY_MODEL_TYPE = {
    "gpt2": "GPT2LMHeadModel",
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}


def architecture_of(config: Any) -> str | None:
    """The supported class name a config describes, or None when it is not supported.

    Args:
        config: a ``transformers.PretrainedConfig``.

    Returns:
        A key of ``SUPPORTED`` (from ``config.architectures``, else from ``config.model_type``).

    Example:
        >>> from transformers import LlamaConfig
        >>> architecture_of(LlamaConfig())
        'LlamaForCausalLM'
    """
    for name in getattr(config, "architectures", None) or []:
        if name in SUPPORTED:
            return str(name)
    if getattr(config, "architectures", None):
        return None  # named, but not one we know how to shard
    return _BY_MODEL_TYPE.get(str(getattr(config, "model_type", "")))


def build_skeleton(config: Any, architecture: str, attn_implementation: str) -> nn.Module:
    """The whole ``architecture`` model on the meta device: module tree only, no memory.

    Args:
        config: the checkpoint's ``PretrainedConfig`` (copied, not modified).
        architecture: a key of ``SUPPORTED``.
        attn_implementation: "sdpa" or "eager"; set on the model's config, which masks and
            attention modules read.

    Returns:
        The ``*ForCausalLM`` module with every parameter on ``meta``.
    """
    import transformers

    cls = getattr(transformers, architecture)
    config = copy.deepcopy(config)
    config._attn_implementation = attn_implementation
    with torch.device("meta"):
        model: nn.Module = cls(config)
    return model


def carve(
    model: nn.Module, spec: ArchSpec, start: int, end: int, *, first: bool, last: bool
) -> nn.Module:
    """Keep layers ``[start, end)`` (+ embeddings on the first stage, norm + head on the last).

    The returned module mirrors the full model's tree, so its ``state_dict`` keys are the full
    model's names (``model.layers.10.…``); decoder layers sit in a ``ModuleDict`` keyed by their
    global index. Attention modules are re-indexed to local cache slots (``layer_idx`` 10 → 0 on a
    stage starting at layer 10). The head gets its own meta weight even when the model ties it
    to the embedding, so the caller decides what to load into it. Rotary embeddings are not kept
    (their buffers are not in checkpoints; the stage builds a fresh one).

    Args:
        model: a skeleton from ``build_skeleton``.
        spec: its ``ArchSpec``.
        start: first global layer index kept.
        end: one past the last global layer index kept.
        first: keep the input embeddings.
        last: keep the final norm and the LM head.

    Returns:
        An ``nn.Module`` whose parameters are all on the meta device.
    """
    full_base = getattr(model, spec.base)
    full_layers = getattr(full_base, spec.layers)
    base = nn.Module()
    if first:
        base.add_module(spec.token_embedding, getattr(full_base, spec.token_embedding))
        if spec.position_embedding is not None:
            base.add_module(spec.position_embedding, getattr(full_base, spec.position_embedding))
    layers = nn.ModuleDict({str(i): full_layers[i] for i in range(start, end)})
    for local, layer in enumerate(layers.values()):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = local  # type: ignore[assignment]  # this stage's own cache slot
    base.add_module(spec.layers, layers)
    root = nn.Module()
    root.add_module(spec.base, base)
    if last:
        base.add_module(spec.norm, getattr(full_base, spec.norm))
        head = getattr(model, spec.head)
        head.weight = nn.Parameter(
            torch.empty_like(head.weight, device="meta"), requires_grad=False
        )
        root.add_module(spec.head, head)
    return root.eval().requires_grad_(False)

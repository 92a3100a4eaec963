"""Memory and compute costs of a causal LM, as plain numbers the planner can split.

``LayerCosts`` is what the partitioner works on: bytes per decoder layer, the embeddings and
the head, the KV cache per token per layer, and an activation reserve per stage. Build it by
hand (tests, what-if questions) or from a transformers config with ``layer_costs_from_config``.

KV cache per layer = 2 (K and V) × num_kv_heads × head_dim × dtype bytes × max_batch × max_seq_len.

Example:
    >>> costs = LayerCosts(param_bytes=[100] * 4, embedding_bytes=50, head_bytes=50,
    ...                    kv_bytes_per_token_per_layer=2, activation_bytes=10,
    ...                    max_batch=1, max_seq_len=8)
    >>> costs.kv_bytes_per_layer
    16
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from inference._exceptions import PlanError

__all__ = ["DTYPE_BYTES", "LayerCosts", "dtype_bytes", "dtype_name", "layer_costs_from_config"]

# Bytes per element of the torch dtypes a stage can run in (names as in ``getattr(torch, name)``).
DTYPE_BYTES: dict[str, int] = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2,
    "float8_e4m3fn": 1, "float8_e5m2": 1, "int8": 1, "uint8": 1,
}
_ALIASES = {"fp32": "float32", "float": "float32", "fp16": "float16", "half": "float16",
            "bf16": "bfloat16", "double": "float64"}


def dtype_name(dtype: Any) -> str:
    """Canonical torch dtype name: ``"bf16"``, ``"torch.bfloat16"`` and ``torch.bfloat16`` -> ``"bfloat16"``."""
    name = str(dtype).removeprefix("torch.")
    return _ALIASES.get(name, name)


def dtype_bytes(dtype: Any) -> int:
    """Bytes per element of ``dtype`` (a name such as ``"bfloat16"`` or a ``torch.dtype``).

    Raises:
        PlanError: unknown dtype; the message lists the known ones.

    Example:
        >>> dtype_bytes("bfloat16")
        2
    """
    name = dtype_name(dtype)
    if name not in DTYPE_BYTES:
        raise PlanError(f"unknown dtype {dtype!r}; pass dtype= one of {sorted(DTYPE_BYTES)}", dtype=str(dtype))
    return DTYPE_BYTES[name]


@dataclass(frozen=True)
class LayerCosts:
    """What one copy of the model costs, in bytes, at one (dtype, max_batch, max_seq_len)."""

    param_bytes: Sequence[int]  # parameter bytes of each decoder layer, in layer order
    embedding_bytes: int  # token (+ position) embeddings, held by the first stage
    head_bytes: int  # final norm + LM head, held by the last stage (a tied matrix included)
    kv_bytes_per_token_per_layer: int  # K and V bytes one token adds to one layer's cache
    activation_bytes: int  # transient activation reserve every stage keeps free
    tied_bytes: int = 0  # bytes embeddings and head share (tied matrix): counted once if one stage holds both
    max_batch: int = 8  # sequences the KV cache is sized for
    max_seq_len: int = 2048  # tokens per sequence the KV cache is sized for
    dtype: str = "float32"  # dtype the byte counts are in (carried into the plan)
    arch: str = "unknown"  # model_type label carried into the plan

    def __post_init__(self) -> None:
        object.__setattr__(self, "param_bytes", tuple(int(b) for b in self.param_bytes))  # freeze a list
        problems = []
        if not self.param_bytes:
            problems.append("param_bytes is empty (the model needs at least one decoder layer)")
        if any(b < 0 for b in self.param_bytes):
            problems.append("param_bytes has a negative entry")
        for name in ("embedding_bytes", "head_bytes", "kv_bytes_per_token_per_layer", "activation_bytes", "tied_bytes"):
            if getattr(self, name) < 0:
                problems.append(f"{name} is negative")
        if self.tied_bytes > min(self.embedding_bytes, self.head_bytes):
            problems.append("tied_bytes exceeds embedding_bytes or head_bytes")
        if self.max_batch < 1 or self.max_seq_len < 1:
            problems.append("max_batch and max_seq_len must be >= 1")
        if problems:
            raise PlanError(f"invalid LayerCosts: {'; '.join(problems)}")

    @property
    def num_layers(self) -> int:
        """Number of decoder layers."""
        return len(self.param_bytes)

    @property
    def kv_bytes_per_layer(self) -> int:
        """KV-cache bytes of one layer for ``max_batch`` sequences of ``max_seq_len`` tokens."""
        return self.kv_bytes_per_token_per_layer * self.max_batch * self.max_seq_len

    def total_bytes(self, num_stages: int = 1) -> int:
        """Memory the whole model needs split over ``num_stages`` stages (one activation reserve each)."""
        shared = self.tied_bytes if num_stages == 1 else 0
        return (sum(self.param_bytes) + self.embedding_bytes + self.head_bytes - shared
                + self.num_layers * self.kv_bytes_per_layer + num_stages * self.activation_bytes)

    def replace(self, **changes: Any) -> LayerCosts:
        """A copy with some fields changed: ``costs.replace(max_batch=1)``."""
        return dataclasses.replace(self, **changes)

    def with_dtype(self, dtype: Any) -> LayerCosts:
        """The same model in another dtype: every byte count scaled by the element-size ratio.

        Example:
            >>> LayerCosts([4], 4, 4, 4, 4).with_dtype("bfloat16").param_bytes
            (2,)
        """
        new, old = dtype_bytes(dtype), dtype_bytes(self.dtype)
        if new == old:
            return self.replace(dtype=dtype_name(dtype))

        def scale(n: int) -> int:
            return n * new // old

        return self.replace(
            param_bytes=tuple(scale(b) for b in self.param_bytes),
            embedding_bytes=scale(self.embedding_bytes), head_bytes=scale(self.head_bytes),
            tied_bytes=scale(self.tied_bytes), activation_bytes=scale(self.activation_bytes),
            kv_bytes_per_token_per_layer=scale(self.kv_bytes_per_token_per_layer), dtype=dtype_name(dtype),
        )


def _attr(config: Any, *names: str) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


def layer_costs_from_config(
    config: Any,
    param_bytes_per_layer: Sequence[int],
    embedding_bytes: int,
    head_bytes: int,
    dtype: Any,
    max_batch: int = 8,
    max_seq_len: int = 2048,
    *,
    source_dtype: Any = None,
    activation_bytes: int | None = None,
) -> LayerCosts:
    """``LayerCosts`` for a Hugging Face causal LM from its config and measured byte counts.

    Reads the attention shape from Llama-family names (``num_key_value_heads``, ``head_dim``,
    ``hidden_size``, ``intermediate_size``) or GPT-2 names (``n_head``, ``n_embd``, ``n_inner``).
    With ``tie_word_embeddings`` the head shares the embedding matrix: ``head_bytes`` is raised
    to include it if it did not (the last stage needs it even when the first holds the original)
    and ``tied_bytes`` records it, so a single stage counts it once. The activation reserve is
    ``max_batch × max_seq_len × (4·hidden + 2·intermediate) × dtype bytes`` (one layer's prefill
    working set) plus float32 logits of one position per sequence.

    Args:
        config: a ``transformers.PretrainedConfig`` (multimodal configs: its text config is used).
        param_bytes_per_layer: parameter bytes of each decoder layer (``Checkpoint.param_bytes_per_layer()``).
        embedding_bytes: bytes of the input embeddings (``Checkpoint.embedding_bytes``).
        head_bytes: bytes of the final norm + LM head (``Checkpoint.head_bytes``).
        dtype: dtype the stages will run in ("bfloat16", ``torch.float16``, ...).
        max_batch: sequences the KV cache is sized for.
        max_seq_len: tokens per sequence the KV cache is sized for.
        source_dtype: dtype the byte counts were measured in, if different from ``dtype``
            (they are rescaled); None means they are already in ``dtype``.
        activation_bytes: override the activation reserve per stage.

    Returns:
        The model's ``LayerCosts`` in ``dtype``.

    Raises:
        PlanError: unknown dtype, or a config without the attention shape.

    Example:
        >>> from transformers import LlamaConfig
        >>> cfg = LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
        ...                   num_key_value_heads=2, intermediate_size=128, vocab_size=128)
        >>> layer_costs_from_config(cfg, [1000, 1000], 100, 100, "float32", 1, 16).kv_bytes_per_token_per_layer
        256
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = _attr(text, "hidden_size", "n_embd", "d_model")
    heads = _attr(text, "num_attention_heads", "n_head")
    if hidden is None or heads is None:
        raise PlanError(
            f"cannot read the attention shape of {type(config).__name__}: it has no hidden_size/n_embd "
            "or num_attention_heads/n_head; build LayerCosts by hand and pass it to plan()"
        )
    kv_heads = _attr(text, "num_key_value_heads", "n_kv_heads", "multi_query_group_num") or heads
    head_dim = _attr(text, "head_dim") or hidden // heads
    inner = _attr(text, "intermediate_size", "n_inner", "ffn_dim") or 4 * hidden
    vocab = _attr(text, "vocab_size") or 0
    target = dtype_bytes(dtype)
    kv_per_token = 2 * int(kv_heads) * int(head_dim) * target
    if activation_bytes is None:
        activation_bytes = (max_batch * max_seq_len * (4 * int(hidden) + 2 * int(inner)) * target
                            + max_batch * int(vocab) * 4)
    tied = bool(getattr(config, "tie_word_embeddings", False) or getattr(text, "tie_word_embeddings", False))
    source = dtype_bytes(source_dtype) if source_dtype is not None else target

    def scale(n: int) -> int:  # measured bytes -> bytes in the target dtype
        return int(n) * target // source

    embedding, head = scale(embedding_bytes), scale(head_bytes)
    tied_bytes = 0
    if tied and vocab:
        matrix = int(vocab) * int(hidden) * target
        if head < matrix:  # the checkpoint stores the matrix once, under the embeddings
            head += matrix
        tied_bytes = min(matrix, embedding, head)
    return LayerCosts(
        param_bytes=tuple(scale(b) for b in param_bytes_per_layer), embedding_bytes=embedding,
        head_bytes=head, kv_bytes_per_token_per_layer=kv_per_token, activation_bytes=int(activation_bytes),
        tied_bytes=tied_bytes, max_batch=max_batch, max_seq_len=max_seq_len, dtype=dtype_name(dtype),
        arch=str(getattr(config, "model_type", None) or "unknown"),
    )

"""One pipeline stage computed in-process: a contiguous range of decoder layers and its KV caches.

``StageCompute`` builds the model skeleton from transformers' own classes on the meta device,
keeps only its layers (+ embeddings on the first stage, final norm + LM head on the last) and
loads just those tensors from the checkpoint, so no process ever holds the whole model. Ray
actors wrap it; it never touches Ray itself.

KV caches live in named *slots*, one per micro-batch: a ``transformers.DynamicCache`` holding
this stage's layers only (attention modules are re-indexed to local layer numbers). Each
``forward`` appends ``T`` positions to its slot. Masks are built by ``transformers.masking_utils``
exactly as the unsharded model builds them (causal + padding; sliding window where the config
says so), with the attention implementation chosen at construction ("sdpa" by default, the
``from_pretrained`` default on these models; "eager" also works). Logits therefore agree with
the unsharded model loaded with the same ``attn_implementation``.

Example:
    >>> first = StageCompute(path, 0, 2)                                   # doctest: +SKIP
    >>> last = StageCompute(path, 2, 4)                                    # doctest: +SKIP
    >>> mask = torch.ones(1, 5, dtype=torch.long)                          # doctest: +SKIP
    >>> pos = position_ids_from_mask(mask, 5)                              # doctest: +SKIP
    >>> h = first.forward("mb0", ids, mask, pos)          # [1, 5, H]      # doctest: +SKIP
    >>> logits = last.forward("mb0", h, mask, pos, last_only=True)  # [1, 1, V]  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from inference._arch import build_skeleton, carve
from inference._checkpoint import Checkpoint
from inference._exceptions import PlanError, StageError

__all__ = ["StageCompute", "position_ids_from_mask"]


def position_ids_from_mask(attention_mask: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Positions of the last ``new_tokens`` columns of a left-padded mask (as HF ``generate``).

    Args:
        attention_mask: ``[B, past + T]``, 1 = real token, 0 = padding.
        new_tokens: ``T``, the number of columns being computed now.

    Returns:
        LongTensor ``[B, T]``: each real token's index among its row's real tokens (pads get 0).

    Example:
        >>> position_ids_from_mask(torch.tensor([[0, 1, 1], [1, 1, 1]]), 3).tolist()
        [[0, 0, 1], [0, 1, 2]]
    """
    mask = attention_mask.long()
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # [B, past + T]
    return positions[:, -new_tokens:]


class StageCompute:
    """Layers ``[layer_start, layer_end)`` of a causal LM, with per-slot KV caches.

    Args:
        checkpoint: a checkpoint directory or an opened ``Checkpoint``.
        layer_start: first decoder layer this stage holds (0-based, inclusive).
        layer_end: one past the last layer it holds.
        dtype: parameter and activation dtype (logits are always float32).
        device: where parameters, activations and caches live.
        attn_implementation: "sdpa" or "eager"; compare against a reference loaded the same way.

    Raises:
        PlanError: the layer range is empty or outside ``[0, num_layers]``.
        CheckpointError: the checkpoint cannot be read or lacks one of this stage's tensors.

    Example:
        >>> stage = StageCompute("/models/smollm2", 10, 20, dtype=torch.bfloat16)  # doctest: +SKIP
        >>> stage.is_first, stage.is_last, stage.param_bytes()                     # doctest: +SKIP
        (False, False, 141557760)
    """

    def __init__(
        self,
        checkpoint: str | Path | Checkpoint,
        layer_start: int,
        layer_end: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        attn_implementation: str = "sdpa",
    ) -> None:
        ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint.open(checkpoint)
        if not 0 <= layer_start < layer_end <= ckpt.num_layers:
            raise PlanError(
                f"bad layer range [{layer_start}, {layer_end}) for a {ckpt.num_layers}-layer model "
                f"({ckpt.path}); a stage needs 0 <= layer_start < layer_end <= {ckpt.num_layers}",
                layer_start=layer_start,
                layer_end=layer_end,
                num_layers=ckpt.num_layers,
            )
        self.checkpoint = ckpt
        self.layer_start = layer_start
        self.layer_end = layer_end
        self.dtype = dtype
        self.device = torch.device(device)
        self.is_first = layer_start == 0
        self.is_last = layer_end == ckpt.num_layers
        self.name = f"layers[{layer_start}:{layer_end}]"
        spec = ckpt.spec
        skeleton = build_skeleton(ckpt.config, ckpt.architecture, attn_implementation)
        self._config: Any = skeleton.config  # the config every kept module reads
        self._spec = spec
        self._net = carve(
            skeleton, spec, layer_start, layer_end, first=self.is_first, last=self.is_last
        )
        self._rotary: nn.Module | None = None
        if spec.rotary is not None:  # non-persistent buffers: build on a real device, not meta
            rotary_cls = type(getattr(getattr(skeleton, spec.base), spec.rotary))
            self._rotary = rotary_cls(config=self._config).to(self.device)
        del skeleton  # the meta modules of other layers go with it
        self._load()
        base = getattr(self._net, spec.base)
        self._base = base
        self._layers: list[nn.Module] = list(getattr(base, spec.layers).values())
        self._slots: dict[str, Any] = {}  # slot name -> DynamicCache of this stage's layers

    def _load(self) -> None:
        """Materialize this stage's parameters from the checkpoint (nothing else is read)."""
        params = self._net.state_dict(keep_vars=True)  # full-model name -> meta tensor
        keys = {name: self.checkpoint.resolve(name) for name in params}
        tensors = self.checkpoint.read(set(keys.values()), dtype=self.dtype, device=self.device)
        state: dict[str, torch.Tensor] = {}
        for name, key in keys.items():
            expected = params[name].shape
            if tensors[key].shape != expected:
                raise StageError(
                    f"checkpoint tensor {key!r} has shape {tuple(tensors[key].shape)}, the model "
                    f"config expects {tuple(expected)}; config.json and the weights disagree",
                    stage=self.name,
                    tensor=key,
                )
            state[name] = tensors[key]
        self._net.load_state_dict(state, strict=True, assign=True)
        self._net.requires_grad_(False)
        spec = self._spec
        if self.is_first and self.is_last and self.checkpoint.tied_embeddings:
            embed = getattr(getattr(self._net, spec.base), spec.token_embedding)
            getattr(self._net, spec.head).weight = embed.weight  # one matrix, as in HF
        leftover = [n for n, t in self._net.state_dict(keep_vars=True).items() if t.is_meta]
        if leftover:
            raise StageError(f"parameters left on meta after loading: {leftover}", stage=self.name)

    # ---------------------------------------------------------------- facts

    @property
    def hidden_size(self) -> int:
        """Width of the hidden states this stage takes and returns."""
        return self.checkpoint.hidden_size

    @property
    def vocab_size(self) -> int:
        """Number of logits per token (last stage output)."""
        return self.checkpoint.vocab_size

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Resident parameters under the full model's names (``model.layers.10.…``), tied once."""
        return list(self._net.named_parameters())

    def param_bytes(self) -> int:
        """Bytes of the parameters this stage holds (a tied matrix counted once)."""
        seen = {p.data_ptr(): p.numel() * p.element_size() for _, p in self.named_parameters()}
        return sum(seen.values())

    # ---------------------------------------------------------------- slots

    def slots(self) -> list[str]:
        """Names of the live KV-cache slots."""
        return list(self._slots)

    def slot_length(self, slot: str) -> int:
        """Positions cached in ``slot`` (0 for a slot not created yet)."""
        cache = self._slots.get(slot)
        return 0 if cache is None else int(cache.get_seq_length())

    def drop_slot(self, slot: str) -> None:
        """Free ``slot``'s KV cache (no error if it does not exist)."""
        self._slots.pop(slot, None)

    def _new_cache(self) -> Any:
        from transformers import DynamicCache

        cache = DynamicCache(config=self._config)  # one cache layer per model layer, typed
        cache.layers = cache.layers[self.layer_start : self.layer_end]  # keep ours: local idx
        return cache

    # ---------------------------------------------------------------- compute

    def forward(
        self,
        slot: str,
        x: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        *,
        last_only: bool = False,
        fresh: bool = False,
    ) -> torch.Tensor:
        """Run ``T`` new positions of micro-batch ``slot``; its cache grows by ``T``.

        Args:
            slot: KV-cache slot of the micro-batch (created on first use).
            x: first stage: input ids ``[B, T]`` (long); other stages: hidden states ``[B, T, H]``.
            attention_mask: ``[B, past + T]``, 1 = real token, 0 = left padding.
            position_ids: ``[B, T]`` (see ``position_ids_from_mask``).
            last_only: last stage: logits of the final position only. Ignored by other stages.
            fresh: drop whatever ``slot`` holds first. A replay after a stage loss sends the
                whole history this way, so it does not depend on an earlier ``drop_slot``
                reaching this stage before it.

        Returns:
            Hidden states ``[B, T, H]`` in ``dtype``; the last stage returns float32 logits
            ``[B, T, V]`` (``[B, 1, V]`` with ``last_only``).

        Raises:
            StageError: shapes disagree with each other or with the slot (nothing changes but a
                ``fresh`` drop), or
                the computation failed (the slot is dropped: re-prefill it).
        """
        if fresh:
            self.drop_slot(slot)
        self._check(slot, x, attention_mask, position_ids)
        cache = self._slots.get(slot)
        if cache is None:
            cache = self._new_cache()
        try:
            out = self._compute(cache, x, attention_mask, position_ids, last_only)
        except Exception as exc:
            self._slots.pop(slot, None)
            raise StageError(
                f"stage {self.name} failed on slot {slot!r}: {exc}; the slot was dropped",
                stage=self.name,
                slot=slot,
            ) from exc
        self._slots[slot] = cache
        return out

    @torch.inference_mode()
    def _compute(
        self,
        cache: Any,
        x: torch.Tensor,
        mask: torch.Tensor,
        position_ids: torch.Tensor,
        last_only: bool,
    ) -> torch.Tensor:
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        spec, base = self._spec, self._base
        x, mask, position_ids = (t.to(self.device) for t in (x, mask, position_ids))
        if self.is_first:
            hidden = getattr(base, spec.token_embedding)(x)  # [B, T] -> [B, T, H]
            if spec.position_embedding is not None:
                hidden = hidden + getattr(base, spec.position_embedding)(position_ids)
        else:
            hidden = x.to(self.dtype)
        mask_args = {
            "config": self._config,
            "inputs_embeds": hidden,
            "attention_mask": mask,
            "past_key_values": cache,
            "position_ids": position_ids,
        }
        masks: dict[bool, Any] = {}  # is_sliding -> 4D mask (or None: plain causal)
        for sliding in set(cache.is_sliding):
            make = create_sliding_window_causal_mask if sliding else create_causal_mask
            masks[sliding] = make(**mask_args)
        extra: dict[str, Any] = {}
        if self._rotary is not None:
            extra["position_embeddings"] = self._rotary(hidden, position_ids)  # (cos, sin)
        for layer, sliding in zip(self._layers, cache.is_sliding, strict=True):
            hidden = layer(
                hidden,
                attention_mask=masks[sliding],
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
                **extra,
            )
        if not self.is_last:
            return hidden
        if last_only:
            hidden = hidden[:, -1:, :]  # [B, T, H] -> [B, 1, H]
        hidden = getattr(base, spec.norm)(hidden)
        return getattr(self._net, spec.head)(hidden).float()  # [B, T, V] fp32

    def _check(
        self, slot: str, x: torch.Tensor, mask: torch.Tensor, position_ids: torch.Tensor
    ) -> None:
        """Raise StageError (changing nothing) when the inputs do not fit this stage and slot."""
        if self.is_first:
            ok = x.ndim == 2 and not x.is_floating_point()
            want = "input ids [B, T] (integer)"
        else:
            ok = x.ndim == 3 and x.shape[-1] == self.hidden_size and x.is_floating_point()
            want = f"hidden states [B, T, {self.hidden_size}] (floating point)"
        if not ok:
            raise StageError(
                f"stage {self.name}, slot {slot!r}: x must be {want}, "
                f"got {tuple(x.shape)} {x.dtype}",
                stage=self.name,
                slot=slot,
            )
        batch, new = int(x.shape[0]), int(x.shape[1])
        past = self.slot_length(slot)
        cache = self._slots.get(slot)
        cached_rows = batch
        if cache is not None and cache.layers[0].is_initialized:
            cached_rows = int(cache.layers[0].keys.shape[0])  # keys: [B, kv_heads, past, d]
        problem = None
        if cached_rows != batch:
            problem = f"slot holds {cached_rows} rows, x has {batch}"
        elif tuple(mask.shape) != (batch, past + new):
            problem = (
                f"attention_mask must be [B, past + T] = [{batch}, {past + new}] "
                f"(slot has {past} cached positions), got {tuple(mask.shape)}"
            )
        elif tuple(position_ids.shape) != (batch, new):
            problem = (
                f"position_ids must be [B, T] = [{batch}, {new}], got {tuple(position_ids.shape)}"
            )
        if problem is not None:
            raise StageError(
                f"stage {self.name}, slot {slot!r}: {problem}", stage=self.name, slot=slot
            )

    def __repr__(self) -> str:
        return (
            f"StageCompute({str(self.checkpoint.path)!r}, {self.layer_start}, {self.layer_end}, "
            f"dtype={self.dtype}, slots={len(self._slots)})"
        )

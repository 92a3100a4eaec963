"""The local transport: ``StageCompute`` stages chained in one process.

The Ray pipeline moves the same tensors between actors; ``LocalPipeline`` is the in-memory
reference it is tested against, and the simplest way to run a sharded model on one machine.

Example:
    >>> stages = [StageCompute(path, 0, 2), StageCompute(path, 2, 4)]          # doctest: +SKIP
    >>> LocalPipeline(stages).greedy_generate(ids, max_new_tokens=8)           # doctest: +SKIP
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

from inference._exceptions import PlanError
from inference._stage import StageCompute, position_ids_from_mask

__all__ = ["LocalPipeline"]

_generation_ids = itertools.count()  # unique slot names for greedy_generate calls


class LocalPipeline:
    """Stages covering layers ``[0, num_layers)`` in order, called one after another.

    Args:
        stages: contiguous stages of one checkpoint: the first holds layer 0, each starts where
            the previous ends, the last holds the final layer.

    Raises:
        PlanError: no stages, a gap or overlap between stages, or the ends not covered.

    Example:
        >>> pipe = LocalPipeline([StageCompute(path, 0, 4)])                    # doctest: +SKIP
        >>> pipe.forward("s", ids).shape                                       # doctest: +SKIP
        torch.Size([1, 5, 128])
    """

    def __init__(self, stages: Sequence[StageCompute]) -> None:
        if not stages:
            raise PlanError("LocalPipeline needs at least one stage")
        ranges = [(s.layer_start, s.layer_end) for s in stages]
        bounds = [0, *(end for _, end in ranges)]
        starts = [start for start, _ in ranges]
        if starts != bounds[:-1] or not stages[-1].is_last:
            raise PlanError(
                f"stages {ranges} do not cover layers [0, {stages[0].checkpoint.num_layers}) "
                "contiguously; give each stage the range starting where the previous one ends",
                ranges=ranges,
            )
        self.stages = list(stages)

    def forward(
        self,
        slot: str,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        *,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Run ``T`` new tokens of micro-batch ``slot`` through every stage.

        Args:
            slot: KV-cache slot name, shared by all stages.
            input_ids: ``[B, T]``.
            attention_mask: ``[B, past + T]`` (1 = real, 0 = left pad); None means no padding.
            position_ids: ``[B, T]``; None derives them from the mask (``position_ids_from_mask``).
            last_only: return only the final position's logits.

        Returns:
            float32 logits ``[B, T, V]`` (``[B, 1, V]`` with ``last_only``).

        Raises:
            StageError: from the stage that failed (see ``StageCompute.forward``).
        """
        batch, new = input_ids.shape
        if attention_mask is None:
            past = self.stages[0].slot_length(slot)
            attention_mask = torch.ones(batch, past + new, dtype=torch.long)
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask, new)
        x = input_ids
        for stage in self.stages:
            x = stage.forward(slot, x, attention_mask, position_ids, last_only=last_only)
        return x

    def drop_slot(self, slot: str) -> None:
        """Free ``slot`` on every stage."""
        for stage in self.stages:
            stage.drop_slot(slot)

    def greedy_generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        attention_mask: torch.Tensor | None = None,
        *,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
    ) -> torch.Tensor:
        """Greedy decoding with the KV cache: one prefill, then one token per step.

        Matches ``model.generate(do_sample=False)`` of the unsharded model: rows that produced
        ``eos_token_id`` continue with ``pad_token_id``, and generation stops early once every
        row has finished.

        Args:
            input_ids: left-padded prompts ``[B, T]``.
            max_new_tokens: tokens to generate at most.
            attention_mask: ``[B, T]`` for the prompts; None means no padding.
            eos_token_id: stop a row when it emits this id; None never stops early.
            pad_token_id: what finished rows emit (default: ``eos_token_id``).

        Returns:
            ``[B, T + n]`` prompt followed by the ``n <= max_new_tokens`` generated ids.

        Example:
            >>> pipe.greedy_generate(torch.tensor([[72, 105]]), 4)                 # doctest: +SKIP
        """
        slot = f"greedy-{next(_generation_ids)}"
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
        pad = eos_token_id if pad_token_id is None else pad_token_id
        finished = torch.zeros(input_ids.shape[0], dtype=torch.bool)
        tokens, step_ids = input_ids, input_ids
        try:
            for _ in range(max_new_tokens):
                logits = self.forward(slot, step_ids, mask, last_only=True)  # [B, 1, V]
                next_ids = logits[:, -1, :].argmax(dim=-1).to(input_ids.device)  # [B]
                if eos_token_id is not None:
                    fill = torch.full_like(next_ids, 0 if pad is None else pad)
                    next_ids = torch.where(finished, fill, next_ids)
                    finished |= next_ids == eos_token_id
                step_ids = next_ids[:, None]  # [B] -> [B, 1]
                tokens = torch.cat([tokens, step_ids], dim=1)
                mask = torch.cat([mask, torch.ones_like(step_ids)], dim=1)
                if eos_token_id is not None and bool(finished.all()):
                    break
        finally:
            self.drop_slot(slot)
        return tokens

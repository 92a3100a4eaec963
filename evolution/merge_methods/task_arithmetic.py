"""``task_arithmetic``: add scaled task vectors to the base (Ilharco et al. 2023).

    tau_i  = theta_i - theta_base                      (task vector of model i)
    merged = theta_base + lambda * sum_i w_i * tau_i

Choices where implementations differ:

* ``lambda`` (global, default 1.0) is the paper's single scaling coefficient; the per-model
  ``weight`` (default 1.0) scales each task vector on its own, so a genome can tune both. A
  negative weight subtracts a task ("forgetting via negation" in the paper).
* No normalisation by the weight sum (mergekit's ``normalize`` option for this method is off by
  default too): with three unit-weight models and ``lambda: 1`` all three task vectors are
  added in full.

Recipe:
    method: task_arithmetic
    base_model: ./base
    models: [{path: ./math, weight: 1.0}, {path: ./code, weight: 0.5}]
    parameters: {lambda: 0.8}

Example:
    >>> import torch
    >>> from evolution.merge_methods import MergeParams, get_method
    >>> p = MergeParams.uniform(2, options={"lambda": 0.5})
    >>> base, a, b = torch.tensor([1.0]), torch.tensor([3.0]), torch.tensor([5.0])
    >>> get_method("task_arithmetic").merge_tensor("w", base, [a, b], p)   # 1 + 0.5 * (2 + 4)
    tensor([4.])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch

from evolution.merge_methods._base import (
    WIDE_TILE,
    MergeParams,
    OptionValue,
    PieceMerger,
    PieceWiseMethod,
    tiles,
)
from evolution.merge_methods.registry import register

__all__ = ["TaskArithmetic"]


@register
class TaskArithmetic(PieceWiseMethod):
    """Base plus ``lambda`` times the weighted sum of task vectors."""

    name = "task_arithmetic"
    needs_base = True
    model_defaults: ClassVar[Mapping[str, float | None]] = {"weight": 1.0}
    elementwise = True  # the merge may pass runs of a large tensor's elements
    options: ClassVar[Mapping[str, OptionValue]] = {"lambda": 1.0}

    def start(
        self, name: str, shape: tuple[int, ...], piece: int, params: MergeParams
    ) -> PieceMerger:
        return _TaskArithmeticMerger(params)


class _TaskArithmeticMerger(PieceMerger):
    """Tile by tile: ``lam sum_i w_i theta_i + (1 - lam sum_i w_i) base``.

    That is ``base + lam * sum_i w_i (theta_i - base)`` rearranged into one pass per input and
    no temporary; the cancellation costs ~len(models) float32 ulps of the weights' magnitude,
    far below bfloat16/float16 output rounding.
    """

    def __init__(self, params: MergeParams) -> None:
        lam = params.number("lambda", 1.0)
        self.factors = [lam * w for w in params.weights]
        self.base_factor = 1.0 - lam * sum(params.weights)

    def merge(
        self,
        first: int,
        base: torch.Tensor | None,
        tensors: Sequence[torch.Tensor],
        out: torch.Tensor,
    ) -> None:
        assert base is not None
        for start, stop in tiles(out.numel(), out.device, WIDE_TILE):
            o = torch.mul(tensors[0][start:stop], self.factors[0], out=out[start:stop])
            for tensor, factor in zip(tensors[1:], self.factors[1:]):
                o.add_(tensor[start:stop], alpha=factor)
            o.add_(base[start:stop], alpha=self.base_factor)

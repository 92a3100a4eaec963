"""``linear``: the weighted average of the models' weights ("model soups", Wortsman et al. 2022).

    merged = sum_i w_i * theta_i / sum_i w_i        (normalize: true, the default)
    merged = sum_i w_i * theta_i                    (normalize: false)

Choices where implementations differ:

* Normalisation: weights are divided by their sum by default (mergekit's ``linear`` does the
  same), so ``weight: 2`` and ``weight: 1`` mean 2/3 and 1/3, and a genome's raw weights need
  not sum to one. ``normalize: false`` uses the weights as given (then weights summing to 1 are
  the caller's business). A zero weight sum with ``normalize`` is refused.
* The base model plays no part: it is only the template (config, tokenizer, tensor list) when
  the recipe names one; put it in ``models`` to mix it in.

Recipe:
    method: linear
    models: [{path: ./a, weight: 0.7}, {path: ./b, weight: 0.3}]
    parameters: {normalize: true}

Example:
    >>> import torch
    >>> from evolution.merge_methods import MergeParams, get_method
    >>> p = MergeParams(weights=(3.0, 1.0), densities=(1.0, 1.0), gammas=(0.0, 0.0))
    >>> get_method("linear").merge_tensor("w", None, [torch.tensor([4.0]), torch.tensor([0.0])], p)
    tensor([3.])
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

__all__ = ["Linear"]


@register
class Linear(PieceWiseMethod):
    """Weighted average (or weighted sum) of the models' tensors."""

    name = "linear"
    needs_base = False
    model_defaults: ClassVar[Mapping[str, float | None]] = {"weight": 1.0}
    elementwise = True  # the merge may pass runs of a large tensor's elements
    options: ClassVar[Mapping[str, OptionValue]] = {"normalize": True}

    def check(self, params: MergeParams) -> None:
        if params.flag("normalize", True) and sum(params.weights) == 0:
            raise ValueError(
                f"linear with normalize: true needs weights with a non-zero sum, got "
                f"{list(params.weights)}; change the weights or set normalize: false"
            )

    def start(
        self, name: str, shape: tuple[int, ...], piece: int, params: MergeParams
    ) -> PieceMerger:
        return _LinearMerger(params)


class _LinearMerger(PieceMerger):
    """out = sum_i (w_i * scale) * theta_i, tile by tile (one pass per model over each tile)."""

    def __init__(self, params: MergeParams) -> None:
        scale = 1.0 / sum(params.weights) if params.flag("normalize", True) else 1.0
        self.factors = [w * scale for w in params.weights]

    def merge(
        self,
        first: int,
        base: torch.Tensor | None,
        tensors: Sequence[torch.Tensor],
        out: torch.Tensor,
    ) -> None:
        for start, stop in tiles(out.numel(), out.device, WIDE_TILE):
            o = torch.mul(tensors[0][start:stop], self.factors[0], out=out[start:stop])
            for tensor, factor in zip(tensors[1:], self.factors[1:]):
                o.add_(tensor[start:stop], alpha=factor)

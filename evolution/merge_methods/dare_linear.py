"""``dare_linear``: DARE drop-and-rescale, then task arithmetic (Yu et al. 2024).

    tau_i   = theta_i - theta_base
    m_i     ~ Bernoulli(1 - p) per entry, p = 1 - density       (drop each entry with prob. p)
    tau_i'  = m_i * tau_i / (1 - p)                              (rescale: expectation unchanged)
    merged  = theta_base + lambda * sum_i w_i * tau_i'

Choices where implementations differ:

* Rescale: ``1 / (1 - p)`` as in the paper (``rescale: true``, the default), which preserves the
  expected value of every entry. Some later implementations rescale so the masked vector keeps
  its L1/L2 norm instead (mergekit's ``rescale_norm``, DELLA); that is not offered here.
  ``rescale: false`` keeps the survivors unscaled (mergekit's ``rescale: false``).
* Randomness: each mask comes from a CPU ``torch.Generator`` seeded by
  ``sha256(seed, model index, tensor name)`` (``_sparsify.generator``): the same recipe gives the
  same bytes, whatever the tensor order, process or device, and the models' masks are independent.
* ``density`` (the keep probability ``1 - p``) has no default: the paper's best drop rates vary
  with the model (p = 0.9 works for many SFT deltas); the recipe must say.
* No normalisation by the weight sum, as in ``task_arithmetic``.

Recipe:
    method: dare_linear
    base_model: ./base
    models: [{path: ./a, density: 0.1}, {path: ./b, density: 0.3, weight: 0.5}]
    parameters: {lambda: 1.0}
    seed: 7

Example:
    >>> import torch
    >>> from evolution.merge_methods import MergeParams, get_method
    >>> p = MergeParams.uniform(1, density=0.5)
    >>> out = get_method("dare_linear").merge_tensor("w", torch.zeros(4), [torch.ones(4)], p)
    >>> sorted(set(out.tolist())) <= [0.0, 2.0]
    True
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch

from evolution.merge_methods._base import (
    MergeParams,
    OptionValue,
    PieceMerger,
    PieceWiseMethod,
    tiles,
)
from evolution.merge_methods._sparsify import generator, random_drop_
from evolution.merge_methods.registry import register

__all__ = ["DareLinear"]


class _DareLinearMerger(PieceMerger):
    """Drop, rescale and sum tile by tile; each model's mask is drawn in element order."""

    def __init__(self, name: str, params: MergeParams) -> None:
        self.params = params
        self.generators = [generator(params.seed, name, i) for i in range(len(params.weights))]

    def merge(
        self,
        first: int,
        base: torch.Tensor | None,
        tensors: Sequence[torch.Tensor],
        out: torch.Tensor,
    ) -> None:
        assert base is not None
        params = self.params
        rescale = params.flag("rescale", True)
        for start, stop in tiles(out.numel(), out.device):
            b = base[start:stop]
            total = torch.zeros_like(b)
            for tensor, weight, density, gen in zip(
                tensors, params.weights, params.densities, self.generators
            ):
                delta = torch.sub(tensor[start:stop], b)
                total.add_(random_drop_(delta, density, gen, rescale=rescale), alpha=weight)
            torch.add(total.mul_(params.number("lambda", 1.0)), b, out=out[start:stop])


@register
class DareLinear(PieceWiseMethod):
    """Randomly drop task-vector entries, rescale the survivors, add them to the base."""

    name = "dare_linear"
    needs_base = True
    model_defaults: ClassVar[Mapping[str, float | None]] = {"weight": 1.0, "density": None}
    options: ClassVar[Mapping[str, OptionValue]] = {"lambda": 1.0, "rescale": True}

    def start(
        self, name: str, shape: tuple[int, ...], piece: int, params: MergeParams
    ) -> PieceMerger:
        return _DareLinearMerger(name, params)

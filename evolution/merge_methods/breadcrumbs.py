"""``breadcrumbs``: Model Breadcrumbs — drop both tails of each task vector (Davari & Belilovsky 2023).

    tau_i   = theta_i - theta_base
    mask_i  = drop the gamma fraction of largest |tau_i| (outliers) and every entry below the
              next `density` fraction (negligible perturbations); keep the band in between
    merged  = theta_base + lambda * sum_i w_i * mask_i * tau_i

Choices where implementations differ:

* beta / gamma: the paper masks two tails of the magnitude distribution with two
  hyper-parameters. Here the large-magnitude tail is ``gamma`` (fraction of entries dropped
  as outliers, per model, default 0.01) and the band kept is ``density`` (per model, no default);
  the small-magnitude tail dropped is therefore ``beta = 1 - density - gamma``. This is
  mergekit's ``breadcrumbs`` parametrisation; ``density + gamma`` must not exceed 1.
* Scope: per tensor (the whole flattened tensor). The authors' code ranks along the last
  dimension (per output row); mergekit ranks per tensor, as here.
* Counts: ``round(gamma * numel)`` outliers, then ``max(1, round(density * numel))`` kept;
  ties at a threshold are resolved by ``>=`` / ``<`` on the k-th largest magnitude.
* No sign election and no normalisation: masked task vectors are summed as in task arithmetic
  (mergekit's ``breadcrumbs``; its ``breadcrumbs_ties`` variant is not offered).

Recipe:
    method: breadcrumbs
    base_model: ./base
    models: [{path: ./a, density: 0.9, gamma: 0.01}, {path: ./b, density: 0.9, gamma: 0.01}]
    parameters: {lambda: 1.0}

Example:
    >>> import torch
    >>> from evolution.merge_methods import MergeParams, get_method
    >>> p = MergeParams.uniform(1, density=0.4, gamma=0.2)
    >>> get_method("breadcrumbs").merge_tensor("w", torch.zeros(5), [torch.tensor([1.0, -2.0, 3.0, -4.0, 5.0])], p)
    tensor([ 0.,  0.,  3., -4.,  0.])
"""

from __future__ import annotations

import math
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
from evolution.merge_methods._sparsify import (
    MagnitudeRanks,
    RankedMerger,
    drop_at_least_,
    keep_at_least_,
    keep_count,
)
from evolution.merge_methods.registry import register

__all__ = ["Breadcrumbs"]


class _BreadcrumbsMerger(RankedMerger):
    """Per model: rank |tau| (two statistics passes when in pieces), then mask tile by tile.

    Model ``i`` keeps ``|tau| >= low`` and, with outliers, ``|tau| < high``, where ``low`` is
    the ``(n_top + n_keep)``-th and ``high`` the ``n_top``-th largest magnitude: the same
    masks as ``trim_outliers_`` on the whole tensor.
    """

    def __init__(self, numel: int, piece: int, params: MergeParams) -> None:
        self.params = params
        self.single = piece >= numel
        self.ranks: list[MagnitudeRanks | None] = []  # None: the whole task vector is dropped
        for density, gamma in zip(params.densities, params.gammas):
            n_top = round(gamma * numel)
            n_keep = min(keep_count(density, numel), numel - n_top)
            ks = [n_top + n_keep, n_top] if n_top > 0 else [n_keep]
            ok = numel > 0 and n_keep > 0
            self.ranks.append(MagnitudeRanks(numel, ks, whole=self.single) if ok else None)

    def merge(
        self,
        first: int,
        base: torch.Tensor | None,
        tensors: Sequence[torch.Tensor],
        out: torch.Tensor,
    ) -> None:
        assert base is not None
        self.rank_whole(base, tensors)
        for start, stop in tiles(out.numel(), out.device):
            b = base[start:stop]
            total = torch.zeros_like(b)
            for tensor, weight, ranks in zip(tensors, self.params.weights, self.ranks):
                if ranks is None:
                    continue
                delta = torch.sub(tensor[start:stop], b)
                low, *high = ranks.values
                if high:
                    drop_at_least_(delta, high[0])
                total.add_(keep_at_least_(delta, low), alpha=weight)
            torch.add(total.mul_(self.params.number("lambda", 1.0)), b, out=out[start:stop])


@register
class Breadcrumbs(PieceWiseMethod):
    """Keep the middle band of each task vector's magnitudes and add the bands to the base."""

    name = "breadcrumbs"
    needs_base = True
    model_defaults: ClassVar[Mapping[str, float | None]] = {
        "weight": 1.0,
        "density": None,
        "gamma": 0.01,
    }
    options: ClassVar[Mapping[str, OptionValue]] = {"lambda": 1.0}

    def check(self, params: MergeParams) -> None:
        for i, (density, gamma) in enumerate(zip(params.densities, params.gammas)):
            if not 0.0 <= gamma < 1.0 or density + gamma > 1.0 + 1e-9:
                raise ValueError(
                    f"breadcrumbs model {i}: need 0 <= gamma < 1 and density + gamma <= 1 "
                    f"(the smallest fraction dropped is 1 - density - gamma), got density="
                    f"{density}, gamma={gamma}; lower density or gamma"
                )

    def start(
        self, name: str, shape: tuple[int, ...], piece: int, params: MergeParams
    ) -> PieceMerger:
        return _BreadcrumbsMerger(math.prod(shape), piece, params)

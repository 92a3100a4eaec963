"""``ties``: TIES-Merging — trim, elect sign, disjoint merge (Yadav et al. 2023).

    tau_i   = theta_i - theta_base
    trim:     keep the top-k% magnitudes of each tau_i (k = density), zero the rest
    elect:    gamma = sign(sum_i w_i * trimmed tau_i)            (the sign with more total mass)
    merge:    tau_m = sum_{i in A} w_i tau_i / sum_{i in A} w_i,  A = {i : sign(w_i tau_i) = gamma, tau_i != 0}
    merged  = theta_base + lambda * tau_m

Choices where implementations differ:

* Top-k scope: **per tensor**. The paper's reference code flattens the whole task vector of a
  model and keeps its global top-k%; a streaming merge sees one tensor at a time, so the
  threshold is each tensor's own (mergekit does the same). The two agree when magnitudes are
  alike across tensors; per tensor never empties a tensor whose updates are small overall.
  ``density`` (default 0.2, the paper's k = 20%) keeps ``max(1, round(density * numel))``
  entries; ties at the threshold are all kept (reference code: ``kthvalue`` then ``>=``).
* Disjoint-mean divisor: the number of models whose trimmed entry is non-zero and agrees with
  the elected sign (the paper's |A^p|), computed per entry. With per-model weights it is the sum
  of those models' weights, i.e. a weighted mean of the agreeing tau_i (mergekit's
  ``normalize: true``); unit weights give exactly the paper. ``normalize: false`` gives the
  disjoint sum. Entries nobody agrees on (or whose mass cancels exactly) stay at the base.
* Sign election uses the weighted trimmed vectors (``sum w_i tau_i``, mergekit's ``sum``
  method); weights must be positive (a negative weight would flip a model's vote).
* ``lambda`` (default 1.0) scales the merged task vector (the paper tunes it; 1 is its default
  when the mean is disjoint).

Recipe:
    method: ties
    base_model: ./base
    models: [{path: ./a, density: 0.2}, {path: ./b, density: 0.2, weight: 0.5}]
    parameters: {lambda: 1.0, normalize: true}

Example:
    >>> import torch
    >>> from evolution.merge_methods import MergeParams, get_method
    >>> base = torch.zeros(3)
    >>> a, b, c = torch.tensor([1.0, 2.0, -1.0]), torch.tensor([3.0, -1.0, -2.0]), torch.tensor([-1.0, -2.0, 4.0])
    >>> get_method("ties").merge_tensor("w", base, [a, b, c], MergeParams.uniform(3, density=1.0))
    tensor([ 2.0000, -1.5000,  4.0000])
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
    disjoint_merge_,
    elect_sign,
    generator,
    keep_at_least_,
    keep_count,
    random_drop_,
)
from evolution.merge_methods.registry import register

__all__ = ["Ties", "TiesMerger"]


def check_positive_weights(method: str, params: MergeParams) -> None:
    """Sign election needs positive weights (shared with ``dare_ties``)."""
    if any(w <= 0 for w in params.weights):
        raise ValueError(
            f"{method} needs positive model weights (a weight scales a model's vote in the sign "
            f"election), got {list(params.weights)}; use task_arithmetic for negation"
        )


class TiesMerger(RankedMerger):
    """TIES (``dare=False``: magnitude trim) or DARE-TIES (``dare=True``: random drop), piece-wise.

    Trimming needs each task vector's k-th largest magnitude over the whole tensor: a tensor
    in several pieces gets two statistics passes (``MagnitudeRanks``), a tensor in one piece is
    ranked on the spot. DARE draws its mask from one generator per model in element order, so
    pieces draw exactly what a whole-tensor draw would. The election and the disjoint mean are
    per entry and run tile by tile.
    """

    def __init__(
        self, name: str, numel: int, piece: int, params: MergeParams, *, dare: bool
    ) -> None:
        self.params, self.dare, self.numel = params, dare, numel
        self.single = piece >= numel
        self.normalize = params.flag("normalize", True)
        self.lam = params.number("lambda", 1.0)
        self.rescale = params.flag("rescale", True)
        self.ranks: list[MagnitudeRanks | None] = []
        self.generators = []
        for i, density in enumerate(params.densities):
            if dare:
                self.generators.append(generator(params.seed, name, i) if density < 1.0 else None)
            elif density < 1.0 and numel:
                ranks = MagnitudeRanks(numel, [keep_count(density, numel)], whole=self.single)
                self.ranks.append(ranks)
                continue
            self.ranks.append(None)

    def merge(
        self,
        first: int,
        base: torch.Tensor | None,
        tensors: Sequence[torch.Tensor],
        out: torch.Tensor,
    ) -> None:
        assert base is not None
        self.rank_whole(base, tensors)
        weights = self.params.weights
        for start, stop in tiles(out.numel(), out.device):
            b = base[start:stop]
            deltas = []
            for i, (tensor, weight) in enumerate(zip(tensors, weights)):
                delta = torch.sub(tensor[start:stop], b)
                gen, ranks = self.generators[i] if self.dare else None, self.ranks[i]
                if gen is not None:
                    random_drop_(delta, self.params.densities[i], gen, rescale=self.rescale)
                elif ranks is not None:
                    keep_at_least_(delta, ranks.values[0])
                deltas.append(delta.mul_(weight))
            sign = elect_sign(deltas)
            merged = disjoint_merge_(deltas, weights, sign, normalize=self.normalize)
            torch.add(merged.mul_(self.lam), b, out=out[start:stop])


@register
class Ties(PieceWiseMethod):
    """Trim each task vector to its largest entries, elect signs, average the agreeing ones."""

    name = "ties"
    needs_base = True
    model_defaults: ClassVar[Mapping[str, float | None]] = {"weight": 1.0, "density": 0.2}
    options: ClassVar[Mapping[str, OptionValue]] = {"lambda": 1.0, "normalize": True}

    def check(self, params: MergeParams) -> None:
        check_positive_weights(self.name, params)

    def start(
        self, name: str, shape: tuple[int, ...], piece: int, params: MergeParams
    ) -> PieceMerger:
        return TiesMerger(name, math.prod(shape), piece, params, dare=False)

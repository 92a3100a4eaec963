"""``dare_ties``: DARE drop-and-rescale, then TIES sign election and disjoint mean (Yu et al. 2024).

    tau_i'  = m_i * (theta_i - theta_base) / (1 - p),  m_i ~ Bernoulli(1 - p), p = 1 - density
    gamma   = sign(sum_i w_i tau_i')
    tau_m   = sum_{i in A} w_i tau_i' / sum_{i in A} w_i,  A = {i : sign(tau_i') = gamma, tau_i' != 0}
    merged  = theta_base + lambda * tau_m

DARE replaces TIES' magnitude trim; the election and the disjoint mean are TIES' own.

Choices where implementations differ:

* Rescale ``1 / (1 - p)`` (paper; ``rescale: true``), not a norm-preserving rescale; see
  ``dare_linear``. Masks are seeded by ``(seed, model index, tensor name)``, see ``dare_linear``.
* Disjoint-mean divisor: the (weighted) count of models whose *surviving* entry agrees with the
  elected sign, per entry — the TIES definition applied after the random drop, so dropped
  entries do not dilute the mean (mergekit's ``dare_ties`` with ``normalize: true``). Note the
  1/(1-p) rescale then survives the mean: a lone survivor contributes tau/(1-p).
* Weights must be positive (they scale votes); ``density`` has no default.

Recipe:
    method: dare_ties
    base_model: ./base
    models: [{path: ./a, density: 0.3}, {path: ./b, density: 0.3}]
    parameters: {lambda: 1.0, normalize: true}

Example:
    >>> import torch
    >>> from evolution.merge_methods import MergeParams, get_method
    >>> p = MergeParams.uniform(2, density=1.0)
    >>> get_method("dare_ties").merge_tensor("w", torch.zeros(2), [torch.tensor([1.0, 1.0]), torch.tensor([3.0, -4.0])], p)
    tensor([ 2., -4.])
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import ClassVar

from evolution.merge_methods._base import MergeParams, OptionValue, PieceMerger, PieceWiseMethod
from evolution.merge_methods.registry import register
from evolution.merge_methods.ties import TiesMerger, check_positive_weights

__all__ = ["DareTies"]


@register
class DareTies(PieceWiseMethod):
    """Randomly drop and rescale task-vector entries, then merge them the TIES way."""

    name = "dare_ties"
    needs_base = True
    model_defaults: ClassVar[Mapping[str, float | None]] = {"weight": 1.0, "density": None}
    options: ClassVar[Mapping[str, OptionValue]] = {
        "lambda": 1.0,
        "rescale": True,
        "normalize": True,
    }

    def check(self, params: MergeParams) -> None:
        check_positive_weights(self.name, params)

    def start(
        self, name: str, shape: tuple[int, ...], piece: int, params: MergeParams
    ) -> PieceMerger:
        return TiesMerger(name, math.prod(shape), piece, params, dare=True)

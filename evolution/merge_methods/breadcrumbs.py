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

from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch

from evolution.merge_methods._base import MergeMethod, MergeParams, OptionValue
from evolution.merge_methods._sparsify import trim_outliers_
from evolution.merge_methods.registry import register

__all__ = ["Breadcrumbs"]


@register
class Breadcrumbs(MergeMethod):
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

    def merge_tensor(
        self,
        name: str,
        base: torch.Tensor | None,
        tensors: Sequence[torch.Tensor],
        params: MergeParams,
    ) -> torch.Tensor:
        assert base is not None  # needs_base: the merge always passes it
        total = torch.zeros_like(base)
        for tensor, weight, density, gamma in zip(
            tensors, params.weights, params.densities, params.gammas
        ):
            total.add_(trim_outliers_(tensor - base, density, gamma), alpha=weight)
        return total.mul_(params.number("lambda", 1.0)).add_(base)

"""``slerp``: spherical linear interpolation between two models (Shoemake 1985; mergekit).

Each tensor is flattened into one vector; with ``cos(Omega) = <v0, v1> / (|v0| |v1|)``:

    merged = sin((1 - t) Omega) / sin(Omega) * v0 + sin(t Omega) / sin(Omega) * v1

``t = 0`` gives ``models[0]``, ``t = 1`` gives ``models[1]``. The angle comes from the
normalised vectors but the interpolation uses the original ones, so norms are interpolated too
(the same as mergekit's ``slerp``).

Choices where implementations differ:

* Near-parallel fallback: when ``|cos(Omega)| > dot_threshold`` (default 0.9995, mergekit's
  ``DOT_THRESHOLD``; ``Omega`` below about 1.8 degrees) ``sin(Omega)`` is too close to zero to
  divide by, and the result is plain linear interpolation ``(1 - t) v0 + t v1``. Anti-parallel
  vectors (cos near -1) fall back to lerp too, as in mergekit. A zero-norm tensor (an angle is
  undefined) also falls back to lerp.
* Scope: the angle is taken per tensor (one flattened tensor), not per row or per model.
* Endpoints: exactly two ``models``; ``base_model``, when given, is only the template (config,
  tokenizer). mergekit instead interpolates from ``base_model`` to the single other model: write
  the base as ``models[0]`` to get that.
* ``t`` is global; give a layer group its own ``t`` (``layer_groups[*].parameters.t``) for
  mergekit's per-layer ``t`` gradients. Model weights are ignored.

Recipe:
    method: slerp
    models: [{path: ./a}, {path: ./b}]
    parameters: {t: 0.3}

Example:
    >>> import torch
    >>> from evolution.merge_methods import MergeParams, get_method
    >>> p = MergeParams.uniform(2, options={"t": 0.5})
    >>> get_method("slerp").merge_tensor("w", None, [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])], p)
    tensor([0.7071, 0.7071])
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch

from evolution.merge_methods._base import MergeMethod, MergeParams, OptionValue
from evolution.merge_methods.registry import register

__all__ = ["Slerp"]

_NORM_EPS = 1e-12  # below this norm a tensor has no direction: interpolate linearly


@register
class Slerp(MergeMethod):
    """Interpolate along the great circle between two models' tensors."""

    name = "slerp"
    needs_base = False
    min_models = 2
    max_models = 2
    model_defaults: ClassVar[Mapping[str, float | None]] = {}
    options: ClassVar[Mapping[str, OptionValue]] = {"t": 0.5, "dot_threshold": 0.9995}

    def check(self, params: MergeParams) -> None:
        threshold = params.number("dot_threshold", 0.9995)
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"slerp dot_threshold must be in (0, 1], got {threshold}")

    def merge_tensor(
        self,
        name: str,
        base: torch.Tensor | None,
        tensors: Sequence[torch.Tensor],
        params: MergeParams,
    ) -> torch.Tensor:
        v0, v1 = tensors
        t = params.number("t", 0.5)
        norm0, norm1 = float(v0.norm()), float(v1.norm())
        if norm0 < _NORM_EPS or norm1 < _NORM_EPS:
            return torch.lerp(v0, v1, t)
        dot = float(torch.dot(v0.reshape(-1), v1.reshape(-1))) / (norm0 * norm1)
        dot = max(-1.0, min(1.0, dot))
        if abs(dot) > params.number("dot_threshold", 0.9995):
            return torch.lerp(v0, v1, t)
        omega = math.acos(dot)
        sin_omega = math.sin(omega)
        s0 = math.sin((1.0 - t) * omega) / sin_omega
        s1 = math.sin(t * omega) / sin_omega
        return torch.add(v0 * s0, v1, alpha=s1)

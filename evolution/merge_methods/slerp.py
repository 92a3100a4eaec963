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

from evolution.merge_methods._base import (
    MergeParams,
    OptionValue,
    PieceMerger,
    PieceWiseMethod,
    tiles,
)
from evolution.merge_methods._sparsify import stat_tiles
from evolution.merge_methods.registry import register

__all__ = ["Slerp"]

_NORM_EPS = 1e-12  # below this norm a tensor has no direction: interpolate linearly
_BLOCK = 4096  # elements per float64 partial sum of the dot product and the squared norms


def _partial_sums(v0: torch.Tensor, v1: torch.Tensor, first: int) -> list[tuple[float, ...]]:
    """Per ``_BLOCK`` run of elements: (v0.v1, v0.v0, v1.v1) in float64.

    Blocks start at multiples of ``_BLOCK`` of the whole tensor (``first`` must be one) and are
    summed row by row, each row by one thread, so the partial sums do not depend on how the
    tensor was split into pieces or on the thread count; ``math.fsum`` then adds them exactly.
    """
    assert first % _BLOCK == 0
    sums: list[tuple[float, ...]] = []
    for start, stop in stat_tiles(v0.numel()):
        a, b = v0[start:stop].double(), v1[start:stop].double()
        full = (stop - start) // _BLOCK * _BLOCK
        parts = []
        if full:
            rows_a, rows_b = (
                a[:full].view(-1, _BLOCK),
                b[:full].view(-1, _BLOCK),
            )  # (blocks, _BLOCK)
            parts.append(torch.stack([(rows_a * rows_b).sum(1), (rows_a * rows_a).sum(1),
                                      (rows_b * rows_b).sum(1)], 1))  # fmt: skip
        if full < stop - start:
            ta, tb = a[full:], b[full:]
            parts.append(torch.stack([(ta * tb).sum(), (ta * ta).sum(), (tb * tb).sum()])[None])
        sums.extend(tuple(row) for row in torch.cat(parts).tolist())
    return sums


class _SlerpMerger(PieceMerger):
    """Statistics pass (when in pieces): the dot product and norms; merge pass: interpolate."""

    granule = _BLOCK  # partial sums never straddle two pieces

    def __init__(self, numel: int, piece: int, params: MergeParams) -> None:
        self.params = params
        self.passes = 0 if piece >= numel else 1  # the merge rounds pieces to _BLOCK
        self.sums: list[tuple[float, ...]] = []
        self.scales: tuple[float, float] | None = None  # (s0, s1), or None for lerp

    def observe(
        self,
        pass_index: int,
        first: int,
        base: torch.Tensor | None,
        tensors: Sequence[torch.Tensor],
    ) -> None:
        self.sums.extend(_partial_sums(tensors[0], tensors[1], first))

    def _decide(self) -> None:
        dot, sq0, sq1 = (
            (math.fsum(column) for column in zip(*self.sums)) if self.sums else (0, 0, 0)
        )
        self.sums = []
        self.scales = None
        norm0, norm1 = math.sqrt(sq0), math.sqrt(sq1)
        if norm0 < _NORM_EPS or norm1 < _NORM_EPS:
            return
        cos = max(-1.0, min(1.0, dot / (norm0 * norm1)))
        if abs(cos) > self.params.number("dot_threshold", 0.9995):
            return
        omega = math.acos(cos)
        t = self.params.number("t", 0.5)
        self.scales = (math.sin((1.0 - t) * omega) / math.sin(omega),
                       math.sin(t * omega) / math.sin(omega))  # fmt: skip

    def end_pass(self, pass_index: int) -> None:
        self._decide()

    def merge(
        self,
        first: int,
        base: torch.Tensor | None,
        tensors: Sequence[torch.Tensor],
        out: torch.Tensor,
    ) -> None:
        v0, v1 = tensors
        if self.passes == 0:  # the whole tensor is here
            self.sums = _partial_sums(v0, v1, 0)
            self._decide()
        t = self.params.number("t", 0.5)
        for start, stop in tiles(out.numel(), out.device):
            o = out[start:stop]
            if self.scales is None:
                torch.lerp(v0[start:stop], v1[start:stop], t, out=o)
            else:
                torch.mul(v0[start:stop], self.scales[0], out=o).add_(
                    v1[start:stop], alpha=self.scales[1]
                )


@register
class Slerp(PieceWiseMethod):
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

    def start(
        self, name: str, shape: tuple[int, ...], piece: int, params: MergeParams
    ) -> PieceMerger:
        return _SlerpMerger(math.prod(shape), piece, params)

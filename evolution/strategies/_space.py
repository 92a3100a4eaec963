"""The genome space: how many genes, their bounds, their names and the starting point.

A genome is a tuple of floats, one per gene (for model merging: a weight or density per model
and layer group). Strategies keep every candidate inside the box ``low <= x <= high``: they
reflect or clip a point that strays out, never hand it to an evaluator.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, model_validator

__all__ = ["GenomeSpace"]


def _broadcast(value: Any, dims: int, what: str) -> tuple[float, ...]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (float(value),) * dims
    seq = tuple(float(v) for v in value)
    if len(seq) != dims:
        raise ValueError(
            f"{what} has {len(seq)} values but dims={dims}; give one value per gene or a scalar"
        )
    return seq


class GenomeSpace(BaseModel):
    """A box of ``dims`` real genes, ``low[i] <= x[i] <= high[i]``, with a starting point.

    Frozen and validated, so it travels inside a strategy's saved state. Scalars for ``low``,
    ``high`` and ``initial`` apply to every gene.

    Args:
        dims: number of genes (>= 1).
        low: lower bound, a scalar or one value per gene.
        high: upper bound, a scalar or one value per gene; each must exceed its ``low``.
        names: optional gene names (unique, one per gene), used by :meth:`named`.
        initial: the starting point (CMA-ES mean, GA seed individual); default the box center.

    Raises:
        pydantic.ValidationError: a length mismatch, ``low >= high``, a non-finite bound,
            duplicate names, or ``initial`` outside the box.

    Example:
        >>> space = GenomeSpace(dims=3, low=0.0, high=[1.0, 1.0, 2.0], names=["a", "b", "c"])
        >>> space.initial
        (0.5, 0.5, 1.0)
        >>> space.reflect([1.25, -0.5, 1.0])
        (0.75, 0.5, 1.0)
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    dims: int  # number of genes
    low: tuple[float, ...]  # per-gene lower bound (inclusive)
    high: tuple[float, ...]  # per-gene upper bound (inclusive), > low
    names: tuple[str, ...] | None = None  # optional per-gene names
    initial: tuple[float, ...]  # starting point inside the box (default: its center)

    def __init__(
        self,
        dims: int,
        low: float | Sequence[float] = 0.0,
        high: float | Sequence[float] = 1.0,
        names: Sequence[str] | None = None,
        initial: float | Sequence[float] | None = None,
    ) -> None:
        super().__init__(dims=dims, low=low, high=high, names=names, initial=initial)

    @model_validator(mode="before")
    @classmethod
    def _normalise(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        dims = data.get("dims")
        if not isinstance(dims, int) or isinstance(dims, bool) or dims < 1:
            raise ValueError(f"dims must be an integer >= 1, got {dims!r}")
        low = _broadcast(data.get("low", 0.0), dims, "low")
        high = _broadcast(data.get("high", 1.0), dims, "high")
        for i, (lo, hi) in enumerate(zip(low, high)):
            if not (math.isfinite(lo) and math.isfinite(hi)):
                raise ValueError(f"bounds of gene {i} must be finite, got low={lo}, high={hi}")
            if not lo < hi:
                raise ValueError(f"gene {i}: low ({lo}) must be < high ({hi}); widen the bounds")
        initial = data.get("initial")
        if initial is None:
            init = tuple(lo + (hi - lo) / 2.0 for lo, hi in zip(low, high))
        else:
            init = _broadcast(initial, dims, "initial")
            for i, (x, lo, hi) in enumerate(zip(init, low, high)):
                if not lo <= x <= hi:
                    raise ValueError(
                        f"initial[{i}] = {x} lies outside [{lo}, {hi}]; move it inside the bounds"
                    )
        names = data.get("names")
        if names is not None:
            names = tuple(str(n) for n in names)
            if len(names) != dims:
                raise ValueError(f"names has {len(names)} entries but dims={dims}")
            if len(set(names)) != dims:
                raise ValueError("gene names must be unique")
        data.update(low=low, high=high, initial=init, names=names)
        return data

    # -- arrays ---------------------------------------------------------------------------------

    @property
    def lower(self) -> np.ndarray:
        """Lower bounds as a float64 array, shape ``(dims,)``."""
        return np.asarray(self.low, dtype=np.float64)

    @property
    def upper(self) -> np.ndarray:
        """Upper bounds as a float64 array, shape ``(dims,)``."""
        return np.asarray(self.high, dtype=np.float64)

    @property
    def width(self) -> np.ndarray:
        """``high - low`` per gene, shape ``(dims,)``."""
        width: np.ndarray = self.upper - self.lower
        return width

    # -- keeping points inside -----------------------------------------------------------------

    def _as_array(self, genome: Sequence[float] | np.ndarray) -> np.ndarray:
        x = np.asarray(genome, dtype=np.float64)
        if x.shape != (self.dims,):
            raise ValueError(f"genome has shape {x.shape}, expected ({self.dims},)")
        return x

    def contains(self, genome: Sequence[float] | np.ndarray) -> bool:
        """Whether every gene lies within its bounds (inclusive).

        Args:
            genome: ``dims`` floats.

        Returns:
            True when ``low <= genome <= high`` everywhere.

        Example:
            >>> GenomeSpace(dims=2).contains([0.0, 1.0])
            True
        """
        x = self._as_array(genome)
        return bool(np.all((x >= self.lower) & (x <= self.upper)))

    def clip(self, genome: Sequence[float] | np.ndarray) -> tuple[float, ...]:
        """Project onto the box: each gene to the nearest bound when outside.

        Args:
            genome: ``dims`` floats.

        Returns:
            The clipped genome as a tuple.

        Raises:
            ValueError: wrong length, or a NaN gene.

        Example:
            >>> GenomeSpace(dims=2).clip([1.5, -0.2])
            (1.0, 0.0)
        """
        x = self._as_array(genome)
        if np.isnan(x).any():
            raise ValueError("genome contains NaN; it cannot be brought into bounds")
        return tuple(float(v) for v in np.clip(x, self.lower, self.upper))

    def reflect(self, genome: Sequence[float] | np.ndarray) -> tuple[float, ...]:
        """Mirror out-of-bounds genes back inside, as often as needed (period ``2 * width``).

        Reflection keeps the spread of a mutation instead of piling points on the bounds as
        clipping does. Infinite genes are clipped first.

        Args:
            genome: ``dims`` floats.

        Returns:
            The reflected genome as a tuple; genes already inside are unchanged.

        Raises:
            ValueError: wrong length, or a NaN gene.

        Example:
            >>> GenomeSpace(dims=2).reflect([1.25, -2.5])
            (0.75, 0.5)
        """
        x = self._as_array(genome)
        if np.isnan(x).any():
            raise ValueError("genome contains NaN; it cannot be brought into bounds")
        lo, hi, w = self.lower, self.upper, self.width
        x = np.where(np.isfinite(x), x, np.clip(x, lo, hi))  # +-inf: onto the nearest bound
        inside = (x >= lo) & (x <= hi)
        y = np.mod(x - lo, 2.0 * w)  # position along a sawtooth of period 2w, in [0, 2w)
        y = np.where(y > w, 2.0 * w - y, y)  # fold the descending half back
        out = np.where(inside, x, np.clip(lo + y, lo, hi))  # clip guards rounding at the edges
        return tuple(float(v) for v in out)

    # -- conversions -----------------------------------------------------------------------------

    def to_unit(self, genome: Sequence[float] | np.ndarray) -> np.ndarray:
        """Map a genome to the unit cube: ``(x - low) / width``, shape ``(dims,)``.

        Example:
            >>> GenomeSpace(dims=1, low=-1.0, high=1.0).to_unit([0.5]).tolist()
            [0.75]
        """
        unit: np.ndarray = (self._as_array(genome) - self.lower) / self.width
        return unit

    def from_unit(self, unit: Sequence[float] | np.ndarray) -> tuple[float, ...]:
        """Map a unit-cube point back into the box (clipped against rounding at the edges).

        Example:
            >>> GenomeSpace(dims=1, low=-1.0, high=1.0).from_unit([0.75])
            (0.5,)
        """
        u = self._as_array(unit)
        return self.clip(self.lower + u * self.width)

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """Draw ``n`` points uniformly in the box, shape ``(n, dims)``.

        Args:
            rng: the generator to draw from (its state advances).
            n: how many points.

        Returns:
            A float64 array, one point per row.

        Example:
            >>> GenomeSpace(dims=2).sample(np.random.default_rng(0), 3).shape
            (3, 2)
        """
        points: np.ndarray = self.lower + rng.random((n, self.dims)) * self.width  # (n, dims)
        return points

    def named(self, genome: Sequence[float]) -> dict[str, float]:
        """The genome as ``{name: value}``; unnamed spaces use ``x0, x1, ...``.

        Example:
            >>> GenomeSpace(dims=2, names=["w_a", "w_b"]).named((0.2, 0.8))
            {'w_a': 0.2, 'w_b': 0.8}
        """
        x = self._as_array(genome)
        keys = self.names if self.names is not None else tuple(f"x{i}" for i in range(self.dims))
        return {k: float(v) for k, v in zip(keys, x)}

"""Building blocks shared by the task-vector methods: trimming, random drops, sign consensus.

All functions work on float32 tensors. Those with a trailing underscore (PyTorch's convention)
modify their argument in place and return it: the methods call them on task vectors they own
(``tensor - base``), which keeps the float32 temporaries per model to about one. Masks are built
as 0/1 float32 tensors (``_step``) rather than bool tensors: on the CPU, comparisons and
float-times-bool products run 5-15x slower than plain float arithmetic. "Per tensor" is
the scope throughout: a fraction such as ``density`` applies to the entries of the one tensor
being merged, never to the whole model (the streaming merge sees one tensor at a time).

Example:
    >>> import torch
    >>> trim_magnitude_(torch.tensor([0.1, -3.0, 2.0, 0.5]), 0.5)
    tensor([ 0., -3.,  2.,  0.])
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch

from evolution.merge_methods._base import PieceMerger

__all__ = [
    "MagnitudeRanks",
    "RankedMerger",
    "disjoint_merge_",
    "drop_at_least_",
    "elect_sign",
    "generator",
    "keep_at_least_",
    "keep_count",
    "random_drop_",
    "stat_tiles",
    "trim_magnitude_",
    "trim_outliers_",
]

STAT_TILE = 1 << 18  # elements per run in statistics passes (bounds their temporaries: 1 MiB)


def keep_count(density: float, numel: int) -> int:
    """How many of ``numel`` entries a ``density`` keeps: ``max(1, round(density * numel))``.

    At least one entry survives for any density > 0, so a small tensor (a bias, a norm) is never
    silently emptied; ``density = 1`` keeps everything.

    Example:
        >>> keep_count(0.2, 10), keep_count(0.01, 10), keep_count(1.0, 7)
        (2, 1, 7)
    """
    if numel == 0:
        return 0
    return min(numel, max(1, round(density * numel)))


def _kth_largest_(magnitude: torch.Tensor, ks: Sequence[int]) -> list[float]:
    """The ``k``-th largest value of ``magnitude`` for each ``k`` in ``ks`` (1..numel).

    Destroys the order of ``magnitude`` (it is partitioned in place): on the CPU this is numpy's
    introselect on the tensor's own memory, O(numel) with no copy, where ``torch.kthvalue`` would
    allocate a copy plus int64 indices (3x the float32 tensor).
    """
    n = magnitude.numel()
    positions = [n - k for k in ks]  # the k-th largest is at index n - k in ascending order
    if magnitude.device.type == "cpu":
        array = magnitude.reshape(-1).numpy()
        array.partition(sorted(set(positions)))
        return [float(array[i]) for i in positions]
    flat = magnitude.reshape(-1)
    return [float(torch.kthvalue(flat, i + 1).values) for i in positions]


def _below(value: float) -> float:
    """The largest float32 below ``value``: ``x >= value`` iff ``x > _below(value)``."""
    here = torch.tensor(value, dtype=torch.float32)
    return float(torch.nextafter(here, torch.tensor(-math.inf)))


def _step_(x: torch.Tensor) -> torch.Tensor:
    """In place: 1.0 where ``x > 0``, else 0.0 (``x`` must not hold NaN)."""
    return x.clamp_(min=0.0).sign_()


def keep_at_least_(delta: torch.Tensor, threshold: float) -> torch.Tensor:
    """In place: zero the entries with ``|delta| < threshold`` (``>= threshold`` survive)."""
    keep = torch.abs(delta).sub_(_below(threshold))  # > 0 iff |delta| >= threshold
    return delta.mul_(_step_(keep))


def drop_at_least_(delta: torch.Tensor, threshold: float) -> torch.Tensor:
    """In place: zero the entries with ``|delta| >= threshold``."""
    keep = torch.abs(delta).neg_().add_(threshold)  # > 0 iff |delta| < threshold
    return delta.mul_(_step_(keep))


def stat_tiles(count: int) -> list[tuple[int, int]]:
    """``(start, stop)`` runs of ``STAT_TILE`` elements covering ``0 .. count``."""
    return [(start, min(start + STAT_TILE, count)) for start in range(0, count, STAT_TILE)]


class MagnitudeRanks:
    """Exact k-th largest values of a non-negative tensor seen whole or in pieces.

    TIES and breadcrumbs trim each task vector at its k-th largest magnitude *per tensor*.
    A tensor that arrives whole is partitioned in place (``numpy.partition``: O(n), no copy).
    One that arrives in pieces is ranked exactly by a radix select on its float32 bit patterns
    (for non-negative floats, the order of the bits as integers is the order of the values):
    pass 0 counts the top 16 bits of every value (32768 bins), which pins down the bin holding
    each wanted rank; pass 1 counts the low 16 bits of the values in those bins only, which
    pins down the exact bit pattern. Both ways give the same float, so a piece-wise merge equals
    a whole-tensor merge bit for bit. Memory: 256 KiB of counts plus 512 KiB per wanted bin.

    Example:
        >>> ranks = MagnitudeRanks(4, [1, 3], whole=False)
        >>> for p in range(ranks.passes):
        ...     ranks.observe(p, torch.tensor([3.0, 1.0])); ranks.observe(p, torch.tensor([2.0, 5.0]))
        ...     ranks.end_pass(p)
        >>> ranks.values
        [5.0, 2.0]
    """

    def __init__(self, numel: int, ks: Sequence[int], *, whole: bool) -> None:
        if any(not 1 <= k <= numel for k in ks):
            raise ValueError(f"ranks {list(ks)} out of range 1..{numel}")
        self.ks = list(ks)
        self.passes = 0 if whole else 2
        self.values: list[float] = []  # the k-th largest for each k, once known
        self._high = torch.zeros(1 << 15, dtype=torch.int64)  # counts of the top 16 bits
        self._bins: list[int] = []  # per k: its top-16-bit bin
        self._rest: list[int] = []  # per k: its rank among the values of that bin
        self._low: dict[int, torch.Tensor] = {}  # bin -> counts of the low 16 bits

    def whole(self, magnitude: torch.Tensor) -> None:
        """Rank a whole tensor at once (its order is destroyed)."""
        self.values = _kth_largest_(magnitude, self.ks)

    def observe(self, pass_index: int, magnitude: torch.Tensor) -> None:
        """Count one piece of non-negative float32 values in pass ``pass_index`` (0 or 1)."""
        bits = magnitude.reshape(-1).view(torch.int32)
        if pass_index == 0:
            self._high += torch.bincount(bits >> 16, minlength=1 << 15).cpu()
            return
        high = bits >> 16
        for b, counts in self._low.items():
            low = bits[high == b] & 0xFFFF
            counts += torch.bincount(low, minlength=1 << 16).cpu()

    def end_pass(self, pass_index: int) -> None:
        """Resolve the bins (after pass 0) or the exact values (after pass 1)."""
        if pass_index == 0:
            for k in self.ks:
                b, rest = _rank_in(self._high, k)
                self._bins.append(b)
                self._rest.append(rest)
                self._low.setdefault(b, torch.zeros(1 << 16, dtype=torch.int64))
            return
        for b, rest in zip(self._bins, self._rest):
            low, _ = _rank_in(self._low[b], rest)
            value = torch.tensor([(b << 16) | low], dtype=torch.int32).view(torch.float32)
            self.values.append(float(value))


class RankedMerger(PieceMerger):
    """A piece merger that ranks each model's task-vector magnitudes ``|tensor - base|``.

    Subclasses fill ``self.ranks`` (one ``MagnitudeRanks`` per model, None where nothing is
    ranked) and ``self.single`` (the tensor comes in one piece); this class runs the
    statistics passes the ranks need, and ``rank_whole`` ranks a single-piece tensor on the
    spot.
    """

    ranks: list[MagnitudeRanks | None]
    single: bool

    @property
    def passes(self) -> int:  # type: ignore[override]  # derived here, an attribute elsewhere
        """Statistics passes: as many as the most demanding model's ranking needs."""
        return max((r.passes for r in self.ranks if r is not None), default=0)

    def observe(
        self,
        pass_index: int,
        first: int,
        base: torch.Tensor | None,
        tensors: Sequence[torch.Tensor],
    ) -> None:
        assert base is not None
        for ranks, tensor in zip(self.ranks, tensors):
            if ranks is None:
                continue
            for start, stop in stat_tiles(base.numel()):
                ranks.observe(pass_index, torch.sub(tensor[start:stop], base[start:stop]).abs_())

    def end_pass(self, pass_index: int) -> None:
        for ranks in self.ranks:
            if ranks is not None:
                ranks.end_pass(pass_index)

    def rank_whole(self, base: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
        """The whole tensor is here (no statistics passes ran): rank it now."""
        if self.single:
            for ranks, tensor in zip(self.ranks, tensors):
                if ranks is not None and not ranks.values:
                    ranks.whole(torch.sub(tensor, base).abs_())


def _rank_in(counts: torch.Tensor, k: int) -> tuple[int, int]:
    """(bin holding the k-th largest value, that value's rank within its bin) from counts."""
    from_top = counts.flip(0).cumsum(0)  # from_top[j]: values in the top j + 1 bins
    j = int(torch.searchsorted(from_top, k))  # first j with from_top[j] >= k
    above = int(from_top[j - 1]) if j else 0
    return counts.numel() - 1 - j, k - above


def trim_magnitude_(delta: torch.Tensor, density: float) -> torch.Tensor:
    """In place: keep the ``density`` fraction of largest-magnitude entries, zero the rest.

    The threshold is the k-th largest magnitude (``k = keep_count(density, numel)``) and every
    entry at least that large is kept, as in the TIES reference code (``kthvalue`` + ``>=``): with
    tied magnitudes at the threshold slightly more than k entries survive.

    Example:
        >>> trim_magnitude_(torch.tensor([1.0, -4.0, 3.0, 2.0]), 0.5)
        tensor([ 0., -4.,  3.,  0.])
    """
    if density >= 1.0 or delta.numel() == 0:
        return delta
    (threshold,) = _kth_largest_(delta.abs(), [keep_count(density, delta.numel())])
    return keep_at_least_(delta, threshold)


def trim_outliers_(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """In place: Model Breadcrumbs' mask — drop the ``gamma`` largest, keep the next ``density``.

    Entries are ranked by magnitude. The top ``round(gamma * numel)`` are dropped as outliers,
    the next ``keep_count(density, numel)`` are kept, and everything smaller is dropped, so the
    smallest-magnitude fraction removed is ``1 - density - gamma``.

    Example:
        >>> trim_outliers_(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]), 0.4, 0.2)
        tensor([0., 0., 3., 4., 0.])
    """
    n = delta.numel()
    if n == 0:
        return delta
    n_top = round(gamma * n)
    n_keep = min(keep_count(density, n), n - n_top)
    if n_keep <= 0:
        return delta.zero_()
    magnitude = delta.abs()
    ks = [n_top + n_keep, n_top] if n_top > 0 else [n_keep]
    low, *high = _kth_largest_(magnitude, ks)
    if high:  # drop |delta| >= high: multiply by step(high - |delta|)
        keep = torch.abs(delta, out=magnitude).neg_().add_(high[0])
        delta.mul_(_step_(keep))
    keep = torch.abs(delta, out=magnitude).sub_(_below(low))  # > 0 iff |delta| >= low
    return delta.mul_(_step_(keep))


def generator(seed: int, name: str, index: int) -> torch.Generator:
    """A CPU generator seeded from ``(seed, tensor name, model index)``.

    The seed is the first 8 bytes of ``sha256(f"{seed}/{index}/{name}")``, so each model and each
    tensor gets its own independent stream, and a tensor's mask does not depend on which tensors
    were merged before it (or in which order, or in which process).

    Example:
        >>> a = torch.rand(3, generator=generator(0, "w", 0))
        >>> bool((a == torch.rand(3, generator=generator(0, "w", 0))).all())
        True
    """
    digest = hashlib.sha256(f"{seed}/{index}/{name}".encode()).digest()
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF)
    return gen


def random_drop_(
    delta: torch.Tensor, density: float, gen: torch.Generator, *, rescale: bool = True
) -> torch.Tensor:
    """In place: DARE — keep each entry with probability ``density`` (drop with ``p = 1 - density``).

    Survivors are multiplied by ``1 / density = 1 / (1 - p)`` when ``rescale`` (the paper), which
    keeps the expectation of every entry equal to the original. The mask is drawn on the CPU from
    ``gen`` so it is the same on every device.

    Example:
        >>> out = random_drop_(torch.ones(4), 0.5, generator(0, "w", 0))
        >>> sorted(set(out.tolist())) <= [0.0, 2.0]
        True
    """
    if density >= 1.0:
        return delta
    draw = torch.rand(delta.shape, generator=gen, device="cpu")
    keep = _step_(draw.neg_().add_(density))  # 1.0 where the draw < density
    delta.mul_(keep.to(delta.device))
    return delta.div_(density) if rescale else delta


def elect_sign(deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """TIES sign election: the sign of the summed (already weighted, trimmed) task vectors.

    The sign with the larger total mass wins per entry; an exact tie elects 0 and that entry
    takes no update.

    Example:
        >>> elect_sign([torch.tensor([1.0, -1.0]), torch.tensor([-3.0, 0.5])])
        tensor([-1., -1.])
    """
    total = deltas[0].clone()
    for delta in deltas[1:]:
        total += delta
    return total.sign_()


def disjoint_merge_(
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    sign: torch.Tensor,
    *,
    normalize: bool = True,
) -> torch.Tensor:
    """TIES disjoint merge of weighted task vectors ``deltas[i] = weights[i] * tau_i``.

    Consumes ``deltas`` (each is overwritten). Weights must be positive. Only entries whose sign
    agrees with ``sign`` (and are non-zero) contribute. With ``normalize`` the sum is divided by
    the summed weights of the contributing models, per entry: with unit weights that is the
    number of agreeing non-zero entries, the paper's disjoint mean (``sum(tau_i) / |A|``); with
    other weights it is the weighted mean of the agreeing ``tau_i``. An entry no model agrees on
    gets 0. Without ``normalize`` it is the plain disjoint sum.

    Example:
        >>> d = [torch.tensor([2.0, 1.0]), torch.tensor([4.0, -3.0])]
        >>> disjoint_merge_(d, [1.0, 1.0], torch.tensor([1.0, -1.0]))
        tensor([ 3., -3.])
    """
    total = torch.zeros_like(deltas[0])
    divisor = torch.zeros_like(deltas[0]) if normalize else None
    for delta, weight in zip(deltas, weights):
        # delta * sign > 0 exactly where delta is non-zero and agrees with an elected sign;
        # clamped at 0 it is |delta| there and 0 elsewhere, so delta's agreeing part is that
        # times sign.
        agreeing = delta.mul_(sign).clamp_(min=0.0)
        total.addcmul_(agreeing, sign)
        if divisor is not None:
            divisor.add_(agreeing.sign_(), alpha=weight)
    if divisor is None:
        return total
    # Where no model agrees, total is 0 and so is divisor: raising the divisor to the smallest
    # weight there (any real divisor is a sum of weights, so at least that) keeps 0 / w = 0.
    return total.div_(divisor.clamp_(min=min(weights)))

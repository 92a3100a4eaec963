"""What a merge method is: an object that merges one tensor from several models.

Every method lives in its own module of this package and registers itself by name
(``registry.register``); recipes name it by string. A method merges one tensor at a time, so
it never sees a whole model. Two entry points: ``merge_tensor`` (a whole tensor; the in-place
evaluator calls it) and ``start`` (a ``PieceMerger`` fed runs of a tensor's elements; the
streaming merge uses it, so its memory stays at a piece per input whatever the tensor size).
The built-in methods subclass ``PieceWiseMethod``: they implement ``start``, and
``merge_tensor`` is the whole tensor as one piece through it, so both paths give the same bits. For ``merge_tensor``:

* inputs arrive as float32 tensors on one device, all of the same shape;
* ``base`` is the base model's tensor (None for methods with ``needs_base = False``);
* ``tensors[i]`` is model ``i``'s tensor, in recipe order; ``params`` holds one weight, density
  and gamma per model plus the method's global options, already resolved for this tensor's
  layer group;
* the result is float32 with the same shape; the caller casts it to the output dtype.

Methods must not modify their inputs in place, and must be pure functions of
``(name, base, tensors, params)`` so that a merge is reproducible and independent of tensor
order (randomised methods seed from ``params.seed`` and ``name``: see ``_sparsify.generator``).

Example:
    >>> import torch
    >>> from evolution.merge_methods import MergeParams, get_method
    >>> p = MergeParams.uniform(2, options={"normalize": True})
    >>> get_method("linear").merge_tensor("w", None, [torch.zeros(2), torch.ones(2)], p)
    tensor([0.5000, 0.5000])
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch

__all__ = ["TILE", "WIDE_TILE", "MergeMethod", "MergeParams", "OptionValue", "PieceMerger", "piece_length",
           "tiles"]

OptionValue = float | bool  # a global method option: a number (lambda, t) or a switch (normalize)
TILE = 1 << 16  # elements per CPU tile (256 KiB of float32 per operand)
# chains that only accumulate into the output (linear, task_arithmetic) keep no temporaries:
# 4x wider tiles, a quarter of the Python steps (~8% of a merge's time), same bits
WIDE_TILE = 1 << 18


@dataclass(frozen=True)
class MergeParams:
    """Everything a method needs for one tensor besides the tensors themselves."""

    weights: tuple[float, ...]  # one per model, recipe order: the model's weight (or task scale)
    densities: tuple[float, ...]  # one per model: fraction of task-vector entries kept, in (0, 1]
    gammas: tuple[float, ...]  # one per model: breadcrumbs' fraction of largest entries dropped
    options: Mapping[str, OptionValue] = field(default_factory=dict)  # global: lambda, t, ...
    seed: int = 0  # recipe seed; randomised methods mix it with the tensor name

    @classmethod
    def uniform(
        cls,
        n_models: int,
        *,
        weight: float = 1.0,
        density: float = 1.0,
        gamma: float = 0.0,
        options: Mapping[str, OptionValue] | None = None,
        seed: int = 0,
    ) -> MergeParams:
        """The same weight/density/gamma for each of ``n_models`` models.

        Example:
            >>> MergeParams.uniform(2, density=0.5).densities
            (0.5, 0.5)
        """
        return cls(
            weights=(weight,) * n_models,
            densities=(density,) * n_models,
            gammas=(gamma,) * n_models,
            options=dict(options or {}),
            seed=seed,
        )

    def option(self, name: str, default: OptionValue) -> OptionValue:
        """Global option ``name``, or ``default`` when the recipe does not set it."""
        return self.options.get(name, default)

    def number(self, name: str, default: float) -> float:
        """Global numeric option ``name`` as a float."""
        return float(self.options.get(name, default))

    def flag(self, name: str, default: bool) -> bool:
        """Global switch ``name`` as a bool."""
        return bool(self.options.get(name, default))


def tiles(count: int, device: torch.device, size: int = TILE) -> list[tuple[int, int]]:
    """``(start, stop)`` runs of at most ``size`` elements covering ``0 .. count`` on the CPU.

    Elementwise chains (``out = a * w; out += b * v; ...``) run tile by tile so each tile's
    temporaries stay in the core's L2 cache instead of streaming every intermediate through
    main memory: about 2x faster on the CPU. Other devices get one run (kernel launches cost
    more than the memory traffic saved). Tiles start at multiples of ``size`` (pieces start at
    multiples of 1 Mi elements), so results never
    depend on how a tensor was split into pieces.
    """
    step = size if device.type == "cpu" else max(count, 1)
    return [(start, min(start + step, count)) for start in range(0, count, step)]


class PieceMerger(ABC):
    """Merges one tensor from runs of consecutive elements ("pieces") of its flattened inputs.

    The streaming merge builds one per tensor (``MergeMethod.start``), feeds it the tensor's
    pieces in order for ``passes`` statistics passes (``observe``, then ``end_pass``) and
    then once more for the merge pass (``merge``). Pieces start at multiples of the piece size
    given to ``start`` rounded down to a multiple of ``granule``; every input is a flat float32
    tensor on one device. A merger that
    needs the whole tensor at once sets ``whole = True`` and gets it as a single piece.
    """

    passes: int = 0  # statistics passes over the pieces before the merge pass
    granule: int = 1  # pieces start at multiples of this many elements (the merge rounds down)
    whole: bool = False  # True: needs the tensor in one piece (custom whole-tensor methods)

    def observe(
        self,
        pass_index: int,
        first: int,
        base: torch.Tensor | None,
        tensors: Sequence[torch.Tensor],
    ) -> None:
        """Statistics pass ``pass_index`` sees elements ``first .. first + len`` of each input."""
        raise NotImplementedError(f"{type(self).__name__} has no statistics passes")

    def end_pass(self, pass_index: int) -> None:
        """Called after the last piece of statistics pass ``pass_index``."""

    @abstractmethod
    def merge(
        self,
        first: int,
        base: torch.Tensor | None,
        tensors: Sequence[torch.Tensor],
        out: torch.Tensor,
    ) -> None:
        """Write the merged elements ``first .. first + out.numel()`` into ``out`` (float32)."""


def piece_length(merger: PieceMerger, numel: int, wanted: int) -> int:
    """Elements per piece for a tensor of ``numel`` elements fed to ``merger``: ``wanted``
    rounded down to the merger's granule, or the whole tensor (at least 1) when the merger
    needs it whole or it is no larger than ``wanted``."""
    if merger.whole or wanted >= numel:
        return max(numel, 1)
    return max(merger.granule, wanted // merger.granule * merger.granule)


class _WholeTensor(PieceMerger):
    """Adapter for methods that only implement ``merge_tensor``: one piece, the whole tensor."""

    whole = True

    def __init__(
        self, method: MergeMethod, name: str, shape: tuple[int, ...], params: MergeParams
    ) -> None:
        self.method, self.name, self.shape, self.params = method, name, shape, params

    def merge(
        self,
        first: int,
        base: torch.Tensor | None,
        tensors: Sequence[torch.Tensor],
        out: torch.Tensor,
    ) -> None:
        shaped = [t.view(self.shape) for t in tensors]
        base_t = None if base is None else base.view(self.shape)
        out.copy_(self.method.merge_tensor(self.name, base_t, shaped, self.params).reshape(-1))


class _Elementwise(PieceMerger):
    """Adapter for ``elementwise`` methods that only implement ``merge_tensor``: any piece."""

    def __init__(self, method: MergeMethod, name: str, params: MergeParams) -> None:
        self.method, self.name, self.params = method, name, params

    def merge(
        self,
        first: int,
        base: torch.Tensor | None,
        tensors: Sequence[torch.Tensor],
        out: torch.Tensor,
    ) -> None:
        out.copy_(self.method.merge_tensor(self.name, base, tensors, self.params))


class MergeMethod(ABC):
    """One merge method. Subclasses set the class attributes and implement ``merge_tensor``.

    Class attributes:
        name: registry name used in recipes ("ties").
        needs_base: whether ``merge_tensor`` needs the base model's tensor.
        min_models / max_models: how many models (besides the base) the method takes.
        model_defaults: per-model fields the method reads ("weight", "density", "gamma") and their
            defaults; None means the recipe must set it for every model.
        options: global options the method accepts and their defaults; any other name in a
            recipe's ``parameters`` is refused with this list.
        elementwise: each output entry depends only on the same entry of the inputs, so the
            merge may pass consecutive runs of a large tensor's elements (flattened, 1-D)
            instead of the whole tensor, bounding memory. False for anything that looks at a
            whole tensor (top-k thresholds, norms) or draws a per-tensor random stream.

    Streaming: the merge calls ``start`` once per tensor and feeds the returned ``PieceMerger``
    pieces of the tensor. The default wraps ``merge_tensor`` (pieces for ``elementwise``
    methods, else the whole tensor at once); the built-in methods override ``start`` with
    piece-wise mergers (statistics passes first where they need a threshold or a norm) and
    define ``merge_tensor`` as one piece through them (``merge_whole``), so the in-place
    evaluator and the streaming merge run the same arithmetic.
    """

    name: ClassVar[str]
    needs_base: ClassVar[bool] = False
    min_models: ClassVar[int] = 1
    max_models: ClassVar[int | None] = None
    model_defaults: ClassVar[Mapping[str, float | None]] = {"weight": 1.0}
    options: ClassVar[Mapping[str, OptionValue]] = {}
    elementwise: ClassVar[bool] = False

    @abstractmethod
    def merge_tensor(
        self,
        name: str,
        base: torch.Tensor | None,
        tensors: Sequence[torch.Tensor],
        params: MergeParams,
    ) -> torch.Tensor:
        """Merge one tensor.

        Args:
            name: checkpoint key of the tensor ("model.layers.0.mlp.up_proj.weight").
            base: the base model's tensor (float32), or None when ``needs_base`` is False.
            tensors: each model's tensor (float32, same shape as ``base``), recipe order.
            params: per-model weights/densities/gammas and global options for this tensor.

        Returns:
            The merged float32 tensor, same shape.
        """

    def start(
        self, name: str, shape: tuple[int, ...], piece: int, params: MergeParams
    ) -> PieceMerger:
        """A merger for tensor ``name`` of ``shape``, to be fed pieces of ``piece`` elements.

        Args:
            name: checkpoint key of the tensor.
            shape: its shape (inputs arrive flattened).
            piece: elements per piece (the last one may be shorter); ``>= numel`` means the
                tensor comes in one piece.
            params: per-model weights/densities/gammas and options for this tensor.

        Returns:
            A ``PieceMerger``; the default adapts ``merge_tensor``.
        """
        if self.elementwise:
            return _Elementwise(self, name, params)
        return _WholeTensor(self, name, shape, params)

    def merge_whole(
        self,
        name: str,
        base: torch.Tensor | None,
        tensors: Sequence[torch.Tensor],
        params: MergeParams,
    ) -> torch.Tensor:
        """``merge_tensor`` through ``start``: the whole tensor as one piece (float32 result)."""
        out = torch.empty(tensors[0].shape, dtype=torch.float32, device=tensors[0].device)
        self.merge_into(name, base, tensors, params, out)
        return out

    def merge_into(
        self,
        name: str,
        base: torch.Tensor | None,
        tensors: Sequence[torch.Tensor],
        params: MergeParams,
        out: torch.Tensor,
        piece: int | None = None,
        after: Callable[[int, torch.Tensor], None] | None = None,
    ) -> None:
        """Merge whole tensors into ``out`` (contiguous float32, same number of elements).

        The tensors go through ``start``'s ``PieceMerger`` ``piece`` elements at a time
        (statistics passes first), as the streaming merge feeds it, so the result has the same
        bits whatever ``piece`` is. ``out`` must not share memory with an input.

        Args:
            name: checkpoint key of the tensor.
            base: the base model's tensor, or None.
            tensors: each model's tensor (float32, same shape).
            params: per-model weights/densities/gammas and options for this tensor.
            out: where the merged elements go (overwritten, any shape of the same numel).
            piece: elements per piece; None means the whole tensor at once.
            after: called with ``(first, merged piece)`` after each piece is written, e.g. to
                check it or round it to another dtype in place; an exception stops the merge.
        """
        numel = tensors[0].numel()
        wanted = numel if piece is None else min(piece, numel)
        merger = self.start(name, tuple(tensors[0].shape), max(wanted, 1), params)
        piece = piece_length(merger, numel, wanted)
        flat_base = None if base is None else base.reshape(-1)
        flats = [t.reshape(-1) for t in tensors]
        flat_out = out.view(-1)
        starts = range(0, numel, piece) if numel else range(1)

        def cut(first: int) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
            stop = first + piece
            return (None if flat_base is None else flat_base[first:stop],
                    [t[first:stop] for t in flats])  # fmt: skip

        for pass_index in range(merger.passes):
            for first in starts:
                merger.observe(pass_index, first, *cut(first))
            merger.end_pass(pass_index)
        for first in starts:
            target = flat_out[first : first + piece]
            merger.merge(first, *cut(first), target)
            if after is not None:
                after(first, target)

    def check(self, params: MergeParams) -> None:
        """Reject parameter combinations the method cannot use (called at recipe validation).

        Args:
            params: resolved parameters of one layer group (or the defaults).

        Raises:
            ValueError: the message names the parameter and the allowed range.
        """

    def __repr__(self) -> str:
        return f"<merge method {self.name!r}>"


class PieceWiseMethod(MergeMethod):
    """A method written as a ``PieceMerger`` (``start``); ``merge_tensor`` is the whole tensor
    as one piece through it, so the in-place and streamed merges give the same bits."""

    def merge_tensor(
        self,
        name: str,
        base: torch.Tensor | None,
        tensors: Sequence[torch.Tensor],
        params: MergeParams,
    ) -> torch.Tensor:
        return self.merge_whole(name, base, tensors, params)

    @abstractmethod
    def start(
        self, name: str, shape: tuple[int, ...], piece: int, params: MergeParams
    ) -> PieceMerger:
        """See ``MergeMethod.start``."""

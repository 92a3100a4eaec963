"""What a merge method is: an object that merges one tensor from several models.

Every method lives in its own module of this package and registers itself by name
(``registry.register``); recipes name it by string. The streaming merge (``evolution._merge``)
calls ``merge_tensor`` once per checkpoint tensor, so a method never sees a whole model:

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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch

__all__ = ["MergeMethod", "MergeParams", "OptionValue"]

OptionValue = float | bool  # a global method option: a number (lambda, t) or a switch (normalize)


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

    def check(self, params: MergeParams) -> None:
        """Reject parameter combinations the method cannot use (called at recipe validation).

        Args:
            params: resolved parameters of one layer group (or the defaults).

        Raises:
            ValueError: the message names the parameter and the allowed range.
        """

    def __repr__(self) -> str:
        return f"<merge method {self.name!r}>"

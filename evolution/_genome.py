"""Genome <-> merge recipe: which number of a genome vector sets which recipe field.

A :class:`GenomeLayout` fixes the merge (method, base model, models, fixed method options) and
says which per-model fields are searched (``params``, e.g. ``("weight", "density")``) and in how
many layer groups. Genes are laid out group by group, then model by model, then param by param::

    group "all"        -> top-level ``models[i].<param>``: every tensor outside a layer group
                          (all tensors when per_layer_groups=0; embeddings, final norm and head
                          otherwise)
    group "layers_a_b" -> ``layer_groups[g].models[i].<param>`` for decoder layers [a, b)

so ``dims = (1 + per_layer_groups) * len(models) * len(params)``; gene names read
``"<group>.m<i>.<param>"`` ("all.m0.weight", "layers_0_2.m1.density"). The decoder layers are
split into ``per_layer_groups`` contiguous, near-equal ranges.

``to_recipe(genome)`` builds the :class:`MergeRecipe`; ``from_recipe(recipe)`` reads a genome
back (the starting point of a search): a field the recipe leaves unset takes the method's
default, else the middle of its bounds, and every value is clipped into the bounds.

Example:
    >>> layout = GenomeLayout(method="linear", models=["/m/a", "/m/b"], params=("weight",))
    >>> layout.names
    ('all.m0.weight', 'all.m1.weight')
    >>> layout.to_recipe((0.25, 0.75)).models[1].weight
    0.75
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from evolution._recipe import LayerGroup, MergeRecipe, ModelOverride, ModelSpec
from evolution.merge_methods import get_method
from evolution.strategies import GenomeSpace

__all__ = ["DEFAULT_BOUNDS", "GenomeLayout"]

DEFAULT_BOUNDS: dict[str, tuple[float, float]] = {
    "weight": (0.0, 1.0),  # linear weight / task-vector scale
    "density": (0.1, 1.0),  # fraction kept; must stay > 0
    "gamma": (0.0, 0.2),  # breadcrumbs: fraction of the largest entries dropped; must stay < 1
}
_PARAMS = tuple(DEFAULT_BOUNDS)


class GenomeLayout(BaseModel):
    """How a genome vector maps onto a :class:`MergeRecipe` (frozen: persisted with a run).

    Raises (on construction):
        UnknownNameError: unknown ``method`` (the known ones listed).
        pydantic.ValidationError: a param the method does not read, bounds outside what the
            recipe accepts, ``per_layer_groups`` > 0 without ``n_layers`` (or more groups than
            layers).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: str  # registered merge method
    models: tuple[str, ...] = Field(min_length=1)  # model checkpoint paths, recipe order
    base_model: str | None = None  # base checkpoint (task-vector methods need one)
    params: tuple[str, ...] = ("weight",)  # searched per-model fields: weight / density / gamma
    per_layer_groups: int = Field(default=0, ge=0)  # 0: one gene set; k: k layer groups + "all"
    n_layers: int | None = Field(default=None, ge=1)  # decoder layers (needed when k > 0)
    bounds: dict[str, tuple[float, float]] = Field(default_factory=dict)  # per param; default DEFAULT_BOUNDS
    parameters: dict[str, float | bool] = Field(default_factory=dict)  # fixed method options
    dtype: str | None = None  # recipe output dtype (None keeps the base's)
    seed: int = 0  # recipe seed (DARE masks)

    def __init__(self, **data: Any) -> None:
        if isinstance(data.get("models"), Sequence):
            data["models"] = tuple(str(m) for m in data["models"])
        super().__init__(**data)

    @model_validator(mode="after")
    def _check(self) -> GenomeLayout:
        method = get_method(self.method)  # UnknownNameError lists the known methods
        if not self.params or len(set(self.params)) != len(self.params):
            raise ValueError(f"params must be distinct names, got {list(self.params)}")
        readable = [p for p in _PARAMS if p in method.model_defaults]
        for param in self.params:
            if param not in readable:
                raise ValueError(
                    f"method {self.method!r} does not read per-model {param!r}; searchable "
                    f"params for it: {', '.join(readable)} (set `genes:`/`params` accordingly)"
                )
        for param, (low, high) in self.bounds.items():
            if param not in _PARAMS:
                raise ValueError(f"bounds for unknown param {param!r}; known: {', '.join(_PARAMS)}")
            if not low < high:
                raise ValueError(f"bounds of {param!r}: low {low} must be < high {high}")
        low_d, _ = self.bound("density")
        _, high_g = self.bound("gamma")
        if low_d <= 0.0 or self.bound("density")[1] > 1.0:
            raise ValueError("density bounds must lie in (0, 1]: a density of 0 keeps nothing")
        if self.bound("gamma")[0] < 0.0 or high_g >= 1.0:
            raise ValueError("gamma bounds must lie in [0, 1)")
        if self.per_layer_groups:
            if self.n_layers is None:
                raise ValueError("per_layer_groups > 0 needs n_layers (decoder layer count)")
            if self.per_layer_groups > self.n_layers:
                raise ValueError(
                    f"per_layer_groups ({self.per_layer_groups}) exceeds the model's "
                    f"{self.n_layers} layers"
                )
        return self

    # ------------------------------------------------------------------ shape of the genome

    def bound(self, param: str) -> tuple[float, float]:
        """(low, high) of ``param``: the configured bounds, else ``DEFAULT_BOUNDS``."""
        return tuple(self.bounds.get(param, DEFAULT_BOUNDS[param]))  # type: ignore[return-value]

    @property
    def groups(self) -> tuple[tuple[str, tuple[int, int] | None], ...]:
        """``(name, layer range or None)`` per gene group, "all" first."""
        out: list[tuple[str, tuple[int, int] | None]] = [("all", None)]
        k, n = self.per_layer_groups, self.n_layers or 0
        cuts = [round(i * n / k) for i in range(k + 1)] if k else []
        for a, b in itertools.pairwise(cuts):
            out.append((f"layers_{a}_{b}", (a, b)))
        return tuple(out)

    @property
    def names(self) -> tuple[str, ...]:
        """Gene names, genome order: ``"<group>.m<i>.<param>"``."""
        return tuple(
            f"{g}.m{i}.{p}" for g, _ in self.groups for i in range(len(self.models)) for p in self.params
        )

    @property
    def dims(self) -> int:
        """Number of genes."""
        return len(self.groups) * len(self.models) * len(self.params)

    def space(self, initial: Sequence[float] | None = None) -> GenomeSpace:
        """The :class:`GenomeSpace` a strategy searches (bounds per gene, names, start point).

        Args:
            initial: the starting genome; default: :meth:`from_recipe` of nothing (method
                defaults clipped into the bounds, else the bounds' middle).
        """
        lows, highs = zip(*(self.bound(name.rsplit(".", 1)[1]) for name in self.names))
        start = tuple(initial) if initial is not None else self.from_recipe(None)
        return GenomeSpace(dims=self.dims, low=lows, high=highs, names=self.names, initial=start)

    # ------------------------------------------------------------------ conversions

    def _split(self, genome: Sequence[float]) -> list[list[dict[str, float]]]:
        """genome -> [group][model] -> {param: value}."""
        if len(genome) != self.dims:
            raise ValueError(f"genome has {len(genome)} genes, the layout {self.dims}")
        it = iter(float(v) for v in genome)
        return [[{p: next(it) for p in self.params} for _ in self.models] for _ in self.groups]

    def to_recipe(self, genome: Sequence[float]) -> MergeRecipe:
        """The merge recipe a genome stands for.

        Args:
            genome: ``dims`` floats in genome order (see ``names``).

        Returns:
            A validated :class:`MergeRecipe` (absolute paths as given).

        Raises:
            ValueError: wrong genome length.
            pydantic.ValidationError: a value the recipe refuses (e.g. density 0).

        Example:
            >>> GenomeLayout(method="linear", models=["a", "b"]).to_recipe([1.0, 0.5]).method
            'linear'
        """
        values = self._split(genome)
        models = tuple(ModelSpec(path=path, **values[0][i]) for i, path in enumerate(self.models))
        groups = tuple(
            LayerGroup(name=name, layers=layers, models=tuple(ModelOverride(**v) for v in values[g]))
            for g, (name, layers) in enumerate(self.groups)
            if layers is not None
        )
        return MergeRecipe(
            method=self.method,
            base_model=self.base_model,
            models=models,
            parameters=dict(self.parameters),
            layer_groups=groups,
            dtype=self.dtype,  # type: ignore[arg-type]
            seed=self.seed,
        )

    def from_recipe(self, recipe: MergeRecipe | None) -> tuple[float, ...]:
        """The genome closest to ``recipe`` (None: the layout's default starting point).

        Per gene: the recipe's value (a layer group of the same name, else the model's own
        field), else the method's default, else the middle of the bounds; clipped into bounds.

        Example:
            >>> lay = GenomeLayout(method="linear", models=["a", "b"])
            >>> lay.from_recipe(lay.to_recipe([0.2, 0.9]))
            (0.2, 0.9)
        """
        method = get_method(self.method)
        by_name = {g.name: g for g in recipe.layer_groups} if recipe is not None else {}
        genes: list[float] = []
        for name, _ in self.groups:
            for i in range(len(self.models)):
                for param in self.params:
                    low, high = self.bound(param)
                    value = None
                    if recipe is not None and i < len(recipe.models):
                        group = by_name.get(name)
                        if group is not None and group.models:
                            value = getattr(group.models[i], param)
                        if value is None:
                            value = getattr(recipe.models[i], param)
                    if value is None:
                        value = method.model_defaults.get(param)
                    if value is None:
                        value = (low + high) / 2.0
                    genes.append(min(max(float(value), low), high))
        return tuple(genes)

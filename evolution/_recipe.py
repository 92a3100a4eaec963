"""Merge recipes: which method, which models, with which weights, per layer group.

A recipe is a frozen pydantic model: it is validated when built (from Python, YAML or JSON),
saved beside every merged checkpoint, and later produced from genomes by the evolution search.

YAML form::

    method: ties                    # a registered merge method (evolution.merge_methods)
    base_model: ./base              # needed by task-vector methods; otherwise the template
    models:                         # one entry per model, in order
      - {path: ./math, weight: 1.0, density: 0.3}
      - {path: ./code, weight: 0.5, density: 0.3}
    parameters: {lambda: 1.0}       # the method's global options (unknown names are refused)
    layer_groups:                   # optional: other values for some tensors
      - name: early
        layers: [0, 8]              # decoder layers 0..7 ("model.layers.<i>." / "h.<i>.")
        parameters: {lambda: 0.7}
        models: [{density: 0.5}, {weight: 0.2}]   # one entry per model; null fields inherit
      - name: embeddings
        match: "embed_tokens|lm_head"             # regex searched in the tensor name
        models: [{weight: 1.0}, {weight: 0.0}]
    dtype: bfloat16                 # output dtype of floating tensors; null keeps the base's
    seed: 0                         # seeds DARE's masks

A tensor takes the first layer group that matches it, else the top-level values. Per model the
value is: the group's override, else the model's own field, else the method's default
(``MergeMethod.model_defaults``; a method with no default for a field, e.g. DARE's ``density``,
needs it on every model).

Genomes: the searchable numbers are exactly the per-model ``weight`` / ``density`` / ``gamma``
fields and the numeric ``parameters`` — at top level and in each layer group — so a genome vector
maps onto ``models[i].<field>`` (one gene per model) or ``layer_groups[g].models[i].<field>``
(one gene per model per layer group) without new fields.

Relative model paths in a recipe *file* are resolved against the file's directory when it is
loaded (``MergeRecipe.load``); the recipe saved beside a merge holds absolute paths.

Example:
    >>> r = MergeRecipe(method="linear", models=[{"path": "a", "weight": 2}, {"path": "b"}])
    >>> r.params_for("model.layers.0.mlp.up_proj.weight").weights
    (2.0, 1.0)
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from evolution.merge_methods import MergeMethod, MergeParams, OptionValue, get_method

__all__ = ["LayerGroup", "MergeRecipe", "ModelOverride", "ModelSpec", "layer_index"]

Weight = Annotated[float, Field(allow_inf_nan=False)]  # any finite number
Density = Annotated[float, Field(gt=0.0, le=1.0)]  # fraction of task-vector entries kept
Gamma = Annotated[float, Field(ge=0.0, lt=1.0)]  # breadcrumbs: fraction of largest dropped
Parameters = dict[str, bool | Annotated[float, Field(allow_inf_nan=False)]]
_MODEL_FIELDS = ("weight", "density", "gamma")
_LAYER_RE = re.compile(r"\.(\d+)\.")  # first ".<number>." in a tensor name is its layer index


def layer_index(tensor_name: str) -> int | None:
    """The decoder layer a tensor belongs to: the first ``.<n>.`` in its name, or None.

    Example:
        >>> layer_index("model.layers.12.mlp.up_proj.weight"), layer_index("lm_head.weight")
        (12, None)
    """
    found = _LAYER_RE.search(tensor_name)
    return int(found.group(1)) if found else None


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelSpec(_Frozen):
    """One model to merge and its per-model values (None: the method's default)."""

    path: str = Field(min_length=1)  # local checkpoint directory (config.json + safetensors)
    weight: Weight | None = None  # linear weight / task-vector scale (method default: 1.0)
    density: Density | None = None  # TIES/DARE/breadcrumbs: fraction of the task vector kept
    gamma: Gamma | None = None  # breadcrumbs: fraction of largest-magnitude entries dropped


class ModelOverride(_Frozen):
    """A layer group's values for one model; None inherits the model's own value."""

    weight: Weight | None = None  # see ModelSpec.weight
    density: Density | None = None  # see ModelSpec.density
    gamma: Gamma | None = None  # see ModelSpec.gamma


class LayerGroup(_Frozen):
    """Tensors that take their own parameters: by decoder layer range, name regex, or both."""

    name: str = Field(min_length=1)  # label ("early", "attn"); unique within a recipe
    layers: tuple[int, int] | None = None  # decoder layers [start, stop) by layer_index()
    match: str | None = None  # regex searched (re.search) in the tensor name
    parameters: Parameters = Field(default_factory=dict)  # global options for these tensors
    models: tuple[ModelOverride, ...] = ()  # empty, or one override per recipe model

    @model_validator(mode="after")
    def _check(self) -> LayerGroup:
        if self.layers is None and self.match is None:
            raise ValueError(f"layer group {self.name!r} needs `layers: [start, stop]` or `match`")
        if self.layers is not None and not 0 <= self.layers[0] < self.layers[1]:
            raise ValueError(
                f"layer group {self.name!r}: layers must be [start, stop) with "
                f"0 <= start < stop, got {list(self.layers)}"
            )
        if self.match is not None:
            try:
                re.compile(self.match)
            except re.error as exc:
                raise ValueError(f"layer group {self.name!r}: bad regex {self.match!r}: {exc}")
        return self

    def matches(self, tensor_name: str) -> bool:
        """Whether ``tensor_name`` belongs to this group (all given criteria hold)."""
        if self.layers is not None:
            index = layer_index(tensor_name)
            if index is None or not self.layers[0] <= index < self.layers[1]:
                return False
        return self.match is None or re.search(self.match, tensor_name) is not None


class MergeRecipe(_Frozen):
    """A validated, serialisable description of one merge.

    Raises (on construction):
        UnknownNameError: ``method`` is not registered (the message lists the known ones).
        pydantic.ValidationError: any other invalid field; the message names it — a missing
            ``base_model`` for a task-vector method, the wrong number of models, an unknown
            parameter (known ones listed), a non-finite weight, a density outside (0, 1], a
            per-model field the method needs but nobody set, a layer group with the wrong
            number of model overrides.

    Example:
        >>> MergeRecipe.from_yaml('''
        ... method: task_arithmetic
        ... base_model: /m/base
        ... models: [{path: /m/a}, {path: /m/b, weight: 0.5}]
        ... parameters: {lambda: 0.8}
        ... ''').params_for("lm_head.weight").options["lambda"]
        0.8
    """

    method: str  # registered merge method name
    base_model: str | None = None  # base checkpoint directory (template for config/tokenizer)
    models: tuple[ModelSpec, ...]  # models to merge, in order (count checked per method)
    parameters: Parameters = Field(default_factory=dict)  # the method's global options
    layer_groups: tuple[LayerGroup, ...] = ()  # per-group overrides, first match wins
    dtype: Literal["float32", "float16", "bfloat16"] | None = None  # None keeps the base's
    seed: int = 0  # seeds randomised methods (DARE) together with each tensor's name

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        get_method(value)  # raises UnknownNameError listing the known methods
        return value

    @model_validator(mode="after")
    def _check(self) -> MergeRecipe:
        method = get_method(self.method)
        n = len(self.models)
        if n < method.min_models or (method.max_models is not None and n > method.max_models):
            wanted = (
                str(method.min_models)
                if method.max_models == method.min_models
                else f"at least {method.min_models}"
                if method.max_models is None
                else f"{method.min_models}..{method.max_models}"
            )
            raise ValueError(f"method {self.method!r} takes {wanted} models, the recipe lists {n}")
        if method.needs_base and self.base_model is None:
            raise ValueError(
                f"method {self.method!r} merges task vectors and needs `base_model` (the model "
                "the others were fine-tuned from)"
            )
        _check_options(method, self.parameters, "parameters")
        names = [g.name for g in self.layer_groups]
        if len(set(names)) != len(names):
            raise ValueError(f"layer group names must be unique, got {names}")
        for group in self.layer_groups:
            _check_options(method, group.parameters, f"layer group {group.name!r} parameters")
            if group.models and len(group.models) != n:
                raise ValueError(
                    f"layer group {group.name!r} has {len(group.models)} model overrides but "
                    f"the recipe has {n} models; give one entry per model (or none)"
                )
        for i, spec in enumerate(self.models):
            for field, default in method.model_defaults.items():
                if default is None and getattr(spec, field) is None:
                    raise ValueError(
                        f"method {self.method!r} needs `{field}` for every model; models[{i}] "
                        f"({spec.path}) has none"
                    )
        scopes: list[LayerGroup | None] = [None, *self.layer_groups]
        for scope in scopes:
            try:
                method.check(self._params(scope))
            except ValueError as exc:
                where = "" if scope is None else f" (layer group {scope.name!r})"
                raise ValueError(f"{exc}{where}") from None
        return self

    # ------------------------------------------------------------------ parameters per tensor

    @property
    def merge_method(self) -> MergeMethod:
        """The registered method this recipe names."""
        return get_method(self.method)

    def group_for(self, tensor_name: str) -> LayerGroup | None:
        """The first layer group matching ``tensor_name``, or None for the top-level values."""
        return next((g for g in self.layer_groups if g.matches(tensor_name)), None)

    def params_for(self, tensor_name: str) -> MergeParams:
        """The resolved parameters the method gets for ``tensor_name``.

        Example:
            >>> r = MergeRecipe(method="linear", models=[{"path": "a"}, {"path": "b"}],
            ...                 layer_groups=[{"name": "g", "layers": [0, 2],
            ...                                "models": [{"weight": 3}, {}]}])
            >>> r.params_for("model.layers.1.x").weights, r.params_for("model.layers.2.x").weights
            ((3.0, 1.0), (1.0, 1.0))
        """
        return self._params(self.group_for(tensor_name))

    def _params(self, group: LayerGroup | None) -> MergeParams:
        method = get_method(self.method)
        values: dict[str, list[float]] = {field: [] for field in _MODEL_FIELDS}
        for i, spec in enumerate(self.models):
            override = group.models[i] if group is not None and group.models else None
            for field in _MODEL_FIELDS:
                value = getattr(override, field) if override is not None else None
                if value is None:
                    value = getattr(spec, field)
                if value is None:
                    value = method.model_defaults.get(field)
                values[field].append(_FALLBACK[field] if value is None else float(value))
        options: dict[str, OptionValue] = dict(method.options)
        options.update(self.parameters)
        if group is not None:
            options.update(group.parameters)
        return MergeParams(
            weights=tuple(values["weight"]),
            densities=tuple(values["density"]),
            gammas=tuple(values["gamma"]),
            options=options,
            seed=self.seed,
        )

    # ------------------------------------------------------------------ paths

    def resolve_paths(self, root: str | os.PathLike[str]) -> MergeRecipe:
        """A copy with relative model paths made absolute against ``root``.

        Example:
            >>> MergeRecipe(method="linear", models=[{"path": "a"}]).resolve_paths("/r").models[0].path
            '/r/a'
        """
        base = Path(root).expanduser().resolve()

        def absolute(path: str) -> str:
            p = Path(path).expanduser()
            return str(p if p.is_absolute() else (base / p).resolve())

        return self.model_copy(
            update={
                "base_model": None if self.base_model is None else absolute(self.base_model),
                "models": tuple(
                    m.model_copy(update={"path": absolute(m.path)}) for m in self.models
                ),
            }
        )

    # ------------------------------------------------------------------ serialisation

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON types), every field included."""
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        """The recipe as YAML text (``from_yaml`` reads it back).

        Example:
            >>> r = MergeRecipe(method="linear", models=[{"path": "a"}])
            >>> MergeRecipe.from_yaml(r.to_yaml()) == r
            True
        """
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> MergeRecipe:
        """Parse and validate a recipe from YAML (or JSON, which is YAML) text.

        Raises:
            UnknownNameError: unknown method (known ones listed).
            pydantic.ValidationError: invalid fields, or the text is not a mapping.
        """
        data = yaml.safe_load(text)
        return cls.model_validate(data if data is not None else {})

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the recipe to ``path``: JSON for ``.json``, YAML otherwise. Returns the path."""
        out = Path(path)
        text = json.dumps(self.to_dict(), indent=2) if out.suffix == ".json" else self.to_yaml()
        out.write_text(text)
        return out

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> MergeRecipe:
        """Read a YAML/JSON recipe file; relative model paths resolve against its directory.

        Raises:
            FileNotFoundError: no such file.
            UnknownNameError: unknown method (known ones listed).
            pydantic.ValidationError: invalid fields (the message names them).
        """
        file = Path(path).expanduser()
        return cls.from_yaml(file.read_text()).resolve_paths(file.parent)


_FALLBACK = {"weight": 1.0, "density": 1.0, "gamma": 0.0}  # fields a method does not read


def _check_options(method: MergeMethod, options: Mapping[str, OptionValue], where: str) -> None:
    for name, value in options.items():
        if name not in method.options:
            known = ", ".join(sorted(method.options)) or "none"
            raise ValueError(
                f"{where}: unknown parameter {name!r} for method {method.name!r}; known: {known}"
            )
        expected_bool = isinstance(method.options[name], bool)
        if isinstance(value, bool) != expected_bool:
            kind = "true/false" if expected_bool else "a number"
            raise ValueError(f"{where}: parameter {name!r} of {method.name!r} must be {kind}")
        if not expected_bool and not math.isfinite(float(value)):
            raise ValueError(f"{where}: parameter {name!r} must be finite, got {value}")

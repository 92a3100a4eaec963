"""``EvolutionConfig``: everything that defines one evolution run (frozen; stored with the run).

YAML form (``hive evolve start run.yaml --name demo``; relative paths resolve against the file)::

    base_model: ./base
    models: [./math, ./code]
    method: ties                   # a registered merge method
    parameters: {lambda: 1.0}      # fixed method options
    genes: [weight, density]       # searched per-model fields
    layer_groups: 2                # 0: one gene set; k: k decoder-layer groups + "all"
    strategy: cma-es               # a registered strategy; population -> its population setting
    strategy_settings: {sigma0: 0.3}
    population: 8
    generations: 4
    tasks:
      - {task: perplexity, domain: wiki, texts: ["..."]}
      - {task: exact_match, domain: math, data: [["2+2=", "4"]], max_new_tokens: 4}
    tolerances: {wiki: 0.05}       # domain -> allowed drop below the baseline (default 0)
    seed: 0
    evaluators: 2                  # default: one per GPU, else 2 on CPU

Unknown method, strategy or task names fail here, with the known names listed.

Example:
    >>> cfg = EvolutionConfig(base_model="/m/base", models=["/m/a", "/m/b"], method="linear",
    ...                       tasks=[{"task": "perplexity", "domain": "wiki", "texts": ["hi"]}])
    >>> cfg.layout().dims, cfg.strategy_kwargs()["popsize"]
    (2, 8)
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, field_validator, model_validator

from evolution._gate import RegressionGate
from evolution._genome import GenomeLayout
from evolution._recipe import MergeRecipe
from evolution.merge_methods import get_method
from evolution.strategies import strategy_class
from evolution.tasks import FitnessTask, task_from_spec

__all__ = ["EvolutionConfig"]

# Name of each built-in strategy's population setting; other strategies: the first of these
# their settings dataclass has.
_POPULATION_FIELD = {"cma-es": "popsize", "ga": "population_size", "random": "batch_size"}


class EvolutionConfig(BaseModel):
    """One evolution run: what to merge, how to search, what to score, what to protect."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    base_model: str  # base checkpoint (template of every merge; task vectors are relative to it)
    models: tuple[str, ...] = Field(min_length=1)  # checkpoints to merge, in order
    method: str = "task_arithmetic"  # registered merge method
    parameters: dict[str, float | bool] = Field(default_factory=dict)  # fixed method options
    genes: tuple[str, ...] = ("weight",)  # per-model fields searched: weight/density/gamma
    bounds: dict[str, tuple[float, float]] = Field(default_factory=dict)  # per gene kind
    layer_groups: int = Field(default=0, ge=0)  # decoder-layer groups with their own genes
    dtype: Literal["float32", "float16", "bfloat16"] | None = None  # merged dtype; None: base's
    strategy: str = "cma-es"  # registered search strategy
    strategy_settings: dict[str, Any] = Field(default_factory=dict)  # more strategy settings
    population: int = Field(default=8, ge=1)  # candidates per generation
    generations: int = Field(default=4, ge=1)  # generations in the run
    tasks: tuple[SerializeAsAny[FitnessTask], ...] = Field(min_length=1)  # one per domain
    tolerances: dict[str, float] = Field(default_factory=dict)  # domain -> allowed drop (>= 0)
    domain_weights: dict[str, float] = Field(default_factory=dict)  # domain -> weight (default 1)
    noise_k: float = Field(default=2.0, ge=0.0)  # noise std devs added to each tolerance
    baseline_repeats: int = Field(default=3, ge=1)  # evaluations of the baseline (noise estimate)
    baseline: MergeRecipe | None = None  # protected recipe; None: the search's starting point
    gate_penalty: float = Field(default=1.0, ge=0.0)  # fitness -= penalty * weighted shortfall
    seed: int = Field(default=0, ge=0)  # strategy seed (and recipe seed for DARE masks)
    evaluators: int | None = Field(default=None, ge=1)  # None: one per GPU, else 2 on CPU
    evaluator_resources: dict[str, float] | None = None  # None: {"GPU": 1} with GPUs, else CPU 1
    max_in_flight: int | None = Field(default=None, ge=1)  # max untold candidates; None: evaluators
    tell_order: Literal["ask", "arrival"] = "ask"  # "ask": reproducible; "arrival": no head wait
    max_attempts: int = Field(default=3, ge=1)  # hive attempts per evaluation (evaluator deaths)

    @field_validator("tasks", mode="before")
    @classmethod
    def _tasks(cls, value: Any) -> Any:
        return tuple(task_from_spec(t) for t in value) if isinstance(value, (list, tuple)) else value

    @field_validator("method")
    @classmethod
    def _method(cls, value: str) -> str:
        get_method(value)  # UnknownNameError lists the known methods
        return value

    @field_validator("strategy")
    @classmethod
    def _strategy(cls, value: str) -> str:
        strategy_class(value)  # UnknownNameError lists the known strategies
        return value

    @model_validator(mode="after")
    def _check(self) -> EvolutionConfig:
        domains = [t.domain for t in self.tasks]
        if len(set(domains)) != len(domains):
            raise ValueError(f"task domains must be unique, got {domains}")
        for what, mapping in (("tolerances", self.tolerances), ("domain_weights", self.domain_weights)):
            unknown = sorted(set(mapping) - set(domains))
            if unknown:
                raise ValueError(f"{what} name unknown domain(s) {unknown}; domains: {domains}")
        if any(v < 0 for v in self.tolerances.values()):
            raise ValueError("tolerances must be >= 0 (an allowed drop)")
        self.layout()  # genes/bounds/method checks
        self.strategy_kwargs()  # unknown setting names fail at launch, not mid-run
        return self

    # ------------------------------------------------------------------ derived objects

    def n_layers(self) -> int | None:
        """Decoder layers of the base model (read only when ``layer_groups`` > 0)."""
        if not self.layer_groups:
            return None
        from inference import Checkpoint

        return int(Checkpoint.open(self.base_model).num_layers)

    def layout(self) -> GenomeLayout:
        """The genome layout of this run."""
        return GenomeLayout(
            method=self.method, models=self.models, base_model=self.base_model,
            params=self.genes, per_layer_groups=self.layer_groups, n_layers=self.n_layers(),
            bounds=self.bounds, parameters=self.parameters, dtype=self.dtype, seed=self.seed,
        )  # fmt: skip

    def gate(self) -> RegressionGate:
        """The regression gate of this run."""
        return RegressionGate(dict(self.tolerances), self.noise_k, dict(self.domain_weights))

    def strategy_kwargs(self) -> dict[str, Any]:
        """Settings for ``get_strategy``: population, generations, seed, then ``strategy_settings``.

        Raises:
            UnknownNameError: a ``strategy_settings`` key the strategy does not have.
        """
        cls = strategy_class(self.strategy)
        fields = {f.name for f in dataclasses.fields(cls.settings_type)}
        population = _POPULATION_FIELD.get(self.strategy) or next(
            (f for f in _POPULATION_FIELD.values() if f in fields), None
        )
        kwargs: dict[str, Any] = {"max_generations": self.generations, "seed": self.seed}
        if population is not None:
            kwargs[population] = self.population
        kwargs.update(self.strategy_settings)
        from evolution.strategies import GenomeSpace, get_strategy

        get_strategy(self.strategy, GenomeSpace(dims=1), **kwargs)  # validates names and values
        return kwargs

    # ------------------------------------------------------------------ files

    def to_json(self) -> str:
        """Canonical JSON (callable tasks as base64 cloudpickle)."""
        return json.dumps(self.model_dump(mode="json"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> EvolutionConfig:
        """Inverse of :meth:`to_json`."""
        return cls.model_validate(json.loads(text))

    @classmethod
    def load(cls, path: str | Path) -> EvolutionConfig:
        """Read a YAML/JSON config file; relative model paths resolve against its directory.

        Raises:
            FileNotFoundError: no such file.
            UnknownNameError: unknown method, strategy or task name (known ones listed).
            pydantic.ValidationError: any other invalid field (named in the message).
        """
        file = Path(path).expanduser()
        data = yaml.safe_load(file.read_text()) or {}
        root = file.resolve().parent

        def absolute(p: str) -> str:
            q = Path(p).expanduser()
            return str(q if q.is_absolute() else (root / q).resolve())

        if isinstance(data.get("base_model"), str):
            data["base_model"] = absolute(data["base_model"])
        if isinstance(data.get("models"), list):
            data["models"] = [absolute(str(m)) for m in data["models"]]
        if isinstance(data.get("baseline"), dict):
            data["baseline"] = MergeRecipe.model_validate(data["baseline"]).resolve_paths(root)
        return cls.model_validate(data)

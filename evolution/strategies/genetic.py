"""A genetic algorithm (``"ga"``): tournament selection, blend/uniform crossover, gaussian mutation.

Generational mode (default)
    Generation 0 is ``population_size`` candidates: ``space.initial`` (when ``include_initial``)
    and uniform samples in the box. Each later generation breeds ``population_size - elitism``
    children from the previous population; once all are told, the new population is the
    ``elitism`` best of the old one (kept with their fitness, not re-evaluated) plus the
    children. The order of tells within a generation does not matter.

Steady-state mode (``steady_state=True``)
    No generation barrier: ``ask()`` breeds a child from the current population whenever it is
    called (before the population is full it hands out the initial individuals, then random
    ones while fewer than two results are in). Each result joins the population while it is
    smaller than ``population_size``; after that it replaces the population's worst member if
    it is strictly better (failures never get in), so the best individual is never lost.
    ``generation`` is ``evaluations // population_size`` and the run is done after
    ``max_generations * population_size`` results; no more candidates than that are handed out.

Breeding a child
    Two tournaments (``tournament_size`` individuals drawn with replacement, the fittest wins;
    failures rank last) pick the parents. With probability ``crossover_rate`` they are crossed
    ("blend": BLX-alpha, each gene uniform in the parents' span widened by ``blend_alpha`` on
    both sides; "uniform": each gene from either parent), otherwise the child copies the first
    parent. Each gene then mutates with probability ``mutation_rate`` by adding
    ``N(0, (mutation_sigma * range)^2)``, and out-of-bounds genes are reflected back inside.
    ``Candidate.parents`` records the parent ids.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from evolution._exceptions import UnknownNameError
from evolution.strategies._base import (
    Strategy,
    StrategySettings,
    _check_float,
    _check_int,
    rank_key,
)
from evolution.strategies._candidate import Candidate
from evolution.strategies._rng import make_rng, rng_from_state, rng_state
from evolution.strategies._space import GenomeSpace
from evolution.strategies.registry import register_strategy
from hive import ConfigError

__all__ = ["GASettings", "GeneticAlgorithm"]

CROSSOVERS = ("blend", "uniform")  # known crossover operators

_Plan = tuple[
    tuple[float, ...], tuple[str, ...]
]  # (genome, parent ids) of a candidate not yet handed out
_Member = tuple[Candidate, float | None]  # an evaluated individual and its fitness (None: failed)


@dataclasses.dataclass
class GASettings(StrategySettings):
    """Settings of :class:`GeneticAlgorithm` (``max_generations`` and ``seed`` from StrategySettings).

    Example:
        >>> GASettings(population_size=8, crossover="uniform").elitism
        1
    """

    population_size: int = 16  # individuals in the population; also the size of generation 0
    tournament_size: int = 3  # drawn with replacement per tournament; the fittest is a parent
    crossover: str = "blend"  # "blend" (BLX-alpha) or "uniform"
    crossover_rate: float = 0.9  # probability a child crosses two parents (else copies one)
    blend_alpha: float = 0.5  # BLX-alpha: widen the parents' span by this fraction per side
    mutation_rate: float | None = None  # per-gene probability of mutation; None = 1 / dims
    mutation_sigma: float = 0.1  # std of the gaussian mutation, a fraction of each gene's range
    elitism: int = 1  # generational: best individuals carried over, not re-evaluated
    include_initial: bool = True  # generation 0 holds space.initial; the rest is uniform
    steady_state: bool = False  # True: no generation barrier; a result replaces the worst if better

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_int(self, "population_size", 2)
        _check_int(self, "tournament_size", 1)
        _check_int(self, "elitism", 0)
        if self.elitism >= self.population_size:
            raise ConfigError(
                f"elitism ({self.elitism}) must be < population_size ({self.population_size})",
                setting="elitism",
            )
        if self.crossover not in CROSSOVERS:
            raise UnknownNameError(
                f"unknown crossover {self.crossover!r}; known: {', '.join(CROSSOVERS)}",
                name=self.crossover,
                setting="crossover",
            )
        _check_float(self, "crossover_rate", 0.0, 1.0)
        _check_float(self, "blend_alpha", 0.0, 10.0)
        if self.mutation_rate is not None:
            _check_float(self, "mutation_rate", 0.0, 1.0)
        _check_float(self, "mutation_sigma", 0.0, 10.0)


@register_strategy
class GeneticAlgorithm(Strategy[GASettings]):
    """Real-coded genetic algorithm with elitism, generational or steady-state.

    Args:
        space: the genome space.
        settings: :class:`GASettings`; None for the defaults.

    Raises:
        ConfigError: a bad setting (the message names it).
        UnknownNameError: an unknown ``crossover``.

    Example:
        >>> from evolution.strategies import GenomeSpace
        >>> ga = GeneticAlgorithm(GenomeSpace(dims=2), GASettings(population_size=6, max_generations=3))
        >>> first = ga.ask()
        >>> first.genome, first.parents   # generation 0 starts at space.initial
        ((0.5, 0.5), ())
    """

    name = "ga"
    settings_type = GASettings

    def __init__(self, space: GenomeSpace, settings: GASettings | None = None) -> None:
        super().__init__(space, settings)
        s = self.settings
        self._rng = make_rng(s.seed)
        self._mutation_rate = s.mutation_rate if s.mutation_rate is not None else 1.0 / space.dims
        self._population: list[_Member] = []  # evaluated individuals breeding draws from
        self._queue: list[_Plan] = []  # candidates planned for this generation, not handed out yet
        self._batch: list[str] = []  # generational: ids asked this generation, in ask order
        self._children: dict[str, _Member] = {}  # generational: results of this generation

    @property
    def population(self) -> tuple[tuple[Candidate, float | None], ...]:
        """The current population with fitness (None: failed), in insertion order."""
        return tuple(self._population)

    @property
    def _budget(self) -> int:
        return self.settings.max_generations * self.settings.population_size

    # -- Strategy hooks ------------------------------------------------------------------------------

    def _can_ask(self) -> bool:
        if self.settings.steady_state:
            return self._serial < self._budget
        return bool(self._queue) or not self._batch

    def _ask(self) -> Candidate:
        if self.settings.steady_state:
            if self._serial == 0:
                self._queue = self._initial_plans()
            if self._queue:
                genome, parents = self._queue.pop(0)
            elif len(self._population) >= 2:
                genome, parents = self._breed()
            else:
                genome, parents = self.space.clip(self.space.sample(self._rng, 1)[0]), ()
            return self._new_candidate(genome, parents)
        if not self._queue and not self._batch:  # a new generation starts
            if self._population:
                count = self.settings.population_size - self.settings.elitism
                self._queue = [self._breed() for _ in range(count)]
            else:
                self._queue = self._initial_plans()
        genome, parents = self._queue.pop(0)
        candidate = self._new_candidate(genome, parents)
        self._batch.append(candidate.id)
        return candidate

    def _tell(self, candidate: Candidate, fitness: float | None) -> None:
        if self.settings.steady_state:
            self._tell_steady(candidate, fitness)
            return
        self._children[candidate.id] = (candidate, fitness)
        if self._queue or len(self._children) < len(self._batch):
            return
        children = [self._children[i] for i in self._batch]  # ask order: tell order does not matter
        ranked = sorted(
            self._population, key=lambda m: rank_key(m[1]), reverse=True
        )  # stable on ties
        elites = ranked[: self.settings.elitism] if self._population else []
        self._population = elites + children
        self._generation += 1
        self._batch, self._children = [], {}

    def _tell_steady(self, candidate: Candidate, fitness: float | None) -> None:
        if len(self._population) < self.settings.population_size:
            self._population.append((candidate, fitness))
        else:
            worst = min(
                range(len(self._population)), key=lambda i: rank_key(self._population[i][1])
            )
            if fitness is not None and fitness > rank_key(self._population[worst][1]):
                self._population[worst] = (candidate, fitness)
        self._generation = self._evaluations // self.settings.population_size

    # -- breeding ------------------------------------------------------------------------------------

    def _initial_plans(self) -> list[_Plan]:
        n = self.settings.population_size
        plans: list[_Plan] = [(self.space.initial, ())] if self.settings.include_initial else []
        for point in self.space.sample(self._rng, n - len(plans)):
            plans.append((self.space.clip(point), ()))
        return plans

    def _tournament(self) -> Candidate:
        drawn = self._rng.integers(0, len(self._population), size=self.settings.tournament_size)
        winner = self._population[int(drawn[0])]
        for i in drawn[1:]:
            member = self._population[int(i)]
            if rank_key(member[1]) > rank_key(winner[1]):
                winner = member
        return winner[0]

    def _breed(self) -> _Plan:
        s, rng = self.settings, self._rng
        a, b = self._tournament(), self._tournament()
        pa, pb = np.asarray(a.genome), np.asarray(b.genome)
        if rng.random() < s.crossover_rate:
            if s.crossover == "blend":
                lo, hi = np.minimum(pa, pb), np.maximum(pa, pb)
                spread = s.blend_alpha * (hi - lo)
                child = lo - spread + rng.random(self.space.dims) * (hi - lo + 2.0 * spread)
            else:
                child = np.where(rng.random(self.space.dims) < 0.5, pa, pb)
            parents = (a.id,) if a.id == b.id else (a.id, b.id)
        else:
            child, parents = pa.copy(), (a.id,)
        mutate = rng.random(self.space.dims) < self._mutation_rate
        noise = rng.standard_normal(self.space.dims) * s.mutation_sigma * self.space.width
        return self.space.reflect(child + np.where(mutate, noise, 0.0)), parents

    # -- state -----------------------------------------------------------------------------------------

    def _state_data(self) -> dict[str, Any]:
        def member(m: _Member) -> dict[str, Any]:
            return {"candidate": m[0].model_dump(mode="json"), "fitness": m[1]}

        return {
            "rng": rng_state(self._rng),
            "population": [member(m) for m in self._population],
            "queue": [{"genome": list(g), "parents": list(p)} for g, p in self._queue],
            "batch": list(self._batch),
            "children": [member(m) for m in self._children.values()],
        }

    def _load_state_data(self, data: dict[str, Any]) -> None:
        def member(d: dict[str, Any]) -> _Member:
            return Candidate.model_validate(d["candidate"]), None if d[
                "fitness"
            ] is None else float(d["fitness"])

        self._rng = rng_from_state(data["rng"])
        self._population = [member(d) for d in data["population"]]
        self._queue = [
            (tuple(float(v) for v in q["genome"]), tuple(str(p) for p in q["parents"]))
            for q in data["queue"]
        ]
        self._batch = [str(i) for i in data["batch"]]
        children = [member(d) for d in data["children"]]
        self._children = {m[0].id: m for m in children}

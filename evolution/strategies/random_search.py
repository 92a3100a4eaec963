"""Random search (``"random"``): uniform samples in the box, the baseline every strategy must beat.

It never waits for results (steady state by nature), so it is also the simplest strategy to
drive a scheduler with in tests. ``generation`` is ``evaluations // batch_size``; the run is done
after ``max_generations * batch_size`` results, and no more candidates than that are handed out.
The first candidate is ``space.initial`` when ``include_initial``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from evolution.strategies._base import Strategy, StrategySettings, _check_int
from evolution.strategies._candidate import Candidate
from evolution.strategies._rng import make_rng, rng_from_state, rng_state
from evolution.strategies._space import GenomeSpace
from evolution.strategies.registry import register_strategy

__all__ = ["RandomSearch", "RandomSearchSettings"]


@dataclasses.dataclass
class RandomSearchSettings(StrategySettings):
    """Settings of :class:`RandomSearch` (``max_generations`` and ``seed`` from StrategySettings).

    Example:
        >>> RandomSearchSettings(batch_size=4).include_initial
        True
    """

    batch_size: int = 16  # results that make up one generation
    include_initial: bool = True  # the first candidate is space.initial

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_int(self, "batch_size", 1)


@register_strategy
class RandomSearch(Strategy[RandomSearchSettings]):
    """Uniform random search; ask() never waits.

    Args:
        space: the genome space.
        settings: :class:`RandomSearchSettings`; None for the defaults.

    Example:
        >>> from evolution.strategies import GenomeSpace
        >>> rs = RandomSearch(GenomeSpace(dims=2), RandomSearchSettings(batch_size=2, max_generations=1))
        >>> a, b = rs.ask(), rs.ask()
        >>> rs.can_ask   # the budget of 2 is handed out
        False
    """

    name = "random"
    settings_type = RandomSearchSettings

    def __init__(self, space: GenomeSpace, settings: RandomSearchSettings | None = None) -> None:
        super().__init__(space, settings)
        self._rng = make_rng(self.settings.seed)

    def _can_ask(self) -> bool:
        return self._serial < self.settings.max_generations * self.settings.batch_size

    def _ask(self) -> Candidate:
        if self._serial == 0 and self.settings.include_initial:
            return self._new_candidate(self.space.initial)
        return self._new_candidate(self.space.clip(self.space.sample(self._rng, 1)[0]))

    def _tell(self, candidate: Candidate, fitness: float | None) -> None:
        self._generation = self._evaluations // self.settings.batch_size

    def _state_data(self) -> dict[str, Any]:
        return {"rng": rng_state(self._rng)}

    def _load_state_data(self, data: dict[str, Any]) -> None:
        self._rng = rng_from_state(data["rng"])

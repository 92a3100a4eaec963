"""The ask/tell interface every search strategy implements.

A scheduler drives a strategy one candidate at a time::

    while not strategy.done:
        if strategy.can_ask:
            send_to_free_evaluator(strategy.ask())
        else:
            candidate_id, fitness = wait_for_a_result()   # None when the evaluation failed
            strategy.tell(candidate_id, fitness)

Conventions shared by every strategy:

* fitness is **maximised**; ``None`` (and NaN or +-inf) means the evaluation failed, and a
  failed candidate ranks below every successful one;
* every asked candidate must eventually be told (with ``None`` if its evaluator died), or the
  generation it belongs to never completes; candidates still pending when the strategy is done
  (steady-state CMA-ES) may still be told and count for ``best()``;
* ``state_dict()`` is JSON-able and complete: a strategy rebuilt from it (and fed the same
  results) hands out exactly the candidates the original would have;
* strategies are not thread-safe: call them from one thread (the scheduler actor).
"""

from __future__ import annotations

import abc
import dataclasses
import math
from collections.abc import Mapping
from typing import Any, ClassVar, Generic, TypeVar, cast

from evolution._exceptions import EvolutionError
from evolution.strategies._candidate import BestRecord, Candidate, StrategyState
from evolution.strategies._space import GenomeSpace
from hive import ConfigError

__all__ = ["Strategy", "StrategySettings"]


@dataclasses.dataclass
class StrategySettings:
    """Settings every strategy has. Strategies extend this dataclass with their own."""

    max_generations: int = 100  # generations to run; `done` once this many have completed
    seed: int = 0  # seed of the strategy's random generator; same seed + same results = same run

    def __post_init__(self) -> None:
        _check_int(self, "max_generations", 1)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ConfigError(
                f"seed must be a non-negative integer, got {self.seed!r}", setting="seed"
            )


def _check_int(settings: object, name: str, minimum: int) -> None:
    value = getattr(settings, name)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}", setting=name)


def _check_float(
    settings: object, name: str, low: float, high: float, *, open_low: bool = False
) -> None:
    value = getattr(settings, name)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if open_low else value >= low) and value <= high
    if not ok:
        bracket = "(" if open_low else "["
        raise ConfigError(
            f"{name} must be a number in {bracket}{low}, {high}], got {value!r}", setting=name
        )


S = TypeVar("S", bound=StrategySettings)


class Strategy(abc.ABC, Generic[S]):
    """Base of every search strategy: ask for candidates, tell their fitness, resume from state.

    Subclasses set ``name`` and ``settings_type`` and implement ``_ask``, ``_can_ask``,
    ``_tell``, ``_state_data`` and ``_load_state_data``; this base keeps the shared
    bookkeeping (pending candidates, best result, counters, state layout).

    Args:
        space: the genome space to search.
        settings: the strategy's settings dataclass; None for its defaults.

    Example:
        >>> from evolution.strategies import get_strategy, GenomeSpace
        >>> strategy = get_strategy("ga", GenomeSpace(dims=2), population_size=4, max_generations=2)
        >>> while not strategy.done:
        ...     c = strategy.ask()
        ...     strategy.tell(c.id, -sum((g - 0.3) ** 2 for g in c.genome))
        >>> strategy.generation, strategy.evaluations
        (2, 7)
    """

    name: ClassVar[str]  # registry name, e.g. "cma-es"
    settings_type: ClassVar[type[StrategySettings]]  # the settings dataclass

    def __init__(self, space: GenomeSpace, settings: S | None = None) -> None:
        if not isinstance(space, GenomeSpace):
            raise ConfigError(
                f"space must be a GenomeSpace, got {type(space).__name__}", setting="space"
            )
        resolved = self.settings_type() if settings is None else settings
        if not isinstance(resolved, self.settings_type):
            raise ConfigError(
                f"strategy {self.name!r} takes {self.settings_type.__name__}, got {type(resolved).__name__}",
                setting="settings",
            )
        self.space = space
        self.settings: S = cast(S, resolved)  # settings_type is S for every concrete subclass
        self._serial = 0
        self._generation = 0
        self._evaluations = 0
        self._pending: dict[str, Candidate] = {}
        self._best: tuple[Candidate, float] | None = None

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} {self.name!r} generation={self._generation}/"
            f"{self.settings.max_generations} evaluations={self._evaluations} pending={len(self._pending)}>"
        )

    # -- the interface -------------------------------------------------------------------------

    @property
    def generation(self) -> int:
        """Completed generations; also the generation of the next candidate (0-based)."""
        return self._generation

    @property
    def done(self) -> bool:
        """True once ``settings.max_generations`` generations have completed."""
        return self._generation >= self.settings.max_generations

    @property
    def can_ask(self) -> bool:
        """Whether :meth:`ask` would hand out a candidate now.

        False when done, and when the strategy must hear results first (the end of a
        generation in generational mode, or the evaluation budget already handed out).
        """
        return not self.done and self._can_ask()

    @property
    def pending(self) -> tuple[Candidate, ...]:
        """Candidates asked for but not yet told, in ask order.

        After a resume these are the evaluations that were in flight: hand them out again, or
        tell them ``None``.
        """
        return tuple(self._pending.values())

    @property
    def evaluations(self) -> int:
        """Results told so far, failures included."""
        return self._evaluations

    def ask(self) -> Candidate:
        """Hand out the next candidate to evaluate.

        Returns:
            A new :class:`Candidate`, inside the genome space's bounds.

        Raises:
            EvolutionError: the strategy is done (raise ``max_generations`` to go on), or it
                needs results before it can breed more (check :attr:`can_ask`; in generational
                mode tell the pending candidates, or create it with ``steady_state=True``).

        Example:
            >>> from evolution.strategies import get_strategy, GenomeSpace
            >>> get_strategy("cma-es", GenomeSpace(dims=2), seed=1).ask().id
            'g0-0'
        """
        if self.done:
            raise EvolutionError(
                f"strategy {self.name!r} is done ({self.settings.max_generations} generations); "
                "raise max_generations to continue",
                strategy=self.name,
            )
        if not self._can_ask():
            raise EvolutionError(
                f"strategy {self.name!r} needs results before it can hand out more candidates "
                f"({len(self._pending)} pending in generation {self._generation}); tell them first, "
                "check can_ask, or create the strategy with steady_state=True",
                strategy=self.name,
            )
        candidate = self._ask()
        self._pending[candidate.id] = candidate
        return candidate

    def tell(self, candidate_id: str, fitness: float | None) -> None:
        """Report the fitness of an asked candidate (higher is better).

        Args:
            candidate_id: the id of a pending candidate.
            fitness: its fitness; None, NaN or +-inf mean the evaluation failed, and the
                candidate then ranks below every successful one.

        Raises:
            EvolutionError: the id was never asked for or was already told.

        Example:
            >>> from evolution.strategies import get_strategy, GenomeSpace
            >>> s = get_strategy("ga", GenomeSpace(dims=2))
            >>> a, b = s.ask(), s.ask()
            >>> s.tell(a.id, 0.5); s.tell(b.id, None)
            >>> s.best()[1]
            0.5
        """
        value: float | None
        if fitness is None:
            value = None
        else:
            try:
                value = float(fitness)
            except (TypeError, ValueError) as exc:
                raise EvolutionError(
                    f"fitness of {candidate_id} must be a number or None, got {fitness!r}",
                    candidate_id=candidate_id,
                ) from exc
            if not math.isfinite(value):
                value = None
        candidate = self._pending.pop(candidate_id, None)
        if candidate is None:
            raise EvolutionError(
                f"strategy {self.name!r} has no pending candidate {candidate_id!r}: it was never asked "
                "for or was already told",
                candidate_id=candidate_id,
            )
        self._evaluations += 1
        if value is not None and (self._best is None or value > self._best[1]):
            self._best = (candidate, value)
        self._tell(candidate, value)

    def best(self) -> tuple[Candidate, float]:
        """The best candidate told so far and its fitness (the first one on ties).

        Returns:
            ``(candidate, fitness)``.

        Raises:
            EvolutionError: no candidate has been told a successful fitness yet.
        """
        if self._best is None:
            raise EvolutionError(
                f"strategy {self.name!r} has no successful result yet; tell some first",
                strategy=self.name,
            )
        return self._best

    # -- state -----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """A JSON-able snapshot of the whole strategy, pending candidates included.

        Returns:
            A :class:`StrategyState` dumped with ``mode="json"``; ``json.dumps`` accepts it.

        Example:
            >>> import json
            >>> from evolution.strategies import get_strategy, strategy_from_state, GenomeSpace
            >>> s = get_strategy("ga", GenomeSpace(dims=2), seed=3)
            >>> _ = s.ask()
            >>> copy = strategy_from_state(json.loads(json.dumps(s.state_dict())))
            >>> copy.ask() == s.ask()
            True
        """
        best = (
            None
            if self._best is None
            else BestRecord(candidate=self._best[0], fitness=self._best[1])
        )
        state = StrategyState(
            strategy=self.name,
            space=self.space,
            settings=dataclasses.asdict(self.settings),
            serial=self._serial,
            generation=self._generation,
            evaluations=self._evaluations,
            pending=tuple(self._pending.values()),
            best=best,
            data=self._state_data(),
        )
        return state.model_dump(mode="json")

    def load_state_dict(self, state: Mapping[str, Any] | StrategyState) -> None:
        """Replace this strategy's state with a saved one.

        The strategy name, genome space and settings must match the saved ones, except
        ``max_generations``, which may differ (to extend a finished run); this object's value
        is kept.

        Args:
            state: what :meth:`state_dict` returned (or its JSON round trip).

        Raises:
            EvolutionError: the state belongs to another strategy, space or settings.
            pydantic.ValidationError: the state is malformed.
        """
        st = (
            state if isinstance(state, StrategyState) else StrategyState.model_validate(dict(state))
        )
        if st.strategy != self.name:
            raise EvolutionError(
                f"state is for strategy {st.strategy!r}, not {self.name!r}; "
                "rebuild with strategy_from_state()",
                strategy=st.strategy,
            )
        if st.space != self.space:
            raise EvolutionError(
                f"state was saved for another genome space ({st.space!r}); "
                "rebuild with strategy_from_state()",
                strategy=self.name,
            )
        mine = dataclasses.asdict(self.settings)
        differ = sorted(
            k
            for k in set(mine) | set(st.settings)
            if k != "max_generations" and mine.get(k) != st.settings.get(k)
        )
        if differ:
            raise EvolutionError(
                f"state was saved with other settings ({', '.join(differ)} differ); "
                "rebuild with strategy_from_state()",
                strategy=self.name,
                settings=differ,
            )
        self._serial = st.serial
        self._generation = st.generation
        self._evaluations = st.evaluations
        self._pending = {c.id: c for c in st.pending}
        self._best = None if st.best is None else (st.best.candidate, st.best.fitness)
        self._load_state_data(st.data)

    # -- for subclasses ----------------------------------------------------------------------------

    def _new_candidate(self, genome: tuple[float, ...], parents: tuple[str, ...] = ()) -> Candidate:
        """A candidate with the next id, ``g<generation>-<serial>``."""
        candidate = Candidate(
            id=f"g{self._generation}-{self._serial}",
            genome=genome,
            generation=self._generation,
            parents=parents,
        )
        self._serial += 1
        return candidate

    @abc.abstractmethod
    def _ask(self) -> Candidate:
        """Produce the next candidate (called only when ``_can_ask()`` and not done)."""

    @abc.abstractmethod
    def _can_ask(self) -> bool:
        """Whether a candidate can be produced now without results (ignoring ``done``)."""

    @abc.abstractmethod
    def _tell(self, candidate: Candidate, fitness: float | None) -> None:
        """Record a result; ``fitness`` is finite or None (failed). Best/counters are done."""

    @abc.abstractmethod
    def _state_data(self) -> dict[str, Any]:
        """The strategy-specific part of the state, JSON values only."""

    @abc.abstractmethod
    def _load_state_data(self, data: dict[str, Any]) -> None:
        """Restore what ``_state_data`` returned."""


def rank_key(fitness: float | None) -> float:
    """Sort key that puts failures (None) below every success."""
    return -math.inf if fitness is None else fitness

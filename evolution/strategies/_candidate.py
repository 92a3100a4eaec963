"""What a strategy hands out (a :class:`Candidate`) and what it saves (a :class:`StrategyState`).

Both cross process boundaries (scheduler → evaluator, scheduler → checkpoint store), so both are
frozen pydantic models, validated on arrival.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from evolution.strategies._space import GenomeSpace

__all__ = ["BestRecord", "Candidate", "StrategyState"]


class Candidate(BaseModel):
    """One genome to evaluate.

    Example:
        >>> c = Candidate(id="g1-9", genome=(0.5, 0.25), generation=1, parents=("g0-2", "g0-5"))
        >>> c.genome[1], c.parents
        (0.25, ('g0-2', 'g0-5'))
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str  # unique within one strategy run: "g<generation>-<serial>"
    genome: tuple[float, ...]  # one value per gene, inside the GenomeSpace bounds
    generation: int  # the strategy's generation when the candidate was asked for
    parents: tuple[str, ...] = ()  # ids of the candidates it was bred from (GA); () when sampled


class BestRecord(BaseModel):
    """The best candidate told so far and its fitness."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    candidate: Candidate  # the candidate
    fitness: float  # its (finite) fitness


class StrategyState(BaseModel):
    """Everything a strategy needs to resume exactly: :meth:`Strategy.state_dict` dumps one.

    ``data`` is the strategy's own part (random generator state, population, queued samples;
    for CMA-ES a base64 pickle of the ``cma`` object). Rebuild a strategy from it with
    :func:`evolution.strategies.strategy_from_state`.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: Literal[1] = 1  # layout version of this record
    strategy: str  # registry name ("cma-es", "ga", ...)
    space: GenomeSpace  # the genome space the strategy searches
    settings: dict[str, Any]  # the strategy's settings dataclass as a dict
    serial: int  # candidates handed out so far (the next id's serial)
    generation: int  # completed generations
    evaluations: int  # results told so far (failures included)
    pending: tuple[Candidate, ...]  # asked but not yet told, in ask order
    best: BestRecord | None  # best result so far, None before the first success
    data: dict[str, Any]  # strategy-specific state (JSON values only)

"""Search strategies for evolutionary model merging, behind one ask/tell interface.

Each strategy lives in its own module and is registered by name: ``cma-es`` (:mod:`.cma_es`),
``ga`` (:mod:`.genetic`) and the ``random`` baseline (:mod:`.random_search`). Fitness is
maximised; ``tell(id, None)`` reports a failed evaluation. See :mod:`._base` for the contract.

Example:
    >>> from evolution.strategies import GenomeSpace, get_strategy
    >>> space = GenomeSpace(dims=2, low=0.0, high=1.0, names=["w_math", "w_code"])
    >>> es = get_strategy("cma-es", space, popsize=6, max_generations=5, seed=0)
    >>> while not es.done:
    ...     c = es.ask()
    ...     es.tell(c.id, -sum((g - 0.7) ** 2 for g in c.genome))
    >>> es.generation, es.evaluations
    (5, 30)
"""

from evolution.strategies._base import Strategy, StrategySettings
from evolution.strategies._candidate import BestRecord, Candidate, StrategyState
from evolution.strategies._space import GenomeSpace
from evolution.strategies.cma_es import CMAES, CMAESSettings
from evolution.strategies.genetic import GASettings, GeneticAlgorithm
from evolution.strategies.random_search import RandomSearch, RandomSearchSettings
from evolution.strategies.registry import (
    get_strategy,
    known_strategies,
    register_strategy,
    strategy_class,
    strategy_from_state,
)

__all__ = [
    "BestRecord",
    "CMAES",
    "CMAESSettings",
    "Candidate",
    "GASettings",
    "GeneticAlgorithm",
    "GenomeSpace",
    "RandomSearch",
    "RandomSearchSettings",
    "Strategy",
    "StrategySettings",
    "StrategyState",
    "get_strategy",
    "known_strategies",
    "register_strategy",
    "strategy_class",
    "strategy_from_state",
]

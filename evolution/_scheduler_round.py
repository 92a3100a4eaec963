"""The search loop of a round: ask, submit, wait for any result, tell in order, promote.

``run_search`` drives one ``EvolutionScheduler`` round after the baseline is in: it rebuilds
the strategy (from its stored state on resume), re-submits candidates left pending, keeps up to
``window`` candidates untold, and tells results in ask order (``tell_order="ask"``) or as they
arrive (``"arrival"``), storing every ask and tell with the strategy state it produced before
acting on it. A told candidate that passes the regression gate becomes the next champion.
Progress: one tqdm bar per generation, opened when its first candidate is told.

Example:
    >>> strategy = run_search(sched, generations=2, progress=True)   # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from evolution._exceptions import EvolutionError
from evolution._recipe import MergeRecipe
from evolution.strategies import Strategy, get_strategy, strategy_from_state

if TYPE_CHECKING:
    from evolution._scheduler import EvolutionScheduler

__all__ = ["run_search"]


def _strategy(sched: EvolutionScheduler) -> Strategy[Any]:
    state = sched.store.strategy_state()
    if state is not None:
        return strategy_from_state(state)
    space = sched.layout.space(sched.layout.from_recipe(sched.cfg.baseline))
    return get_strategy(sched.cfg.strategy, space, **sched.cfg.strategy_kwargs())


def run_search(sched: EvolutionScheduler, generations: int | None, progress: bool) -> Strategy[Any]:
    """Run the search until the strategy is done or ``generations`` more have passed.

    Returns:
        The strategy after the last tell.

    Raises:
        EvolutionError: the store and the stored strategy state disagree (a damaged store).
    """
    strategy = _strategy(sched)
    target = strategy.settings.max_generations
    if generations is not None:
        target = strategy.generation + generations
        strategy.settings.max_generations = max(target, strategy.settings.max_generations)
    rows = {c.id: c for c in sched.store.candidates("search") if c.tell_seq is None}
    untold = list(rows)  # ask order
    if sorted(untold) != sorted(c.id for c in strategy.pending):
        raise EvolutionError(f"run {sched.name!r}: store and strategy state disagree on the "
                             "pending candidates; the store is damaged", name=sched.name)  # fmt: skip
    ready = {cid for cid, c in rows.items() if c.status != "pending"}
    for cid in untold:
        if cid not in ready and cid not in sched.dispatcher:
            sched._submit(cid, MergeRecipe.model_validate(rows[cid].recipe))
    bar = _GenerationBars(progress, sched.cfg.population)

    def fill() -> None:
        while len(untold) < sched.window and strategy.can_ask and strategy.generation < target:
            c = strategy.ask()
            recipe = sched.layout.to_recipe(c.genome)
            sched.store.add_candidate(c.id, "search", recipe.to_dict(), generation=c.generation,
                                      genome=c.genome, parents=c.parents,
                                      strategy_state=strategy.state_dict())  # fmt: skip
            untold.append(c.id)
            sched._submit(c.id, recipe)

    def tell(cid: str) -> None:
        generation = strategy.generation  # the generation this result belongs to
        _tell(sched, strategy, cid)
        untold.remove(cid)
        ready.discard(cid)
        bar.told(generation, strategy.generation)
        fill()

    fill()
    try:
        while untold:
            if sched.cfg.tell_order == "ask":
                while untold and untold[0] in ready:
                    tell(untold[0])
            else:
                for cid in [c for c in untold if c in ready]:
                    tell(cid)
            if not untold:
                break
            result = sched.dispatcher.wait_any()
            sched._record(result)
            ready.add(result.candidate_id)
    finally:
        bar.close()
    return strategy


def _tell(sched: EvolutionScheduler, strategy: Strategy[Any], cid: str) -> None:
    """Tell one stored result; promote it when it passes the gate."""
    rec = sched.store.candidate(cid)
    assert rec is not None
    champion = None
    if rec.status == "ok":
        base = sched.champions.all()[0]
        current = sched.champion()
        decision = sched.gate.check(rec.scores, base.scores, base.noise, current.combined)
        fitness: float | None = sched.gate.penalised(decision, sched.cfg.gate_penalty)
        strategy.tell(cid, fitness)
        if decision.passed:
            champion = sched.champions.new(cid, rec.recipe, rec.scores, base.noise)
        sched.store.record_tell(cid, fitness, decision.passed, decision.reasons,
                                strategy.state_dict(), champion)  # fmt: skip
    else:
        strategy.tell(cid, None)
        sched.store.record_tell(cid, None, None, (), strategy.state_dict())
    if champion is not None:
        sched.champions.materialise(champion)


class _GenerationBars:
    """One tqdm bar per strategy generation (candidates told of it).

    A bar opens when the first result of its generation is told, so a round that ends on a
    generation boundary leaves no empty bar for the generation it will never start.
    """

    def __init__(self, enabled: bool, per_generation: int) -> None:
        self.enabled, self.total = enabled, per_generation
        self.bar: Any = None
        self.generation: int | None = None

    def told(self, generation: int, now: int) -> None:
        """A result of ``generation`` was told; the strategy is at generation ``now``."""
        if self.bar is None or generation != self.generation:
            self.close()
            self.generation = generation
            self.bar = tqdm(total=self.total, desc=f"generation {generation}", unit="cand",
                            disable=not self.enabled, leave=True)  # fmt: skip
        self.bar.update()
        if now != generation:  # that result completed its generation
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

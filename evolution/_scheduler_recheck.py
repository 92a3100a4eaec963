"""Recheck: re-evaluate the active champion against the previous good one, roll back on a fail.

The champion is evaluated once and the previous good champion ``baseline_repeats`` times (their
mean and noise play the baseline, see ``evolution._gate``); a champion that now fails the
per-domain floors is rolled back (``ChampionBook.rollback``: sha256 verified, re-merged from its
recipe if damaged, ``RollbackExecuted`` recorded).

Example:
    >>> report = recheck(sched, tasks=None)                          # doctest: +SKIP
    >>> report.passed, report.rolled_back                            # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

from evolution._exceptions import EvolutionError
from evolution._gate import mean_and_noise
from evolution._recipe import MergeRecipe
from evolution.tasks import FitnessTask, task_from_spec

if TYPE_CHECKING:
    from evolution._scheduler import EvolutionScheduler

__all__ = ["RecheckReport", "recheck"]


class RecheckReport(BaseModel):
    """What ``recheck()`` found."""

    model_config = ConfigDict(frozen=True)

    champion: int  # champion number rechecked
    previous: int | None  # the earlier good champion compared against (None: none exists)
    champion_scores: dict[str, float]  # its scores now
    previous_scores: dict[str, float]  # the previous champion's (mean) scores now
    passed: bool  # the champion still passes the gate against the previous one
    reasons: tuple[str, ...]  # why not
    rolled_back: bool  # whether the previous champion was restored


def recheck(
    sched: EvolutionScheduler, tasks: Sequence[FitnessTask | dict[str, Any]] | None
) -> RecheckReport:
    """See ``EvolutionScheduler.recheck``."""
    sched.ensure_evaluators()
    use = tuple(task_from_spec(t) for t in tasks) if tasks else tuple(sched.cfg.tasks)
    active = sched.champion()
    previous = sched.champions.previous_good(active)
    if previous is None:
        return RecheckReport(champion=active.n, previous=None, champion_scores=active.scores,
                             previous_scores={}, passed=True,
                             reasons=("no earlier champion to compare with",), rolled_back=False)  # fmt: skip
    k = len({c.id.split("-")[1] for c in sched.store.candidates("recheck")})
    rows = [(f"recheck-{k}-champion", "recheck", MergeRecipe.model_validate(active.recipe))]
    rows += [(f"recheck-{k}-previous-{i}", "recheck", MergeRecipe.model_validate(previous.recipe))
             for i in range(sched.cfg.baseline_repeats)]  # fmt: skip
    done = sched._evaluate_all(rows, use)
    prev_ok = [r.scores for cid, r in done.items() if "previous" in cid and r.status == "ok"]
    if not prev_ok:
        raise EvolutionError(f"recheck of run {sched.name!r}: the previous champion fails the "
                             "new tasks too; nothing to compare", name=sched.name)  # fmt: skip
    mean, noise = mean_and_noise(prev_ok)
    champ_row = done[rows[0][0]]
    scores = champ_row.scores if champ_row.status == "ok" else {}
    decision = sched.gate.check(scores, mean, noise, None)
    sched._event("evolution.recheck", champion=active.n, previous=previous.n, scores=scores,
                 previous_scores=mean, passed=decision.passed)  # fmt: skip
    if not decision.passed:
        sched.rollback(f"recheck: champion {active.n} regresses against champion "
                       f"{previous.n}: " + "; ".join(decision.reasons))  # fmt: skip
    return RecheckReport(champion=active.n, previous=previous.n, champion_scores=scores,
                         previous_scores=mean, passed=decision.passed,
                         reasons=decision.reasons, rolled_back=not decision.passed)  # fmt: skip

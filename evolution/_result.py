"""What a round leaves behind, read from the lineage store: tables, lineage, best recipe, plots.

Example:
    >>> result = scheduler.run_round()                                  # doctest: +SKIP
    >>> result.to_pandas()[["id", "status", "combined", "gate_passed"]]  # doctest: +SKIP
    >>> result.best_recipe.to_yaml()                                    # doctest: +SKIP
    >>> result.plot()                                                   # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from evolution._recipe import MergeRecipe
from evolution._store import CandidateRecord, ChampionRecord

__all__ = ["RoundResult"]


@dataclass(frozen=True)
class RoundResult:
    """A snapshot of one run's lineage store.

    ``best_recipe`` is the *champion's* recipe (the best candidate that passed the regression
    gate), which is what a user should ship; ``best`` is the candidate with the highest
    combined score regardless of the gate.
    """

    name: str  # run name
    candidates: tuple[CandidateRecord, ...]  # every row, ask order (baseline/recheck included)
    champions: tuple[ChampionRecord, ...]  # champion history, oldest first
    rollbacks: tuple[dict[str, Any], ...]  # rollback log
    gene_names: tuple[str, ...]  # names of the genome's genes, genome order

    @property
    def search(self) -> tuple[CandidateRecord, ...]:
        """Only the search's candidates (no baseline/recheck rows), ask order."""
        return tuple(c for c in self.candidates if c.kind == "search")

    @property
    def champion(self) -> ChampionRecord | None:
        """The active champion (None before the baseline is in)."""
        return next((c for c in reversed(self.champions) if c.status == "active"), None)

    @property
    def best_recipe(self) -> MergeRecipe | None:
        """The active champion's recipe."""
        champ = self.champion
        return None if champ is None else MergeRecipe.model_validate(champ.recipe)

    @property
    def best(self) -> CandidateRecord | None:
        """The successful search candidate with the highest combined score."""
        ok = [c for c in self.search if c.status == "ok" and c.combined is not None]
        return max(ok, key=lambda c: c.combined or 0.0, default=None)

    @property
    def lineage(self) -> list[tuple[str, str]]:
        """Parent -> child edges of the search (GA crossovers/mutations; CMA-ES has none)."""
        return [(p, c.id) for c in self.search for p in c.parents]

    def to_pandas(self) -> Any:
        """One row per candidate: ids, status, scores (``score.<domain>``), genes, gate, timings.

        Returns:
            A ``pandas.DataFrame`` in ask order.
        """
        import pandas as pd

        rows = []
        for c in self.candidates:
            row: dict[str, Any] = {
                "id": c.id, "kind": c.kind, "generation": c.generation, "status": c.status,
                "combined": c.combined, "fitness": c.fitness, "gate_passed": c.gate_passed,
                "tell_seq": c.tell_seq, "parents": ",".join(c.parents), "agent_id": c.agent_id,
                "attempt": c.attempt, "merge_seconds": c.timings.get("merge_seconds"),
                "error": c.error,
            }  # fmt: skip
            row.update({f"score.{d}": v for d, v in sorted(c.scores.items())})
            if c.genome and len(c.genome) == len(self.gene_names):
                row.update({f"gene.{n}": v for n, v in zip(self.gene_names, c.genome)})
            rows.append(row)
        return pd.DataFrame(rows)

    def plot(self, ax: Any = None) -> Any:
        """Combined score per told candidate, failures marked, and the champion's score over time.

        Args:
            ax: a matplotlib Axes to draw into; None makes a new figure.

        Returns:
            The Axes.

        Raises:
            ImportError: matplotlib is not installed (``pip install matplotlib``).
        """
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(8, 4))
        told = sorted((c for c in self.search if c.tell_seq is not None), key=lambda c: c.tell_seq or 0)
        ok = [(i, c.combined) for i, c in enumerate(told) if c.combined is not None]
        bad = [i for i, c in enumerate(told) if c.status != "ok"]
        if ok:
            ax.scatter(*zip(*ok), s=14, label="candidate (combined score)")
        if bad:
            floor = min((v for _, v in ok), default=0.0)
            ax.scatter(bad, [floor] * len(bad), marker="x", color="red", label="failed / rejected")
        best, line = None, []
        by_id = {ch.candidate_id: ch for ch in self.champions}
        base = next((ch for ch in self.champions if ch.n == 0), None)
        best = base.combined if base is not None else None
        for i, c in enumerate(told):
            if c.id in by_id:
                best = by_id[c.id].combined
            line.append(best)
        if line and best is not None:
            ax.step(range(len(line)), line, where="post", color="black", label="champion")
        ax.set_xlabel("candidates told")
        ax.set_ylabel("combined score (higher is better)")
        ax.set_title(f"evolution run {self.name}")
        ax.legend(loc="lower right")
        return ax

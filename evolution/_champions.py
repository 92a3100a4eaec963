"""The champion history of a run: promotion, materialisation, rollback.

Champion 0 is the baseline; each candidate that passes the regression gate becomes the next
champion. A champion is written with the streaming ``merge()`` to
``<home>/evolution/<name>/champions/<n>/`` (row ``pending`` until its sha256 is recorded, so a
scheduler killed mid-write finishes it on resume) and becomes ``active``, retiring the one
before. ``rollback`` makes the previous good (``retired``) champion active again after checking
its checkpoint's sha256 — re-merging it from its recipe when the files were damaged — marks the
current one ``rolled_back`` and records ``hive.events.RollbackExecuted``.

Example:
    >>> book = ChampionBook("demo", home, store, gate, client, emit)     # doctest: +SKIP
    >>> book.current().path, book.current().sha256                       # doctest: +SKIP
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hive
from evolution._checksum import verify
from evolution._exceptions import ChecksumError, EvolutionError, RollbackError
from evolution._gate import RegressionGate
from evolution._merge import merge
from evolution._recipe import MergeRecipe
from evolution._store import ChampionRecord, RunStore

__all__ = ["ChampionBook", "run_dir"]


def run_dir(home: Path, name: str) -> Path:
    """``<home>/evolution/<name>/`` (champions live under it)."""
    return home / "evolution" / name


class ChampionBook:
    """Champions of one run, kept in its store.

    Args:
        name: run name.
        home: hive home.
        store: the run's store.
        gate: its regression gate (combined scores).
        client: hive client (RollbackExecuted events).
        emit: ``emit(topic, **data)`` records an ``ext.event`` of the run.
    """

    def __init__(self, name: str, home: Path, store: RunStore, gate: RegressionGate,
                 client: hive.Client, emit: Callable[..., None]) -> None:  # fmt: skip
        self.name, self.home, self.store, self.gate = name, home, store, gate
        self.client, self.emit = client, emit

    def all(self) -> list[ChampionRecord]:
        """Every champion, oldest first."""
        return self.store.champions()

    def active(self) -> ChampionRecord | None:
        """The active champion, or None before the baseline is in."""
        active = [c for c in self.all() if c.status == "active"]
        return active[-1] if active else None

    def current(self) -> ChampionRecord:
        """The active champion.

        Raises:
            EvolutionError: none yet (run a round first).
        """
        active = self.active()
        if active is None:
            raise EvolutionError(f"run {self.name!r} has no champion yet; call run_round() first",
                                 name=self.name)  # fmt: skip
        return active

    def new(self, cid: str, recipe: dict[str, Any], scores: dict[str, float],
            noise: dict[str, float]) -> ChampionRecord:  # fmt: skip
        """The ``pending`` row of the next champion (not stored yet)."""
        n = len(self.all())
        return ChampionRecord(
            n=n, candidate_id=cid, path=str(run_dir(self.home, self.name) / "champions" / str(n)),
            sha256=None, recipe=recipe, scores=scores, combined=self.gate.combined(scores),
            noise=noise, status="pending", created=time.time(),
        )  # fmt: skip

    def materialise(self, champ: ChampionRecord) -> ChampionRecord:
        """Write a stored champion's checkpoint, record its sha256, make it active.

        The sha256 is computed by the merge's writer thread as the files are written (a
        champion's digest is kept and verified, so it is sha256, not the default xxh3).
        """
        result = merge(MergeRecipe.model_validate(champ.recipe), champ.path, overwrite=True,
                       progress=False, checksum="sha256")  # recorded and verified later  # fmt: skip
        self.store.activate_champion(champ.n, result.sha256)
        self.emit("evolution.champion_promoted", n=champ.n, candidate=champ.candidate_id,
                  path=champ.path, sha256=result.sha256, scores=champ.scores,
                  combined=champ.combined)  # fmt: skip
        return champ.model_copy(update={"sha256": result.sha256, "status": "active"})

    def finish_pending(self) -> None:
        """Materialise champions a killed scheduler left half-written."""
        for champ in self.all():
            if champ.status == "pending":
                self.materialise(champ)

    def previous_good(self, active: ChampionRecord) -> ChampionRecord | None:
        """The latest ``retired`` champion before ``active`` (never a rolled-back one)."""
        earlier = [c for c in self.all() if c.n < active.n and c.status == "retired"]
        return earlier[-1] if earlier else None

    def rollback(self, reason: str) -> ChampionRecord:
        """Restore the previous good champion (see the module docstring).

        Returns:
            The restored champion.

        Raises:
            RollbackError: no active champion, or no earlier good one.
            ChecksumError: the re-merged checkpoint still does not match its record.
        """
        active = self.active()
        target = None if active is None else self.previous_good(active)
        if active is None or target is None or target.sha256 is None:
            what = "has no champion yet" if active is None else f"champion {active.n} has"
            raise RollbackError(f"run {self.name!r}: {what} no earlier good champion to roll "
                                "back to", name=self.name)  # fmt: skip
        try:
            verify(target.path, target.sha256)
        except ChecksumError:
            merge(MergeRecipe.model_validate(target.recipe), target.path, overwrite=True,
                  progress=False)  # fmt: skip
            verify(target.path, target.sha256)
        self.store.record_rollback(active.n, target.n, reason, target.sha256)
        self.client.record_event(hive.events.RollbackExecuted(
            target=f"evolution/{self.name}/champion", restored=target.path, reason=reason))  # fmt: skip
        return target.model_copy(update={"status": "active"})

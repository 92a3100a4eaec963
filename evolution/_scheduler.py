"""``EvolutionScheduler``: runs evolution rounds from a notebook, one SQLite store per run.

Placement. The scheduler is a driver-side object (in the notebook or CLI process), not an
Agent: it submits every evaluation as a hive task to the :class:`Evaluator` agents — which
the hive Coordinator keeps alive, restarts and fails over — and persists every step to the
run's lineage store (``<home>/evolution/<name>.db``) before acting on it. The driver can
therefore die at any moment (kernel restart, SIGKILL) and ``EvolutionScheduler.attach(name)``
+ ``resume()`` — from any process joined to the same hive — continues exactly; the tasks it
had in flight keep running on the evaluators and are re-attached by idempotency key. A
scheduler Agent would have to hold a hive task open for a whole round and would still need
the same store to resume, with no progress bars in the notebook.

Modules: this facade (creation, evaluations, baseline, reading); ``_scheduler_launch``
(create/open a run and its store), ``_scheduler_round`` (the search loop),
``_scheduler_recheck`` (recheck) and ``_champions`` (champion history, materialisation,
rollback).

Steady state. Up to ``window`` candidates are untold at once (config ``max_in_flight``,
default the number of evaluators): whenever one finishes, the next candidate goes to
whichever evaluator is free (hive dispatch + wait-any over the task handles).

Determinism and resume. With ``tell_order="ask"`` (default) results are told to the strategy
strictly in ask order, one at a time, and after each tell the window is refilled; candidate
``k`` is thus asked right after candidate ``k - window`` is told, whatever order evaluations
finish in. Evaluations are deterministic for a given recipe (fixed inputs, same device type),
so a run with the same config and seed always produces the same lineage: same ids, genomes,
parents, scores, champions. The price: an evaluator that finishes early idles while the head
of the window is still running. ``tell_order="arrival"`` tells results as they come (no idle
evaluators; lineage depends on timing), and resume is then exact w.r.t. the persisted order:
every ask and tell is stored together with the strategy state it produced (``tell_seq``).
On resume: the strategy is rebuilt from the stored state, stored-but-untold results are told
first, pending candidates are re-submitted under their idempotency keys.

The regression gate and its noise estimate are described in :mod:`evolution._gate`; the
baseline (champion 0) is the config's ``baseline`` recipe or the search's starting recipe,
evaluated ``baseline_repeats`` times. A promoted candidate is materialised with the streaming
``merge(checksum="sha256")`` to ``<home>/evolution/<name>/champions/<n>/`` and its sha256
recorded.
``recheck()`` re-evaluates the champion and the previous good champion (e.g. on new tasks);
if the champion now fails the gate against it, it is rolled back: the previous champion's
checkpoint is verified by sha256 (re-merged from its recipe if damaged), made active again,
and ``hive.events.RollbackExecuted`` is recorded.

Events (``ext.event`` topics): ``evolution.candidate_evaluated``, ``evolution.champion_promoted``,
``evolution.recheck``, ``evolution.round_finished``; plus ``rollback.executed``.

Example:
    >>> sched = EvolutionScheduler.launch(cfg, "demo")                  # doctest: +SKIP
    >>> result = sched.run_round()                                      # doctest: +SKIP
    >>> result.to_pandas(); sched.champion().path                       # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hive
from evolution._champions import ChampionBook, run_dir
from evolution._config import EvolutionConfig
from evolution._dispatch import Dispatcher
from evolution._evaluator import (
    EvaluationRequest,
    EvaluationResult,
    Evaluator,
    default_evaluators,
    default_resources,
)
from evolution._exceptions import EvolutionError
from evolution._gate import mean_and_noise
from evolution._recipe import MergeRecipe
from evolution._result import RoundResult
from evolution._scheduler_launch import create_or_open, open_existing, store_path
from evolution._scheduler_recheck import RecheckReport, recheck
from evolution._scheduler_round import run_search
from evolution._store import ChampionRecord, RunStore
from evolution.tasks import FitnessTask

__all__ = ["EvolutionScheduler", "RecheckReport", "run_dir", "store_path"]


class EvolutionScheduler:
    """Drives one evolution run; build it with :meth:`launch` or :meth:`attach`."""

    def __init__(
        self, name: str, cfg: EvolutionConfig, store: RunStore, client: hive.Client
    ) -> None:
        self.name = name  # run name
        self.cfg = cfg  # the run's config (as stored)
        self.store = store  # its lineage store
        self.client = client  # hive client
        self.home = Path(client.config.home)  # hive home
        meta = store.meta()
        self.run_id = meta["run_id"]  # unique id: idempotency keys, events
        self.window = int(meta["window"])  # untold candidates at most (fixed at creation)
        self.layout = cfg.layout()  # genome <-> recipe
        self.gate = cfg.gate()  # regression gate
        self.dispatcher = Dispatcher(client, self.run_id, cfg.max_attempts)
        self.champions = ChampionBook(name, self.home, store, self.gate, client, self._event)

    # ------------------------------------------------------------------ creation

    @classmethod
    def launch(cls, cfg: EvolutionConfig, name: str, *, home: str | Path | None = None,
               client: hive.Client | None = None) -> EvolutionScheduler:  # fmt: skip
        """Create run ``name`` (or attach to it when it exists with the same config).

        Args:
            cfg: the run's config.
            name: run name (file-name safe); the store is ``<home>/evolution/<name>.db``.
            home: hive home when hive is not initialized yet (default ``$HIVE_HOME``/``.hive``).
            client: a hive client; default ``hive.client()`` (``hive.init(home)`` if needed).

        Returns:
            The scheduler; call :meth:`run_round`.

        Raises:
            RunConfigError: a run of that name exists with another config.
            UnknownNameError, pydantic.ValidationError: invalid config.

        Example:
            >>> sched = EvolutionScheduler.launch(EvolutionConfig.load("run.yaml"), "demo")  # doctest: +SKIP
        """
        return cls(name, *create_or_open(cfg, name, home, client))

    @classmethod
    def attach(cls, name: str, *, home: str | Path | None = None,
               client: hive.Client | None = None) -> EvolutionScheduler:  # fmt: skip
        """Open an existing run (its config comes from the store).

        Raises:
            RunNotFoundError: no run ``name`` in the home.

        Example:
            >>> EvolutionScheduler.attach("demo").resume()                # doctest: +SKIP
        """
        return cls(name, *open_existing(name, home, client))

    # ------------------------------------------------------------------ evaluators

    def ensure_evaluators(self) -> int:
        """Spawn Evaluator agents until ``cfg.evaluators`` (default: per GPU, else 2) are live."""
        want = self.cfg.evaluators or default_evaluators()
        live = [a for a in self.client.agents()
                if a["kind"] == Evaluator.kind and a["state"] not in ("terminated", "failed")]  # fmt: skip
        if len(live) < want:
            resources = self.cfg.evaluator_resources or default_resources()
            self.client.spawn(Evaluator, want - len(live), resources=resources)
        return max(want, len(live))

    def _request(
        self, cid: str, recipe: MergeRecipe, tasks: Sequence[FitnessTask] | None = None
    ) -> EvaluationRequest:
        return EvaluationRequest(
            candidate_id=cid, recipe=recipe, tasks=tuple(tasks or self.cfg.tasks)
        )

    def _submit(
        self, cid: str, recipe: MergeRecipe, tasks: Sequence[FitnessTask] | None = None
    ) -> None:
        task_id = self.dispatcher.submit(self._request(cid, recipe, tasks))
        self.store.set_task(cid, task_id)

    def _record(self, result: EvaluationResult) -> None:
        combined = self.gate.combined(result.scores) if result.status == "ok" else None
        timings = {"merge_seconds": result.merge_seconds, "task_seconds": result.task_seconds,
                   "load_seconds": result.load_seconds}  # fmt: skip
        self.store.record_result(result.candidate_id, result.status, result.scores, combined,
                                 result.error, result.traceback, result.agent_id or None,
                                 result.attempt, timings)  # fmt: skip
        self._event("evolution.candidate_evaluated", candidate=result.candidate_id,
                    status=result.status, scores=result.scores, combined=combined,
                    agent_id=result.agent_id, attempt=result.attempt, error=result.error)  # fmt: skip

    def _event(self, topic: str, **data: Any) -> None:
        self.client.record_event(hive.events.ExtensionEvent(
            topic=topic, data={"run": self.name, "run_id": self.run_id, **data}))  # fmt: skip

    def _evaluate_all(self, rows: Sequence[tuple[str, str, MergeRecipe]],
                      tasks: Sequence[FitnessTask] | None = None) -> dict[str, Any]:  # fmt: skip
        """Evaluate ``(id, kind, recipe)`` rows not yet done (in parallel); returns id -> record."""
        for cid, kind, recipe in rows:
            if self.store.candidate(cid) is None:
                self.store.add_candidate(cid, kind, recipe.to_dict())
            if self.store.candidate(cid).status == "pending":  # type: ignore[union-attr]
                self._submit(cid, recipe, tasks)
        while len(self.dispatcher):
            self._record(self.dispatcher.wait_any())
        return {cid: self.store.candidate(cid) for cid, _, _ in rows}

    # ------------------------------------------------------------------ champions

    def _baseline_recipe(self) -> MergeRecipe:
        return self.cfg.baseline or self.layout.to_recipe(self.layout.from_recipe(None))

    def _ensure_baseline(self) -> None:
        """Evaluate the baseline ``baseline_repeats`` times and make it champion 0 (once)."""
        self.champions.finish_pending()  # killed while writing one
        if self.champions.all():
            return
        recipe = self._baseline_recipe()
        rows = [(f"baseline-{i}", "baseline", recipe) for i in range(self.cfg.baseline_repeats)]
        done = self._evaluate_all(rows)
        ok = [r for r in done.values() if r.status == "ok"]
        if not ok:
            first = next(iter(done.values()))
            raise EvolutionError(
                f"run {self.name!r}: every baseline evaluation failed, so there is nothing to "
                f"protect; first error: {first.error}\n{first.traceback or ''}", name=self.name)  # fmt: skip
        mean, noise = mean_and_noise([r.scores for r in ok])
        champ = self.champions.new("baseline", recipe.to_dict(), mean, noise)
        self.store.add_champion(champ)
        self.champions.materialise(champ)

    # ------------------------------------------------------------------ the search

    def run_round(self, generations: int | None = None, *, progress: bool = True) -> RoundResult:
        """Run the search until the strategy is done (or ``generations`` more generations).

        Evaluates the baseline first (once per run), then hands candidates to free evaluators,
        telling results in the configured order, promoting those that pass the gate. Resumes
        whatever an interrupted call left in flight.

        Args:
            generations: generations to run now; None: up to the config's ``generations``. Going
                past them extends the run.
            progress: show a tqdm bar per generation.

        Returns:
            The :class:`RoundResult` of the whole run so far.

        Raises:
            EvolutionError: every baseline evaluation failed (the error says why).
        """
        self.ensure_evaluators()
        self._ensure_baseline()
        strategy = run_search(self, generations, progress)
        out = self.result()
        self._event("evolution.round_finished", generation=strategy.generation,
                    evaluations=strategy.evaluations,
                    champion=out.champion.n if out.champion else None)  # fmt: skip
        return out

    def resume(self, *, progress: bool = True) -> RoundResult:
        """Continue an interrupted run to its configured end (see the module docstring).

        Example:
            >>> EvolutionScheduler.attach("demo").resume()                # doctest: +SKIP
        """
        return self.run_round(progress=progress)

    # ------------------------------------------------------------------ recheck and rollback

    def recheck(self, tasks: Sequence[FitnessTask | dict[str, Any]] | None = None) -> RecheckReport:
        """Re-evaluate the champion (e.g. on new tasks) and roll back if it now regresses.

        The champion is evaluated once and the previous good champion ``baseline_repeats``
        times (its mean and noise play the baseline); if the champion fails the per-domain
        floors (see :mod:`evolution._gate`), :meth:`rollback` restores the previous one.

        Args:
            tasks: fitness tasks to use (objects or dicts); None: the run's tasks.

        Returns:
            A :class:`RecheckReport`.
        """
        return recheck(self, tasks)

    def champion(self) -> ChampionRecord:
        """The active champion: ``path`` of its checkpoint and its ``sha256``.

        Raises:
            EvolutionError: the run has not evaluated its baseline yet (run a round first).
        """
        return self.champions.current()

    def rollback(self, reason: str = "manual rollback") -> ChampionRecord:
        """Restore the previous good champion: verify its sha256, make it active, log it.

        A checkpoint whose files changed is re-merged from its recipe (merges are
        deterministic) and must then match the recorded sha256.

        Returns:
            The restored champion.

        Raises:
            RollbackError: there is no active champion or no earlier good one.
            ChecksumError: the re-merged checkpoint still does not match its record.
        """
        return self.champions.rollback(reason)

    # ------------------------------------------------------------------ reading

    def result(self) -> RoundResult:
        """The run's lineage so far, from the store."""
        return RoundResult(name=self.name, candidates=tuple(self.store.candidates()),
                           champions=tuple(self.champions.all()),
                           rollbacks=tuple(self.store.rollbacks()),
                           gene_names=self.layout.names)  # fmt: skip

    def status(self) -> dict[str, Any]:
        """Counts by status, strategy progress and the champion, for tables."""
        rows = self.store.candidates("search")
        state = self.store.strategy_state() or {}
        active = [c for c in self.champions.all() if c.status == "active"]
        return {
            "name": self.name, "run_id": self.run_id, "strategy": self.cfg.strategy,
            "generation": state.get("generation", 0), "generations": self.cfg.generations,
            "candidates": len(rows),
            "by_status": {s: sum(r.status == s for r in rows) for s in ("pending", "ok", "failed", "rejected")},
            "champion": None if not active else active[-1].model_dump(include={"n", "candidate_id", "path", "sha256", "combined"}),
            "rollbacks": len(self.store.rollbacks()),
        }  # fmt: skip

"""The Evaluator agent: scores candidates on every fitness task, merging them in place.

One ``Evaluator`` runs per GPU (``resources={"GPU": 1}``) where the cluster has GPUs, else on
CPU slots (``{"CPU": 1}``); the scheduler spawns them through the hive client, so they show up
in ``hive status`` like any agent, are restarted when they die, and a task whose evaluator dies
is re-run on another one (the idempotency key is the candidate's).

Each evaluator keeps one :class:`~evolution._inplace.ResidentModel`: the model is loaded once
and each candidate is merged into its weights in place (no disk write), then scored by each
task in order. The handler ``evolution.evaluate`` takes an :class:`EvaluationRequest` and
always *returns* an :class:`EvaluationResult`:

* ``status="ok"``: ``scores`` holds one finite float per domain (higher is better);
* ``status="rejected"``: the merge produced NaN/inf (``NonFiniteError``): the candidate is
  invalid, not the evaluator;
* ``status="failed"``: a task raised or returned a non-finite score, or the merge failed
  otherwise; ``error`` and ``traceback`` say why. The round goes on.

Only the death of the evaluator process (or a bug outside the candidate) reaches the hive
runtime, which then retries the task elsewhere.

Example:
    >>> client.spawn(Evaluator, 2)                                      # doctest: +SKIP
    >>> request = EvaluationRequest(candidate_id="g0-1", recipe=recipe, tasks=tasks)
    >>> client.submit(EVALUATE, request).result().scores               # doctest: +SKIP
    {'wiki': -4.71}
"""

from __future__ import annotations

import math
import os
import time
import traceback
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny

import hive
from evolution._exceptions import NonFiniteError
from evolution._inplace import ResidentModel
from evolution._recipe import MergeRecipe
from evolution.tasks import FitnessTask

__all__ = [
    "EVALUATE",
    "EvaluationRequest",
    "EvaluationResult",
    "Evaluator",
    "default_evaluators",
    "default_resources",
    "evaluate_request",
]

EVALUATE = "evolution.evaluate"  # task type of the evaluator's handler

Status = Literal["ok", "failed", "rejected"]


class EvaluationRequest(BaseModel):
    """One candidate to score: scheduler -> evaluator (frozen; validated on arrival)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    candidate_id: str  # the strategy's id ("g2-17") or "baseline-0", "recheck-3-1", ...
    recipe: MergeRecipe  # what to merge (absolute paths)
    tasks: tuple[SerializeAsAny[FitnessTask], ...] = Field(min_length=1)  # what to score on


class EvaluationResult(BaseModel):
    """What an evaluator reports for one candidate: evaluator -> scheduler."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    candidate_id: str  # echoes the request
    status: Status  # "ok", "failed" (task error) or "rejected" (NaN/inf merge)
    scores: dict[str, float] = Field(default_factory=dict)  # domain -> score (status "ok")
    error: str | None = None  # "ExcType: message" when not ok
    traceback: str | None = None  # the evaluator-side traceback when not ok
    merge_seconds: float = 0.0  # in-place merge time
    task_seconds: dict[str, float] = Field(default_factory=dict)  # domain -> scoring time
    load_seconds: float = 0.0  # model/input loading this request caused (0 when cached)
    agent_id: str = ""  # evaluator that ran it
    pid: int = 0  # its process id
    attempt: int = 1  # hive attempt number (> 1 after an evaluator died mid-evaluation)


def evaluate_request(request: EvaluationRequest, resident: ResidentModel) -> EvaluationResult:
    """Merge ``request.recipe`` into ``resident`` and score it on every task.

    Args:
        request: the candidate.
        resident: the model to merge into (its caches persist between calls).

    Returns:
        The result; failures are reported in it, never raised (see the module docstring).

    Example:
        >>> evaluate_request(request, ResidentModel("cpu")).status          # doctest: +SKIP
        'ok'
    """
    ctx = hive.current_task()
    common: dict[str, Any] = {
        "candidate_id": request.candidate_id,
        "pid": os.getpid(),
        "agent_id": ctx.agent_id if ctx else "",
        "attempt": ctx.attempt if ctx else 1,
    }
    loaded = resident.load_seconds
    merge_s = 0.0
    spent: dict[str, float] = {}
    try:
        merge_s = resident.apply(request.recipe)
        scores: dict[str, float] = {}
        for task in request.tasks:
            started = time.perf_counter()
            value = task.score(resident.model, resident.tokenizer)
            spent[task.domain] = time.perf_counter() - started
            if not math.isfinite(value):
                raise ValueError(f"task {task.describe()} returned a non-finite score {value}")
            scores[task.domain] = float(value)
    except NonFiniteError as exc:
        return EvaluationResult(status="rejected", error=f"{type(exc).__name__}: {exc}",
                                traceback=traceback.format_exc(), merge_seconds=merge_s,
                                load_seconds=resident.load_seconds - loaded, **common)  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - any task error fails this candidate only
        return EvaluationResult(status="failed", error=f"{type(exc).__name__}: {exc}",
                                traceback=traceback.format_exc(), merge_seconds=merge_s,
                                task_seconds=spent, load_seconds=resident.load_seconds - loaded,
                                **common)  # fmt: skip
    return EvaluationResult(status="ok", scores=scores, merge_seconds=merge_s, task_seconds=spent,
                            load_seconds=resident.load_seconds - loaded, **common)  # fmt: skip


class Evaluator(hive.Agent):
    """A hive agent that keeps a model resident and scores candidates (``evolution.evaluate``).

    Args:
        device: torch device; None: "cuda" when the actor sees a GPU, else "cpu".
        torch_threads: intra-op threads for torch on CPU; None: the CPUs Ray reserved for this
            evaluator (1 by default). N evaluators sharing N cores then use one thread each;
            torch's own default (every core) would make them fight over the cores, and their
            OpenMP spin-waits cost more than the extra threads gain on these small matmuls.

    Example:
        >>> client.spawn(Evaluator, 2, resources={"GPU": 1})              # doctest: +SKIP
    """

    kind = "evaluator"
    resources: ClassVar[dict[str, float]] = {"CPU": 1.0}
    max_concurrency = 1  # one candidate at a time: the resident weights are shared state
    respawn = hive.RespawnPolicy(max_restarts=100, restore_checkpoint=False)

    def __init__(self, device: str | None = None, torch_threads: int | None = None) -> None:
        self.device = device  # torch device, resolved on first use
        self.torch_threads = torch_threads  # torch.set_num_threads on start when set
        self.resident: ResidentModel | None = None  # created on first request

    def on_start(self) -> None:
        """Apply the thread setting (model loading waits for the first request)."""
        import torch

        threads = self.torch_threads or _reserved_cpus()
        if threads:
            torch.set_num_threads(threads)

    @hive.handler(EVALUATE)
    def evaluate(self, payload: EvaluationRequest | dict[str, Any]) -> EvaluationResult:
        """Score one candidate; see :func:`evaluate_request`."""
        request = EvaluationRequest.model_validate(payload)
        if self.resident is None:
            self.resident = ResidentModel(self.device)
        return evaluate_request(request, self.resident)


def _reserved_cpus() -> int | None:
    """Whole CPUs Ray reserved for this actor (None outside Ray or with no CPU reserved)."""
    try:
        import ray

        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 0.0)
    except Exception:  # noqa: BLE001 - not in a Ray worker
        return None
    return max(1, int(cpus)) if cpus else None


def _cluster_gpus() -> int:
    import ray

    try:
        return int(ray.cluster_resources().get("GPU", 0))
    except Exception:  # noqa: BLE001 - not connected: assume none
        return 0


def default_evaluators() -> int:
    """One evaluator per GPU of the cluster, else 2 on CPU."""
    return _cluster_gpus() or 2


def default_resources() -> dict[str, float]:
    """What one evaluator reserves: a GPU (and a CPU) when the cluster has GPUs, else a CPU."""
    return {"GPU": 1.0, "CPU": 1.0} if _cluster_gpus() else {"CPU": 1.0}

"""Hand evaluations to the Evaluator agents and get them back as they finish (wait-any).

``Dispatcher.submit`` submits one ``evolution.evaluate`` hive task per candidate with the
idempotency key ``evolution/<run id>/<candidate id>``: submitting a candidate again — after the
scheduler process was killed and resumed — returns the task already known to the Coordinator
(finished or not) instead of evaluating it twice. ``wait_any`` blocks until one of the
in-flight tasks is final (``ray.wait`` over one Coordinator ``wait`` call per task) and turns
it into an :class:`EvaluationResult`; a task that raised or ran out of attempts (its evaluator
died ``max_attempts`` times) becomes a ``failed`` result carrying the remote traceback, so the
round goes on.

Example:
    >>> d = Dispatcher(client, run_id="3f2a", max_attempts=3)          # doctest: +SKIP
    >>> d.submit("g0-0", request); d.wait_any().status                 # doctest: +SKIP
    'ok'
"""

from __future__ import annotations

from typing import Any

import ray

import hive
from evolution._evaluator import EVALUATE, EvaluationRequest, EvaluationResult

__all__ = ["Dispatcher"]

_POLL_S = 1.0  # ray.wait slice: keeps Ctrl-C responsive in notebooks


class Dispatcher:
    """In-flight evaluations of one run.

    Args:
        client: the hive client.
        run_id: the run's unique id (part of every idempotency key).
        max_attempts: hive attempts per evaluation before it counts as failed.
    """

    def __init__(self, client: hive.Client, run_id: str, max_attempts: int) -> None:
        self.client = client
        self.run_id = run_id
        self.max_attempts = max_attempts
        self._inflight: dict[str, tuple[hive.TaskHandle, Any]] = {}  # cid -> (handle, wait ref)

    def __len__(self) -> int:
        return len(self._inflight)

    def __contains__(self, cid: object) -> bool:
        return cid in self._inflight

    def submit(self, request: EvaluationRequest) -> str:
        """Submit (or re-attach to) the evaluation of ``request.candidate_id``; returns the task id."""
        cid = request.candidate_id
        handle = self.client.submit(
            EVALUATE,
            request,
            max_attempts=self.max_attempts,
            cross_check=False,  # results carry timings; re-running to compare would only cost
            idempotency_key=f"evolution/{self.run_id}/{cid}",
        )
        ref = self.client.coordinator.wait.remote([handle.task_id], None)
        self._inflight[cid] = (handle, ref)
        return handle.task_id

    def wait_any(self) -> EvaluationResult:
        """Block until one in-flight evaluation is final and return it (removed from flight).

        Raises:
            RuntimeError: nothing is in flight.
        """
        if not self._inflight:
            raise RuntimeError("wait_any() with no evaluation in flight")
        by_ref = {ref.hex(): cid for cid, (_, ref) in self._inflight.items()}
        refs = [ref for _, ref in self._inflight.values()]
        while True:
            ready, _ = ray.wait(refs, num_returns=1, timeout=_POLL_S)
            if ready:
                break
        cid = by_ref[ready[0].hex()]
        handle, _ = self._inflight.pop(cid)
        return self._outcome(cid, handle)

    def _outcome(self, cid: str, handle: hive.TaskHandle) -> EvaluationResult:
        try:
            value = handle.result(timeout=60)
            return EvaluationResult.model_validate(value)
        except hive.TaskFailedError as exc:
            tb = getattr(exc, "remote_traceback", "") or ""
            return EvaluationResult(candidate_id=cid, status="failed", error=str(exc), traceback=tb)
        except (hive.TaskDeadLetteredError, hive.TaskCancelledError) as exc:
            return EvaluationResult(candidate_id=cid, status="failed", error=str(exc),
                                    traceback=f"{type(exc).__name__}: {exc}")  # fmt: skip

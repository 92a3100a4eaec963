"""Per-agent reputation: a score in [0, 1] from task outcomes and latency, decaying with time.

Outcome ``i``, recorded at time ``t_i`` (``time.time()`` seconds), has a quality ``q_i`` in [0, 1]
and an initial weight ``w_i0``:

* success:                  ``q_i = (1 - λ) + λ · min(1, ref / latency_i)``,  ``w_i0 = 1``
* failure:                  ``q_i = 0``,                                       ``w_i0 = 1``
* cross-check disagreement: ``q_i = 0``,                                       ``w_i0 = D``

``λ`` is ``latency_weight``, ``D`` is ``disagreement_weight``, ``ref`` is the median latency of
the last ``latency_window`` successes of that task type on *all* agents, taken before the new
latency joins them (failures and disagreements never join). With no ``ref`` yet, or a latency of
0, the factor ``min(1, ref / latency_i)`` is 1: a success at or under the median has ``q = 1``,
one ten times slower has ``q = 1 - 0.9·λ``. Weights halve every ``H`` (``half_life_s``), and the
score blends the evidence with a prior ``p`` whose weight ``w0`` never decays::

    w_i(t)   = w_i0 · 2^(-(t - t_i) / H)
    score(t) = (p · w0 + Σ_i w_i(t) · q_i) / (w0 + Σ_i w_i(t))

A new agent starts at ``p``, evidence pulls it toward the mean quality of its recent outcomes,
and without new evidence it drifts back toward ``p``. Per agent the book keeps ``S = Σ w_i q_i``
and ``W = Σ w_i`` as of its last update ``t_u``; an update at ``t`` multiplies both by
``2^(-(t - t_u) / H)``, then adds ``w_i0 · q_i`` and ``w_i0``: O(1) per update and per query.
A time earlier than ``t_u`` (clock skew between processes) counts as ``t_u``.

Autonomy levels from the score ``s``: RESTRICTED when ``s < cross_check_threshold`` (results are
cross-checked on a second agent), TRUSTED when ``s >= critical_threshold`` (may run tasks marked
critical), STANDARD in between. The book is plain in-process state, not thread-safe.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import deque
from dataclasses import dataclass
from enum import Enum
from typing import Any

from hive._exceptions import ConfigError

__all__ = ["AutonomyLevel", "ReputationBook", "ReputationPolicy"]


def _check(name: str, value: Any, lo: float, hi: float = math.inf, *, lo_open: bool = False,
           integer: bool = False) -> None:
    """Raise ConfigError naming ``name`` unless ``value`` is a finite number in range."""
    types = int if integer else (int, float)
    real = isinstance(value, types) and not isinstance(value, bool) and math.isfinite(value)
    if not (real and (value > lo if lo_open else value >= lo) and value <= hi):
        bound = "" if lo == -math.inf else f" {'>' if lo_open else '>='} {lo}"
        bound += f" and <= {hi}" if hi != math.inf else ""
        what = "an integer" if integer else "a finite number"
        raise ConfigError(f"{name} must be {what}{bound}, got {value!r}", setting=name)


@dataclass(frozen=True)
class ReputationPolicy:
    """How outcomes become a reputation score and an autonomy level (see the module docstring)."""

    half_life_s: float = 600.0  # H: an outcome's weight halves every this many seconds; > 0
    prior: float = 0.7  # p: score with no evidence, and where scores drift back to; [0, 1]
    prior_weight: float = 2.0  # w0: how many fresh outcomes the prior is worth; > 0
    latency_weight: float = 0.2  # λ: share of a success's quality that depends on speed; [0, 1]
    disagreement_weight: float = 2.0  # D: one cross-check disagreement weighs this many failures
    critical_threshold: float = 0.7  # score >= this: TRUSTED, may run tasks marked critical
    cross_check_threshold: float = 0.4  # score < this: RESTRICTED, results cross-checked
    latency_window: int = 256  # successes per task type kept for the reference median; >= 1

    def __post_init__(self) -> None:
        _check("half_life_s", self.half_life_s, 0.0, lo_open=True)
        _check("prior", self.prior, 0.0, 1.0)
        _check("prior_weight", self.prior_weight, 0.0, lo_open=True)
        _check("latency_weight", self.latency_weight, 0.0, 1.0)
        _check("disagreement_weight", self.disagreement_weight, 0.0)
        _check("cross_check_threshold", self.cross_check_threshold, 0.0, 1.0)
        _check("critical_threshold", self.critical_threshold, 0.0, 1.0)
        if self.cross_check_threshold > self.critical_threshold:
            raise ConfigError(f"need cross_check_threshold <= critical_threshold, got "
                              f"{self.cross_check_threshold} > {self.critical_threshold}; lower "
                              "cross_check_threshold", setting="cross_check_threshold")
        _check("latency_window", self.latency_window, 1, integer=True)


class AutonomyLevel(str, Enum):
    """What an agent may do unsupervised, from its reputation score."""

    RESTRICTED = "restricted"  # score < cross_check_threshold: results re-run on a second agent
    STANDARD = "standard"  # in between
    TRUSTED = "trusted"  # score >= critical_threshold: may run tasks marked critical


@dataclass
class _Record:
    """Decayed evidence of one agent as of its last update ``t``."""

    t: float  # time of the last update
    s: float = 0.0  # Σ w_i q_i as of t
    w: float = 0.0  # Σ w_i as of t
    outcomes: int = 0  # successes + failures recorded
    failures: int = 0  # failures recorded
    disagreements: int = 0  # disagreements recorded


def _time(now: float | None) -> float:
    if now is not None:
        _check("now", now, -math.inf)
    return time.time() if now is None else float(now)


class ReputationBook:
    """Reputation of every agent under ``policy`` (default ReputationPolicy()); O(1) per update."""

    def __init__(self, policy: ReputationPolicy | None = None) -> None:
        self.policy = policy if policy is not None else ReputationPolicy()
        self._agents: dict[str, _Record] = {}
        self._latencies: dict[str, deque[float]] = {}  # task type -> recent success latencies

    def _add(self, agent_id: str, now: float, weight: float, quality: float) -> _Record:
        rec = self._agents.setdefault(agent_id, _Record(now))
        if now > rec.t:
            decay = 2.0 ** (-(now - rec.t) / self.policy.half_life_s)
            rec.s, rec.w, rec.t = rec.s * decay, rec.w * decay, now
        rec.s += weight * quality
        rec.w += weight
        return rec

    def record_outcome(self, agent_id: str, task_type: str, ok: bool, latency_s: float,
                       now: float | None = None) -> None:
        """Record that ``agent_id`` finished (``ok``) or failed a task of ``task_type``.

        Args:
            agent_id: the agent that ran the task.
            task_type: its type; successes feed this type's reference (median) latency.
            ok: True for a success, False for a failure.
            latency_s: how long the task took, in seconds.
            now: the outcome's time in ``time.time()`` seconds; default: now.

        Raises:
            ConfigError: ``latency_s`` is negative or not finite, or ``now`` is not finite.

        Example:
            >>> book = ReputationBook()
            >>> book.record_outcome("a1", "echo", ok=True, latency_s=0.2, now=0.0)
            >>> round(book.score("a1", now=0.0), 3)  # (0.7*2 + 1) / (2 + 1)
            0.8
        """
        _check("latency_s", latency_s, 0.0)
        t, quality = _time(now), 0.0
        if ok:
            ref = self.reference_latency(task_type)
            factor = 1.0 if ref is None or latency_s == 0 else min(1.0, ref / latency_s)
            quality = (1.0 - self.policy.latency_weight) + self.policy.latency_weight * factor
            window = self._latencies.setdefault(task_type, deque(maxlen=self.policy.latency_window))
            window.append(float(latency_s))
        rec = self._add(agent_id, t, 1.0, quality)
        rec.outcomes += 1
        rec.failures += 0 if ok else 1

    def record_disagreement(self, agent_id: str, now: float | None = None) -> None:
        """Record that a cross-check disagreed with ``agent_id``'s result (``q = 0``, weight ``D``).

        Args:
            agent_id: the agent whose result did not match the second agent's.
            now: when, in ``time.time()`` seconds; default: now.

        Raises:
            ConfigError: ``now`` is not finite.

        Example:
            >>> book = ReputationBook()
            >>> book.record_disagreement("a1", now=0.0)
            >>> book.score("a1", now=0.0)  # (0.7*2 + 0) / (2 + 2)
            0.35
        """
        rec = self._add(agent_id, _time(now), self.policy.disagreement_weight, 0.0)
        rec.disagreements += 1

    def score(self, agent_id: str, now: float | None = None) -> float:
        """The agent's reputation at ``now`` (default: now), in [0, 1].

        Returns:
            The score of the module docstring; the prior for an unknown agent.

        Example:
            >>> ReputationBook().score("nobody")
            0.7
        """
        rec, p = self._agents.get(agent_id), self.policy
        if rec is None:
            return p.prior
        t = _time(now)
        decay = 2.0 ** (-(t - rec.t) / p.half_life_s) if t > rec.t else 1.0
        value = (p.prior * p.prior_weight + rec.s * decay) / (p.prior_weight + rec.w * decay)
        return min(1.0, max(0.0, value))

    def level(self, agent_id: str, now: float | None = None) -> AutonomyLevel:
        """The agent's autonomy level at ``now`` (default: now), from its score.

        Example:
            >>> ReputationBook().level("a1")  # prior 0.7 >= critical_threshold 0.7
            <AutonomyLevel.TRUSTED: 'trusted'>
        """
        s, p = self.score(agent_id, now), self.policy
        if s >= p.critical_threshold:
            return AutonomyLevel.TRUSTED
        return AutonomyLevel.RESTRICTED if s < p.cross_check_threshold else AutonomyLevel.STANDARD

    def may_run_critical(self, agent_id: str, now: float | None = None) -> bool:
        """True when the agent is TRUSTED at ``now``: it may run tasks marked critical."""
        return self.level(agent_id, now) is AutonomyLevel.TRUSTED

    def needs_cross_check(self, agent_id: str, now: float | None = None) -> bool:
        """True when the agent is RESTRICTED at ``now``: re-run its results on a second agent."""
        return self.level(agent_id, now) is AutonomyLevel.RESTRICTED

    def forget(self, agent_id: str) -> None:
        """Drop the agent's record; its latencies stay in the shared reference windows."""
        self._agents.pop(agent_id, None)

    def snapshot(self, now: float | None = None) -> dict[str, dict[str, Any]]:
        """Per known agent (sorted by id): ``score``, ``level`` (the string value), ``outcomes``
        (successes + failures), ``failures`` and ``disagreements``, at ``now`` (default: now).

        Example:
            >>> book = ReputationBook()
            >>> book.record_outcome("a1", "echo", ok=False, latency_s=1.0, now=0.0)
            >>> book.snapshot(now=0.0)["a1"]["failures"]
            1
        """
        t = _time(now)
        return {aid: {"score": self.score(aid, t), "level": self.level(aid, t).value,
                      "outcomes": rec.outcomes, "failures": rec.failures,
                      "disagreements": rec.disagreements}
                for aid, rec in sorted(self._agents.items())}

    def reference_latency(self, task_type: str) -> float | None:
        """The median latency of recent successes of ``task_type`` on all agents; None if none yet.

        Example:
            >>> book = ReputationBook()
            >>> for lat in (1.0, 3.0, 2.0): book.record_outcome("a1", "echo", True, lat, now=0.0)
            >>> book.reference_latency("echo")
            2.0
        """
        window = self._latencies.get(task_type)
        return float(statistics.median(window)) if window else None

"""Matching one task to one agent: pure logic for the Coordinator's dispatch loop.

An agent is *eligible* for a task when all of these hold:

* its lifecycle state is ``ready`` or ``busy``;
* it declares the task's type among its capabilities;
* every resource the task demands is at most what the agent declared (undeclared counts as 0);
* ``outstanding < max_concurrency`` (it has a free slot);
* it is not in ``exclude`` (e.g. the agent whose result is being cross-checked);
* for a task marked critical, its reputation makes it TRUSTED (``book.may_run_critical``).

Among eligible agents the one with the least reputation-weighted load wins::

    load = (outstanding + 1) / max(score, 0.05)

so work spreads by outstanding tasks, and a better-reputed agent takes more of it. Ties go to
fewer outstanding tasks, then to the smallest agent id, so the choice is deterministic.
"""

from __future__ import annotations

import math
import time
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field

from hive._exceptions import ConfigError
from hive._reputation import ReputationBook

__all__ = ["AgentView", "TaskDemand", "choose_agent", "unmet_reason"]

_MIN_SCORE = 0.05  # floor on the score in the load formula, so a zero score is not a division by 0
_TAKING = ("ready", "busy")  # states in which an agent takes new tasks
_GONE = ("terminated", "failed")  # terminal states: the agent never takes another task


@dataclass(frozen=True)
class AgentView:
    """What the dispatcher knows about one agent at the moment of matching."""

    agent_id: str  # unique id of the agent
    kind: str  # the agent kind (class) it was spawned from
    capabilities: frozenset[str]  # task types it has handlers for
    resources: Mapping[str, float]  # what it declared, e.g. {"CPU": 1, "GPU": 1}
    state: str  # lifecycle state name: spawning, ready, busy, suspended, terminated, failed
    outstanding: int  # tasks in flight on it now
    max_concurrency: int  # most tasks it runs at once


@dataclass(frozen=True)
class TaskDemand:
    """What a task needs from the agent that runs it."""

    task_type: str  # must be among the agent's capabilities
    resources: Mapping[str, float] = field(default_factory=dict)  # e.g. {"GPU": 1}; each >= 0
    critical: bool = False  # only TRUSTED agents (by reputation) may run it

    def __post_init__(self) -> None:
        for name, amount in self.resources.items():
            ok = isinstance(amount, (int, float)) and not isinstance(amount, bool)
            if not (ok and math.isfinite(amount) and amount >= 0):
                raise ConfigError(f"task {self.task_type!r} demands {amount!r} of resource "
                                  f"{name!r}; resource amounts must be finite numbers >= 0",
                                  setting="resources")


def _fits(demand: Mapping[str, float], offer: Mapping[str, float]) -> bool:
    return all(amount <= offer.get(name, 0.0) for name, amount in demand.items())


def choose_agent(demand: TaskDemand, agents: Iterable[AgentView], book: ReputationBook,
                 now: float | None = None, exclude: Collection[str] = ()) -> str | None:
    """Pick the agent to run a task now: eligible, then least reputation-weighted load.

    Args:
        demand: the task's type, resources and criticality.
        agents: the registry's current view of every agent.
        book: reputation scores (for the load weights and the critical gate).
        now: the time to read scores at (``time.time()`` seconds); default: now.
        exclude: agent ids that must not get this task.

    Returns:
        The chosen agent's id, or None when no agent is eligible right now (the task waits).

    Example:
        >>> a = AgentView("a1", "Echo", frozenset({"echo"}), {"CPU": 1}, "ready", 0, 4)
        >>> b = AgentView("b1", "Echo", frozenset({"echo"}), {"CPU": 1}, "busy", 2, 4)
        >>> choose_agent(TaskDemand("echo", {"CPU": 1}), [a, b], ReputationBook())
        'a1'
    """
    t = time.time() if now is None else now
    best: tuple[float, int, str] | None = None
    for agent in agents:
        if (agent.state not in _TAKING or demand.task_type not in agent.capabilities
                or not _fits(demand.resources, agent.resources)
                or agent.outstanding >= agent.max_concurrency or agent.agent_id in exclude):
            continue
        if demand.critical and not book.may_run_critical(agent.agent_id, t):
            continue
        load = (agent.outstanding + 1) / max(book.score(agent.agent_id, t), _MIN_SCORE)
        key = (load, agent.outstanding, agent.agent_id)
        if best is None or key < best:
            best = key
    return None if best is None else best[2]


def _coverage(demand: Mapping[str, float], offer: Mapping[str, float]) -> float:
    """How much of ``demand`` one offer covers: the sum over resources of min(1, offered/needed)."""
    return sum(min(1.0, offer.get(name, 0.0) / amount)
               for name, amount in demand.items() if amount > 0)


def unmet_reason(demand: TaskDemand, agents: Iterable[AgentView], book: ReputationBook,
                 now: float | None = None) -> str | None:
    """Why no agent could *ever* run this task, or None if one could.

    "Ever" ignores what may change: outstanding work, busy or suspended agents, agents still
    spawning, and reputations below the critical threshold now. Terminated and failed agents
    never count. The Coordinator calls this at submit time to fail fast.

    Args:
        demand: the task's type, resources and criticality.
        agents: the registry's current view of every agent.
        book: reputation scores (accepted for symmetry with ``choose_agent``; reputations
            change, so they never make a task unmeetable).
        now: unused for the same reason; accepted for symmetry.

    Returns:
        None, or a message naming what is missing: the task type, or the resources (with the
        closest single agent's offer), or a free slot (``max_concurrency`` < 1).

    Example:
        >>> gpu = AgentView("g1", "Stage", frozenset({"infer"}), {"GPU": 1}, "ready", 0, 1)
        >>> unmet_reason(TaskDemand("infer", {"GPU": 2}), [gpu], ReputationBook())
        "no agent with task type 'infer' has resources {'GPU': 2}; largest offer: {'GPU': 1} \
(agent g1); lower the task's resources or add an agent that declares them"
    """
    del book, now  # reputations change over time: they never make a task unmeetable
    agents = list(agents)
    live = [a for a in agents if a.state not in _GONE]
    capable = [a for a in live if demand.task_type in a.capabilities]
    task = repr(demand.task_type)
    if not capable:
        known = ", ".join(sorted(set().union(*(a.capabilities for a in live)))) or "none"
        gone = sum(1 for a in agents if a.state in _GONE and demand.task_type in a.capabilities)
        note = f"; {gone} agent(s) that declared it are terminated or failed" if gone else ""
        return (f"no agent declares task type {task} (known: {known}){note}; register an agent "
                "kind with a handler for it or fix the task type")
    fitting = [a for a in capable if _fits(demand.resources, a.resources)]
    if not fitting:
        closest = min(capable,
                      key=lambda a: (-_coverage(demand.resources, a.resources), a.agent_id))
        offer = {name: closest.resources.get(name, 0) for name in demand.resources}
        return (f"no agent with task type {task} has resources {dict(demand.resources)}; largest "
                f"offer: {offer} (agent {closest.agent_id}); lower the task's resources or add "
                "an agent that declares them")
    if all(a.max_concurrency < 1 for a in fitting):
        ids = ", ".join(sorted(a.agent_id for a in fitting))
        return (f"every agent that could run task type {task} ({ids}) has max_concurrency < 1; "
                "give one a max_concurrency >= 1")
    return None

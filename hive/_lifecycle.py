"""The agent lifecycle state machine.

::

    spawning ──► ready ◄──► busy
                  │  ▲        │
                  ▼  │        ▼
                 suspended ◄──┘
    any live state ──► terminated | failed     (terminal: no way out)

``busy`` means at least one task is running; ``suspended`` takes no new tasks (running ones
finish) until resumed.
"""

from __future__ import annotations

from enum import Enum

from hive._exceptions import IllegalTransitionError

__all__ = ["AgentState", "check_transition"]


class AgentState(str, Enum):
    """Lifecycle states of an agent."""

    SPAWNING = "spawning"
    READY = "ready"
    BUSY = "busy"
    SUSPENDED = "suspended"
    TERMINATED = "terminated"
    FAILED = "failed"

    @property
    def terminal(self) -> bool:
        """True for terminated and failed."""
        return self in (AgentState.TERMINATED, AgentState.FAILED)

    @property
    def live(self) -> bool:
        """True when the agent may take tasks (ready or busy)."""
        return self in (AgentState.READY, AgentState.BUSY)


_S = AgentState
_ALLOWED: dict[AgentState, frozenset[AgentState]] = {
    _S.SPAWNING: frozenset({_S.READY, _S.TERMINATED, _S.FAILED}),
    _S.READY: frozenset({_S.BUSY, _S.SUSPENDED, _S.TERMINATED, _S.FAILED}),
    _S.BUSY: frozenset({_S.READY, _S.SUSPENDED, _S.TERMINATED, _S.FAILED}),
    _S.SUSPENDED: frozenset({_S.READY, _S.TERMINATED, _S.FAILED}),
    _S.TERMINATED: frozenset(),
    _S.FAILED: frozenset(),
}


def check_transition(agent_id: str, current: AgentState | str, target: AgentState | str) -> AgentState:
    """Validate a lifecycle transition.

    Args:
        agent_id: the agent, named in the error.
        current: its state now.
        target: the state asked for.

    Returns:
        ``target`` as an AgentState.

    Raises:
        IllegalTransitionError: the state machine forbids ``current -> target``.

    Example:
        >>> check_transition("a1", "ready", "busy")
        <AgentState.BUSY: 'busy'>
    """
    cur, tgt = AgentState(current), AgentState(target)
    if tgt not in _ALLOWED[cur]:
        raise IllegalTransitionError(agent_id, cur.value, tgt.value)
    return tgt

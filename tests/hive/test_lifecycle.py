"""The agent lifecycle state machine and the Agent class surface (no Ray needed)."""

from __future__ import annotations

import itertools

import pytest

import hive
from hive._lifecycle import AgentState, check_transition
from hive.testing import EchoAgent, LiarAgent

LEGAL = {
    ("spawning", "ready"), ("spawning", "terminated"), ("spawning", "failed"),
    ("ready", "busy"), ("ready", "suspended"), ("ready", "terminated"), ("ready", "failed"),
    ("busy", "ready"), ("busy", "suspended"), ("busy", "terminated"), ("busy", "failed"),
    ("suspended", "ready"), ("suspended", "terminated"), ("suspended", "failed"),
}


@pytest.mark.parametrize("cur,tgt", list(itertools.product([s.value for s in AgentState], repeat=2)))
def test_every_transition(cur: str, tgt: str) -> None:
    if (cur, tgt) in LEGAL:
        assert check_transition("a1", cur, tgt) is AgentState(tgt)
    else:
        with pytest.raises(hive.IllegalTransitionError) as info:
            check_transition("a1", cur, tgt)
        assert info.value.agent_id == "a1" and f"{cur} -> {tgt}" in str(info.value)


def test_terminal_states_have_no_exit() -> None:
    assert AgentState.TERMINATED.terminal and AgentState.FAILED.terminal
    assert not AgentState.READY.terminal and AgentState.BUSY.live and not AgentState.SUSPENDED.live


def test_capabilities_from_handlers_and_inheritance() -> None:
    assert {"echo", "add", "fail", "sleep", "noop", "crash", "whoami"} == EchoAgent.capabilities()
    assert LiarAgent.capabilities() == frozenset({"add"})
    assert EchoAgent.kind == "echo"

    class Plain(hive.Agent):
        @hive.handler("x")
        def x(self, payload: object) -> object:
            return payload

    assert Plain.kind == "Plain" and Plain.capabilities() == {"x"}


def test_handler_rejects_empty_type() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        hive.handler("")

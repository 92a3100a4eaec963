"""Agents for tests, demos and benchmarks (importable in every Ray worker).

Like ``trio.testing``: small, real agents that exercise the runtime, shipped in the package
so tests of the layers above do not each define their own.
"""

from __future__ import annotations

import os
import time
from typing import Any

from hive._agent import Agent, RespawnPolicy
from hive._tasks import current_task, handler

__all__ = ["EchoAgent", "FlakyAgent", "LiarAgent", "ResilientAgent", "SlowAgent"]


class EchoAgent(Agent):
    """Echoes payloads; also adds, fails on request, sleeps, and reports where it ran."""

    kind = "echo"
    max_concurrency = 4

    def __init__(self) -> None:
        self.seen = 0  # tasks handled since the last restore

    @handler("noop")
    def noop(self, payload: Any) -> None:
        return None

    @handler("echo")
    def echo(self, payload: Any) -> Any:
        self.seen += 1
        return payload

    @handler("add")
    def add(self, payload: tuple[float, float]) -> float:
        return payload[0] + payload[1]

    @handler("fail")
    def fail(self, payload: Any) -> None:
        raise ValueError(f"asked to fail: {payload!r}")

    @handler("sleep")
    def sleep(self, payload: float) -> dict[str, Any]:
        time.sleep(float(payload))
        ctx = current_task()
        return {"pid": os.getpid(), "agent_id": self.agent_id,
                "attempt": ctx.attempt if ctx else None, "key": ctx.idempotency_key if ctx else None}

    @handler("crash")
    def crash(self, payload: Any) -> None:
        os._exit(1)  # the actor process dies mid-task, as on a segfault or OOM kill

    @handler("whoami")
    def whoami(self, payload: Any) -> dict[str, Any]:
        return {"pid": os.getpid(), "agent_id": self.agent_id}

    def checkpoint(self) -> Any:
        return {"seen": self.seen}

    def restore(self, state: Any) -> None:
        self.seen = state["seen"]


class SlowAgent(EchoAgent):
    """An EchoAgent kind that runs one task at a time (for fault tests)."""

    kind = "slow"
    max_concurrency = 1


class ResilientAgent(SlowAgent):
    """A SlowAgent kind restarted as often as it dies (for kill-trial tests and benchmarks)."""

    kind = "resilient"
    respawn = RespawnPolicy(max_restarts=1_000_000)


class FlakyAgent(EchoAgent):
    """An EchoAgent that is never restarted (respawn policy: 0 restarts)."""

    kind = "flaky"
    respawn = RespawnPolicy(max_restarts=0)


class LiarAgent(Agent):
    """Returns wrong answers to ``add``: what cross-checking exists to catch."""

    kind = "liar"

    @handler("add")
    def add(self, payload: tuple[float, float]) -> float:
        return payload[0] + payload[1] + 1

"""Slow suite: 100 SIGKILLs of the agent running a task; every task completes, none is lost."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

import hive
from hive.testing import ResilientAgent
from tests.factories import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TRIALS = int(os.environ.get("HIVE_KILL_TRIALS", "100"))


def test_sigkill_trials_lose_nothing(ray_local: Any, hive_home: Path) -> None:
    client = hive.init(home=hive_home, heartbeat_interval_s=0.2, heartbeat_timeout_s=2.0)
    try:
        client.spawn(ResilientAgent, count=2)  # restarted however often it is killed
        recoveries, lost = [], []
        for trial in range(TRIALS):
            handle = client.submit("sleep", 0.2)
            wait_until(lambda: handle.info()["status"] == "running", 30)
            aid = handle.info()["agent_id"]
            pid = next(a["pid"] for a in client.agents() if a["agent_id"] == aid)
            t0 = time.perf_counter()
            os.kill(pid, signal.SIGKILL)
            try:
                out = handle.result(timeout=30)
                recoveries.append(time.perf_counter() - t0)
                assert out["attempt"] >= 2 and out["key"] == handle.task_id
            except hive.HiveError as exc:
                lost.append((trial, repr(exc)))
            wait_until(lambda: all(a["state"] in ("ready", "busy") for a in client.agents()), 60,
                       message=f"agents not back after trial {trial}")
        recoveries.sort()
        assert not lost, lost
        assert recoveries[-1] <= 10.0, f"slowest recovery {recoveries[-1]:.2f}s"
        completed = client.events(types="task.completed", limit=None)
        assert len({e.task_id for e in completed}) == len(completed) == TRIALS  # none completed twice
    finally:
        hive.shutdown(stop_cluster=True)

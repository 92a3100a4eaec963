"""The Coordinator end to end on a real local Ray: matching, faults, recovery, reputation."""

from __future__ import annotations

import os
import pickle
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any
from collections.abc import Iterator

import pytest
import ray

import hive
from hive.testing import EchoAgent, FlakyAgent, LiarAgent, SlowAgent
from tests.factories import wait_until

FAST_HB = {"heartbeat_interval_s": 0.2, "heartbeat_timeout_s": 2.0}


@pytest.fixture
def make_client(ray_local: Any, hive_home: Path) -> Iterator[Any]:
    """hive.init on the shared local Ray with per-test settings; always shut down after."""

    def make(**settings: Any) -> hive.Client:
        return hive.init(home=hive_home, **{**FAST_HB, **settings})

    yield make
    hive.shutdown(stop_cluster=True)


def _running(handle: hive.TaskHandle, timeout_s: float = 30) -> dict[str, Any]:
    wait_until(lambda: handle.info()["status"] == "running", timeout_s, message=f"{handle} never started")
    return handle.info()


def _pid(client: hive.Client, agent_id: str) -> int:
    return next(a["pid"] for a in client.agents() if a["agent_id"] == agent_id)


def _all_ready(client: hive.Client, n: int) -> bool:
    agents = [a for a in client.agents() if a["state"] not in ("terminated",)]
    return len(agents) == n and all(a["state"] in ("ready", "busy") for a in agents)


def test_results_and_load_balancing(make_client: Any) -> None:
    client = make_client()
    ids = client.spawn(EchoAgent, count=2)
    assert client.submit("echo", {"x": [1, 2]}).result(timeout=30) == {"x": [1, 2]}
    handles = client.submit_many("sleep", [0.05] * 16)
    ran_on = Counter(v["agent_id"] for v in client.gather(handles, timeout=60))
    assert set(ran_on) == set(ids), f"load not spread over both agents: {ran_on}"
    assert client.status()["tasks"]["completed"] == 17


def test_unknown_task_type_lists_known_ones(make_client: Any) -> None:
    client = make_client()
    client.spawn(EchoAgent)
    with pytest.raises(hive.UnknownTaskTypeError, match=r"no agent handles it.*'echo'"):
        client.submit("echoo", 1)


def test_resources_no_agent_offers(make_client: Any) -> None:
    client = make_client()
    client.spawn(EchoAgent)
    with pytest.raises(hive.UnsatisfiableTaskError, match="GPU"):
        client.submit("echo", 1, resources={"GPU": 1})


def test_unserializable_payload(make_client: Any) -> None:
    client = make_client()
    client.spawn(EchoAgent)
    with pytest.raises(hive.PayloadNotSerializableError, match="cannot be serialized") as info:
        client.submit("echo", threading.Lock())
    assert info.value.payload_type == "lock"


def test_task_that_raises_reaches_caller_with_traceback(make_client: Any) -> None:
    client = make_client()
    client.spawn(EchoAgent)
    with pytest.raises(hive.TaskFailedError) as info:
        client.submit("fail", "boom").result(timeout=30)
    text = str(info.value)
    assert "ValueError: asked to fail: 'boom'" in text
    assert "in fail" in text and "Remote traceback" in text  # the agent-side frames
    assert isinstance(info.value.__cause__, ValueError)
    assert pickle.loads(pickle.dumps(info.value)).remote_traceback == info.value.remote_traceback


def test_sigkill_mid_task_completes_elsewhere_once(make_client: Any) -> None:
    client = make_client()
    client.spawn(SlowAgent, count=2)
    handle = client.submit("sleep", 1.0)
    info = _running(handle)
    victim = info["agent_id"]
    os.kill(_pid(client, victim), signal.SIGKILL)
    out = handle.result(timeout=30)
    assert out["attempt"] == 2 and out["key"] == handle.task_id
    final = handle.info()
    assert final["status"] == "completed" and final["attempt"] == 2
    assert "actor died" in final["causes"][0] and victim in final["causes"][0]
    events = client.events(task_id=handle.task_id)
    kinds = [e.type for e in events]
    assert kinds.count("task.completed") == 1, kinds
    started = [e for e in events if e.type == "task.started"]
    assert [e.attempt for e in started] == [1, 2]
    assert {e.idempotency_key for e in started} == {handle.task_id}
    # the killed agent is failed, restarted and ready again under the same id
    wait_until(lambda: _all_ready(client, 2), 60, message="killed agent not respawned")
    assert {e.type for e in client.events(agent_id=victim)} >= {"agent.failed", "agent.restarted", "agent.ready"}


def test_hung_agent_missed_heartbeats(make_client: Any) -> None:
    client = make_client()
    client.spawn(SlowAgent, count=2)
    handle = client.submit("sleep", 0.5)
    info = _running(handle)
    pid = _pid(client, info["agent_id"])
    os.kill(pid, signal.SIGSTOP)  # hung: alive to Ray, silent to hive
    try:
        out = handle.result(timeout=30)
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert out["agent_id"] != info["agent_id"] or out["attempt"] == 2
    missed = client.events(types="agent.heartbeat_missed", agent_id=info["agent_id"])
    assert missed and missed[0].silent_for_s >= 2.0


def test_dead_letter_after_max_attempts(make_client: Any) -> None:
    client = make_client()
    client.spawn(EchoAgent, count=2)
    handle = client.submit("crash", None, max_attempts=2)
    with pytest.raises(hive.TaskDeadLetteredError) as info:
        handle.result(timeout=60)
    assert len(info.value.causes) == 2 and all("actor died" in c for c in info.value.causes)
    assert [e.type for e in client.events(task_id=handle.task_id)].count("task.dead_lettered") == 1


def test_no_respawn_policy_keeps_agent_failed(make_client: Any) -> None:
    client = make_client()
    [aid] = client.spawn(FlakyAgent)
    client.spawn(EchoAgent)
    os.kill(_pid(client, aid), signal.SIGKILL)
    wait_until(lambda: next(a for a in client.agents() if a["agent_id"] == aid)["state"] == "failed", 30)
    time.sleep(1.0)
    assert next(a for a in client.agents() if a["agent_id"] == aid)["restarts"] == 0


def test_full_queue_backpressure(make_client: Any) -> None:
    client = make_client(max_queue=5)
    [aid] = client.spawn(SlowAgent)
    client.suspend(aid)  # nothing drains the queue
    client.submit_many("echo", range(5))
    with pytest.raises(hive.QueueFullError, match="max_queue") as info:
        client.submit("echo", 99)
    assert info.value.queued == 5
    client.resume(aid)
    wait_until(lambda: client.status()["queued"] == 0, 30)
    client.submit("echo", 100).result(timeout=30)  # room again


def test_idempotency_key_dedupes_submissions(make_client: Any) -> None:
    client = make_client()
    client.spawn(EchoAgent)
    a = client.submit("echo", 1, idempotency_key="order-42")
    b = client.submit("echo", 2, idempotency_key="order-42")
    assert a.task_id == b.task_id and b.result(timeout=30) == 1


def test_cancel_queued_task(make_client: Any) -> None:
    client = make_client()
    [aid] = client.spawn(SlowAgent)
    client.suspend(aid)
    handle = client.submit("echo", 1)
    assert handle.cancel() is True
    with pytest.raises(hive.TaskCancelledError):
        handle.result(timeout=10)
    assert handle.cancel() is False


def test_lifecycle_suspend_resume_terminate_and_illegal(make_client: Any) -> None:
    client = make_client()
    [aid] = client.spawn(EchoAgent)
    client.submit("echo", 1).result(timeout=30)
    assert client.suspend(aid) == "suspended"
    handle = client.submit("echo", 2)
    time.sleep(0.5)
    assert handle.status() is hive.TaskStatus.QUEUED  # a suspended agent takes nothing
    with pytest.raises(hive.IllegalTransitionError, match="suspended -> suspended"):
        client.suspend(aid)
    client.resume(aid)
    assert handle.result(timeout=30) == 2
    ckpt = client.checkpoint(aid)
    assert ckpt is not None and Path(ckpt["path"]).exists()
    client.terminate(aid)
    types = [e.type for e in client.events(agent_id=aid)]
    for expected in ("agent.spawned", "agent.ready", "agent.suspended", "agent.resumed",
                     "checkpoint.created", "agent.terminated", "resource.allocated", "resource.released"):
        assert expected in types, (expected, types)
    with pytest.raises(hive.AgentNotFoundError):
        client.resume(aid)


def test_respawned_agent_restores_checkpoint(make_client: Any) -> None:
    client = make_client()
    [aid] = client.spawn(SlowAgent)
    for i in range(3):
        client.submit("echo", i).result(timeout=30)
    client.checkpoint(aid)  # state {"seen": 3}
    os.kill(_pid(client, aid), signal.SIGKILL)  # idle: found by missed heartbeats
    wait_until(lambda: client.agents()[0]["restarts"] == 1 and _all_ready(client, 1), 60)
    ready = client.events(types="agent.ready", agent_id=aid)
    assert ready[-1].restored_from is not None


def test_coordinator_restart_rebuilds_registry_and_queue(make_client: Any) -> None:
    client = make_client()
    ids = client.spawn(SlowAgent, count=2)
    for aid in ids:
        client.suspend(aid)
    pending = client.submit_many("echo", range(5))
    ray.kill(client.coordinator, no_restart=False)  # crash it; Ray restarts the actor
    # the restarted Coordinator replays the EventLog: same agents, same queued tasks
    wait_until(lambda: _try(client.status) is not None, 60, message="coordinator did not come back")
    assert sorted(a["agent_id"] for a in client.agents()) == sorted(ids)
    assert client.status()["queued"] == 5
    assert client.events(types="coordinator.started")[-1].pending_tasks == 5
    for aid in ids:
        client.resume(aid)
    assert client.gather(pending, timeout=60) == list(range(5))


def _try(fn: Any) -> Any:
    try:
        return fn()
    except Exception:
        return None


def test_critical_tasks_only_on_trusted_agents(make_client: Any) -> None:
    client = make_client(critical_threshold=0.9, cross_check_threshold=0.0)
    [veteran] = client.spawn(EchoAgent)
    client.gather(client.submit_many("whoami", range(40)), timeout=60)  # earn reputation
    [newcomer] = client.spawn(EchoAgent)
    scores = {a["agent_id"]: a["reputation"] for a in client.agents()}
    assert scores[veteran] >= 0.9 > scores[newcomer]
    handles = [client.submit("sleep", 0.05, critical=True) for _ in range(6)]
    assert {v["agent_id"] for v in client.gather(handles, timeout=60)} == {veteran}


def test_cross_check_catches_a_liar(make_client: Any) -> None:
    # every new agent starts below the cross-check threshold, so every result is re-run
    client = make_client(critical_threshold=0.95, cross_check_threshold=0.9)
    client.spawn(EchoAgent, count=2)
    [liar] = client.spawn(LiarAgent)
    # a deep queue fills every free slot, the liar's included
    values = client.gather(client.submit_many("add", [(i, 1) for i in range(30)]), timeout=120)
    assert values == [i + 1 for i in range(30)]  # the liar's wrong sums never reach the caller
    checks = client.events(types="task.cross_checked")
    outvoted = Counter(e.outvoted for e in checks if not e.agreed)
    assert outvoted and set(outvoted) == {liar}, outvoted
    scores = {a["agent_id"]: a["reputation"] for a in client.agents()}
    assert scores[liar] == min(scores.values())


def test_locked_event_db_fails_admission_then_recovers(make_client: Any, hive_home: Path) -> None:
    client = make_client(event_busy_timeout_s=0.3)
    client.spawn(EchoAgent)
    holder = subprocess.Popen(
        [sys.executable, "-c", (
            "import sqlite3, sys, time; c = sqlite3.connect(sys.argv[1], isolation_level=None); "
            "c.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); time.sleep(3)"),
         str(hive_home / "events.db")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(hive.EventLogLockedError, match="events.db"):
            client.submit("echo", 1)
    finally:
        holder.wait(timeout=30)
    assert client.submit("echo", 2).result(timeout=30) == 2
    assert client.status()["degraded"] is None


def test_corrupt_event_db_refused(ray_local: Any, hive_home: Path) -> None:
    db = hive_home / "events.db"
    db.write_bytes(os.urandom(8192))
    before = db.read_bytes()
    with pytest.raises(hive.EventLogCorruptError, match="events.db"):
        hive.init(home=hive_home)
    assert db.read_bytes() == before  # never overwritten
    assert not hive.is_initialized()


def test_not_initialized_and_bad_setting(ray_local: Any, hive_home: Path) -> None:
    with pytest.raises(hive.NotInitializedError, match=r"hive.init\(\)"):
        hive.client()
    with pytest.raises(hive.ConfigError, match="max_queue"):
        hive.init(home=hive_home, max_queue=0)
    with pytest.raises(hive.ConfigError, match="unknown hive setting"):
        hive.init(home=hive_home, max_queu=3)
    assert sqlite3.connect(":memory:")  # the process is still fine

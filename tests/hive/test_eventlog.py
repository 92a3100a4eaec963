"""Tests of the durable EventLog: ordering, queries, tailing, SIGKILL, corruption, locking."""

from __future__ import annotations

import os
import pickle
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from hive._eventlog import EventLog
from hive._events import (
    AgentReady,
    AgentSpawned,
    AgentSuspended,
    TaskCompleted,
    TaskSubmitted,
)
from hive._exceptions import (
    ConfigError,
    EventDecodeError,
    EventLogCorruptError,
    EventLogError,
    EventLogLockedError,
)

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def payload(i: int) -> bytes:
    """Deterministic bytes covering every byte value (so base64 round-trips are exercised)."""
    return bytes((i + k) % 256 for k in range(300))


def submitted(i: int, agent: str = "a0", ts: float | None = None) -> TaskSubmitted:
    return TaskSubmitted(task_id=f"t{i}", agent_id=agent, task_type="echo",
                         idempotency_key=f"k{i}", payload=payload(i),
                         ts=1000.0 + i if ts is None else ts)


@pytest.fixture
def log(tmp_path: Path):
    with EventLog(tmp_path / "home" / "events.db") as ev_log:
        yield ev_log


def run_script(code: str, *args: str, stdin: int | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=REPO, env=ENV, text=True,
                            stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


# ---- appending and querying ----------------------------------------------------------------


def test_append_assigns_increasing_seqs_and_returns_copies(log: EventLog) -> None:
    first = AgentReady(agent_id="a1")
    stored = log.append(first)
    assert stored.seq == 1 and first.seq is None  # a copy; the frozen original is unchanged
    assert stored.model_copy(update={"seq": None}) == first
    batch = log.append_many([submitted(i) for i in range(5)])
    assert [e.seq for e in batch] == [2, 3, 4, 5, 6]
    assert [e.task_id for e in batch] == [f"t{i}" for i in range(5)]
    assert log.append_many([]) == []
    assert log.last_seq() == 6 and log.count() == 6
    assert log.path == (log.path.parent / "events.db") and log.path.is_file()


def test_query_filters(log: EventLog) -> None:
    log.append_many([submitted(i, agent=f"a{i % 3}", ts=100.0 + i) for i in range(30)])
    log.append_many([AgentReady(agent_id="a1", ts=200.0), AgentSuspended(agent_id="a2", ts=201.0)])

    assert [e.seq for e in log.query()] == list(range(1, 33))
    assert [e.type for e in log.query(types="agent.ready")] == ["agent.ready"]
    assert {e.type for e in log.query(types=["agent.ready", "agent.suspended"])} == {
        "agent.ready", "agent.suspended"}
    assert log.query(types=[]) == []
    a1 = log.query(agent_id="a1")
    assert len(a1) == 11 and all(e.agent_id == "a1" for e in a1)
    (t7,) = log.query(task_id="t7")
    assert t7.payload == payload(7)  # type: ignore[attr-defined]
    assert [e.ts for e in log.query(since=110.0, until=113.0)] == [110.0, 111.0, 112.0]
    assert [e.seq for e in log.query(after_seq=29)] == [30, 31, 32]
    assert [e.seq for e in log.query(limit=3)] == [1, 2, 3]
    assert [e.seq for e in log.query(descending=True, limit=2)] == [32, 31]
    both = log.query(types="task.submitted", agent_id="a2", since=105.0, after_seq=10, limit=2)
    assert [e.task_id for e in both] == ["t11", "t14"]
    assert log.count() == 32 and log.count("task.submitted") == 30
    assert log.count(["agent.ready", "agent.suspended"]) == 2 and log.count([]) == 0


def test_iter_events_streams_past_the_batch_size(log: EventLog) -> None:
    log.append_many([AgentReady(agent_id=f"a{i}") for i in range(1203)])
    assert [e.seq for e in log.iter_events(batch=100)] == list(range(1, 1204))
    assert [e.seq for e in log.iter_events(after_seq=1200, batch=3)] == [1201, 1202, 1203]
    assert [e.agent_id for e in log.iter_events(after_seq=1100, batch=50)][:2] == ["a1100", "a1101"]
    assert list(log.iter_events(after_seq=1203)) == []


def test_reopen_keeps_everything_and_bodies_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    events = [
        submitted(1),
        AgentSpawned(agent_id="a1", kind="Echo", actor_name="hive-a1", capabilities=["echo"],
                     resources={"CPU": 1.0, "GPU": 0.5}, spec=b"\x00\x80\xffspec"),
        TaskCompleted(task_id="t1", agent_id="a1", attempt=1, idempotency_key="k1",
                      result=bytes(range(256)), latency_s=0.25),
    ]
    with EventLog(path) as log:
        stored = [log.append(events[0]), *log.append_many(events[1:])]
    with EventLog(path) as log:
        back = log.query()
        log.append(AgentReady(agent_id="a1"))
        assert log.last_seq() == 4
    assert back == stored
    assert [e.model_copy(update={"seq": None}) for e in back] == events
    assert back[2].result == bytes(range(256))  # type: ignore[attr-defined]


def test_threads_appending_concurrently_get_unique_seqs(log: EventLog) -> None:
    def work(t: int) -> None:
        for i in range(50):
            log.append(AgentReady(agent_id=f"w{t}-{i}"))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    events = log.query()
    assert [e.seq for e in events] == list(range(1, 201))
    assert len({e.agent_id for e in events}) == 200


def test_bad_arguments_and_unregistered_events_are_refused(log: EventLog, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="durability"):
        EventLog(tmp_path / "x.db", durability="fast")

    class Custom(AgentReady):
        pass

    log.append(AgentReady())
    with pytest.raises(EventLogError, match="not a registered hive event"):
        log.append_many([AgentReady(), Custom()])  # type: ignore[list-item]
    assert log.count() == 1  # the batch is all or nothing
    log.close()
    log.close()
    with pytest.raises(EventLogError, match="closed"):
        log.append(AgentReady())


# ---- follow ------------------------------------------------------------------------------


def test_follow_yields_existing_then_new_events_from_another_thread(log: EventLog) -> None:
    log.append_many([submitted(i) for i in range(5)])

    def writer() -> None:
        for i in range(5, 65, 4):
            log.append_many([submitted(j) for j in range(i, i + 4)])
            time.sleep(0.01)

    got = []
    thread = threading.Thread(target=writer)
    thread.start()
    for ev in log.follow(after_seq=0, poll_s=0.01, timeout_s=20):
        got.append(ev)
        if len(got) == 65:
            break
    thread.join()
    assert [e.seq for e in got] == list(range(1, 66))
    assert [e.task_id for e in got] == [f"t{i}" for i in range(65)]


def test_follow_starts_at_the_end_filters_types_and_stops(log: EventLog) -> None:
    log.append_many([AgentReady(agent_id="old"), submitted(0)])
    stop = threading.Event()
    tail = log.follow(types="agent.ready", poll_s=0.01, stop=stop)  # starts at seq 2, now
    log.append_many([submitted(1), AgentReady(agent_id="new"), AgentSuspended(agent_id="new")])
    threading.Timer(0.3, stop.set).start()
    start = time.monotonic()
    got = list(tail)
    assert [(e.seq, e.agent_id) for e in got] == [(4, "new")]
    assert time.monotonic() - start < 2.0


def test_follow_timeout_ends_iteration(log: EventLog) -> None:
    start = time.monotonic()
    assert list(log.follow(after_seq=0, poll_s=0.05, timeout_s=0.3)) == []
    assert 0.25 <= time.monotonic() - start < 2.0


# ---- durability under SIGKILL --------------------------------------------------------------

WRITER = """
import sys
from hive._eventlog import EventLog
from hive._events import TaskSubmitted
log = EventLog(sys.argv[1], durability=sys.argv[2])
i = 0
while True:
    batch = [TaskSubmitted(task_id=f"t{j}", task_type="echo", idempotency_key=f"k{j}",
                           payload=bytes((j + k) % 256 for k in range(300)))
             for j in range(i, i + (1 if i % 2 else 3))]
    for ev in log.append_many(batch):  # acknowledged: print only once append returned
        print(ev.seq, ev.task_id, flush=True)
    i += len(batch)
"""


def read_acks(proc: subprocess.Popen[str], want: int) -> list[tuple[int, str]]:
    """Read ``want`` acknowledgement lines, SIGKILL the writer, then collect the rest."""
    killer = threading.Timer(60, proc.kill)  # a stuck writer fails the test, not the run
    killer.start()
    acks: list[tuple[int, str]] = []
    try:
        assert proc.stdout is not None
        while len(acks) < want:
            line = proc.stdout.readline()
            assert line, f"writer exited early: {proc.stderr.read() if proc.stderr else ''}"
            seq, task_id = line.split()
            acks.append((int(seq), task_id))
        os.kill(proc.pid, signal.SIGKILL)
        rest = proc.stdout.read()  # this reader's buffer holds acks too: not communicate()
        proc.wait(timeout=30)
    finally:
        killer.cancel()
    assert proc.returncode == -signal.SIGKILL
    acks += [(int(s), t) for s, t in (ln.split() for ln in rest.splitlines(keepends=True)
                                       if ln.endswith("\n"))]
    return acks


@pytest.mark.parametrize("durability", ["normal", "full"])
def test_every_acknowledged_event_survives_sigkill(tmp_path: Path, durability: str) -> None:
    path = tmp_path / "events.db"
    acks = read_acks(run_script(WRITER, str(path), durability), want=200)
    assert len(acks) >= 200
    with EventLog(path, durability=durability) as log:
        log.check()
        stored = {int(e.seq or 0): e for e in log.iter_events(batch=64)}
        for seq, task_id in acks:
            ev = stored[seq]
            assert ev.task_id == task_id
            assert ev.payload == payload(int(task_id[1:]))  # type: ignore[attr-defined]
        assert sorted(stored) == list(range(1, log.last_seq() + 1))
        assert log.append(AgentReady()).seq == max(stored) + 1  # still writable after the kill


def test_follow_sees_appends_from_another_process(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    EventLog(path).close()
    proc = run_script(WRITER, str(path), "normal")
    try:
        with EventLog(path, readonly=True) as log:
            got = []
            for ev in log.follow(after_seq=0, poll_s=0.01, timeout_s=30):
                got.append(ev)
                if len(got) == 100:
                    break
    finally:
        proc.kill()
        proc.communicate()
    assert [e.seq for e in got] == list(range(1, 101))
    assert [e.task_id for e in got] == [f"t{i}" for i in range(100)]


# ---- corruption ------------------------------------------------------------------------------


@pytest.mark.parametrize("readonly", [False, True])
def test_random_bytes_file_is_corrupt_and_left_untouched(tmp_path: Path, readonly: bool) -> None:
    path = tmp_path / "events.db"
    junk = random.Random(7).randbytes(3 * 4096)
    path.write_bytes(junk)
    with pytest.raises(EventLogCorruptError) as info:
        EventLog(path, readonly=readonly)
    assert str(path) in str(info.value)
    assert info.value.path == str(path)  # type: ignore[attr-defined]
    assert "backup" in str(info.value) and "never overwrites" in str(info.value)
    assert path.read_bytes() == junk


@pytest.mark.parametrize("damage", ["zeroed_pages", "truncated"])
def test_damaged_database_is_reported_not_repaired(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "events.db"
    with EventLog(path) as log:
        log.append_many([submitted(i) for i in range(2000)])
    size = path.stat().st_size  # closing the last connection checkpointed the WAL into it
    assert size > 100 * 4096
    with open(path, "r+b") as f:
        if damage == "zeroed_pages":
            f.seek((size // 4096 // 2) * 4096)
            f.write(bytes(4 * 4096))
        else:
            f.truncate(size // 2)
    damaged = path.read_bytes()
    with pytest.raises(EventLogCorruptError) as info:
        EventLog(path)  # a writer runs quick_check at open
    assert str(path) in str(info.value)
    # readers skip quick_check, but find the damage at open, in check() or when reading it
    with pytest.raises(EventLogCorruptError), EventLog(path, readonly=True) as reader:
        reader.check()
    with pytest.raises(EventLogCorruptError), EventLog(path, readonly=True) as reader:
        list(reader.iter_events())
    assert path.read_bytes() == damaged


def test_check_passes_on_a_healthy_log(log: EventLog) -> None:
    log.append_many([submitted(i) for i in range(100)])
    log.check()


def test_foreign_database_and_newer_schema_are_refused(tmp_path: Path) -> None:
    foreign = tmp_path / "other.db"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE users (id INTEGER)")
    before = foreign.read_bytes()
    with pytest.raises(EventLogError, match="not a hive event log"):
        EventLog(foreign)
    assert foreign.read_bytes() == before

    path = tmp_path / "events.db"
    EventLog(path).close()
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    conn.close()
    with pytest.raises(EventLogError, match="schema_version 2.*upgrade hive"):
        EventLog(path)


# ---- locking -----------------------------------------------------------------------------

HOLDER = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.readline()
conn.execute("ROLLBACK")
"""


@pytest.mark.parametrize("holder", ["connection", "process"])
def test_locked_database_raises_then_recovers(tmp_path: Path, holder: str) -> None:
    path = tmp_path / "events.db"
    with EventLog(path, busy_timeout_s=0.2) as log:
        log.append_many([submitted(0), submitted(1)])
        if holder == "connection":
            other = sqlite3.connect(path, isolation_level=None)
            other.execute("BEGIN EXCLUSIVE")
            release = other.close
        else:
            proc = run_script(HOLDER, str(path), stdin=subprocess.PIPE)
            assert proc.stdout is not None and proc.stdout.readline() == "locked\n"

            def release() -> None:
                proc.communicate("\n", timeout=30)

        start = time.monotonic()
        with pytest.raises(EventLogLockedError) as info:
            log.append(submitted(2))
        assert time.monotonic() - start < 1.5  # busy_timeout_s, not the 5 s default
        err = info.value
        assert err.path == str(path) and err.busy_timeout_s == 0.2  # type: ignore[attr-defined]
        assert "hive down" in str(err) and "busy_timeout_s" in str(err)
        assert [e.task_id for e in log.query()] == ["t0", "t1"]  # readers are not blocked
        release()
        assert log.append(submitted(3)).seq == 3
        assert [e.task_id for e in log.query()] == ["t0", "t1", "t3"]

    clone = pickle.loads(pickle.dumps(err))
    assert type(clone) is EventLogLockedError
    assert clone.path == str(path)  # type: ignore[attr-defined]
    assert str(clone) == str(err)


def test_errors_survive_pickling() -> None:
    err = EventLogLockedError("locked", path="/x/events.db", busy_timeout_s=0.5)
    clone = pickle.loads(pickle.dumps(err))
    assert isinstance(clone, EventLogLockedError) and isinstance(clone, EventLogError)
    assert (clone.path, clone.busy_timeout_s, str(clone)) == (  # type: ignore[attr-defined]
        "/x/events.db", 0.5, "locked")
    corrupt = pickle.loads(pickle.dumps(EventLogCorruptError("bad", path="/y")))
    assert type(corrupt) is EventLogCorruptError
    assert corrupt.path == "/y"  # type: ignore[attr-defined]


# ---- decoding and readonly -----------------------------------------------------------------


def test_undecodable_row_raises_instead_of_being_skipped(log: EventLog) -> None:
    log.append(AgentReady(agent_id="a1"))
    conn = sqlite3.connect(log.path)
    with conn:
        conn.execute("INSERT INTO events (ts, type, version, agent_id, task_id, body) "
                     "VALUES (1.0, 'alien.event', 1, NULL, NULL, ?)",
                     ('{"type": "alien.event", "version": 1, "ts": 1.0}',))
    conn.close()
    with pytest.raises(EventDecodeError, match="alien.event") as info:
        log.query()
    assert info.value.seq == 2  # type: ignore[attr-defined]
    with pytest.raises(EventDecodeError):
        list(log.iter_events())
    with pytest.raises(EventDecodeError):
        next(log.follow(after_seq=1, timeout_s=1))
    assert [e.agent_id for e in log.query(types="agent.ready")] == ["a1"]
    assert log.count() == 2


def test_readonly_missing_file_gives_guidance(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "events.db"
    with pytest.raises(EventLogError) as info:
        EventLog(path, readonly=True)
    assert type(info.value) is EventLogError
    assert "hive up" in str(info.value) and "HIVE_HOME" in str(info.value)
    assert str(path) in str(info.value)
    assert not path.parent.exists()


def test_readonly_log_reads_but_refuses_appends(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    with EventLog(path) as writer:
        writer.append_many([submitted(i) for i in range(3)])
        with EventLog(path, readonly=True) as reader:
            assert [e.task_id for e in reader.query()] == ["t0", "t1", "t2"]
            with pytest.raises(EventLogError, match="readonly"):
                reader.append(submitted(9))
            writer.append(submitted(3))
            assert reader.last_seq() == 4  # sees the writer's later commits
        assert writer.count() == 4

"""The ``hive`` command line, run as a user runs it: the real executable, in subprocesses.

One Ray head for the module (``hive up`` in a fixture, ``hive down`` at teardown, with a
last-resort kill of the head's process group so a failing test never leaves Ray running).
Every command gets ``HIVE_HOME`` pointing at a temporary home and no ``RAY_ADDRESS``.

``hive demo`` starts its own embedded Ray (``address="local"``), independent of ``hive up``; its
test comes first so that the two Ray instances do not run side by side on a small machine.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.factories import free_port, wait_until

pytestmark = pytest.mark.integration

HIVE = str(Path(sys.executable).with_name("hive"))

# A job that joins the running cluster (RAY_ADDRESS is set by Ray jobs, HIVE_HOME by `hive submit`),
# makes sure an echo agent exists and runs one task through the Coordinator.
JOB = textwrap.dedent("""\
    import hive
    from hive.testing import EchoAgent

    c = hive.init()
    if not any(a["kind"] == "echo" and a["state"] in ("ready", "busy") for a in c.agents()):
        c.spawn(EchoAgent, count=1)
    h = c.submit("add", (2, 3))
    print("TASK", h.task_id, flush=True)
    print("RESULT", h.result(timeout=60), flush=True)
""")


def cli_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "HIVE_HOME")}
    env["HIVE_HOME"] = str(home)
    return env


def hive_cli(
    *args: str, env: dict[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run ``hive *args`` and return the finished process (stdout and stderr as text)."""
    return subprocess.run(
        [HIVE, *args],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def explain(proc: subprocess.CompletedProcess[str]) -> str:
    return f"`hive {' '.join(proc.args[1:])}` exited {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"


def task_id_of(job: subprocess.CompletedProcess[str]) -> str:
    """The task id JOB printed (``TASK <id>``)."""
    ids = [line.split()[1] for line in job.stdout.splitlines() if line.startswith("TASK ")]
    assert len(ids) == 1, explain(job)
    return ids[0]


def one_line(text: str) -> str:
    """Rich wraps console output at 80 columns when stdout is not a terminal; undo that."""
    return " ".join(text.split())


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie awaiting its parent's reap counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def group_members(pgid: int) -> list[int]:
    """Live processes in process group ``pgid`` (Linux /proc)."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getpgid(int(entry.name)) == pgid and alive(int(entry.name)):
                    members.append(int(entry.name))
            except OSError:
                pass
    return members


def heads_on_port(port: int) -> list[int]:
    """Pids of `ray start --head` processes bound to GCS ``port`` (to clean up after a `hive up` that
    was killed before it wrote cluster.json)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"start" in argv and b"--head" in argv and f"--port={port}".encode() in argv:
            found.append(int(entry.name))
    return found


def kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


@dataclass
class Cluster:
    home: Path  # the hive home `hive up` ran with
    env: dict[str, str]  # environment for every hive command of the module
    info: dict[str, Any]  # cluster.json as `hive up` wrote it


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """`hive up` on free ports with 2 CPUs; `hive down` at teardown (and asserts it cleaned up)."""
    home = tmp_path_factory.mktemp("hive-cli-home")
    env = cli_env(home)
    port = free_port()
    dashboard_port = free_port()
    while dashboard_port == port:
        dashboard_port = free_port()
    cluster_file = home / "cluster.json"
    head_pid: int | None = None
    up_ok = False
    try:
        up = hive_cli(
            "up",
            "--port",
            str(port),
            "--dashboard-port",
            str(dashboard_port),
            "--num-cpus",
            "2",
            env=env,
            timeout=240,
        )
        if cluster_file.exists():
            head_pid = int(json.loads(cluster_file.read_text())["pid"])
        assert up.returncode == 0, explain(up)
        info = json.loads(cluster_file.read_text())
        assert info["address"] == f"127.0.0.1:{port}"
        assert info["dashboard_url"] == f"http://127.0.0.1:{dashboard_port}"
        assert info["dashboard_url"] in up.stdout, explain(up)
        assert "hive is up" in up.stdout, explain(up)
        assert head_pid is not None and alive(head_pid)
        up_ok = True
        yield Cluster(home=home, env=env, info=info)
    finally:
        try:
            down: subprocess.CompletedProcess[str] | None = hive_cli("down", env=env, timeout=120)
        except subprocess.TimeoutExpired:
            down = None
        stragglers: list[int] = []
        if head_pid is not None:
            deadline = time.monotonic() + 15  # the group's processes exit a moment after the head
            while (stragglers := group_members(head_pid)) and time.monotonic() < deadline:
                time.sleep(0.2)
        # Last resort: whatever is left of the head's process group goes, so a failure here never
        # leaves a Ray head running after the tests.
        for pid in {*([head_pid] if head_pid is not None else []), *heads_on_port(port)}:
            kill_group(pid)
        if up_ok:  # otherwise the error from `hive up` is the one to read
            assert down is not None, "`hive down` did not finish within 120 s"
            assert down.returncode == 0, explain(down)
            assert "hive is down" in down.stdout, explain(down)
            assert not cluster_file.exists(), "`hive down` left cluster.json behind"
            assert head_pid is not None and not alive(head_pid), (
                f"the Ray head (pid {head_pid}) is still running"
            )
            assert not stragglers, (
                f"`hive down` left processes of the head's group running: {stragglers}"
            )


@pytest.fixture(scope="module")
def job_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("hive-cli-job")
    (path / "job.py").write_text(JOB)
    return path


# --------------------------------------------------------------------------------------------
# hive demo: its own embedded Ray (runs before the module's `hive up`, see the module docstring)
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_demo_quick_runs_every_step(tmp_path: Path) -> None:
    home = tmp_path / "demo-home"
    t0 = time.perf_counter()
    demo = hive_cli(
        "demo", "--quick", "--home", str(home), env=cli_env(tmp_path / "unused-home"), timeout=300
    )
    assert demo.returncode == 0, explain(demo)
    out = demo.stdout
    assert "demo failed" not in out, explain(demo)
    assert "hive demo (quick)" in out, explain(demo)  # the step table
    for step in (
        "start the embedded cluster",
        "spawn agents",
        "run tasks",
        "kill -9 an agent mid-task",
        "the dead agent is respawned",
        "deploy SmolLM2 over 2 pipeline stages",
        "ask the sharded model",
        "two sites over p2p exchange events and a tensor",
        "read the EventLog",
    ):
        assert step in out, f"step {step!r} missing\n{explain(demo)}"
    assert "Paris" in one_line(out), explain(demo)  # the sharded SmolLM2 answered
    assert (home / "events.db").exists()  # it used the --home it was given
    assert not (home / "cluster.json").exists()  # and no `hive up` cluster
    print(f"hive demo --quick: {time.perf_counter() - t0:.1f}s")


# --------------------------------------------------------------------------------------------
# errors (no cluster needed)
# --------------------------------------------------------------------------------------------


def test_status_without_a_cluster_says_to_run_hive_up(tmp_path: Path) -> None:
    proc = hive_cli("status", env=cli_env(tmp_path))
    assert proc.returncode != 0, explain(proc)
    assert "no hive cluster is running" in proc.stderr, explain(proc)
    assert "`hive up`" in proc.stderr, explain(proc)
    assert "Traceback" not in proc.stderr, explain(proc)


def test_unknown_event_type_lists_the_known_ones(tmp_path: Path) -> None:
    proc = hive_cli("events", "--type", "nonsense", env=cli_env(tmp_path))
    assert proc.returncode != 0, explain(proc)
    err = one_line(proc.stderr)
    assert "unknown event type 'nonsense'" in err, explain(proc)
    for known in ("task.submitted", "task.completed", "agent.spawned"):
        assert known in err, explain(proc)


def test_submit_without_an_entrypoint_fails(tmp_path: Path) -> None:
    proc = hive_cli("submit", env=cli_env(tmp_path))
    assert proc.returncode != 0, explain(proc)
    assert "no entrypoint" in proc.stderr, explain(proc)


# --------------------------------------------------------------------------------------------
# against the cluster `hive up` started (tests run in this order and build on each other)
# --------------------------------------------------------------------------------------------


def test_status_json_shows_an_empty_cluster(cluster: Cluster) -> None:
    proc = hive_cli("status", "--json", env=cluster.env)
    assert proc.returncode == 0, explain(proc)
    status = json.loads(proc.stdout)
    assert Path(status["home"]) == cluster.home
    agents = status["agents"]  # agents by state (a count in older Coordinators)
    assert (sum(agents.values()) if isinstance(agents, dict) else agents) == 0, status
    assert status["last_seq"] >= 1  # at least coordinator.started


def test_up_again_says_already_up(cluster: Cluster) -> None:
    proc = hive_cli("up", env=cluster.env)
    assert proc.returncode == 0, explain(proc)
    assert "already up" in proc.stdout, explain(proc)
    assert cluster.info["dashboard_url"] in one_line(proc.stdout), explain(proc)
    assert (
        json.loads((cluster.home / "cluster.json").read_text())["pid"] == cluster.info["pid"]
    )  # same head


def test_submit_runs_a_job_that_joins_the_cluster(cluster: Cluster, job_dir: Path) -> None:
    proc = hive_cli(
        "submit",
        "--working-dir",
        str(job_dir),
        "--",
        "python",
        "job.py",
        env=cluster.env,
        timeout=240,
    )
    assert proc.returncode == 0, explain(proc)
    assert "RESULT 5" in proc.stdout, explain(proc)
    assert "SUCCEEDED" in proc.stderr, explain(proc)
    task_id = task_id_of(proc)

    # The echo agent is a detached actor: it outlives the job.
    agents = hive_cli("agents", "--json", env=cluster.env)
    assert agents.returncode == 0, explain(agents)
    rows = json.loads(agents.stdout)
    assert [a for a in rows if a["kind"] == "echo" and a["state"] in ("ready", "busy")], rows

    events = hive_cli("events", "--type", "task.completed", "--json", env=cluster.env)
    assert events.returncode == 0, explain(events)
    completed = json_lines(events.stdout)
    assert all(e["type"] == "task.completed" for e in completed), completed
    assert [e for e in completed if e["task_id"] == task_id], (task_id, completed)

    by_task = hive_cli("events", "--task", task_id, "--json", env=cluster.env)
    assert by_task.returncode == 0, explain(by_task)
    types = [e["type"] for e in json_lines(by_task.stdout)]
    assert types[0] == "task.submitted" and "task.completed" in types, types
    assert all(e["task_id"] == task_id for e in json_lines(by_task.stdout))


def test_submit_of_a_failing_job_exits_nonzero(cluster: Cluster) -> None:
    proc = hive_cli(
        "submit",
        "--",
        "python",
        "-c",
        "import sys; print('exiting with', 1 + 2); sys.exit(3)",
        env=cluster.env,
        timeout=240,
    )
    assert proc.returncode != 0, explain(proc)
    # The entrypoint ran with its quoting intact (Ray echoes the command line, so look for its output).
    assert "exiting with 3" in proc.stdout, explain(proc)
    assert "FAILED" in proc.stderr, explain(proc)


def test_events_follow_prints_new_events(cluster: Cluster, job_dir: Path, tmp_path: Path) -> None:
    lines: queue.Queue[str] = queue.Queue()
    stderr_path = tmp_path / "follow.stderr"
    with stderr_path.open("w") as stderr:
        follower = subprocess.Popen(
            [HIVE, "events", "--follow", "--json"],
            env=cluster.env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=stderr,
            stdin=subprocess.DEVNULL,
        )
    stdout = follower.stdout
    assert stdout is not None

    def read() -> None:
        for line in stdout:
            lines.put(line)

    threading.Thread(target=read, daemon=True).start()
    seen: list[dict[str, Any]] = []

    def next_event(timeout_s: float) -> dict[str, Any] | None:
        try:
            event = json.loads(lines.get(timeout=timeout_s))
        except queue.Empty:
            return None
        seen.append(event)
        return event

    try:
        # The backlog (at least coordinator.started) shows the follower is reading the log.
        assert next_event(30) is not None, (
            f"`hive events --follow` printed nothing in 30 s; stderr: {stderr_path.read_text()}"
        )
        while next_event(0.5) is not None:
            pass
        assert follower.poll() is None, "`hive events --follow` exited instead of following"
        backlog_top = max(e["seq"] for e in seen)

        job = hive_cli(
            "submit",
            "--working-dir",
            str(job_dir),
            "--",
            "python",
            "job.py",
            env=cluster.env,
            timeout=240,
        )
        assert job.returncode == 0, explain(job)
        task_id = task_id_of(job)

        def submitted_seen() -> bool:
            next_event(0.2)
            return any(e["type"] == "task.submitted" and e["task_id"] == task_id for e in seen)

        wait_until(
            submitted_seen,
            30,
            interval_s=0,
            message=lambda: f"no task.submitted for {task_id} in {seen[-5:]}",
        )
        new = next(e for e in seen if e["type"] == "task.submitted" and e["task_id"] == task_id)
        assert new["seq"] > backlog_top  # it came while following, not from the backlog
        assert follower.poll() is None
    finally:
        follower.terminate()
        try:
            follower.wait(timeout=10)
        except subprocess.TimeoutExpired:
            follower.kill()
            follower.wait()


def test_infer_plan_deploy_generate_status_undeploy(cluster: Cluster, tiny_llama: Path) -> None:
    plan = hive_cli("infer", "plan", str(tiny_llama), "--stages", "2", "--max-seq-len", "64", env=cluster.env)
    assert plan.returncode == 0, explain(plan)
    assert "0-1" in plan.stdout and "2-3" in plan.stdout, explain(plan)  # both layer ranges shown
    dep = hive_cli("infer", "deploy", str(tiny_llama), "--name", "cli-llama", "--stages", "2",
                   "--max-seq-len", "64", env=cluster.env, timeout=300)
    assert dep.returncode == 0, explain(dep)
    assert "deployed" in dep.stdout, explain(dep)
    try:
        gen = hive_cli("infer", "generate", "cli-llama", "hello", "--max-new-tokens", "6", env=cluster.env)
        assert gen.returncode == 0, explain(gen)
        assert "6 tokens" in gen.stderr, explain(gen)
        st = hive_cli("infer", "status", "cli-llama", "--json", env=cluster.env)
        assert st.returncode == 0, explain(st)
        info = json.loads(st.stdout)
        assert [h["ok"] for h in info["health"]] == [True, True]
        assert [(s["layer_start"], s["layer_end"]) for s in info["stages"]] == [(0, 2), (2, 4)]
        listing = hive_cli("infer", "status", env=cluster.env)
        assert "cli-llama" in listing.stdout, explain(listing)
    finally:
        down = hive_cli("infer", "undeploy", "cli-llama", env=cluster.env)
    assert down.returncode == 0, explain(down)
    missing = hive_cli("infer", "generate", "cli-llama", "hi", env=cluster.env)
    assert missing.returncode != 0 and "no deployment named" in one_line(missing.stdout + missing.stderr)

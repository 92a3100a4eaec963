"""``hive demo``: the main job, an end-to-end run of what hive does, with timings.

Later issues add steps (sharded inference, evolution, two sites over p2p).
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any
from collections.abc import Callable

from rich.console import Console
from rich.table import Table

__all__ = ["run_demo"]


def _wait_running(client: Any, handle: Any, timeout_s: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        info = handle.info()
        if info["status"] == "running":
            return info
        time.sleep(0.02)
    raise TimeoutError(f"task {handle.task_id} did not start within {timeout_s}s")


def _extra_steps(state: dict[str, Any], quick: bool) -> list[tuple[str, Callable[[], str]]]:
    """Steps other packages add under the ``hive.demo`` entry-point group (hive imports none of them)."""
    from importlib.metadata import entry_points

    steps: list[tuple[str, Callable[[], str]]] = []
    for ep in sorted(entry_points(group="hive.demo"), key=lambda e: e.name):
        steps.extend(ep.load()(state, quick))
    return steps


def _wait(condition: Callable[[], Any], what: str, timeout_s: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise TimeoutError(f"{what} did not happen within {timeout_s:.0f}s")


def _two_sites(client: Any) -> str:
    """Site demo-a = a SiteGateway agent in this cluster; site demo-b = a SiteService in this
    process with its own identity and EventLog. They allowlist each other, exchange a hive
    event each way over gossip (deduplicated, tagged with the origin) and a tensor."""
    import shutil
    import tempfile

    import numpy as np

    from hive._eventlog import EventLog
    from hive._events import RollbackExecuted
    from hive._site_gateway import (
        EVENTS_TOPIC,
        REMOTE_EVENT_TOPIC,
        SiteGateway,
        SiteService,
        add_allowed,
        init_site,
    )

    tmp = Path(tempfile.mkdtemp(prefix="hive-demo-sites-"))
    dir_a, dir_b = tmp / "demo-a", tmp / "demo-b"
    ident_a, ident_b = init_site(dir_a, "demo-a"), init_site(dir_b, "demo-b")
    add_allowed(dir_b, ident_a.peer_id, "demo-a")
    log_b = EventLog(tmp / "demo-b-events.db")
    only = ("rollback.executed",)
    site_b = SiteService(ident_b, directory=dir_b, events_path=log_b.path, record=log_b.append,
                         republish=only, control=False).start()
    agent_id = None
    try:
        add_allowed(dir_a, ident_b.peer_id, "demo-b", site_b.node.addrs)
        t0 = time.perf_counter()
        [agent_id] = client.spawn(SiteGateway, directory=str(dir_a), listen="/ip4/127.0.0.1/tcp/0",
                                  republish=only, control=False)
        _wait(lambda: ident_a.peer_id in site_b.node.topic_peers(EVENTS_TOPIC), "the gossip mesh")
        meshed = time.perf_counter() - t0
        seq = client.record_event(RollbackExecuted(target="demo/champion", restored="v1",
                                                   reason="demo: tell the other site"))
        got = _wait(site_b.remote_events, "demo-a's event reaching demo-b")[-1]
        log_b.append(RollbackExecuted(target="demo-b/model", restored="v7", reason="demo: reply"))

        def at_a() -> list[Any]:
            return [e for e in client.events(types="ext.event")
                    if e.topic == REMOTE_EVENT_TOPIC and e.data.get("origin_site") == "demo-b"]

        back = _wait(at_a, "demo-b's event reaching demo-a")[-1]
        weights = {"w": np.arange(256 * 1024, dtype=np.float32).reshape(512, 512)}
        stats = site_b.send_tensors("demo-a", weights, name="demo-weights")
        again = site_b.sync()  # catch-up after gossip: the same event is not recorded twice
        assert got["seq"] == seq and got["origin_site"] == "demo-a", got
        assert again == 0 and len(site_b.remote_events()) == 1, (again, site_b.remote_events())
    finally:
        if agent_id is not None:
            client.terminate(agent_id)
        site_b.close()
        log_b.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return (f"gateway agent {agent_id} (demo-a {ident_a.peer_id[:14]}...) and demo-b meshed in "
            f"{meshed:.2f}s over Noise; demo-a's rollback.executed (seq {seq}) reached demo-b as "
            f"ext.event {REMOTE_EVENT_TOPIC} tagged origin demo-a, demo-b's reached this EventLog "
            f"(seq {back.seq}, origin {back.data['origin_site']}); a catch-up re-pull recorded 0 "
            f"duplicates; a {stats['bytes'] / 2**20:.1f} MiB tensor went demo-b -> demo-a in "
            f"{stats['seconds'] * 1000:.0f} ms, stored in demo-a's inbox")


def run_demo(home: str | Path | None = None, quick: bool = False, console: Console | None = None) -> dict[str, Any]:
    """Run the demo and print what happened. Returns the step timings and checks.

    Args:
        home: hive home (default ``$HIVE_HOME`` or ``./.hive``).
        quick: fewer tasks.
        console: where to print.

    Returns:
        ``{"steps": [...], "ok": bool}``.
    """
    import hive
    from hive.testing import EchoAgent, SlowAgent

    console = console or Console()
    steps: list[dict[str, Any]] = []

    def step(name: str, fn: Callable[[], str]) -> None:
        t0 = time.perf_counter()
        with console.status(name + "..."):
            detail = fn()
        steps.append({"step": name, "seconds": time.perf_counter() - t0, "detail": detail})
        console.print(f"[green]✓[/] {name} [dim]({steps[-1]['seconds']:.2f}s)[/] {detail}")

    state: dict[str, Any] = {}

    def start() -> str:
        state["client"] = hive.init(home=home)
        st = state["client"].status()
        return f"Ray + Coordinator up, events at {st['events_path']} ({st['last_seq']} events so far)"

    def spawn() -> str:
        c = state["client"]
        ids = c.spawn(EchoAgent, count=2) + c.spawn(SlowAgent, count=2)
        return f"{len(ids)} agents ready: {', '.join(ids)}"

    n = 200 if quick else 2000

    def throughput() -> str:
        c = state["client"]
        t0 = time.perf_counter()
        handles = c.submit_many("add", [(i, i) for i in range(n)])
        values = c.gather(handles, timeout=300)
        dt = time.perf_counter() - t0
        assert values == [2 * i for i in range(n)], "wrong sums"
        return f"{n} 'add' tasks, all correct, {n / dt:,.0f} tasks/s through the Coordinator"

    def failing() -> str:
        try:
            state["client"].submit("fail", "on purpose").result(timeout=60)
        except hive.TaskFailedError as exc:
            return f"the caller got TaskFailedError with the agent's traceback ({exc.message})"
        raise AssertionError("a failing task did not raise")

    def kill() -> str:
        c = state["client"]
        h = c.submit("sleep", 1.5, resources={})
        info = _wait_running(c, h)
        victim = next(a for a in c.agents() if a["agent_id"] == info["agent_id"])
        t0 = time.perf_counter()
        os.kill(victim["pid"], signal.SIGKILL)
        out = h.result(timeout=120)
        dt = time.perf_counter() - t0
        final = h.info()
        return (f"SIGKILLed {victim['agent_id']} (pid {victim['pid']}) mid-task; the task finished on "
                f"{out['agent_id']} at attempt {out['attempt']} with the same idempotency key "
                f"{out['key']} {dt:.2f}s after the kill; causes: {final['causes']}")

    def restarted() -> str:
        c = state["client"]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            agents = c.agents()
            if all(a["state"] in ("ready", "busy") for a in agents):
                restarts = sum(a["restarts"] for a in agents)
                return f"all {len(agents)} agents ready again ({restarts} restart(s))"
            time.sleep(0.1)
        raise AssertionError("the killed agent was not restarted within 60 s")

    def sites() -> str:
        return _two_sites(state["client"])

    def events() -> str:
        counts = Counter(e.type for e in state["client"].events(limit=None))
        return ", ".join(f"{k}={v}" for k, v in sorted(counts.items()))

    ok = True
    try:
        step("start the embedded cluster", start)
        step("spawn agents", spawn)
        step("run tasks", throughput)
        step("a task that raises", failing)
        step("kill -9 an agent mid-task", kill)
        step("the dead agent is respawned", restarted)
        for ep_steps in _extra_steps(state, quick):
            step(*ep_steps)
        step("two sites over p2p exchange events and a tensor", sites)
        step("read the EventLog", events)
    except Exception as exc:
        ok = False
        console.print(f"[bold red]demo failed:[/] {type(exc).__name__}: {exc}")
    finally:
        hive.shutdown()
    table = Table(title="hive demo" + (" (quick)" if quick else ""))
    table.add_column("step")
    table.add_column("seconds", justify="right")
    for s in steps:
        table.add_row(s["step"], f"{s['seconds']:.2f}")
    console.print(table)
    if not ok:
        raise SystemExit(1)
    return {"steps": steps, "ok": ok}

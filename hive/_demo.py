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

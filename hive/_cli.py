"""The ``hive`` command line (typer + rich)."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NoReturn, Optional

import typer
from rich.console import Console
from rich.table import Table

from hive._config import resolve_home
from hive._runtime import use_auth_mode
from hive._exceptions import HiveError

__all__ = ["app", "main"]

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="hive: agents, sharded inference and evolution on Ray.")
console = Console()
err = Console(stderr=True)

HomeOpt = typer.Option(None, "--home", help="hive home (default: $HIVE_HOME or ./.hive)")


def _fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"[bold red]error:[/] {message}", soft_wrap=True)  # one line: no hard wraps inside `commands`
    raise typer.Exit(code)


def _connect(home: Optional[Path]) -> Any:
    """Join the cluster `hive up` started for this home (never start a new one)."""
    import hive
    from hive._runtime import running_cluster

    home_path = resolve_home(home)
    info = running_cluster(home_path)
    if info is None and not os.environ.get("RAY_ADDRESS"):
        _fail(f"no hive cluster is running for home {home_path}: start one with `hive up` "
              "(or pass --home / set HIVE_HOME to the home you started it with)")
    if info is not None:
        use_auth_mode(info)
    return hive.init(home=home_path)


def _killpg(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def _table(title: str, rows: list[dict[str, Any]], columns: list[str]) -> Table:
    table = Table(title=title)
    for col in columns:
        table.add_column(col)
    for row in rows:
        table.add_row(*("" if row.get(c) is None else str(row.get(c)) for c in columns))
    return table


@app.command()
def up(home: Optional[Path] = HomeOpt,
       port: int = typer.Option(6379, help="Ray GCS port"),
       dashboard_port: int = typer.Option(8265, help="Ray dashboard / Job Submission API port"),
       num_cpus: Optional[int] = typer.Option(None, help="CPUs Ray may use (default: all)"),
       num_gpus: Optional[int] = typer.Option(None, help="GPUs Ray may use (default: all visible)")) -> None:
    """Start the embedded cluster: Ray head, Coordinator, EventLog."""
    from hive._runtime import CLUSTER_FILE, running_cluster

    home_path = resolve_home(home)
    info = running_cluster(home_path)
    if info is not None:
        console.print(f"hive is already up for {home_path}: Ray at {info['address']}, dashboard {info['dashboard_url']}")
        return
    ray_bin = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
    logs = home_path / "logs"
    logs.mkdir(exist_ok=True)
    cmd = [ray_bin, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
           "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
           "--disable-usage-stats",
           # any free port: the default 52365 is taken by any other Ray on this machine, and without
           # its dashboard agent the head accepts no jobs ("No available agent to submit job")
           "--dashboard-agent-listen-port=0"]
    if num_cpus is not None:
        cmd.append(f"--num-cpus={num_cpus}")
    if num_gpus is not None:
        cmd.append(f"--num-gpus={num_gpus}")
    # Token authentication (Ray's default) unless the user opted out with RAY_AUTH_MODE=disabled;
    # `ray start` refuses token mode without a token, so make sure one exists (~/.ray/auth_token).
    auth_mode = os.environ.get("RAY_AUTH_MODE", "token").lower()
    if auth_mode == "token":
        subprocess.run([ray_bin, "get-auth-token", "--generate"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.perf_counter()
    with console.status("starting the Ray head..."):
        log_fh = open(logs / "ray-head.log", "ab")
        # No drain on SIGTERM: `hive down` stops the agents first, and the drain RPC would wait out
        # its 30 s timeout because the GCS in the same process group gets the SIGTERM too.
        # Jobs' entrypoints (`hive submit -- python job.py`) resolve `python` on the head's PATH: put
        # the interpreter hive runs in first, so jobs can import ray and hive even from a venv that
        # is not activated.
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        proc = subprocess.Popen(cmd, stdout=log_fh, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PATH": path, "RAY_USAGE_STATS_ENABLED": "0",
                                     "RAY_AUTH_MODE": auth_mode, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"})
        address = f"127.0.0.1:{port}"
        dashboard = f"http://127.0.0.1:{dashboard_port}"
        deadline = time.monotonic() + 120
        import urllib.error
        import urllib.request

        while True:
            if proc.poll() is not None:
                _killpg(proc.pid, signal.SIGTERM)
                _fail(f"`ray start` exited with code {proc.returncode}; see {logs / 'ray-head.log'} "
                      f"(is port {port} or {dashboard_port} in use? pass --port / --dashboard-port)")
            try:
                with urllib.request.urlopen(f"{dashboard}/api/version", timeout=2):
                    break
            except urllib.error.HTTPError:
                break  # the dashboard answers (401 without a token): it is up
            except OSError:
                if time.monotonic() > deadline:
                    _killpg(proc.pid, signal.SIGTERM)
                    _fail(f"the Ray head did not come up in 120 s; see {logs / 'ray-head.log'}")
                time.sleep(0.5)
    record = {"address": address, "dashboard_url": dashboard, "pid": proc.pid, "home": str(home_path),
              "auth_mode": auth_mode, "started": time.time()}
    (home_path / CLUSTER_FILE).write_text(json.dumps(record, indent=2))
    import hive

    try:
        use_auth_mode(record)
        client = hive.init(address=address, home=home_path)
        status = client.status()
    except Exception:
        _killpg(proc.pid, signal.SIGTERM)
        (home_path / CLUSTER_FILE).unlink(missing_ok=True)
        raise
    agents = status["agents"]  # agents by state
    n_agents = sum(agents.values()) if isinstance(agents, dict) else agents
    rows = [
        {"what": "Ray head", "where": address, "detail": f"pid {proc.pid}, log {logs / 'ray-head.log'}"},
        {"what": "Dashboard / Jobs API", "where": dashboard, "detail": "hive submit -- <cmd>"},
        {"what": "Coordinator", "where": "actor hive/hive-coordinator", "detail": f"{n_agents} agents"},
        {"what": "EventLog", "where": status["events_path"], "detail": f"{status['last_seq']} events"},
        {"what": "Home", "where": str(home_path), "detail": ""},
    ]
    console.print(_table(f"hive is up ({time.perf_counter() - t0:.1f}s)", rows, ["what", "where", "detail"]))


@app.command()
def down(home: Optional[Path] = HomeOpt) -> None:
    """Stop the Coordinator, its agents and the Ray head that `hive up` started."""
    import hive
    from hive._runtime import CLUSTER_FILE, running_cluster

    home_path = resolve_home(home)
    info = running_cluster(home_path)
    if info is None:
        (home_path / CLUSTER_FILE).unlink(missing_ok=True)
        console.print(f"nothing running for {home_path}")
        return
    try:
        use_auth_mode(info)
        hive.init(home=home_path)
        hive.shutdown(stop_cluster=True)
    except HiveError as exc:
        err.print(f"coordinator shutdown: {exc}")
    import ray

    ray.shutdown()  # disconnect before the head goes, or its dying processes' logs stream here
    _killpg(int(info["pid"]), signal.SIGTERM)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(int(info["pid"]), 0)
        except OSError:
            break
        time.sleep(0.2)
    else:
        _killpg(int(info["pid"]), signal.SIGKILL)
    (home_path / CLUSTER_FILE).unlink(missing_ok=True)
    console.print(f"hive is down (home {home_path} kept: events and checkpoints stay)")


@app.command()
def status(home: Optional[Path] = HomeOpt, as_json: bool = typer.Option(False, "--json")) -> None:
    """Agents and tasks by state, queue depth, scheduling latency."""
    info = _connect(home).status()
    if as_json:
        console.print_json(json.dumps(info))
        return
    rows = [{"key": k, "value": v} for k, v in info.items()]
    console.print(_table("hive status", rows, ["key", "value"]))


@app.command()
def agents(home: Optional[Path] = HomeOpt, as_json: bool = typer.Option(False, "--json")) -> None:
    """The agent registry."""
    rows = _connect(home).agents()
    if as_json:
        console.print_json(json.dumps(rows))
        return
    cols = ["agent_id", "kind", "state", "outstanding", "reputation", "autonomy", "restarts",
            "heartbeat_age_s", "pid", "capabilities"]
    console.print(_table(f"{len(rows)} agents", rows, cols))


@app.command()
def events(home: Optional[Path] = HomeOpt,
           follow: bool = typer.Option(False, "--follow", "-f", help="keep printing new events"),
           type_: Optional[list[str]] = typer.Option(None, "--type", "-t", help="event type, e.g. task.failed (repeatable)"),
           agent: Optional[str] = typer.Option(None, help="only this agent id"),
           task: Optional[str] = typer.Option(None, help="only this task id"),
           limit: int = typer.Option(50, help="most recent N (without --follow)"),
           as_json: bool = typer.Option(False, "--json", help="one JSON object per line")) -> None:
    """Show events from the EventLog (works while the cluster is down too)."""
    from hive._eventlog import EventLog
    from hive._events import EVENT_TYPES

    for t in type_ or []:
        if t not in EVENT_TYPES:
            _fail(f"unknown event type {t!r}; known: {', '.join(sorted(EVENT_TYPES))}")
    home_path = resolve_home(home)
    log = EventLog(home_path / "events.db", readonly=True)
    found = list(reversed(log.query(types=type_ or None, agent_id=agent, task_id=task, limit=limit, descending=True)))

    def show(e: Any) -> None:
        if as_json:
            print(e.model_dump_json(exclude={"payload", "result", "spec", "exception"}), flush=True)
            return
        extra = {k: v for k, v in e.model_dump(exclude={"type", "version", "ts", "seq", "agent_id", "task_id",
                                                         "payload", "result", "spec", "exception",
                                                         "traceback"}).items()}
        stamp = time.strftime("%H:%M:%S", time.localtime(e.ts))
        console.print(f"[dim]{e.seq:>7} {stamp}[/] [bold]{e.type:<24}[/] agent={e.agent_id or '-'} "
                      f"task={e.task_id or '-'} {extra if extra else ''}", highlight=False)

    for e in found:
        show(e)
    if follow:
        try:
            for e in log.follow(after_seq=found[-1].seq if found else log.last_seq(), types=type_ or None):
                if (agent and e.agent_id != agent) or (task and e.task_id != task):
                    continue
                show(e)
        except KeyboardInterrupt:
            pass


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def submit(ctx: typer.Context, home: Optional[Path] = HomeOpt,
           working_dir: Optional[Path] = typer.Option(None, "--working-dir", help="directory shipped with the job"),
           no_wait: bool = typer.Option(False, "--no-wait", help="print the job id and return")) -> None:
    """Run `hive submit [--working-dir DIR] -- <entrypoint>` as a Ray job, streaming its logs."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    from hive._runtime import running_cluster

    entry = shlex.join(ctx.args)  # the job runs it in a shell: keep each argument one word (as `ray job submit`)
    if not entry:
        _fail("no entrypoint: use `hive submit -- python my_job.py`")
    home_path = resolve_home(home)
    info = running_cluster(home_path)
    if info is None:
        _fail(f"no hive cluster is running for home {home_path}: start one with `hive up`")
    if working_dir is not None and not working_dir.is_dir():
        _fail(f"--working-dir {working_dir} is not a directory")
    use_auth_mode(info)
    client = JobSubmissionClient(info["dashboard_url"])
    runtime_env: dict[str, Any] = {"env_vars": {"HIVE_HOME": str(home_path)}}
    if working_dir is not None:
        runtime_env["working_dir"] = str(working_dir.resolve())
    job_id = client.submit_job(entrypoint=entry, runtime_env=runtime_env)
    err.print(f"submitted job [bold]{job_id}[/] to {info['dashboard_url']}")
    if no_wait:
        print(job_id)
        return

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    asyncio.run(tail())
    final = client.get_job_status(job_id)
    err.print(f"job {job_id}: {final.value}")
    if final != JobStatus.SUCCEEDED:
        raise typer.Exit(1)


@app.command()
def demo(home: Optional[Path] = HomeOpt,
         quick: bool = typer.Option(False, help="fewer tasks")) -> None:
    """The main job: an end-to-end run of what hive does today, with timings."""
    from hive._demo import run_demo

    run_demo(home=home, quick=quick, console=console)


from hive._p2p_cli import app as _p2p_app

app.add_typer(_p2p_app, name="p2p")


def _load_plugins(only: str | None = None) -> None:
    """Mount sub-commands other packages declare under the ``hive.cli`` entry-point group
    (all of them, or just ``only``).

    This keeps the dependency direction: ``inference`` adds ``hive infer`` without hive
    importing it.
    """
    from importlib.metadata import entry_points

    for ep in entry_points(group="hive.cli"):
        if only is not None and ep.name != only:
            continue
        try:
            app.add_typer(ep.load(), name=ep.name)
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not break the CLI
            err.print(f"warning: hive sub-command {ep.name!r} failed to load: {exc}")


def _plugins_for(argv: list[str]) -> None:
    """Load only the plugin the command line names: importing them all (torch, transformers,
    cma) costs seconds that `hive status` or `hive p2p peers` should not pay."""
    words = [a for a in argv if not a.startswith("-")]
    builtin = {c.name or (c.callback.__name__.replace("_", "-") if c.callback else "")
               for c in app.registered_commands}
    builtin |= {g.name for g in app.registered_groups if g.name}
    if words and words[0] in builtin:
        return
    _load_plugins(words[0] if words and "--help" not in argv else None)
    if words and words[0] not in builtin and not any(
            g.name == words[0] for g in app.registered_groups):
        _load_plugins()  # not a plugin name either: let typer list every command


def main() -> None:
    """Entry point of the ``hive`` console script."""
    _plugins_for(sys.argv[1:])
    try:
        app()
    except HiveError as exc:
        err.print(f"[bold red]error:[/] {exc}")
        sys.exit(2)

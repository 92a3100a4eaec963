"""``hive p2p init|allow|up|peers|ping|send-tensor|call``: a site's p2p node from the shell.

``init`` and ``allow`` edit the site dir (``<home>/p2p``); ``up`` runs the site's node in the
foreground; ``peers``, ``ping``, ``send-tensor`` and ``call`` talk to whichever process runs
the node for that home (``hive p2p up``, or a ``hive.SiteGateway`` agent on this machine)
over its local control socket (``hive/_site_control.py``). The p2p package itself is only
imported by ``hive/_site_gateway.py``, lazily, inside the commands.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from hive._exceptions import HiveError

__all__ = ["app"]

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="The site's p2p node: identity, allowlist, mesh between sites (docs/p2p.md).")
console = Console()
err = Console(stderr=True)

HomeOpt = Annotated[Path | None, typer.Option(
    "--home", help="hive home (default: $HIVE_HOME or ./.hive); the site lives in <home>/p2p")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON")]
SiteArg = Annotated[str, typer.Argument(help="site name or peer id")]


def _fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"[bold red]error:[/] {message}", soft_wrap=True, highlight=False)
    raise typer.Exit(code)


def _site_dir(home: Path | None) -> Path:
    from hive._config import resolve_home

    return resolve_home(home) / "p2p"


def _request(home: Path | None, op: str, **params: Any) -> Any:
    from hive._site_control import control_request

    try:
        return control_request(_site_dir(home), op, **params)
    except HiveError as exc:
        _fail(str(exc))


@app.command()
def init(site: Annotated[str, typer.Option("--site", help="this site's name, e.g. eu-1")],
         home: HomeOpt = None,
         passphrase: Annotated[bool, typer.Option(
             "--passphrase", help="encrypt the key: read the passphrase from "
             "$HIVE_P2P_PASSPHRASE, else prompt")] = False,
         as_json: JsonOpt = False) -> None:
    """Create this site's identity (Ed25519 key, mode 0600) and print its peer id."""
    from hive._site_gateway import PASSPHRASE_ENV, init_site

    secret = None
    if passphrase:
        secret = os.environ.get(PASSPHRASE_ENV) or typer.prompt(
            "passphrase for the site key", hide_input=True, confirmation_prompt=True)
    directory = _site_dir(home)
    try:
        ident = init_site(directory, site, secret)
    except HiveError as exc:
        _fail(str(exc))
    if as_json:
        print(json.dumps({"site": ident.site, "peer_id": ident.peer_id, "dir": str(directory),
                          "encrypted": bool(secret)}))
        return
    console.print(f"site [bold]{ident.site}[/] peer id [bold green]{ident.peer_id}[/]",
                  highlight=False, soft_wrap=True)
    console.print(f"key {directory / 'identity.key'} (mode 0600"
                  f"{', encrypted' if secret else ''})", highlight=False, soft_wrap=True)
    console.print(f"next: on each other site, `hive p2p allow {ident.peer_id} --site "
                  f"{ident.site} --addr /ip4/<this host>/tcp/4001`; here, `hive p2p up`",
                  highlight=False, soft_wrap=True)


@app.command()
def allow(peer_id: Annotated[str, typer.Argument(help="the other site's peer id (12D3KooW...)")],
          site: Annotated[str, typer.Option("--site", help="its name, e.g. us-2")],
          addr: Annotated[list[str] | None, typer.Option(
              "--addr", help="where it listens, e.g. /ip4/10.0.0.2/tcp/4001 (repeatable)")] = None,
          home: HomeOpt = None) -> None:
    """Put another site on this site's allowlist (the only peers that may connect)."""
    from hive._site_control import control_info
    from hive._site_gateway import add_allowed

    directory = _site_dir(home)
    try:
        entry = add_allowed(directory, peer_id, site, addr or ())
    except HiveError as exc:
        _fail(str(exc))
    live = ""
    if control_info(directory) is not None:
        _request(home, "allow", peer_id=entry.peer_id, site=entry.site, addrs=list(entry.addrs))
        live = " (the running node allows it now)"
    console.print(f"allowed site [bold]{entry.site}[/] = {entry.peer_id} at "
                  f"{', '.join(entry.addrs) or 'no address (it dials us)'}{live}",
                  highlight=False, soft_wrap=True)


def _print_peers(rows: list[dict[str, Any]], title: str) -> None:
    table = Table(title=title)
    for col in ("site", "peer id", "state", "addrs", "since", "dial failures"):
        table.add_column(col, overflow="fold")
    for r in rows:
        since = time.strftime("%H:%M:%S", time.localtime(r["since"])) if r.get("since") else "-"
        state = r["state"]
        color = {"connected": "green", "unreachable": "red"}.get(state, "yellow")
        table.add_row(r["site"] or "?", r["peer_id"], f"[{color}]{state}[/]",
                      " ".join(r["addrs"]) or "-", since, str(r.get("dial_failures") or 0))
    console.print(table)


@app.command()
def up(home: HomeOpt = None,
       listen: Annotated[str, typer.Option(
           "--listen", help="multiaddr to listen on (tcp/0: any free port)")]
       = "/ip4/0.0.0.0/tcp/4001",
       bootstrap: Annotated[list[str] | None, typer.Option(
           "--bootstrap", help="allowlisted peer to dial: /ip4/.../tcp/4001/p2p/<peer-id> "
           "(repeatable)")] = None,
       republish: Annotated[list[str] | None, typer.Option(
           "--republish", help="hive event type sent to the other sites (repeatable; default: "
           "agent.failed checkpoint.created rollback.executed task.dead_lettered)")] = None,
       no_events: Annotated[bool, typer.Option(
           "--no-events", help="do not bridge hive events")] = False) -> None:
    """Run this site's node in the foreground until Ctrl-C (or SIGTERM)."""
    from hive._config import resolve_home
    from hive._eventlog import EventLog
    from hive._events import EVENT_TYPES
    from hive._site_gateway import DEFAULT_REPUBLISH, SiteService, load_site

    for t in republish or []:
        if t not in EVENT_TYPES:
            _fail(f"unknown event type {t!r} for --republish; known: {', '.join(sorted(EVENT_TYPES))}")
    home_path = resolve_home(home)
    directory = home_path / "p2p"
    events = home_path / "events.db"
    evlog: EventLog | None = None
    try:
        identity = load_site(directory)
        if not no_events:
            evlog = EventLog(events)
        service = SiteService(
            identity, directory=directory, listen=listen, bootstrap=bootstrap or (),
            events_path=None if no_events else events,
            record=None if evlog is None else evlog.append,
            republish=tuple(republish or DEFAULT_REPUBLISH)).start()
    except HiveError as exc:
        _fail(str(exc))
    except Exception as exc:  # noqa: BLE001 - p2p errors (port taken, bad key): one line
        _fail(f"{type(exc).__name__}: {exc}")
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    table = Table(title=f"site {identity.site} is up (Ctrl-C stops it)")
    table.add_column("what")
    table.add_column("value", overflow="fold")
    table.add_row("peer id", service.peer_id)
    for a in service.node.addrs:
        table.add_row("listening", a)
    table.add_row("allowlist", f"{len(service.node.allowlist.peers())} site(s) in "
                               f"{directory / 'allowlist.json'}")
    table.add_row("events", "not bridged" if no_events else
                  f"{', '.join(service.republish)} -> gossip {service.topic}; received ones "
                  f"-> {events} (ext.event p2p.remote_event)")
    console.print(table)
    print(f"PEER_ID {service.peer_id}", flush=True)
    for a in service.node.addrs:
        print(f"LISTEN {a}", flush=True)
    last: dict[str, str] = {}
    seen_events = 0
    try:
        while not stop.wait(0.25):
            for row in service.sites():
                if last.get(row["peer_id"]) != row["state"]:
                    last[row["peer_id"]] = row["state"]
                    console.print(f"[dim]{time.strftime('%H:%M:%S')}[/] site "
                                  f"{row['site'] or row['peer_id']} {row['state']}"
                                  + (f" ({row['last_error']})" if row["state"] == "unreachable"
                                     and row.get("last_error") else ""),
                                  highlight=False, soft_wrap=True)
            delivered = service.stats["delivered"]
            if delivered > seen_events:
                for e in service.remote_events()[-(delivered - seen_events):]:
                    console.print(f"[dim]{time.strftime('%H:%M:%S')}[/] event from "
                                  f"{e['origin_site']}: {e['type']} (seq {e['seq']})",
                                  highlight=False, soft_wrap=True)
                seen_events = delivered
    finally:
        service.close()
        if evlog is not None:
            evlog.close()
        console.print(f"site {identity.site} stopped")


@app.command()
def peers(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """The allowlisted sites and their state, from the running node."""
    rows = _request(home, "peers")
    if as_json:
        print(json.dumps(rows))
        return
    info = _request(home, "info")
    _print_peers(rows, f"site {info['site']} ({info['peer_id']}): {len(rows)} peer(s)")


@app.command()
def ping(site: SiteArg,
         count: Annotated[int, typer.Option("--count", "-c", help="round trips")] = 3,
         home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Round-trip time to another site (an RPC over the Noise connection)."""
    results = [_request(home, "ping", site=site) for _ in range(max(1, count))]
    if as_json:
        print(json.dumps(results))
        return
    for r in results:
        extra = f" (connected in {r['connect_ms']:.1f} ms)" if r.get("connect_ms") else ""
        console.print(f"{r['site']} ({r['peer_id']}): rtt {r['rtt_ms']:.2f} ms{extra}",
                      highlight=False, soft_wrap=True)


@app.command("send-tensor")
def send_tensor(site: SiteArg,
                file: Annotated[Path, typer.Argument(help="a .safetensors file")],
                name: Annotated[str | None, typer.Option(
                    "--name", help="label the receiver sees (default: the file name)")] = None,
                timeout: Annotated[float, typer.Option(
                    "--timeout", help="seconds for the transfer")] = 600.0,
                home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Send a safetensors file to another site (chunked, checksummed, stored in its inbox)."""
    from hive._site_control import control_request

    if not file.is_file():
        _fail(f"no such file: {file}")
    path = file.resolve()
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), TimeElapsedColumn(), console=err,
                  disable=as_json or not err.is_terminal and path.stat().st_size < 64 << 20,
                  transient=False) as bar:
        tasks: dict[str, Any] = {}

        def progress(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                tasks[phase] = bar.add_task(f"{phase} {path.name}", total=total)
            bar.update(tasks[phase], completed=done, total=total)

        try:
            result = control_request(_site_dir(home), "send_tensor", site=site, path=str(path),
                                     name=name or path.name, timeout=timeout, progress=progress)
        except HiveError as exc:
            _fail(str(exc))
    if as_json:
        print(json.dumps(result))
        return
    stored = (result.get("result") or {}).get("path")
    console.print(f"sent {path.name} to {result['site']}: {result['bytes']:,} bytes in "
                  f"{result['seconds']:.2f}s ({result['mib_per_s']:.1f} MiB/s, {result['chunks']} "
                  f"chunk(s), {result['retransmits']} retransmit(s)); stored there as {stored}",
                  highlight=False, soft_wrap=True)


@app.command()
def call(site: SiteArg,
         method: Annotated[str, typer.Argument(help="RPC method, e.g. hive.site")],
         params: Annotated[str, typer.Argument(help="JSON parameters")] = "null",
         home: HomeOpt = None) -> None:
    """Call an RPC method on another site and print its JSON result."""
    try:
        value = json.loads(params)
    except ValueError as exc:
        _fail(f"params must be JSON ({exc}), e.g. '{{\"type\": \"echo\", \"payload\": 1}}'")
    print(json.dumps(_request(home, "call", site=site, method=method, params=value)))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())

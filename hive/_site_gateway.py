"""The cross-site bridge: each site's p2p node, as a hive Agent. The only hive module that
imports ``p2p`` (see docs/architecture.md: hive -> p2p only here).

Pieces:

- **Site files** under ``<home>/p2p/`` (the *site dir*): ``identity.key`` / ``identity.json``
  (``p2p.init_identity``: Ed25519, 0600, optional passphrase), ``allowlist.json`` (the peers
  this site talks to), ``gateway-state.json`` (republish cursor, last port), ``inbox/``
  (tensors received) and, while a node runs, ``control.json`` + its control socket
  (``hive/_site_control.py``).
- :class:`RemoteEvent`: the wire envelope of a hive event republished to other sites.
- :class:`SiteService`: a started :class:`p2p.Node` plus what a site does with it: resolve
  sites by name or peer id, redial allowlisted peers, RPC (``hive.site``,
  ``hive.events_since``), a tensor inbox, and the event bridge (tail the local EventLog,
  publish chosen event types on gossip topic ``hive.events/1``; record events from other
  sites as ``ext.event`` / ``p2p.remote_event``, deduplicated by origin peer id + seq).
  ``hive p2p up`` runs one in the foreground.
- :class:`SiteGateway`: a hive Agent owning a SiteService inside the cluster; the Coordinator
  reaches remote sites through its handlers (``p2p.sites``, ``p2p.call_site``,
  ``p2p.send_tensors``, ...). Its identity lives on disk, so a restart keeps its peer id.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import logging
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError
from typing_extensions import Self

from hive._agent import Agent, RespawnPolicy
from hive._config import COORDINATOR_NAME, NAMESPACE, resolve_home
from hive._events import ExtensionEvent, _EventBase
from hive._exceptions import ConfigError
from hive._site_control import ControlServer, Progress, control_info
from hive._tasks import handler
from p2p import (
    GossipMessage,
    IdentityError,
    Node,
    NodeConfig,
    P2PError,
    ReceivedTensors,
    SiteIdentity,
    SitePeer,
    init_identity,
    load_identity,
)

__all__ = [
    "DEFAULT_REPUBLISH",
    "EVENTS_TOPIC",
    "PASSPHRASE_ENV",
    "REMOTE_EVENT_TOPIC",
    "TENSORS_TOPIC",
    "RemoteEvent",
    "SiteGateway",
    "SiteService",
    "add_allowed",
    "init_site",
    "load_site",
    "read_allowlist",
    "site_dir",
]

log = logging.getLogger("hive.site_gateway")

EVENTS_TOPIC = "hive.events/1"  # gossip topic carrying RemoteEvent envelopes
REMOTE_EVENT_TOPIC = "p2p.remote_event"  # ext.event topic of an event received from a site
TENSORS_TOPIC = "p2p.tensors_received"  # ext.event topic of a tensor transfer received
PASSPHRASE_ENV = "HIVE_P2P_PASSPHRASE"  # passphrase of an encrypted site key
# Event types republished by default: what another site acts on (a rollback, a checkpoint
# it may fetch, work that was given up on, an agent that died).
DEFAULT_REPUBLISH = ("agent.failed", "checkpoint.created", "rollback.executed",
                     "task.dead_lettered")
ALLOWLIST_FILE = "allowlist.json"
STATE_FILE = "gateway-state.json"
INBOX_DIR = "inbox"
_BULKY = {"payload", "result", "spec", "exception", "traceback"}  # pickles: stay home
_MAX_EVENT_BYTES = 64 * 1024  # a larger envelope is sent with its payload left out


# ---- site files ---------------------------------------------------------------------------

def site_dir(home: str | os.PathLike[str] | None = None) -> Path:
    """The site directory of a hive home: ``<home>/p2p`` (not created)."""
    return resolve_home(home) / "p2p"


def _write_private(path: Path, text: str) -> None:
    """Atomically replace ``path`` with ``text``, mode 0600."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def init_site(directory: str | os.PathLike[str], site: str,
              passphrase: str | None = None) -> SiteIdentity:
    """Create the site identity in ``directory`` (Ed25519, key file 0600); never overwrites.

    Args:
        directory: the site dir, usually ``site_dir(home)``.
        site: the site's name, e.g. ``"eu-1"``.
        passphrase: encrypt the key with it (``None``: unencrypted, still 0600).

    Returns:
        The new identity (``.peer_id`` is what other sites allowlist).

    Raises:
        ConfigError: an identity already exists there, or the name is empty/invalid.

    Example:
        >>> ident = init_site(tmp / "p2p", "eu-1")        # doctest: +SKIP
        >>> ident.peer_id                                  # doctest: +SKIP
        '12D3KooW...'
    """
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", site or ""):
        raise ConfigError(f"site name {site!r} is not valid: use letters, digits, '.', '_' or "
                          "'-' (e.g. --site eu-1)", setting="site")
    try:
        return init_identity(directory, site, passphrase or None)
    except IdentityError as exc:
        raise ConfigError(f"{exc} (a site keeps its identity: delete {directory} by hand only "
                          "if you really mean to become a new peer)", path=str(directory)) from exc


def load_site(directory: str | os.PathLike[str], passphrase: str | None = None) -> SiteIdentity:
    """Load the site identity of ``directory`` (passphrase default: ``$HIVE_P2P_PASSPHRASE``).

    Raises:
        ConfigError: no identity yet (says to run ``hive p2p init``), bad permissions, or a
            missing/wrong passphrase.
    """
    root = Path(directory)
    if not (root / "identity.key").exists():
        raise ConfigError(f"no site identity in {root}: create one with "
                          "`hive p2p init --site <name>` (same --home)", path=str(root))
    secret = passphrase if passphrase is not None else os.environ.get(PASSPHRASE_ENV)
    try:
        return load_identity(root, secret or None)
    except IdentityError as exc:
        hint = f"; set ${PASSPHRASE_ENV}" if "encrypted" in str(exc) or "passphrase" in str(exc) \
            else ""
        raise ConfigError(f"{exc}{hint}", path=str(root)) from exc


def _split_addr(addr: str) -> tuple[str | None, str]:
    """``/ip4/1.2.3.4/tcp/5[/p2p/<id>]`` -> (peer id or None, transport part); validated.

    Raises:
        ConfigError: malformed, or not a TCP address.
    """
    from multiaddr import Multiaddr

    transport, sep, peer = addr.rpartition("/p2p/")
    if not sep:
        transport, peer = addr, ""
    try:
        if "/" in peer:
            raise ValueError("junk after the peer id")
        Multiaddr(transport)
        if peer:
            peer = SitePeer(peer_id=peer).peer_id
    except Exception as exc:
        raise ConfigError(f"malformed multiaddr {addr!r}: expected e.g. /ip4/10.0.0.2/tcp/4001 "
                          f"or /ip4/10.0.0.2/tcp/4001/p2p/12D3KooW... ({_first_line(exc)})",
                          setting="addr", address=addr) from exc
    if not transport.startswith(("/ip4/", "/ip6/", "/dns")) or "/tcp/" not in transport:
        raise ConfigError(f"multiaddr {addr!r} is not a TCP address such as "
                          "/ip4/10.0.0.2/tcp/4001", setting="addr", address=addr)
    return (peer or None), transport


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def read_allowlist(directory: str | os.PathLike[str]) -> list[SitePeer]:
    """The peers in ``<directory>/allowlist.json`` (empty when the file does not exist).

    Raises:
        ConfigError: the file is not a valid allowlist (the message names the entry).
    """
    path = Path(directory) / ALLOWLIST_FILE
    if not path.exists():
        return []
    try:
        doc = json.loads(path.read_text())
        return [SitePeer.model_validate(p) for p in doc.get("peers", [])]
    except (ValueError, ValidationError, AttributeError) as exc:
        raise ConfigError(f"{path} is not a valid allowlist ({_first_line(exc)}); fix or "
                          "remove it and re-run `hive p2p allow`", path=str(path)) from exc


def _write_allowlist(directory: Path, peers: Iterable[SitePeer]) -> None:
    doc = {"version": 1, "peers": [p.model_dump(mode="json") for p in
                                   sorted(peers, key=lambda p: (p.site, p.peer_id))]}
    _write_private(directory / ALLOWLIST_FILE, json.dumps(doc, indent=2) + "\n")


def add_allowed(directory: str | os.PathLike[str], peer_id: str, site: str,
                addrs: Sequence[str] = ()) -> SitePeer:
    """Put a site on the allowlist file (replacing an entry with the same peer id or name).

    Args:
        directory: the site dir.
        peer_id: the remote site's peer id (``hive p2p init`` printed it there).
        site: its name (how you address it: ``hive p2p ping us-2``).
        addrs: where it listens (``/ip4/.../tcp/4001``, a ``/p2p/<peer id>`` suffix must match).

    Returns:
        The stored entry.

    Raises:
        ConfigError: a malformed peer id or multiaddr, or an address of another peer.
    """
    transports = []
    for addr in addrs:
        pid, transport = _split_addr(addr)
        if pid is not None and pid != peer_id:
            raise ConfigError(f"--addr {addr!r} names peer {pid}, not {peer_id}", setting="addr")
        transports.append(transport)
    try:
        entry = SitePeer(peer_id=peer_id, site=site, addrs=tuple(dict.fromkeys(transports)))
    except ValidationError as exc:
        raise ConfigError(f"not a libp2p peer id: {peer_id!r} (expected 12D3KooW..., as "
                          "`hive p2p init` prints it)", setting="peer_id") from exc
    root = Path(directory)
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    keep = [p for p in read_allowlist(root) if p.peer_id != entry.peer_id
            and not (site and p.site == site)]
    _write_allowlist(root, [*keep, entry])
    return entry


# ---- the wire envelope ----------------------------------------------------------------------

class RemoteEvent(BaseModel):
    """A hive event as another site receives it (JSON on gossip and in ``hive.events_since``).

    Attributes:
        origin_site, origin_peer: the site that recorded it (``origin_peer`` must equal the
            gossip message's signed origin, so no site can speak for another).
        seq: its seq in the origin's EventLog: with ``origin_peer``, the dedup key.
        type, ts, event: the original event (bulky pickled fields left out).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    v: int = 1
    origin_site: str
    origin_peer: str
    seq: int
    type: str
    ts: float
    event: dict[str, Any]

    @classmethod
    def of(cls, ev: _EventBase, site: str, peer_id: str) -> RemoteEvent:
        """Wrap a local event (its bulky pickled fields stay home)."""
        body = ev.model_dump(mode="json", exclude=_BULKY & set(type(ev).model_fields))
        env = cls(origin_site=site, origin_peer=peer_id, seq=int(ev.seq or 0), type=ev.type,
                  ts=ev.ts, event=body)
        if len(env.model_dump_json()) > _MAX_EVENT_BYTES:
            env = env.model_copy(update={"event": {"truncated": True, "type": ev.type}})
        return env


def _republishable(ev: _EventBase) -> bool:
    """Never send on what came from a site (or the bridge's own records): no echo loops."""
    return not (isinstance(ev, ExtensionEvent) and ev.topic.startswith("p2p."))


# ---- the service --------------------------------------------------------------------------

Recorder = Callable[[ExtensionEvent], Any]


class SiteService:
    """A site's running p2p node and what the site does with it.

    Args:
        identity: this site's identity (``load_site``).
        directory: the site dir (allowlist file, inbox, state, control socket); ``None`` for
            a throw-away in-memory site (no files, no control socket).
        listen: multiaddr to listen on (port 0: any; reuses the last port after a restart).
        peers: extra allowlist entries besides ``allowlist.json``.
        bootstrap: ``<multiaddr>/p2p/<peer id>`` addresses to dial at start (must be
            allowlisted).
        events_path: the hive EventLog to tail for events to republish; ``None``: no
            republishing.
        record: how events received from other sites (and tensors) are recorded locally;
            ``None``: kept in memory only (``remote_events()``).
        republish: event types sent to the other sites.
        topic: the gossip topic of the event bridge.
        agent_id: stamped on the events this service records.
        methods: extra RPC methods other sites may call: ``{name: fn(params, peer_id)}``.
        control: serve the local control socket (``hive p2p peers|ping|...``).
        cursor: republish the events after this seq (default: from ``gateway-state.json``,
            else from the end of the log as of the first start).
        catchup_s: seconds between catch-up pulls from connected sites (``hive.events_since``):
            what gossip lost (a partition, a message before the mesh formed) arrives then.
        settings: further :class:`p2p.NodeConfig` fields.
    """

    def __init__(self, identity: SiteIdentity, *, directory: Path | None = None,
                 listen: str = "/ip4/127.0.0.1/tcp/0", peers: Sequence[SitePeer] = (),
                 bootstrap: Sequence[str] = (), events_path: Path | None = None,
                 record: Recorder | None = None, republish: Sequence[str] = DEFAULT_REPUBLISH,
                 topic: str = EVENTS_TOPIC, agent_id: str | None = None,
                 methods: Mapping[str, Callable[[Any, str], Any]] | None = None,
                 control: bool = True, cursor: int | None = None, catchup_s: float = 5.0,
                 **settings: Any) -> None:
        self.identity = identity
        self.directory = directory
        self.site = identity.site
        self.events_path = events_path
        self.republish = tuple(republish)
        self.topic = topic
        self.agent_id = agent_id
        self.catchup_s = catchup_s
        self._record_fn = record
        self._methods = dict(methods or {})
        self._want_control = control and directory is not None
        boot = [_split_addr(b) for b in bootstrap]
        for pid, _ in boot:
            if pid is None:
                raise ConfigError("--bootstrap addresses end in /p2p/<peer id>, e.g. "
                                  "/ip4/10.0.0.2/tcp/4001/p2p/12D3KooW...", setting="bootstrap")
        file_peers = read_allowlist(directory) if directory is not None else []
        allowed = {p.peer_id: p for p in [*file_peers, *peers]}
        for (pid, transport), raw in zip(boot, bootstrap):
            assert pid is not None
            if pid not in allowed:
                raise ConfigError(f"bootstrap peer {pid} ({raw}) is not on this site's "
                                  f"allowlist: run `hive p2p allow {pid} --site <name>` first",
                                  setting="bootstrap", peer_id=pid)
            entry = allowed[pid]
            if transport not in entry.addrs:
                allowed[pid] = entry.model_copy(update={"addrs": (*entry.addrs, transport)})
        self._state = self._load_state()
        self._listen = self._reuse_port(listen)
        self.config = NodeConfig(identity=identity, listen=self._listen,
                                 peers=tuple(allowed.values()),
                                 **{"dial_timeout": 3.0, "handler_threads": 4, **settings})
        self.node = Node(self.config)
        # p2p versions with NodeConfig.reconnect redial allowlisted sites themselves
        self._native_redial = bool(getattr(self.config, "reconnect", False))
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._control: ControlServer | None = None
        self._seen: set[tuple[str, int]] = set()  # (origin peer, seq) already recorded
        self._high: dict[str, int] = {}  # origin peer -> highest seq recorded from it
        self._recent: deque[dict[str, Any]] = deque(maxlen=1000)
        self._received: deque[dict[str, Any]] = deque(maxlen=100)
        self._members: dict[str, dict[str, Any]] = {}  # peer id -> state, since, attempts
        self._next_dial: dict[str, float] = {}
        self._backoff: dict[str, float] = {}
        self.stats = {"published": 0, "delivered": 0, "duplicates": 0, "rejected": 0,
                      "caught_up": 0}
        start_cursor = cursor if cursor is not None else self._state.get("cursor")
        self.cursor: int | None = None if start_cursor is None else int(start_cursor)
        self.first_seq = int(self._state.get("first_seq", self.cursor or 0))

    # ---- lifecycle ----------------------------------------------------------------------

    def start(self) -> SiteService:
        """Listen, serve, dial the bootstrap/allowlisted peers, start the event bridge."""
        if self._want_control:
            assert self.directory is not None
            running = control_info(self.directory)
            if running is not None and int(running["pid"]) != os.getpid():
                raise ConfigError(
                    f"the site in {self.directory} already runs in pid {running['pid']} (peer "
                    f"{running.get('peer_id')}); stop that one first", path=str(self.directory))
        try:
            self.node.start()
        except P2PError:
            if self._listen == self._requested_listen:
                raise
            # the port this site had before its restart is taken now: any port will do
            self.config = dataclasses.replace(self.config, listen=self._requested_listen)
            self.node = Node(self.config)
            self.node.start()
        self.node.register("hive.site", self._rpc_site)
        self.node.register("hive.events_since", self._rpc_events_since)
        for name, fn in self._methods.items():
            self.node.register(name, fn)
        self.node.on_tensors(self._on_tensors)
        self.node.subscribe(self.topic, self._on_gossip)
        self._load_seen()
        if self.events_path is not None:
            if self.cursor is None:
                self.cursor = self._log_last_seq()
                self.first_seq = self.cursor
            self._spawn(self._tail_loop, "hive-p2p-republish")
        self._save_state()
        self._spawn(self._maintain_loop, "hive-p2p-members")
        if self._want_control:
            assert self.directory is not None
            self._control = ControlServer(self.directory, self.dispatch,
                                          {"site": self.site, "peer_id": self.peer_id,
                                           "addrs": self.node.addrs})
        return self

    def close(self) -> None:
        """Stop the bridge, the control socket and the node (idempotent)."""
        self._stop.set()
        if self._control is not None:
            self._control.close()
            self._control = None
        for t in self._threads:
            t.join(timeout=5)
        self._save_state()
        self.node.close()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    @property
    def peer_id(self) -> str:
        """This site's peer id."""
        return self.node.peer_id

    # ---- persistent state (cursor, port) -----------------------------------------------

    def _load_state(self) -> dict[str, Any]:
        if self.directory is None:
            return {}
        try:
            state = json.loads((self.directory / STATE_FILE).read_text())
            return state if isinstance(state, dict) else {}
        except (OSError, ValueError):
            return {}

    def _save_state(self) -> None:
        if self.directory is None:
            return
        addrs = self.node.addrs if self._running() else self._state.get("addrs", [])
        state = {"cursor": self.cursor, "first_seq": self.first_seq, "addrs": addrs,
                 "peer_id": self.identity.peer_id}
        with contextlib.suppress(OSError):
            _write_private(self.directory / STATE_FILE, json.dumps(state, indent=2))
        self._state = state

    def _running(self) -> bool:
        try:
            return bool(self.node.addrs)
        except P2PError:
            return False

    def _reuse_port(self, listen: str) -> str:
        """``.../tcp/0`` -> the port this site had before a restart (peers know it)."""
        self._requested_listen = listen
        if not listen.endswith("/tcp/0"):
            return listen
        for addr in self._state.get("addrs", []):
            m = re.search(r"/tcp/(\d+)", addr)
            if m and addr.startswith(listen[: -len("/tcp/0")]):
                return f"{listen[: -len('/tcp/0')]}/tcp/{m.group(1)}"
        return listen

    # ---- sites --------------------------------------------------------------------------

    def resolve(self, site: str) -> SitePeer:
        """The allowlisted site named ``site`` (site name or peer id).

        Raises:
            ConfigError: no such site (the message lists the known ones).
        """
        peers = self.node.allowlist.peers()
        for p in peers:
            if p.peer_id == site:
                return p
        named = [p for p in peers if p.site == site]
        if len(named) == 1:
            return named[0]
        known = ", ".join(f"{p.site or '?'} ({p.peer_id})" for p in peers) or "none"
        if named:
            raise ConfigError(f"several sites are named {site!r}; use the peer id: {known}",
                              site=site)
        raise ConfigError(f"unknown site {site!r}; known sites: {known}. Add one with "
                          f"`hive p2p allow <peer-id> --site {site}`", site=site)

    def allow(self, peer_id: str, site: str, addrs: Sequence[str] = ()) -> SitePeer:
        """Allowlist a site now (and in ``allowlist.json`` when the service has a site dir)."""
        if self.directory is not None:
            entry = add_allowed(self.directory, peer_id, site, addrs)
        else:
            entry = SitePeer(peer_id=peer_id, site=site,
                             addrs=tuple(_split_addr(a)[1] for a in addrs))
        for old in self.node.allowlist.peers():
            if site and old.site == site and old.peer_id != entry.peer_id:
                self.node.disallow(old.peer_id)
        self.node.allow(entry)
        self._next_dial.pop(entry.peer_id, None)
        return entry

    def sites(self) -> list[dict[str, Any]]:
        """Membership: one row per allowlisted site (state, RTT, addresses, last change)."""
        connected = set(self.node.connected_peers())
        members = self._node_members()
        rows = []
        for p in self.node.allowlist.peers():
            mine = self._members.get(p.peer_id, {})
            native = members.get(p.peer_id, {})
            state = native.get("state") or ("connected" if p.peer_id in connected
                                            else mine.get("state", "unknown"))
            rows.append({"site": p.site, "peer_id": p.peer_id, "state": state,
                         "connected": p.peer_id in connected, "addrs": list(p.addrs),
                         "rtt_ms": native.get("rtt_ms"),
                         "since": mine.get("since"), "last_seen": native.get("last_seen"),
                         "dial_failures": mine.get("failures", 0),
                         "last_error": mine.get("error")})
        return sorted(rows, key=lambda r: (r["site"], r["peer_id"]))

    def _node_members(self) -> dict[str, dict[str, Any]]:
        """Membership as the node tracks it (states, RTT), where this p2p version does."""
        members = getattr(self.node, "members", None)
        if members is None:
            return {}
        try:
            return {m.peer_id: {"state": str(m.state), "rtt_ms": m.rtt_ms,
                                "last_seen": m.last_seen} for m in members()}
        except Exception as exc:  # noqa: BLE001 - fall back to our own view
            log.debug("node membership unavailable: %s", exc)
            return {}

    def ping(self, site: str, timeout: float = 10.0) -> dict[str, Any]:
        """Round trip to ``site`` (the node's liveness ping where it has one, else an RPC to
        the site's ``hive.site``), connecting first if needed."""
        peer = self.resolve(site)
        t0 = time.perf_counter()
        was = peer.peer_id in self.node.connected_peers()
        if not was:
            self._connect(peer)
        t1 = time.perf_counter()
        native = getattr(self.node, "ping", None)
        if native is not None:
            rtt_ms = float(native(peer.peer_id, timeout=timeout)) * 1000
        else:
            self.node.call(peer.peer_id, "hive.site", None, timeout=timeout)
            rtt_ms = (time.perf_counter() - t1) * 1000
        return {"site": peer.site, "peer_id": peer.peer_id, "rtt_ms": rtt_ms,
                "connect_ms": None if was else (t1 - t0) * 1000}

    def call(self, site: str, method: str, params: Any = None,
             timeout: float | None = None) -> Any:
        """RPC ``method(params)`` on ``site`` (name or peer id); returns its JSON result."""
        peer = self.resolve(site)
        self._connect(peer)
        return self.node.call(peer.peer_id, method, params, timeout=timeout)

    def send_tensors(self, site: str, tensors: Mapping[str, Any] | bytes | None = None, *,
                     path: str | os.PathLike[str] | None = None, name: str = "",
                     metadata: Mapping[str, str] | None = None,
                     progress: Progress | None = None,
                     timeout: float | None = None) -> dict[str, Any]:
        """Send tensors (a dict of arrays, safetensors bytes, or a ``.safetensors`` file) to
        ``site``; returns the transfer stats and where the receiver stored it.

        Raises:
            ConfigError: unknown site, missing or non-safetensors file.
            P2PError: the transfer failed (``RemoteError`` carries the receiver's reason).
        """
        peer = self.resolve(site)
        if (tensors is None) == (path is None):
            raise ConfigError("send_tensors needs exactly one of tensors= or path=",
                              setting="tensors")
        if path is not None:
            file = Path(path)
            if not file.is_file():
                raise ConfigError(f"no such file: {file}", path=str(file))
            tensors = _read_file(file, progress)
            name = name or file.name
        assert tensors is not None
        if isinstance(tensors, (bytes, bytearray)) and not _looks_like_safetensors(tensors):
            raise ConfigError(f"{path or 'the bytes'} is not a safetensors file (bad header)",
                              path=str(path))
        self._connect(peer)
        kwargs: dict[str, Any] = {"name": name, "metadata": metadata, "timeout": timeout}
        size = len(tensors) if isinstance(tensors, (bytes, bytearray)) else 0
        if progress is not None and "progress" in inspect.signature(
                self.node.send_tensors).parameters:
            kwargs["progress"] = lambda done, total: progress("send", done, total)
        elif progress is not None and size:
            progress("send", 0, size)
        stats = self.node.send_tensors(peer.peer_id, tensors, **kwargs)
        if progress is not None:
            progress("send", stats.bytes, stats.bytes)
        out = asdict(stats)
        out.update(site=peer.site, peer_id=peer.peer_id,
                   mib_per_s=stats.bytes / max(stats.seconds, 1e-9) / 2**20)
        return out

    def _connect(self, peer: SitePeer) -> None:
        """Make sure ``peer`` is connected (dialling its allowlisted addresses in turn)."""
        if peer.peer_id in self.node.connected_peers():
            return
        if not peer.addrs:
            raise ConfigError(f"site {peer.site or peer.peer_id} is not connected and has no "
                              f"address: add one with `hive p2p allow {peer.peer_id} --site "
                              f"{peer.site or '<name>'} --addr /ip4/.../tcp/4001`",
                              site=peer.site)
        errors: list[P2PError] = []
        for addr in peer.addrs:
            try:
                self.node.connect(f"{addr}/p2p/{peer.peer_id}")
                return
            except P2PError as exc:
                errors.append(exc)
        raise errors[0]

    # ---- received tensors ---------------------------------------------------------------

    def _on_tensors(self, received: ReceivedTensors) -> dict[str, Any]:
        entry = self.node.allowlist.get(received.peer_id)
        origin_site = entry.site if entry else ""
        stem = re.sub(r"[^A-Za-z0-9._-]", "_", Path(received.name).name or "tensors")[:80]
        stem = stem.removesuffix(".safetensors")
        info: dict[str, Any] = {
            "from_site": origin_site, "from_peer": received.peer_id, "name": received.name,
            "transfer_id": received.transfer_id, "bytes": len(received.data),
            "tensors": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)}
                        for t in received.tensors], "path": None}
        if self.directory is not None:
            inbox = self.directory / INBOX_DIR
            inbox.mkdir(mode=0o700, exist_ok=True)
            target = inbox / f"{stem}-{received.transfer_id[:8]}.safetensors"
            tmp = target.with_suffix(".part")
            with open(tmp, "wb") as fh:
                fh.write(received.data)
            os.replace(tmp, target)
            info["path"] = str(target)
        self._received.append({**info, "at": time.time()})
        if self._record_fn is not None:
            self._record_fn(ExtensionEvent(topic=TENSORS_TOPIC, agent_id=self.agent_id,
                                           data=info))
        return {"site": self.site, "path": info["path"], "bytes": info["bytes"]}

    def received_tensors(self) -> list[dict[str, Any]]:
        """The latest tensor transfers received (newest last)."""
        return list(self._received)

    # ---- the event bridge ---------------------------------------------------------------

    def _log(self, readonly: bool = True) -> Any:
        from hive._eventlog import EventLog

        assert self.events_path is not None
        return EventLog(self.events_path, readonly=readonly)

    def _log_last_seq(self) -> int:
        if self.events_path is None or not self.events_path.exists():
            return 0
        with self._log() as evlog:
            return int(evlog.last_seq())

    def _load_seen(self) -> None:
        """Rebuild the dedup set from what the EventLog already holds (survives restarts)."""
        if self.events_path is None or not self.events_path.exists():
            return
        with self._log() as evlog:
            for ev in evlog.query(types="ext.event"):
                if isinstance(ev, ExtensionEvent) and ev.topic == REMOTE_EVENT_TOPIC:
                    self._mark_seen(str(ev.data.get("origin_peer")), int(ev.data.get("seq", -1)))

    def _mark_seen(self, origin: str, seq: int) -> None:
        self._seen.add((origin, seq))
        self._high[origin] = max(self._high.get(origin, 0), seq)

    def _tail_loop(self) -> None:
        while not self._stop.is_set():
            if self.events_path is None or not self.events_path.exists():
                self._stop.wait(0.5)
                continue
            try:
                with self._log() as evlog:
                    for ev in evlog.follow(after_seq=self.cursor, types=list(self.republish),
                                           poll_s=0.05, stop=self._stop):
                        if _republishable(ev):
                            env = RemoteEvent.of(ev, self.site, self.peer_id)
                            self.node.publish(self.topic, env.model_dump_json().encode())
                            self.stats["published"] += 1
                        self.cursor = ev.seq
                        self._save_state()
            except Exception:  # keep bridging; the cursor says where we were
                if not self._stop.is_set():
                    log.exception("republishing hive events failed; retrying")
                    self._stop.wait(1.0)

    def _rpc_events_since(self, params: Any, peer: str) -> dict[str, Any]:
        """``hive.events_since {after, limit}``: what a site missed (e.g. in a partition)."""
        if self.events_path is None or not self.events_path.exists():
            return {"events": [], "last": 0}
        after = max(int((params or {}).get("after", 0)), self.first_seq)
        limit = min(int((params or {}).get("limit", 500)), 2000)
        cap = self.cursor if self.cursor is not None else 0
        with self._log() as evlog:
            found = [e for e in evlog.query(types=list(self.republish), after_seq=after,
                                            limit=limit) if (e.seq or 0) <= cap]
        envs = [RemoteEvent.of(e, self.site, self.peer_id).model_dump(mode="json")
                for e in found if _republishable(e)]
        return {"events": envs, "last": found[-1].seq if found else after}

    def _rpc_site(self, params: Any, peer: str) -> dict[str, Any]:
        return {"site": self.site, "peer_id": self.peer_id, "time": time.time()}

    def _on_gossip(self, msg: GossipMessage) -> None:
        try:
            env = RemoteEvent.model_validate_json(msg.data)
        except ValidationError:
            self.stats["rejected"] += 1
            log.warning("dropped a malformed event envelope from %s", msg.origin)
            return
        if env.origin_peer != msg.origin:
            self.stats["rejected"] += 1
            log.warning("dropped an event from %s claiming origin %s", msg.origin,
                        env.origin_peer)
            return
        self._deliver(env)

    def _deliver(self, env: RemoteEvent) -> bool:
        """Record ``env`` once: False for our own, unknown origins and duplicates."""
        if env.origin_peer == self.peer_id or not self.node.allowlist.allows(env.origin_peer):
            return False
        key = (env.origin_peer, env.seq)
        with self._lock:
            if key in self._seen:
                self.stats["duplicates"] += 1
                return False
            self._seen.add(key)
        data = {"origin_site": env.origin_site, "origin_peer": env.origin_peer, "seq": env.seq,
                "type": env.type, "ts": env.ts, "event": env.event}
        try:
            if self._record_fn is not None:
                self._record_fn(ExtensionEvent(topic=REMOTE_EVENT_TOPIC, agent_id=self.agent_id,
                                               data=data))
        except Exception:
            with self._lock:
                self._seen.discard(key)  # not recorded: a later copy (or catch-up) may be
            raise
        with self._lock:
            self._high[env.origin_peer] = max(self._high.get(env.origin_peer, 0), env.seq)
            self.stats["delivered"] += 1
        self._recent.append(data)
        return True

    def remote_events(self) -> list[dict[str, Any]]:
        """The latest events received from other sites (newest last)."""
        return list(self._recent)

    def catch_up(self, peer_id: str) -> int:
        """Ask ``peer_id`` for the events we have not recorded yet; returns how many were new."""
        new = 0
        after = self._high.get(peer_id, 0)
        for _ in range(100):  # at most 100 pages per round
            page: Any = self.node.call(peer_id, "hive.events_since",
                                       {"after": after, "limit": 500}, timeout=30)
            events = (page.get("events") or []) if isinstance(page, dict) else []
            for raw in events:
                env = RemoteEvent.model_validate(raw)
                if env.origin_peer == peer_id and self._deliver(env):
                    new += 1
            if not events or int(page.get("last", after)) <= after:
                break
            after = int(page["last"])
        self.stats["caught_up"] += new
        return new

    def sync(self) -> int:
        """Catch up from every connected site now; returns how many events were new."""
        return sum(self._safe_catch_up(p) for p in self.node.connected_peers()
                   if self.node.allowlist.allows(p))

    def _safe_catch_up(self, peer_id: str) -> int:
        try:
            return self.catch_up(peer_id)
        except Exception as exc:  # noqa: BLE001 - a site without the bridge, or gone again
            log.info("catch-up from %s failed: %s", peer_id, exc)
            return 0

    # ---- membership upkeep: redial, catch up on (re)connect ------------------------------

    def _maintain_loop(self) -> None:
        known: set[str] = set()
        bridged = self.events_path is not None or self._record_fn is not None
        next_sync = time.monotonic() + self.catchup_s
        while not self._stop.wait(0.1):
            if bridged and time.monotonic() >= next_sync:
                # gossip is best effort (a message published before the mesh formed, or during
                # a partition, is gone): pull what was missed, deduplicated like the rest
                self.sync()
                next_sync = time.monotonic() + self.catchup_s
            try:
                connected = set(self.node.connected_peers())
            except Exception as exc:  # noqa: BLE001 - the node is stopping
                log.debug("membership check failed: %s", exc)
                continue
            now = time.time()
            for pid in connected - known:
                self._members[pid] = {"state": "connected", "since": now, "failures": 0}
                self._backoff.pop(pid, None)
                if bridged:
                    self._safe_catch_up(pid)
            for pid in known - connected:
                self._members[pid] = {"state": "disconnected", "since": now, "failures": 0}
                self._next_dial[pid] = time.monotonic()  # redial at once, then back off
            known = connected
            if self._native_redial:
                continue  # the node keeps its links up itself
            for peer in self.node.allowlist.peers():
                if peer.peer_id in connected or not peer.addrs or self._stop.is_set():
                    continue
                if time.monotonic() < self._next_dial.get(peer.peer_id, 0.0):
                    continue
                try:
                    self._connect(peer)
                except Exception as exc:  # noqa: BLE001 - unreachable for now: back off
                    delay = min(2.0, self._backoff.get(peer.peer_id, 0.05) * 2)
                    self._backoff[peer.peer_id] = delay
                    self._next_dial[peer.peer_id] = time.monotonic() + delay
                    m = self._members.setdefault(peer.peer_id, {"since": now, "failures": 0})
                    if m.get("state") != "unreachable":
                        m.update(state="unreachable", since=now)
                    m["failures"] = m.get("failures", 0) + 1
                    m["error"] = _first_line(exc)[:200]

    # ---- control socket -----------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """Site name, peer id, listen addresses, bridge settings and counters."""
        return {"site": self.site, "peer_id": self.peer_id, "addrs": self.node.addrs,
                "directory": str(self.directory) if self.directory else None,
                "topic": self.topic, "republish": list(self.republish), "cursor": self.cursor,
                "mesh": self.node.topic_peers(self.topic), "stats": dict(self.stats)}

    def dispatch(self, op: str, params: dict[str, Any], progress: Progress) -> Any:
        """Serve one control request (see ``hive/_site_control.py``)."""
        if op == "info":
            return self.info()
        if op == "peers":
            return self.sites()
        if op == "ping":
            return self.ping(str(params["site"]), float(params.get("timeout", 10.0)))
        if op == "call":
            return self.call(str(params["site"]), str(params["method"]), params.get("params"),
                             params.get("timeout"))
        if op == "send_tensor":
            return self.send_tensors(str(params["site"]), path=params["path"],
                                     name=str(params.get("name") or ""), progress=progress,
                                     timeout=params.get("timeout"))
        if op == "allow":
            entry = self.allow(str(params["peer_id"]), str(params.get("site") or ""),
                               list(params.get("addrs") or ()))
            return entry.model_dump(mode="json")
        if op == "events":
            return {"remote": self.remote_events(), "tensors": self.received_tensors()}
        raise ConfigError(f"unknown control op {op!r}; known: allow, call, events, info, "
                          "peers, ping, send_tensor", setting="op")


def _looks_like_safetensors(data: bytes | bytearray) -> bool:
    if len(data) < 8:
        return False
    size = int.from_bytes(data[:8], "little")
    return 2 <= size <= len(data) - 8 and data[8:9] == b"{"


def _read_file(path: Path, progress: Progress | None, step: int = 16 << 20) -> bytes:
    """Read ``path`` (reporting progress as phase ``"read"``)."""
    total = path.stat().st_size
    buf = bytearray(total)
    view = memoryview(buf)
    done = 0
    with open(path, "rb") as fh:
        while done < total:
            n = fh.readinto(view[done:done + step])
            if not n:
                break
            done += n
            if progress is not None:
                progress("read", done, total)
    del view
    return bytes(buf) if done == total else bytes(buf[:done])


# ---- the agent ----------------------------------------------------------------------------

class SiteGateway(Agent):
    """A site's p2p gateway as a hive Agent: republishes chosen hive events to the other
    sites, records theirs (``ext.event`` / ``p2p.remote_event``), and lets tasks reach them.

    Its identity is the site identity in ``<home>/p2p`` (create it with ``hive p2p init``),
    its allowlist ``<home>/p2p/allowlist.json`` (``hive p2p allow``); a restarted gateway
    keeps its peer id, its port and its republish cursor.

    Args:
        directory: the site dir (default ``<home>/p2p`` of the Coordinator's home).
        listen: multiaddr to listen on.
        bootstrap: addresses ``.../p2p/<peer id>`` to dial at start.
        republish: event types sent to the other sites.
        topic: gossip topic of the bridge (sites must agree).
        accept_tasks: let other sites run hive tasks here (RPC ``hive.task``).
        control: serve the local control socket (``hive p2p peers|ping|send-tensor``).
        catchup_s: seconds between pulls of missed events from connected sites.

    Tasks it handles (submit them through the Coordinator):
        ``p2p.info`` -> site, peer id, addrs, counters; ``p2p.sites`` -> membership rows;
        ``p2p.ping`` site -> rtt; ``p2p.call_site`` {site, method, params, timeout} -> result;
        ``p2p.send_tensors`` {site, tensors | path, name, metadata} -> transfer stats;
        ``p2p.allow`` {peer_id, site, addrs}; ``p2p.remote_events``; ``p2p.sync``.

    Example:
        >>> client.spawn(hive.SiteGateway, listen="/ip4/0.0.0.0/tcp/4001")   # doctest: +SKIP
        >>> client.submit("p2p.sites").result()                               # doctest: +SKIP
        [{'site': 'us-2', 'peer_id': '12D3KooW...', 'state': 'connected', ...}]
    """

    kind = "site-gateway"
    max_concurrency = 8
    respawn = RespawnPolicy(max_restarts=1000)

    def __init__(self, directory: str | os.PathLike[str] | None = None,
                 listen: str = "/ip4/0.0.0.0/tcp/4001", bootstrap: Sequence[str] = (),
                 republish: Sequence[str] = DEFAULT_REPUBLISH, topic: str = EVENTS_TOPIC,
                 accept_tasks: bool = False, control: bool = True,
                 catchup_s: float = 5.0) -> None:
        self.catchup_s = catchup_s
        self.directory = None if directory is None else Path(directory)
        self.listen = listen
        self.bootstrap = tuple(bootstrap)
        self.republish = tuple(republish)
        self.topic = topic
        self.accept_tasks = accept_tasks
        self.control = control
        self.service: SiteService | None = None
        self._restored_cursor: int | None = None

    # ---- lifecycle ----------------------------------------------------------------------

    def on_start(self) -> None:
        import ray

        coord = ray.get_actor(COORDINATOR_NAME, namespace=NAMESPACE)
        home = Path(ray.get(coord.ping.remote(), timeout=60)["home"])
        directory = self.directory or home / "p2p"
        identity = load_site(directory)

        def record(event: ExtensionEvent) -> None:
            ray.get(coord.record_event.remote(event.model_dump_json()), timeout=60)

        methods = {"hive.task": self._rpc_task} if self.accept_tasks else {}
        self.service = SiteService(
            identity, directory=directory, listen=self.listen, bootstrap=self.bootstrap,
            events_path=home / "events.db", record=record, republish=self.republish,
            topic=self.topic, agent_id=self.agent_id, methods=methods, control=self.control,
            cursor=self._restored_cursor, catchup_s=self.catchup_s).start()

    def on_stop(self) -> None:
        if self.service is not None:
            self.service.close()

    def checkpoint(self) -> Any:
        return None if self.service is None else {"cursor": self.service.cursor}

    def restore(self, state: Any) -> None:
        if isinstance(state, dict) and state.get("cursor") is not None:
            self._restored_cursor = int(state["cursor"])

    def _svc(self) -> SiteService:
        if self.service is None:
            raise ConfigError("the site gateway has not started its node yet")
        return self.service

    def _rpc_task(self, params: Any, peer: str) -> Any:
        """``hive.task {type, payload, timeout}``: run a hive task on this site for a peer."""
        import ray

        from hive._client import Client
        from hive._config import HiveConfig

        if not isinstance(params, dict) or not isinstance(params.get("type"), str):
            raise ConfigError('hive.task takes {"type": <task type>, "payload": <JSON>}')
        coord = ray.get_actor(COORDINATOR_NAME, namespace=NAMESPACE)
        home = Path(ray.get(coord.ping.remote(), timeout=60)["home"])
        client = Client(coord, HiveConfig(home=home))
        return client.submit(params["type"], params.get("payload")).result(
            timeout=float(params.get("timeout", 60)))

    # ---- handlers -----------------------------------------------------------------------

    @handler("p2p.info")
    def p2p_info(self, payload: Any = None) -> dict[str, Any]:
        """Site, peer id, listen addresses, bridge counters."""
        return self._svc().info()

    @handler("p2p.sites")
    def sites(self, payload: Any = None) -> list[dict[str, Any]]:
        """Membership: one row per allowlisted site."""
        return self._svc().sites()

    @handler("p2p.ping")
    def ping(self, payload: Any) -> dict[str, Any]:
        """Round trip to a site: payload = site name or peer id (or {"site": ...})."""
        site = payload.get("site") if isinstance(payload, dict) else payload
        return self._svc().ping(str(site))

    @handler("p2p.call_site")
    def call_site(self, payload: dict[str, Any]) -> Any:
        """RPC on a site: payload = {"site", "method", "params", "timeout"}."""
        return self._svc().call(str(payload["site"]), str(payload["method"]),
                                payload.get("params"), payload.get("timeout"))

    @handler("p2p.send_tensors")
    def send_tensors(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Send tensors: payload = {"site", "tensors" (dict or safetensors bytes) | "path",
        "name", "metadata", "timeout"}."""
        return self._svc().send_tensors(
            str(payload["site"]), payload.get("tensors"), path=payload.get("path"),
            name=str(payload.get("name") or ""), metadata=payload.get("metadata"),
            timeout=payload.get("timeout"))

    @handler("p2p.allow")
    def allow(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Allowlist a site now and on disk: payload = {"peer_id", "site", "addrs"}."""
        entry = self._svc().allow(str(payload["peer_id"]), str(payload.get("site") or ""),
                                  list(payload.get("addrs") or ()))
        return entry.model_dump(mode="json")

    @handler("p2p.remote_events")
    def remote_events(self, payload: Any = None) -> list[dict[str, Any]]:
        """The latest events received from other sites."""
        return self._svc().remote_events()

    @handler("p2p.sync")
    def sync(self, payload: Any = None) -> int:
        """Pull missed events from every connected site now; returns how many were new."""
        return self._svc().sync()

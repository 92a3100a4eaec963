"""The local control channel of a running site node (``hive p2p up`` or a SiteGateway agent).

``hive p2p peers|ping|send-tensor|call`` are separate processes; they reach the process that
owns the site's node through a Unix domain socket next to the site identity:

- ``<site dir>/control.json`` (mode 0600) names the socket, the owner's pid, peer id and
  addresses; it is written once the node listens and removed when it stops.
- the socket itself (mode 0600, in a 0700 directory): only the site's own user gets in.

Protocol: the client writes one JSON object and a newline (``{"op": "peers", ...}``); the
server answers with zero or more progress lines (``{"progress": done, "total": n, "phase":
"send"}``) and one
final line, ``{"ok": true, "result": ...}`` or ``{"ok": false, "error": ..., "type": ...}``.
This module knows nothing of p2p; the server dispatches to a callable it is given.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import socketserver
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from hive._exceptions import ConfigError, HiveError

__all__ = ["CONTROL_FILE", "ControlServer", "control_info", "control_request"]

CONTROL_FILE = "control.json"
_SOCKET_NAME = "control.sock"
_MAX_SUN_PATH = 100  # sockaddr_un.sun_path holds 108 bytes on Linux; keep a margin

# progress(phase, done, total): e.g. ("read", 2 MiB, 8 MiB), then ("send", ...)
Progress = Callable[[str, int, int], None]
# (op, params, progress) -> JSON result; raise to report an error to the client
Dispatch = Callable[[str, dict[str, Any], Progress], Any]


def _socket_path(site_dir: Path) -> Path:
    """The socket path: inside the site dir, or under the temp dir if that path is too long."""
    inside = site_dir / _SOCKET_NAME
    if len(str(inside)) <= _MAX_SUN_PATH:
        return inside
    digest = hashlib.sha256(str(site_dir).encode()).hexdigest()[:16]
    private = Path(tempfile.gettempdir()) / f"hive-p2p-{os.getuid()}"
    private.mkdir(mode=0o700, exist_ok=True)
    os.chmod(private, 0o700)
    return private / f"{digest}.sock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def control_info(site_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """What the running node of ``site_dir`` published (socket, pid, peer id, addrs), or
    ``None`` when no live process owns the site's node."""
    path = Path(site_dir) / CONTROL_FILE
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or not _alive(int(info.get("pid", -1))):
        return None
    return info


class _Handler(socketserver.StreamRequestHandler):
    server: _Server

    def handle(self) -> None:
        def send(obj: dict[str, Any]) -> None:
            self.wfile.write(json.dumps(obj, default=str).encode() + b"\n")
            self.wfile.flush()

        try:
            request = json.loads(self.rfile.readline(1 << 20) or b"null")
            if not isinstance(request, dict) or not isinstance(request.get("op"), str):
                raise ConfigError('a control request is one JSON object with an "op" string')
            op = request.pop("op")
            result = self.server.dispatch(op, request, lambda phase, done, total: send(
                {"progress": int(done), "total": int(total), "phase": phase}))
            send({"ok": True, "result": result})
        except (BrokenPipeError, ConnectionResetError):
            return
        except Exception as exc:  # noqa: BLE001 - reported to the client, the server carries on
            with contextlib.suppress(OSError):
                send({"ok": False, "type": type(exc).__name__, "error": str(exc)})


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    dispatch: Dispatch


class ControlServer:
    """Serve the control socket of a site node on a background thread.

    Args:
        site_dir: the site directory (holds ``control.json``).
        dispatch: ``dispatch(op, params, progress) -> JSON``.
        info: published in ``control.json`` next to the socket path and pid.
    """

    def __init__(self, site_dir: Path, dispatch: Dispatch, info: dict[str, Any]) -> None:
        self.site_dir = site_dir
        self.path = _socket_path(site_dir)
        running = control_info(site_dir)
        if running is not None and int(running["pid"]) != os.getpid():
            raise ConfigError(
                f"the site in {site_dir} is already running (pid {running['pid']}, peer "
                f"{running.get('peer_id')}); stop it first (Ctrl-C in its `hive p2p up`, or "
                "terminate its SiteGateway agent)", path=str(site_dir), pid=running["pid"])
        self.path.unlink(missing_ok=True)
        old = os.umask(0o077)  # the socket file is created 0600
        try:
            self._server = _Server(str(self.path), _Handler)
        finally:
            os.umask(old)
        self._server.dispatch = dispatch
        self._thread = threading.Thread(target=self._server.serve_forever, name="hive-p2p-control",
                                        daemon=True)
        self._thread.start()
        record = {**info, "socket": str(self.path), "pid": os.getpid()}
        tmp = site_dir / f".{CONTROL_FILE}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(record, fh, indent=2)
        os.replace(tmp, site_dir / CONTROL_FILE)

    def close(self) -> None:
        """Stop serving and remove the socket and ``control.json`` (idempotent)."""
        self._server.shutdown()
        self._server.server_close()
        self.path.unlink(missing_ok=True)
        info = control_info(self.site_dir)
        if info is None or int(info["pid"]) == os.getpid():
            (self.site_dir / CONTROL_FILE).unlink(missing_ok=True)


def _lines(sock: socket.socket) -> Iterator[dict[str, Any]]:
    buf = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            yield json.loads(line)


def control_request(site_dir: str | os.PathLike[str], op: str, *,
                    progress: Progress | None = None,
                    timeout: float = 60.0, **params: Any) -> Any:
    """Ask the running node of ``site_dir`` to do ``op``; returns its JSON result.

    Args:
        site_dir: the site directory of the running node.
        op: the operation (``info``, ``peers``, ``ping``, ``call``, ``send_tensor``, ``allow``).
        progress: called with ``(phase, done, total)`` as the node reports progress.
        timeout: seconds without any answer before giving up.
        **params: the operation's parameters (JSON).

    Returns:
        The operation's JSON result.

    Raises:
        ConfigError: no node runs for that site (the message says to start one).
        HiveError: the node answered with an error (``remote_type`` names its exception).
    """
    info = control_info(site_dir)
    if info is None:
        raise ConfigError(f"no p2p node is running for the site in {site_dir}: start one with "
                          "`hive p2p up` (or spawn a hive.SiteGateway agent)", path=str(site_dir))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(info["socket"])
        except OSError as exc:
            raise ConfigError(f"cannot reach the p2p node of {site_dir} (pid {info['pid']}) at "
                              f"{info['socket']}: {exc}; restart it with `hive p2p up`",
                              path=str(site_dir)) from exc
        sock.sendall(json.dumps({"op": op, **params}).encode() + b"\n")
        for msg in _lines(sock):
            if "progress" in msg:
                if progress is not None:
                    progress(str(msg.get("phase", "")), msg["progress"], msg["total"])
                continue
            if msg.get("ok"):
                return msg.get("result")
            raise HiveError(f"{msg.get('type', 'Error')}: {msg.get('error')}",
                            remote_type=msg.get("type"), op=op)
        raise HiveError(f"the p2p node of {site_dir} closed the control connection without an "
                        f"answer to {op!r}; see its output", op=op)
    finally:
        sock.close()

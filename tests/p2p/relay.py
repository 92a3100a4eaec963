"""A TCP relay on loopback whose link the tests can cut, blackhole and restore.

``Relay(target_port)`` listens on 127.0.0.1 and forwards every connection to the target.
``blackhole()`` keeps connections open but silently drops their bytes (and those of new
connections) - what a partition looks like to TCP; ``restore()`` forwards again;
``reset()`` closes every relayed connection at once (both ends see it). With
``reset_after=n`` the relay resets all connections once ``n`` bytes went client -> target.
"""

from __future__ import annotations

import contextlib
import socket
import threading


class Relay:
    def __init__(self, target_port: int, reset_after: int | None = None) -> None:
        self._target = target_port
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self.addr = f"/ip4/127.0.0.1/tcp/{self.port}"
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._dropping = False
        self._closed = False
        self.reset_after = reset_after
        self.upstream_bytes = 0
        self.resets = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            try:
                target = socket.create_connection(("127.0.0.1", self._target), timeout=5)
            except OSError:
                client.close()
                continue
            target.settimeout(None)
            with self._lock:
                self._socks += [client, target]
            threading.Thread(target=self._pump, args=(client, target, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(target, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, upstream: bool) -> None:
        try:
            while data := src.recv(65536):
                if self._dropping:
                    continue
                dst.sendall(data)
                if upstream:
                    with self._lock:
                        self.upstream_bytes += len(data)
                        trip = self.reset_after is not None and \
                            self.upstream_bytes >= self.reset_after
                    if trip:
                        self.reset_after = None
                        self.reset()
                        return
        except OSError:
            pass
        for sock in (src, dst):
            _close(sock)

    def blackhole(self) -> None:
        """Drop every byte from now on, keeping the connections open."""
        self._dropping = True

    def restore(self) -> None:
        """Forward bytes again."""
        self._dropping = False

    def reset(self) -> None:
        """Close every relayed connection now (counted in ``resets``)."""
        self.resets += 1
        self._close_all()

    def _close_all(self) -> None:
        with self._lock:
            socks, self._socks = self._socks, []
        for sock in socks:
            _close(sock)

    def close(self) -> None:
        self._closed = True
        _close(self._server)
        self._close_all()


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()

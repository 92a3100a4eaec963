"""Keeping links up (trio side): one keeper task per site, redialing with jittered backoff.

A node keeps a connection to every allowlisted site it knows an address for: the
``SitePeer.addrs`` of the allowlist plus what it learned (the peer's identify record when it
dialed in, the address we reached it at). When a link drops, the keeper redials after
``Backoff.delay(0)``, ``delay(1)``... (``base * 2**attempt`` capped at ``cap``, with "equal
jitter": uniformly in ``[d/2, d]``), so a restarted peer is back within about ``cap``
seconds while a dead one costs one dial per ``cap`` seconds.

py-libp2p's own AutoConnector is switched off (``p2p/_host.py``): it took ~67 s to notice a
restarted peer. ``Node.disconnect`` parks a peer (no redial) until the next explicit
``connect``/``call``.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any

import trio
from libp2p.abc import INetConn, INetStream, INetwork, INotifee
from libp2p.peer.id import ID
from libp2p.peer.peerstore import PeerStoreError
from multiaddr import Multiaddr

from p2p._allowlist import Allowlist
from p2p._config import NodeConfig
from p2p._exceptions import NodeClosedError, P2PError, P2PTimeoutError
from p2p._host import Host
from p2p._membership import Membership

__all__ = ["Backoff", "Reconnector"]

logger = logging.getLogger(__name__)
_RELEARN = 2.0  # seconds between refreshes of a connected peer's learned addresses
_DIALS = 8  # redials in progress at once (20 sites starting together must not storm)


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with equal jitter.

    Example:
        >>> b = Backoff(base=0.05, cap=1.0)
        >>> 0.025 <= b.delay(0) <= 0.05 and 0.5 <= b.delay(10) <= 1.0
        True
    """

    # Seconds before the first retry (before jitter).
    base: float = 0.05
    # Largest delay in seconds (before jitter).
    cap: float = 1.0
    # Growth per attempt.
    factor: float = 2.0

    def __post_init__(self) -> None:
        if not 0 < self.base <= self.cap:
            raise ValueError(f"backoff needs 0 < base <= cap, got base={self.base} "
                             f"cap={self.cap}; fix NodeConfig.reconnect_base/reconnect_max")
        if self.factor < 1:
            raise ValueError(f"backoff factor must be >= 1, got {self.factor}")

    def ceiling(self, attempt: int) -> float:
        """The un-jittered delay before retry ``attempt`` (0-based)."""
        return min(self.cap, self.base * self.factor ** min(attempt, 64))

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before retry ``attempt``: uniform in ``[ceiling/2, ceiling]``."""
        top = self.ceiling(attempt)
        return top / 2 + (rng or random).random() * top / 2


def _strip_p2p(addr: Multiaddr | str) -> str:
    text = str(addr)
    return text.split("/p2p/", 1)[0] if "/p2p/" in text else text


class _Links(INotifee):
    """Forwards py-libp2p connection events to the reconnector (network thread)."""

    def __init__(self, owner: Reconnector) -> None:
        self._owner = owner

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        self._owner.link_event(str(conn.muxed_conn.peer_id), up=True)

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        self._owner.link_event(str(conn.muxed_conn.peer_id), up=False)

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def listen(self, network: INetwork, multiaddr: Multiaddr) -> None:
        pass

    async def listen_close(self, network: INetwork, multiaddr: Multiaddr) -> None:
        pass


class Reconnector:
    """Membership link events plus one keeper task per site worth keeping.

    Args:
        host: the host whose connections are kept.
        allowlist: only allowlisted peers are kept (and a peer leaving it is let go).
        membership: gets ``link_up``/``link_lost``/``unreachable``.
        config: ``reconnect`` (on/off), ``reconnect_base``/``reconnect_max`` (backoff),
            ``reconnect_dial_timeout``, ``learn_addrs``.
    """

    def __init__(self, host: Host, allowlist: Allowlist, membership: Membership,
                 config: NodeConfig) -> None:
        self._host, self._allowlist, self._members = host, allowlist, membership
        self._config = config
        self.backoff = Backoff(config.reconnect_base, config.reconnect_max)
        self._wake: dict[str, trio.Event] = {}
        self._keepers: set[str] = set()
        self._parked: set[str] = set()
        self._learned: dict[str, list[str]] = {}
        self._nursery: trio.Nursery | None = None
        self._stopped = False
        self._dials = trio.Semaphore(_DIALS)
        host.libp2p.get_network().register_notifee(_Links(self))

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Start a keeper for every allowlisted site with an address; run until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for peer in self._allowlist.peers():
                if peer.addrs:
                    self.keep(peer.peer_id)
            task_status.started()
            await trio.sleep_forever()

    # ------------------------------------------------------------------ control
    def keep(self, peer_id: str) -> None:
        """Keep a link to ``peer_id`` (un-parks it; starts its keeper if needed)."""
        self._parked.discard(peer_id)
        self._poke(peer_id)
        if not self._config.reconnect or self._nursery is None or self._stopped \
                or peer_id in self._keepers:
            return
        self._keepers.add(peer_id)
        self._nursery.start_soon(self._keep, peer_id, name=f"keep {peer_id}")

    def stop(self) -> None:
        """The node is closing: stop redialing and recording link changes."""
        self._stopped = True
        for peer_id in list(self._wake):
            self._poke(peer_id)

    def park(self, peer_id: str) -> None:
        """Stop redialing ``peer_id`` until :meth:`keep` (``Node.disconnect``)."""
        self._parked.add(peer_id)
        self._poke(peer_id)

    def _poke(self, peer_id: str) -> None:
        event = self._wake.pop(peer_id, None)
        if event is not None:
            event.set()

    def link_event(self, peer_id: str, *, up: bool) -> None:
        """A connection to ``peer_id`` opened (``up``) or closed."""
        if self._stopped or not self._allowlist.allows(peer_id):
            return
        if up:
            entry = self._allowlist.get(peer_id)
            self._members.link_up(peer_id, entry.site if entry else "", "connection open")
            self._learn(peer_id)
            if peer_id not in self._parked:
                self.keep(peer_id)
        elif self._host.live_connection(peer_id) is None:
            if peer_id in self._parked:
                self._members.unreachable(peer_id, "disconnected by this node",
                                          deliberate=True)
            elif not self._config.reconnect:
                self._members.unreachable(peer_id, "connection closed (NodeConfig.reconnect "
                                          "is off)")
            elif not self.addrs(peer_id):
                self._members.unreachable(peer_id, "connection closed; no address known to "
                                          "redial (list it in SitePeer.addrs)")
            else:
                self._members.link_lost(peer_id, "connection closed; redialing")
        self._poke(peer_id)

    # ------------------------------------------------------------------ addresses
    def _learn(self, peer_id: str) -> None:
        """Remember the addresses the peerstore holds for ``peer_id`` now (identify's record,
        the address we dialed); they survive the peerstore forgetting them."""
        if not self._config.learn_addrs:
            self._members.set_addrs(peer_id, tuple(self.addrs(peer_id)))
            return
        try:
            found = self._host.libp2p.get_peerstore().addrs(ID.from_base58(peer_id))
        except PeerStoreError:
            found = []
        known = self._learned.setdefault(peer_id, [])
        for addr in map(_strip_p2p, found):
            if addr not in known and "/ip4/0.0.0.0/" not in addr:
                known.append(addr)
        self._members.set_addrs(peer_id, tuple(self.addrs(peer_id)))

    def addrs(self, peer_id: str) -> list[str]:
        """Where ``peer_id`` is redialed: its allowlist addresses first, then learned ones."""
        entry = self._allowlist.get(peer_id)
        out = list(entry.addrs) if entry else []
        return out + [a for a in self._learned.get(peer_id, ()) if a not in out]

    # ------------------------------------------------------------------ keeper
    async def _keep(self, peer_id: str) -> None:
        attempt, timeouts = 0, 0
        if self._host.peer_id > peer_id:  # both sides dial at start: let the lower id go first
            with trio.move_on_after(2 * self.backoff.delay(64)):
                await self._wake.setdefault(peer_id, trio.Event()).wait()
        try:
            while self._allowlist.allows(peer_id) and not self._stopped:
                wake = self._wake.setdefault(peer_id, trio.Event())
                if peer_id in self._parked or self._host.live_connection(peer_id) is not None:
                    attempt = 0
                    if peer_id not in self._parked:
                        self._learn(peer_id)  # identify's record arrives after the connection
                    with trio.move_on_after(_RELEARN):
                        await wake.wait()
                    continue
                addrs = self.addrs(peer_id)
                if not addrs:
                    await wake.wait()
                    continue
                # a loaded peer (or node) may need longer than reconnect_dial_timeout for the
                # handshake: after a timeout the next dial gets twice as long (once; at most
                # dial_timeout), so a busy peer is not redialed to death
                timeout = min(self._config.dial_timeout,
                              self._config.reconnect_dial_timeout * (2 if timeouts else 1))
                try:
                    async with self._dials:
                        await self._host.connect(peer_id, [Multiaddr(a) for a in addrs],
                                                 timeout=timeout)
                    attempt = timeouts = 0
                    continue
                except NodeClosedError:
                    return
                except P2PError as err:
                    timeouts = timeouts + 1 if isinstance(err, P2PTimeoutError) else 0
                    if self._stopped:
                        return
                    entry = self._allowlist.get(peer_id)
                    self._members.unreachable(peer_id, f"redial failed: {err}",
                                              site=entry.site if entry else "")
                delay = self.backoff.delay(attempt)
                attempt += 1
                with trio.move_on_after(delay):
                    await wake.wait()  # an inbound connection or an explicit connect wakes us
        finally:
            self._keepers.discard(peer_id)

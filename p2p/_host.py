"""The host layer (trio): a py-libp2p host on TCP + Noise + yamux, and how we dial.

Two things differ from ``libp2p.new_host``'s defaults, on purpose:

- **Only Noise and yamux are offered** (``p2p/_security.py``): ``new_host`` would also offer
  TLS, SECIO and plaintext, and mplex.
- **No fixed delay on the connect path.** ``Swarm.dial_peer`` (libp2p/network/swarm.py) waits
  ``_HAPPY_EYEBALLS_DELAY`` = 250 ms after starting each address's dial unless that dial
  *fails* or ``max_connections_per_peer`` connections are up (default 3), so a successful
  single-address dial always costs >= 250 ms; and ``_dial_with_retry`` retries every failure
  (``RetryConfig.max_retries=3``, 0.1 s doubling backoff), including a Noise peer-id mismatch
  whose message does not contain the "Peer ID mismatch" text it looks for. We dial each
  address once ourselves with ``Swarm.dial_addr`` under ``RetryConfig(max_retries=0)``, one
  dial per peer at a time, and report a mismatch at once.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import trio
from libp2p import new_swarm
from libp2p.abc import INetConn, INetStream
from libp2p.custom_types import TProtocol
from libp2p.host.basic_host import BasicHost
from libp2p.network.config import ConnectionConfig, RetryConfig
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.peer.id import ID
from libp2p.peer.peerstore import PeerStoreError
from multiaddr import Multiaddr

from p2p._allowlist import Allowlist, DeniedEvent
from p2p._config import NodeConfig
from p2p._exceptions import (
    DialError,
    NodeClosedError,
    P2PError,
    P2PTimeoutError,
    PeerIdMismatchError,
    PeerNotAllowedError,
    ProtocolError,
)
from p2p._security import PeerMismatch, muxer_options, security_options

__all__ = ["Host", "StreamHandler", "split_peer_addr"]

logger = logging.getLogger(__name__)

StreamHandler = Callable[[INetStream, str], Awaitable[None]]
_ADDR_TTL = 10 * 365 * 24 * 3600  # peerstore TTL for allowlisted addresses: "permanent"
_NEVER = 1e9  # seconds: an interval that never comes round


def split_peer_addr(addr: str) -> tuple[str, Multiaddr]:
    """``"/ip4/1.2.3.4/tcp/5/p2p/12D3..."`` -> ``("12D3...", Multiaddr("/ip4/1.2.3.4/tcp/5"))``.

    Raises:
        DialError: the address is malformed or has no ``/p2p/<peer-id>`` suffix.
    """
    transport, sep, peer = addr.rpartition("/p2p/")
    try:
        if not sep or not peer or "/" in peer:
            raise ValueError("no /p2p/<peer-id> suffix")
        return ID.from_base58(peer).to_base58(), Multiaddr(transport)
    except Exception as err:
        raise DialError(f"cannot dial {addr!r}: expected a multiaddr ending in /p2p/<peer-id> "
                        f"such as /ip4/10.0.0.2/tcp/4001/p2p/12D3KooW... ({err})",
                        address=addr, peer_id=None) from err


def _release_inbound_slots(swarm: Any) -> None:
    """Work around a slot leak in py-libp2p 0.8.1's ``Swarm._do_handle_inbound_connection``.

    After upgrading an inbound connection it awaits ``self.manager.wait_finished()`` - the
    end of the *swarm* (trio closes a listener's stream when its handler returns) - so every
    inbound connection ever accepted keeps one of the ``max_connections`` inbound slots and a
    parked task until the node stops: after 300 (the default) the node refuses all inbound
    connections ("Inbound connection cap (300) reached"). Same steps here, but the handler
    waits for *its* connection to close. (The IP allow/deny gate and pre-multiplexed QUIC
    branch it also has are unused: we configure no IP lists and listen on TCP only.)
    """

    async def handle(read_write_closer: Any, maddr: Multiaddr, failure_event: Any) -> None:
        raw_conn = RawConnection(read_write_closer, False)
        try:
            muxed = await swarm.upgrade_inbound_raw_conn(raw_conn, maddr)
        except Exception as err:  # noqa: BLE001 - refused (allowlist), bad handshake, gone
            logger.debug("inbound connection on %s not upgraded: %r", maddr, err)
            with trio.CancelScope(shield=True), contextlib.suppress(Exception):
                await raw_conn.close()
            return
        await muxed.event_closed.wait()

    swarm._do_handle_inbound_connection = handle


def _causes(err: BaseException) -> Iterator[BaseException]:
    """``err`` and everything it was raised from, including exception-group members."""
    seen: set[int] = set()
    todo = [err]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo.extend(x for x in (e.__cause__, e.__context__) if x is not None)
        todo.extend(getattr(e, "exceptions", ()) or ())


class Host:
    """A running py-libp2p host with the allowlist applied to connections and streams.

    Args:
        config: the node settings (identity, listen address, timeouts).
        allowlist: the peers this host talks to.
    """

    def __init__(self, config: NodeConfig, allowlist: Allowlist) -> None:
        self._config = config
        self._allowlist = allowlist
        key_pair = config.identity.key_pair
        swarm = new_swarm(
            key_pair=key_pair,
            sec_opt=security_options(key_pair, allowlist),
            muxer_opt=muxer_options(),
            listen_addrs=[Multiaddr(config.listen)],
            retry_config=RetryConfig(max_retries=0),
            # min/low watermark 0 and a huge interval switch the AutoConnector off: it
            # would otherwise redial whatever the peerstore holds to keep 50+ connections.
            connection_config=ConnectionConfig(dial_timeout=config.dial_timeout,
                                               max_connections=config.max_connections,
                                               high_watermark=config.max_connections,
                                               min_connections=0, low_watermark=0,
                                               auto_connect_interval=_NEVER),
        )
        _release_inbound_slots(swarm)
        self.libp2p = BasicHost(network=swarm)
        self.peer_id = self.libp2p.get_id().to_base58()
        self._dial_locks: dict[str, trio.Lock] = {}
        self._running = False

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Listen, report started, serve until cancelled, then close every connection."""
        async with self.libp2p.run([Multiaddr(self._config.listen)]):
            if not self.libp2p.get_network().listeners:  # py-libp2p only logs this failure
                await self.libp2p.close()
                raise P2PError(f"could not listen on {self._config.listen} (port taken, or "
                               "not a local address?); change NodeConfig.listen",
                               address=self._config.listen)
            self._running = True
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                # Close connections while the swarm still runs: left to cancellation, an
                # outbound socket can stay open (CLOSE_WAIT) until garbage collection.
                self._running = False
                with trio.CancelScope(shield=True) as scope:
                    scope.deadline = trio.current_time() + self._config.close_timeout
                    await self.libp2p.close()

    async def close(self) -> None:
        """Close every connection and the listener (idempotent); call before cancelling."""
        self._running = False
        await self.libp2p.close()

    @property
    def addrs(self) -> list[str]:
        """The addresses we listen on, each ending in ``/p2p/<our peer id>``."""
        return [str(a) for a in self.libp2p.get_addrs()]

    def connected_peers(self) -> list[str]:
        """Peer ids with at least one open connection, sorted."""
        network = self.libp2p.get_network()
        return sorted(str(p) for p in network.connections
                      if any(not c.is_closed for c in network.get_connections(p)))

    def admit(self, peer_id: str, protocol: str) -> bool:
        """Whether ``peer_id`` may use ``protocol`` now; a refusal is recorded. Protocols that
        keep streams open call this per message, since the allowlist can shrink meanwhile."""
        if self._allowlist.allows(peer_id):
            return True
        self._allowlist.record_denied(DeniedEvent(
            peer_id=peer_id, direction="inbound", stage="stream", protocol=protocol))
        return False

    def set_handler(self, protocol: str, handler: StreamHandler) -> None:
        """Serve ``protocol`` with ``handler(stream, peer_id)``; streams from peers that left
        the allowlist are reset and recorded, and a failing handler resets only its stream."""

        async def gated(stream: INetStream) -> None:
            peer = str(stream.muxed_conn.peer_id)
            if not self.admit(peer, protocol):
                await stream.reset()
                return
            try:
                await handler(stream, peer)
            except Exception:
                logger.exception("handler for %s failed on a stream from %s", protocol, peer)
                await stream.reset()

        self.libp2p.set_stream_handler(TProtocol(protocol), gated)

    def _addrs_for(self, peer_id: str) -> list[Multiaddr]:
        entry = self._allowlist.get(peer_id)
        known = [Multiaddr(a) for a in entry.addrs] if entry else []
        try:
            learned = self.libp2p.get_peerstore().addrs(ID.from_base58(peer_id))
        except PeerStoreError:  # nothing learned about it yet
            learned = []
        return known + [a for a in learned if str(a) not in {str(k) for k in known}]

    def live_connection(self, peer_id: str) -> INetConn | None:
        """An open connection to ``peer_id``, or ``None``."""
        for conn in self.libp2p.get_network().get_connections(ID.from_base58(peer_id)):
            if not conn.is_closed:
                return conn
        return None

    async def connect(self, peer_id: str, addrs: list[Multiaddr] | None = None,
                      timeout: float | None = None) -> None:
        """Make sure a secured connection to ``peer_id`` is up (one dial per peer at a time).

        Args:
            peer_id: the peer to reach; must be on the allowlist.
            addrs: addresses to try (in order) if not connected; default: the allowlist entry's
                ``addrs`` and what the peerstore learned.
            timeout: seconds per address (default ``NodeConfig.dial_timeout``).

        Raises:
            PeerNotAllowedError: ``peer_id`` is not on the allowlist.
            PeerIdMismatchError: an address answered with another peer id (no retry).
            DialError: no address could be reached.
            P2PTimeoutError: ``dial_timeout`` passed.
        """
        if not self._running:
            raise NodeClosedError("the node is not running; call Node.start() first")
        if not self._allowlist.allows(peer_id):
            self._allowlist.record_denied(DeniedEvent(
                peer_id=peer_id, address=str(addrs[0]) if addrs else None,
                direction="outbound", stage="dial"))
            raise PeerNotAllowedError(
                f"peer {peer_id} is not on this site's allowlist; add it with "
                f"Node.allow(SitePeer(peer_id=...)) or NodeConfig.peers", peer_id=peer_id)
        lock = self._dial_locks.setdefault(peer_id, trio.Lock())
        async with lock:
            if self.live_connection(peer_id) is not None:
                return
            candidates = addrs or self._addrs_for(peer_id)
            if not candidates:
                raise DialError(f"no address known for peer {peer_id}: list it in its "
                                "SitePeer(addrs=...) or call Node.connect(<multiaddr>/p2p/<id>)",
                                peer_id=peer_id, address=None)
            errors: list[P2PError] = []
            for addr in candidates:
                try:
                    await self._dial_once(peer_id, addr, timeout or self._config.dial_timeout)
                    return
                except (DialError, P2PTimeoutError) as err:  # try the next address
                    errors.append(err)
            mismatch = [e for e in errors if isinstance(e, PeerIdMismatchError)]
            raise (mismatch or errors)[0]

    async def _dial_once(self, peer_id: str, addr: Multiaddr, timeout: float) -> None:
        pid = ID.from_base58(peer_id)
        full = f"{addr}/p2p/{peer_id}"
        try:
            with trio.fail_after(timeout):
                conn = await self.libp2p.get_network().dial_addr(addr, pid)
                event = getattr(conn, "event_started", None)
                if event is not None:
                    await event.wait()
        except trio.TooSlowError as err:
            raise P2PTimeoutError(f"dialing {full} took longer than {timeout:g}s (NodeConfig."
                                  "dial_timeout / reconnect_dial_timeout)", peer_id=peer_id,
                                  address=full, timeout=timeout) from err
        except Exception as err:  # classified below and re-raised as ours
            for cause in _causes(err):
                if isinstance(cause, PeerMismatch):
                    raise PeerIdMismatchError(
                        f"{addr} answered as peer {cause.actual}, not {cause.expected} as the "
                        f"address /p2p/ part says; fix the address or the SitePeer entry",
                        expected_peer_id=str(cause.expected), actual_peer_id=str(cause.actual),
                        address=full, peer_id=peer_id) from err
            reason = "; ".join(dict.fromkeys(f"{type(c).__name__}: {c}" for c in _causes(err)))
            raise DialError(f"could not open a Noise connection to {full} ({reason}); is the "
                            "peer up, and is this site's peer id on its allowlist?",
                            peer_id=peer_id, address=full) from err
        self.libp2p.get_peerstore().add_addrs(pid, [addr], _ADDR_TTL)

    async def open_stream(self, peer_id: str, protocol: str, *, dial: bool = True) -> INetStream:
        """A new stream to ``peer_id`` speaking ``protocol`` (connecting first if needed, unless
        ``dial`` is False: then only over a live connection).

        Raises:
            PeerNotAllowedError, DialError, P2PTimeoutError: from :meth:`connect`; DialError
                also when ``dial`` is False and no connection is live.
            ProtocolError: the peer does not serve ``protocol``.
        """
        if dial:
            await self.connect(peer_id)
        elif self.live_connection(peer_id) is None:
            raise DialError(f"no live connection to {peer_id} (not dialing)", peer_id=peer_id,
                            address=None)
        try:
            return await self.libp2p.new_stream(ID.from_base58(peer_id), [TProtocol(protocol)])
        except Exception as err:
            if self.live_connection(peer_id) is None:
                raise DialError(f"connection to {peer_id} closed while opening a {protocol} "
                                "stream", peer_id=peer_id, address=None) from err
            raise ProtocolError(f"peer {peer_id} does not serve {protocol} ({err})",
                                peer_id=peer_id, protocol=protocol) from err

    async def disconnect(self, peer_id: str) -> None:
        """Close every connection to ``peer_id`` (no-op when there is none)."""
        await self.libp2p.disconnect(ID.from_base58(peer_id))

"""Liveness (trio side): ``/hive/ping/1.0.0`` and the loop that pings every connected site.

The protocol: the caller writes an 8-byte frame, the server writes the same frame back; a
stream carries any number of pings (one stream per peer is kept open, so a ping costs one
round trip, no negotiation). libp2p's ``/ipfs/ping/1.0.0`` reports whole milliseconds,
too coarse for loopback or a LAN, hence our own.

Every ``ping_interval`` seconds each connected, allowlisted peer is pinged (at most one
ping in flight per peer). An answer feeds the membership view (RTT, baseline, degraded /
recovered); no answer within ``ping_timeout`` counts a miss (the next ping then gets twice the
time, at most 4x); ``ping_misses`` misses in a row mark the peer unreachable and close its
connection, so the reconnector redials it (a link
that silently stopped carrying packets - a partition - is found this way; a closed socket
is noticed at once by the connection itself).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import trio

from p2p._config import NodeConfig
from p2p._exceptions import P2PError, P2PTimeoutError, ProtocolError
from p2p._frames import FrameStream
from p2p._host import Host
from p2p._membership import Membership
from p2p._util import close_quietly

__all__ = ["PING_PROTOCOL", "Liveness"]

logger = logging.getLogger(__name__)

PING_PROTOCOL = "/hive/ping/1.0.0"
_PING = 8  # bytes per ping
_SERVER_IDLE = 300.0  # seconds a ping stream may stay silent before the server drops it


class Liveness:
    """Ping server, on-demand pings and the periodic liveness loop.

    Args:
        host: the host (the ping protocol is mounted on it).
        membership: where RTTs, misses and unreachable peers are recorded.
        config: ``ping_interval``, ``ping_timeout``, ``ping_misses``.
    """

    def __init__(self, host: Host, membership: Membership, config: NodeConfig) -> None:
        self._host, self._members, self._config = host, membership, config
        self._streams: dict[str, FrameStream] = {}
        self._locks: dict[str, trio.Lock] = {}
        self._in_flight: set[str] = set()
        self._closed = False
        host.set_handler(PING_PROTOCOL, self._serve)

    async def _serve(self, stream: Any, peer: str) -> None:
        frames = FrameStream(stream, _PING, peer)
        try:
            while True:
                with trio.move_on_after(_SERVER_IDLE):
                    payload = await frames.read_frame()
                    if payload is None:
                        break
                    await frames.write_frame(payload)
                    continue
                break  # idle for too long
        except P2PError:
            await close_quietly(stream, reset=True)
            return
        await close_quietly(stream, reset=False)

    async def ping(self, peer_id: str, timeout: float, *, dial: bool = True) -> float:
        """One round trip to ``peer_id`` (connecting first if needed, unless ``dial`` is False:
        the periodic probe never dials, so it cannot undo a ``disconnect``); the RTT in seconds.

        Raises:
            P2PTimeoutError: no answer within ``timeout`` (the ping stream is dropped).
            DialError, PeerNotAllowedError: from connecting. ProtocolError: a bad answer.
        """
        lock = self._locks.setdefault(peer_id, trio.Lock())
        async with lock:  # one ping in flight per peer and stream
            frames = self._streams.pop(peer_id, None)
            try:
                with trio.fail_after(timeout):
                    if frames is None or getattr(frames.stream, "is_closed", False):
                        stream = await self._host.open_stream(peer_id, PING_PROTOCOL, dial=dial)
                        frames = FrameStream(stream, _PING, peer_id)
                    nonce = os.urandom(_PING)
                    started = time.perf_counter()
                    await frames.write_frame(nonce)
                    echo = await frames.read_frame()
                    rtt = time.perf_counter() - started
            except trio.TooSlowError as err:
                await close_quietly(frames and frames.stream, reset=True)
                raise P2PTimeoutError(f"ping to {peer_id} got no answer within {timeout:g}s",
                                      peer_id=peer_id, timeout=timeout) from err
            except BaseException:
                await close_quietly(frames and frames.stream, reset=True)
                raise
            if echo != nonce:
                await close_quietly(frames.stream, reset=True)
                raise ProtocolError(f"{peer_id} answered a ping with other bytes",
                                    peer_id=peer_id)
            self._streams[peer_id] = frames
        self._members.pong(peer_id, rtt)
        return rtt

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Ping every connected peer each ``ping_interval`` seconds, until cancelled."""
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                await trio.sleep(self._config.ping_interval)
                for peer in self._host.connected_peers():
                    if peer not in self._in_flight and self._members.state(peer) is not None:
                        self._in_flight.add(peer)
                        nursery.start_soon(self._probe, peer)

    async def _probe(self, peer_id: str) -> None:
        # each miss in a row doubles the next ping's time (at most 4x): a peer that is merely
        # busy - or a node starting 20 links at once - gets the time to answer, where
        # closing its link would only add load; a silent partition is still found
        misses = self._members.misses(peer_id)
        try:
            await self.ping(peer_id, self._config.ping_timeout * 2 ** min(misses, 2), dial=False)
        except P2PError as err:
            if self._closed or self._host.live_connection(peer_id) is None:
                return  # the link is gone: the reconnector has it
            misses = self._members.missed(peer_id, str(err))
            if misses >= self._config.ping_misses:
                self._members.unreachable(peer_id, f"{misses} pings in a row unanswered "
                                          f"(ping_timeout={self._config.ping_timeout:g}s, "
                                          "doubling per miss); closing the link")
                with trio.move_on_after(self._config.close_timeout):
                    await self._host.disconnect(peer_id)
        finally:
            self._in_flight.discard(peer_id)

    async def close(self) -> None:
        """Stop judging peers; close the kept ping streams."""
        self._closed = True
        streams, self._streams = self._streams, {}
        for frames in streams.values():
            await close_quietly(frames.stream, reset=False)

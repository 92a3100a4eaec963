"""Gossip (trio side): py-libp2p gossipsub tuned for a small mesh of allowlisted sites.

Settings that differ from py-libp2p's ``GossipSub`` defaults, and why:

- ``heartbeat_interval``: 120 s by default; a mesh of a few sites wants ~0.5 s so peers are
  grafted (and messages flow) within a second of connecting.
- ``adaptive_gossip_enabled=False``: when it judges "network health" poor it *raises* the
  heartbeat to 30-60 s (``_adapt_heartbeat_parameters``), undoing the above on a 2-node mesh.
- ``eclipse_protection_enabled=False``: it wants mesh peers from >= 3 distinct IPs, which
  a handful of sites (or loopback) never has; the allowlist is our protection.
- ``max_messages_per_topic_per_second``: 10 by default; raised (``NodeConfig.gossip_rate``).
- degrees: ``D = gossip_degree``, ``D_low = max(1, D - 2)``, ``D_high = 2 * D``.

Messages are signed (``strict_signing``) and a message is delivered only if its *origin*
(not just the peer relaying it) is on the allowlist; others are dropped and recorded.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio
from libp2p.abc import INetConn, INetStream, INetwork, INotifee
from libp2p.peer.id import ID
from libp2p.pubsub.gossipsub import PROTOCOL_ID, PROTOCOL_ID_V11, GossipSub
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import Pubsub
from libp2p.tools.anyio_service import background_trio_service
from multiaddr import Multiaddr

from p2p._allowlist import Allowlist, DeniedEvent
from p2p._config import NodeConfig
from p2p._host import Host

__all__ = ["Gossip", "GossipMessage"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GossipMessage:
    """A message received on a topic; ``origin`` is the (signature-checked) publisher."""

    topic: str
    data: bytes
    origin: str
    seqno: int


GossipHandler = Callable[[GossipMessage], Awaitable[Any]]


class _Reannounce(INotifee):
    """On every new connection, re-send our subscriptions once pubsub registered the peer.

    py-libp2p's ``Pubsub._handle_new_peer`` builds its hello (our topics) *before* it awaits
    the stream write and only then lists the peer; a ``subscribe()`` in between reaches
    neither, and the peer never learns we joined the topic. Re-announcing after registration
    closes that window (subscriptions are idempotent on the receiving side).
    """

    def __init__(self, gossip: Gossip) -> None:
        self._gossip = gossip

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        self._gossip.reannounce_after_join(conn.muxed_conn.peer_id)

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        pass

    async def listen(self, network: INetwork, multiaddr: Multiaddr) -> None:
        pass

    async def listen_close(self, network: INetwork, multiaddr: Multiaddr) -> None:
        pass


class Gossip:
    """Gossipsub on the host; topic subscriptions deliver to trio handlers."""

    def __init__(self, host: Host, allowlist: Allowlist, config: NodeConfig) -> None:
        self._allowlist = allowlist
        self._self = host.peer_id
        degree = config.gossip_degree
        self.router = GossipSub(
            protocols=[PROTOCOL_ID_V11, PROTOCOL_ID], degree=degree,
            degree_low=max(1, degree - 2), degree_high=2 * degree,
            heartbeat_initial_delay=0.1, heartbeat_interval=config.gossip_heartbeat,  # type: ignore[arg-type]
            adaptive_gossip_enabled=False, eclipse_protection_enabled=False,
            max_messages_per_topic_per_second=config.gossip_rate)
        self.pubsub = Pubsub(host.libp2p, self.router, strict_signing=True)
        for protocol in self.router.get_protocols():  # re-mount behind the allowlist gate
            host.set_handler(str(protocol), self._serve)
        host.libp2p.get_network().register_notifee(_Reannounce(self))
        self._nursery: trio.Nursery | None = None
        self._readers: dict[str, trio.CancelScope] = {}

    async def _serve(self, stream: Any, peer: str) -> None:
        await self.pubsub.stream_handler(stream)

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Run pubsub and the router until cancelled."""
        try:
            async with background_trio_service(self.pubsub), \
                    background_trio_service(self.router), trio.open_nursery() as nursery:
                await self.pubsub.wait_until_ready()
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self.stop_threads()

    def stop_threads(self) -> None:
        """Stop the sweeper thread py-libp2p's Pubsub starts in its constructor and never
        stops (idempotent)."""
        self.pubsub.seen_messages.stop()

    def reannounce_after_join(self, peer: ID) -> None:
        """Once ``peer`` has a pubsub stream, send it (and everyone) our subscriptions."""
        if self._nursery is None:
            return

        async def reannounce() -> None:
            with trio.move_on_after(10):
                try:
                    await self.pubsub.wait_for_peer(peer, timeout=10)
                except trio.TooSlowError:
                    return
                if self.pubsub.topic_ids:
                    hello = self.pubsub.get_hello_packet().SerializeToString()
                    await self.pubsub.message_all_peers(hello)

        self._nursery.start_soon(reannounce)

    def _origin_allowed(self, topic: str) -> Callable[[ID, rpc_pb2.Message], bool]:
        def validate(forwarder: ID, msg: rpc_pb2.Message) -> bool:
            origin = ID(msg.from_id).to_base58()
            if origin == self._self or self._allowlist.allows(origin):
                return True
            self._allowlist.record_denied(DeniedEvent(
                peer_id=origin, address=f"via {forwarder}", direction="inbound",
                stage="gossip", protocol=topic))
            return False

        return validate

    async def subscribe(self, topic: str, handler: GossipHandler) -> None:
        """Join ``topic``; every message (from an allowlisted origin) goes to ``handler``.
        Subscribing again replaces the handler."""
        if self._nursery is None:
            raise RuntimeError("gossip is not running")
        await self.unsubscribe(topic)
        self.pubsub.set_topic_validator(topic, self._origin_allowed(topic), False)
        subscription = await self.pubsub.subscribe(topic)
        scope = trio.CancelScope()
        self._readers[topic] = scope

        async def read() -> None:
            with scope:
                async for msg in subscription:
                    message = GossipMessage(topic=topic, data=bytes(msg.data),
                                            origin=ID(msg.from_id).to_base58(),
                                            seqno=int.from_bytes(msg.seqno, "big"))
                    try:
                        await handler(message)
                    except Exception:  # one bad message must not end the subscription
                        logger.exception("gossip handler for %r failed", topic)

        self._nursery.start_soon(read)

    async def unsubscribe(self, topic: str) -> None:
        """Leave ``topic`` (no-op if not subscribed)."""
        scope = self._readers.pop(topic, None)
        if scope is not None:
            scope.cancel()
            await self.pubsub.unsubscribe(topic)
            self.pubsub.remove_topic_validator(topic)

    async def publish(self, topic: str, data: bytes) -> None:
        """Publish ``data`` on ``topic`` (signed with the site key)."""
        await self.pubsub.publish(topic, data)

    def topic_peers(self, topic: str) -> list[str]:
        """Connected peers known to be subscribed to ``topic``, sorted."""
        return sorted(p.to_base58() for p in self.pubsub.peer_topics.get(topic, ()))

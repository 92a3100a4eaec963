"""Gossip (trio side): py-libp2p gossipsub tuned for a small mesh of allowlisted sites.

Settings that differ from py-libp2p's ``GossipSub`` defaults, and why:

- ``heartbeat_interval``: 120 s by default; a mesh of a few sites wants ~0.5 s so peers are
  grafted (and messages flow) within a second of connecting.
- ``adaptive_gossip_enabled=False``: when it judges "network health" poor it *raises* the
  heartbeat to 30-60 s (``_adapt_heartbeat_parameters``), undoing the above on a 2-node mesh.
- ``eclipse_protection_enabled=False``: it wants mesh peers from >= 3 distinct IPs, which
  a handful of sites (or loopback) never has; the allowlist is our protection.
- ``max_messages_per_topic_per_second``: 10 by default; raised (``NodeConfig.gossip_rate``).
- degrees: ``D = gossip_degree`` (1), ``D_low = max(1, D - 2)``, ``D_high = 2 * D``: with
  flood publishing D is only the relay fan-out (see ``NodeConfig.gossip_degree``).
- no signed peer record on our RPCs (``send_rpc``): py-libp2p attaches one to every RPC and
  the receiver checks its Ed25519 signature each time; Noise already authenticates the sender.
- flood publishing (``gossip_flood_publish``): our own messages go to every subscribed peer,
  not just the D in our mesh - one hop to every site of a small mesh; relays still use D.
- ``prune_back_off`` 60 s -> 5 s, ``unsubscribe_back_off`` 10 s -> 2 s: a site that
  restarts (or re-subscribes) is grafted again within a few heartbeats, not a minute later.

Loss: py-libp2p queues 32 messages per subscription and 32 RPCs per peer, and drops what
does not fit. We give both room (``_INBOX``, ``_OUTBOX``) and make local ``publish`` wait for
room in the peers' send queues (backpressure instead of loss).

Duplicates and restarts: py-libp2p numbers a publisher's messages from ``int(time.time())``
up, so a site that restarts within N seconds of publishing N+ messages reuses sequence
numbers and its new messages are dropped everywhere as "seen". We start the counter at
``time.time_ns()`` instead. And every topic keeps its own record of the last
``_DEDUP`` (origin, seqno) pairs, so a handler never gets a message twice, even when
py-libp2p's 120 s seen-cache has forgotten it or a rejoining peer resends its history.

Messages are signed (``strict_signing``) and a message is delivered only if its *origin*
(not just the peer relaying it) is on the allowlist; others are dropped and recorded.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Iterator
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
from p2p._exceptions import NodeClosedError
from p2p._host import Host

__all__ = ["Gossip", "GossipMessage"]

logger = logging.getLogger(__name__)
_DEDUP = 1 << 16  # (origin, seqno) pairs remembered per topic
_INBOX = 10_000  # messages queued per topic for a slow handler (py-libp2p's default: 32)
_OUTBOX = 1024  # RPCs queued per peer for sending (py-libp2p's default: 32, then drops)
_ROOM = 64  # a local publish waits while any peer's send queue has fewer free slots...
_ROOM_WAIT = 5.0  # ...for at most this many seconds (then publishes, risking a drop)


@dataclass(frozen=True)
class GossipMessage:
    """A message received on a topic; ``origin`` is the (signature-checked) publisher."""

    topic: str
    data: bytes
    origin: str
    seqno: int


GossipHandler = Callable[[GossipMessage], Awaitable[Any]]


class _SmallMeshGossipSub(GossipSub):
    """GossipSub plus flood publishing of our own messages (gossipsub v1.1 ``flood_publish``)."""

    flood_publish = True

    def _get_peers_to_send(self, topic_ids: Iterable[str], msg_forwarder: ID, origin: ID,
                           msg_id: bytes | None = None) -> Iterator[ID]:
        peers = set(super()._get_peers_to_send(topic_ids, msg_forwarder, origin, msg_id))
        pubsub = self.pubsub
        if self.flood_publish and pubsub is not None and origin == msg_forwarder == pubsub.my_id:
            for topic in topic_ids:
                peers.update(p for p in pubsub.peer_topics.get(topic, ())
                             if p in self.peer_protocol and p != origin)
        yield from peers

    def send_rpc(self, peer_id: ID, rpc: rpc_pb2.RPC, priority: bool = False) -> None:
        # py-libp2p attaches our signed peer record (an Ed25519-signed envelope) to every RPC
        # it sends, and the receiver verifies it each time: one signature check per message
        # per hop, ~13% of a busy subscriber's CPU. The Noise session already authenticates
        # the sender, and addresses come from the allowlist and identify: we send none.
        rpc.ClearField("senderRecord")
        super().send_rpc(peer_id, rpc, priority)


class _Seen:
    """The last ``size`` (origin, seqno) pairs delivered on a topic."""

    def __init__(self, size: int = _DEDUP) -> None:
        self._size = size
        self._keys: OrderedDict[tuple[bytes, bytes], None] = OrderedDict()

    def first_time(self, key: tuple[bytes, bytes]) -> bool:
        """Record ``key``; False if it was seen already."""
        if key in self._keys:
            return False
        self._keys[key] = None
        if len(self._keys) > self._size:
            self._keys.popitem(last=False)
        return True


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
        self.router = _SmallMeshGossipSub(
            protocols=[PROTOCOL_ID_V11, PROTOCOL_ID], degree=degree,
            degree_low=max(1, degree - 2), degree_high=2 * degree,
            heartbeat_initial_delay=0.1, heartbeat_interval=config.gossip_heartbeat,  # type: ignore[arg-type]
            prune_back_off=5, unsubscribe_back_off=2,
            adaptive_gossip_enabled=False, eclipse_protection_enabled=False,
            max_messages_per_topic_per_second=config.gossip_rate)
        self.router.flood_publish = config.gossip_flood_publish
        self.pubsub = Pubsub(host.libp2p, self.router, strict_signing=True)
        self.pubsub.counter = time.time_ns()  # seqnos stay unique across restarts
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
                self._deepen(peer)
                if self.pubsub.topic_ids:
                    hello = self.pubsub.get_hello_packet().SerializeToString()
                    await self.pubsub.message_all_peers(hello)

        self._nursery.start_soon(reannounce)

    def _deepen(self, peer: ID) -> None:
        """Give ``peer``'s outbound RPC queue room for bursts: py-libp2p keeps 32 RPCs per
        peer and silently drops the rest (150 quick publishes lost ~50)."""
        queue = self.pubsub.peer_queues.get(peer)
        if queue is not None:
            queue._queue.max_size = max(queue._queue.max_size, _OUTBOX)

    async def _wait_for_room(self) -> None:
        """Backpressure for local publishing: wait while a peer's send queue is nearly full."""
        queues = list(self.pubsub.peer_queues.values())
        for queue in queues:  # (a peer may have been added since _deepen ran)
            queue._queue.max_size = max(queue._queue.max_size, _OUTBOX)
        with trio.move_on_after(_ROOM_WAIT):
            while any(len(q) > q._queue.max_size - _ROOM for q in queues):
                await trio.sleep(0.002)

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
        inbox = self._deep_inbox(topic, await self.pubsub.subscribe(topic))
        scope = trio.CancelScope()
        self._readers[topic] = scope
        seen = _Seen()

        async def read() -> None:
            with scope:
                async for msg in inbox:
                    if not seen.first_time((msg.from_id, msg.seqno)):
                        continue
                    message = GossipMessage(topic=topic, data=bytes(msg.data),
                                            origin=ID(msg.from_id).to_base58(),
                                            seqno=int.from_bytes(msg.seqno, "big"))
                    try:
                        await handler(message)
                    except NodeClosedError:  # the node is closing: messages still queued
                        return               # have nowhere to go (not a handler failure)
                    except Exception:  # one bad message must not end the subscription
                        logger.exception("gossip handler for %r failed", topic)

        self._nursery.start_soon(read)

    def _deep_inbox(self, topic: str, subscription: Any) -> trio.MemoryReceiveChannel[Any]:
        """Swap py-libp2p's 32-message subscription queue for a deep one.

        ``Pubsub.notify_subscriptions`` drops a message when the topic's queue is full, and
        one RPC frame can carry more messages than that, or a handler can lag a burst: 1000
        messages in a row lost dozens. No checkpoint between ``subscribe`` returning and
        the swap, so nothing arrives in between; what the old queue holds moves over.
        """
        send, receive = trio.open_memory_channel[Any](_INBOX)
        while True:
            try:
                send.send_nowait(subscription.receive_channel.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel):
                break
        self.pubsub.subscribed_topics_send[topic] = send
        return receive

    async def unsubscribe(self, topic: str) -> None:
        """Leave ``topic`` (no-op if not subscribed)."""
        scope = self._readers.pop(topic, None)
        if scope is not None:
            scope.cancel()
            await self.pubsub.unsubscribe(topic)
            self.pubsub.remove_topic_validator(topic)

    async def publish(self, topic: str, data: bytes) -> None:
        """Publish ``data`` on ``topic`` (signed with the site key); waits while a peer's send
        queue is nearly full rather than letting py-libp2p drop the message."""
        await self._wait_for_room()
        await self.pubsub.publish(topic, data)

    def topic_peers(self, topic: str) -> list[str]:
        """Connected peers known to be subscribed to ``topic``, sorted."""
        return sorted(p.to_base58() for p in self.pubsub.peer_topics.get(topic, ()))

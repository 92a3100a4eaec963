"""Gossip over gossipsub: fast mesh formation, delivery, origin filtering by the allowlist."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Callable

from p2p import GossipMessage, Node, generate_identity
from tests.p2p.conftest import Pair, peer_of


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def test_publish_reaches_a_subscriber_within_a_second_or_two(pair: Pair) -> None:
    got: list[GossipMessage] = []
    arrived = threading.Event()

    def on_message(msg: GossipMessage) -> None:
        got.append(msg)
        arrived.set()

    t0 = time.monotonic()
    pair.b.subscribe("weights", on_message)
    pair.a.subscribe("weights", lambda msg: None)
    assert wait_for(lambda: pair.b.peer_id in pair.a.topic_peers("weights"))
    for _ in range(40):
        pair.a.publish("weights", b"v1")
        if arrived.wait(0.1):
            break
    assert arrived.is_set() and time.monotonic() - t0 < 5
    assert (got[0].topic, got[0].data, got[0].origin) == ("weights", b"v1", pair.a.peer_id)


def test_asyncio_subscriber(pair: Pair) -> None:
    async def main() -> bytes:
        queue: asyncio.Queue[GossipMessage] = asyncio.Queue()

        async def on_message(msg: GossipMessage) -> None:
            await queue.put(msg)

        await pair.b.asubscribe("events", on_message)
        pair.a.subscribe("events", lambda msg: None)
        for _ in range(50):
            await pair.a.apublish("events", b"hello")
            try:
                return (await asyncio.wait_for(queue.get(), 0.1)).data
            except asyncio.TimeoutError:
                continue
        raise AssertionError("no gossip arrived")

    assert asyncio.run(main()) == b"hello"


def test_messages_from_origins_off_the_allowlist_are_dropped(
        make_node: Callable[..., Node]) -> None:
    """a - b - c: b relays a's messages, but c does not allow a, so it drops them."""
    ia, ib, ic = (generate_identity(s) for s in ("a", "b", "c"))
    a = make_node(ia, peers=(peer_of(ib),))
    b = make_node(ib, peers=(peer_of(ia), peer_of(ic)))
    c = make_node(ic, peers=(peer_of(ib),))
    a.connect(b.addrs[0])
    c.connect(b.addrs[0])
    at_c: list[GossipMessage] = []
    at_b: list[GossipMessage] = []
    c.subscribe("t", at_c.append)
    b.subscribe("t", at_b.append)
    a.subscribe("t", lambda msg: None)
    assert wait_for(lambda: len(b.topic_peers("t")) == 2)
    for i in range(60):  # until b saw a's message, and b's own reached c
        if not any(m.origin == ia.peer_id for m in at_b):
            a.publish("t", b"from-a")
        if not any(m.origin == ib.peer_id for m in at_c):
            b.publish("t", b"from-b")
        time.sleep(0.1)
        if any(m.origin == ia.peer_id for m in at_b) and at_c:
            break
    assert any(m.origin == ia.peer_id for m in at_b)
    # b relays a's message to c through its mesh, or (mesh degree 1: c may not be in b's
    # mesh for the topic) through IHAVE/IWANT a heartbeat or two later; either way c drops it
    for _ in range(150):  # (IHAVE covers a few heartbeats' messages: keep a publishing)
        if any(e.stage == "gossip" and e.peer_id == ia.peer_id for e in c.denied()):
            break
        a.publish("t", b"from-a")
        time.sleep(0.1)
    assert any(e.stage == "gossip" and e.peer_id == ia.peer_id for e in c.denied())
    assert {m.origin for m in at_c} == {ib.peer_id}


def test_heartbeat_stays_fast(pair: Pair) -> None:
    """py-libp2p's adaptive gossip would stretch a 0.5 s heartbeat to 30-60 s on a tiny mesh."""
    pair.a.subscribe("x", lambda msg: None)
    pair.b.subscribe("x", lambda msg: None)
    time.sleep(1.2)  # a couple of heartbeats
    for node, other in ((pair.a, pair.b), (pair.b, pair.a)):
        router = node._mesh.gossip.router
        assert router.heartbeat_interval == node.config.gossip_heartbeat == 0.5
        assert other.peer_id in {p.to_base58() for p in router.mesh.get("x", ())}  # grafted


def test_messages_cross_a_line_of_four_sites(make_node: Callable[..., Node]) -> None:
    """a - b - c - d, each linked only to its neighbours: with the default mesh degree (1)
    every message of a still reaches c and d, relayed through the mesh or fetched through
    gossip's IHAVE/IWANT - none lost, none twice."""
    ids = [generate_identity(s) for s in "abcd"]
    nodes = [make_node(i, peers=tuple(peer_of(o) for o in ids if o is not i)) for i in ids]
    for left, right in itertools.pairwise(nodes):
        left.connect(right.addrs[0])
    got: list[list[bytes]] = [[] for _ in nodes]
    for node, inbox in zip(nodes, got):
        node.subscribe("line", lambda msg, inbox=inbox: inbox.append(msg.data))
    assert wait_for(lambda: all(n.topic_peers("line") for n in nodes), 10)
    for _ in range(100):  # until the mesh carries a warm-up message to the far end
        nodes[0].publish("line", b"warm")
        if wait_for(lambda: b"warm" in got[3], 0.2):
            break
    sent = [f"m{i}".encode() for i in range(20)]
    for data in sent:
        nodes[0].publish("line", data)
    assert wait_for(lambda: all(set(sent) <= set(inbox) for inbox in got[1:]), 10), \
        [len(set(sent) & set(inbox)) for inbox in got[1:]]
    for inbox in got[1:]:
        assert sorted(d for d in inbox if d in sent) == sorted(sent)  # once each

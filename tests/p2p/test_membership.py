"""Membership view, ping liveness and the reconnect backoff (in-process, loopback)."""

from __future__ import annotations

import random
import socket
import time
from collections.abc import Callable

import pytest

from p2p import (
    Backoff,
    MembershipEvent,
    Node,
    NodeConfig,
    P2PTimeoutError,
    SitePeer,
    generate_identity,
    open_mesh,
)
from p2p._membership import Membership
from tests.p2p.conftest import Pair, peer_of


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------- backoff
def test_backoff_doubles_to_the_cap_with_jitter_in_the_upper_half() -> None:
    backoff = Backoff(base=0.05, cap=1.0)
    assert [backoff.ceiling(i) for i in range(7)] == [0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    assert backoff.ceiling(10_000) == 1.0  # no overflow on a long outage
    rng = random.Random(3)
    for attempt in range(8):
        top = backoff.ceiling(attempt)
        delays = [backoff.delay(attempt, rng) for _ in range(500)]
        assert all(top / 2 <= d <= top for d in delays), attempt
        assert max(delays) - min(delays) > top / 3  # really jittered, not a constant
    # the reconnect goal: a peer back after any outage is redialed within the cap
    assert sum(backoff.ceiling(i) for i in range(5)) < 2.0


def test_backoff_and_config_reject_bad_settings_by_name() -> None:
    with pytest.raises(ValueError, match="reconnect_base"):
        Backoff(base=2.0, cap=1.0)
    with pytest.raises(ValueError, match="reconnect_base"):
        NodeConfig(identity=generate_identity("x"), reconnect_base=3.0, reconnect_max=1.0)
    with pytest.raises(ValueError, match="ping_misses"):
        NodeConfig(identity=generate_identity("x"), ping_misses=0)
    with pytest.raises(ValueError, match="ping_interval"):
        NodeConfig(identity=generate_identity("x"), ping_interval=0)


# ---------------------------------------------------------------------- the state machine
def test_membership_state_transitions_and_events() -> None:
    members = Membership(degraded_factor=4.0, degraded_min=0.05)
    seen: list[MembershipEvent] = []
    members.on_change(seen.append)
    def broken(event: MembershipEvent) -> None:
        raise ZeroDivisionError("observer bug")

    members.on_change(broken)  # a broken observer changes nothing
    members.link_up("p", "site-p", "connection open")
    for _ in range(5):
        members.pong("p", 0.002)
    members.pong("p", 0.030)  # 15x the baseline but only 28 ms above it: jitter, not degraded
    assert members.state("p") == "connected"
    members.pong("p", 0.300)  # far above its baseline
    members.pong("p", 0.002)
    assert members.missed("p", "timeout") == 1
    assert members.missed("p", "timeout") == 2
    members.pong("p", 0.002)
    members.link_lost("p", "connection closed; redialing")
    members.unreachable("p", "redial failed")
    members.unreachable("p", "redial failed again")  # no change, no event
    members.link_up("p", "", "connection open")
    members.unreachable("p", "disconnected by this node", deliberate=True)
    kinds = [(e.old, e.new, e.kind) for e in seen]
    assert kinds == [
        (None, "connected", "joined"),
        ("connected", "degraded", "degraded"),
        ("degraded", "connected", "recovered"),
        ("connected", "degraded", "degraded"),
        ("degraded", "connected", "recovered"),
        ("connected", "degraded", "degraded"),
        ("degraded", "unreachable", "partitioned"),
        ("unreachable", "connected", "healed"),
        ("connected", "unreachable", "disconnected"),
    ]
    assert members.events() == seen
    assert seen[6].partition and seen[7].healed and not seen[8].partition
    assert "300.0 ms" in seen[1].reason and "2 ping(s)" not in seen[3].reason
    (member,) = members.members()
    assert (member.peer_id, member.site, member.state) == ("p", "site-p", "unreachable")
    assert member.rtt_ms == pytest.approx(2.0) and 2 < (member.baseline_ms or 0) < 10


def test_pings_unknown_peers_are_ignored() -> None:
    members = Membership()
    members.pong("ghost", 0.01)
    assert members.missed("ghost", "x") == 0
    assert members.members() == [] and members.events() == []


# ---------------------------------------------------------------------- real nodes
def test_members_ping_and_request_on_a_pair(pair: Pair) -> None:
    assert wait_for(lambda: [m.state for m in pair.a.members()] == ["connected"])
    rtt = pair.a.ping(pair.b.peer_id)
    assert 0 < rtt < 1.0
    (member,) = pair.a.members()
    assert member.peer_id == pair.b.peer_id and member.rtt_ms is not None
    assert member.last_seen is not None and abs(member.last_seen - time.time()) < 5
    assert wait_for(lambda: bool(pair.a.members()[0].addrs))  # learned: it can be redialed
    assert all("/p2p/" not in a for a in pair.a.members()[0].addrs)
    assert pair.a.membership_events()[0].kind == "joined"
    pair.b.register("echo", lambda params, peer: params)
    assert pair.a.request(pair.b.peer_id, "echo", {"x": 1}) == {"x": 1}
    stranger = generate_identity("stranger").peer_id
    with pytest.raises(Exception, match="allowlist"):
        pair.a.ping(stranger)


def test_a_node_dials_configured_sites_and_redials_a_restarted_one(
        make_node: Callable[..., Node]) -> None:
    ia, ib = generate_identity("a"), generate_identity("b")
    port = free_port()
    b_cfg = NodeConfig(identity=ib, listen=f"/ip4/127.0.0.1/tcp/{port}", peers=(peer_of(ia),))
    b = open_mesh(b_cfg)
    a = make_node(ia, peers=(SitePeer(peer_id=ib.peer_id, addrs=(f"/ip4/127.0.0.1/tcp/{port}",)),))
    events: list[MembershipEvent] = []
    a.on_membership(events.append)
    try:
        assert wait_for(lambda: ib.peer_id in a.connected_peers())  # nobody called connect()
        b.close()
        assert wait_for(lambda: a.members()[0].state == "unreachable")
        time.sleep(0.5)  # a few failed redials
        b = open_mesh(b_cfg)
        t0 = time.monotonic()
        assert wait_for(lambda: ib.peer_id in a.connected_peers(), timeout=3)
        assert time.monotonic() - t0 < 2.0
        assert wait_for(lambda: a.members()[0].state == "connected")
        kinds = [e.kind for e in events]
    finally:
        b.close()
    assert kinds[:1] == ["joined"] and "partitioned" in kinds and kinds[-1] == "healed"


def test_disconnect_parks_the_peer_until_connect(make_node: Callable[..., Node]) -> None:
    ia, ib = generate_identity("a"), generate_identity("b")
    b = make_node(ib, peers=(peer_of(ia),), reconnect=False)
    a = make_node(ia, peers=(SitePeer(peer_id=ib.peer_id, addrs=(b.addrs[0].split("/p2p/")[0],)),))
    assert wait_for(lambda: ib.peer_id in a.connected_peers())
    a.disconnect(ib.peer_id)
    time.sleep(0.4)  # several backoff periods: no redial
    assert ib.peer_id not in a.connected_peers()
    assert a.membership_events()[-1].kind == "disconnected"
    a.connect(b.addrs[0])
    b.disconnect(ia.peer_id)  # now the link drops from b's side: a redials
    assert wait_for(lambda: ib.peer_id in a.connected_peers() and
                    a.members()[0].state == "connected")


def test_allowing_a_site_with_an_address_dials_it(make_node: Callable[..., Node]) -> None:
    ia, ib = generate_identity("a"), generate_identity("b")
    b = make_node(ib, peers=(peer_of(ia),))
    a = make_node(ia)
    assert a.members() == []
    a.allow(SitePeer(peer_id=ib.peer_id, addrs=(b.addrs[0].split("/p2p/")[0],)))
    assert wait_for(lambda: ib.peer_id in a.connected_peers())
    assert wait_for(lambda: [m.state for m in a.members()] == ["connected"])


def test_silent_peer_goes_degraded_then_unreachable(make_node: Callable[..., Node]) -> None:
    """A peer whose pings stop being answered (but whose socket stays open) is marked
    degraded on the first miss and unreachable after ``ping_misses``; its link is closed."""
    ia, ib = generate_identity("a"), generate_identity("b")
    b = make_node(ib, peers=(peer_of(ia),), reconnect=False)
    a = make_node(ia, peers=(peer_of(ib),), ping_interval=0.1, ping_timeout=0.2, ping_misses=2,
                  reconnect=False)
    a.connect(b.addrs[0])
    assert wait_for(lambda: bool(a.members()) and a.members()[0].rtt_ms is not None)

    async def never(stream: object, peer: str) -> None:  # swallow pings, answer nothing
        import trio
        await trio.sleep_forever()

    from p2p._liveness import PING_PROTOCOL
    b._mesh.host.set_handler(PING_PROTOCOL, never)  # type: ignore[arg-type]
    a._mesh.liveness._streams.clear()  # the next ping opens a stream to the silent handler
    assert wait_for(lambda: a.members()[0].state == "unreachable", timeout=5)
    kinds = [e.kind for e in a.membership_events()]
    assert kinds[-2:] == ["degraded", "partitioned"]
    assert wait_for(lambda: ib.peer_id not in a.connected_peers())
    with pytest.raises(P2PTimeoutError):
        a.connect(b.addrs[0])
        a.ping(ib.peer_id, timeout=0.2)

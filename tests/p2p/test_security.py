"""Noise only, the allowlist, and dialing: who gets a connection, how fast, and how it fails."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import multiaddr
import pytest
import trio
from libp2p import new_host
from libp2p.crypto.x25519 import create_new_key_pair as new_x25519
from libp2p.custom_types import TProtocol
from libp2p.peer.peerinfo import PeerInfo
from libp2p.security.insecure.transport import PLAINTEXT_PROTOCOL_ID, InsecureTransport
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.security.secio import transport as secio
from libp2p.security.tls.transport import PROTOCOL_ID as TLS_ID
from libp2p.security.tls.transport import TLSTransport

from p2p import (
    DeniedEvent,
    DialError,
    Node,
    P2PError,
    PeerIdMismatchError,
    PeerNotAllowedError,
    SiteIdentity,
    generate_identity,
)
from p2p._security import GatedNoise, muxer_options
from tests.p2p.conftest import Pair, peer_of


def foreign_security(kind: str, ident: SiteIdentity) -> Any:
    kp = ident.key_pair
    return {
        "plaintext": {TProtocol(PLAINTEXT_PROTOCOL_ID): InsecureTransport(kp)},
        "secio": {TProtocol(secio.ID): secio.Transport(kp)},
        "tls": {TLS_ID: TLSTransport(kp)},
        "noise": {NOISE_ID: NoiseTransport(kp, noise_privkey=new_x25519().private_key)},
    }[kind]


@pytest.mark.parametrize("kind,connects", [("plaintext", False), ("secio", False),
                                           ("tls", False), ("noise", True)])
def test_only_noise_is_negotiated(make_node: Callable[..., Node], kind: str,
                                  connects: bool) -> None:
    """A stock py-libp2p peer offering only ``kind`` (and allowlisted) connects iff Noise."""
    foreign = generate_identity("foreign")
    ours = make_node(peers=(peer_of(foreign),))
    ours_id, ours_addr = ours.peer_id, multiaddr.Multiaddr(ours.addrs[0].split("/p2p/")[0])
    outcomes: dict[str, Any] = {}

    async def main() -> None:
        host = new_host(key_pair=foreign.key_pair, sec_opt=foreign_security(kind, foreign),
                        muxer_opt=muxer_options())
        async with host.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            from libp2p.peer.id import ID
            try:  # the foreign peer dials us
                with trio.fail_after(10):
                    await host.connect(PeerInfo(ID.from_base58(ours_id), [ours_addr]))
                outcomes["inbound"] = True
            except Exception:  # noqa: BLE001 - whatever py-libp2p raises, it did not connect
                outcomes["inbound"] = False
            await host.disconnect(ID.from_base58(ours_id))
            await trio.sleep(0.2)
            try:  # we dial the foreign peer
                await trio.to_thread.run_sync(ours.connect, str(host.get_addrs()[0]))
                outcomes["outbound"] = True
            except DialError:
                outcomes["outbound"] = False
            await host.close()

    trio.run(main)
    assert outcomes == {"inbound": connects, "outbound": connects}


def test_peer_not_on_the_allowlist_is_refused_after_the_handshake(
        make_node: Callable[..., Node]) -> None:
    ia, ib, ic = (generate_identity(s) for s in ("a", "b", "stranger"))
    events: list[DeniedEvent] = []
    b = make_node(ib, peers=(peer_of(ia),))
    b.on_denied(events.append)
    stranger = make_node(ic, peers=(peer_of(ib),))  # it would talk to b; b will not
    a = make_node(ia, peers=(peer_of(ib),))

    with pytest.raises(DialError):
        stranger.connect(b.addrs[0])
    assert [(e.peer_id, e.direction, e.stage) for e in b.denied()] == [
        (ic.peer_id, "inbound", "handshake")]
    assert events == b.denied()
    assert ic.peer_id not in b.connected_peers()

    assert a.connect(b.addrs[0]) == ib.peer_id  # an allowlisted peer is accepted
    b.register("who", lambda params, peer: peer)
    assert a.call(ib.peer_id, "who") == ia.peer_id
    assert len(b.denied()) == 1


def test_we_do_not_dial_peers_off_our_allowlist(make_node: Callable[..., Node]) -> None:
    other = make_node()
    ours = make_node()
    t0 = time.perf_counter()
    with pytest.raises(PeerNotAllowedError) as info:
        ours.connect(other.addrs[0])
    assert time.perf_counter() - t0 < 0.5
    assert info.value.peer_id == other.peer_id and "allowlist" in str(info.value)
    assert [(e.stage, e.direction) for e in ours.denied()] == [("dial", "outbound")]


def test_streams_from_a_peer_removed_from_the_allowlist_are_reset(pair: Pair) -> None:
    pair.b.register("echo", lambda params, peer: params)
    assert pair.a.call(pair.b.peer_id, "echo", 1) == 1
    pair.b.allowlist.remove(pair.a.peer_id)  # the connection stays; new streams must not
    with pytest.raises(P2PError):
        pair.a.call(pair.b.peer_id, "echo", 2, timeout=5)
    stages = [(e.peer_id, e.stage) for e in pair.b.denied()]
    assert (pair.a.peer_id, "stream") in stages


def test_disallow_closes_the_connection(pair: Pair) -> None:
    assert pair.b.peer_id in pair.a.connected_peers()
    pair.b.disallow(pair.a.peer_id)
    deadline = time.monotonic() + 5
    while pair.b.peer_id in pair.a.connected_peers() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert pair.b.peer_id not in pair.a.connected_peers()
    with pytest.raises(DialError):  # and it cannot come back
        pair.a.connect(pair.b.addrs[0])


def test_wrong_peer_id_at_dial_fails_fast_without_retries(
        make_node: Callable[..., Node], monkeypatch: pytest.MonkeyPatch) -> None:
    ia, ib, imposter = (generate_identity(s) for s in ("a", "b", "expected"))
    b = make_node(ib, peers=(peer_of(ia),))
    a = make_node(ia, peers=(peer_of(ib), peer_of(imposter)))
    handshakes: list[int] = []
    real = GatedNoise.secure_inbound

    async def counting(self: GatedNoise, conn: Any) -> Any:
        handshakes.append(1)
        return await real(self, conn)

    monkeypatch.setattr(GatedNoise, "secure_inbound", counting)
    wrong = b.addrs[0].replace(ib.peer_id, imposter.peer_id)
    t0 = time.perf_counter()
    with pytest.raises(PeerIdMismatchError) as info:
        a.connect(wrong)
    elapsed = time.perf_counter() - t0
    assert elapsed < 1.0, elapsed
    err = info.value
    assert (err.expected_peer_id, err.actual_peer_id, err.address) == (
        imposter.peer_id, ib.peer_id, wrong)
    assert imposter.peer_id in str(err) and ib.peer_id in str(err)
    time.sleep(0.3)  # a retry would show up as a second handshake
    assert len(handshakes) == 1
    assert a.connect(b.addrs[0]) == ib.peer_id  # the right id still works


def test_connection_setup_has_no_fixed_delay(pair: Pair) -> None:
    """py-libp2p's dial_peer waits 250 ms per successful dial; ours must not."""
    times = []
    for _ in range(8):
        pair.a.disconnect(pair.b.peer_id)
        t0 = time.perf_counter()
        pair.a.connect(pair.b.addrs[0])
        times.append(time.perf_counter() - t0)
    assert statistics.median(times) < 0.15, times


def test_identity_is_what_the_host_announces(make_node: Callable[..., Node]) -> None:
    ident = generate_identity("x")
    node = make_node(ident)
    assert node.peer_id == ident.peer_id
    assert all(addr.endswith(f"/p2p/{ident.peer_id}") for addr in node.addrs)


def test_inbound_slots_are_released_when_connections_close(
        make_node: Callable[..., Node]) -> None:
    """py-libp2p 0.8.1 keeps an inbound slot per connection until the node stops; with
    max_connections=3 the 4th reconnect would be refused."""
    ia, ib = generate_identity("a"), generate_identity("b")
    b = make_node(ib, peers=(peer_of(ia),), max_connections=3)
    a = make_node(ia, peers=(peer_of(ib),))
    for _ in range(7):
        a.connect(b.addrs[0])
        a.disconnect(ib.peer_id)
    assert a.connect(b.addrs[0]) == ib.peer_id

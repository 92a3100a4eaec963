"""Links that break for real: a peer process killed with SIGKILL and restarted, and network
partitions (two network namespaces joined by a veth pair, or a TCP relay that blackholes)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, cast

import pytest

from p2p import GossipMessage, MembershipEvent, Node, SitePeer, generate_identity, init_identity
from tests.p2p.conftest import peer_of
from tests.p2p.relay import Relay
from tests.p2p.test_membership import free_port, wait_for

ROOT = Path(__file__).resolve().parents[2]
FAST = {"ping_interval": 0.2, "ping_timeout": 0.5, "ping_misses": 2, "reconnect_dial_timeout": 1.0}


class Peer:
    """A node in a child process (``tests/p2p/peer_proc.py``)."""

    def __init__(self, key_dir: Path, listen: str, peers: list[str],
                 prefix: tuple[str, ...] = ()) -> None:
        cmd = [*prefix, sys.executable, "-m", "tests.p2p.peer_proc", "--key-dir", str(key_dir),
               "--listen", listen] + [f"--peer={p}" for p in peers]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True)
        self.addr = self._ready(self.proc.stdout)
        self.ready_at = time.monotonic()

    def _ready(self, out: IO[str] | None) -> str:
        assert out is not None
        box: list[str] = []
        reader = threading.Thread(target=lambda: box.append(out.readline()), daemon=True)
        reader.start()
        reader.join(60)
        if not box or not box[0].startswith("READY "):
            self.kill()
            raise AssertionError(f"peer process did not start: {box}")
        return box[0].split()[1]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


def collector() -> tuple[list[GossipMessage], Callable[[GossipMessage], None]]:
    got: list[GossipMessage] = []
    lock = threading.Lock()

    def on_message(msg: GossipMessage) -> None:
        with lock:
            got.append(msg)

    return got, on_message


def publish_until_mesh(a: Node, peer_id: str, topic: str) -> None:
    """Wait until both sides know the other subscribed (the gossip mesh formed)."""
    assert wait_for(lambda: peer_id in a.topic_peers(topic), timeout=10)
    assert wait_for(lambda: a.peer_id in cast(list, a.request(peer_id, "topic_peers", timeout=5)),
                    timeout=10)


@pytest.mark.slow
@pytest.mark.integration
def test_peer_killed_and_restarted_reconnects_fast_and_gossip_has_no_duplicates(
        make_node: Callable[..., Node], tmp_path: Path) -> None:
    ia, ib = generate_identity("a"), init_identity(tmp_path / "b", site="b")
    port = free_port()
    listen = f"/ip4/127.0.0.1/tcp/{port}"
    a = make_node(ia, peers=(SitePeer(peer_id=ib.peer_id, addrs=(listen,)),), **FAST)
    events: list[MembershipEvent] = []
    a.on_membership(events.append)
    got, on_message = collector()
    a.subscribe("t", on_message)
    # the child knows our peer id but no address: only our redials can bring the link back
    peer = Peer(tmp_path / "b", listen, [ia.peer_id])
    try:
        assert wait_for(lambda: ib.peer_id in a.connected_peers(), timeout=5)
        publish_until_mesh(a, ib.peer_id, "t")
        assert a.request(ib.peer_id, "publish", {"data": [f"x{i}" for i in range(150)]}) == 150
        for i in range(20):
            a.publish("t", f"a{i}".encode())
        from_b = lambda: [m for m in got if m.origin == ib.peer_id]
        assert wait_for(lambda: len(from_b()) >= 150, timeout=10)
        peer.kill()
        assert wait_for(lambda: a.members()[0].state == "unreachable", timeout=5)
        time.sleep(0.5)  # the redials back off meanwhile
        peer = Peer(tmp_path / "b", listen, [ia.peer_id])
        assert wait_for(lambda: ib.peer_id in a.connected_peers(), timeout=5)
        reconnect_s = time.monotonic() - peer.ready_at
        assert reconnect_s <= 2.0, reconnect_s
        assert a.request(ib.peer_id, "echo", [1, 2]) == [1, 2]  # RPC works again
        publish_until_mesh(a, ib.peer_id, "t")  # the restarted peer rejoined the topic
        # a restarted publisher must not reuse its old sequence numbers (they would be
        # dropped as already seen): 150 more, published within the same seconds
        assert a.request(ib.peer_id, "publish", {"data": [f"y{i}" for i in range(150)]}) == 150
        for i in range(20):
            a.publish("t", f"b{i}".encode())
        assert wait_for(lambda: len(from_b()) >= 300, timeout=10)
        time.sleep(0.5)  # anything duplicated would arrive by now
        at_peer: list[list[str]] = []

        def peer_got_ours() -> bool:
            everything = cast(list[list[str]], a.request(ib.peer_id, "received"))
            at_peer[:] = [m for m in everything if m[0] == ia.peer_id]
            return len(at_peer) >= 20

        assert wait_for(peer_got_ours, timeout=5)
    finally:
        peer.kill()
    keys = [(m.origin, m.seqno) for m in got]
    assert len(keys) == len(set(keys)) == 340  # no duplicate, none lost (40 are a's own)
    assert sorted(m.data for m in from_b()) == sorted(
        [f"x{i}".encode() for i in range(150)] + [f"y{i}".encode() for i in range(150)])
    assert sorted(d for _, _, d in at_peer) == sorted(f"b{i}" for i in range(20))
    kinds = [e.kind for e in events]
    assert "partitioned" in kinds and kinds[-1] == "healed"


# ---------------------------------------------------------------------- partitions
@contextmanager
def netns_pair() -> Iterator[tuple[str, str, str, Callable[[bool], None]]]:
    """A network namespace joined to ours by a veth pair: (ns, our ip, its ip, set_link)."""
    tag = uuid.uuid4().hex[:6]
    ns, here, there = f"hive-{tag}", f"hva{tag}", f"hvb{tag}"
    net = f"10.{int(tag[:2], 16) % 250 + 1}.{int(tag[2:4], 16)}"
    steps = [["ip", "netns", "add", ns],
             ["ip", "link", "add", here, "type", "veth", "peer", "name", there],
             ["ip", "link", "set", there, "netns", ns],
             ["ip", "addr", "add", f"{net}.1/24", "dev", here],
             ["ip", "link", "set", here, "up"],
             ["ip", "-n", ns, "addr", "add", f"{net}.2/24", "dev", there],
             ["ip", "-n", ns, "link", "set", there, "up"],
             ["ip", "-n", ns, "link", "set", "lo", "up"]]
    try:
        for step in steps:
            done = subprocess.run(step, capture_output=True, text=True, check=False)
            if done.returncode:
                pytest.skip(f"cannot build a network namespace ({' '.join(step)}: "
                            f"{done.stderr.strip()}); needs root and iproute2 - the relay "
                            "variant of this test covers partitions without them")

        def set_link(up: bool) -> None:
            subprocess.run(["ip", "link", "set", here, "up" if up else "down"], check=True)

        yield ns, f"{net}.1", f"{net}.2", set_link
    finally:
        subprocess.run(["ip", "link", "del", here], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


def check_partition_and_heal(a: Node, b_id: str, cut: Callable[[], None],
                             heal: Callable[[], None]) -> None:
    """``cut`` must make ``a`` see ``b_id`` unreachable; ``heal`` must bring RPC and gossip
    back without restarting anything."""
    got, on_message = collector()
    a.subscribe("t", on_message)
    assert wait_for(lambda: b_id in a.connected_peers(), timeout=5)
    publish_until_mesh(a, b_id, "t")
    events: list[MembershipEvent] = []
    a.on_membership(events.append)
    t_cut = time.monotonic()
    cut()
    assert wait_for(lambda: any(e.partition for e in events), timeout=6), events
    detect_s = time.monotonic() - t_cut
    assert detect_s < 4.0, detect_s  # 2 missed pings (0.5 s, then 1 s) 0.2 s apart
    time.sleep(1.0)  # redials fail meanwhile
    assert a.members()[0].state == "unreachable"
    t_heal = time.monotonic()
    heal()
    assert wait_for(lambda: any(e.healed for e in events), timeout=6), events
    assert time.monotonic() - t_heal < 4.0
    assert a.request(b_id, "echo", "after", timeout=5) == "after"
    publish_until_mesh(a, b_id, "t")
    a.request(b_id, "publish", {"data": ["healed"]})
    assert wait_for(lambda: any(m.data == b"healed" for m in got), timeout=5)


@pytest.mark.slow
@pytest.mark.integration
def test_partition_between_network_namespaces_heals(make_node: Callable[..., Node],
                                                    tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root; the relay variant covers partitions")
    with netns_pair() as (ns, ip_a, ip_b, set_link):
        ia, ib = generate_identity("a"), init_identity(tmp_path / "b", site="b")
        port_a, port_b = free_port(), free_port()
        b_listen = f"/ip4/{ip_b}/tcp/{port_b}"
        a = make_node(ia, listen=f"/ip4/{ip_a}/tcp/{port_a}",
                      peers=(SitePeer(peer_id=ib.peer_id, addrs=(b_listen,)),), **FAST)
        peer = Peer(tmp_path / "b", b_listen, [f"{ia.peer_id}=/ip4/{ip_a}/tcp/{port_a}"],
                    prefix=("ip", "netns", "exec", ns))
        try:
            check_partition_and_heal(a, ib.peer_id, lambda: set_link(False),
                                     lambda: set_link(True))
        finally:
            peer.kill()


@pytest.mark.slow
def test_partition_through_a_blackholing_relay_heals(make_node: Callable[..., Node]) -> None:
    """Loopback variant: a reaches b only through a relay that silently drops everything
    (b does not redial, so the relay is the only path)."""
    ia, ib = generate_identity("a"), generate_identity("b")
    b = make_node(ib, peers=(peer_of(ia),), reconnect=False, **FAST)
    relay = Relay(int(b.addrs[0].split("/tcp/")[1].split("/")[0]))
    try:
        a = make_node(ia, peers=(SitePeer(peer_id=ib.peer_id, addrs=(relay.addr,)),),
                      learn_addrs=False, **FAST)  # (b's own address would bypass the relay)
        b.subscribe("t", lambda msg: None)  # b must be in the topic for a's mesh
        b.register("echo", lambda params, peer: params)
        b.register("topic_peers", lambda params, peer: b.topic_peers("t"))
        b.register("publish", lambda params, peer: b.publish("t", b"healed"))
        check_partition_and_heal(a, ib.peer_id, relay.blackhole, relay.restore)
        assert relay.upstream_bytes > 0
    finally:
        relay.close()

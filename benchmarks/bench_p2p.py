"""p2p benchmark: our libp2p stack (TCP + Noise XX/ChaCha20-Poly1305 + yamux + our frames) on
loopback, against raw TCP and the cipher's own speed, with every peer in its own process.

Sections (each one dict in ``results``, with its ``config``):

1. ``throughput``: one-way transfer of a tensor of ``--size`` bytes (1 GiB; quick 64 MiB) to a
   receiver process: ``Node.send_tensors`` (wire time = ``TransferStats.seconds``, from opening
   the stream to the receiver's verified reply; ``end_to_end_s`` adds the sender's XXH3-128)
   vs raw TCP (``sendall`` of the same bytes to a process that reads them all) vs
   ChaCha20-Poly1305 (``cryptography``, one core) sealing 65,519-byte Noise frames.
   Medians of ``--reps``. Goal: ours / raw TCP >= 0.25.
2. ``connect``: a fresh connection (TCP + Noise XX handshake + yamux) to a peer process,
   ``Node.connect`` then ``disconnect``, N times. Goal: p50 <= 10 ms.
3. ``gossip``: one publisher, 20 subscriber nodes, each in its own process like a site (each
   connected to the publisher and to two ring neighbours), M messages at ``--rate`` per second (20; the publisher
   sends each to all 20 itself: flood publishing, mesh degree 1); latency until *all 20*
   received a message (receive clock - publish clock, same host). Goals: p50 <= 50 ms,
   p99 <= 200 ms, 0 lost.
4. ``reconnect``: SIGKILL the peer process and start it again at once (same identity and
   port); time from the restarted peer listening until the client's node has connected to it
   (the node's own redial; the client does nothing), as the restarted peer sees it.
   Goal: p95 <= 2 s.

Usage::

    python benchmarks/bench_p2p.py --quick      # < 60 s: 32 MiB, 20 connects, 8 peers x 60 messages, 2 restarts
    python benchmarks/bench_p2p.py              # 1 GiB, 200 connects, 1000 messages, 10 restarts

The machine may be shared: quote medians and ratios, not absolute times. The exit code is 0
even when a goal is missed (the goals table says MISSED); it is 1 only if a section crashed.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import (
    base_parser,
    dig,
    goal,
    host_info,
    print_goals,
    print_results,
    summarize,
    write_json,
)

BENCHMARK = "p2p"
TOPIC = "bench"
NOISE_FRAME = 65535 - 16  # largest Noise plaintext per transport message (tag: 16 bytes)
MiB = 1 << 20


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- child processes ----------------------------------------------------------------------

def _child_tcp_sink(port: int, size: int, reps: int) -> None:
    """Accept ``reps`` connections; read ``size`` bytes from each, then answer one byte."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port))
    srv.listen(1)
    print("READY", flush=True)
    buf = bytearray(4 * MiB)
    for _ in range(reps):
        conn, _ = srv.accept()
        left = size
        while left:
            n = conn.recv_into(buf, min(len(buf), left))
            if not n:
                break
            left -= n
        conn.sendall(b"k")
        conn.close()


def _child_node(key_dir: str, listen: str, allow: list[str]) -> None:
    """A p2p node that accepts tensors (and drops them) until stdin closes."""
    from p2p import Node, NodeConfig, SitePeer, load_identity

    ident = load_identity(key_dir)
    cfg = NodeConfig(identity=ident, listen=listen, peers=tuple(SitePeer(peer_id=p) for p in allow),
                     max_tensor_bytes=8 << 30, handler_threads=2)
    node = Node(cfg).start()
    node.on_tensors(lambda received: len(received.data))
    print("READY " + json.dumps({"peer_id": node.peer_id, "addrs": node.addrs, "t": time.time()}),
          flush=True)

    def first_connection() -> None:  # the peer's redial reached this new process
        while not node.connected_peers():
            time.sleep(0.002)
        print(f"CONNECTED {time.time()}", flush=True)

    threading.Thread(target=first_connection, daemon=True).start()
    sys.stdin.read()
    node.close()


def _child_subscriber(key_dir: str, allow: list[str]) -> None:
    """One subscriber node (a site of its own). stdin commands: "DIAL <addr>..." (answers
    "DIALED"), "WARM?" (answers "WARM 0|1"), "DUMP" (answers receive times, then exits)."""
    from p2p import Node, NodeConfig, SitePeer, load_identity

    ident = load_identity(key_dir)
    node = Node(NodeConfig(identity=ident, handler_threads=1,
                           peers=tuple(SitePeer(peer_id=p) for p in allow))).start()
    got: dict[int, float] = {}
    warm = threading.Event()

    def on_message(msg: Any) -> None:
        index, = struct.unpack_from(">q", msg.data)
        if index < 0:
            warm.set()
        else:
            got.setdefault(index, time.time())

    node.subscribe(TOPIC, on_message)
    print("READY " + json.dumps({"peer_id": node.peer_id, "addrs": node.addrs}), flush=True)
    for line in sys.stdin:
        if line.startswith("DIAL "):
            for addr in line.split()[1:]:
                node.connect(addr)
            print("DIALED", flush=True)
        elif line.startswith("WARM?"):
            print(f"WARM {int(warm.is_set())}", flush=True)
        elif line.startswith("DUMP"):
            print("DUMP " + json.dumps({str(k): v for k, v in got.items()}), flush=True)
            break
    node.close()


def _has_field(name: str) -> bool:
    from dataclasses import fields

    from p2p import NodeConfig

    return any(f.name == name for f in fields(NodeConfig))


def _spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, __file__, "--child", *args], text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=1)


def _read_line(proc: subprocess.Popen[str], prefix: str, timeout: float = 120) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"child exited (code {proc.poll()}) before printing {prefix}")
            if line.startswith(prefix):
                return line[len(prefix):].strip()
    raise TimeoutError(f"child did not print {prefix} within {timeout}s")


def _stop(proc: subprocess.Popen[str]) -> None:
    try:
        if proc.stdin:
            proc.stdin.close()
        proc.wait(timeout=20)
    except (subprocess.TimeoutExpired, OSError):
        proc.kill()
        proc.wait()


# ---- 1. throughput ------------------------------------------------------------------------

def _raw_tcp(size: int, reps: int, payload: memoryview) -> list[float]:
    port = _free_port()
    child = _spawn("tcp-sink", str(port), str(size), str(reps))
    try:
        _read_line(child, "READY")
        out = []
        for _ in range(reps):
            s = socket.create_connection(("127.0.0.1", port))
            t0 = time.perf_counter()
            for off in range(0, size, 4 * MiB):
                s.sendall(payload[off:off + 4 * MiB])
            assert s.recv(1) == b"k"
            out.append(time.perf_counter() - t0)
            s.close()
        return out
    finally:
        child.wait(timeout=30)


def _chacha_rate(nbytes: int) -> float:
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    aead = ChaCha20Poly1305(os.urandom(32))
    frame = os.urandom(NOISE_FRAME)
    frames = max(1, nbytes // NOISE_FRAME)
    t0 = time.perf_counter()
    for i in range(frames):
        aead.encrypt(i.to_bytes(12, "little"), frame, None)
    return frames * NOISE_FRAME / (time.perf_counter() - t0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Peer:
    """A node child process with a persistent identity (so it can be restarted as itself)."""

    def __init__(self, root: Path, allow: str, port: int = 0) -> None:
        from p2p import init_identity

        self.key_dir = root / f"peer-{_free_port()}"
        self.ident = init_identity(self.key_dir, "bench-peer")
        self.allow = allow
        self.port = port
        self.proc: subprocess.Popen[str] | None = None
        self.addr = ""

    def start(self) -> float:
        """Start the child; returns the wall-clock time it reported listening at."""
        self.proc = _spawn("node", str(self.key_dir), f"/ip4/127.0.0.1/tcp/{self.port}", self.allow)
        info = json.loads(_read_line(self.proc, "READY "))
        ready = float(info["t"])
        self.addr = info["addrs"][0]
        self.port = int(self.addr.split("/tcp/")[1].split("/")[0])
        return ready

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            _stop(self.proc)


def bench_throughput(size: int, reps: int, root: Path) -> dict[str, Any]:
    import numpy as np
    from safetensors.numpy import save

    from p2p import Node, NodeConfig, SitePeer, generate_identity

    log(f"throughput: building a {size / MiB:.0f} MiB tensor")
    blob = save({"t": np.frombuffer(os.urandom(MiB), dtype=np.uint8).repeat(size // MiB)})
    view = memoryview(blob)
    log(f"throughput: raw TCP x{reps}")
    raw = _raw_tcp(len(blob), reps, view)
    log("throughput: ChaCha20-Poly1305, one core")
    chacha = _chacha_rate(min(len(blob), 256 * MiB))
    me = generate_identity("bench-client")
    peer = Peer(root, me.peer_id)
    peer.start()
    node = Node(NodeConfig(identity=me, peers=(SitePeer(peer_id=peer.ident.peer_id),),
                           tensor_timeout=3600)).start()
    wire, e2e = [], []
    try:
        node.connect(peer.addr)
        node.send_tensors(peer.ident.peer_id, save({"warm": np.zeros(1024, np.uint8)}))
        for r in range(reps):
            t0 = time.perf_counter()
            stats = node.send_tensors(peer.ident.peer_id, blob, name="bench")
            e2e.append(time.perf_counter() - t0)
            wire.append(stats.seconds)
            log(f"throughput rep {r + 1}/{reps}: ours {len(blob) / stats.seconds / MiB:,.0f} MiB/s, "
                f"raw TCP {len(blob) / raw[r] / MiB:,.0f} MiB/s")
    finally:
        node.close()
        peer.stop()
    mb = len(blob) / MiB
    ours = mb / statistics.median(wire)
    raw_rate = mb / statistics.median(raw)
    return {"section": "throughput",
            "config": {"bytes": len(blob), "reps": reps, "chunk": node.config.tensor_chunk,
                       "window": node.config.tensor_window, "noise_frame": NOISE_FRAME},
            "ours_mib_per_s": round(ours, 1), "ours_end_to_end_mib_per_s": round(mb / statistics.median(e2e), 1),
            "raw_tcp_mib_per_s": round(raw_rate, 1), "chacha20poly1305_mib_per_s": round(chacha / MiB, 1),
            "ours_vs_raw_tcp": round(ours / raw_rate, 4), "ours_vs_chacha": round(ours / (chacha / MiB), 4),
            "ours_first_mib_per_s": round(mb / wire[0], 1),
            "first_vs_raw_tcp": round(mb / wire[0] / raw_rate, 4),
            "note": ("the first transfer receives into fresh memory (page faults; on a VM also the "
                     "host's first touch); later ones reuse the receive buffer the previous "
                     "handler let go of (p2p._buffers.BufferPool). Goal: median over reps"),
            "ours_s": [round(x, 3) for x in wire], "raw_s": [round(x, 3) for x in raw]}


# ---- 2. connection set-up -----------------------------------------------------------------

def bench_connect(n: int, root: Path) -> dict[str, Any]:
    from p2p import Node, NodeConfig, SitePeer, generate_identity

    me = generate_identity("bench-client")
    peer = Peer(root, me.peer_id)
    peer.start()
    extra = {"reconnect": False} if _has_field("reconnect") else {}
    node = Node(NodeConfig(identity=me, peers=(SitePeer(peer_id=peer.ident.peer_id),), **extra)).start()
    times = []
    try:
        for _ in range(3):  # warm-up
            node.connect(peer.addr)
            node.disconnect(peer.ident.peer_id)
        for _ in range(n):
            t0 = time.perf_counter()
            node.connect(peer.addr)
            times.append(time.perf_counter() - t0)
            node.disconnect(peer.ident.peer_id)
            time.sleep(0.002)
    finally:
        node.close()
        peer.stop()
    log(f"connect: p50 {statistics.median(times) * 1000:.1f} ms over {n}")
    return {"section": "connect", "config": {"n": n, "what": "TCP + Noise XX + yamux, loopback"},
            "connect_ms": summarize(times, 1000)}


# ---- 3. gossip ----------------------------------------------------------------------------

def bench_gossip(subs: int, messages: int, rate: float, root: Path) -> dict[str, Any]:
    from p2p import Node, NodeConfig, SitePeer, generate_identity, init_identity

    me = generate_identity("bench-pub")
    key_dirs = [root / f"sub-{i}" for i in range(subs)]
    ids = [init_identity(d, f"sub-{i}").peer_id for i, d in enumerate(key_dirs)]
    children: list[subprocess.Popen[str]] = []
    node = None

    def ask(child: subprocess.Popen[str], line: str, prefix: str) -> str:
        assert child.stdin is not None
        child.stdin.write(line + "\n")
        child.stdin.flush()
        return _read_line(child, prefix)

    try:
        for i, key_dir in enumerate(key_dirs):  # one process per subscriber: a site each
            allow = [me.peer_id] + [p for j, p in enumerate(ids) if j != i]
            children.append(_spawn("sub", str(key_dir), *allow))
        infos = [json.loads(_read_line(c, "READY ", timeout=180)) for c in children]
        node = Node(NodeConfig(identity=me, peers=tuple(SitePeer(peer_id=p) for p in ids),
                               gossip_rate=max(1000.0, rate * 4))).start()
        node.subscribe(TOPIC, lambda msg: None)
        for info in infos:
            node.connect(info["addrs"][0])
        for i, child in enumerate(children):  # a ring: each also dials its next two neighbours
            ask(child, "DIAL " + " ".join(infos[(i + j) % subs]["addrs"][0] for j in (1, 2)), "DIALED")
        deadline = time.monotonic() + 60
        while len(node.topic_peers(TOPIC)) < subs and time.monotonic() < deadline:
            time.sleep(0.05)
        warm_deadline = time.monotonic() + 60
        while time.monotonic() < warm_deadline:  # until every subscriber got a warm-up message
            node.publish(TOPIC, struct.pack(">qd", -1, time.time()))
            if sum(int(ask(c, "WARM?", "WARM ")) for c in children) == subs:
                break
            time.sleep(0.2)
        time.sleep(1.0)  # let a few heartbeats settle the mesh
        sent: dict[int, float] = {}
        t_start = time.perf_counter()
        for i in range(messages):
            target = t_start + i / rate
            delay = target - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            sent[i] = time.time()
            node.publish(TOPIC, struct.pack(">qd", i, sent[i]) + b"x" * 100)
        time.sleep(2.0)  # stragglers
        got = [{int(k): v for k, v in json.loads(ask(c, "DUMP", "DUMP ")).items()} for c in children]
    finally:
        if node is not None:
            node.close()
        for child in children:
            _stop(child)
    all_lat, lost_msgs, missing_pairs = [], 0, 0
    for i, t in sent.items():
        arrivals = [g.get(i) for g in got]
        missing = sum(a is None for a in arrivals)
        missing_pairs += missing
        if missing:
            lost_msgs += 1
        else:
            all_lat.append(max(arrivals) - t)  # type: ignore[type-var]
    log(f"gossip: {messages} messages to {subs} peers, lost {lost_msgs}")
    return {"section": "gossip",
            "config": {"subscribers": subs, "messages": messages, "rate_per_s": rate,
                       "topology": "publisher connected to all; subscribers in a ring (+1, +2); "
                                   "one process per node",
                       "payload_bytes": 116},
            "delivery_to_all_ms": summarize(all_lat, 1000), "lost_messages": lost_msgs,
            "missing_deliveries": missing_pairs}


# ---- 4. reconnect -------------------------------------------------------------------------

def bench_reconnect(trials: int, root: Path) -> dict[str, Any]:
    from p2p import Node, NodeConfig, SitePeer, generate_identity

    me = generate_identity("bench-client")
    peer = Peer(root, me.peer_id, port=_free_port())
    peer.start()
    transport = peer.addr.split("/p2p/")[0]
    native = _has_field("reconnect")
    node = Node(NodeConfig(identity=me, peers=(SitePeer(peer_id=peer.ident.peer_id,
                                                        addrs=(transport,)),))).start()
    redial = None if native else _Redialer(node, peer.addr)
    after_ready, outage = [], []
    try:
        node.connect(peer.addr)
        assert peer.proc is not None
        _read_line(peer.proc, "CONNECTED ")
        for t in range(trials):
            t_kill = time.time()
            peer.kill()  # and start it again at once, as a supervisor would
            t_ready = peer.start()
            assert peer.proc is not None
            t_up = float(_read_line(peer.proc, "CONNECTED ", timeout=60))
            after_ready.append(max(0.0, t_up - t_ready))
            outage.append(t_up - t_kill)
            log(f"reconnect {t + 1}/{trials}: {after_ready[-1] * 1000:.0f} ms after the peer listened")
    finally:
        if redial is not None:
            redial.stop()
        node.close()
        peer.stop()
    return {"section": "reconnect",
            "config": {"trials": trials, "who_redials": "p2p Node (NodeConfig.reconnect)" if native
                       else "benchmark loop (this p2p has no reconnect)",
                       "restart": "SIGKILL, then started again at once (same identity and port)",
                       "measured": "restarted peer listening -> first connection from the client, "
                                   "seen by the peer"},
            "reconnect_after_peer_listening_s": summarize(after_ready),
            "outage_from_kill_s": summarize(outage)}


class _Redialer:
    """Redial loop for p2p versions without NodeConfig.reconnect (50 ms doubling to 1 s)."""

    def __init__(self, node: Any, addr: str) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(node, addr), daemon=True)
        self._thread.start()

    def _run(self, node: Any, addr: str) -> None:
        delay = 0.05
        while not self._stop.wait(delay):
            try:
                node.connect(addr)
                delay = 0.05
            except Exception:  # noqa: BLE001 - down: back off
                delay = min(1.0, delay * 2)

    def stop(self) -> None:
        self._stop.set()


# ---- main ---------------------------------------------------------------------------------

def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        kind, args = sys.argv[2], sys.argv[3:]
        if kind == "tcp-sink":
            _child_tcp_sink(int(args[0]), int(args[1]), int(args[2]))
        elif kind == "node":
            _child_node(args[0], args[1], args[2:])
        elif kind == "sub":
            _child_subscriber(args[0], args[1:])
        return 0
    parser = base_parser("p2p: throughput vs raw TCP and ChaCha20-Poly1305, connect, gossip, reconnect")
    parser.add_argument("--size", type=int, default=None, help="tensor bytes (default 1 GiB; quick 64 MiB)")
    parser.add_argument("--reps", type=int, default=None, help="throughput repetitions (3; quick 2)")
    parser.add_argument("--peers", type=int, default=None, help="gossip subscribers (20; quick 8)")
    parser.add_argument("--rate", type=float, default=20.0, help="gossip messages per second")
    parser.add_argument("--sections", default="throughput,connect,gossip,reconnect")
    args = parser.parse_args()
    q = args.quick
    size = args.size or ((32 if q else 1024) * MiB)
    reps = args.reps or (2 if q else 3)
    host = host_info()
    t0 = time.perf_counter()
    results: list[dict[str, Any]] = []
    crashed: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="hive-bench-p2p-"))
    os.chmod(root, 0o700)
    plan = {
        "throughput": lambda: bench_throughput(size, reps, root),
        "connect": lambda: bench_connect(20 if q else 200, root),
        "gossip": lambda: bench_gossip(args.peers or (8 if q else 20), 60 if q else 1000,
                                       args.rate, root),
        "reconnect": lambda: bench_reconnect(2 if q else 10, root),
    }
    for name in [s.strip() for s in args.sections.split(",") if s.strip()]:
        try:
            results.append(plan[name]())
        except Exception as exc:  # noqa: BLE001 - record it and go on with the other sections
            traceback.print_exc()
            crashed.append(name)
            results.append({"section": name, "config": {}, "error": f"{type(exc).__name__}: {exc}"[:500]})
    by = {r["section"]: r for r in results}

    def get(sec: str, *keys: str) -> Any:
        return dig(by, sec, *keys)

    peers = get("gossip", "config", "subscribers") or 20
    goals = [
        goal("throughput_vs_raw_tcp", get("throughput", "ours_vs_raw_tcp"), ">=", 0.25),
        goal("connect_p50_ms", get("connect", "connect_ms", "p50"), "<=", 10.0),
        goal(f"gossip_all_{peers}_p50_ms", get("gossip", "delivery_to_all_ms", "p50"), "<=", 50.0),
        goal(f"gossip_all_{peers}_p99_ms", get("gossip", "delivery_to_all_ms", "p99"), "<=", 200.0),
        goal("gossip_lost_messages", get("gossip", "lost_messages"), "==", 0),
        goal("reconnect_p95_s", get("reconnect", "reconnect_after_peer_listening_s", "p95"), "<=", 2.0),
    ]
    print_results(results, title=f"p2p benchmark ({'quick' if q else 'full'}, loopback, "
                                 "machine may be shared)")
    print_goals(goals)
    duration = round(time.perf_counter() - t0, 1)
    path = write_json(BENCHMARK, q, results, goals, args.out, host=host, argv=sys.argv[1:],
                      duration_s=duration, loadavg_at_end=host_info()["loadavg_1_5_15"],
                      crashed_sections=crashed)
    print(f"wrote {path} ({duration}s)")
    import shutil

    shutil.rmtree(root, ignore_errors=True)
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())

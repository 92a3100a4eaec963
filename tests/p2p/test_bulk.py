"""The bulk data channel of /hive/tensors/1.4.0: bodies over a direct, keyed TCP connection,
falling back in-stream, refusing strangers, resuming after a cut (real nodes, loopback)."""

from __future__ import annotations

import os
import socket
import struct
import threading
from collections.abc import Callable

import numpy as np
import trio
from pydantic import JsonValue

from p2p import ReceivedTensors
from p2p._bulk import HELLO, BulkSession, shutdown
from p2p._safetensors import to_safetensors
from p2p._tensors import TransferStats, prepare_transfer
from tests.p2p.conftest import Pair, trio_meshes

KiB = 1024


def _data(n: int, seed: int = 0) -> bytes:
    return to_safetensors({"w": np.random.default_rng(seed).standard_normal(n, dtype=np.float32)})


def test_transfer_goes_over_the_bulk_channel_bit_exact(pair: Pair) -> None:
    arrays = {"w": np.random.default_rng(1).standard_normal(3 << 20, dtype=np.float32)}  # 12 MiB
    got: list[ReceivedTensors] = []
    pair.b.on_tensors(lambda t: got.append(t) or "ok")
    stats = pair.a.send_tensors(pair.b.peer_id, arrays, timeout=60)
    data = to_safetensors(arrays)
    assert stats.result == "ok" and len(got) == 1
    assert got[0].data == data and np.array_equal(got[0].numpy()["w"], arrays["w"])
    assert stats.bulk_bytes == len(data) == stats.bytes_sent  # every chunk went direct
    assert stats.retransmits == 0 and stats.resumes == 0


async def _send(mangle: Callable[[int, int, bytes], bytes] | None = None,
                hook: Callable[[socket.socket], None] | None = None,
                data: bytes | None = None, **settings: object) -> tuple[TransferStats, list[bytes],
                                                                        int, int]:
    data = data if data is not None else _data(1 << 20)  # 4 MiB
    async with trio_meshes(2, tensor_window=4, **settings) as (a, b):
        runs: list[bytes] = []

        async def on_tensors(t: ReceivedTensors) -> JsonValue:
            runs.append(t.data)
            return len(runs)

        b.tensors.handler = on_tensors
        b.tensors.bulk_listening = hook
        await a.connect(b.host.addrs[0])
        stats = await a.send_tensors(b.host.peer_id, prepare_transfer(data, 256 * KiB), data,
                                     30, mangle=mangle)
        assert runs == [data]  # bit-exact, handler ran once
        return stats, runs, b.tensors.bulk_transfers, b.tensors.bulk_refused


def test_unreachable_bulk_port_falls_back_in_stream() -> None:
    stats, _, used, _ = trio.run(_send, None, shutdown)  # the port is closed before it is offered
    assert stats.bulk_bytes == 0 and used == 0
    assert stats.bytes_sent == stats.bytes and stats.resumes == 0


def test_bulk_off_in_config_sends_in_stream() -> None:
    stats, _, used, _ = trio.run(lambda: _send(tensor_bulk=False))
    assert stats.bulk_bytes == 0 and used == 0


def test_a_stranger_on_the_bulk_port_is_refused_and_the_transfer_completes() -> None:
    answers: list[bytes] = []

    def stranger(listener: socket.socket) -> None:  # connects first, with its own key
        sock = socket.create_connection(listener.getsockname()[:2])
        fake = BulkSession()
        fake.derive(BulkSession().public, "x", "y", b"r", b"s")
        assert fake.aead is not None
        head = struct.pack(">III", 48, HELLO, 0)
        sock.sendall(head + fake.aead.encrypt(b"\0\0\0\1" + bytes(8), fake.session,
                                              fake.session + head[4:]))

        def read() -> None:
            sock.settimeout(20)
            try:
                answers.append(sock.recv(1 << 16))  # closed: nothing was sent to it
            except OSError:
                answers.append(b"")
            sock.close()

        threading.Thread(target=read, daemon=True).start()

    stats, _, used, refused = trio.run(_send, None, stranger)
    assert refused == 1 and used == 1 and stats.bulk_bytes == stats.bytes
    deadline = 50
    while not answers and deadline:
        threading.Event().wait(0.1)
        deadline -= 1
    assert answers == [b""]


def test_garbage_on_the_bulk_port_is_refused() -> None:
    def junk(listener: socket.socket) -> None:
        sock = socket.create_connection(listener.getsockname()[:2])
        sock.sendall(os.urandom(4096))
        threading.Timer(5, sock.close).start()

    stats, _, used, refused = trio.run(_send, None, junk)
    assert refused == 1 and used == 1 and stats.bulk_bytes == stats.bytes


def test_a_bulk_connection_cut_mid_body_resumes_from_verified_chunks() -> None:
    data = _data(2 << 20, seed=3)  # 8 MiB: 32 chunks of 256 KiB
    cut = threading.Event()

    def mangle(index: int, retry: int, chunk: bytes) -> bytes:
        if index == 16 and not cut.is_set():
            cut.set()
            raise ConnectionResetError("cut by the test")
        return chunk

    stats, _, used, _ = trio.run(lambda: _send(mangle, data=data))
    assert cut.is_set() and stats.resumes == 1 and used == 2
    assert stats.resumed_bytes >= 12 * 256 * KiB, stats  # the first half was not sent again
    assert stats.bulk_bytes == stats.bytes_sent and stats.resent_bytes <= 4 * 256 * KiB


def test_receive_buffers_are_reused_only_when_nothing_holds_them(pair: Pair) -> None:
    """Three 4 MiB transfers: the 1st handler keeps an array over its data, so the 2nd gets a
    fresh buffer (and the kept array stays intact); the 2nd keeps nothing, so the 3rd reuses
    its buffer."""
    first, second, third = (_data(1 << 20, seed) for seed in (1, 2, 3))
    kept: list[np.ndarray] = []
    pool = pair.b._mesh.tensors.pool  # type: ignore[attr-defined]

    def on_tensors(t: ReceivedTensors) -> JsonValue:
        if not kept:
            kept.append(t.numpy()["w"])  # an array over the receive buffer: holds it
        return bytes(t.data) == expected[0]

    pair.b.on_tensors(on_tensors)
    expected = [first]
    assert pair.a.send_tensors(pair.b.peer_id, first, timeout=60).result is True
    expected = [second]
    assert pair.a.send_tensors(pair.b.peer_id, second, timeout=60).result is True
    assert pool.reused == 0  # the first buffer is still held by `kept`
    expected = [third]
    assert pair.a.send_tensors(pair.b.peer_id, third, timeout=60).result is True
    assert pool.reused == 1  # the second one came back and was used again
    want = np.frombuffer(first, dtype=np.float32, offset=len(first) - (4 << 20))
    assert np.array_equal(kept[0], want)  # untouched by the later transfers

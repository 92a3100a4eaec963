"""Length-prefixed frames: limits before allocation, truncation, and per-stream resets."""

from __future__ import annotations

import random
import tracemalloc

import pytest
import trio

from p2p import FrameTooLargeError, ProtocolError, StreamResetError
from p2p._frames import FrameStream, encode_frame, encode_uvarint
from p2p._rpc import RPC_PROTOCOL
from tests.p2p.conftest import trio_meshes
from tests.p2p.memstream import MemoryStream


def read_all(data: bytes, max_frame: int = 1 << 20, seed: int = 0) -> list[bytes]:
    async def main() -> list[bytes]:
        frames = FrameStream(MemoryStream(data, seed), max_frame)
        out = []
        while (frame := await frames.read_frame()) is not None:
            out.append(frame)
        return out

    return trio.run(main)


@pytest.mark.parametrize("value,encoded", [(0, b"\x00"), (1, b"\x01"), (127, b"\x7f"),
                                           (128, b"\x80\x01"), (300, b"\xac\x02"),
                                           (2**40, b"\x80\x80\x80\x80\x80\x20")])
def test_uvarint_encoding(value: int, encoded: bytes) -> None:
    assert encode_uvarint(value) == encoded


def test_frames_round_trip_whatever_the_read_sizes() -> None:
    rng = random.Random(1)
    payloads = [rng.randbytes(rng.choice([0, 1, 127, 128, 5000, 70000])) for _ in range(60)]
    data = b"".join(encode_frame(p) for p in payloads)
    for seed in range(5):
        assert read_all(data, seed=seed) == payloads


def test_oversized_prefix_is_refused_before_allocating() -> None:
    tracemalloc.start()
    try:
        with pytest.raises(FrameTooLargeError) as info:
            read_all(encode_uvarint(2**40) + b"x" * 10, max_frame=1 << 20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20  # nothing near 2**40 (or even the 1 MiB limit) was allocated
    assert info.value.limit == 1 << 20 and info.value.size > 1 << 20
    with pytest.raises(FrameTooLargeError):  # one byte over the limit
        read_all(encode_frame(b"x" * 101), max_frame=100)
    assert read_all(encode_frame(b"x" * 100), max_frame=100) == [b"x" * 100]


@pytest.mark.parametrize("data,what", [
    (encode_frame(b"hello")[:-2], "got 3 of 5 bytes"),
    (b"\x80\x80", "inside the length prefix"),
    (encode_frame(b"ok") + b"\x05abc", "got 3 of 5 bytes"),
])
def test_truncated_frames_are_protocol_errors(data: bytes, what: str) -> None:
    with pytest.raises(ProtocolError, match=what):
        read_all(data)


def test_prefix_longer_than_ten_bytes_is_refused() -> None:
    with pytest.raises(ProtocolError, match="longer than 10 bytes"):
        read_all(b"\x80" * 11 + b"\x00", max_frame=2**80)


def test_reset_mid_frame_is_a_stream_reset() -> None:
    async def main() -> None:
        frames = FrameStream(MemoryStream(encode_frame(b"abcdef")[:4], reset_at_end=True), 100)
        with pytest.raises(StreamResetError):
            await frames.read_frame()

    trio.run(main)


async def _raw_rpc_stream(a, b):  # type: ignore[no-untyped-def]
    return await a.host.open_stream(b.host.peer_id, RPC_PROTOCOL)


async def _stream_was_reset(stream) -> bool:  # type: ignore[no-untyped-def]
    frames = FrameStream(stream, 1 << 20)
    with trio.fail_after(5):
        try:
            return await frames.read_frame() is None  # EOF: py-libp2p shows a reset as EOF
        except StreamResetError:
            return True


@pytest.mark.parametrize("poison", [
    pytest.param(encode_uvarint(2**40), id="prefix-2**40"),
    pytest.param(encode_frame(b"\x00\xffnot json at all"), id="garbage-frame"),
    pytest.param(encode_frame(b'{"kind":"request","id":-1,"method":""}'), id="invalid-envelope"),
    pytest.param(bytes(range(256)) * 4, id="random-bytes"),
    pytest.param(encode_uvarint(1000) + b"short", id="truncated"),
])
def test_a_bad_stream_is_reset_and_the_connection_stays_usable(poison: bytes) -> None:
    async def main() -> None:
        async with trio_meshes(2) as (a, b):

            async def echo(params: object, peer: str) -> object:
                return params

            b.register("echo", echo)
            await a.connect(b.host.addrs[0])
            assert await a.call(b.host.peer_id, "echo", "before", 5) == "before"
            conns_before = a.host.libp2p.get_network().get_connections()
            stream = await _raw_rpc_stream(a, b)
            await stream.write(poison)
            if poison.startswith(encode_uvarint(1000)):
                await stream.close()  # the truncated frame ends here
            assert await _stream_was_reset(stream)
            # same connection, still serving
            assert await a.call(b.host.peer_id, "echo", "after", 5) == "after"
            assert a.host.libp2p.get_network().get_connections() == conns_before
            assert len(conns_before) == 1 and not conns_before[0].is_closed

    trio.run(main)

"""The tensor stream: safetensors round trips, corrupted chunks, limits, backpressure."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import trio

from p2p import (
    ChecksumError,
    Node,
    P2PError,
    ReceivedTensors,
    RemoteError,
    TransferStats,
    generate_identity,
)
from p2p._frames import FrameStream
from p2p._messages import ChunkAck, parse_header
from p2p._safetensors import to_safetensors
from p2p._tensors import _HEAD, TENSOR_PROTOCOL, prepare_transfer
from tests.p2p.conftest import Pair, peer_of, trio_meshes

KiB = 1024


def sample_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {
        "w": rng.standard_normal((64, 33), dtype=np.float32),
        "ids": np.arange(1000, dtype=np.int64),
        "mask": rng.random(77) > 0.5,
        "half": rng.standard_normal(100).astype(np.float16),
        "scalar": np.array(3.5, dtype=np.float64),
        "empty": np.zeros((0, 4), dtype=np.uint8),
    }


def test_numpy_round_trip_with_name_metadata_and_result(pair: Pair) -> None:
    received: list[ReceivedTensors] = []

    def on_tensors(t: ReceivedTensors) -> object:
        received.append(t)
        return {"count": len(t.tensors)}

    pair.b.on_tensors(on_tensors)
    arrays = sample_arrays()
    stats = pair.a.send_tensors(pair.b.peer_id, arrays, name="layer.0",
                                metadata={"step": "12"})
    assert isinstance(stats, TransferStats)
    assert stats.result == {"count": len(arrays)} and stats.retransmits == 0
    (got,) = received
    assert (got.peer_id, got.name, got.metadata) == (pair.a.peer_id, "layer.0", {"step": "12"})
    assert {i.name: (i.dtype, i.shape) for i in got.tensors} == {
        "w": ("F32", (64, 33)), "ids": ("I64", (1000,)), "mask": ("BOOL", (77,)),
        "half": ("F16", (100,)), "scalar": ("F64", ()), "empty": ("U8", (0, 4))}
    back = got.numpy()
    for key, value in arrays.items():
        assert back[key].dtype == value.dtype and np.array_equal(back[key], value)


def test_torch_round_trip_many_chunks(make_node: Callable[..., Node]) -> None:
    ia, ib = generate_identity("a"), generate_identity("b")
    b = make_node(ib, peers=(peer_of(ia),), tensor_chunk=64 * KiB, tensor_window=4)
    a = make_node(ia, peers=(peer_of(ib),), tensor_chunk=64 * KiB, tensor_window=4)
    a.connect(b.addrs[0])
    got: dict[str, Any] = {}
    b.on_tensors(lambda t: got.update(t.torch()))
    tensors = {"bf16": torch.randn(600, 257, generator=torch.Generator().manual_seed(1)
                                   ).to(torch.bfloat16),
               "i32": torch.arange(12345, dtype=torch.int32)}
    stats = a.send_tensors(ib.peer_id, tensors)
    assert stats.chunks > 4  # more chunks than the window: flow control was exercised
    assert got["bf16"].dtype == torch.bfloat16 and torch.equal(got["bf16"], tensors["bf16"])
    assert torch.equal(got["i32"], tensors["i32"])


def test_asyncio_sender_and_receiver(pair: Pair) -> None:
    async def main() -> TransferStats:
        got: asyncio.Queue[ReceivedTensors] = asyncio.Queue()

        async def on_tensors(t: ReceivedTensors) -> object:
            await got.put(t)
            return "thanks"

        pair.b.on_tensors(on_tensors)
        stats = await pair.a.asend_tensors(pair.b.peer_id, {"x": np.ones(10, np.float32)})
        t = got.get_nowait()
        assert np.array_equal(t.numpy()["x"], np.ones(10, np.float32))
        return stats

    assert asyncio.run(main()).result == "thanks"


def corrupting(plan: dict[int, int]) -> Callable[[int, int, bytes], bytes]:
    """Flip a byte of chunk ``i`` on its first ``plan[i]`` attempts."""

    def mangle(index: int, attempt: int, chunk: bytes) -> bytes:
        if attempt < plan.get(index, 0):
            return bytes([chunk[0] ^ 0xFF]) + chunk[1:]
        return chunk

    return mangle


def test_corrupted_chunks_are_requested_again() -> None:
    data = to_safetensors({"x": np.arange(100_000, dtype=np.float32)})  # ~390 KiB, 7 chunks

    async def main() -> tuple[TransferStats, list[bytes]]:
        async with trio_meshes(2, tensor_retries=3) as (a, b):
            got: list[bytes] = []

            async def on_tensors(t: ReceivedTensors) -> object:
                got.append(t.data)
                return None

            b.tensors.handler = on_tensors
            await a.connect(b.host.addrs[0])
            header = prepare_transfer(data, 64 * KiB)
            stats = await a.send_tensors(b.host.peer_id, header, data, 30,
                                         mangle=corrupting({2: 1, 5: 2}))
            return stats, got

    stats, got = trio.run(main)
    assert stats.retransmits == 3 and stats.chunks == 7
    assert got == [data]


def test_a_chunk_that_never_arrives_intact_fails_the_transfer() -> None:
    data = to_safetensors({"x": np.arange(50_000, dtype=np.float32)})

    async def main() -> list[object]:
        async with trio_meshes(2, tensor_retries=2) as (a, b):
            calls: list[object] = []

            async def on_tensors(t: ReceivedTensors) -> object:
                calls.append(t)
                return None

            b.tensors.handler = on_tensors
            await a.connect(b.host.addrs[0])
            header = prepare_transfer(data, 64 * KiB)
            with pytest.raises(ChecksumError) as info:
                await a.send_tensors(b.host.peer_id, header, data, 30,
                                     mangle=corrupting({1: 99}))
            assert info.value.chunk == 1
            return calls

    assert trio.run(main) == []  # the handler never saw a broken transfer


def test_too_large_is_refused_from_the_header(make_node: Callable[..., Node]) -> None:
    ia, ib = generate_identity("a"), generate_identity("b")
    b = make_node(ib, peers=(peer_of(ia),), max_tensor_bytes=1000)
    a = make_node(ia, peers=(peer_of(ib),))
    a.connect(b.addrs[0])
    calls: list[object] = []
    b.on_tensors(calls.append)
    with pytest.raises(RemoteError) as info:
        a.send_tensors(ib.peer_id, {"x": np.zeros(1000, np.float32)})
    assert info.value.remote_type == "Refused" and "max_tensor_bytes" in str(info.value)
    assert calls == []
    assert a.send_tensors(ib.peer_id, {"x": np.zeros(10, np.float32)}).bytes < 1000


def test_no_handler_and_failing_handler_are_remote_errors(pair: Pair) -> None:
    with pytest.raises(RemoteError, match="no on_tensors handler"):
        pair.a.send_tensors(pair.b.peer_id, {"x": np.zeros(3)})

    def broken(t: ReceivedTensors) -> object:
        raise KeyError("missing layer")

    pair.b.on_tensors(broken)
    with pytest.raises(RemoteError) as info:
        pair.a.send_tensors(pair.b.peer_id, {"x": np.zeros(3)})
    assert info.value.remote_type == "KeyError"
    pair.b.on_tensors(lambda t: "ok")  # the receiver is fine afterwards
    assert pair.a.send_tensors(pair.b.peer_id, {"x": np.zeros(3)}).result == "ok"


def test_in_flight_chunks_are_bounded_by_the_window() -> None:
    """A receiver that stops acknowledging sees exactly ``window`` chunks, then one per ack."""
    data = to_safetensors({"x": np.arange(2 << 18, dtype=np.float32)})  # 2 MiB: 32 chunks
    window = 4

    async def main() -> list[int]:
        async with trio_meshes(2, tensor_window=window, tensor_bulk=False) as (a, b):
            seen: list[int] = []

            async def stingy(stream: Any, peer: str) -> None:
                frames = FrameStream(stream, 1 << 20, peer)
                header = parse_header(await frames.read_frame() or b"")
                frames.max_frame = header.chunk_size + 8

                async def count_for(seconds: float) -> None:
                    with trio.move_on_after(seconds):
                        while True:
                            raw = await frames.read_frame()
                            assert raw is not None
                            seen.append(_HEAD.unpack_from(raw)[0])

                await count_for(0.5)
                assert len(seen) == window  # nothing more without acks
                await frames.write_frame(ChunkAck(index=seen[0], ok=True)
                                         .model_dump_json().encode())
                await count_for(0.3)
                await stream.reset()

            b.host.set_handler(TENSOR_PROTOCOL, stingy)
            await a.connect(b.host.addrs[0])
            header = prepare_transfer(data, 64 * KiB)
            with pytest.raises(P2PError):  # the stingy receiver resets the stream
                await a.send_tensors(b.host.peer_id, header, data, 5)
            return seen

    seen = trio.run(main)
    assert seen == list(range(window + 1))


def test_header_describes_the_safetensors_it_announces() -> None:
    data = to_safetensors({"a": np.zeros((2, 3), np.int16)}, metadata={"k": "v"})
    header = prepare_transfer(data, 10)
    assert header.chunks == -(-len(data) // 10) and header.size == len(data)
    assert [(t.name, t.dtype, t.shape) for t in header.tensors] == [("a", "I16", (2, 3))]
    assert header.metadata == {"k": "v"}
    assert json.loads(header.model_dump_json())["kind"] == "header"

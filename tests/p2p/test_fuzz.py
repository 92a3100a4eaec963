"""Random frames against the RPC server: nothing crashes, nothing leaks."""

from __future__ import annotations

import gc
import json
import random
import resource

import trio

from p2p._frames import FrameStream, encode_frame, encode_uvarint
from p2p._messages import RpcError, RpcResponse, parse_reply
from p2p._rpc import RPC_PROTOCOL, RpcServer
from tests.p2p.conftest import fd_count, trio_meshes
from tests.p2p.memstream import MemoryStream

METHODS = ["echo", "fail", "none", "missing", ""]


def rss_bytes() -> int:
    """Resident set size now (Linux /proc), in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def random_json(rng: random.Random, depth: int = 0) -> object:
    kind = rng.randrange(7 if depth < 3 else 4)
    if kind == 0:
        return rng.randint(-2**70, 2**70)
    if kind == 1:
        return rng.random() * 10 ** rng.randint(-5, 300)
    if kind == 2:
        return "".join(chr(rng.randrange(0x20, 0x2FFF)) for _ in range(rng.randrange(20)))
    if kind == 3:
        return rng.choice([None, True, False])
    if kind == 4:
        return [random_json(rng, depth + 1) for _ in range(rng.randrange(5))]
    return {str(rng.random()): random_json(rng, depth + 1) for _ in range(rng.randrange(5))}


def random_frame(rng: random.Random, valid: float = 0.6) -> tuple[bytes, bool]:
    """One frame's bytes, and whether a well-behaved server must answer it.

    ``valid`` is the share of well-formed requests (with random methods and params); the
    rest is spread over wrong-shape JSON, random payloads, absurd prefixes and raw garbage.
    """
    roll = rng.random()  # rescaled so that [0, 0.6) is a valid request with odds ``valid``
    roll = roll / valid * 0.6 if roll < valid else 0.6 + (roll - valid) / (1 - valid) * 0.4
    if roll < 0.6:  # a valid request with random content
        req = {"kind": "request", "id": rng.randrange(2**63), "method": rng.choice(METHODS[:4]),
               "params": random_json(rng)}
        if rng.random() < 0.3:
            req["timeout"] = rng.choice([0.5, 5, 60])
        return encode_frame(json.dumps(req).encode()), True
    if roll < 0.75:  # valid JSON, wrong shape
        bad = rng.choice([random_json(rng), {"kind": "request", "id": "x", "method": 3},
                          {"kind": "response", "id": 1, "result": 2},
                          {"kind": "request", "id": 1, "method": "", "params": None},
                          {"kind": "request", "id": 1, "method": "echo", "extra": 1}])
        return encode_frame(json.dumps(bad).encode()), False
    if roll < 0.9:  # random bytes
        return encode_frame(rng.randbytes(rng.randrange(64))), False
    if roll < 0.95:  # absurd length prefix
        return encode_uvarint(rng.choice([2**20 + 1, 2**40, 2**63])) + rng.randbytes(8), False
    return rng.randbytes(rng.randrange(1, 32)), False  # raw garbage


async def echo(params: object, peer: str) -> object:
    return params


async def fail(params: object, peer: str) -> object:
    raise RuntimeError("boom")


async def none(params: object, peer: str) -> object:
    return None


def test_ten_thousand_random_frames_in_memory() -> None:
    """Every frame goes through the real server code; replies are all valid envelopes."""
    server = RpcServer(max_frame=1 << 20, handler_timeout=5)
    for name, fn in [("echo", echo), ("fail", fail), ("none", none)]:
        server.register(name, fn)
    rng = random.Random(1234)
    totals = {"frames": 0, "replies": 0, "resets": 0, "closes": 0}

    async def main() -> None:
        while totals["frames"] < 10_000:
            frames = [random_frame(rng) for _ in range(rng.randrange(1, 8))]
            data = b"".join(f for f, _ in frames)
            if rng.random() < 0.2:
                data = data[:rng.randrange(len(data) + 1)]  # truncated anywhere
            stream = MemoryStream(data, seed=rng.randrange(2**32))
            await server.handle_stream(stream, "fuzzer")
            totals["frames"] += len(frames)
            # the oracle: answered = the leading valid, complete frames; the stream is closed
            # cleanly only if the data ends on a frame boundary after valid frames only
            answerable, end, clean = 0, 0, True
            for frame, valid in frames:
                if end + len(frame) > len(data):
                    clean = end == len(data)
                    break
                end += len(frame)
                if not valid:
                    clean = False
                    break
                answerable += 1
            replies = FrameStream(MemoryStream(bytes(stream.written)), 1 << 20)
            answered = 0
            while (raw := await replies.read_frame()) is not None:
                assert isinstance(parse_reply(raw), RpcResponse | RpcError)
                answered += 1
            assert answered == answerable
            assert (stream.closed, stream.was_reset) == (clean, not clean)
            totals["replies"] += answered
            totals["resets" if stream.was_reset else "closes"] += 1

    trio.run(main)
    assert totals["frames"] >= 10_000
    assert totals["replies"] > 2_000 and totals["resets"] > 500 and totals["closes"] > 100


def test_random_frames_over_a_real_connection_leak_nothing() -> None:
    """10,000 frames on real Noise/yamux streams; fds and memory return to their baseline."""
    rng = random.Random(99)
    sent = {"frames": 0, "streams": 0}

    async def burst(a, b_id: str) -> None:  # type: ignore[no-untyped-def]
        stream = await a.host.open_stream(b_id, RPC_PROTOCOL)
        sent["streams"] += 1
        frames = [random_frame(rng, valid=0.97) for _ in range(rng.randrange(1, 80))]
        good, poisoned = [], False
        for data, ok in frames:
            good.append(data)
            if not ok:
                poisoned = True
                break  # the poison ends the burst
        await stream.write(b"".join(good))
        if poisoned or rng.random() < 0.5:
            await stream.close()  # half-close: an unfinished frame reads as truncated
        sent["frames"] += len(good)
        reader = FrameStream(stream, 1 << 20)
        try:
            with trio.fail_after(5):
                for _ in good:
                    raw = await reader.read_frame()
                    if raw is None:
                        break
                    parse_reply(raw)
        except Exception:  # noqa: BLE001, S110 - poisoned bursts end in a reset: expected
            pass
        await stream.reset()

    async def main() -> tuple[int, int, int, int]:
        async with trio_meshes(2) as (a, b):
            for name, fn in [("echo", echo), ("fail", fail), ("none", none)]:
                b.rpc.register(name, fn)
            await a.connect(b.host.addrs[0])
            for _ in range(20):  # warm up lazily created state and the allocator
                await burst(a, b.host.peer_id)
            gc.collect()
            fds0, rss0 = fd_count(), rss_bytes()
            while sent["frames"] < 10_000:
                async with trio.open_nursery() as nursery:
                    for _ in range(4):
                        nursery.start_soon(burst, a, b.host.peer_id)
            assert await a.call(b.host.peer_id, "echo", "still fine", 5) == "still fine"
            await trio.sleep(0.3)  # let the server finish its resets
            gc.collect()
            return fds0, fd_count(), rss0, rss_bytes()

    fds0, fds1, rss0, rss1 = trio.run(main)
    assert sent["frames"] >= 10_000
    assert fds1 <= fds0 + 2, (fds0, fds1)
    assert rss1 - rss0 < 32 << 20, (rss0, rss1)  # RSS: allocator slack, but no per-frame leak

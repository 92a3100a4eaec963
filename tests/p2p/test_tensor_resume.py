"""Tensor transfers that lose their link mid-body resume from the receiver's verified chunks."""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np
import pytest
import trio
from pydantic import JsonValue

from p2p import Node, P2PError, ReceivedTensors, SitePeer, generate_identity
from p2p._frames import FrameStream
from p2p._messages import TransferDone, TransferResume, parse_control
from p2p._safetensors import to_safetensors
from p2p._tensors import TENSOR_PROTOCOL, prepare_transfer
from tests.p2p.conftest import peer_of, trio_meshes
from tests.p2p.relay import Relay

KiB = 1024


def relayed_pair(make_node: Callable[..., Node], reset_after: int,
                 **settings: object) -> tuple[Node, Node, Relay]:
    """a reaches b only through a relay that cuts every connection after ``reset_after``
    bytes went a -> b (once), then relays again."""
    ia, ib = generate_identity("a"), generate_identity("b")
    b = make_node(ib, peers=(peer_of(ia),), reconnect=False)
    relay = Relay(int(b.addrs[0].split("/tcp/")[1].split("/")[0]), reset_after=reset_after)
    a = make_node(ia, peers=(SitePeer(peer_id=ib.peer_id, addrs=(relay.addr,)),),
                  learn_addrs=False, tensor_chunk=128 * KiB, tensor_window=4,
                  tensor_bulk=False, **settings)  # in-stream: the relay cuts the libp2p link
    a.connect(f"{relay.addr}/p2p/{ib.peer_id}")
    return a, b, relay


def test_transfer_cut_at_half_resumes_and_arrives_bit_exact(
        make_node: Callable[..., Node]) -> None:
    arrays = {"w": np.random.default_rng(5).standard_normal(1 << 20, dtype=np.float32)}  # 4 MiB
    data = to_safetensors(arrays)
    a, b, relay = relayed_pair(make_node, reset_after=len(data) // 2)
    received: list[ReceivedTensors] = []
    lock = threading.Lock()

    def on_tensors(t: ReceivedTensors) -> str:
        with lock:
            received.append(t)
        return "stored"

    b.on_tensors(on_tensors)
    relay.upstream_bytes = 0  # count the transfer only
    try:
        stats = a.send_tensors(b.peer_id, arrays, timeout=60)
    finally:
        relay.close()
    print(f"cut at 50%: resumed {stats.resumed_bytes / len(data):.0%}, resent "
          f"{stats.resent_bytes / len(data):.1%} of {len(data)} bytes in {stats.seconds:.2f}s")
    assert relay.resets == 1 and stats.resumes == 1
    assert stats.result == "stored" and len(received) == 1  # the handler ran once
    assert received[0].data == data  # bit-exact
    assert np.array_equal(received[0].numpy()["w"], arrays["w"])
    size = len(data)
    assert stats.resumed_bytes >= 0.3 * size, stats  # the first half was not sent again
    assert stats.resent_bytes < 0.6 * size, stats
    assert stats.resent_bytes <= 4 * 128 * KiB, stats  # at most the window in flight
    assert stats.bytes_sent == size + stats.resent_bytes and stats.bytes_sent < 1.6 * size


def test_without_resume_attempts_a_cut_fails_the_transfer(
        make_node: Callable[..., Node]) -> None:
    arrays = {"w": np.zeros(1 << 19, dtype=np.float32)}  # 2 MiB
    a, b, relay = relayed_pair(make_node, reset_after=1 << 20, tensor_resume_attempts=0)
    b.on_tensors(lambda t: None)
    relay.upstream_bytes = 0
    try:
        with pytest.raises(P2PError):
            a.send_tensors(b.peer_id, arrays, timeout=30)
    finally:
        relay.close()
    assert relay.resets == 1


def test_a_resent_header_of_a_finished_transfer_gets_its_reply_without_a_rerun() -> None:
    """The reply was lost with the link: the sender resends the header (attempt 1) and must
    get the same reply back, with every chunk reported as held, and no second handler run."""
    data = to_safetensors({"x": np.arange(40_000, dtype=np.float32)})

    async def main() -> tuple[list[int], TransferResume, TransferDone]:
        async with trio_meshes(2) as (a, b):
            runs: list[int] = []

            async def on_tensors(t: ReceivedTensors) -> JsonValue:
                runs.append(len(t.data))
                return {"n": len(runs)}

            b.tensors.handler = on_tensors
            await a.connect(b.host.addrs[0])
            header = prepare_transfer(data, 16 * KiB)
            stats = await a.send_tensors(b.host.peer_id, header, data, 30)
            assert stats.result == {"n": 1} and stats.resumes == 0
            stream = await a.host.open_stream(b.host.peer_id, TENSOR_PROTOCOL)
            frames = FrameStream(stream, 1 << 20)
            again = header.model_copy(update={"attempt": 1})
            await frames.write_frame(again.model_dump_json().encode())
            resume = parse_control(await frames.read_frame() or b"")
            done = parse_control(await frames.read_frame() or b"")
            await stream.close()
            assert isinstance(resume, TransferResume) and isinstance(done, TransferDone)
            return runs, resume, done

    runs, resume, done = trio.run(main)
    assert runs == [len(data)]
    assert resume.have == ((0, -(-len(data) // (16 * KiB))),)
    assert done.ok and done.result == {"n": 1}

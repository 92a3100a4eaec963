"""RPC between two nodes, from synchronous code and from asyncio."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import pytest

from p2p import (
    Node,
    NodeClosedError,
    NodeConfig,
    P2PTimeoutError,
    RemoteError,
    generate_identity,
)
from tests.p2p.conftest import Pair, peer_of


def test_sync_call_round_trip(pair: Pair) -> None:
    seen: list[tuple[object, str]] = []

    def echo(params: object, peer: str) -> object:
        seen.append((params, peer))
        return {"echo": params, "thread": threading.current_thread().name}

    pair.b.register("echo", echo)
    params = {"text": "héllo", "n": [1, 2.5, None, True], "nested": {"k": "v"}}
    result = pair.a.call(pair.b.peer_id, "echo", params)
    assert isinstance(result, dict)
    assert result["echo"] == params
    assert result["thread"].startswith("p2p-")  # a handler thread, not the network thread
    assert seen == [(params, pair.a.peer_id)]
    assert [pair.a.call(pair.b.peer_id, "echo", i)["echo"] for i in range(20)] == list(range(20))


def test_calls_go_both_ways_on_one_connection(pair: Pair) -> None:
    pair.a.register("whoami", lambda params, peer: "a")
    pair.b.register("whoami", lambda params, peer: "b")
    assert pair.a.call(pair.b.peer_id, "whoami") == "b"
    assert pair.b.call(pair.a.peer_id, "whoami") == "a"


def test_asyncio_handlers_and_callers(pair: Pair) -> None:
    async def main() -> list[object]:
        loop_thread = threading.current_thread()
        ran_on: list[threading.Thread] = []

        async def double(params: object, peer: str) -> object:
            ran_on.append(threading.current_thread())
            await asyncio.sleep(0.01)
            assert isinstance(params, int)
            return params * 2

        pair.b.register("double", double)  # runs on this event loop
        results = await asyncio.gather(*(pair.a.acall(pair.b.peer_id, "double", i)
                                         for i in range(20)))
        assert ran_on and all(t is loop_thread for t in ran_on)
        return list(results)

    assert asyncio.run(main()) == [i * 2 for i in range(20)]


def test_remote_errors_come_back_and_the_server_keeps_serving(pair: Pair) -> None:
    def fail(params: object, peer: str) -> object:
        raise ValueError(f"bad input {params}")

    pair.b.register("fail", fail)
    pair.b.register("ok", lambda params, peer: "fine")
    for _ in range(3):
        with pytest.raises(RemoteError) as info:
            pair.a.call(pair.b.peer_id, "fail", 7)
        err = info.value
        assert (err.remote_type, err.method, err.peer_id) == ("ValueError", "fail",
                                                              pair.b.peer_id)
        assert "bad input 7" in str(err)
        assert pair.a.call(pair.b.peer_id, "ok") == "fine"


def test_unknown_method_lists_the_known_ones(pair: Pair) -> None:
    pair.b.register("known", lambda params, peer: None)
    with pytest.raises(RemoteError) as info:
        pair.a.call(pair.b.peer_id, "unknown")
    assert info.value.remote_type == "MethodNotFound" and "known" in str(info.value)


def test_result_that_is_not_json_is_an_error_frame(pair: Pair) -> None:
    pair.b.register("bad", lambda params, peer: {1, 2})
    with pytest.raises(RemoteError) as info:
        pair.a.call(pair.b.peer_id, "bad")
    assert info.value.remote_type == "InvalidResult"


def test_caller_timeout_then_the_connection_is_still_usable(pair: Pair) -> None:
    pair.b.register("slow", lambda params, peer: time.sleep(1.0))
    pair.b.register("ok", lambda params, peer: "ok")
    t0 = time.perf_counter()
    with pytest.raises(P2PTimeoutError) as info:
        pair.a.call(pair.b.peer_id, "slow", timeout=0.2)
    assert time.perf_counter() - t0 < 1.0
    assert isinstance(info.value, TimeoutError) and info.value.timeout == 0.2
    assert pair.a.call(pair.b.peer_id, "ok") == "ok"


def test_handler_timeout_is_reported_by_the_server(make_node: Callable[..., Node]) -> None:
    ia, ib = generate_identity("a"), generate_identity("b")
    b = make_node(ib, peers=(peer_of(ia),), handler_timeout=0.2)
    a = make_node(ia, peers=(peer_of(ib),))

    async def stuck(params: object, peer: str) -> object:
        await asyncio.sleep(5)
        return None

    async def main() -> None:
        b.register("stuck", stuck)
        a.connect(b.addrs[0])
        with pytest.raises(RemoteError) as info:
            await a.acall(ib.peer_id, "stuck", timeout=3)
        assert info.value.remote_type == "Timeout"

    asyncio.run(main())


def test_cancelling_an_asyncio_caller_cancels_the_call(pair: Pair) -> None:
    started, cancelled = threading.Event(), threading.Event()

    async def main() -> None:
        async def hang(params: object, peer: str) -> object:
            started.set()
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancelled.set()
                raise
            return None

        pair.b.register("hang", hang)
        task = asyncio.create_task(pair.a.acall(pair.b.peer_id, "hang"))
        while not started.is_set():
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(200):  # the reset stream makes the server cancel the handler
            if cancelled.is_set():
                break
            await asyncio.sleep(0.01)
        pair.b.register("ok", lambda params, peer: "ok")
        assert await pair.a.acall(pair.b.peer_id, "ok") == "ok"

    asyncio.run(main())


def test_closed_node_refuses_calls_and_leaves_no_threads(make_node: Callable[..., Node]) -> None:
    before = {t.name for t in threading.enumerate()}
    ia, ib = generate_identity("a"), generate_identity("b")
    b = make_node(ib, peers=(peer_of(ia),))
    a = Node(NodeConfig(identity=ia, peers=(peer_of(ib),))).start()
    b.register("echo", lambda params, peer: params)
    a.connect(b.addrs[0])
    assert a.call(ib.peer_id, "echo", 1) == 1
    a.close()
    a.close()  # idempotent
    with pytest.raises(NodeClosedError):
        a.call(ib.peer_id, "echo", 2)
    leftover = {t.name for t in threading.enumerate() if t.is_alive()} - before
    assert not any(name.startswith("p2p-a") for name in leftover), leftover


def test_a_stream_that_stalls_mid_frame_is_reset_after_the_idle_timeout() -> None:
    import trio

    from p2p._frames import FrameStream, encode_uvarint
    from p2p._rpc import RPC_PROTOCOL
    from tests.p2p.conftest import trio_meshes

    async def main() -> float:
        async with trio_meshes(2, rpc_idle_timeout=0.3) as (a, b):
            await a.connect(b.host.addrs[0])
            stream = await a.host.open_stream(b.host.peer_id, RPC_PROTOCOL)
            await stream.write(encode_uvarint(100) + b"only part of it")  # then silence
            t0 = trio.current_time()
            with trio.fail_after(5):
                try:
                    assert await FrameStream(stream, 1 << 20).read_frame() is None
                except Exception:  # noqa: BLE001, S110 - a reset is as good as an EOF here
                    pass
            return trio.current_time() - t0

    assert 0.2 < trio.run(main) < 2.0


def test_start_fails_cleanly_when_the_port_is_taken(make_node: Callable[..., Node]) -> None:
    import socket

    from p2p import P2PError

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    before = threading.active_count()
    try:
        node = Node(NodeConfig(identity=generate_identity("x"),
                               listen=f"/ip4/127.0.0.1/tcp/{port}"))
        with pytest.raises(P2PError):
            node.start()
        node.close()
    finally:
        taken.close()
    assert threading.active_count() == before

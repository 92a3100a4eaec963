"""Request/response RPC over ``/hive/rpc/1.0.0`` (trio side).

The caller writes one :class:`~p2p._messages.RpcRequest` frame, the server answers with
one :class:`~p2p._messages.RpcResponse` or :class:`~p2p._messages.RpcError` frame. The
server keeps reading requests on a stream until the caller closes it, and the client keeps
idle streams per peer, so a call costs no stream set-up or protocol negotiation once warm.

Failure handling on the server, per stream (the connection and other streams carry on):

- a frame that is oversized, truncated or not a valid request envelope -> the stream is reset;
- an unknown method, a handler that raises, a result that is not JSON, a handler that
  overruns its time -> an error frame naming the problem; the server keeps serving.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from pydantic import JsonValue, ValidationError

from p2p._exceptions import (
    P2PTimeoutError,
    ProtocolError,
    RemoteError,
    StreamResetError,
)
from p2p._frames import FrameStream
from p2p._host import Host
from p2p._messages import (
    RpcError,
    RpcErrorBody,
    RpcRequest,
    RpcResponse,
    parse_reply,
    parse_request,
)
from p2p._util import close_quietly, collapse_groups

__all__ = ["RPC_PROTOCOL", "RpcClient", "RpcServer", "TrioHandler"]

logger = logging.getLogger(__name__)

RPC_PROTOCOL = "/hive/rpc/1.0.0"
TrioHandler = Callable[[JsonValue, str], Awaitable[JsonValue]]
_ids = itertools.count(1)
_WATCH_AFTER = 0.005  # seconds a handler runs before the server watches for a caller gone


class RpcServer:
    """The handler registry and the stream handler that serves it.

    Args:
        max_frame: largest request frame accepted.
        handler_timeout: seconds a handler may run (capped further by the caller's timeout).
        idle_timeout: seconds a stream may take to deliver its next complete frame; a silent
            or trickling peer (an unfinished frame) has its stream reset after that.
        admit: ``admit(peer_id, protocol)`` is asked before every request (streams are
            reused, and the allowlist may have shrunk since the stream was opened).
    """

    def __init__(self, max_frame: int, handler_timeout: float, idle_timeout: float = 300.0,
                 admit: Callable[[str, str], bool] = lambda peer, protocol: True) -> None:
        self._admit = admit
        self._idle_timeout = idle_timeout
        self._handlers: dict[str, TrioHandler] = {}
        self._max_frame = max_frame
        self._handler_timeout = handler_timeout

    def register(self, method: str, handler: TrioHandler) -> None:
        """Serve ``method`` with ``handler(params, peer_id)`` (replaces an existing one)."""
        if not method or len(method) > 256:
            raise ValueError(f"method names are 1-256 characters, got {method!r}")
        self._handlers[method] = handler

    def unregister(self, method: str) -> None:
        """Stop serving ``method`` (no-op if it was not served)."""
        self._handlers.pop(method, None)

    def methods(self) -> list[str]:
        """The served method names, sorted."""
        return sorted(self._handlers)

    async def _dispatch(self, req: RpcRequest, peer: str) -> RpcResponse | RpcError:
        def error(kind: str, message: str) -> RpcError:
            return RpcError(id=req.id, error=RpcErrorBody(type=kind, message=message[:65536]))

        handler = self._handlers.get(req.method)
        if handler is None:
            return error("MethodNotFound", f"no handler for {req.method!r}; this node serves "
                         f"{self.methods()}")
        budget = min(self._handler_timeout, req.timeout or self._handler_timeout)
        try:
            with trio.fail_after(budget):
                result = await handler(req.params, peer)
        except trio.TooSlowError:
            return error("Timeout", f"handler for {req.method!r} ran longer than {budget:g}s")
        except Exception as err:  # noqa: BLE001 - reported to the caller, never crashes the server
            logger.info("handler %r failed for %s: %r", req.method, peer, err)
            return error(type(err).__name__, str(err))
        try:
            return RpcResponse(id=req.id, result=result)
        except ValidationError as err:
            return error("InvalidResult", f"handler for {req.method!r} returned a value that "
                         f"is not JSON: {err.errors()[0]['msg']}")

    async def _dispatch_watched(self, req: RpcRequest, peer: str,
                                frames: FrameStream) -> RpcResponse | RpcError | None:
        """Run the handler while watching the stream. A caller keeps its side open until it
        has the reply, so a reset or end of stream meanwhile means it gave up (timeout,
        cancellation): the handler is cancelled and ``None`` returned. (py-libp2p's yamux
        reports a remote reset as end of stream, so the two cannot be told apart.)"""
        reply: RpcResponse | RpcError | None = None
        with collapse_groups():
            async with trio.open_nursery() as nursery:

                async def watch() -> None:
                    await trio.sleep(_WATCH_AFTER)  # quick handlers need no watching
                    try:
                        if await frames.watch():
                            return  # a pipelined request: buffered, let the handler finish
                    except StreamResetError:
                        pass
                    nursery.cancel_scope.cancel()

                nursery.start_soon(watch)
                reply = await self._dispatch(req, peer)
                nursery.cancel_scope.cancel()
        return reply

    async def handle_stream(self, stream: object, peer: str) -> None:
        """Serve requests on one stream until the caller closes it."""
        frames = FrameStream(stream, self._max_frame, peer)  # type: ignore[arg-type]
        try:
            while True:
                raw = None
                with trio.move_on_after(self._idle_timeout) as idle:
                    raw = await frames.read_frame()
                if idle.cancelled_caught:
                    await close_quietly(stream, reset=True)
                    return
                if raw is None:
                    break
                if not self._admit(peer, RPC_PROTOCOL):
                    await close_quietly(stream, reset=True)
                    return
                try:
                    req = parse_request(raw)
                except ValidationError as err:
                    raise ProtocolError(f"invalid RPC request from {peer}: "
                                        f"{err.errors()[0]['msg']}", peer_id=peer) from err
                reply = await self._dispatch_watched(req, peer, frames)
                if reply is None:  # the caller gave up on it
                    await close_quietly(stream, reset=True)
                    return
                await frames.write_frame(reply.model_dump_json().encode())
        except ProtocolError as err:
            logger.info("resetting an RPC stream from %s: %s", peer, err)
            await close_quietly(stream, reset=True)
            return
        except StreamResetError:
            await close_quietly(stream, reset=True)
            return
        await close_quietly(stream, reset=False)


def _usable(stream: Any) -> bool:
    """A pooled stream that neither side has closed or reset, on a live connection."""
    muxed = getattr(stream, "muxed_stream", None)
    conn = getattr(stream, "muxed_conn", None)
    return not (stream.is_closed or getattr(muxed, "recv_closed", False)
                or getattr(muxed, "send_closed", False) or getattr(conn, "is_closed", False))


class RpcClient:
    """Calls remote methods, reusing idle streams per peer (no protocol negotiation per call).

    A stream goes back to the pool only after a complete, valid reply; a call that fails,
    times out or is cancelled resets its stream. Calls are never retried (at-most-once):
    only a pooled stream found dead *before* the request is written is swapped for a new one.

    Args:
        host: the host to open streams on.
        max_frame: largest reply frame accepted.
        max_idle: idle streams kept per peer.
        max_idle_age: seconds an idle stream stays reusable; keep it well below the
            servers' ``idle_timeout`` so a stream is never reused just as the server drops it.
    """

    def __init__(self, host: Host, max_frame: int, max_idle: int = 8,
                 max_idle_age: float = 30.0) -> None:
        self._host = host
        self._max_frame = max_frame
        self._max_idle = max_idle
        self._max_age = max_idle_age
        self._idle: dict[str, list[tuple[float, FrameStream]]] = {}

    async def _take(self, peer_id: str) -> FrameStream:
        pool = self._idle.get(peer_id, [])
        while pool:
            since, frames = pool.pop()
            if _usable(frames.stream) and trio.current_time() - since < self._max_age:
                return frames
            await close_quietly(frames.stream, reset=False)
        stream = await self._host.open_stream(peer_id, RPC_PROTOCOL)
        return FrameStream(stream, self._max_frame, peer_id)

    def _give_back(self, peer_id: str, frames: FrameStream) -> bool:
        pool = self._idle.setdefault(peer_id, [])
        if len(pool) < self._max_idle and _usable(frames.stream):
            pool.append((trio.current_time(), frames))
            return True
        return False

    async def close(self) -> None:
        """Close every idle stream."""
        pools, self._idle = self._idle, {}
        for pool in pools.values():
            for _, frames in pool:
                await close_quietly(frames.stream, reset=False)

    async def call(self, peer_id: str, method: str, params: JsonValue,
                   timeout: float) -> JsonValue:
        """Call ``method`` on ``peer_id`` and return its JSON result.

        Raises:
            RemoteError: the remote handler failed (``remote_type`` names the exception type;
                ``"MethodNotFound"``, ``"Timeout"``, ``"InvalidResult"`` for the server's own).
            P2PTimeoutError: no reply within ``timeout`` seconds (the stream is reset).
            ProtocolError: the reply was malformed or answered another request.
            StreamResetError: the peer reset the stream.
            PeerNotAllowedError, DialError: from connecting.
        """
        request = RpcRequest(id=next(_ids), method=method, params=params, timeout=timeout)
        frames: FrameStream | None = None
        try:
            with trio.fail_after(timeout):
                frames = await self._take(peer_id)
                await frames.write_frame(request.model_dump_json().encode())
                raw = await frames.read_frame()
                if raw is None:
                    raise ProtocolError(f"{peer_id} closed the RPC stream without replying to "
                                        f"{method!r}", peer_id=peer_id)
                try:
                    reply = parse_reply(raw)
                except ValidationError as err:
                    raise ProtocolError(f"invalid RPC reply from {peer_id}: "
                                        f"{err.errors()[0]['msg']}", peer_id=peer_id) from err
                if reply.id != request.id:
                    raise ProtocolError(f"{peer_id} replied to request {reply.id}, expected "
                                        f"{request.id}", peer_id=peer_id)
        except trio.TooSlowError as err:
            if frames is not None:
                await close_quietly(frames.stream, reset=True)
            raise P2PTimeoutError(f"{method!r} on {peer_id} got no reply within {timeout:g}s",
                                  peer_id=peer_id, method=method, timeout=timeout) from err
        except BaseException:
            if frames is not None:
                await close_quietly(frames.stream, reset=True)
            raise
        if not self._give_back(peer_id, frames):
            await close_quietly(frames.stream, reset=False)
        if isinstance(reply, RpcError):
            raise RemoteError(f"{method!r} failed on {peer_id}: {reply.error.type}: "
                              f"{reply.error.message}", peer_id=peer_id, method=method,
                              remote_type=reply.error.type, remote_message=reply.error.message)
        return reply.result

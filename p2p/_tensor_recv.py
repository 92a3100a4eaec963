"""Receiving tensor transfers (trio side), keeping interrupted ones for the sender to resume.

See ``p2p/_tensors.py`` for the protocol. A transfer's state (buffer, verified chunks, the
running XXH3-128) lives in a :class:`_Partial` keyed by sender + transfer id + size + digest,
not in the stream: when a stream dies mid-body the state stays in the store for
``tensor_resume_ttl`` seconds, and a resent header (a new stream) picks it up - cancelling a
stale stream that still holds it. Finished transfers keep only their reply, so a header
resent after the reply was lost gets that reply again without the handler running twice.
The store holds at most ``tensor_resume_bytes`` of idle buffers (oldest dropped first).
"""

from __future__ import annotations

import math
import mmap
import socket
import zlib
from collections.abc import Awaitable, Callable
from typing import Any

import trio
import xxhash
from pydantic import JsonValue, ValidationError

from p2p import _bulk
from p2p._buffers import BufferPool
from p2p._config import NodeConfig
from p2p._exceptions import P2PError, ProtocolError
from p2p._frames import FrameStream
from p2p._messages import ChunkAck, TensorHeader, TransferDone, TransferResume, parse_header
from p2p._safetensors import describe
from p2p._tensors import _HEAD, CONTROL_FRAME, MAX_CHUNK, TENSOR_PROTOCOL, ReceivedTensors
from p2p._tensors import encode_control as _json
from p2p._util import close_quietly, collapse_groups

__all__ = ["TensorHandler", "TensorServer"]

TensorHandler = Callable[[ReceivedTensors], Awaitable[JsonValue]]


class _Partial:
    """One transfer's receiving state, independent of the stream carrying it."""

    def __init__(self, header: TensorHeader, buf: bytearray | mmap.mmap) -> None:
        self.size, self.step, self.count = header.size, header.chunk_size, header.chunks
        self.buf = buf  # allocated (or taken from the pool) only after the size check
        self.have = bytearray(self.count)
        self.failures = [0] * self.count
        self.digest = xxhash.xxh3_128()
        self.hashed = 0
        self.missing = self.count
        self.done: TransferDone | None = None
        self.owner: trio.CancelScope | None = None
        self.released = trio.Event()
        self.touched = trio.current_time()

    def ranges(self) -> tuple[tuple[int, int], ...]:
        """The verified chunks as ``[start, end)`` ranges."""
        if self.done is not None:
            return ((0, self.count),) if self.count else ()
        out, start = [], None
        for i, bit in enumerate(self.have):
            if bit and start is None:
                start = i
            elif not bit and start is not None:
                out.append((start, i))
                start = None
        if start is not None:
            out.append((start, self.count))
        return tuple(out)

    def store(self, index: int, chunk: memoryview) -> None:
        """Keep a verified chunk; extend the digest over the contiguous prefix."""
        if self.have[index]:
            return
        start = index * self.step
        self.buf[start:start + len(chunk)] = chunk
        self.mark(index)

    def mark(self, index: int) -> None:
        """Chunk ``index`` is verified and in place; extend the digest over the contiguous
        prefix (the bulk channel uses :func:`p2p._tensors.prefix_hasher` instead)."""
        self.have[index], self.missing = 1, self.missing - 1
        while self.hashed < self.count and self.have[self.hashed]:
            self.digest.update(memoryview(self.buf)[self.hashed * self.step:
                                                    (self.hashed + 1) * self.step])
            self.hashed += 1


def _key(peer: str, header: TensorHeader) -> tuple[str, str, int, int, str]:
    return peer, header.transfer_id, header.size, header.chunk_size, header.xxh3


class TensorServer:
    """Receives transfers and hands each completed one to the registered handler."""

    def __init__(self, config: NodeConfig, admit: Callable[[str, str], bool]) -> None:
        self._config = config
        self._admit = admit
        self.handler: TensorHandler | None = None
        self._partials: dict[tuple[str, str, int, int, str], _Partial] = {}
        self.pool = BufferPool(config.tensor_buffer_pool, config.tensor_resume_ttl)
        self.bulk_transfers = 0  # attempts whose body came over the bulk channel
        self.bulk_refused = 0  # bulk connections closed because their hello did not verify
        # test hook: called with each bulk listener before its port is offered
        self.bulk_listening: Callable[[socket.socket], None] | None = None

    async def handle_stream(self, stream: Any, peer: str) -> None:
        """Serve one ``/hive/tensors/1.3.0`` attempt (body in-stream)."""
        await self._serve(stream, peer, bulk=False)

    async def handle_bulk_stream(self, stream: Any, peer: str) -> None:
        """Serve one ``/hive/tensors/1.4.0`` attempt (body on the bulk channel if possible)."""
        await self._serve(stream, peer, bulk=True)

    async def _serve(self, stream: Any, peer: str, bulk: bool) -> None:
        """Serve one transfer attempt; any protocol violation resets only this stream."""
        frames = FrameStream(stream, CONTROL_FRAME, peer)
        try:
            with trio.fail_after(self._config.tensor_timeout):
                done = await self._receive(frames, peer, bulk)
            await frames.write_frame(_json(done))
        except (P2PError, ValidationError, trio.TooSlowError):
            await close_quietly(stream, reset=True)
            return
        await close_quietly(stream, reset=False)

    def _refusal(self, header: TensorHeader) -> str | None:
        if header.size > self._config.max_tensor_bytes:
            return (f"{header.size} bytes exceed this node's max_tensor_bytes="
                    f"{self._config.max_tensor_bytes}")
        if header.chunk_size > MAX_CHUNK:
            return f"chunk_size {header.chunk_size} exceeds {MAX_CHUNK}"
        if header.chunks != math.ceil(header.size / header.chunk_size):
            return f"{header.chunks} chunks cannot hold {header.size} bytes"
        if self.handler is None:
            return "this node receives no tensors (no on_tensors handler)"
        return None

    # ------------------------------------------------------------------ the store
    def sweep(self) -> None:
        """Drop idle partial transfers older than ``tensor_resume_ttl``."""
        cutoff = trio.current_time() - self._config.tensor_resume_ttl
        for key, part in list(self._partials.items()):
            if part.owner is None and part.touched < cutoff:
                del self._partials[key]
        self.pool.sweep()

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Sweep the store every few seconds, until cancelled."""
        task_status.started()
        while True:
            await trio.sleep(min(10.0, self._config.tensor_resume_ttl / 4))
            self.sweep()

    def _make_room(self, size: int) -> None:
        self.sweep()
        idle = sorted((p.touched, k) for k, p in self._partials.items() if p.owner is None)
        held = sum(len(p.buf) for p in self._partials.values())
        for _, key in idle:
            if held + size <= self._config.tensor_resume_bytes:
                break
            held -= len(self._partials.pop(key).buf)

    async def _claim(self, key: tuple[str, str, int, int, str], header: TensorHeader,
                     scope: trio.CancelScope) -> _Partial:
        part = self._partials.get(key)
        while part is not None and part.owner is not None:  # a stale stream still holds it
            if part.missing:
                part.owner.cancel()  # still reading chunks: that link is dead to the sender
            await part.released.wait()  # (a finishing handler is waited for, not cancelled)
            part = self._partials.get(key)
        if part is None:
            self._make_room(header.size)
            part = self._partials[key] = _Partial(header, self.pool.take(header.size))
        part.owner, part.released = scope, trio.Event()
        return part

    # ------------------------------------------------------------------ one attempt
    async def _receive(self, frames: FrameStream, peer: str, bulk: bool) -> TransferDone:
        raw = await frames.read_frame()
        if raw is None:
            raise ProtocolError(f"{peer} closed the tensor stream before its header")
        header = parse_header(raw)
        refusal = self._refusal(header)
        if refusal is not None:
            return TransferDone(ok=False, error_type="Refused", error=refusal)
        key = _key(peer, header)
        with trio.CancelScope() as scope:
            part = await self._claim(key, header, scope)
            try:
                return await self._fill(frames, peer, header, part, key, bulk)
            finally:
                part.owner, part.touched = None, trio.current_time()
                part.released.set()
        raise ProtocolError(f"a resumed transfer from {peer} took over this stream")

    async def _fill(self, frames: FrameStream, peer: str, header: TensorHeader,
                    part: _Partial, key: tuple[str, str, int, int, str],
                    bulk: bool) -> TransferDone:
        if header.attempt > 0:
            await frames.write_frame(_json(TransferResume(have=part.ranges())))
        if part.done is not None:
            return part.done
        channel = await self._negotiate(frames, peer) if bulk else None
        if channel is not None:
            failed = await self._fill_bulk(frames, peer, part, key, *channel)
            if failed is not None:
                return failed
        frames.max_frame = _HEAD.size + part.step
        while part.missing:
            raw = await frames.read_frame()
            if raw is None or len(raw) < _HEAD.size:
                raise ProtocolError(f"tensor transfer from {peer} ended with {part.missing} of "
                                    f"{part.count} chunks missing", peer_id=peer)
            index, crc = _HEAD.unpack_from(raw)
            if index >= part.count:
                raise ProtocolError(f"chunk {index} of {part.count} from {peer}", peer_id=peer)
            if not self._admit(peer, TENSOR_PROTOCOL):
                raise ProtocolError(f"{peer} left the allowlist mid-transfer", peer_id=peer)
            chunk = memoryview(raw)[_HEAD.size:]
            if len(chunk) != min(part.step, part.size - index * part.step) \
                    or zlib.crc32(chunk) != crc:
                failed = self._chunk_failed(key, part, index)
                if failed is not None:
                    return failed
                await frames.write_frame(_json(ChunkAck(index=index, ok=False)))
                continue
            part.store(index, chunk)
            await frames.write_frame(_json(ChunkAck(index=index, ok=True)))
        # all chunks are in: a resent header now waits for this (see _claim), never cancels it
        part.done = await self._finish(peer, header, part)
        buf, part.buf = part.buf, bytearray()
        self.pool.give(buf)
        if not part.done.ok and part.done.error_type in ("DigestMismatch", "HeaderMismatch"):
            self._partials.pop(key, None)
        return part.done

    async def _negotiate(self, frames: FrameStream,
                         peer: str) -> tuple[socket.socket, Any, bytes] | None:
        """Offer the bulk channel; the authenticated connection, or None to go in-stream."""
        listener = None
        if self._config.tensor_bulk:
            try:
                listener = _bulk.listen(_bulk.listen_host(self._config.listen))
            except OSError:
                listener = None
        if listener is None:
            await frames.write_frame(_json(_bulk.BulkOffer(port=0)))
            return None
        try:
            session, port = _bulk.BulkSession(), listener.getsockname()[1]
            if self.bulk_listening is not None:
                self.bulk_listening(listener)
            await frames.write_frame(_json(_bulk.BulkOffer(
                port=port, session=session.session.hex(),
                public_key=session.public.hex())))
            raw = await frames.read_frame()
            if raw is None:
                raise ProtocolError(f"{peer} closed the tensor stream before answering the "
                                    "bulk offer", peer_id=peer)
            accept = _bulk.parse_accept(raw)
            if not accept.public_key:
                return None
            theirs = bytes.fromhex(accept.public_key)
            aead = session.derive(theirs, peer, self._config.identity.peer_id, session.public,
                                  theirs)

            def refused() -> None:
                self.bulk_refused += 1

            conn = await _bulk.run_guarded(
                lambda: _bulk.accept_authenticated(listener, aead, session.session,
                                                   self._config.tensor_bulk_buffer, refused),
                lambda: _bulk.shutdown(listener))
            return conn, aead, session.session
        finally:
            _bulk.shutdown(listener)

    async def _fill_bulk(self, frames: FrameStream, peer: str, part: _Partial,
                         key: tuple[str, str, int, int, str], conn: socket.socket,
                         aead: Any, session: bytes) -> TransferDone | None:
        """Take chunk records off the bulk connection (a worker thread decrypts each into
        place) and acknowledge them on the stream. None once every chunk is in."""
        self.bulk_transfers += 1
        send, receive = trio.open_memory_channel[Any](math.inf)
        post = _bulk.poster(send)
        with collapse_groups():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_bulk.run_guarded,
                                   lambda: _bulk.receive_records(conn, aead, session, part, post),
                                   lambda: _bulk.shutdown(conn))
                try:
                    return await self._bulk_acks(frames, peer, part, key, receive)
                finally:
                    nursery.cancel_scope.cancel()
        raise AssertionError("unreachable")  # pragma: no cover

    async def _bulk_acks(self, frames: FrameStream, peer: str, part: _Partial,
                         key: tuple[str, str, int, int, str],
                         receive: trio.MemoryReceiveChannel[Any]) -> TransferDone | None:
        while True:
            item = await receive.receive()
            if item is None:
                return None
            if isinstance(item, BaseException):
                raise ProtocolError(f"bulk connection from {peer} failed with {part.missing} of "
                                    f"{part.count} chunks missing: {item!r}",
                                    peer_id=peer) from item
            index, ok = item
            if not self._admit(peer, TENSOR_PROTOCOL):
                raise ProtocolError(f"{peer} left the allowlist mid-transfer", peer_id=peer)
            if not ok:
                failed = self._chunk_failed(key, part, index)
                if failed is not None:
                    return failed
            await frames.write_frame(_json(ChunkAck(index=index, ok=ok)))

    def _chunk_failed(self, key: tuple[str, str, int, int, str], part: _Partial,
                      index: int) -> TransferDone | None:
        """Count a failed check of chunk ``index``; past ``tensor_retries`` the transfer ends
        (its partial state dropped) with the returned ChecksumError reply."""
        part.failures[index] += 1
        if part.failures[index] <= self._config.tensor_retries:
            return None
        self._partials.pop(key, None)
        return TransferDone(ok=False, error_type="ChecksumError", chunk=index,
                            error=f"chunk {index} failed its CRC32 {part.failures[index]} times")

    async def _finish(self, peer: str, header: TensorHeader, part: _Partial) -> TransferDone:
        if part.digest.hexdigest() != header.xxh3:
            return TransferDone(ok=False, error_type="DigestMismatch",
                                error="every chunk passed its check but the XXH3-128 differs")
        data = memoryview(part.buf)  # the buffer itself: a copy of a large transfer costs seconds
        tensors, metadata = describe(data)
        if tensors != header.tensors or metadata != header.metadata:
            return TransferDone(ok=False, error_type="HeaderMismatch",
                                error="the safetensors header differs from the transfer header")
        received = ReceivedTensors(peer_id=peer, transfer_id=header.transfer_id,
                                   name=header.name, metadata=metadata, tensors=tensors,
                                   data=data)
        assert self.handler is not None
        try:
            return TransferDone(ok=True, result=await self.handler(received))
        except Exception as err:  # noqa: BLE001 - reported to the sender; receiver carries on
            return TransferDone(ok=False, error_type=type(err).__name__, error=str(err)[:65536])

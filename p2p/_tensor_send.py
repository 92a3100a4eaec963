"""Sending tensor transfers (trio side), resuming after a dropped link.

See ``p2p/_tensors.py`` for the protocol. One :func:`send_transfer` call makes up to
``1 + resume_attempts`` attempts, each on a new stream. An attempt that loses its link (the
stream is reset, or ends before the receiver's final reply) is followed - after a backoff
delay, reconnecting - by one whose header has ``attempt`` + 1; the receiver answers with
the chunks it verified and only the others are sent. Failures that are not about the link
(a refused transfer, a chunk failing its CRC32 too often, the handler's error, a peer not on
the allowlist, the wrong peer at an address) end the call at once.
"""

from __future__ import annotations

import math
import queue
import socket
import sys
import time
import zlib
from collections.abc import Callable
from typing import Any

import trio

from p2p import _bulk
from p2p._exceptions import (
    ChecksumError,
    DialError,
    FrameTooLargeError,
    P2PError,
    P2PTimeoutError,
    PeerIdMismatchError,
    ProtocolError,
    RemoteError,
    StreamResetError,
)
from p2p._frames import FrameStream
from p2p._host import Host
from p2p._messages import TensorHeader, TransferDone, TransferResume, parse_control
from p2p._reconnect import Backoff
from p2p._tensors import (
    _HEAD,
    CONTROL_FRAME,
    TENSOR_BULK_PROTOCOL,
    TENSOR_PROTOCOL,
    Mangle,
    TransferStats,
)
from p2p._tensors import encode_control as _json
from p2p._util import close_quietly, collapse_groups

if sys.version_info < (3, 11):  # trio depends on the backport there
    from exceptiongroup import BaseExceptionGroup

__all__ = ["send_transfer"]


class _LinkLost(Exception):
    """The attempt's stream died under it; ``cause`` is the error to raise if no retry."""

    def __init__(self, cause: P2PError) -> None:
        super().__init__(str(cause))
        self.cause = cause


class _Sender:
    """The state of one transfer across its attempts."""

    def __init__(self, host: Host, peer_id: str, header: TensorHeader, data: bytes,
                 window: int, retries: int, mangle: Mangle | None,
                 bulk: tuple[float, int] | None = None) -> None:
        self.host, self.peer_id, self.header = host, peer_id, header
        self.view, self.step, self.count = memoryview(data), header.chunk_size, header.chunks
        self.window, self.retries, self.mangle = window, retries, mangle
        self.crc_retries = [0] * self.count  # CRC failures per chunk, across attempts
        self.sent = bytearray(self.count)
        self.skipped = bytearray(self.count)  # the receiver had it at a resume
        self.bytes_sent = self.resent_bytes = self.bulk_bytes = 0
        self.bulk = bulk  # (connect timeout, socket buffer), or None: always in-stream

    def _size(self, index: int) -> int:
        return min(self.step, self.header.size - index * self.step)

    async def _read(self, frames: FrameStream,
                    parse: Callable[[bytes], Any] = parse_control) -> Any:
        try:
            raw = await frames.read_frame()
        except FrameTooLargeError:
            raise
        except (ProtocolError, StreamResetError) as err:  # truncated or reset: the link
            raise _LinkLost(err) from err
        if raw is None:
            raise _LinkLost(ProtocolError(f"{self.peer_id} closed the tensor stream before it "
                                          "was done", peer_id=self.peer_id))
        return parse(raw)

    async def _write(self, frames: FrameStream, payload: bytes) -> None:
        try:
            await frames.write_frame(payload)
        except StreamResetError as err:
            raise _LinkLost(err) from err

    async def attempt(self, number: int) -> TransferDone:
        """One attempt on a new stream (``number`` 0 is the first)."""
        header = self.header.model_copy(update={"attempt": number})
        stream: Any = None
        channel: tuple[socket.socket, Any, bytes, str] | None = None
        bulk = False
        try:
            try:
                stream, bulk = await self._open()
            except PeerIdMismatchError:
                raise
            except DialError as err:
                if number == 0:
                    raise
                raise _LinkLost(err) from err
            frames = FrameStream(stream, CONTROL_FRAME, self.peer_id)
            await self._write(frames, _json(header))
            todo = list(range(self.count))
            if number > 0:
                first = await self._read(frames)
                if isinstance(first, TransferDone):
                    return first
                if not isinstance(first, TransferResume):
                    raise ProtocolError(f"{self.peer_id} answered a resumed header with "
                                        f"{first.kind!r}", peer_id=self.peer_id)
                todo = self._resume(first)
            if bulk:
                offer = await self._read(frames, _bulk.parse_offer_reply)
                if isinstance(offer, TransferDone):
                    return offer
                if not isinstance(offer, _bulk.BulkOffer):
                    raise ProtocolError(f"{self.peer_id} sent {offer.kind!r} where a bulk offer "
                                        "belongs", peer_id=self.peer_id)
                channel = await self._connect(stream, offer)
                await self._write(frames, _json(_bulk.BulkAccept(
                    public_key=channel[3] if channel else "")))
            try:
                with collapse_groups():
                    async with trio.open_nursery() as nursery:
                        resend_in, resend_out = trio.open_memory_channel[int](math.inf)
                        slots, outstanding = trio.Semaphore(self.window), set[int]()
                        emit = self._emit_frame(frames)
                        if channel is not None:
                            todo_q: queue.SimpleQueue[int | None] = queue.SimpleQueue()
                            nursery.start_soon(self._pump, channel, todo_q)
                            emit = self._emit_bulk(todo_q)
                        nursery.start_soon(self._writer, emit, todo, slots, outstanding,
                                           resend_out)
                        done = await self._reader(frames, slots, outstanding, resend_in)
                        nursery.cancel_scope.cancel()
            except BaseExceptionGroup as group:  # reader and writer both saw the link go
                lost, rest = group.split(_LinkLost)
                if lost is None or (rest is not None and rest.split(trio.Cancelled)[1]):
                    raise
                while isinstance(lost, BaseExceptionGroup):
                    lost = lost.exceptions[0]
                raise lost from group
        except BaseException:
            await close_quietly(stream, reset=True)
            raise
        finally:
            if channel is not None:
                _bulk.shutdown(channel[0])
        await close_quietly(stream, reset=False)
        return done

    async def _open(self) -> tuple[Any, bool]:
        """A tensor stream, and whether it is ``1.4.0`` (bulk offer: when enabled and the
        peer serves it) rather than ``1.3.0``."""
        if self.bulk is not None:
            try:
                return await self.host.open_stream(self.peer_id, TENSOR_BULK_PROTOCOL), True
            except ProtocolError:  # an older peer: in-stream from now on
                self.bulk = None
        return await self.host.open_stream(self.peer_id, TENSOR_PROTOCOL), False

    async def _connect(self, stream: Any,
                       offer: _bulk.BulkOffer) -> tuple[socket.socket, Any, bytes, str] | None:
        """The direct connection to the offered port, keyed; None to fall back in-stream."""
        if not offer.port or not offer.public_key or self.bulk is None:
            return None
        try:
            remote = stream.get_remote_address()
        except Exception:  # noqa: BLE001 - a transport without one: stay in-stream
            remote = None
        if not remote:
            return None
        timeout, buffer = self.bulk
        try:
            conn = await trio.to_thread.run_sync(_bulk.connect, remote[0], offer.port, timeout,
                                                 buffer)
        except OSError:  # refused, filtered (timeout), unreachable: in-stream
            return None
        session = _bulk.BulkSession(bytes.fromhex(offer.session))
        theirs = bytes.fromhex(offer.public_key)
        aead = session.derive(theirs, self.host.peer_id, self.peer_id, theirs, session.public)
        return conn, aead, session.session, session.public.hex()

    async def _pump(self, channel: tuple[socket.socket, Any, bytes, str],
                    todo: queue.SimpleQueue[int | None]) -> None:
        """Encrypt and send the chunks queued by the writer (worker thread)."""
        conn, aead, session, _ = channel
        mangle = self.mangle

        def mangled(index: int, chunk: bytes) -> bytes:
            assert mangle is not None
            return mangle(index, self.crc_retries[index], chunk)

        def stop() -> None:
            todo.put(None)
            _bulk.shutdown(conn)

        try:
            await _bulk.run_guarded(
                lambda: _bulk.send_records(conn, aead, session, self.view, self.step, todo,
                                           mangled if mangle is not None else None), stop)
        except (OSError, EOFError) as err:
            raise _LinkLost(StreamResetError(f"bulk connection to {self.peer_id} broke: "
                                             f"{err!r}", peer_id=self.peer_id)) from err

    def _emit_frame(self, frames: FrameStream) -> Callable[[int], Any]:
        async def emit(index: int) -> None:
            chunk: bytes | memoryview = self.view[index * self.step:(index + 1) * self.step]
            crc = zlib.crc32(chunk)
            if self.mangle is not None:
                chunk = self.mangle(index, self.crc_retries[index], bytes(chunk))
            await self._write(frames, b"".join((_HEAD.pack(index, crc), chunk)))  # one copy
        return emit

    def _emit_bulk(self, todo: queue.SimpleQueue[int | None]) -> Callable[[int], Any]:
        async def emit(index: int) -> None:
            self.bulk_bytes += self._size(index)
            todo.put(index)
        return emit

    def _resume(self, resume: TransferResume) -> list[int]:
        have = bytearray(self.count)
        for start, end in resume.have:
            if not start < end <= self.count:
                raise ProtocolError(f"{self.peer_id} claims chunks [{start}, {end}) of "
                                    f"{self.count}", peer_id=self.peer_id)
            have[start:end] = b"\x01" * (end - start)
        for i in range(self.count):
            self.skipped[i] |= have[i]
        return [i for i in range(self.count) if not have[i]]

    async def _writer(self, emit: Callable[[int], Any], todo: list[int], slots: trio.Semaphore,
                      outstanding: set[int], resend: trio.MemoryReceiveChannel[int]) -> None:
        following = 0
        while True:
            await slots.acquire()
            try:
                index = resend.receive_nowait()
            except trio.WouldBlock:
                if following < len(todo):
                    index, following = todo[following], following + 1
                else:  # all sent once: wait for resend requests (or the end)
                    slots.release()
                    index = await resend.receive()
                    await slots.acquire()
            outstanding.add(index)
            if self.sent[index]:
                self.resent_bytes += self._size(index)
            self.sent[index] = 1
            self.bytes_sent += self._size(index)
            await emit(index)

    async def _reader(self, frames: FrameStream, slots: trio.Semaphore, outstanding: set[int],
                      resend: trio.MemorySendChannel[int]) -> TransferDone:
        while True:
            msg = await self._read(frames)
            if isinstance(msg, TransferDone):
                return msg
            if isinstance(msg, TransferResume) or msg.index >= self.count \
                    or msg.index not in outstanding:
                raise ProtocolError(f"{self.peer_id} sent an unexpected {msg.kind!r} frame "
                                    "(an ack for a chunk never sent?)", peer_id=self.peer_id)
            outstanding.discard(msg.index)
            slots.release()
            if not msg.ok:
                self.crc_retries[msg.index] += 1
                if self.crc_retries[msg.index] > self.retries:
                    raise ChecksumError(f"chunk {msg.index} to {self.peer_id} failed its CRC32 "
                                        f"{self.crc_retries[msg.index]} times",
                                        chunk=msg.index, peer_id=self.peer_id)
                resend.send_nowait(msg.index)


async def send_transfer(host: Host, peer_id: str, header: TensorHeader, data: bytes, *,
                        window: int, retries: int, timeout: float, resume_attempts: int = 0,
                        backoff: Backoff | None = None, mangle: Mangle | None = None,
                        bulk: tuple[float, int] | None = None) -> TransferStats:
    """Send ``data`` (described by ``header``) to ``peer_id``; return once it was received.

    Args:
        window: chunks in flight. retries: CRC32 resends allowed per chunk.
        timeout: seconds for the whole transfer, every attempt included.
        resume_attempts: how often to resume after the link drops (0: never).
        backoff: delays between attempts (default :class:`~p2p.Backoff`).
        mangle: fault injection for tests: ``mangle(index, crc_retry, chunk)`` returns the
            bytes actually sent for that chunk.
        bulk: ``(connect timeout, socket buffer)`` to offer ``/hive/tensors/1.4.0`` and send
            the body over the bulk channel when the receiver's port is reachable; None:
            ``1.3.0``, in-stream.

    Raises:
        ChecksumError: a chunk kept failing its CRC32.
        RemoteError: the receiver refused the transfer or its handler failed.
        P2PTimeoutError: not done within ``timeout``.
        StreamResetError, ProtocolError: the link dropped more than ``resume_attempts``
            times, or the receiver broke the protocol. PeerNotAllowedError, DialError.
    """
    started = time.perf_counter()
    sender = _Sender(host, peer_id, header, data, window, retries, mangle, bulk)
    delays = backoff or Backoff()
    number = 0
    try:
        with trio.fail_after(timeout):
            while True:
                try:
                    done = await sender.attempt(number)
                    break
                except _LinkLost as lost:
                    if number >= resume_attempts:
                        raise lost.cause from lost
                await trio.sleep(delays.delay(number))
                number += 1
    except trio.TooSlowError as err:
        raise P2PTimeoutError(f"tensor transfer to {peer_id} took longer than {timeout:g}s",
                              peer_id=peer_id, timeout=timeout) from err
    if not done.ok:
        message = f"tensor transfer to {peer_id} failed: {done.error_type}: {done.error}"
        if done.error_type == "ChecksumError":
            raise ChecksumError(message, peer_id=peer_id, chunk=done.chunk)
        raise RemoteError(message, peer_id=peer_id, remote_type=done.error_type,
                          remote_message=done.error)
    resumed = sum(sender._size(i) for i in range(sender.count) if sender.skipped[i])
    return TransferStats(transfer_id=header.transfer_id, bytes=header.size, chunks=sender.count,
                         retransmits=sum(sender.crc_retries),
                         seconds=time.perf_counter() - started, result=done.result,
                         bytes_sent=sender.bytes_sent, resent_bytes=sender.resent_bytes,
                         resumed_bytes=resumed, resumes=number, bulk_bytes=sender.bulk_bytes)

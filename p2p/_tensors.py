"""The tensor stream ``/hive/tensors/1.0.0`` (trio side): safetensors bytes, chunked.

One transfer per stream. Sender -> receiver::

    frame: TensorHeader (JSON)           name, size, chunk_size, chunks, blake2b, tensors
    frame: >II index, crc32 | data       one per chunk (resent on request), in any order

Receiver -> sender::

    frame: ChunkAck {index, ok}          per chunk: ok, or "checksum failed, resend"
    frame: TransferDone {ok, result}     after the whole blake2b matched and the handler ran

Backpressure: at most ``window`` chunks are unacknowledged; the receiver acknowledges a
chunk when it has checked and stored it, so a slow receiver slows the sender (and yamux
flow control bounds what is buffered underneath). A chunk whose CRC32 fails is requested
again, at most ``retries`` times, then the transfer fails with :class:`~p2p.ChecksumError`.
The size is checked against ``max_tensor_bytes`` from the header before anything is
allocated. The whole-transfer blake2b is computed as contiguous chunks arrive.
"""

from __future__ import annotations

import hashlib
import math
import struct
import time
import uuid
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio
from pydantic import JsonValue, ValidationError

from p2p._config import NodeConfig
from p2p._exceptions import ChecksumError, P2PTimeoutError, ProtocolError, RemoteError
from p2p._frames import FrameStream
from p2p._host import Host
from p2p._messages import (
    ChunkAck,
    TensorHeader,
    TensorInfo,
    TransferDone,
    parse_control,
    parse_header,
)
from p2p._safetensors import describe, load_numpy, load_torch
from p2p._util import close_quietly, collapse_groups

__all__ = ["TENSOR_PROTOCOL", "ReceivedTensors", "TensorServer", "TransferStats",
           "prepare_transfer", "send_transfer"]

TENSOR_PROTOCOL = "/hive/tensors/1.0.0"
MAX_CHUNK = 16 << 20  # largest chunk a receiver accepts, whatever the sender's setting
_HEAD = struct.Struct(">II")  # chunk index, CRC32 of the chunk's data
_CONTROL_FRAME = 1 << 20  # header / ack / done frames


@dataclass(frozen=True)
class ReceivedTensors:
    """A completed incoming transfer, as a receiving handler gets it.

    Attributes:
        peer_id: the sender. name, metadata: what it attached. tensors: name/dtype/shape.
        data: the safetensors bytes (checked against the sender's blake2b).
    """

    peer_id: str
    transfer_id: str
    name: str
    metadata: dict[str, str]
    tensors: tuple[TensorInfo, ...]
    data: bytes = field(repr=False)

    def numpy(self) -> dict[str, Any]:
        """``{name: numpy.ndarray}``."""
        return load_numpy(self.data)

    def torch(self) -> dict[str, Any]:
        """``{name: torch.Tensor}`` (needs torch)."""
        return load_torch(self.data)


@dataclass(frozen=True)
class TransferStats:
    """How a completed outgoing transfer went; ``result`` is the receiver handler's reply."""

    transfer_id: str
    bytes: int
    chunks: int
    retransmits: int
    seconds: float
    result: JsonValue = None


TensorHandler = Callable[[ReceivedTensors], Awaitable[JsonValue]]
Mangle = Callable[[int, int, bytes], bytes]


def prepare_transfer(data: bytes, chunk_size: int, name: str = "") -> TensorHeader:
    """The header for sending safetensors ``data`` (CPU work: run it off the network thread).

    Raises:
        ProtocolError: ``data`` is not safetensors.
    """
    infos, metadata = describe(data)
    return TensorHeader(transfer_id=uuid.uuid4().hex, name=name, size=len(data),
                        chunk_size=chunk_size, chunks=math.ceil(len(data) / chunk_size),
                        blake2b=hashlib.blake2b(data, digest_size=32).hexdigest(),
                        tensors=infos, metadata=metadata)


def _json(model: ChunkAck | TransferDone | TensorHeader) -> bytes:
    return model.model_dump_json().encode()


class TensorServer:
    """Receives transfers and hands each completed one to the registered handler."""

    def __init__(self, config: NodeConfig, admit: Callable[[str, str], bool]) -> None:
        self._config = config
        self._admit = admit
        self.handler: TensorHandler | None = None

    async def handle_stream(self, stream: Any, peer: str) -> None:
        """Serve one transfer; any protocol violation resets only this stream."""
        frames = FrameStream(stream, _CONTROL_FRAME, peer)
        try:
            with trio.fail_after(self._config.tensor_timeout):
                done = await self._receive(frames, peer)
            await frames.write_frame(_json(done))
        except (ProtocolError, ValidationError, trio.TooSlowError):
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

    async def _receive(self, frames: FrameStream, peer: str) -> TransferDone:
        raw = await frames.read_frame()
        if raw is None:
            raise ProtocolError(f"{peer} closed the tensor stream before its header")
        header = parse_header(raw)
        refusal = self._refusal(header)
        if refusal is not None:
            return TransferDone(ok=False, error_type="Refused", error=refusal)
        size, step, count = header.size, header.chunk_size, header.chunks
        frames.max_frame = _HEAD.size + step
        buf = bytearray(size)  # allocated only after the size check
        view = memoryview(buf)
        have, failures = bytearray(count), [0] * count
        digest, hashed, missing = hashlib.blake2b(digest_size=32), 0, count
        while missing:
            raw = await frames.read_frame()
            if raw is None or len(raw) < _HEAD.size:
                raise ProtocolError(f"tensor transfer from {peer} ended with {missing} of "
                                    f"{count} chunks missing", peer_id=peer)
            index, crc = _HEAD.unpack_from(raw)
            if index >= count:
                raise ProtocolError(f"chunk {index} of {count} from {peer}", peer_id=peer)
            if not self._admit(peer, TENSOR_PROTOCOL):
                raise ProtocolError(f"{peer} left the allowlist mid-transfer", peer_id=peer)
            chunk = memoryview(raw)[_HEAD.size:]
            start = index * step
            if len(chunk) != min(step, size - start) or zlib.crc32(chunk) != crc:
                failures[index] += 1
                if failures[index] > self._config.tensor_retries:
                    return TransferDone(ok=False, error_type="ChecksumError", chunk=index,
                                        error=f"chunk {index} failed its CRC32 "
                                              f"{failures[index]} times")
                await frames.write_frame(_json(ChunkAck(index=index, ok=False)))
                continue
            if not have[index]:
                view[start:start + len(chunk)] = chunk
                have[index], missing = 1, missing - 1
                while hashed < count and have[hashed]:  # hash the contiguous prefix
                    digest.update(view[hashed * step:(hashed + 1) * step])
                    hashed += 1
            await frames.write_frame(_json(ChunkAck(index=index, ok=True)))
        if digest.hexdigest() != header.blake2b:
            return TransferDone(ok=False, error_type="DigestMismatch",
                                error="every chunk passed its CRC32 but the blake2b differs")
        data = bytes(buf)
        del view, buf
        tensors, metadata = describe(data)
        if tensors != header.tensors or metadata != header.metadata:
            return TransferDone(ok=False, error_type="HeaderMismatch",
                                error="the safetensors header differs from the transfer header")
        received = ReceivedTensors(peer_id=peer, transfer_id=header.transfer_id,
                                   name=header.name, metadata=metadata, tensors=tensors,
                                   data=data)
        assert self.handler is not None
        try:
            result = await self.handler(received)
            return TransferDone(ok=True, result=result)
        except Exception as err:  # noqa: BLE001 - reported to the sender; receiver carries on
            return TransferDone(ok=False, error_type=type(err).__name__, error=str(err)[:65536])


async def send_transfer(host: Host, peer_id: str, header: TensorHeader, data: bytes, *,
                        window: int, retries: int, timeout: float,
                        mangle: Mangle | None = None) -> TransferStats:
    """Send ``data`` (described by ``header``) to ``peer_id``; return once it was received.

    Args:
        mangle: fault injection for tests: ``mangle(index, attempt, chunk)`` returns the
            bytes actually sent for that chunk.

    Raises:
        ChecksumError: a chunk kept failing its CRC32.
        RemoteError: the receiver refused the transfer or its handler failed.
        P2PTimeoutError: not done within ``timeout``.
        ProtocolError, StreamResetError, PeerNotAllowedError, DialError.
    """
    started = time.perf_counter()
    view, step, count = memoryview(data), header.chunk_size, header.chunks
    attempts, outstanding = [0] * count, set()
    slots = trio.Semaphore(window)
    resend_in, resend_out = trio.open_memory_channel[int](math.inf)
    stream: Any = None

    async def write_chunk(frames: FrameStream, index: int) -> None:
        chunk: bytes | memoryview = view[index * step:(index + 1) * step]
        crc = zlib.crc32(chunk)
        if mangle is not None:
            chunk = mangle(index, attempts[index], bytes(chunk))
        outstanding.add(index)
        await frames.write_frame(b"".join((_HEAD.pack(index, crc), chunk)))  # one copy

    async def writer(frames: FrameStream) -> None:
        following = 0
        while True:
            await slots.acquire()
            try:
                index = resend_out.receive_nowait()
            except trio.WouldBlock:
                if following < count:
                    index, following = following, following + 1
                else:  # all sent once: wait for resend requests (or the end)
                    slots.release()
                    index = await resend_out.receive()
                    await slots.acquire()
            await write_chunk(frames, index)

    async def reader(frames: FrameStream) -> TransferDone:
        while True:
            raw = await frames.read_frame()
            if raw is None:
                raise ProtocolError(f"{peer_id} closed the tensor stream before it was done",
                                    peer_id=peer_id)
            msg = parse_control(raw)
            if isinstance(msg, TransferDone):
                return msg
            if msg.index >= count or msg.index not in outstanding:
                raise ProtocolError(f"{peer_id} acknowledged chunk {msg.index}, never sent",
                                    peer_id=peer_id)
            outstanding.discard(msg.index)
            slots.release()
            if not msg.ok:
                attempts[msg.index] += 1
                if attempts[msg.index] > retries:
                    raise ChecksumError(f"chunk {msg.index} to {peer_id} failed its CRC32 "
                                        f"{attempts[msg.index]} times", chunk=msg.index,
                                        peer_id=peer_id)
                resend_in.send_nowait(msg.index)

    try:
        with trio.fail_after(timeout):
            stream = await host.open_stream(peer_id, TENSOR_PROTOCOL)
            frames = FrameStream(stream, _CONTROL_FRAME, peer_id)
            await frames.write_frame(_json(header))
            with collapse_groups():
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(writer, frames)
                    done = await reader(frames)
                    nursery.cancel_scope.cancel()
    except trio.TooSlowError as err:
        await close_quietly(stream, reset=True)
        raise P2PTimeoutError(f"tensor transfer to {peer_id} took longer than {timeout:g}s",
                              peer_id=peer_id, timeout=timeout) from err
    except BaseException:
        await close_quietly(stream, reset=True)
        raise
    await close_quietly(stream, reset=False)
    if not done.ok:
        message = f"tensor transfer to {peer_id} failed: {done.error_type}: {done.error}"
        if done.error_type == "ChecksumError":
            raise ChecksumError(message, peer_id=peer_id, chunk=done.chunk)
        raise RemoteError(message, peer_id=peer_id, remote_type=done.error_type,
                          remote_message=done.error)
    return TransferStats(transfer_id=header.transfer_id, bytes=header.size, chunks=count,
                         retransmits=sum(attempts), seconds=time.perf_counter() - started,
                         result=done.result)

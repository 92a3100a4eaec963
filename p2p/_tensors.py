"""The tensor stream ``/hive/tensors/1.3.0``: safetensors bytes, chunked, resumable.

``/hive/tensors/1.4.0`` is the same exchange, except that the chunk frames go over a direct
TCP connection as ChaCha20-Poly1305 records, negotiated on this stream (``p2p/_bulk.py``);
the acks and the final reply stay on the stream. Either side can decline (no port / no
connection within ``tensor_bulk_timeout``): then the chunks follow on the stream as below.

One transfer attempt per stream. Sender -> receiver::

    frame: TensorHeader (JSON)           transfer_id, name, size, chunk_size, chunks, xxh3,
                                         tensors, attempt
    frame: >II index, crc32 | data       one per chunk (resent on request), in any order

Receiver -> sender::

    frame: TransferResume {have}         only when attempt > 0: chunks it already verified
    frame: ChunkAck {index, ok}          per chunk: ok, or "checksum failed, resend"
    frame: TransferDone {ok, result}     after the whole XXH3-128 matched and the handler ran

Backpressure: at most ``window`` chunks are unacknowledged; the receiver acknowledges a
chunk when it has checked and stored it, so a slow receiver slows the sender (and yamux
flow control bounds what is buffered underneath). A chunk whose CRC32 fails is requested
again, at most ``retries`` times, then the transfer fails with :class:`~p2p.ChecksumError`.
The size is checked against ``max_tensor_bytes`` from the header before anything is
allocated. The whole-transfer XXH3-128 is computed as contiguous chunks arrive: it catches
reassembly and resume mistakes (a chunk in the wrong place, a stale chunk kept across
attempts); forgery is the chunks' own authentication's business (Noise, or the bulk
records' Poly1305 tags), so a fast non-cryptographic hash suffices (~20x blake2b's speed).

Versions: 1.1.0 / 1.2.0 carried a blake2b; 1.3.0 / 1.4.0 carry XXH3-128 instead and are
otherwise the same exchange. A node serves and speaks only the current pair.

Resumption: the receiver keeps the verified chunks of an interrupted transfer, keyed by
sender + ``transfer_id`` + size + digest, for ``tensor_resume_ttl`` seconds (and a finished
transfer's reply, so a resent header never runs the handler twice). When the link drops
mid-body, the sender reconnects (backoff) and sends the header again with ``attempt`` + 1;
the receiver answers with what it has, and only the rest is sent
(:attr:`TransferStats.resumed_bytes`). Receiver: ``p2p/_tensor_recv.py``; sender:
``p2p/_tensor_send.py``.
"""

from __future__ import annotations

import math
import struct
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import xxhash
from pydantic import BaseModel, JsonValue

from p2p._messages import TensorHeader, TensorInfo
from p2p._safetensors import describe, load_numpy, load_torch

__all__ = ["MAX_CHUNK", "TENSOR_BULK_PROTOCOL", "TENSOR_PROTOCOL", "Mangle", "ReceivedTensors", "TransferStats",
           "encode_control", "prepare_transfer"]

TENSOR_PROTOCOL = "/hive/tensors/1.3.0"
# 1.3.0 plus the bulk channel (p2p/_bulk.py): after the header (and resume), the receiver
# offers a direct TCP port and the body goes there as ChaCha20-Poly1305 records.
TENSOR_BULK_PROTOCOL = "/hive/tensors/1.4.0"
MAX_CHUNK = 16 << 20  # largest chunk a receiver accepts, whatever the sender's setting
_HEAD = struct.Struct(">II")  # chunk index, CRC32 of the chunk's data
CONTROL_FRAME = 1 << 20  # header / resume / ack / done frames
Mangle = Callable[[int, int, bytes], bytes]


@dataclass(frozen=True)
class ReceivedTensors:
    """A completed incoming transfer, as a receiving handler gets it.

    Attributes:
        peer_id: the sender. name, metadata: what it attached. tensors: name/dtype/shape.
        data: the safetensors bytes (checked against the sender's XXH3-128): a writable
            ``memoryview`` of the very buffer the chunks were received into (copying a large
            transfer into ``bytes`` would cost seconds). ``numpy()`` / ``torch()`` give
            arrays over it without a copy; ``bytes(data)`` makes an immutable copy. Keep
            ``data`` (or arrays over it) as long as you like: the buffer is reused for a
            later transfer only once nothing references it.
    """

    peer_id: str
    transfer_id: str
    name: str
    metadata: dict[str, str]
    tensors: tuple[TensorInfo, ...]
    data: bytes | memoryview = field(repr=False)

    def numpy(self) -> dict[str, Any]:
        """``{name: numpy.ndarray}`` over ``data`` (no copy; writable when ``data`` is)."""
        return load_numpy(self.data)

    def torch(self) -> dict[str, Any]:
        """``{name: torch.Tensor}`` over ``data`` (no copy; needs torch)."""
        return load_torch(self.data)


@dataclass(frozen=True)
class TransferStats:
    """How a completed outgoing transfer went; ``result`` is the receiver handler's reply.

    Attributes:
        bytes: the transfer's size. chunks: how many chunks it was cut in.
        retransmits: chunks resent because their CRC32 failed at the receiver.
        seconds: wall time, all attempts included. result: the receiving handler's reply.
        bytes_sent: chunk bytes written, resends included (== ``bytes`` when nothing failed).
        resent_bytes: chunk bytes written more than once (bad CRC, or in flight when the
            link dropped).
        resumed_bytes: bytes the receiver still held after a dropped link, so never resent.
        resumes: how often the link dropped and the transfer resumed.
        bulk_bytes: chunk bytes sent over the direct bulk channel (0: all went in-stream).
    """

    transfer_id: str
    bytes: int
    chunks: int
    retransmits: int
    seconds: float
    result: JsonValue = None
    bytes_sent: int = 0
    resent_bytes: int = 0
    resumed_bytes: int = 0
    resumes: int = 0
    bulk_bytes: int = 0


def prepare_transfer(data: bytes, chunk_size: int, name: str = "") -> TensorHeader:
    """The header for sending safetensors ``data`` (CPU work: run it off the network thread).

    Raises:
        ProtocolError: ``data`` is not safetensors.
    """
    infos, metadata = describe(data)
    return TensorHeader(transfer_id=uuid.uuid4().hex, name=name, size=len(data),
                        chunk_size=chunk_size, chunks=math.ceil(len(data) / chunk_size),
                        xxh3=xxhash.xxh3_128(data).hexdigest(),
                        tensors=infos, metadata=metadata)


def encode_control(model: BaseModel) -> bytes:
    """A control frame's payload (JSON)."""
    return model.model_dump_json().encode()


@contextmanager
def prefix_hasher(part: Any) -> Iterator[Callable[[int], None]]:
    """``mark(index)``: chunk ``index`` of ``part`` is verified and in place; a helper thread
    extends ``part.digest`` over the contiguous verified prefix meanwhile (overlapping the
    caller's work) and is joined on exit, with ``part.hashed``
    consistent for whoever goes on (``part.mark``)."""
    cond, stopped = threading.Condition(), [False]

    def run() -> None:
        while True:
            with cond:
                while part.hashed < part.count and not part.have[part.hashed] \
                        and not stopped[0]:
                    cond.wait()
                start = end = part.hashed
                while end < part.count and part.have[end]:
                    end += 1
            if start == end:
                return
            with memoryview(part.buf) as buf:
                part.digest.update(buf[start * part.step:end * part.step])
            part.hashed = end

    def mark(index: int) -> None:
        with cond:
            part.have[index], part.missing = 1, part.missing - 1
            cond.notify()

    hasher = threading.Thread(target=run, daemon=True)
    hasher.start()
    try:
        yield mark
    finally:
        with cond:
            stopped[0] = True
            cond.notify()
        hasher.join()

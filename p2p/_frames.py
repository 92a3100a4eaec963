"""Length-prefixed frames over a libp2p stream.

Wire format of one frame::

    uvarint(len(payload))   1-10 bytes, unsigned LEB128 (multiformats unsigned-varint)
    payload                 len(payload) bytes

The length is checked against the limit while the prefix is still being decoded, so a
prefix announcing 2**40 bytes is refused before a single payload byte is allocated or read
(:class:`~p2p.FrameTooLargeError`). A stream that ends inside a prefix or a payload raises
:class:`~p2p.ProtocolError` ("truncated"); one that ends cleanly between frames reads as
``None``. Protocol handlers reset only the offending stream: the connection and its other
streams carry on.
"""

from __future__ import annotations

from typing import Protocol

from libp2p.io.exceptions import IOException
from libp2p.network.stream.exceptions import StreamEOF

from p2p._exceptions import FrameTooLargeError, ProtocolError, StreamResetError

__all__ = ["FrameStream", "RawStream", "encode_frame", "encode_uvarint"]

_MAX_PREFIX = 10  # a uvarint of a 64-bit length never needs more
_READ_SIZE = 256 * 1024  # bytes asked of the muxer per read while buffering


class RawStream(Protocol):
    """What FrameStream needs from a stream (libp2p's INetStream has it)."""

    async def read(self, n: int | None = None) -> bytes: ...

    async def write(self, data: bytes) -> None: ...


def encode_uvarint(value: int) -> bytes:
    """Unsigned LEB128: ``encode_uvarint(300) == b"\\xac\\x02"``."""
    if value < 0:
        raise ValueError("uvarint cannot encode a negative number")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def encode_frame(payload: bytes) -> bytes:
    """The bytes of one frame: prefix + payload."""
    return encode_uvarint(len(payload)) + payload


class FrameStream:
    """Reads and writes frames on one stream.

    Args:
        stream: the stream (``read(n)`` returns up to ``n`` bytes, raises ``StreamEOF`` at end).
        max_frame: largest payload accepted on read.
        peer_id: the remote, named in errors.

    Example:
        >>> frames = FrameStream(stream, max_frame=4 << 20, peer_id=peer)   # doctest: +SKIP
        >>> await frames.write_frame(b"hello"); reply = await frames.read_frame()  # doctest: +SKIP
    """

    def __init__(self, stream: RawStream, max_frame: int, peer_id: str | None = None) -> None:
        self.stream = stream
        self._max = max_frame
        self._peer = peer_id
        self._buf = bytearray()
        self._eof = False

    @property
    def max_frame(self) -> int:
        """The largest payload :meth:`read_frame` accepts (a protocol may raise it once it
        has validated a header that announces bigger frames)."""
        return self._max

    @max_frame.setter
    def max_frame(self, value: int) -> None:
        self._max = value

    async def _fill(self, want: int = _READ_SIZE) -> bool:
        """Read more bytes into the buffer; False at end of stream."""
        if self._eof:
            return False
        try:
            data = await self.stream.read(want)
        except StreamEOF:
            data = b""
        except IOException as err:  # StreamReset, StreamError, broken connection
            raise StreamResetError(f"stream from {self._peer} was reset: {err!r}",
                                   peer_id=self._peer) from err
        if not data:
            self._eof = True
            return False
        self._buf += data
        return True

    async def watch(self) -> bool:
        """Wait for the peer's next move while we are busy: ``True`` if more bytes arrived
        (kept for the next :meth:`read_frame`), ``False`` at end of stream.

        Raises:
            StreamResetError: the peer reset the stream (e.g. it gave up on its request).
        """
        return await self._fill()

    async def _read_length(self) -> int | None:
        value = shift = i = 0
        while True:
            if i >= len(self._buf) and not await self._fill():
                if i == 0:
                    return None
                raise ProtocolError(f"truncated frame from {self._peer}: stream ended inside "
                                    "the length prefix", peer_id=self._peer)
            byte = self._buf[i]
            i += 1
            value |= (byte & 0x7F) << shift
            if value > self._max:
                raise FrameTooLargeError(
                    f"frame from {self._peer} announces at least {value} bytes, above the "
                    f"limit of {self._max}", peer_id=self._peer, size=value, limit=self._max)
            if byte < 0x80:
                del self._buf[:i]
                return value
            shift += 7
            if i >= _MAX_PREFIX:
                raise ProtocolError(f"length prefix from {self._peer} is longer than "
                                    f"{_MAX_PREFIX} bytes", peer_id=self._peer)

    async def read_frame(self) -> bytes | None:
        """The next payload, or ``None`` if the stream ended cleanly between frames.

        Raises:
            FrameTooLargeError: the prefix announces more than ``max_frame`` bytes.
            ProtocolError: the stream ended inside a frame, or the prefix is malformed.
            StreamResetError: the peer reset the stream.
        """
        size = await self._read_length()
        if size is None:
            return None
        if len(self._buf) >= size:
            payload = bytes(self._buf[:size])
            del self._buf[:size]
            return payload
        out = bytearray(size)  # allocated only after the limit check above
        have = len(self._buf)
        out[:have] = self._buf
        self._buf.clear()
        while have < size:
            if not await self._fill(min(size - have, _READ_SIZE)):
                raise ProtocolError(f"truncated frame from {self._peer}: got {have} of "
                                    f"{size} bytes", peer_id=self._peer)
            take = min(len(self._buf), size - have)
            out[have:have + take] = self._buf[:take]
            del self._buf[:take]
            have += take
        return bytes(out)

    async def write_frame(self, payload: bytes) -> None:
        """Write one frame (small ones in a single write).

        Raises:
            StreamResetError: the peer reset the stream or the connection broke.
        """
        try:
            if len(payload) <= 64 * 1024:
                await self.stream.write(encode_frame(payload))
            else:  # prefix + payload as one muxer write: a separate tiny write costs a frame
                await self.stream.write(b"".join((encode_uvarint(len(payload)), payload)))
        except IOException as err:
            raise StreamResetError(f"stream to {self._peer} was reset: {err!r}",
                                   peer_id=self._peer) from err

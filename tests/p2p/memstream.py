"""An in-memory stand-in for a libp2p stream: scripted input, captured output."""

from __future__ import annotations

import random

from libp2p.network.stream.exceptions import StreamEOF, StreamReset


class MemoryStream:
    """Reads return ``data`` in random-sized pieces, then raise ``StreamEOF``.

    Args:
        data: what the peer "sent".
        seed: drives the piece sizes, so a failure replays.
        reset_at_end: raise ``StreamReset`` instead of ``StreamEOF`` once ``data`` is used up.
    """

    def __init__(self, data: bytes = b"", seed: int = 0, reset_at_end: bool = False) -> None:
        self._data = memoryview(data)
        self._pos = 0
        self._rng = random.Random(seed)
        self._reset_at_end = reset_at_end
        self.written = bytearray()
        self.closed = False
        self.was_reset = False
        self.reads = 0

    async def read(self, n: int | None = None) -> bytes:
        self.reads += 1
        if self._pos >= len(self._data):
            if self._reset_at_end:
                raise StreamReset("reset")
            raise StreamEOF()
        limit = len(self._data) - self._pos if n is None or n < 0 else n
        take = min(limit, self._rng.randint(1, 4096), len(self._data) - self._pos)
        out = bytes(self._data[self._pos:self._pos + take])
        self._pos += take
        return out

    async def write(self, data: bytes) -> None:
        self.written += data

    async def close(self) -> None:
        self.closed = True

    async def reset(self) -> None:
        self.was_reset = True

"""Receive buffers for tensor transfers: allocated lazily, reused when nobody holds them."""

from __future__ import annotations

import mmap
import sys

import trio

__all__ = ["BufferPool", "receive_buffer"]

_MAP_FROM = 1 << 20  # transfers of this many bytes and more are received into a memory map


def receive_buffer(size: int) -> bytearray | mmap.mmap:
    """A zeroed, writable buffer of ``size`` bytes to receive a transfer into.

    Large ones are anonymous memory maps, not bytearrays: ``bytearray(n)`` zero-fills all of
    it before the first byte arrives (~0.3 s per GiB on the network thread, while the sender
    waits), where the kernel hands out a map's zeroed pages as they are first written, by
    the thread decrypting into them; transparent huge pages (where enabled) make that 512x
    fewer page faults.
    """
    if size < _MAP_FROM:
        return bytearray(size)
    buf = mmap.mmap(-1, size)
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is not None:
        try:
            buf.madvise(advice)
        except OSError:  # advice only
            pass
    return buf


class BufferPool:
    """Receive buffers of finished transfers, kept for the next transfer of the same size.

    Touching fresh memory is a large part of receiving a big transfer (page faults and
    zeroing; ~0.6 s per GiB on the development VM, about what decrypting it costs), and
    sites tend to receive the same shapes again (shards, activations, merged checkpoints).

    A finished transfer's buffer is handed back with ``give``; it is used again only once
    nothing else references it - not the handler, not a numpy array or tensor over the data,
    not a memoryview: each holds a reference to the map. That is checked when a buffer is
    wanted (``take``), not when it is given back, since a handler's thread may still be
    dropping its arguments then; a buffer somebody keeps simply stays theirs. Memory maps
    only (from ``_MAP_FROM`` bytes); at most ``limit`` bytes are kept, each for at most
    ``ttl`` seconds.
    """

    def __init__(self, limit: int, ttl: float) -> None:
        self._limit, self._ttl = limit, ttl
        self._kept: list[tuple[float, mmap.mmap]] = []  # (when given back, buffer), oldest first
        self.reused = 0  # buffers handed out again (tests, stats)
        self._kept.append((0.0, mmap.mmap(-1, mmap.PAGESIZE)))
        self._alone = self._refs(0)  # the count of a kept buffer nobody else holds (measured:
        self._kept.clear()           # reference counting details differ between Pythons)

    def _refs(self, index: int) -> int:
        return sys.getrefcount(self._kept[index][1])

    def take(self, size: int) -> bytearray | mmap.mmap:
        """A buffer of exactly ``size`` bytes: a kept one that nobody else holds any more (not
        zeroed: every byte is received before anyone reads it), else a new one."""
        for i in range(len(self._kept) - 1, -1, -1):
            if len(self._kept[i][1]) == size and self._refs(i) <= self._alone:
                self.reused += 1
                return self._kept.pop(i)[1]
        return receive_buffer(size)

    def give(self, buf: bytearray | mmap.mmap) -> None:
        """Keep ``buf`` (a memory map) for a later transfer of its size."""
        if not isinstance(buf, mmap.mmap) or len(buf) > self._limit:
            return
        self._kept.append((trio.current_time(), buf))
        while sum(len(b) for _, b in self._kept) > self._limit:
            self._kept.pop(0)

    def sweep(self) -> None:
        """Let go of buffers given back more than ``ttl`` seconds ago."""
        cutoff = trio.current_time() - self._ttl
        self._kept = [(t, b) for t, b in self._kept if t >= cutoff]

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
    A buffer comes back only when nothing else references it once its handler returned -
    not the handler, not a numpy array or tensor over the data, not a memoryview: any of
    those holds a reference to the map, so it is simply left to them. Memory maps only (from
    ``_MAP_FROM`` bytes); at most ``limit`` bytes are kept, each for at most ``ttl`` seconds.
    """

    _UNSHARED = 3  # references to a returned buffer: the caller's, give()'s, getrefcount()'s

    def __init__(self, limit: int, ttl: float) -> None:
        self._limit, self._ttl = limit, ttl
        self._free: list[tuple[float, mmap.mmap]] = []  # (when returned, buffer), oldest first
        self.reused = 0  # buffers handed out again (tests, stats)

    def take(self, size: int) -> bytearray | mmap.mmap:
        """A buffer of exactly ``size`` bytes: a pooled one (not zeroed: every byte is
        received before anyone reads it), else a new one."""
        for i in range(len(self._free) - 1, -1, -1):
            if len(self._free[i][1]) == size:
                self.reused += 1
                return self._free.pop(i)[1]
        return receive_buffer(size)

    def give(self, buf: bytearray | mmap.mmap) -> None:
        """Keep ``buf`` for reuse if it is a map that nobody else references."""
        if not isinstance(buf, mmap.mmap) or len(buf) > self._limit \
                or sys.getrefcount(buf) > self._UNSHARED:
            return
        self._free.append((trio.current_time(), buf))
        while sum(len(b) for _, b in self._free) > self._limit:
            self._free.pop(0)

    def sweep(self) -> None:
        """Drop buffers unused for ``ttl`` seconds."""
        cutoff = trio.current_time() - self._ttl
        self._free = [(t, b) for t, b in self._free if t >= cutoff]

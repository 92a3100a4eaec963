"""Streaming safetensors writes: a checkpoint's file(s) written header-first, tensor by tensor.

``ShardedWriter`` knows every output tensor's dtype and shape up front (from the inputs'
headers, see ``_tensor_reader``), so it writes each file's header first — 8-byte little-endian
length, JSON ``{name: {"dtype", "shape", "data_offsets"}}`` padded to 8 bytes — and then the
tensors (whole, or piece by piece) as they are produced, hashing the bytes on the way (xxh3-128
by default, sha256 on request: ``evolution._checksum`` has the rule); nothing is buffered. Outputs larger than ``max_shard_bytes`` are split into
``model-0000i-of-0000n.safetensors`` with a ``model.safetensors.index.json``, as
``transformers`` writes them.

Example:
    >>> w = ShardedWriter(out_dir, [OutTensor("w", torch.float32, (2,))], 2 * 1024**3)  # doctest: +SKIP
    >>> w.write("w", torch.ones(2)); w.close(); w.digests                 # doctest: +SKIP
    {'model.safetensors': '...'}
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from evolution._checksum import DEFAULT_CHECKSUM, Checksum, new_hash
from evolution._tensor_reader import INDEX_FILE, IO_CHUNK, SINGLE_FILE, dtype_code

__all__ = ["OutTensor", "ShardedWriter"]


@dataclass(frozen=True)
class OutTensor:
    """One tensor the writer will receive: its name, dtype and shape."""

    name: str  # key to write
    dtype: torch.dtype  # dtype it is written in
    shape: tuple[int, ...]  # shape

    @property
    def nbytes(self) -> int:
        """Bytes of data."""
        n = self.dtype.itemsize
        for dim in self.shape:
            n *= dim
        return n


def _shard_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


class ShardedWriter:
    """Write a checkpoint's safetensors file(s) tensor by tensor, header first.

    Tensors must be written in the order given to the constructor, whole (``write``) or as
    consecutive pieces (``append``); the plan splits them into
    consecutive shards of at most ``max_shard_bytes`` (a single larger tensor gets a shard of
    its own). Each file's digest (``checksum``: "xxh3_128" or "sha256") is computed from the
    bytes as they are written.

    Attributes:
        files: output file name -> its tensors, in write order.
        checksum: the digest algorithm.
        digests: output file name -> hex digest, filled in as each file is completed.

    Example:
        >>> w = ShardedWriter(out, [OutTensor("w", torch.float32, (2,))])   # doctest: +SKIP
        >>> w.write("w", torch.ones(2)); w.close()                         # doctest: +SKIP
    """

    def __init__(
        self,
        out_dir: Path,
        tensors: Sequence[OutTensor],
        max_shard_bytes: int,
        checksum: Checksum = DEFAULT_CHECKSUM,
    ) -> None:
        self.out_dir = out_dir
        self.checksum = checksum
        new_hash(checksum)  # refuses an unknown algorithm before anything is written
        shards: list[list[OutTensor]] = [[]]
        size = 0
        for tensor in tensors:
            if shards[-1] and size + tensor.nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(tensor)
            size += tensor.nbytes
        self.files: dict[str, list[OutTensor]] = dict(zip(_shard_names(len(shards)), shards))
        self.digests: dict[str, str] = {}
        self.total_bytes = sum(t.nbytes for t in tensors)
        self.bytes_written = 0
        self._queue = [(file, t) for file, shard in self.files.items() for t in shard]
        self._next = 0  # index in _queue of the tensor being written
        self._partial = 0  # bytes of that tensor written so far
        self._fd: int | None = None
        self._hash: Any = None  # the running digest of the open file
        self._file: str | None = None

    @property
    def weight_map(self) -> dict[str, str]:
        """Tensor name -> file holding it."""
        return {t.name: file for file, shard in self.files.items() for t in shard}

    def _start(self, file: str) -> None:
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for tensor in self.files[file]:
            header[tensor.name] = {
                "dtype": dtype_code(tensor.dtype),
                "shape": list(tensor.shape),
                "data_offsets": [offset, offset + tensor.nbytes],
            }
            offset += tensor.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # pad so tensor data starts 8-byte aligned
        self._fd = os.open(self.out_dir / file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._hash = new_hash(self.checksum)
        self._file = file
        self._put(memoryview(struct.pack("<Q", len(raw)) + raw))

    def _put(self, data: memoryview) -> None:
        assert self._fd is not None and self._hash is not None
        self._hash.update(data)
        done = 0
        while done < len(data):
            done += os.write(self._fd, data[done : done + IO_CHUNK])

    def _finish(self) -> None:
        assert self._fd is not None and self._hash is not None and self._file is not None
        os.close(self._fd)
        self.digests[self._file] = self._hash.hexdigest()
        self._fd = self._hash = self._file = None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next whole tensor (in plan order) to its file.

        Raises:
            ValueError: ``name``, dtype or shape differ from the plan (a bug in the caller).
        """
        planned = self._planned(name, tensor.dtype)
        if tuple(tensor.shape) != planned.shape or self._partial:
            raise ValueError(
                f"writer expected tensor {name!r} of shape {planned.shape} in one piece, got "
                f"shape {tuple(tensor.shape)}"
            )
        self.append(name, tensor)

    def append(self, name: str, piece: torch.Tensor) -> None:
        """Append the next piece of tensor ``name``: consecutive elements, in order.

        The writer moves on to the next planned tensor once the pieces add up to the whole.

        Raises:
            ValueError: wrong tensor, dtype, or more bytes than the tensor has.
        """
        file, planned = self._queue[self._next] if self._next < len(self._queue) else (None, None)
        self._planned(name, piece.dtype)
        assert file is not None and planned is not None
        if self._file != file:
            if self._file is not None:
                self._finish()
            self._start(file)
        nbytes = piece.numel() * piece.dtype.itemsize
        if self._partial + nbytes > planned.nbytes:
            raise ValueError(f"{nbytes} more bytes overflow tensor {name!r} ({planned.nbytes})")
        if nbytes:
            flat = piece.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
            self._put(flat.numpy().data)
        self._partial += nbytes
        self.bytes_written += nbytes
        if self._partial == planned.nbytes:
            self._partial = 0
            self._next += 1
            if self._next == len(self._queue) or self._queue[self._next][0] != file:
                self._finish()

    def _planned(self, name: str, dtype: torch.dtype) -> OutTensor:
        if self._next >= len(self._queue):
            raise ValueError(f"tensor {name!r} written after the last planned tensor")
        planned = self._queue[self._next][1]
        if (name, dtype) != (planned.name, planned.dtype):
            raise ValueError(
                f"writer expected tensor {planned.name!r} {planned.dtype}, got {name!r} {dtype}"
            )
        return planned

    def close(self) -> None:
        """Finish the files and write the shard index when there are several shards.

        Raises:
            ValueError: some planned tensors were never written.
        """
        if self._next != len(self._queue):
            missing = [t.name for _, t in self._queue[self._next :]]
            raise ValueError(f"{len(missing)} planned tensors were not written: {missing[:5]}")
        if len(self.files) > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": self.weight_map}
            (self.out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True))

    def abort(self) -> None:
        """Close any open file (the caller removes the partial output)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = self._hash = self._file = None

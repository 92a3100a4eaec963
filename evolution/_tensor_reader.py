"""Streaming safetensors reads: index a checkpoint, read one tensor (or part of one) at a time.

A safetensors file is an 8-byte little-endian header length, a JSON header
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`` and the raw
little-endian tensor bytes, ``data_offsets`` counting from the end of the header.
``SafetensorsReader`` works on that layout directly, so memory stays at one tensor (or a piece
of one): it indexes a checkpoint directory (``model.safetensors``, or the shards of
``model.safetensors.index.json``, or every ``*.safetensors``); ``read(name)`` ``pread``s exactly
one tensor into a fresh (or a given) buffer, and ``read_into`` reads a tensor or a run of its
elements into a float32 buffer, casting through a small staging buffer.

The streaming merge reads through ``view`` instead: a tensor of the stored dtype over a private
(copy-on-write) memory map of the file, so float32 inputs are used where the page cache holds
them, with no copy at all. ``release`` drops a finished piece's pages from the mapping
(``madvise(MADV_DONTNEED)``) and ``prefetch`` asks for the next piece's (``MADV_WILLNEED``), so
the process keeps about one piece per input resident. (``safetensors.safe_open`` maps the
file too but never lets go: every page touched stays in the process RSS until the file is
closed, 1.5 GB for three 500 MB models — reclaimable, but alarming to memory monitors such as
Ray's.) A mapped file that shrinks under a running merge would fault (SIGBUS), so ``view``
checks the file's size first and refuses a truncated file with ``MergeError``. The writer side
is ``_tensor_writer.ShardedWriter``.

Example:
    >>> with SafetensorsReader.open("/models/a") as ckpt:                 # doctest: +SKIP
    ...     ckpt.read("model.norm.weight").shape
    torch.Size([576])
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import torch
from typing_extensions import Self

from evolution._exceptions import MergeError

__all__ = [
    "DTYPES",
    "INDEX_FILE",
    "IO_CHUNK",
    "SINGLE_FILE",
    "SafetensorsReader",
    "TensorEntry",
    "dtype_code",
]

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_MAX_HEADER_BYTES = 100 * 1024**2  # a larger header means a corrupt file
IO_CHUNK = 1 << 30  # one read()/write() call moves at most 1 GiB (Linux caps a call near 2 GiB)

# safetensors dtype code -> torch dtype
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip
_CODES = {dtype: code for code, dtype in DTYPES.items()}


def dtype_code(dtype: torch.dtype) -> str:
    """The safetensors code of a torch dtype (``torch.bfloat16`` -> ``"BF16"``)."""
    return _CODES[dtype]


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a checkpoint as its safetensors header describes it."""

    name: str  # key in the file ("model.layers.0.mlp.up_proj.weight")
    file: str  # file name inside the checkpoint directory
    dtype: torch.dtype  # stored dtype
    shape: tuple[int, ...]  # tensor shape
    offset: int  # absolute byte offset of the data in ``file``
    nbytes: int  # bytes of data


def _read_header(file: Path) -> tuple[dict[str, dict[str, object]], int]:
    """The header of a safetensors file (without ``__metadata__``) and where its data starts."""
    try:
        with file.open("rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            if length > _MAX_HEADER_BYTES:
                raise ValueError(f"header length {length} is implausible")
            header: dict[str, dict[str, object]] = json.loads(fh.read(length))
    except (OSError, ValueError, struct.error) as exc:
        raise MergeError(
            f"cannot read the safetensors header of {file}: {exc}; the file is truncated or not "
            "safetensors, re-download or re-save the checkpoint",
            path=str(file),
        ) from exc
    header.pop("__metadata__", None)
    return header, 8 + length


def _weight_files(root: Path) -> list[str]:
    """File names holding the weights of checkpoint directory ``root``."""
    if (root / INDEX_FILE).is_file():
        try:
            weight_map: dict[str, str] = json.loads((root / INDEX_FILE).read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as exc:
            raise MergeError(
                f"cannot read {root / INDEX_FILE}: {exc}; re-save the checkpoint", path=str(root)
            ) from exc
        return sorted(set(weight_map.values()))
    if (root / SINGLE_FILE).is_file():
        return [SINGLE_FILE]
    return sorted(p.name for p in root.glob("*.safetensors"))


class SafetensorsReader:
    """The tensors of one checkpoint directory, read one at a time with ``pread``.

    Attributes:
        root: the checkpoint directory.
        entries: tensor name -> ``TensorEntry``, in file and offset order.
    """

    def __init__(self, root: Path, entries: dict[str, TensorEntry]) -> None:
        self.root = root
        self.entries = entries
        self._fds: dict[str, int] = {}
        self._maps: dict[str, tuple[mmap.mmap, torch.Tensor]] = {}  # file -> (map, its bytes)
        self._sizes: dict[str, int] = {}  # file -> size when indexed

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> SafetensorsReader:
        """Index the safetensors files of a checkpoint directory (no tensor is read).

        Args:
            path: directory with ``model.safetensors``, or shards and their index.

        Returns:
            The reader; close it (or use ``with``) to release the file descriptors.

        Raises:
            MergeError: no safetensors files, a listed shard is missing, or a header is corrupt
                or points past the end of its file; ``path`` names the file.
        """
        root = Path(path)
        files = _weight_files(root)
        if not files:
            raise MergeError(
                f"no safetensors weights in {root}; save the model with "
                "model.save_pretrained(dir) (transformers writes safetensors) or convert it",
                path=str(root),
            )
        entries: list[TensorEntry] = []
        for name in files:
            file = root / name
            if not file.is_file():
                raise MergeError(
                    f"{INDEX_FILE} in {root} lists {name}, which is missing; re-download or "
                    "re-save the checkpoint",
                    path=str(file),
                )
            header, data_start = _read_header(file)
            size = file.stat().st_size
            for key, meta in header.items():
                begin, end = (int(x) for x in meta["data_offsets"])  # type: ignore[attr-defined]
                code = str(meta["dtype"])
                if code not in DTYPES or data_start + end > size or end < begin:
                    raise MergeError(
                        f"tensor {key!r} in {file} has dtype {code} and data offsets "
                        f"[{begin}, {end}] beyond the file's {size - data_start} data bytes; the "
                        "file is truncated or corrupt, re-download or re-save the checkpoint",
                        tensor=key,
                        path=str(file),
                    )
                shape = tuple(int(d) for d in meta["shape"])  # type: ignore[attr-defined]
                entries.append(TensorEntry(key, name, DTYPES[code], shape, data_start + begin,
                                           end - begin))  # fmt: skip
        entries.sort(key=lambda e: (e.file, e.offset))
        reader = cls(root, {e.name: e for e in entries})
        reader._sizes = {name: (root / name).stat().st_size for name in files}
        return reader

    def view(self, name: str, *, check: bool = True) -> torch.Tensor:
        """Tensor ``name``, flattened, in its stored dtype, over a private map of its file.

        Nothing is read until elements are used; pages come from the page cache (or disk) as
        they are touched and stay mapped until ``release``. Writing to the view changes only
        this process's copy (copy-on-write), never the file.

        Args:
            name: tensor key.
            check: first check that the file has not shrunk since it was indexed (one
                ``fstat``; the merge checks once per tensor, not once per piece).

        Raises:
            MergeError: no such tensor, or the file is now shorter than when it was indexed.
        """
        entry = self._entry(name)
        fd = self._fd(entry.file)
        if check and os.fstat(fd).st_size < self._sizes.get(entry.file, 0):
            raise MergeError(
                f"{self.root / entry.file} shrank while it was being merged (tensor "
                f"{entry.name!r}); another process is rewriting the checkpoint — wait for it",
                tensor=entry.name,
                path=str(self.root / entry.file),
            )
        count = math.prod(entry.shape)
        if entry.nbytes == 0:
            return torch.empty(count, dtype=entry.dtype)
        mapped = self._maps.get(entry.file)
        if mapped is None:
            region = mmap.mmap(fd, 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
            with warnings.catch_warnings():  # the map is writable (private): no warning due
                warnings.simplefilter("ignore")
                raw = torch.frombuffer(region, dtype=torch.uint8)
            mapped = self._maps[entry.file] = (region, raw)
        raw = mapped[1][entry.offset : entry.offset + entry.nbytes]
        return raw.view(entry.dtype)

    def _advise(self, name: str, first: int, count: int, advice: int) -> None:
        entry = self._entry(name)
        mapped = self._maps.get(entry.file)
        if mapped is None or count <= 0:
            return
        page = mmap.PAGESIZE
        begin = entry.offset + first * entry.dtype.itemsize
        end = begin + count * entry.dtype.itemsize
        begin -= begin % page  # madvise wants a page-aligned start
        try:
            mapped[0].madvise(advice, begin, end - begin)
        except (OSError, ValueError):  # advice only: a kernel that refuses it changes nothing
            pass

    def release(self, name: str, first: int, count: int) -> None:
        """Drop elements ``first .. first + count`` of ``name`` from this process's memory.

        The pages stay in the page cache; a later ``view`` access maps them again. (Pages
        shared with a neighbouring piece are dropped too and simply fault back in.)
        """
        self._advise(name, first, count, mmap.MADV_DONTNEED)

    def prefetch(self, name: str, first: int, count: int) -> None:
        """Start reading elements ``first .. first + count`` of ``name`` from disk (async)."""
        self._advise(name, first, count, mmap.MADV_WILLNEED)

    def read(self, name: str, buffer: torch.Tensor | None = None) -> torch.Tensor:
        """Read tensor ``name`` from disk into a CPU tensor of its stored dtype.

        Args:
            name: tensor key.
            buffer: a contiguous uint8 tensor of at least the tensor's byte size to read into
                (the result is a view of its start); None allocates a fresh one. Reusing one
                buffer per input spares the page faults of a new allocation for every tensor.

        Raises:
            MergeError: no such tensor, or the file ended early; the message names it.
            ValueError: ``buffer`` is too small or not a contiguous uint8 tensor.
        """
        entry = self._entry(name)
        if buffer is None:
            buffer = torch.empty(entry.nbytes, dtype=torch.uint8)
        elif (
            buffer.dtype != torch.uint8
            or not buffer.is_contiguous()
            or buffer.numel() < entry.nbytes
        ):
            raise ValueError(
                f"read buffer for {name!r} must be contiguous uint8 of >= {entry.nbytes} bytes"
            )
        data = buffer.reshape(-1)[: entry.nbytes]
        self._pread(entry, data, 0)
        return data.view(entry.dtype).reshape(entry.shape)

    def read_into(
        self, name: str, out: torch.Tensor, staging: torch.Tensor, *, first: int = 0
    ) -> torch.Tensor:
        """Read tensor ``name`` (or a run of its elements) into ``out``, casting on the way.

        Elements ``first .. first + out.numel()`` of the flattened tensor are read. A tensor
        stored in ``out``'s dtype is read straight into ``out``; any other is read in pieces of
        ``staging``'s size and each piece cast into ``out``, so no full-size copy in the stored
        dtype is ever held (a bfloat16 tensor needs only its float32 ``out``).

        Args:
            name: tensor key.
            out: contiguous CPU tensor (any shape) receiving ``out.numel()`` elements.
            staging: contiguous uint8 scratch tensor (a few MiB; at least 8 bytes).
            first: flat index of the first element to read.

        Returns:
            ``out`` in the tensor's shape when it received the whole tensor, else ``out``.

        Raises:
            MergeError: no such tensor, or the file ended early.
            ValueError: the run of elements is out of range, or ``out`` is not contiguous.
        """
        entry = self._entry(name)
        numel, count = math.prod(entry.shape), out.numel()
        if not out.is_contiguous() or first < 0 or first + count > numel:
            raise ValueError(
                f"read_into({name!r}) needs a contiguous tensor and elements within 0..{numel}, "
                f"got {first}..{first + count}"
            )
        flat = out.reshape(-1)
        itemsize = entry.dtype.itemsize
        if out.dtype == entry.dtype:
            self._pread(entry, flat.view(torch.uint8), first * itemsize)
        else:
            per_piece = staging.numel() // itemsize  # elements per piece
            for start in range(0, count, per_piece):
                n = min(per_piece, count - start)
                piece = staging[: n * itemsize]
                self._pread(entry, piece, (first + start) * itemsize)
                flat[start : start + n].copy_(piece.view(entry.dtype))
        return out.view(entry.shape) if count == numel else out

    def _entry(self, name: str) -> TensorEntry:
        entry = self.entries.get(name)
        if entry is None:
            raise MergeError(
                f"tensor {name!r} is not in {self.root}", tensor=name, path=str(self.root)
            )
        return entry

    def _fd(self, file: str) -> int:
        fd = self._fds.get(file)
        if fd is None:
            fd = self._fds[file] = os.open(self.root / file, os.O_RDONLY)
        return fd

    def _pread(self, entry: TensorEntry, target: torch.Tensor, skip: int) -> None:
        """Fill uint8 ``target`` with ``entry``'s bytes starting ``skip`` bytes into its data."""
        fd = self._fd(entry.file)
        view = target.numpy().data  # a writable memoryview of the tensor's memory
        size, done = len(view), 0
        while done < size:
            got = os.preadv(fd, [view[done : done + IO_CHUNK]], entry.offset + skip + done)
            if got <= 0:
                raise MergeError(
                    f"{self.root / entry.file} ended inside tensor {entry.name!r}; the file is "
                    "truncated, re-download or re-save the checkpoint",
                    tensor=entry.name,
                    path=str(self.root / entry.file),
                )
            done += got

    def close(self) -> None:
        """Close the open files; a map is unmapped once no tensor views it any more.

        (``mmap.close()`` is never called: ``torch.frombuffer`` does not pin the map, so an
        explicit close would leave live views dangling. Each view holds a reference to its map,
        which unmaps when the last view is freed.)
        """
        self._maps.clear()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

"""Digests of a checkpoint's weight files, and verification against a recorded sha256.

Which hash where (the rule):

* **sha256** wherever a digest is *kept and checked later*: a champion's checkpoint (recorded
  in the run store and verified before a rollback restores it, or before anyone loads it:
  ``verify``), and what ``hive evolve merge`` prints. Cryptographic, so a recorded digest also
  vouches for files that travelled.
* **xxh3-128** (the ``xxhash`` package) for every other merge — ``merge()``'s default
  (``checksum="xxh3_128"``): a 128-bit non-cryptographic digest that catches corruption and
  identifies outputs (equal recipes give equal digests) at memory speed, where sha256 runs at
  ~0.4-0.7 GB/s here and would cap the merge at a quarter of memory bandwidth.
  ``MergeResult.sha256`` still answers for such a merge, by reading the files once more.

Both are computed by the writer thread as the bytes are written, never by a second read.

The digest of a checkpoint directory is the sha256 of its manifest: one line
``<sha256 of file>  <file name>`` per weight file (``*.safetensors`` and
``model.safetensors.index.json``), sorted by name (byte order) — the text ``sha256sum`` prints for those
files, so ``cd CKPT && sha256sum model.safetensors | sha256sum`` reproduces the digest of a
single-file checkpoint (list the shards, then the index, for a sharded one). Config and
tokenizer files are not covered: the digest identifies the weights.

Example:
    >>> digest = sha256_dir("/merges/candidate-17")                      # doctest: +SKIP
    >>> verify("/merges/candidate-17", digest)                          # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import xxhash

from evolution._exceptions import ChecksumError

__all__ = [
    "CHECKSUMS",
    "DEFAULT_CHECKSUM",
    "Checksum",
    "digest_file",
    "file_digests",
    "manifest_digest",
    "new_hash",
    "sha256_dir",
    "sha256_file",
    "verify",
]

Checksum = Literal["xxh3_128", "sha256"]
CHECKSUMS: tuple[Checksum, ...] = ("xxh3_128", "sha256")
DEFAULT_CHECKSUM: Checksum = "xxh3_128"  # what merge() computes unless told otherwise

_CHUNK = 16 * 1024**2  # bytes hashed per read
_INDEX_FILE = "model.safetensors.index.json"


def new_hash(checksum: str) -> Any:
    """A fresh hash object for ``checksum`` ("xxh3_128" or "sha256").

    Raises:
        ValueError: another name; the message lists the known ones.
    """
    if checksum == "sha256":
        return hashlib.sha256()
    if checksum == "xxh3_128":
        return xxhash.xxh3_128()
    raise ValueError(f"unknown checksum {checksum!r}; use one of {list(CHECKSUMS)}")


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of one file, read in 16 MiB chunks.

    Example:
        >>> sha256_file("/merges/c17/model.safetensors")                  # doctest: +SKIP
        '9f86d08...'
    """
    return digest_file(path, "sha256")


def digest_file(path: str | os.PathLike[str], checksum: str) -> str:
    """Hex ``checksum`` ("sha256" / "xxh3_128") of one file, read in 16 MiB chunks."""
    digest = new_hash(checksum)
    with open(path, "rb", buffering=0) as fh:
        buffer = bytearray(_CHUNK)
        view = memoryview(buffer)
        while got := fh.readinto(view):
            digest.update(view[:got])
    return str(digest.hexdigest())


def _weight_files(root: Path) -> list[Path]:
    files = sorted(root.glob("*.safetensors"))
    if (root / _INDEX_FILE).is_file():
        files.append(root / _INDEX_FILE)
    return sorted(files, key=lambda p: p.name)


def file_digests(path: str | os.PathLike[str]) -> dict[str, str]:
    """Weight file name -> hex sha256 for a checkpoint directory."""
    return {p.name: sha256_file(p) for p in _weight_files(Path(path))}


def manifest_digest(digests: Mapping[str, str], checksum: str = "sha256") -> str:
    """The checkpoint digest from per-file digests (the ``checksum`` of the manifest).

    For sha256 that is the sha256 of the ``sha256sum`` manifest (see the module docstring);
    xxh3-128 digests are combined the same way with xxh3-128.

    Example:
        >>> len(manifest_digest({"model.safetensors": "0" * 64}))
        64
    """
    manifest = "".join(f"{digests[name]}  {name}\n" for name in sorted(digests))
    digest = new_hash(checksum)
    digest.update(manifest.encode())
    return str(digest.hexdigest())


def sha256_dir(path: str | os.PathLike[str]) -> str:
    """The sha256 digest of a checkpoint directory's weight files (see the module docstring).

    Args:
        path: checkpoint directory.

    Returns:
        64 hex characters.

    Raises:
        ChecksumError: the directory holds no safetensors files.

    Example:
        >>> sha256_dir("/merges/candidate-17")                            # doctest: +SKIP
        '3b0c44...'
    """
    digests = file_digests(path)
    if not any(name.endswith(".safetensors") for name in digests):
        raise ChecksumError(
            f"no safetensors files in {path} to checksum; pass the checkpoint directory",
            path=str(path),
        )
    return manifest_digest(digests)


def verify(path: str | os.PathLike[str], expected: str) -> None:
    """Check that a checkpoint's weights have the recorded digest.

    Args:
        path: checkpoint directory.
        expected: digest recorded when it was written (``MergeResult.sha256``).

    Raises:
        ChecksumError: the digests differ (``expected`` and ``actual`` attributes) or there are
            no weights; the checkpoint must not be used.

    Example:
        >>> verify("/merges/candidate-17", result.sha256)                 # doctest: +SKIP
    """
    actual = sha256_dir(path)
    if actual != expected.lower():
        raise ChecksumError(
            f"checkpoint {path} has sha256 {actual} but {expected} was recorded; its weight "
            "files changed or are corrupt — re-run the merge (or re-copy the checkpoint)",
            path=str(path),
            expected=expected,
            actual=actual,
        )

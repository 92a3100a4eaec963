"""safetensors bytes in and out of the tensor stream (numpy always; torch when installed).

The stream carries a safetensors file as opaque bytes; this module turns tensors into those
bytes, reads the safetensors header (8-byte little-endian length + JSON) into
:class:`~p2p._messages.TensorInfo` for the transfer header, and loads the bytes back.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from p2p._exceptions import ProtocolError
from p2p._messages import TensorInfo

__all__ = ["describe", "load_numpy", "load_torch", "to_safetensors"]

_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header


def to_safetensors(tensors: Mapping[str, Any] | bytes | bytearray | memoryview,
                   metadata: Mapping[str, str] | None = None) -> bytes:
    """safetensors bytes for ``tensors`` (numpy arrays or torch tensors), or ``tensors``
    itself when it already is safetensors bytes (then ``metadata`` must be ``None``).

    Raises:
        ValueError: mixed numpy/torch values, or metadata given with raw bytes.
    """
    if isinstance(tensors, (bytes, bytearray, memoryview)):
        if metadata:
            raise ValueError("metadata goes inside the safetensors bytes; pass it to save()")
        return bytes(tensors)
    values = list(tensors.values())
    is_torch = [type(v).__module__.split(".")[0] == "torch" for v in values]
    if any(is_torch) and not all(is_torch):
        raise ValueError("send either numpy arrays or torch tensors, not a mix")
    meta = dict(metadata) if metadata else None
    if values and all(is_torch):
        from safetensors.torch import save as save_torch

        return save_torch(dict(tensors), metadata=meta)
    from safetensors.numpy import save as save_numpy

    return save_numpy(dict(tensors), metadata=meta)


def describe(data: bytes | memoryview) -> tuple[tuple[TensorInfo, ...], dict[str, str]]:
    """The tensors (name, dtype, shape) and metadata a safetensors blob declares.

    Raises:
        ProtocolError: ``data`` is not a well-formed safetensors blob.
    """
    view = memoryview(data)
    if len(view) < 8:
        raise ProtocolError("not safetensors: shorter than its 8-byte header length")
    (size,) = struct.unpack("<Q", view[:8])
    if size > min(_MAX_HEADER, len(view) - 8):
        raise ProtocolError(f"not safetensors: header length {size} exceeds the data")
    try:
        header = json.loads(bytes(view[8:8 + size]))
        metadata = header.pop("__metadata__", None) or {}
        infos = tuple(TensorInfo(name=name, dtype=spec["dtype"], shape=tuple(spec["shape"]))
                      for name, spec in sorted(header.items()))
    except (ValueError, TypeError, KeyError, AttributeError, ValidationError) as err:
        raise ProtocolError(f"not safetensors: bad header ({err})") from err
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ProtocolError("not safetensors: __metadata__ must map strings to strings")
    return infos, metadata


def load_numpy(data: bytes) -> dict[str, Any]:
    """``{name: numpy.ndarray}`` from safetensors bytes."""
    from safetensors.numpy import load

    return load(data)


def load_torch(data: bytes) -> dict[str, Any]:
    """``{name: torch.Tensor}`` from safetensors bytes (needs torch)."""
    from safetensors.torch import load

    return load(data)

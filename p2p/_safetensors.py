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


def describe(data: bytes | bytearray | memoryview) -> tuple[tuple[TensorInfo, ...], dict[str, str]]:
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


def _entries(data: bytes | bytearray | memoryview) -> tuple[int, dict[str, Any]]:
    """(offset of the data section, the header's tensor entries) of a safetensors blob
    (``describe`` has checked its shape when it came over the tensor stream)."""
    describe(data)
    view = memoryview(data)
    (size,) = struct.unpack("<Q", view[:8])
    header = json.loads(bytes(view[8:8 + size]))
    header.pop("__metadata__", None)
    return 8 + size, header


# safetensors dtype -> numpy dtype name (bfloat16 and the float8s have none in numpy)
_NUMPY = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
          "I8": "i1", "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?"}


def load_numpy(data: bytes | bytearray | memoryview) -> dict[str, Any]:
    """``{name: numpy.ndarray}`` over safetensors ``data`` (no copy).

    Raises:
        ProtocolError: a tensor's dtype has no numpy equivalent (bfloat16, float8: use
            ``load_torch``), or the blob is malformed.
    """
    import numpy as np

    start, entries = _entries(data)
    out = {}
    for name, spec in entries.items():
        dtype = _NUMPY.get(spec["dtype"])
        if dtype is None:
            raise ProtocolError(f"tensor {name!r} is {spec['dtype']}, which numpy cannot hold; "
                                "load it with .torch()")
        first, end = spec["data_offsets"]
        count = (end - first) // np.dtype(dtype).itemsize
        out[name] = np.frombuffer(data, dtype=dtype, count=count,
                                  offset=start + first).reshape(spec["shape"])
    return out


def load_torch(data: bytes | bytearray | memoryview) -> dict[str, Any]:
    """``{name: torch.Tensor}`` over safetensors ``data`` (no copy; needs torch)."""
    import warnings

    import torch

    dtypes = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
              "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
              "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
              "U16": getattr(torch, "uint16", None), "U32": getattr(torch, "uint32", None),
              "U64": getattr(torch, "uint64", None),
              "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
              "F8_E5M2": getattr(torch, "float8_e5m2", None)}
    start, entries = _entries(data)
    out = {}
    with warnings.catch_warnings():  # bytes are read-only: torch warns, the tensors are fine
        warnings.simplefilter("ignore", UserWarning)
        for name, spec in entries.items():
            dtype = dtypes.get(spec["dtype"])
            if dtype is None:
                raise ProtocolError(f"tensor {name!r} is {spec['dtype']}, which this torch "
                                    "cannot hold")
            first, end = spec["data_offsets"]
            if end == first:
                out[name] = torch.empty(spec["shape"], dtype=dtype)
                continue
            count = (end - first) // dtype.itemsize
            out[name] = torch.frombuffer(data, dtype=dtype, count=count,
                                         offset=start + first).reshape(spec["shape"])
    return out

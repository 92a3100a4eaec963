"""safetensors bytes in and out of the tensor stream (numpy always; torch when installed).

The stream carries a safetensors file as opaque bytes; this module turns tensors into those
bytes, reads the safetensors header (8-byte little-endian length + JSON) into
:class:`~p2p._messages.TensorInfo` for the transfer header, and loads the bytes back.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator, Mapping
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


def _header(data: bytes | bytearray | memoryview) -> tuple[int, dict[str, Any]]:
    """(offset of the data section, the parsed JSON header) of a safetensors blob.

    Raises:
        ProtocolError: no 8-byte length, a length past the data, or a header that is not a
            JSON object.
    """
    view = memoryview(data)
    if len(view) < 8:
        raise ProtocolError("not safetensors: shorter than its 8-byte header length")
    (size,) = struct.unpack("<Q", view[:8])
    if size > min(_MAX_HEADER, len(view) - 8):
        raise ProtocolError(f"not safetensors: header length {size} exceeds the data")
    try:
        header = json.loads(bytes(view[8:8 + size]))
    except ValueError as err:
        raise ProtocolError(f"not safetensors: bad header ({err})") from err
    if not isinstance(header, dict):
        raise ProtocolError("not safetensors: the header is not a JSON object")
    return 8 + size, header


def describe(data: bytes | bytearray | memoryview) -> tuple[tuple[TensorInfo, ...], dict[str, str]]:
    """The tensors (name, dtype, shape) and metadata a safetensors blob declares.

    Raises:
        ProtocolError: ``data`` is not a well-formed safetensors blob.
    """
    _, header = _header(data)
    try:
        metadata = header.pop("__metadata__", None) or {}
        infos = tuple(TensorInfo(name=name, dtype=spec["dtype"], shape=tuple(spec["shape"]))
                      for name, spec in sorted(header.items()))
    except (ValueError, TypeError, KeyError, AttributeError, ValidationError) as err:
        raise ProtocolError(f"not safetensors: bad header ({err})") from err
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ProtocolError("not safetensors: __metadata__ must map strings to strings")
    return infos, metadata


def _tensors(data: bytes | bytearray | memoryview) -> Iterator[tuple[str, str, list[int], int, int]]:
    """(name, safetensors dtype, shape, absolute byte offset, byte length) per tensor."""
    start, header = _header(data)
    header.pop("__metadata__", None)
    try:
        for name, spec in header.items():
            first, end = spec["data_offsets"]
            yield name, spec["dtype"], list(spec["shape"]), start + first, end - first
    except (TypeError, KeyError, ValueError) as err:
        raise ProtocolError(f"not safetensors: bad header ({err})") from err


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

    out = {}
    for name, code, shape, offset, nbytes in _tensors(data):
        dtype = _NUMPY.get(code)
        if dtype is None:
            raise ProtocolError(f"tensor {name!r} is {code}, which numpy cannot hold; "
                                "load it with .torch()")
        out[name] = np.frombuffer(data, dtype=dtype, count=nbytes // np.dtype(dtype).itemsize,
                                  offset=offset).reshape(shape)
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
    out = {}
    with warnings.catch_warnings():  # bytes are read-only: torch warns, the tensors are fine
        warnings.simplefilter("ignore", UserWarning)
        for name, code, shape, offset, nbytes in _tensors(data):
            dtype = dtypes.get(code)
            if dtype is None:
                raise ProtocolError(f"tensor {name!r} is {code}, which this torch cannot hold")
            out[name] = (torch.frombuffer(data, dtype=dtype, count=nbytes // dtype.itemsize,
                                          offset=offset).reshape(shape)
                         if nbytes else torch.empty(shape, dtype=dtype))
    return out

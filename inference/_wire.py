"""Tensors across Ray calls as numpy arrays: pickling a small torch tensor costs ~300 µs here,
a numpy array ~30 µs (Ray also hands numpy buffers over without a copy). bfloat16, which numpy
lacks, travels as its int16 bit pattern with a tag."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["from_wire", "to_wire"]

_BF16 = "bf16"


def to_wire(t: torch.Tensor) -> Any:
    """A CPU numpy view of ``t`` (or ``("bf16", int16 array)`` for bfloat16).

    Example:
        >>> from_wire(to_wire(torch.ones(2, dtype=torch.bfloat16))).dtype
        torch.bfloat16
    """
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.dtype == torch.bfloat16:
        return (_BF16, t.view(torch.int16).numpy())
    return t.numpy()


def from_wire(x: Any) -> torch.Tensor:
    """The tensor ``to_wire`` encoded (tensors pass through unchanged)."""
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, tuple) and len(x) == 2 and x[0] == _BF16:
        return torch.from_numpy(np.array(x[1])).view(torch.bfloat16)
    arr = np.asarray(x)
    if not arr.flags.writeable:  # Ray hands out read-only zero-copy buffers; torch wants writable
        arr = arr.copy()
    return torch.from_numpy(arr)

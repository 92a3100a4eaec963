"""Small trio helpers shared by the protocol modules."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

import trio

if sys.version_info < (3, 11):  # trio depends on the backport there
    from exceptiongroup import BaseExceptionGroup

__all__ = ["close_quietly", "collapse_groups"]


async def close_quietly(stream: object, *, reset: bool) -> None:
    """Close (or reset) ``stream`` ignoring errors, even while being cancelled (2 s max)."""
    if stream is None:
        return
    with trio.CancelScope(shield=True), trio.move_on_after(2):
        try:
            await (stream.reset() if reset else stream.close())  # type: ignore[attr-defined]
        except Exception:  # noqa: BLE001, S110 - best effort: the stream may be gone
            pass


@contextmanager
def collapse_groups() -> Iterator[None]:
    """Re-raise a nursery's exception group as its one real error.

    trio wraps whatever escapes a nursery in an ``ExceptionGroup``; callers of this package
    expect ``ProtocolError``, ``ChecksumError``... When the group holds one exception besides
    cancellations, that exception is raised instead; otherwise the group is left alone.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        real = [e for e in _leaves(group) if not isinstance(e, trio.Cancelled)]
        if len(real) == 1:
            raise real[0] from group
        raise


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out

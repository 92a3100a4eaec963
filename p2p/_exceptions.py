"""Errors raised by the p2p package (which imports nothing else of ours).

Subclasses carry context as attributes (``peer_id``, ``address``) and survive pickling.

Tree::

    P2PError
    ├── IdentityError         site key missing, unreadable, or would be overwritten
    ├── PeerNotAllowedError   a peer not on the site allowlist
    └── ProtocolError         a malformed or oversized frame
"""

from __future__ import annotations

from typing import Any

__all__ = ["IdentityError", "P2PError", "PeerNotAllowedError", "ProtocolError"]


def _rebuild(cls: type[P2PError], message: str, context: dict[str, Any]) -> P2PError:
    err = cls.__new__(cls)
    P2PError.__init__(err, message, **context)
    return err


class P2PError(Exception):
    """Base of every p2p error. ``context`` keys become attributes."""

    def __init__(self, message: str, **context: Any) -> None:
        super().__init__(message)
        self.message = message
        self.context = context
        for key, value in context.items():
            setattr(self, key, value)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.message, self.context))


class IdentityError(P2PError):
    """The site identity cannot be created or read."""


class PeerNotAllowedError(P2PError):
    """The peer is not on the allowlist; ``peer_id`` names it."""


class ProtocolError(P2PError):
    """A frame broke the protocol; ``peer_id`` names the sender."""

"""Errors raised by the p2p package (which imports nothing else of ours).

Subclasses carry context as attributes (``peer_id``, ``address``, ``path``...) and survive
pickling, so they cross Ray process boundaries intact.

Tree::

    P2PError
    ├── IdentityError         site key missing, unreadable, badly protected, or would be overwritten
    ├── PeerNotAllowedError   a peer not on the site allowlist
    ├── DialError             no secured connection to a peer could be opened
    │   └── PeerIdMismatchError   the peer answering at an address is not the one expected
    ├── ProtocolError         a malformed, truncated or oversized frame
    │   ├── FrameTooLargeError    a length prefix above the limit (rejected before allocation)
    │   └── ChecksumError         a tensor chunk kept failing its checksum
    ├── StreamResetError      the peer reset the stream, or the connection under it broke
    ├── RemoteError           the remote handler failed; ``remote_type`` names its exception
    ├── P2PTimeoutError       an operation ran out of time (also a ``TimeoutError``)
    └── NodeClosedError       the node is not running (not started, or closed)
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ChecksumError",
    "DialError",
    "FrameTooLargeError",
    "IdentityError",
    "NodeClosedError",
    "P2PError",
    "P2PTimeoutError",
    "PeerIdMismatchError",
    "PeerNotAllowedError",
    "ProtocolError",
    "RemoteError",
    "StreamResetError",
]


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

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.message, self.context))


class IdentityError(P2PError):
    """The site identity cannot be created or read; ``path`` names the file."""


class PeerNotAllowedError(P2PError):
    """The peer is not on the allowlist; ``peer_id`` names it."""


class DialError(P2PError):
    """No secured connection could be opened; ``peer_id`` and ``address`` name the target."""


class PeerIdMismatchError(DialError):
    """The Noise handshake authenticated another peer than the address names.

    ``expected_peer_id`` (from ``/p2p/<id>`` in the address), ``actual_peer_id`` (the key the
    remote proved it holds) and ``address`` are attributes. Never retried.
    """


class ProtocolError(P2PError):
    """A frame broke the protocol; ``peer_id`` names the sender."""


class FrameTooLargeError(ProtocolError):
    """A length prefix exceeded the limit; ``size`` and ``limit`` are attributes."""


class ChecksumError(ProtocolError):
    """A tensor chunk failed its checksum more often than allowed; ``chunk`` names it."""


class StreamResetError(P2PError):
    """The stream was reset by the peer (or its connection broke); ``peer_id`` names it."""


class RemoteError(P2PError):
    """The remote handler raised; ``peer_id``, ``method`` and ``remote_type`` are attributes."""


class P2PTimeoutError(P2PError, TimeoutError):
    """An operation ran out of time; ``timeout`` (seconds) is an attribute."""


class NodeClosedError(P2PError):
    """The node is not running: call ``Node.start()`` first, or it was closed."""

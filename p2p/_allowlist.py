"""The site allowlist: which peer ids may hold a connection or open a stream to this node.

The check runs at the first step where the remote's identity is known: right after the Noise
handshake (see ``p2p/_security.py``) for connections, and again when a stream arrives (the
list may have shrunk since the connection was made). Every refusal is recorded as a
:class:`DeniedEvent` and handed to the callbacks registered with :meth:`Allowlist.on_denied`.

Thread-safe: the node's trio thread reads it while user threads change it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Literal

from libp2p.peer.id import ID
from multiaddr import Multiaddr
from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = ["Allowlist", "DeniedEvent", "SitePeer"]

logger = logging.getLogger(__name__)


class SitePeer(BaseModel):
    """One remote site on the allowlist (read from config files, so validated).

    Attributes:
        peer_id: the site's libp2p peer id (``12D3KooW...``).
        site: a human name for logs and events.
        addrs: multiaddrs it listens on (``/ip4/10.0.0.2/tcp/4001``), without ``/p2p/``.

    Example:
        >>> SitePeer(peer_id="12D3KooWB5THaBtCtbbFiT8LtzpCJVrAQ1Kw35wWs4FvEspGRhiz",
        ...          site="lab", addrs=("/ip4/127.0.0.1/tcp/4001",)).site
        'lab'
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    peer_id: str
    site: str = ""
    addrs: tuple[str, ...] = ()

    @field_validator("peer_id")
    @classmethod
    def _valid_peer_id(cls, value: str) -> str:
        try:
            return ID.from_base58(value).to_base58()
        except Exception as err:
            raise ValueError(f"not a libp2p peer id: {value!r}") from err

    @field_validator("addrs")
    @classmethod
    def _valid_addrs(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for addr in value:
            Multiaddr(addr)  # raises on a malformed address
        return value


class DeniedEvent(BaseModel):
    """A refused peer: who, from where, at which step.

    Attributes:
        peer_id: the refused peer id (authenticated by Noise for ``stage="handshake"``).
        address: the remote address (multiaddr or ``host:port``), when known.
        direction: ``"inbound"`` (it called us) or ``"outbound"`` (we were asked to call it).
        stage: ``"handshake"`` (connection closed right after Noise), ``"stream"`` (stream
            reset), ``"dial"`` (we refused to dial it) or ``"gossip"`` (a message it published
            reached us through another peer and was dropped).
        protocol: the stream's protocol id (``stage="stream"``) or topic (``"gossip"``).
        at: wall-clock time (``time.time()``).
    """

    model_config = ConfigDict(frozen=True)

    peer_id: str
    address: str | None = None
    direction: Literal["inbound", "outbound"]
    stage: Literal["handshake", "stream", "dial", "gossip"]
    protocol: str | None = None
    at: float = Field(default_factory=time.time)


DeniedCallback = Callable[[DeniedEvent], None]


class Allowlist:
    """The peer ids this site talks to, plus a record of who was refused.

    Args:
        peers: the initial allowed peers.
        history: how many :class:`DeniedEvent` to keep (oldest dropped first).

    Example:
        >>> allow = Allowlist([SitePeer(peer_id="12D3KooWB5THaBtCtbbFiT8LtzpCJVrAQ1Kw35wWs4FvEspGRhiz")])
        >>> allow.allows("12D3KooWB5THaBtCtbbFiT8LtzpCJVrAQ1Kw35wWs4FvEspGRhiz")
        True
    """

    def __init__(self, peers: Iterable[SitePeer] = (), history: int = 1000) -> None:
        self._lock = threading.Lock()
        self._peers: dict[str, SitePeer] = {p.peer_id: p for p in peers}
        self._denied: deque[DeniedEvent] = deque(maxlen=history)
        self._callbacks: list[DeniedCallback] = []

    def allows(self, peer_id: str | ID) -> bool:
        """Whether ``peer_id`` may connect and open streams."""
        key = peer_id.to_base58() if isinstance(peer_id, ID) else peer_id
        with self._lock:
            return key in self._peers

    def get(self, peer_id: str) -> SitePeer | None:
        """The entry for ``peer_id``, or ``None``."""
        with self._lock:
            return self._peers.get(peer_id)

    def add(self, peer: SitePeer) -> None:
        """Allow ``peer`` (replacing an entry with the same peer id)."""
        with self._lock:
            self._peers[peer.peer_id] = peer

    def remove(self, peer_id: str) -> SitePeer | None:
        """Stop allowing ``peer_id``; returns the removed entry. Open connections are the
        caller's to close (``Node.disallow`` does)."""
        with self._lock:
            return self._peers.pop(peer_id, None)

    def peers(self) -> list[SitePeer]:
        """The allowed peers, sorted by peer id."""
        with self._lock:
            return sorted(self._peers.values(), key=lambda p: p.peer_id)

    def on_denied(self, callback: DeniedCallback) -> None:
        """Call ``callback(event)`` on every refusal (from the node's network thread: keep it
        quick and thread-safe)."""
        with self._lock:
            self._callbacks.append(callback)

    def denied(self) -> list[DeniedEvent]:
        """The recorded refusals, oldest first."""
        with self._lock:
            return list(self._denied)

    def record_denied(self, event: DeniedEvent) -> None:
        """Record a refusal and notify the callbacks (a failing callback is logged, not raised)."""
        with self._lock:
            self._denied.append(event)
            callbacks = list(self._callbacks)
        logger.warning("refused peer %s (%s, %s) from %s", event.peer_id, event.direction,
                       event.stage, event.address)
        for callback in callbacks:
            try:
                callback(event)
            except Exception:  # a buggy observer must not open the gate or crash the host
                logger.exception("allowlist on_denied callback failed")

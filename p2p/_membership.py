"""The membership view: every known site's link state, RTT and the history of changes.

States of a member (a peer this node has been connected to, or keeps a link to)::

    connected     link up, pings answered at a normal RTT
    degraded      link up but pings are missed or the RTT is far above its baseline;
                  also "link just lost, redialing" until the first redial fails
    unreachable   link down and redials failing (a partition, from this node's view)

Every change is a :class:`MembershipEvent` (kept in a bounded history and handed to the
callbacks registered with :meth:`Membership.on_change`). ``kind`` names what the change
means: ``"joined"`` (first seen), ``"degraded"``, ``"recovered"`` (degraded -> connected),
``"partitioned"`` (-> unreachable), ``"healed"`` (unreachable -> connected) and
``"disconnected"`` (-> unreachable because this node closed the link: ``Node.disconnect``).

Thread-safe: the network thread writes, user threads read.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Literal

from pydantic import BaseModel, ConfigDict

__all__ = ["Member", "MemberState", "Membership", "MembershipCallback", "MembershipEvent"]

logger = logging.getLogger(__name__)

MemberState = Literal["connected", "degraded", "unreachable"]
EventKind = Literal["joined", "degraded", "recovered", "partitioned", "healed", "disconnected"]
_EWMA = 0.2  # weight of a new healthy RTT sample in the baseline


class Member(BaseModel):
    """One site as this node sees it.

    Attributes:
        peer_id: the site's peer id. site: its name from the allowlist ("" if none).
        state: ``"connected"``, ``"degraded"`` or ``"unreachable"``.
        rtt_ms: the last measured ping round trip in milliseconds (``None`` before one).
        baseline_ms: the smoothed RTT of healthy pings (what "far above" is measured from).
        last_seen: wall-clock time (``time.time()``) of the last answered ping or connection.
        addrs: the multiaddrs this node redials it at.
    """

    model_config = ConfigDict(frozen=True)

    peer_id: str
    site: str = ""
    state: MemberState
    rtt_ms: float | None = None
    baseline_ms: float | None = None
    last_seen: float | None = None
    addrs: tuple[str, ...] = ()


class MembershipEvent(BaseModel):
    """A member changed state.

    Attributes:
        peer_id: the member. old: its previous state (``None`` when first seen). new: now.
        kind: what it means (``joined``, ``degraded``, ``recovered``, ``partitioned``,
            ``healed``, ``disconnected``). at: wall-clock time. reason: why, in words.
    """

    model_config = ConfigDict(frozen=True)

    peer_id: str
    old: MemberState | None
    new: MemberState
    kind: EventKind
    at: float
    reason: str

    @property
    def partition(self) -> bool:
        """True when the peer became unreachable (a partition from this node's view)."""
        return self.kind == "partitioned"

    @property
    def healed(self) -> bool:
        """True when an unreachable peer is connected again."""
        return self.kind == "healed"


MembershipCallback = Callable[[MembershipEvent], None]


def _kind(old: MemberState | None, new: MemberState) -> EventKind:
    if new == "unreachable":
        return "partitioned"
    if old is None:
        return "joined"
    if new == "degraded":
        return "degraded"
    return "healed" if old == "unreachable" else "recovered"


class _Entry:
    __slots__ = ("addrs", "baseline", "last_seen", "misses", "rtt", "site", "state")

    def __init__(self, state: MemberState, site: str) -> None:
        self.state: MemberState = state
        self.site = site
        self.rtt: float | None = None
        self.baseline: float | None = None
        self.last_seen: float | None = None
        self.misses = 0
        self.addrs: tuple[str, ...] = ()


class Membership:
    """The member table (see the module docstring).

    Args:
        degraded_factor: a ping slower than ``degraded_factor`` x baseline (and slower than
            the baseline by at least ``degraded_min`` seconds) marks the member degraded.
        degraded_min: seconds; keeps loopback jitter (0.2 ms -> 2 ms) from counting.
        history: how many events to keep (oldest dropped first).
    """

    def __init__(self, degraded_factor: float = 4.0, degraded_min: float = 0.05,
                 history: int = 1000) -> None:
        self._factor = degraded_factor
        self._min = degraded_min
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self._events: deque[MembershipEvent] = deque(maxlen=history)
        self._callbacks: list[MembershipCallback] = []

    # ------------------------------------------------------------------ reading
    def members(self) -> list[Member]:
        """Every member, sorted by peer id."""
        with self._lock:
            return [Member(peer_id=p, site=e.site, state=e.state,
                           rtt_ms=None if e.rtt is None else e.rtt * 1e3,
                           baseline_ms=None if e.baseline is None else e.baseline * 1e3,
                           last_seen=e.last_seen, addrs=e.addrs)
                    for p, e in sorted(self._entries.items())]

    def state(self, peer_id: str) -> MemberState | None:
        """``peer_id``'s state, or ``None`` if it is not a member."""
        with self._lock:
            entry = self._entries.get(peer_id)
            return entry.state if entry else None

    def misses(self, peer_id: str) -> int:
        """Pings to ``peer_id`` unanswered in a row (0 for non-members)."""
        with self._lock:
            entry = self._entries.get(peer_id)
            return entry.misses if entry else 0

    def events(self) -> list[MembershipEvent]:
        """The recorded state changes, oldest first."""
        with self._lock:
            return list(self._events)

    def on_change(self, callback: MembershipCallback) -> None:
        """Call ``callback(event)`` on every state change (from the network thread: keep it
        quick and thread-safe)."""
        with self._lock:
            self._callbacks.append(callback)

    # ------------------------------------------------------------------ writing
    def set_addrs(self, peer_id: str, addrs: tuple[str, ...]) -> None:
        """Record where ``peer_id`` is redialed (only for members)."""
        with self._lock:
            entry = self._entries.get(peer_id)
            if entry is not None:
                entry.addrs = addrs

    def link_up(self, peer_id: str, site: str, reason: str) -> None:
        """A connection to ``peer_id`` is open."""
        self._change(peer_id, "connected", reason, site=site, seen=True, reset_misses=True,
                     only_from=(None, "unreachable", "degraded"))

    def link_lost(self, peer_id: str, reason: str) -> None:
        """The last connection to ``peer_id`` closed; a redial follows."""
        self._change(peer_id, "degraded", reason, only_from=("connected",))

    def unreachable(self, peer_id: str, reason: str, site: str = "",
                    deliberate: bool = False) -> None:
        """``peer_id`` cannot be reached (redial failed, or pings went unanswered), or this
        node closed the link on purpose (``deliberate``: not a partition)."""
        self._change(peer_id, "unreachable", reason, site=site,
                     kind="disconnected" if deliberate else None)

    def pong(self, peer_id: str, rtt: float) -> None:
        """A ping to ``peer_id`` came back after ``rtt`` seconds."""
        with self._lock:
            entry = self._entries.get(peer_id)
            if entry is None:
                return
            entry.rtt, entry.misses, entry.last_seen = rtt, 0, time.time()
            base = entry.baseline
            slow = base is not None and rtt > base * self._factor and rtt - base > self._min
            if not slow:
                entry.baseline = rtt if base is None else (1 - _EWMA) * base + _EWMA * rtt
        if slow:
            assert base is not None
            self._change(peer_id, "degraded", f"ping RTT {rtt * 1e3:.1f} ms is above "
                         f"{self._factor:g} x its baseline of {base * 1e3:.1f} ms",
                         only_from=("connected",))
        else:
            self._change(peer_id, "connected", f"ping answered in {rtt * 1e3:.1f} ms",
                         only_from=("degraded",))

    def missed(self, peer_id: str, reason: str) -> int:
        """A ping to ``peer_id`` went unanswered; returns the consecutive misses so far."""
        with self._lock:
            entry = self._entries.get(peer_id)
            if entry is None:
                return 0
            entry.misses += 1
            misses = entry.misses
        self._change(peer_id, "degraded", f"{misses} ping(s) unanswered: {reason}",
                     only_from=("connected",))
        return misses

    def _change(self, peer_id: str, new: MemberState, reason: str, *, site: str = "",
                seen: bool = False, reset_misses: bool = False, kind: EventKind | None = None,
                only_from: tuple[MemberState | None, ...] | None = None) -> None:
        with self._lock:
            entry = self._entries.get(peer_id)
            old = entry.state if entry is not None else None
            if only_from is not None and old not in only_from:
                return
            if entry is None:
                entry = self._entries[peer_id] = _Entry(new, site)
            entry.site = site or entry.site
            if seen:
                entry.last_seen = time.time()
            if reset_misses:
                entry.misses = 0
            if old == new:
                return
            entry.state = new
            event = MembershipEvent(peer_id=peer_id, old=old, new=new, kind=kind or _kind(old, new),
                                    at=time.time(), reason=reason)
            self._events.append(event)
            callbacks = list(self._callbacks)
        logger.info("member %s: %s -> %s (%s)", peer_id, old, new, reason)
        for callback in callbacks:
            try:
                callback(event)
            except Exception:  # an observer must not break the network thread
                logger.exception("membership callback failed")

"""The public node: a site's libp2p host, usable from sync code, asyncio and Ray actors.

Every network operation has a blocking form (``call``) and an awaitable form (``acall``);
both run in the node's own trio thread (``p2p/_bridge.py``), so neither blocks the other and
an asyncio loop never waits on trio.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any

from pydantic import JsonValue
from typing_extensions import Self

from p2p._allowlist import Allowlist, DeniedCallback, DeniedEvent, SitePeer
from p2p._bridge import TrioPortal
from p2p._config import NodeConfig
from p2p._exceptions import NodeClosedError
from p2p._membership import Member, MembershipCallback, MembershipEvent
from p2p._mesh import Mesh
from p2p._messages import TensorHeader
from p2p._safetensors import to_safetensors
from p2p._tensors import TransferStats, prepare_transfer

__all__ = ["Node", "open_mesh"]

_GRACE = 5.0  # seconds a blocking call waits beyond the operation's own timeout


class Node:
    """A site's p2p node: Noise-only libp2p host, allowlist, RPC, tensor stream, gossip.

    Args:
        config: identity, listen address, allowlist and limits.

    Example (sync)::

        with Node(NodeConfig(identity=load_identity(d), peers=(peer_b,))) as node:
            node.register("ping", lambda params, peer: {"pong": params})
            print(node.call(peer_b.peer_id, "ping", {"x": 1}))

    Example (asyncio / Ray async actor)::

        async with Node(cfg) as node:
            node.register("ping", async_ping)      # runs on this event loop
            result = await node.acall(peer_id, "ping", {"x": 1})
    """

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.allowlist = Allowlist(config.peers)
        self._portal = TrioPortal(f"p2p-{config.identity.site}", config.handler_threads)
        self._mesh = Mesh(config, self.allowlist)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Node:
        """Start listening (blocking). Returns ``self``.

        Raises:
            P2PError: the host could not listen (e.g. the port is taken).
        """
        self._portal.start(self._mesh.serve, timeout=self.config.close_timeout + 20,
                           shutdown=self._mesh.close)
        return self

    async def astart(self) -> Node:
        """:meth:`start` without blocking the event loop."""
        await asyncio.get_running_loop().run_in_executor(None, self.start)
        return self

    def close(self) -> None:
        """Close every connection, stop the network thread and the handler threads
        (idempotent). Calls still pending fail with :class:`~p2p.NodeClosedError`."""
        self._portal.stop(self.config.close_timeout)

    async def aclose(self) -> None:
        """:meth:`close` without blocking the event loop."""
        await asyncio.get_running_loop().run_in_executor(None, self.close)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        await self.astart()
        return self

    async def __aexit__(self, et: type[BaseException] | None, ev: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    # ------------------------------------------------------------------ identity
    @property
    def peer_id(self) -> str:
        """This site's peer id (as Noise proves it to peers)."""
        return self._mesh.host.peer_id

    @property
    def addrs(self) -> list[str]:
        """Where peers reach us: multiaddrs ending in ``/p2p/<peer id>`` (after start)."""
        if not self._portal.running:
            raise NodeClosedError("the node is not running; call Node.start() first")
        return self._mesh.host.addrs

    def connected_peers(self) -> list[str]:
        """Peer ids with an open connection, sorted."""
        return self._mesh.host.connected_peers() if self._portal.running else []

    # ------------------------------------------------------------------ allowlist
    def allow(self, peer: SitePeer) -> None:
        """Put ``peer`` on the allowlist (takes effect for the next connection); with
        ``addrs`` the node dials it and keeps the link up."""
        self.allowlist.add(peer)
        if peer.addrs and self._portal.running:
            self._portal.submit(self._mesh.keep, peer.peer_id)

    def disallow(self, peer_id: str) -> None:
        """Take ``peer_id`` off the allowlist and close its connections (blocking)."""
        self.allowlist.remove(peer_id)
        if self._portal.running:
            self._portal.run(self._mesh.disconnect, peer_id, timeout=self.config.close_timeout)

    def on_denied(self, callback: DeniedCallback) -> None:
        """Call ``callback(DeniedEvent)`` on every refused peer (from the network thread)."""
        self.allowlist.on_denied(callback)

    def denied(self) -> list[DeniedEvent]:
        """The refusals recorded so far, oldest first."""
        return self.allowlist.denied()

    # ------------------------------------------------------------------ membership
    def members(self) -> list[Member]:
        """Every site this node keeps a link to or has seen: state (``connected``,
        ``degraded``, ``unreachable``), last RTT, last seen, redial addresses."""
        return self._mesh.membership.members()

    def on_membership(self, callback: MembershipCallback) -> None:
        """Call ``callback(MembershipEvent)`` on every member state change (from the network
        thread: keep it quick). ``event.partition`` / ``event.healed`` flag partitions."""
        self._mesh.membership.on_change(callback)

    def membership_events(self) -> list[MembershipEvent]:
        """The member state changes recorded so far, oldest first."""
        return self._mesh.membership.events()

    def ping(self, peer_id: str, timeout: float | None = None) -> float:
        """One liveness round trip to ``peer_id`` (connecting first if needed).

        Args:
            peer_id: an allowlisted peer.
            timeout: seconds to wait for the answer (default ``NodeConfig.ping_timeout``).

        Returns:
            The round-trip time in seconds (also recorded in :meth:`members`).

        Raises:
            P2PTimeoutError: no answer in time. DialError, PeerNotAllowedError.
        """
        budget = timeout or self.config.ping_timeout
        return self._portal.run(self._mesh.ping, peer_id, budget,
                                timeout=budget + self.config.dial_timeout + _GRACE)

    async def aping(self, peer_id: str, timeout: float | None = None) -> float:
        """Awaitable :meth:`ping`."""
        return await self._portal.arun(self._mesh.ping, peer_id,
                                       timeout or self.config.ping_timeout)

    # ------------------------------------------------------------------ connections
    def connect(self, addr: str) -> str:
        """Open (or reuse) a Noise connection to ``addr`` = ``<multiaddr>/p2p/<peer id>``.

        Returns:
            The peer id.

        Raises:
            PeerNotAllowedError: the peer is not on the allowlist.
            PeerIdMismatchError: another peer answered at that address (no retry).
            DialError, P2PTimeoutError: it could not be reached within ``dial_timeout``.
        """
        return self._portal.run(self._mesh.connect, addr, timeout=self.config.dial_timeout
                                + _GRACE)

    async def aconnect(self, addr: str) -> str:
        """Awaitable :meth:`connect`."""
        return await self._portal.arun(self._mesh.connect, addr)

    def disconnect(self, peer_id: str) -> None:
        """Close every connection to ``peer_id`` and stop redialing it until the next
        :meth:`connect` (blocking; no-op when not connected)."""
        self._portal.run(self._mesh.disconnect, peer_id, timeout=self.config.close_timeout)

    async def adisconnect(self, peer_id: str) -> None:
        """Awaitable :meth:`disconnect`."""
        await self._portal.arun(self._mesh.disconnect, peer_id)

    # ------------------------------------------------------------------ rpc
    def register(self, method: str, handler: Callable[..., Any], *,
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Serve RPC ``method`` with ``handler(params, peer_id) -> JSON``.

        Args:
            method: the method name callers use.
            handler: a plain function (runs on a handler thread) or an ``async def`` (runs
                on ``loop``). Exceptions it raises reach the caller as
                :class:`~p2p.RemoteError`; the server keeps serving.
            loop: the event loop for an ``async def`` handler; default: the running one.
        """
        self._mesh.register(method, self._portal.to_trio_handler(handler, loop))

    def call(self, peer_id: str, method: str, params: JsonValue = None,
             timeout: float | None = None) -> JsonValue:
        """Blocking RPC: ``method(params)`` on ``peer_id``; returns its JSON result.

        Args:
            peer_id: an allowlisted peer (connected first if needed).
            method: the remote method name.
            params: any JSON value.
            timeout: seconds to wait for the reply (default ``NodeConfig.rpc_timeout``).

        Raises:
            RemoteError: the handler failed remotely (``remote_type``, ``remote_message``).
            P2PTimeoutError: no reply in time.
            PeerNotAllowedError, DialError, ProtocolError, NodeClosedError.
        """
        budget = timeout or self.config.rpc_timeout
        return self._portal.run(self._mesh.call, peer_id, method, params, budget,
                                timeout=budget + _GRACE)

    async def acall(self, peer_id: str, method: str, params: JsonValue = None,
                    timeout: float | None = None) -> JsonValue:
        """Awaitable :meth:`call` (cancelling the awaiting task cancels the call)."""
        return await self._portal.arun(self._mesh.call, peer_id, method, params,
                                       timeout or self.config.rpc_timeout)

    request = call  # the mesh API's name: ``mesh.request(site, method, params)``
    arequest = acall

    # ------------------------------------------------------------------ tensors
    def on_tensors(self, handler: Callable[..., Any], *,
                   loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Receive tensor transfers: ``handler(ReceivedTensors) -> JSON`` runs once a transfer
        is complete and verified; its return value reaches the sender as
        ``TransferStats.result``, its exceptions as :class:`~p2p.RemoteError`.

        Args:
            handler: a plain function (handler thread) or ``async def`` (runs on ``loop``).
            loop: the event loop for an ``async def`` handler; default: the running one.
        """
        self._mesh.tensors.handler = self._portal.to_trio_handler(handler, loop)

    def _prepare(self, tensors: Mapping[str, Any] | bytes, name: str,
                 metadata: Mapping[str, str] | None) -> tuple[TensorHeader, bytes]:
        data = to_safetensors(tensors, metadata)
        return prepare_transfer(data, self.config.tensor_chunk, name), data

    def send_tensors(self, peer_id: str, tensors: Mapping[str, Any] | bytes, *, name: str = "",
                     metadata: Mapping[str, str] | None = None,
                     timeout: float | None = None) -> TransferStats:
        """Send tensors (numpy arrays, torch tensors, or safetensors bytes) to ``peer_id``.

        Blocks until the receiver verified every chunk and the whole digest and its handler
        returned. Serialisation and hashing run on the calling thread.

        Args:
            peer_id: an allowlisted peer.
            tensors: ``{name: array}`` (numpy or torch, not mixed) or safetensors bytes.
            name: a label the receiver sees. metadata: safetensors ``__metadata__``.
            timeout: seconds for the whole transfer (default ``NodeConfig.tensor_timeout``).

        Returns:
            :class:`TransferStats` (bytes, chunks, retransmits, seconds, receiver's result).

        Raises:
            ChecksumError: a chunk failed its CRC32 more than ``tensor_retries`` times.
            RemoteError: refused (e.g. over the receiver's ``max_tensor_bytes``) or its
                handler failed. P2PTimeoutError, DialError, PeerNotAllowedError.
        """
        header, data = self._prepare(tensors, name, metadata)
        budget = timeout or self.config.tensor_timeout
        return self._portal.run(self._mesh.send_tensors, peer_id, header, data, budget,
                                timeout=budget + _GRACE)

    async def asend_tensors(self, peer_id: str, tensors: Mapping[str, Any] | bytes, *,
                            name: str = "", metadata: Mapping[str, str] | None = None,
                            timeout: float | None = None) -> TransferStats:
        """Awaitable :meth:`send_tensors` (serialisation runs in the default executor)."""
        loop = asyncio.get_running_loop()
        header, data = await loop.run_in_executor(None, self._prepare, tensors, name, metadata)
        return await self._portal.arun(self._mesh.send_tensors, peer_id, header, data,
                                       timeout or self.config.tensor_timeout)

    # ------------------------------------------------------------------ gossip
    def subscribe(self, topic: str, handler: Callable[..., Any], *,
                  loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Join gossip ``topic``: ``handler(GossipMessage)`` gets every message whose origin is
        on the allowlist (messages are signed; others are dropped and recorded). Subscribing
        again replaces the handler.

        Args:
            topic: the topic name.
            handler: a plain function (handler thread) or ``async def`` (runs on ``loop``).
            loop: the event loop for an ``async def`` handler; default: the running one.
        """
        self._portal.run(self._mesh.subscribe, topic,
                         self._portal.to_trio_handler(handler, loop),
                         timeout=self.config.rpc_timeout)

    async def asubscribe(self, topic: str, handler: Callable[..., Any]) -> None:
        """Awaitable :meth:`subscribe` (an ``async def`` handler runs on this loop)."""
        await self._portal.arun(self._mesh.subscribe, topic,
                                self._portal.to_trio_handler(handler))

    def unsubscribe(self, topic: str) -> None:
        """Leave gossip ``topic`` (no-op if not subscribed)."""
        self._portal.run(self._mesh.unsubscribe, topic, timeout=self.config.rpc_timeout)

    def publish(self, topic: str, data: bytes) -> None:
        """Publish ``data`` on gossip ``topic`` to the mesh (fire and forget)."""
        self._portal.run(self._mesh.publish, topic, bytes(data),
                         timeout=self.config.rpc_timeout)

    async def apublish(self, topic: str, data: bytes) -> None:
        """Awaitable :meth:`publish`."""
        await self._portal.arun(self._mesh.publish, topic, bytes(data))

    def topic_peers(self, topic: str) -> list[str]:
        """Connected peers known to be subscribed to ``topic`` (to wait for a mesh to form)."""
        return self._mesh.gossip.topic_peers(topic) if self._portal.running else []


def open_mesh(config: NodeConfig) -> Node:
    """Start a node for ``config``: listen, then dial and keep a link to every allowlisted
    site with an address. Close it with ``node.close()`` (or use it as a context manager).
    Returns the started :class:`Node`; raises :class:`P2PError` if it cannot listen.

    Example:
        >>> mesh = open_mesh(NodeConfig(identity=load_identity(d), peers=(site_b,)))  # doctest: +SKIP
        >>> mesh.request(site_b.peer_id, "status", {})                                 # doctest: +SKIP
    """
    return Node(config).start()

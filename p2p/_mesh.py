"""The trio side of a node: the host plus the hive protocols mounted on it, and the link
keeping (reconnector, liveness pings, membership view).

Everything here runs in the node's network thread; :class:`~p2p.Node` reaches it through
``p2p/_bridge.py``.
"""

from __future__ import annotations

from typing import Any

import trio
from pydantic import JsonValue

from p2p._allowlist import Allowlist
from p2p._config import NodeConfig
from p2p._exceptions import NodeClosedError
from p2p._gossip import Gossip, GossipHandler
from p2p._host import Host, split_peer_addr
from p2p._liveness import Liveness
from p2p._membership import Membership
from p2p._messages import TensorHeader
from p2p._reconnect import Reconnector
from p2p._rpc import RPC_PROTOCOL, RpcClient, RpcServer, TrioHandler
from p2p._tensor_recv import TensorServer
from p2p._tensor_send import send_transfer
from p2p._tensors import TENSOR_BULK_PROTOCOL, TENSOR_PROTOCOL, Mangle, TransferStats
from p2p._util import collapse_groups

__all__ = ["Mesh"]


class Mesh:
    """Host + RPC + tensor stream + gossip, all on one trio loop.

    Args:
        config: the node settings.
        allowlist: shared with the node (changes apply to new connections and streams).
    """

    def __init__(self, config: NodeConfig, allowlist: Allowlist) -> None:
        self.config = config
        self.allowlist = allowlist
        self.host = Host(config, allowlist)
        self.rpc = RpcServer(config.max_rpc_frame, config.handler_timeout,
                             config.rpc_idle_timeout, self.host.admit)
        self.host.set_handler(RPC_PROTOCOL, self.rpc.handle_stream)
        self.rpc_client = RpcClient(self.host, config.max_rpc_frame,
                                    max_idle_age=min(30.0, config.rpc_idle_timeout / 4))
        self.tensors = TensorServer(config, self.host.admit)
        self.host.set_handler(TENSOR_PROTOCOL, self.tensors.handle_stream)
        self.host.set_handler(TENSOR_BULK_PROTOCOL, self.tensors.handle_bulk_stream)
        self.membership = Membership(config.degraded_rtt_factor, config.degraded_rtt_min)
        self.reconnector = Reconnector(self.host, allowlist, self.membership, config)
        self.liveness = Liveness(self.host, self.membership, config)
        self._gossip: Gossip | None = None  # made in serve(): py-libp2p's Pubsub starts a thread

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Run the host and gossip until cancelled (``task_status.started()`` once both are
        up and listening)."""
        self._gossip = Gossip(self.host, self.allowlist, self.config)
        try:
            with collapse_groups():
                async with trio.open_nursery() as nursery:
                    await nursery.start(self.host.run)
                    await nursery.start(self._gossip.run)
                    await nursery.start(self.reconnector.run)
                    await nursery.start(self.liveness.run)
                    await nursery.start(self.tensors.run)
                    task_status.started()
        finally:
            self._gossip.stop_threads()

    @property
    def gossip(self) -> Gossip:
        """The gossip layer (exists while serving)."""
        if self._gossip is None:
            raise NodeClosedError("the node is not running; call Node.start() first")
        return self._gossip

    async def close(self) -> None:
        """Close idle RPC streams, then every connection (before the loop is cancelled)."""
        self.reconnector.stop()
        await self.liveness.close()
        await self.rpc_client.close()
        await self.host.close()

    async def subscribe(self, topic: str, handler: GossipHandler) -> None:
        """Join gossip ``topic`` with a trio handler."""
        await self.gossip.subscribe(topic, handler)

    async def unsubscribe(self, topic: str) -> None:
        """Leave gossip ``topic``."""
        await self.gossip.unsubscribe(topic)

    async def publish(self, topic: str, data: bytes) -> None:
        """Publish on gossip ``topic``."""
        await self.gossip.publish(topic, data)

    async def connect(self, addr: str) -> str:
        """Dial ``addr`` (``.../p2p/<peer-id>``); returns the peer id."""
        peer_id, transport = split_peer_addr(addr)
        await self.host.connect(peer_id, [transport])
        self.reconnector.keep(peer_id)
        return peer_id

    async def ensure_connected(self, peer_id: str) -> None:
        """Connect to an allowlisted peer at its known addresses (no-op when connected)."""
        await self.host.connect(peer_id)

    async def disconnect(self, peer_id: str) -> None:
        """Close every connection to ``peer_id`` and stop redialing it until
        :meth:`connect`."""
        self.reconnector.park(peer_id)
        await self.host.disconnect(peer_id)

    async def keep(self, peer_id: str) -> None:
        """Keep a link to ``peer_id`` (after ``Node.allow`` of a peer with addresses)."""
        self.reconnector.keep(peer_id)

    async def ping(self, peer_id: str, timeout: float) -> float:
        """One liveness round trip to ``peer_id``; the RTT in seconds."""
        return await self.liveness.ping(peer_id, timeout)

    def register(self, method: str, handler: TrioHandler) -> None:
        """Serve RPC ``method`` with a trio handler."""
        self.rpc.register(method, handler)

    async def call(self, peer_id: str, method: str, params: JsonValue,
                   timeout: float | None) -> JsonValue:
        """RPC ``method`` on ``peer_id`` (see :meth:`p2p._rpc.RpcClient.call`)."""
        return await self.rpc_client.call(peer_id, method, params,
                                          timeout or self.config.rpc_timeout)

    async def send_tensors(self, peer_id: str, header: TensorHeader, data: bytes,
                           timeout: float | None, mangle: Mangle | None = None) -> TransferStats:
        """Send prepared safetensors bytes, resuming after dropped links (see
        :func:`p2p._tensor_send.send_transfer`)."""
        return await send_transfer(self.host, peer_id, header, data,
                                   window=self.config.tensor_window,
                                   retries=self.config.tensor_retries,
                                   timeout=timeout or self.config.tensor_timeout,
                                   resume_attempts=self.config.tensor_resume_attempts,
                                   backoff=self.reconnector.backoff, mangle=mangle,
                                   bulk=(self.config.tensor_bulk_timeout,
                                         self.config.tensor_bulk_buffer)
                                   if self.config.tensor_bulk else None)

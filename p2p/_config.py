"""In-process settings of a p2p node (a dataclass: it never crosses the wire)."""

from __future__ import annotations

from dataclasses import dataclass

from p2p._allowlist import SitePeer
from p2p._identity import SiteIdentity

__all__ = ["NodeConfig"]

MiB = 1 << 20


@dataclass(frozen=True)
class NodeConfig:
    """How a :class:`~p2p.Node` runs.

    Example:
        >>> cfg = NodeConfig(identity=load_identity("/etc/hive/p2p"),      # doctest: +SKIP
        ...                  listen="/ip4/0.0.0.0/tcp/4001",
        ...                  peers=(SitePeer(peer_id="12D3KooW...", addrs=("/ip4/10.0.0.2/tcp/4001",)),))
    """

    # The site's key pair and peer id (load_identity / init_identity / generate_identity).
    identity: SiteIdentity
    # Multiaddr to listen on; TCP only. Port 0 picks a free port (see Node.addrs).
    listen: str = "/ip4/127.0.0.1/tcp/0"
    # The allowlist: the only peers that may connect or open streams (and that we dial).
    peers: tuple[SitePeer, ...] = ()
    # Most connections (in + out) at once; a site mesh needs a few per peer.
    max_connections: int = 128
    # Seconds to open TCP + Noise + yamux to a peer before DialError/P2PTimeoutError.
    dial_timeout: float = 10.0
    # Default seconds an RPC call waits for its reply (per call: timeout=...).
    rpc_timeout: float = 30.0
    # Seconds a local handler may run before the caller gets a "Timeout" error frame.
    handler_timeout: float = 60.0
    # Seconds an RPC stream may take to deliver its next complete frame before it is reset
    # (drops silent or trickling peers; callers reuse idle streams for a quarter of it).
    rpc_idle_timeout: float = 300.0
    # Largest RPC frame (request or reply) accepted; bigger length prefixes reset the stream.
    max_rpc_frame: int = 4 * MiB
    # Worker threads that run synchronous handlers (async handlers run on their own loop).
    handler_threads: int = 8
    # Tensor stream: bytes per chunk (each chunk carries its own CRC32).
    tensor_chunk: int = 1 * MiB
    # Tensor stream: chunks in flight (sent, not yet acknowledged) per transfer.
    tensor_window: int = 16
    # Tensor stream: largest transfer accepted, checked on the header before allocating.
    max_tensor_bytes: int = 16 * 1024 * MiB
    # Tensor stream: retransmissions allowed per chunk before ChecksumError.
    tensor_retries: int = 3
    # Seconds a tensor transfer may take end to end (per call: timeout=...).
    tensor_timeout: float = 600.0
    # Gossipsub heartbeat in seconds (py-libp2p's default of 120 s suits no small mesh).
    gossip_heartbeat: float = 0.5
    # Gossipsub mesh degree D (and D_low = D - 2, D_high = 2 * D); small meshes want small D.
    gossip_degree: int = 4
    # Gossipsub spam limit: messages per topic per second accepted from one peer.
    gossip_rate: float = 1000.0
    # Seconds close() waits for the network thread before giving up on a clean exit.
    close_timeout: float = 10.0

    def __post_init__(self) -> None:
        for name in ("dial_timeout", "rpc_timeout", "handler_timeout", "rpc_idle_timeout",
                     "tensor_timeout",
                     "gossip_heartbeat", "gossip_rate", "close_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"NodeConfig.{name} must be > 0, got {getattr(self, name)}")
        for name in ("max_connections", "max_rpc_frame", "handler_threads", "tensor_chunk", "tensor_window",
                     "max_tensor_bytes", "gossip_degree"):
            if getattr(self, name) < 1:
                raise ValueError(f"NodeConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.tensor_retries < 0:
            raise ValueError(f"NodeConfig.tensor_retries must be >= 0, got {self.tensor_retries}")

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
    tensor_chunk: int = 4 * MiB
    # Tensor stream: chunks in flight (sent, not yet acknowledged) per transfer.
    tensor_window: int = 16
    # Tensor stream: largest transfer accepted, checked on the header before allocating.
    max_tensor_bytes: int = 16 * 1024 * MiB
    # Tensor stream: retransmissions allowed per chunk before ChecksumError.
    tensor_retries: int = 3
    # Seconds a tensor transfer may take end to end (per call: timeout=...).
    tensor_timeout: float = 600.0
    # Tensor stream: how often one send_tensors resumes after its link dropped (each time
    # from the last chunk the receiver verified) before it gives up.
    tensor_resume_attempts: int = 3
    # Tensor stream: seconds a receiver keeps an interrupted transfer's verified chunks for
    # the sender to resume (and a finished one's reply, so a resend never runs it twice).
    tensor_resume_ttl: float = 120.0
    # Tensor stream: most bytes of interrupted transfers kept at once (oldest dropped first).
    tensor_resume_bytes: int = 4096 * MiB
    # Tensor stream: send bodies over a direct TCP connection (ChaCha20-Poly1305 records, key
    # agreed over the Noise stream; ~20x faster than py-libp2p's yamux/Noise path); falls
    # back to the stream when the peer's bulk port cannot be reached. Off: always in-stream.
    tensor_bulk: bool = True
    # Tensor stream: bytes of receive buffers kept for reuse by later transfers of the same
    # size, once nothing references a finished transfer's data (fresh memory costs about as
    # much as decrypting it); kept at most tensor_resume_ttl seconds. 0: none kept.
    tensor_buffer_pool: int = 2048 * MiB
    # Tensor stream: seconds to open the direct bulk connection before falling back.
    tensor_bulk_timeout: float = 2.0
    # Tensor stream: socket send/receive buffer bytes of a bulk connection.
    tensor_bulk_buffer: int = 4 * MiB
    # Keep a link to every allowlisted site with a known address, redialing when it drops.
    reconnect: bool = True
    # Redial sites also at the addresses they announce (identify) and we reached them at;
    # off: only at their SitePeer.addrs (e.g. when announced addresses are private/NATed).
    learn_addrs: bool = True
    # Seconds before the first redial; doubles per failure up to reconnect_max (jittered).
    reconnect_base: float = 0.05
    # Largest seconds between redials (bounds how long a restarted peer waits for us).
    reconnect_max: float = 1.0
    # Seconds per address a redial may take (short: a partitioned peer's dial hangs).
    reconnect_dial_timeout: float = 2.0
    # Seconds between liveness pings to each connected site.
    ping_interval: float = 1.0
    # Seconds a ping may take before it counts as missed (generous: a busy node answers late,
    # and closing a slow but live link only adds load).
    ping_timeout: float = 2.0
    # Missed pings in a row that mark a site unreachable and close its link (1 marks degraded).
    ping_misses: int = 3
    # A ping slower than this many times the site's baseline RTT marks it degraded...
    degraded_rtt_factor: float = 4.0
    # ...if it is also at least this many seconds above the baseline (ignores tiny jitter).
    degraded_rtt_min: float = 0.05
    # Gossipsub heartbeat in seconds (py-libp2p's default of 120 s suits no small mesh).
    gossip_heartbeat: float = 0.5
    # Gossipsub mesh degree D (D_low = max(1, D - 2), D_high = 2 * D). With flood publishing
    # every site gets a message straight from its publisher; D is only the relay fan-out that
    # carries it on to sites the publisher has no link to, and every relayed copy is a
    # duplicate for a fully linked mesh (hive's default: each site keeps a link to every
    # site it knows), costing each receiver CPU in py-libp2p. 20 sites, one process each, on
    # 2 cores at 20 msg/s: p50 to all 33 ms with D=1, 144 ms with D=2, ~1 s with D=3. With
    # sparse links (a chain of sites) D=1 still delivers everything - through the mesh, or
    # gossip's IHAVE/IWANT within a heartbeat or two; raise D for lower latency there.
    gossip_degree: int = 1
    # Gossipsub: our own messages go to every subscribed peer at once, not only the D in our
    # mesh (gossipsub v1.1 flood publishing): one hop to everyone in a small mesh.
    gossip_flood_publish: bool = True
    # Gossipsub spam limit: messages per topic per second accepted from one peer.
    gossip_rate: float = 1000.0
    # Seconds close() waits for the network thread before giving up on a clean exit.
    close_timeout: float = 10.0

    def __post_init__(self) -> None:
        for name in ("dial_timeout", "rpc_timeout", "handler_timeout", "rpc_idle_timeout",
                     "tensor_timeout", "tensor_resume_ttl", "tensor_bulk_timeout", "reconnect_base",
                     "reconnect_max", "reconnect_dial_timeout", "ping_interval",
                     "ping_timeout", "degraded_rtt_factor", "gossip_heartbeat", "gossip_rate", "close_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"NodeConfig.{name} must be > 0, got {getattr(self, name)}")
        for name in ("max_connections", "max_rpc_frame", "handler_threads", "tensor_chunk", "tensor_window",
                     "max_tensor_bytes", "tensor_bulk_buffer", "gossip_degree", "ping_misses"):
            if getattr(self, name) < 1:
                raise ValueError(f"NodeConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("tensor_retries", "tensor_resume_attempts", "tensor_resume_bytes",
                     "tensor_buffer_pool",
                     "degraded_rtt_min"):
            if getattr(self, name) < 0:
                raise ValueError(f"NodeConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.reconnect_base > self.reconnect_max:
            raise ValueError(f"NodeConfig.reconnect_base ({self.reconnect_base}) must not exceed "
                             f"reconnect_max ({self.reconnect_max})")

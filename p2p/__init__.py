"""A libp2p mesh with Noise encryption between hive sites.

Layers (each its own module): identity (``_identity``), security = Noise only + allowlist
gate (``_security``, ``_allowlist``), host = TCP + yamux + dialing (``_host``), frames
(``_frames``), wire models (``_messages``), RPC (``_rpc``), the trio side of a node
(``_mesh``), the trio <-> asyncio/threads bridge (``_bridge``, the only module mixing them),
link keeping - reconnect with backoff (``_reconnect``), ping liveness (``_liveness``), the
membership view (``_membership``) - and the public :class:`Node` (``_node``). This package
imports nothing else of ours.

Example:
    >>> ident = init_identity("/var/lib/hive/p2p", site="site-a")            # doctest: +SKIP
    >>> cfg = NodeConfig(identity=ident, listen="/ip4/0.0.0.0/tcp/4001",     # doctest: +SKIP
    ...                  peers=(SitePeer(peer_id="12D3KooW...", addrs=("/ip4/10.0.0.2/tcp/4001",)),))
    >>> with open_mesh(cfg) as node:                                         # doctest: +SKIP
    ...     node.request("12D3KooW...", "status")
    ...     [(m.peer_id, m.state, m.rtt_ms) for m in node.members()]
"""

from p2p._allowlist import Allowlist, DeniedEvent, SitePeer
from p2p._config import NodeConfig
from p2p._exceptions import (
    ChecksumError,
    DialError,
    FrameTooLargeError,
    IdentityError,
    NodeClosedError,
    P2PError,
    P2PTimeoutError,
    PeerIdMismatchError,
    PeerNotAllowedError,
    ProtocolError,
    RemoteError,
    StreamResetError,
)
from p2p._gossip import GossipMessage
from p2p._identity import SiteIdentity, generate_identity, init_identity, load_identity
from p2p._membership import Member, MembershipEvent, MemberState
from p2p._node import Node, open_mesh
from p2p._reconnect import Backoff
from p2p._rpc import RPC_PROTOCOL
from p2p._tensors import TENSOR_PROTOCOL, ReceivedTensors, TransferStats

__all__ = [  # noqa: RUF022 - plain sorted() order, as tests/test_exports.py checks
    "Allowlist",
    "Backoff",
    "ChecksumError",
    "DeniedEvent",
    "DialError",
    "FrameTooLargeError",
    "GossipMessage",
    "IdentityError",
    "Member",
    "MemberState",
    "MembershipEvent",
    "Node",
    "NodeClosedError",
    "NodeConfig",
    "P2PError",
    "P2PTimeoutError",
    "PeerIdMismatchError",
    "PeerNotAllowedError",
    "ProtocolError",
    "RPC_PROTOCOL",
    "ReceivedTensors",
    "RemoteError",
    "SiteIdentity",
    "SitePeer",
    "StreamResetError",
    "TENSOR_PROTOCOL",
    "TransferStats",
    "generate_identity",
    "init_identity",
    "load_identity",
    "open_mesh",
]

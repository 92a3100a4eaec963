"""A libp2p mesh with Noise encryption between hive sites.

Identity, host, mesh and protocols land with the p2p issue; today the package exposes its
error tree. This package imports nothing else of ours.
"""

from p2p._exceptions import IdentityError, P2PError, PeerNotAllowedError, ProtocolError

__all__ = ["IdentityError", "P2PError", "PeerNotAllowedError", "ProtocolError"]

"""The security layer: Noise XX only, gated by the site allowlist.

py-libp2p's ``new_swarm`` offers Noise, TLS, SECIO and *plaintext* when ``sec_opt`` is left
empty (``libp2p/__init__.py``: ``secure_transports_by_protocol = sec_opt or {...}``). We pass
exactly one entry, ``{"/noise": GatedNoise}``, so multistream-select can agree on nothing
else; a peer that offers only plaintext/SECIO/TLS fails negotiation and is dropped.

``GatedNoise`` wraps py-libp2p's Noise transport:

- inbound: after the handshake has authenticated the remote's peer id, a peer that is not on
  the allowlist is recorded (:class:`~p2p.DeniedEvent`) and its connection closed before the
  muxer is negotiated;
- outbound: the handshake runs without an expected id and the authenticated id is compared
  here, so a mismatch is reported with both ids (``PeerMismatch``, turned into
  :class:`~p2p.PeerIdMismatchError` by ``p2p/_host.py``) instead of a bare
  "handshake failed".
"""

from __future__ import annotations

import os
from typing import Any, cast

from libp2p.abc import IRawConnection, ISecureConn, ISecureTransport
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as new_x25519_key_pair
from libp2p.custom_types import TMuxerOptions, TProtocol, TSecurityOptions
from libp2p.peer.id import ID
from libp2p.security.exceptions import HandshakeFailure
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux

from p2p._allowlist import Allowlist, DeniedEvent

__all__ = ["GatedNoise", "PeerMismatch", "PeerRefused", "muxer_options", "security_options"]


def format_address(address: Any) -> str | None:
    """``("1.2.3.4", 5)`` -> ``"1.2.3.4:5"``; anything else -> ``str`` or ``None``."""
    if address is None:
        return None
    if isinstance(address, tuple) and len(address) == 2:
        return f"{address[0]}:{address[1]}"
    return str(address)


class PeerMismatch(HandshakeFailure):
    """Noise authenticated ``actual`` where ``expected`` was dialed."""

    def __init__(self, expected: ID, actual: ID) -> None:
        super().__init__(f"Peer ID mismatch: expected {expected}, got {actual}")
        self.expected = expected
        self.actual = actual


class PeerRefused(HandshakeFailure):
    """The remote is not on the allowlist (raised on both directions)."""

    def __init__(self, peer_id: ID) -> None:
        super().__init__(f"peer {peer_id} is not on the site allowlist")
        self.peer_id = peer_id


class GatedNoise(ISecureTransport):
    """Noise XX with an allowlist check as soon as the remote's id is authenticated.

    Args:
        key_pair: the site's libp2p key pair (signs the Noise handshake payload).
        allowlist: the peers that may hold a connection.
    """

    def __init__(self, key_pair: KeyPair, allowlist: Allowlist) -> None:
        self._noise = NoiseTransport(key_pair, noise_privkey=new_x25519_key_pair().private_key)
        self._allowlist = allowlist

    async def secure_inbound(self, conn: IRawConnection) -> ISecureConn:
        secure = await self._noise.secure_inbound(conn)
        remote = secure.get_remote_peer()
        if not self._allowlist.allows(remote):
            self._allowlist.record_denied(DeniedEvent(
                peer_id=remote.to_base58(), address=format_address(conn.get_remote_address()),
                direction="inbound", stage="handshake"))
            await secure.close()
            raise PeerRefused(remote)
        return secure

    async def secure_outbound(self, conn: IRawConnection, peer_id: ID) -> ISecureConn:
        if not self._allowlist.allows(peer_id):
            self._allowlist.record_denied(DeniedEvent(
                peer_id=peer_id.to_base58(), address=format_address(conn.get_remote_address()),
                direction="outbound", stage="dial"))
            raise PeerRefused(peer_id)
        # No expected id: Noise still proves the remote holds the key of the id it presents;
        # the comparison is ours so the error can name both ids.
        secure = await self._noise.secure_outbound(conn, cast(ID, None))
        actual = secure.get_remote_peer()
        if actual != peer_id:
            await secure.close()
            raise PeerMismatch(peer_id, actual)
        return secure


def security_options(key_pair: KeyPair, allowlist: Allowlist) -> TSecurityOptions:
    """The only security protocol a hive host negotiates: ``/noise`` (gated)."""
    return {NOISE_PROTOCOL_ID: GatedNoise(key_pair, allowlist)}


def muxer_options() -> TMuxerOptions:
    """The only stream muxer a hive host negotiates: ``/yamux/1.0.0``.

    py-libp2p's yamux answers *every* read that stays below its half-window threshold with a
    WINDOW_UPDATE frame (``PY_YAMUX_RELEASE_ON_READ``, default on): one extra encrypted frame
    and send per small message received - a gossip message, an RPC, a ping. We turn that off
    (unless the environment says otherwise), which gives go-yamux's behaviour: the window is
    topped up once half of it has been consumed. Reads stay correct either way.
    """
    os.environ.setdefault("PY_YAMUX_RELEASE_ON_READ", "0")
    return {TProtocol(YAMUX_PROTOCOL_ID): Yamux}

"""The bulk data channel of ``/hive/tensors/1.4.0``: tensor bodies over a direct TCP
connection with ChaCha20-Poly1305 records, keyed over the Noise-authenticated tensor stream.

Negotiation (JSON frames on the libp2p tensor stream, after the header / resume)::

    receiver -> sender   BulkOffer {port, session, public_key}   port 0: no bulk, go in-stream
    sender   -> receiver BulkAccept {public_key}                 "": could not connect, in-stream

Both sides derive ``key = HKDF-SHA256(X25519(own, peer), salt=session,
info="hive-bulk/1" | sender id | receiver id | receiver key | sender key)``: the ephemeral keys
travel inside the Noise channel between the two allowlisted peers, so only that sender can
know the key. Records on the TCP connection (sender -> receiver only)::

    >I  n = len(ciphertext)            ciphertext = plaintext + 16-byte Poly1305 tag
    >II index, crc32                   authenticated as AAD (with the session id)
    ciphertext                         nonce = b"\\0\\0\\0\\1" + counter (>Q; record 0, 1, ...)

Record 0 (index ``HELLO``) carries the session id: a connection whose first record does not
authenticate within ``_HELLO_TIMEOUT`` is closed and the receiver waits for the next one (a
stranger gets nothing and can inject nothing). Every later record is one chunk; a record that
fails its tag ends the connection (the transfer then resumes from its verified chunks).
"""

from __future__ import annotations

import os
import socket
import struct
import time
import zlib
from collections.abc import Callable
from typing import Annotated, Any, Literal

import trio
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from p2p._exceptions import ProtocolError
from p2p._messages import TransferDone, TransferResume
from p2p._tensors import prefix_hasher
from p2p._util import collapse_groups

__all__ = [
    "BulkAccept",
    "BulkOffer",
    "BulkSession",
    "accept_authenticated",
    "connect",
    "listen",
    "listen_host",
    "parse_accept",
    "parse_offer_reply",
    "poster",
    "receive_records",
    "run_guarded",
    "send_records",
    "shutdown",
]

HELLO = 0xFFFFFFFF  # index of record 0
_REC = struct.Struct(">III")  # ciphertext length (| _CHECKED), chunk index, crc32
_CHECKED = 1 << 31  # length flag: the crc32 field is set and must match (fault injection only)
_TAG = 16
_HELLO_TIMEOUT = 2.0  # seconds a connection may take to send its first record
_ACCEPT_TIMEOUT = 10.0  # seconds the receiver waits for the sender's authenticated connection
_DIRECTION = b"\x00\x00\x00\x01"  # sender -> receiver (the only direction records flow)
_FROZEN = ConfigDict(frozen=True, extra="forbid")
_Hex32 = Annotated[str, Field(pattern=r"^([0-9a-f]{64})?$")]


class BulkOffer(BaseModel):
    """Receiver -> sender: connect to ``port`` (0: no bulk channel, send in-stream)."""

    model_config = _FROZEN
    kind: Literal["bulk-offer"] = "bulk-offer"
    port: Annotated[int, Field(ge=0, le=65535)]
    session: _Hex32 = ""
    public_key: _Hex32 = ""


class BulkAccept(BaseModel):
    """Sender -> receiver: connected, with this ephemeral key ("": not connected, in-stream)."""

    model_config = _FROZEN
    kind: Literal["bulk-accept"] = "bulk-accept"
    public_key: _Hex32 = ""


_OFFER_REPLY: TypeAdapter[BulkOffer | TransferDone | TransferResume] = TypeAdapter(
    Annotated[BulkOffer | TransferDone | TransferResume, Field(discriminator="kind")])
_ACCEPT = TypeAdapter(BulkAccept)


def parse_offer_reply(raw: bytes) -> BulkOffer | TransferDone | TransferResume:
    """A receiver -> sender frame where an offer may come (raises ValidationError)."""
    return _OFFER_REPLY.validate_json(raw)


def parse_accept(raw: bytes) -> BulkAccept:
    """The sender's answer to an offer (raises ValidationError)."""
    return _ACCEPT.validate_json(raw)


def _raw(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw,
                                         serialization.PublicFormat.Raw)


class BulkSession:
    """One side's ephemeral X25519 key and, once the peer's is known, the record cipher."""

    def __init__(self, session: bytes | None = None) -> None:
        self.session = session or os.urandom(32)
        self._private = X25519PrivateKey.generate()
        self.public = _raw(self._private)
        self.aead: ChaCha20Poly1305 | None = None

    def derive(self, peer_public: bytes, sender_id: str, receiver_id: str,
               receiver_public: bytes, sender_public: bytes) -> ChaCha20Poly1305:
        """The record cipher, bound to the session id and both (Noise-authenticated) peers."""
        shared = self._private.exchange(X25519PublicKey.from_public_bytes(peer_public))
        info = b"|".join((b"hive-bulk/1", sender_id.encode(), receiver_id.encode(),
                          receiver_public, sender_public))
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=self.session,
                   info=info).derive(shared)
        self.aead = ChaCha20Poly1305(key)
        return self.aead


def _nonce(counter: int) -> bytes:
    return _DIRECTION + counter.to_bytes(8, "big")


def _tune(sock: socket.socket, buffer: int) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, buffer)
        except OSError:  # pragma: no cover - the kernel caps it; keep its default
            pass


def listen_host(listen: str) -> str:
    """The host of a ``/ip4/<host>/tcp/<port>`` (or ``/ip6/``) listen multiaddr."""
    parts = listen.split("/")
    return parts[2] if len(parts) > 2 and parts[1] in ("ip4", "ip6") else "127.0.0.1"


def poster(send: trio.MemorySendChannel[Any]) -> Callable[[Any], None]:
    """``post(item)`` for a worker thread: queue ``item`` on ``send`` without waiting (dropped
    once the trio side stopped listening)."""
    token = trio.lowlevel.current_trio_token()

    def post(item: Any) -> None:
        def deliver() -> None:
            try:
                send.send_nowait(item)
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                pass
        try:
            token.run_sync_soon(deliver)
        except trio.RunFinishedError:
            pass
    return post


def listen(host: str) -> socket.socket:
    """An ephemeral listening socket on ``host`` (raises OSError)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.bind((host, 0))
        sock.listen(8)
    except OSError:
        sock.close()
        raise
    return sock


def connect(host: str, port: int, timeout: float, buffer: int) -> socket.socket:
    """Blocking: the direct connection to the receiver's bulk port (raises OSError)."""
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.settimeout(None)
    _tune(sock, buffer)
    return sock


def _recv_exact(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if not n:
            raise EOFError(f"bulk connection closed after {got} of {len(view)} bytes")
        got += n


def _read_hello(conn: socket.socket, aead: ChaCha20Poly1305, session: bytes) -> bool:
    head = bytearray(_REC.size)
    _recv_exact(conn, memoryview(head))
    n, index, _ = _REC.unpack(head)
    if index != HELLO or n != len(session) + _TAG:
        return False
    body = bytearray(n)
    _recv_exact(conn, memoryview(body))
    try:
        return aead.decrypt(_nonce(0), bytes(body), session + bytes(head[4:])) == session
    except InvalidTag:
        return False


def accept_authenticated(listener: socket.socket, aead: ChaCha20Poly1305, session: bytes,
                         buffer: int, on_refused: Callable[[], None]) -> socket.socket:
    """Blocking: the first connection whose hello authenticates (``on_refused()`` for each
    one that did not: closed unread beyond its first record).

    Raises:
        ProtocolError: none did within ``_ACCEPT_TIMEOUT`` (or the listener was closed).
    """
    refused = 0
    end = time.monotonic() + _ACCEPT_TIMEOUT
    while True:
        left = end - time.monotonic()
        if left <= 0:
            raise ProtocolError(f"no authenticated bulk connection within {_ACCEPT_TIMEOUT:g}s "
                                f"({refused} refused)")
        listener.settimeout(left)
        try:
            conn, _ = listener.accept()
        except OSError as err:
            raise ProtocolError(f"bulk listener failed: {err!r} ({refused} refused)") from err
        conn.settimeout(_HELLO_TIMEOUT)
        try:
            ok = _read_hello(conn, aead, session)
        except (OSError, EOFError):
            ok = False
        if ok:
            conn.settimeout(None)
            _tune(conn, buffer)
            return conn
        refused += 1
        on_refused()
        conn.close()


Post = Callable[[Any], None]


def receive_records(conn: socket.socket, aead: ChaCha20Poly1305, session: bytes, part: Any,
                    post: Post) -> None:
    """Blocking (a worker thread): read chunk records into ``part`` until it has every chunk.

    Each record is decrypted into its place in ``part.buf``; its tag authenticates data and
    index (no CRC32 but where the sender flags one: fault injection); a helper thread hashes
    (:func:`prefix_hasher`). ``post((index, ok))`` per chunk, then ``post(None)`` or an error."""
    try:
        head, cipher, scratch, counter = bytearray(_REC.size), bytearray(part.step + _TAG), \
            bytearray(part.step), 1
        with prefix_hasher(part) as mark, memoryview(part.buf) as buf, \
                memoryview(head) as hv, memoryview(cipher) as cv:
            while part.missing:
                _recv_exact(conn, hv)
                n, index, crc = _REC.unpack(head)
                checked, n = bool(n & _CHECKED), n & ~_CHECKED
                size = n - _TAG
                if index >= part.count or size != min(part.step, part.size - index * part.step):
                    raise ProtocolError(f"bulk record for chunk {index} of {part.count} with "
                                        f"{size} bytes")
                _recv_exact(conn, cv[:n])
                start = index * part.step
                dest = memoryview(scratch)[:size] if part.have[index] \
                    else buf[start:start + size]
                try:
                    aead.decrypt_into(_nonce(counter), cv[:n], session + bytes(head[4:]), dest)
                except InvalidTag as err:
                    raise ProtocolError(f"bulk record {counter} failed authentication") from err
                counter += 1
                ok = not checked or zlib.crc32(dest) == crc
                if ok and not part.have[index]:
                    mark(index)
                post((index, ok))
        post(None)
    except BaseException as err:  # noqa: BLE001 - handed to the trio side
        post(err)


def send_records(conn: socket.socket, aead: ChaCha20Poly1305, session: bytes, view: memoryview,
                 step: int, todo: Any, mangle: Callable[[int, bytes], bytes] | None) -> None:
    """Blocking (a worker thread): the hello record, then a record per index taken from the
    queue ``todo`` until it yields ``None``. Raises OSError when the connection breaks."""
    out = bytearray(_REC.size + step + _TAG)
    _REC.pack_into(out, 0, len(session) + _TAG, HELLO, 0)
    hello = aead.encrypt(_nonce(0), session, session + bytes(out[4:_REC.size]))
    conn.sendall(bytes(out[:_REC.size]) + hello)
    counter = 1
    while True:
        index = todo.get()
        if index is None:
            return
        chunk: bytes | memoryview = view[index * step:(index + 1) * step]
        flag = crc = 0  # the tag authenticates the record: a CRC32 only to test a mangled one
        if mangle is not None:
            flag, crc = _CHECKED, zlib.crc32(chunk)
            chunk = mangle(index, bytes(chunk))
        n = len(chunk) + _TAG
        if len(out) < _REC.size + n:
            out = bytearray(_REC.size + n)
        _REC.pack_into(out, 0, n | flag, index, crc)
        with memoryview(out) as ov:
            aead.encrypt_into(_nonce(counter), chunk, session + bytes(ov[4:_REC.size]),
                              ov[_REC.size:_REC.size + n])
            conn.sendall(ov[:_REC.size + n])
        counter += 1


async def run_guarded(fn: Callable[[], Any], stop: Callable[[], None]) -> Any:
    """Run blocking ``fn`` in a worker thread; if this task is cancelled meanwhile, call
    ``stop`` (close its socket) so the thread returns, and wait for it."""
    result: list[Any] = []

    async def work() -> None:
        try:
            result.append(await trio.to_thread.run_sync(fn))
        finally:
            nursery.cancel_scope.cancel()

    async def guard() -> None:
        try:
            await trio.sleep_forever()
        finally:
            stop()

    with collapse_groups():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(guard)
            nursery.start_soon(work)
    return result[0] if result else None


def shutdown(sock: socket.socket) -> None:
    """Wake any thread blocked on ``sock`` and close it (idempotent)."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


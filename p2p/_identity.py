"""The persistent Ed25519 identity of a site.

Layout of an identity directory (created 0700)::

    identity.key    PKCS#8 PEM of the Ed25519 private key, 0600, optionally passphrase-encrypted
    identity.json   {"version": 1, "site": ..., "peer_id": ..., "encrypted": ...}, 0600

The peer id is derived exactly as libp2p derives it (``ID.from_pubkey`` over the libp2p
``Ed25519PublicKey``), so it is the id the host announces and Noise proves.

Permissions are enforced the way ssh enforces them: a key file readable or writable by group
or others, or a directory writable by group or others, is refused with an
:class:`~p2p.IdentityError` that names the path and the ``chmod`` that fixes it.
"""

from __future__ import annotations

import os
import stat
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519 as crypto_ed25519
from libp2p.crypto.ed25519 import Ed25519PrivateKey
from libp2p.crypto.keys import KeyPair
from libp2p.peer.id import ID
from pydantic import BaseModel, ConfigDict, ValidationError

from p2p._exceptions import IdentityError

__all__ = ["KEY_FILE", "META_FILE", "SiteIdentity", "generate_identity", "init_identity",
           "load_identity"]

KEY_FILE = "identity.key"
META_FILE = "identity.json"


class _IdentityRecord(BaseModel):
    """identity.json: what can be read without the passphrase."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: int = 1
    site: str
    peer_id: str
    encrypted: bool


@dataclass(frozen=True)
class SiteIdentity:
    """A site's key pair and the peer id derived from it.

    Attributes:
        site: the site's name (free text chosen at ``init_identity``).
        peer_id: the libp2p peer id (base58, ``12D3KooW...``).
        key_pair: the libp2p key pair the host signs its Noise handshakes with.
        path: the identity directory, or ``None`` for an in-memory identity.
    """

    site: str
    peer_id: str
    key_pair: KeyPair = field(repr=False, compare=False)
    path: Path | None = None


def _from_raw(site: str, raw: bytes, path: Path | None) -> SiteIdentity:
    private = Ed25519PrivateKey.from_bytes(raw)
    pair = KeyPair(private, private.get_public_key())
    return SiteIdentity(site=site, peer_id=ID.from_pubkey(pair.public_key).to_base58(),
                        key_pair=pair, path=path)


def generate_identity(site: str) -> SiteIdentity:
    """Make a fresh identity that lives only in memory (tests, throw-away nodes).

    Args:
        site: the site's name.

    Returns:
        A new :class:`SiteIdentity` with ``path=None``.

    Example:
        >>> generate_identity("lab").peer_id.startswith("12D3KooW")
        True
    """
    key = crypto_ed25519.Ed25519PrivateKey.generate()
    raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                            serialization.NoEncryption())
    return _from_raw(site, raw, None)


def _write_new(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` with mode 0600; fail if ``path`` exists (atomic, no clobber)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)  # refuses to replace an existing file, unlike rename
    finally:
        tmp.unlink(missing_ok=True)


def _check_dir(directory: Path) -> None:
    mode = stat.S_IMODE(directory.stat().st_mode)
    if mode & 0o022:
        raise IdentityError(
            f"identity directory {directory} is writable by group or others (mode {mode:o}); "
            f"anyone who can write there can swap the site key. Run `chmod 700 {directory}`.",
            path=str(directory))


def init_identity(directory: str | os.PathLike[str], site: str,
                  passphrase: str | bytes | None = None) -> SiteIdentity:
    """Create a site identity in ``directory``; never overwrites an existing one.

    Args:
        directory: where to keep the key (created with mode 0700 if missing).
        site: the site's name, stored next to the key.
        passphrase: encrypt the key with it (PKCS#8, best available encryption); ``None``
            stores it unencrypted (still 0600).

    Returns:
        The new :class:`SiteIdentity`.

    Raises:
        IdentityError: a key already exists there (``path`` names it), the directory is
            writable by group/others, or the site name is empty.

    Example:
        >>> ident = init_identity(tmp_path / "id", "site-a")          # doctest: +SKIP
        >>> load_identity(tmp_path / "id").peer_id == ident.peer_id   # doctest: +SKIP
        True
    """
    if not site.strip():
        raise IdentityError("site name is empty; pass a name such as 'site-a'", path=None)
    root = Path(directory)
    key_path, meta_path = root / KEY_FILE, root / META_FILE
    if key_path.exists() or meta_path.exists():
        existing = key_path if key_path.exists() else meta_path
        raise IdentityError(
            f"refusing to overwrite the existing site identity at {existing}; load it with "
            f"load_identity({str(root)!r}) or choose another directory", path=str(existing))
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    _check_dir(root)
    ident = generate_identity(site)
    crypto_key = crypto_ed25519.Ed25519PrivateKey.from_private_bytes(
        ident.key_pair.private_key.to_bytes()[:32])
    secret = passphrase.encode() if isinstance(passphrase, str) else passphrase
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(secret) if secret else serialization.NoEncryption())
    pem = crypto_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   encryption)
    record = _IdentityRecord(site=site, peer_id=ident.peer_id, encrypted=bool(secret))
    try:
        _write_new(key_path, pem)
        _write_new(meta_path, record.model_dump_json(indent=2).encode())
    except FileExistsError as err:
        raise IdentityError(f"refusing to overwrite the existing site identity at "
                            f"{err.filename or key_path}", path=str(key_path)) from err
    return SiteIdentity(site=site, peer_id=ident.peer_id, key_pair=ident.key_pair, path=root)


def _read_private(path: Path, secret: bytes | None) -> bytes:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise IdentityError(
            f"site key {path} is accessible by group or others (mode {mode:o}); "
            f"run `chmod 600 {path}`", path=str(path))
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=secret)
    except TypeError as err:  # passphrase given for a plain key, or missing for an encrypted one
        hint = ("the key is encrypted: pass passphrase=..." if secret is None
                else "the key is not encrypted: pass passphrase=None")
        raise IdentityError(f"cannot read site key {path}: {hint}", path=str(path)) from err
    except ValueError as err:
        what = "wrong passphrase" if secret is not None else "not a PEM private key"
        raise IdentityError(f"cannot read site key {path}: {what}", path=str(path)) from err
    if not isinstance(key, crypto_ed25519.Ed25519PrivateKey):
        raise IdentityError(f"site key {path} is not an Ed25519 key", path=str(path))
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())


def load_identity(directory: str | os.PathLike[str],
                  passphrase: str | bytes | None = None) -> SiteIdentity:
    """Load the site identity that :func:`init_identity` created.

    Args:
        directory: the identity directory.
        passphrase: the passphrase the key was encrypted with (``None`` if it was not).

    Returns:
        The :class:`SiteIdentity`; its ``peer_id`` is re-derived from the key and checked
        against ``identity.json``.

    Raises:
        IdentityError: missing files (run ``init_identity``), bad permissions (the message
            names the ``chmod``), a wrong or missing passphrase, or a key that does not
            match its recorded peer id. ``path`` names the file.

    Example:
        >>> load_identity("/etc/hive/p2p", passphrase="s3cret").site   # doctest: +SKIP
        'site-a'
    """
    root = Path(directory)
    key_path, meta_path = root / KEY_FILE, root / META_FILE
    for p in (key_path, meta_path):
        if not p.is_file():
            raise IdentityError(f"no site identity at {p}; create one with "
                                f"init_identity({str(root)!r}, site=...)", path=str(p))
    _check_dir(root)
    try:
        record = _IdentityRecord.model_validate_json(meta_path.read_bytes())
    except ValidationError as err:
        raise IdentityError(f"{meta_path} is not a valid identity record: {err}",
                            path=str(meta_path)) from err
    secret = passphrase.encode() if isinstance(passphrase, str) else passphrase
    ident = _from_raw(record.site, _read_private(key_path, secret or None), root)
    if ident.peer_id != record.peer_id:
        raise IdentityError(
            f"site key {key_path} derives peer id {ident.peer_id} but {meta_path} records "
            f"{record.peer_id}; the files do not belong together", path=str(key_path))
    return ident

"""Site identity: create, load, refuse to overwrite, permissions, passphrase."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from libp2p.peer.id import ID

from p2p import IdentityError, generate_identity, init_identity, load_identity
from p2p._identity import KEY_FILE, META_FILE


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_then_load_gives_the_same_peer_id(tmp_path: Path) -> None:
    d = tmp_path / "ident"
    created = init_identity(d, "site-a")
    loaded = load_identity(d)
    assert loaded.peer_id == created.peer_id and loaded.site == "site-a"
    assert loaded.peer_id.startswith("12D3KooW")
    # derived exactly as libp2p derives it from the public key
    assert ID.from_pubkey(loaded.key_pair.public_key).to_base58() == created.peer_id
    assert mode(d) == 0o700
    assert mode(d / KEY_FILE) == 0o600 and mode(d / META_FILE) == 0o600


def test_refuses_to_overwrite_and_names_the_path(tmp_path: Path) -> None:
    first = init_identity(tmp_path / "id", "site-a")
    before = (tmp_path / "id" / KEY_FILE).read_bytes()
    with pytest.raises(IdentityError) as info:
        init_identity(tmp_path / "id", "site-b")
    assert str(tmp_path / "id" / KEY_FILE) in str(info.value)
    assert info.value.path == str(tmp_path / "id" / KEY_FILE)
    assert (tmp_path / "id" / KEY_FILE).read_bytes() == before
    assert load_identity(tmp_path / "id").peer_id == first.peer_id


def test_missing_identity_says_how_to_create_one(tmp_path: Path) -> None:
    with pytest.raises(IdentityError, match="init_identity"):
        load_identity(tmp_path / "nothing-here")


def test_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    init_identity(tmp_path / "id", "site-a")
    os.chmod(tmp_path / "id" / KEY_FILE, 0o644)
    with pytest.raises(IdentityError, match="chmod 600"):
        load_identity(tmp_path / "id")
    os.chmod(tmp_path / "id" / KEY_FILE, 0o600)
    assert load_identity(tmp_path / "id").site == "site-a"


def test_directory_writable_by_others_is_refused(tmp_path: Path) -> None:
    init_identity(tmp_path / "id", "site-a")
    os.chmod(tmp_path / "id", 0o777)
    with pytest.raises(IdentityError, match="chmod 700"):
        load_identity(tmp_path / "id")


def test_passphrase_encrypts_the_key(tmp_path: Path) -> None:
    created = init_identity(tmp_path / "id", "site-a", passphrase="correct horse")
    pem = (tmp_path / "id" / KEY_FILE).read_bytes()
    assert b"ENCRYPTED PRIVATE KEY" in pem
    assert load_identity(tmp_path / "id", passphrase="correct horse").peer_id == created.peer_id
    with pytest.raises(IdentityError, match="wrong passphrase"):
        load_identity(tmp_path / "id", passphrase="battery staple")
    with pytest.raises(IdentityError, match="encrypted: pass passphrase"):
        load_identity(tmp_path / "id")


def test_passphrase_given_for_a_plain_key_is_an_error(tmp_path: Path) -> None:
    init_identity(tmp_path / "id", "site-a")
    assert b"BEGIN PRIVATE KEY" in (tmp_path / "id" / KEY_FILE).read_bytes()
    with pytest.raises(IdentityError, match="not encrypted"):
        load_identity(tmp_path / "id", passphrase="x")


def test_key_and_record_that_do_not_belong_together(tmp_path: Path) -> None:
    init_identity(tmp_path / "a", "site-a")
    init_identity(tmp_path / "b", "site-b")
    os.replace(tmp_path / "b" / KEY_FILE, tmp_path / "a" / KEY_FILE)
    with pytest.raises(IdentityError, match="do not belong together"):
        load_identity(tmp_path / "a")


def test_generated_identities_differ() -> None:
    assert generate_identity("x").peer_id != generate_identity("x").peer_id

"""The bus's keys in a directory (bus.credentials): modes, idempotence, key kinds."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import nkeys
import pytest

from bus.credentials import BusCredentials, ensure_credentials, public_key, write_secret
from bus.permissions import ROLES


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


@pytest.fixture
def permissive_umask() -> Iterator[None]:
    """The modes must not depend on the caller's umask being strict."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def secret_files(creds: BusCredentials) -> list[Path]:
    return [creds.seed_file(r) for r in ROLES] + [creds.issuer_file, creds.consumer_key_file]


@pytest.mark.usefixtures("permissive_umask")
def test_files_are_0600_and_the_directory_0700(tmp_path: Path) -> None:
    creds = ensure_credentials(tmp_path / "data" / "bus")
    assert mode(creds.directory) == 0o700
    files = secret_files(creds)
    assert sorted(p.name for p in creds.directory.iterdir()) == sorted(p.name for p in files)
    for path in files:
        assert path.is_file()
        assert mode(path) == 0o600, path


def test_layout(tmp_path: Path) -> None:
    creds = ensure_credentials(tmp_path / "bus")
    assert creds.directory == tmp_path / "bus"
    assert {creds.seed_file(r).name for r in ROLES} == {
        "gateway.nk",
        "twin.nk",
        "callout.nk",
        "admin.nk",
    }
    assert creds.issuer_file.name == "issuer.nk"
    assert creds.consumer_key_file.name == "consumer-key"
    assert len(creds.consumer_key_file.read_bytes()) == 32


def test_a_second_ensure_keeps_every_key(tmp_path: Path) -> None:
    first = ensure_credentials(tmp_path / "bus")
    before = {p: p.read_bytes() for p in secret_files(first)}
    users, issuer = first.users(), first.issuer_public()
    second = ensure_credentials(tmp_path / "bus")
    assert {p: p.read_bytes() for p in secret_files(second)} == before
    assert second.users() == users
    assert second.issuer_public() == issuer


def test_a_missing_key_is_made_alone(tmp_path: Path) -> None:
    creds = ensure_credentials(tmp_path / "bus")
    before = {p: p.read_bytes() for p in secret_files(creds)}
    creds.seed_file("twin").unlink()
    creds.consumer_key_file.unlink()
    assert not creds.exists()
    ensure_credentials(tmp_path / "bus")
    assert creds.exists()
    after = {p: p.read_bytes() for p in secret_files(creds)}
    changed = {p.name for p in after if after[p] != before[p]}
    assert changed == {"twin.nk", "consumer-key"}


def test_every_key_is_new(tmp_path: Path) -> None:
    a = ensure_credentials(tmp_path / "a")
    b = ensure_credentials(tmp_path / "b")
    keys = [*a.users().values(), a.issuer_public(), *b.users().values(), b.issuer_public()]
    assert len(set(keys)) == len(keys)
    assert a.consumer_key_file.read_bytes() != b.consumer_key_file.read_bytes()


def test_users_are_user_keys_and_the_issuer_an_account_key(tmp_path: Path) -> None:
    creds = ensure_credentials(tmp_path / "bus")
    users = creds.users()
    assert set(users) == set(ROLES)
    for role, key in users.items():
        assert key.startswith("U") and len(key) == 56, role
        seed = creds.seed_file(role).read_bytes()
        assert seed.startswith(b"SU")
        assert public_key(seed) == key
    issuer = creds.issuer_public()
    assert issuer.startswith("A") and len(issuer) == 56
    assert creds.issuer_file.read_bytes().startswith(b"SA")


def test_the_keys_sign_and_verify(tmp_path: Path) -> None:
    creds = ensure_credentials(tmp_path / "bus")
    kp = nkeys.from_seed(bytearray(creds.issuer_file.read_bytes()))
    sig = kp.sign(b"hello")
    assert kp.verify(b"hello", sig)
    assert bytes(kp.public_key).decode() == creds.issuer_public()


def test_public_key_tolerates_a_trailing_newline(tmp_path: Path) -> None:
    creds = ensure_credentials(tmp_path / "bus")
    seed = creds.seed_file("gateway").read_bytes()
    assert public_key(seed + b"\n") == public_key(seed)


def test_exists(tmp_path: Path) -> None:
    creds = BusCredentials(tmp_path / "bus")
    assert not creds.exists()
    ensure_credentials(creds.directory)
    assert creds.exists()
    creds.issuer_file.unlink()
    assert not creds.exists()


@pytest.mark.usefixtures("permissive_umask")
def test_write_secret_is_0600_even_over_a_stale_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "x.nk"
    stale = tmp_path / "x.nk.tmp"
    stale.write_bytes(b"old")
    stale.chmod(0o644)
    write_secret(target, b"secret")
    assert target.read_bytes() == b"secret"
    assert mode(target) == 0o600
    assert not stale.exists()


def test_write_secret_does_not_follow_a_symlink(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_bytes(b"untouched")
    (tmp_path / "x.nk.tmp").symlink_to(elsewhere)
    write_secret(tmp_path / "x.nk", b"secret")
    assert elsewhere.read_bytes() == b"untouched"
    assert (tmp_path / "x.nk").read_bytes() == b"secret"
    assert not (tmp_path / "x.nk").is_symlink()


def test_write_secret_replaces(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "x"
    write_secret(target, b"one")
    write_secret(target, b"two")
    assert target.read_bytes() == b"two"
    assert mode(target) == 0o600

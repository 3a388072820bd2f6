"""Self-provisioning profiles in the configuration (``twin.provision_profiles``): parsed at
start, secrets read from private files when the twin service starts (services.profiles_for);
the gateway's relay settings (``gateway.udp_provision*``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from twinhub_cli import config as cfgmod
from twinhub_cli import services
from twinhub_cli.config import ConfigError, ProvisionProfile, provision_profiles


def secret(path: Path, text: str = "s3cret-0123456789\n", mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def load(*profiles: str) -> cfgmod.Config:
    return cfgmod.load(env={}, overrides={"twin": {"provision_profiles": list(profiles)}})


def test_none_by_default() -> None:
    config = cfgmod.load(env={})
    assert config.twin.provision_profiles == ()
    assert len(services.profiles_for(config)) == 0
    assert config.gateway.udp_provision is True
    names = cfgmod.env_names()
    assert "TWINHUB_TWIN_PROVISION_PROFILES" in names
    assert "TWINHUB_GATEWAY_UDP_PROVISION_RATE" in names


def test_profiles_are_parsed(tmp_path: Path) -> None:
    path = secret(tmp_path / "s")
    config = load(
        f"factory; owner=alice; key=k-1; secret_file={path}",
        f"lab;owner=bob;key=k-2;secret_file={path};strategy=allow-create",
    )
    assert provision_profiles(config.twin) == (
        ProvisionProfile("factory", "alice", "k-1", str(path)),
        ProvisionProfile("lab", "bob", "k-2", str(path)),
    )
    profiles = services.profiles_for(config)
    assert len(profiles) == 2
    found = profiles.match("k-1", "s3cret-0123456789")  # the final newline is not part of it
    assert found is not None and (found.name, found.owner) == ("factory", "alice")
    assert profiles.match("k-1", "s3cret-0123456789\n") is None


def test_from_the_environment(tmp_path: Path) -> None:
    path = secret(tmp_path / "s")
    env = {"TWINHUB_TWIN_PROVISION_PROFILES": f"a;owner=o;key=k;secret_file={path}"}
    config = cfgmod.load(env=env)
    assert [p.name for p in provision_profiles(config.twin)] == ["a"]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("owner=o;key=k;secret_file=/x", "must start with the profile's name"),
        (";owner=o;key=k;secret_file=/x", "must start with the profile's name"),
        ("p;owner=o;secret_file=/x", "missing key"),
        ("p;owner=o;key=;secret_file=/x", "missing key"),
        ("p;key=k", "missing owner, secret_file"),
        ("p;owner=o;key=k;secret=/x", "expected one of"),
        ("p;owner=o;key=k;secret_file=/x;owner=p", "owner twice"),
        ("p;owner=o;key=k;secret_file=/x;strategy=check-pre-provisioned", "strategy must be"),
    ],
)
def test_malformed_profiles_stop_the_start(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(spec)


def test_names_and_keys_are_unique() -> None:
    with pytest.raises(ConfigError, match="profile 'a' twice"):
        load("a;owner=o;key=k1;secret_file=/x", "a;owner=o;key=k2;secret_file=/x")
    with pytest.raises(ConfigError, match="the same key as profile 'a'"):
        load("a;owner=o;key=k;secret_file=/x", "b;owner=o;key=k;secret_file=/x")


@pytest.mark.parametrize(
    ("text", "mode", "message"),
    [
        ("s" * 16, 0o644, "is readable by others: chmod 600 it"),
        ("s" * 16, 0o640, "is readable by others: chmod 600 it"),
        ("\n", 0o600, "is empty"),
        ("too-short\n", 0o600, "at least 16 bytes"),
    ],
)
def test_the_secret_file_must_be_private_and_the_secret_long(
    tmp_path: Path, text: str, mode: int, message: str
) -> None:
    path = secret(tmp_path / "s", text, mode)
    config = load(f"p;owner=o;key=k;secret_file={path}")  # parsed: the file is read later
    with pytest.raises(ConfigError, match=message):
        services.profiles_for(config)


def test_a_missing_secret_file(tmp_path: Path) -> None:
    config = load(f"p;owner=o;key=k;secret_file={tmp_path / 'nope'}")
    with pytest.raises(ConfigError, match=r"'p'.*secret_file: no such file"):
        services.profiles_for(config)


def test_the_secret_is_never_in_the_configuration(tmp_path: Path) -> None:
    path = secret(tmp_path / "s", "do-not-show-0123456789")
    config = load(f"p;owner=o;key=k;secret_file={path}")
    assert "do-not-show" not in repr(config)
    assert "do-not-show" not in repr(
        services.profiles_for(config).match("k", "do-not-show-0123456789")
    )

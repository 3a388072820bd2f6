"""How to reach NATS (eventstore.adapters.endpoint.NatsEndpoint): credentials never in the URL,
never in a log line, and connect options nats-py understands."""

from __future__ import annotations

import inspect
import ssl
from pathlib import Path

import pytest
from nats.aio.client import Client as NatsClient

from bus.credentials import ensure_credentials
from eventstore.adapters.endpoint import NatsEndpoint
from twinhub_cli import pki

TOKEN = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2VjcmV0LXNpZ25hdHVyZQ"


@pytest.fixture
def seed_file(tmp_path: Path) -> Path:
    return ensure_credentials(tmp_path / "bus").seed_file("gateway")


def ca_file(tmp_path: Path) -> Path:
    return pki.create_ca(tmp_path / "pki", common_name="test CA").cert_path


def test_a_seed_and_a_token_together_are_refused(seed_file: Path) -> None:
    with pytest.raises(ValueError, match="not both"):
        NatsEndpoint("nats://127.0.0.1:4222", seed_file=seed_file, token=TOKEN)


@pytest.mark.parametrize(
    "url",
    [
        "nats://user:pass@127.0.0.1:4222",
        "nats://s3cr3t-token@127.0.0.1:4222",
        "tls://user:pass@nats.example:4222",
        "user:pass@127.0.0.1:4222",
        "nats://a:4222,nats://user:pass@b:4222",
        "nats://a:4222, tls://s3cr3t@b:4222",
        "nats://user:pass@a:4222,nats://b:4222",
    ],
)
def test_credentials_in_the_url_are_refused(url: str) -> None:
    with pytest.raises(ValueError, match="URL") as info:
        NatsEndpoint(url)
    for secret in ("pass", "s3cr3t"):
        assert secret not in str(info.value)  # the refusal does not log the secret either


@pytest.mark.parametrize(
    "url",
    ["nats://127.0.0.1:4222", "tls://nats.example:4222", "nats://a:1,nats://b:2", "nats://h/x@y"],
)
def test_urls_without_credentials_are_fine(url: str) -> None:
    assert NatsEndpoint(url).url == url


def test_repr_and_str_hold_no_secret(seed_file: Path) -> None:
    seed = seed_file.read_bytes().strip().decode()
    with_seed = NatsEndpoint("nats://127.0.0.1:4222", seed_file=seed_file)
    with_token = NatsEndpoint("nats://127.0.0.1:4222", token=TOKEN, inbox_prefix="_INBOX.alice")
    for endpoint in (with_seed, with_token):
        for text in (
            str(endpoint),
            repr(endpoint),
            f"{endpoint}",
            f"{endpoint!r}",
            f"{[endpoint]}",
        ):
            assert TOKEN not in text
            assert TOKEN.split(".")[2] not in text  # not even the signature
            assert seed not in text
            assert seed[:12] not in text
            assert str(seed_file) not in text
    assert str(with_seed) == str(with_token) == "nats://127.0.0.1:4222"
    assert "seed" in repr(with_seed)
    assert "token" in repr(with_token)
    assert "anonymous" in repr(NatsEndpoint("nats://127.0.0.1:4222"))


def test_servers_are_the_comma_separated_urls() -> None:
    endpoint = NatsEndpoint("nats://a:1, nats://b:2,,")
    assert endpoint.servers == ["nats://a:1", "nats://b:2"]


def test_connect_options_with_a_seed(seed_file: Path) -> None:
    opts = NatsEndpoint("nats://a:1,nats://b:2", seed_file=seed_file).connect_options()
    assert opts == {"servers": ["nats://a:1", "nats://b:2"], "nkeys_seed": str(seed_file)}


def test_connect_options_with_a_token() -> None:
    endpoint = NatsEndpoint("nats://a:1", token=TOKEN, inbox_prefix="_INBOX.alice")
    assert endpoint.connect_options() == {
        "servers": ["nats://a:1"],
        "token": TOKEN,
        "inbox_prefix": "_INBOX.alice",
    }


def test_connect_options_without_credentials() -> None:
    assert NatsEndpoint("nats://a:1").connect_options() == {"servers": ["nats://a:1"]}


def test_connect_options_with_a_ca(tmp_path: Path) -> None:
    ca = ca_file(tmp_path)
    endpoint = NatsEndpoint("tls://a:1", token=TOKEN, ca_file=ca)
    opts = endpoint.connect_options()
    assert set(opts) == {"servers", "token", "tls"}
    tls = opts["tls"]
    assert isinstance(tls, ssl.SSLContext)
    assert tls.verify_mode == ssl.CERT_REQUIRED
    assert tls.check_hostname
    assert any(c.get("subject") == ((("commonName", "test CA"),),) for c in tls.get_ca_certs())
    assert NatsEndpoint("tls://a:1").ssl_context() is None


def test_connect_options_are_nats_py_parameters(seed_file: Path, tmp_path: Path) -> None:
    accepted = set(inspect.signature(NatsClient.connect).parameters)
    for endpoint in (
        NatsEndpoint("nats://a:1", seed_file=seed_file, ca_file=ca_file(tmp_path)),
        NatsEndpoint("nats://a:1", token=TOKEN, inbox_prefix="_INBOX.x"),
    ):
        assert set(endpoint.connect_options()) <= accepted


def test_with_token_drops_the_seed(seed_file: Path) -> None:
    service = NatsEndpoint("nats://a:1", seed_file=seed_file, inbox_prefix="_INBOX.gateway")
    app = service.with_token(TOKEN, "_INBOX.alice")
    assert app.seed_file is None
    assert app.token == TOKEN
    assert app.inbox_prefix == "_INBOX.alice"
    assert "nkeys_seed" not in app.connect_options()
    assert service.seed_file == seed_file  # frozen: the original is unchanged
    assert service.with_token(TOKEN).inbox_prefix is None


def test_an_endpoint_is_frozen() -> None:
    endpoint = NatsEndpoint("nats://a:1")
    with pytest.raises(AttributeError):
        endpoint.token = TOKEN  # type: ignore[misc]

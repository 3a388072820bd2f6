"""The websocket listener of the bus (bus.serverconf.WebSocketListener), where the web console
connects: under the same auth callout as every client (no authorization of its own), TLS
wherever it leaves the host; the real ``nats-server -t`` accepts the configuration."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bus.credentials import BusCredentials, ensure_credentials
from bus.serverconf import ServerTls, WebSocketListener, render_server_config
from twinhub_cli import pki

from .test_serverconf import nats_server_accepts

AUTH_KEYS = {"authorization", "username", "password", "token", "users", "nkeys", "no_auth_user"}


@pytest.fixture
def creds(tmp_path: Path) -> BusCredentials:
    return ensure_credentials(tmp_path / "bus")


def render(creds: BusCredentials, **kw: Any) -> str:
    return render_server_config(
        issuer=creds.issuer_public(),
        users=creds.users(),
        stream="TWINHUB_EVENTS",
        projector="twin-projector",
        **kw,
    )


def tls(tmp_path: Path) -> ServerTls:
    server = pki.issue_server(pki.create_ca(tmp_path / "pki"), tmp_path / "pki", ["localhost"])
    return ServerTls(server.cert_path, server.key_path)


def test_no_websocket_listener_unless_asked(creds: BusCredentials) -> None:
    assert "websocket" not in json.loads(render(creds))


def test_loopback_websocket_is_plain_and_under_the_auth_callout(
    creds: BusCredentials, tmp_path: Path
) -> None:
    text = render(creds, websocket=WebSocketListener("127.0.0.1", -1))
    conf = json.loads(text)
    assert conf["websocket"] == {"host": "127.0.0.1", "port": -1, "no_tls": True}
    assert not AUTH_KEYS & set(conf["websocket"])  # the server's auth callout decides
    assert conf["authorization"]["auth_callout"]["account"] == "AUTH"
    ran = nats_server_accepts(tmp_path, text)
    assert ran.returncode == 0, ran.stderr + ran.stdout


def test_websocket_beyond_loopback_speaks_tls(creds: BusCredentials, tmp_path: Path) -> None:
    server = tls(tmp_path)
    text = render(creds, tls=server, websocket=WebSocketListener("0.0.0.0", 4223))
    ws = json.loads(text)["websocket"]
    assert ws["tls"] == {"cert_file": str(server.cert_file), "key_file": str(server.key_file)}
    assert "no_tls" not in ws
    ran = nats_server_accepts(tmp_path, text)
    assert ran.returncode == 0, ran.stderr + ran.stdout


def test_websocket_beyond_loopback_without_tls_is_refused(creds: BusCredentials) -> None:
    with pytest.raises(ValueError, match="needs TLS"):
        render(creds, websocket=WebSocketListener("0.0.0.0", 4223))


@pytest.mark.parametrize("port", [0, -2, 65536])
def test_websocket_port_out_of_range(port: int) -> None:
    with pytest.raises(ValueError, match="out of range"):
        WebSocketListener("127.0.0.1", port)

"""The web console's static server (twinhub_cli.console): the bundle's files and config.json,
nothing else, with headers that keep the page to itself and to NATS."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from twinhub_cli.console import FILES, ConsoleNotBuiltError, ConsoleServer, serve_console


@pytest.fixture
def assets(tmp_path: Path) -> Path:
    d = tmp_path / "dist"
    d.mkdir()
    for name in FILES:
        (d / name).write_text(f"/* {name} */")
    (tmp_path / "secret.txt").write_text("not served")
    return d


@pytest.fixture
def console(assets: Path) -> Iterator[ConsoleServer]:
    with serve_console("ws://127.0.0.1:4223", assets=assets, owner_claim="owner") as c:
        yield c


def get(url: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_serves_the_bundle_and_its_configuration(console: ConsoleServer) -> None:
    assert console.url.startswith("http://127.0.0.1:")
    status, headers, body = get(console.url)
    assert status == 200
    assert body == b"/* index.html */"
    assert headers["Content-Type"].startswith("text/html")
    csp = headers["Content-Security-Policy"]
    assert "connect-src 'self' ws://127.0.0.1:4223;" in csp
    assert "script-src 'self';" in csp and "unsafe-inline" not in csp
    assert headers["Referrer-Policy"] == "no-referrer"
    assert headers["X-Content-Type-Options"] == "nosniff"
    status, headers, body = get(console.url + "app.js")
    assert (status, body) == (200, b"/* app.js */")
    assert headers["Content-Type"].startswith("text/javascript")
    status, _, body = get(console.url + "config.json")
    assert status == 200
    assert json.loads(body) == {"nats_ws_url": "ws://127.0.0.1:4223", "owner_claim": "owner"}


@pytest.mark.parametrize("path", ["../secret.txt", "%2e%2e/secret.txt", "dist/app.js", "x"])
def test_nothing_else_is_served(console: ConsoleServer, path: str) -> None:
    status, _, body = get(console.url + path)
    assert status == 404
    assert b"not served" not in body


def test_the_sign_in_link_carries_the_token_in_the_fragment(console: ConsoleServer) -> None:
    link = console.sign_in_link("a.b+c/d")
    assert link == console.url + "#token=a.b%2Bc%2Fd"
    assert "?" not in link


def test_an_unbuilt_console_says_how_to_build_it(tmp_path: Path) -> None:
    with pytest.raises(ConsoleNotBuiltError, match=r"\./scripts/setup"):
        ConsoleServer("ws://127.0.0.1:1", assets=tmp_path)

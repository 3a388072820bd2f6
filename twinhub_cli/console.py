"""The web console's static server: the built single-page app (``console/``) and its
``config.json``, on loopback by default.

The console talks to NATS itself, over nats-server's websocket listener, with the user's
token (the same auth callout and permissions as any application): this server only hands out
files, holds no secret and sees no token (the one-time sign-in link carries the token in the
URL's fragment, which browsers never send). So a thread of the standard library's HTTP server
is enough; it serves a fixed set of files, nothing from a path the request names.

The bundle is built by ``./scripts/setup`` (``npm ci`` and esbuild, ``console/build.mjs``) into
``console/dist``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Iterator
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Final
from urllib.parse import quote, urlsplit

__all__ = ["ConsoleNotBuiltError", "ConsoleServer", "default_assets", "serve_console"]

log = logging.getLogger(__name__)

FILES: Final = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "uplot.css": "text/css; charset=utf-8",
}


class ConsoleNotBuiltError(FileNotFoundError):
    """The console's bundle is missing: ``./scripts/setup`` builds it."""


def default_assets() -> Path:
    """``console/dist`` of the checkout this package runs from."""
    return Path(__file__).resolve().parent.parent / "console" / "dist"


def _ws_origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


class ConsoleServer:
    """The console on ``http://host:port/`` (port 0: any free one), telling the app to connect
    to NATS at ``nats_ws_url`` (``ws://`` on loopback, else ``wss://``)."""

    def __init__(
        self,
        nats_ws_url: str,
        *,
        assets: Path | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        owner_claim: str = "sub",
    ) -> None:
        self.assets = (assets or default_assets()).resolve()
        missing = [name for name in FILES if not (self.assets / name).is_file()]
        if missing:
            raise ConsoleNotBuiltError(
                f"the web console is not built ({self.assets} lacks {', '.join(missing)}): "
                "run ./scripts/setup"
            )
        self._files = {name: (self.assets / name).read_bytes() for name in FILES}
        self._config = json.dumps({"nats_ws_url": nats_ws_url, "owner_claim": owner_claim}).encode()
        # the app may connect to its own origin and to NATS only; no inline script or style
        self._csp = (
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
            f"connect-src 'self' {_ws_origin(nats_ws_url)}; frame-ancestors 'none'; "
            "base-uri 'none'; form-action 'none'"
        )
        self.nats_ws_url = nats_ws_url
        self._server = ThreadingHTTPServer((host, port), self._handler())
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        h = str(host)
        return f"http://{f'[{h}]' if ':' in h else h}:{port}/"

    def sign_in_link(self, token: str) -> str:
        """The console's URL signing in with ``token``: in the fragment, which the browser
        keeps to itself (never in a request, a server log or a Referer); the app takes it out
        of the address bar at once."""
        return f"{self.url}#token={quote(token, safe='')}"

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="twinhub-console", daemon=True
        )
        self._thread.start()
        log.info("web console on %s (NATS %s)", self.url, self.nats_ws_url)

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        console = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "twinhub-console"
            sys_version = ""

            def do_GET(self) -> None:
                self._serve(body=True)

            def do_HEAD(self) -> None:
                self._serve(body=False)

            def _serve(self, *, body: bool) -> None:
                name = urlsplit(self.path).path.lstrip("/") or "index.html"
                if name == "config.json":
                    data, ctype = console._config, "application/json"
                elif name in console._files:
                    data, ctype = console._files[name], FILES[name]
                else:
                    self.send_error(HTTPStatus.NOT_FOUND)
                    return
                self.send_response(HTTPStatus.OK)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Cache-Control", "no-store")
                self.send_header("Content-Security-Policy", console._csp)
                self.send_header("X-Content-Type-Options", "nosniff")
                self.send_header("Referrer-Policy", "no-referrer")
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:
                log.debug("console %s: " + format, self.client_address[0], *args)

        return Handler


@contextlib.contextmanager
def serve_console(
    nats_ws_url: str,
    *,
    assets: Path | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    owner_claim: str = "sub",
) -> Iterator[ConsoleServer]:
    """The console served for the block (:class:`ConsoleServer`)."""
    server = ConsoleServer(
        nats_ws_url, assets=assets, host=host, port=port, owner_claim=owner_claim
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()

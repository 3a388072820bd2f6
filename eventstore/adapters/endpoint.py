"""How to reach NATS: the URL(s) and the credentials of one connection, never in the URL.

Every process of twinhub and every application connects to an authenticated NATS server
(PRODUCT.md section 10): twinhub's services with an NKey seed file (``seed_file``, mode 0600),
applications with their twinhub JWT as the connection token (``token``; the server's auth
callout validates it). ``ca_file`` turns on TLS verification against that CA. ``inbox_prefix``
names the subjects replies come back on: an application may only receive on its own prefix.

``str(endpoint)`` is the URL alone, so an endpoint can be logged; the token and the seed
never are.

:class:`ConnectionLog` is how every long-lived connection (gateway, twin, callout, client, CLI)
reports on its state: one line when it is lost, one when reconnecting keeps failing, one when
it is back -- not nats-py's default, a traceback for every failed reconnect attempt.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import nats.errors

if TYPE_CHECKING:
    from nats.aio.client import Client as NatsClient

__all__ = ["ConnectionLog", "NatsEndpoint"]

Hook = Callable[[], Awaitable[None]]

# What ends a connection (the read loop reports it just before the reconnect starts).
_CONNECTION_LOSS: Final = (
    OSError,  # TimeoutError included
    nats.errors.UnexpectedEOF,
    nats.errors.StaleConnectionError,
    nats.errors.ConnectionClosedError,
)
_REPEAT_AFTER: Final = 60.0  # seconds before the same other error is logged again


@dataclass(frozen=True, slots=True)
class NatsEndpoint:
    url: str
    seed_file: Path | None = None
    token: str | None = None
    ca_file: Path | None = None
    inbox_prefix: str | None = None

    def __post_init__(self) -> None:
        if self.seed_file is not None and self.token is not None:
            raise ValueError("a NATS endpoint has a seed file or a token, not both")
        if any("@" in u.split("//", 1)[-1].split("/", 1)[0] for u in self.servers):
            raise ValueError("credentials do not belong in the NATS URL (use a seed or a token)")

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:  # no secret in a repr either
        who = "seed" if self.seed_file else "token" if self.token else "anonymous"
        return f"NatsEndpoint({self.url!r}, {who})"

    @property
    def servers(self) -> list[str]:
        return [u.strip() for u in self.url.split(",") if u.strip()]

    def with_token(self, token: str, inbox_prefix: str | None = None) -> NatsEndpoint:
        return replace(self, token=token, seed_file=None, inbox_prefix=inbox_prefix)

    def ssl_context(self) -> ssl.SSLContext | None:
        if self.ca_file is None:
            return None
        return ssl.create_default_context(cafile=str(self.ca_file))

    def connect_options(self) -> dict[str, Any]:
        """Keyword arguments for ``nats.connect`` (servers and credentials)."""
        opts: dict[str, Any] = {"servers": self.servers}
        if self.seed_file is not None:
            opts["nkeys_seed"] = str(self.seed_file)
        if self.token is not None:
            opts["token"] = self.token
        tls = self.ssl_context()
        if tls is not None:
            opts["tls"] = tls
        if self.inbox_prefix is not None:
            opts["inbox_prefix"] = self.inbox_prefix
        return opts


def _reason(exc: BaseException) -> str:
    return str(exc).strip() or type(exc).__name__


class ConnectionLog:
    """One log line per change of a NATS connection's state, never a traceback.

    * **lost** (warning): the connection dropped; nats-py reconnects.
    * **unreachable** (warning): the first failed attempt of an outage (or of the first
      connect), then once more for each new kind of failure (refused, timed out, refused
      authorization); the other attempts at debug level.
    * **back** (info): reconnected, with how long it was down and how many attempts failed.
    * **closed** (warning) when nats-py closes the connection for good by itself (the server
      refused it, or it gave up), not when its owner closes it (call :meth:`closing` first).

    Other errors nats-py reports (a permission refused, a slow consumer) are one warning line
    each, the same one at most once a minute.

    Bound to one client: pass :meth:`callbacks` to its ``connect`` and call :meth:`connected`
    once that returned.
    """

    def __init__(self, nc: NatsClient, logger: logging.Logger, name: str, url: str) -> None:
        self._nc = nc
        self._log = logger
        self._name = name
        self._url = url
        self._up = False  # connected (the first connect returned, or reconnected since)
        self._was_up = False
        self._closing = False
        self._since = time.monotonic()  # when the connection was lost (or the connect began)
        self._failed = 0  # attempts failed since
        self._kinds: set[str] = set()  # kinds of failure logged since
        self._loss: str | None = None  # why it was lost, when nats-py said
        self._other: dict[str, float] = {}  # other errors: when last logged

    def callbacks(self, *, reconnected: Hook | None = None) -> dict[str, Any]:
        """``error_cb``, ``disconnected_cb``, ``reconnected_cb`` and ``closed_cb`` for
        ``Client.connect``; ``reconnected`` is called after the line is logged."""

        async def on_reconnected() -> None:
            self._back()
            if reconnected is not None:
                await reconnected()

        return {
            "error_cb": self._on_error,
            "disconnected_cb": self._on_disconnected,
            "reconnected_cb": on_reconnected,
            "closed_cb": self._on_closed,
        }

    def connected(self) -> None:
        """The first connect returned."""
        if self._failed:
            self._log.info(
                "%s: connected to NATS at %s after %.1fs (%d failed attempts)",
                self._name,
                self._url,
                time.monotonic() - self._since,
                self._failed,
            )
        self._up = self._was_up = True
        self._reset()

    def closing(self) -> None:
        """The owner closes the connection: what follows is no news."""
        self._closing = True

    def _reset(self) -> None:
        self._failed = 0
        self._kinds.clear()
        self._loss = None

    async def _on_error(self, exc: Exception) -> None:
        if self._closing or self._nc.is_closed:
            self._log.debug("%s: NATS (closing): %s", self._name, _reason(exc))
            return
        if self._up:
            if isinstance(exc, _CONNECTION_LOSS):
                self._loss = _reason(exc)  # said in the "lost" line that follows
                self._log.debug("%s: NATS connection: %s", self._name, self._loss)
                return
            text = _reason(exc)
            now = time.monotonic()
            last = self._other.get(text)
            if last is None or now - last >= _REPEAT_AFTER:
                self._other[text] = now
                self._log.warning("%s: NATS: %s", self._name, text)
            else:
                self._log.debug("%s: NATS: %s", self._name, text)
            return
        self._failed += 1
        kind = type(exc).__name__
        if kind in self._kinds:
            self._log.debug(
                "%s: NATS at %s: attempt %d failed: %s",
                self._name,
                self._url,
                self._failed,
                _reason(exc),
            )
            return
        self._kinds.add(kind)
        self._log.warning(
            "%s: NATS at %s unreachable (%s); %s until it answers",
            self._name,
            self._url,
            _reason(exc),
            "reconnecting" if self._was_up else "connecting",
        )

    async def _on_disconnected(self) -> None:
        if self._closing or self._nc.is_closed or not self._up:
            return  # closed (a line of its own), or not connected yet
        self._up = False
        self._since = time.monotonic()
        loss = self._loss
        self._reset()
        self._log.warning(
            "%s: NATS connection to %s lost%s; reconnecting",
            self._name,
            self._url,
            f" ({loss})" if loss else "",
        )

    def _back(self) -> None:
        self._log.info(
            "%s: NATS connection to %s back after %.1fs (%d failed attempts)",
            self._name,
            self._url,
            time.monotonic() - self._since,
            self._failed,
        )
        self._up = True
        self._reset()

    async def _on_closed(self) -> None:
        if self._closing:
            self._log.debug("%s: NATS connection closed", self._name)
            return
        why = self._nc.last_error
        self._log.warning(
            "%s: NATS connection to %s closed%s",
            self._name,
            self._url,
            f" ({_reason(why)})" if why is not None else "",
        )
        self._up = False

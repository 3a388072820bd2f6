"""aiocoap bent into a device: one CoAP-over-TCP/TLS connection the device opens, on which it is
both client (sign-up, sign-in, publish…) and server (the gateway's GET / Observe / POST).

How aiocoap serves over a client-initiated connection: a :class:`aiocoap.Context` whose
``serversite`` is the device's site and whose only request interface is a ``TokenManager`` over a
``TCPClient`` transport (what ``Context.create_server_context(site, transports=["tcpclient"])``
builds). A request arriving on that connection goes ``TcpConnection.data_received`` →
``TCPClient._dispatch_incoming`` → ``TokenManager.process_request`` → ``Context.render_to_pipe`` →
the site; responses and Observe notifications go back on the same ``TcpConnection``. Nothing binds
a listening socket.

What we change, all confined to the two subclasses below (private aiocoap hooks: this is the
test peer, not the product; pyproject.toml allows aiocoap 0.4.17 up to 0.5, and
tests/integration/devicesim fails if an upgrade changes them):

* aiocoap's ``TcpConnection.connection_made`` always sends a CSM and its ``data_received`` aborts
  a connection whose peer sends a request before a CSM. :class:`SimConnection` skips the CSM when
  ``send_csm`` is false (iotivity-lite never sends one) and, when ``require_peer_csm`` is false,
  starts as if an empty CSM had been received.
* The connection is opened explicitly by :meth:`SimClientTransport.connect` (aiocoap would open it
  lazily inside the first request), so connect errors are told apart from request errors, and the
  transport never opens a second connection behind the device's back.
* :class:`SimConnection` counts what it sends and receives into the device's stats, sends Pings
  and reports Pongs, and exposes its closing as an awaitable.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from aiocoap import Context, Message
from aiocoap import error as coap_error
from aiocoap.numbers import OptionNumber
from aiocoap.numbers.codes import PING, PONG, RELEASE, Code
from aiocoap.optiontypes import UintOption
from aiocoap.transports.tcp import TCPClient, TcpConnection

from devicesim import ocf
from devicesim.config import COAPS_TCP, DEFAULT_PORTS
from devicesim.errors import SimConnectionError, SimTimeoutError
from devicesim.stats import DeviceStats

RELEASE_ALTERNATIVE_ADDRESS = 2  # option numbers of a Release (RFC 8323 section 5.5)
RELEASE_HOLD_OFF = 4


@dataclass(frozen=True, slots=True)
class Reply:
    """A response from the gateway, free of aiocoap types. ``code`` is ``"c.dd"``."""

    code: str
    payload: bytes
    content_format: int | None

    @property
    def ok(self) -> bool:
        return self.code.startswith("2.")


class SimConnection(TcpConnection):  # type: ignore[misc]  # aiocoap is untyped
    """One TCP/TLS connection of a device (an ``asyncio.Protocol``)."""

    def __init__(
        self,
        owner: SimClientTransport,
        log: logging.Logger,
        loop: asyncio.AbstractEventLoop,
        *,
        send_csm: bool,
        require_peer_csm: bool,
        stats: DeviceStats,
    ) -> None:
        super().__init__(owner, log, loop, is_server=False)
        self._send_csm = send_csm
        if not require_peer_csm:
            # As if the peer had sent an empty CSM: default sizes, no block-wise.
            self._remote_settings: dict[str, Any] | None = {}
        self._stats = stats
        self._closed: asyncio.Future[BaseException | None] = loop.create_future()
        self._pong: asyncio.Future[None] | None = None
        self.released = False
        """The gateway sent Release (it drains): reconnect at once, to ``released_to`` if set."""
        self.released_to: str | None = None
        self.hold_off: int | None = None

    # --- aiocoap hooks ------------------------------------------------------------------------

    def _send_initial_csm(self) -> None:
        if self._send_csm:
            super()._send_initial_csm()

    def _send_message(self, msg: Any) -> None:
        if self._transport is None or self._transport.is_closing():
            return  # asyncio would drop it too; counting it as sent would lie
        super()._send_message(msg)
        if msg.code.is_response():
            if msg.opt.observe is not None and msg.opt.observe > 0:
                self._stats.bump("notifications_sent")
            else:
                self._stats.bump("responses_sent")

    def _process_signaling(self, msg: Any) -> None:
        if msg.code == RELEASE:
            # RFC 8323 section 5.5: Alternative-Address (2, a URI) and Hold-Off (4, seconds).
            # aiocoap closes on a Release; the device reads where to go first.
            self._stats.bump("releases_received")
            for option in msg.opt.option_list():
                value = bytes(option.encode())
                if int(option.number) == RELEASE_ALTERNATIVE_ADDRESS and self.released_to is None:
                    self.released_to = value.decode(errors="replace")
                elif int(option.number) == RELEASE_HOLD_OFF:
                    self.hold_off = int.from_bytes(value, "big")
            self.released = True
        if msg.code == PONG:
            self._stats.bump("pongs_received")
            if self._pong is not None and not self._pong.done():
                self._pong.set_result(None)
        super()._process_signaling(msg)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if not self._closed.done():
            self._closed.set_result(exc)

    # --- for the device -----------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return (
            not self._closed.done()
            and self._transport is not None
            and not self._transport.is_closing()
        )

    async def wait_closed(self) -> BaseException | None:
        """Wait until the connection is gone; returns the error that ended it, if any."""
        return await asyncio.shield(self._closed)

    async def ping(self, timeout: float) -> bool:  # noqa: ASYNC109
        """Send an RFC 8323 Ping; ``True`` when the Pong came within ``timeout`` seconds."""
        if not self.is_open:
            return False
        self._pong = asyncio.get_running_loop().create_future()
        super()._send_message(Message(code=PING))
        self._stats.bump("pings_sent")
        try:
            async with asyncio.timeout(timeout):
                await self._pong
        except TimeoutError:
            return False
        return True

    def close(self, *, release: bool = False) -> None:
        """Close the connection, after a Release message when ``release``."""
        if self._transport is None or self._transport.is_closing():
            return
        if release:
            super()._send_message(Message(code=RELEASE))
        self._transport.close()

    def drop(self, reason: str) -> None:
        """Give up on an unresponsive connection: Abort it (RFC 8323 §5.6) and close."""
        if self.is_open:
            self.abort(reason)


class SimClientTransport(TCPClient):  # type: ignore[misc]  # aiocoap is untyped
    """The device's token interface: connections it opened, and nothing it did not."""

    def __init__(
        self,
        tman: Any,
        log: logging.Logger,
        loop: asyncio.AbstractEventLoop,
        *,
        scheme: str,
        ssl_context: ssl.SSLContext | None,
        server_hostname: str | None,
        send_csm: bool,
        require_peer_csm: bool,
        stats: DeviceStats,
    ) -> None:
        super().__init__()
        self._tokenmanager = tman
        self.log = log
        self.loop = loop
        # Instance attributes shadow the class ones aiocoap's connection reads via its _ctx.
        self._scheme = scheme
        self._default_port = DEFAULT_PORTS[scheme]
        self._ssl = ssl_context
        self._server_hostname = server_hostname
        self._send_csm = send_csm
        self._require_peer_csm = require_peer_csm
        self._stats = stats

    async def connect(
        self,
        host: str,
        port: int,
        timeout: float,  # noqa: ASYNC109
    ) -> SimConnection:
        def factory() -> SimConnection:
            return SimConnection(
                self,
                self.log,
                self.loop,
                send_csm=self._send_csm,
                require_peer_csm=self._require_peer_csm,
                stats=self._stats,
            )

        kwargs: dict[str, Any] = {}
        if self._ssl is not None:
            kwargs["ssl"] = self._ssl
            kwargs["server_hostname"] = self._server_hostname or host
        elif self._scheme == COAPS_TCP:
            raise SimConnectionError("coaps+tcp needs a TLS context")
        try:
            async with asyncio.timeout(timeout):
                _, conn = await self.loop.create_connection(factory, host, port, **kwargs)
        except TimeoutError:
            raise SimTimeoutError(f"connect to {host}:{port} timed out") from None
        except (OSError, ssl.SSLError, socket.gaierror) as e:
            raise SimConnectionError(f"connect to {host}:{port}: {e}") from e
        assert isinstance(conn, SimConnection)
        self._pool[(host, port)] = conn
        return conn

    # implementing aiocoap's TokenInterface

    async def fill_or_recognize_remote(self, message: Any) -> bool:
        remote = message.remote
        return isinstance(remote, SimConnection) and remote._ctx is self

    def _dispatch_incoming(self, connection: Any, msg: Any) -> None:
        if msg.code.is_request():
            self._stats.bump("requests_received")
        super()._dispatch_incoming(connection, msg)

    async def shutdown(self) -> None:
        self._tokenmanager = None
        for conn in list(self._pool.values()):
            conn.close()
        self._pool.clear()


class Endpoint:
    """A device's CoAP endpoint: the aiocoap context serving ``site`` and its transport."""

    def __init__(self, context: Any, transport: SimClientTransport, *, ocf_versions: bool) -> None:
        self._context = context
        self.transport = transport
        self._ocf_versions = ocf_versions

    @classmethod
    async def open(
        cls,
        site: Any,
        *,
        scheme: str,
        ssl_context: ssl.SSLContext | None,
        server_hostname: str | None,
        send_csm: bool,
        require_peer_csm: bool,
        ocf_versions: bool,
        stats: DeviceStats,
        log: logging.Logger,
    ) -> Endpoint:
        loop = asyncio.get_running_loop()
        context = Context(loop=loop, serversite=site, loggername=log.name)
        made: list[SimClientTransport] = []

        async def make(tman: Any) -> SimClientTransport:
            t = SimClientTransport(
                tman,
                log,
                loop,
                scheme=scheme,
                ssl_context=ssl_context,
                server_hostname=server_hostname,
                send_csm=send_csm,
                require_peer_csm=require_peer_csm,
                stats=stats,
            )
            made.append(t)
            return t

        await context._append_tokenmanaged_transport(make)
        return cls(context, made[0], ocf_versions=ocf_versions)

    async def request(
        self,
        conn: SimConnection,
        method: str,
        path: Iterable[str],
        *,
        query: Iterable[str] = (),
        payload: bytes = b"",
        content_format: int | None = None,
        timeout: float,  # noqa: ASYNC109
    ) -> Reply:
        """Send one request on ``conn`` and wait for its response (no block-wise: OCF devices
        send whole messages over TCP)."""
        msg = Message(code=Code[method], uri_path=tuple(path), payload=payload)
        if query:
            msg.opt.uri_query = tuple(query)
        if content_format is not None and payload:
            msg.opt.content_format = content_format
        if self._ocf_versions and content_format is not None:
            msg.opt.accept = content_format
            add_ocf_version_options(msg, accept=True)
        msg.remote = conn
        if not conn.is_open:
            raise SimConnectionError("connection is closed")
        req = self._context.request(msg, handle_blockwise=False)
        try:
            async with asyncio.timeout(timeout):
                resp = await req.response
        except TimeoutError:
            raise SimTimeoutError(f"{method} {_path(msg)} timed out") from None
        except coap_error.Error as e:
            raise SimConnectionError(f"{method} {_path(msg)}: {e}") from e
        cf = resp.opt.content_format
        return Reply(resp.code.dotted, bytes(resp.payload), int(cf) if cf is not None else None)

    async def close(self) -> None:
        await self._context.shutdown()


def add_ocf_version_options(msg: Any, *, accept: bool) -> None:
    """OCF-Content-Format-Version (and on requests OCF-Accept-Content-Format-Version) = 2.0."""
    msg.opt.add_option(
        UintOption(OptionNumber(ocf.OPT_OCF_CONTENT_FORMAT_VERSION), ocf.OCF_VERSION_2_0)
    )
    if accept:
        msg.opt.add_option(
            UintOption(OptionNumber(ocf.OPT_OCF_ACCEPT_CONTENT_FORMAT_VERSION), ocf.OCF_VERSION_2_0)
        )


def _path(msg: Any) -> str:
    return "/" + "/".join(msg.opt.uri_path)

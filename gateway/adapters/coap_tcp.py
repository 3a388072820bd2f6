"""The gateway's CoAP over TCP / TLS listeners on our own RFC 8323 connection (no aiocoap).

:mod:`gateway.adapters.coap` (the facade the gateway uses) sits on what this module offers:
:class:`Hub` (the listening endpoints and what they share: admission limits, TLS handshakes in
progress, the device requests being served) and :class:`DeviceLink`, one device connection: a
:class:`gateway.wire.protocol.CoapTcpProtocol` (the asyncio driver of the sans-IO
:class:`gateway.wire.connection.CoapTcpConnection`) with the server's policies on top:

* admission (W17): plain TCP is admitted in ``connection_made``; TLS listeners accept on their own
  socket, admit (connections in all, per remote address, unauthenticated) and only then hand the
  socket to ``loop.connect_accepted_socket`` for the handshake, so a refused connection costs no
  handshake; a failed handshake is logged with the peer address (W1: the port bound is the port
  configured, 0 picks a free one);
* the sign-in deadline (``auth_timeout``) and the request rate per connection (4.29 with Max-Age);
* serving device requests: each is a task calling the facade's ``serve``, cancelled when the
  connection goes; the answer must fit the device's Max-Message-Size (else 5.00);
* exchanges: our requests to the device and observations, every response and notification
  handed over synchronously, in order (W3), the deregistration on the registration's token (W4),
  a block-wise response refused (W19), the device's Max-Message-Size checked before sending
  (W20);
* ALPN "coap" on the server context (W10), the peer certificate read from the TLS object (W5).

What the connection does itself -- CSM never awaited (W2), Ping / Pong (W9), the opening,
keepalive and slow-message timeouts (W8), the option rules of requests (W14), format errors
aborting with a diagnostic (W13, W15), FIN-and-drain after our Abort (W16), back-pressure and
the write-buffer bound (W6, W7) -- is in :mod:`gateway.wire`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import math
import socket
import ssl
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Final, Protocol, cast

from cryptography import x509

from gateway.adapters import coap_frames as frames
from gateway.adapters.coap_frames import Frame
from gateway.adapters.coap_messages import (
    CoapRequest,
    CoapResponse,
    CoapTransportError,
    ConnectionClosed,
    UnsupportedResponse,
)
from gateway.wire import events as ev
from gateway.wire import messages
from gateway.wire import signals as sig
from gateway.wire.connection import ConnectionConfig, State
from gateway.wire.errors import ConnectionNotOpen, MessageTooLarge, UnknownHandle
from gateway.wire.options import encode_uint
from gateway.wire.protocol import CoapTcpProtocol

log = logging.getLogger("gateway.adapters.coap")

ALPN: Final = "coap"
BASE_MAX_MESSAGE_SIZE: Final = sig.BASE_MAX_MESSAGE_SIZE
TOO_MANY_REQUESTS: Final = 157  # 4.29
SERVICE_UNAVAILABLE: Final = 163  # 5.03
INTERNAL_SERVER_ERROR: Final = 160  # 5.00
_NO_DEADLINE: Final = 365 * 86400.0
"""The connection's own request deadline: the facade bounds every wait with its timeout and
ends the exchange itself, so the connection needs none of its own."""

EventHandler = Callable[[CoapResponse | None, BaseException | None, bool], None]
"""``(response, error, last)``: exactly one of response / error is set; an error is last."""


@dataclass(frozen=True, slots=True)
class Limits:
    keepalive_interval: float
    keepalive_timeout: float
    opening_timeout: float
    max_message_size: int
    max_write_buffer: int
    close_timeout: float
    auth_timeout: float | None = None
    max_unauthenticated: int | None = None
    request_rate: float | None = None
    request_burst: int = 1
    max_connections_per_ip: int | None = None
    message_timeout: float | None = None
    max_connections: int | None = None


class LinkEvents(Protocol):
    """What a connection's owner (the facade's ``Connection``) receives from the wire."""

    def link_lost(self, reason: str) -> None: ...

    def serve(self, request: CoapRequest) -> Awaitable[CoapResponse]: ...


# --------------------------------------------------------------------------- conversions


def hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def address_key(host: str) -> str:
    """What the per-address connection limit counts by: the IPv4 address (IPv4-mapped IPv6
    included), or the IPv6 /64 -- one subscriber's prefix, where an attacker has 2**64
    addresses to spread connections over."""
    try:
        ip = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class EncodedRequest:
    """A request to a device, validated and encoded as a frame without token (single use)."""

    __slots__ = ("_frame", "request", "size")

    def __init__(self, request: CoapRequest) -> None:
        self.request: Final = request
        self._frame: Frame | None = messages.request_frame(request, ocf_defaults=True)
        self.size: Final = len(frames.encode_frame(self._frame)) + frames.MAX_TOKEN
        """Bytes on the wire with the longest token the connection may pick."""

    def take(self) -> Frame:
        frame, self._frame = self._frame, None
        if frame is None:
            raise RuntimeError("an EncodedRequest is sent once")
        return frame


def peer_certificate(transport_info: Any) -> x509.Certificate | None:
    """W5: the client certificate of a TLS connection, from its ``ssl_object``."""
    if transport_info is None:
        return None
    der = transport_info.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der) if der else None


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved; time is an input."""

    __slots__ = ("_at", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate, self.burst = rate, burst
        self._tokens, self._at = float(burst), now

    def take(self, now: float) -> float:
        """0.0 when a token was taken; else the seconds until one is there."""
        self._tokens = min(float(self.burst), self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) / self.rate


# --------------------------------------------------------------------------- exchanges


class Exchange:
    """One request to the device and its response(s) (notifications too, W3)."""

    __slots__ = ("_done", "_link", "_on_event", "_request", "handle")

    def __init__(
        self, link: DeviceLink, request: CoapRequest, handle: ev.Outgoing, on_event: EventHandler
    ) -> None:
        self._link = link
        self._request = request
        self._on_event = on_event
        self._done = False
        self.handle: Final = handle

    @property
    def token(self) -> bytes:
        return self.handle.token

    def response(self, frame: Frame, last: bool) -> None:
        if self._done:
            return
        problem = messages.block_wise_problem(frame)  # W19
        if problem is not None:
            self._end()
            self._link.drop_exchange(self)
            request = self._request
            error = UnsupportedResponse(
                f"{request.method} {request.path}: {problem}, which this gateway does not support"
            )
            self._on_event(None, error, True)
            return
        if last:
            self._end()
        self._on_event(messages.response_value(frame), None, last)

    def fail(self, error: BaseException) -> None:
        if self._done:
            return
        self._end()
        self._on_event(None, error, True)

    def stop(self) -> None:
        """Lose interest: later responses on the token are ignored."""
        if not self._done:
            self._end()
            self._link.drop_exchange(self)

    def deregister(self) -> None:
        """W4: GET with Observe=1 on the registration's token and options; the device's answer
        ends the exchange."""
        if not self._done:
            self._link.deregister(self)

    def _end(self) -> None:
        self._done = True
        self._link.exchange_ended(self)


# --------------------------------------------------------------------------- the connection


def _protocol_event(protocol: CoapTcpProtocol, event: ev.Event) -> None:
    cast(DeviceLink, protocol).on_wire_event(event)


class DeviceLink(CoapTcpProtocol):
    """One device connection: the wire driver plus the server's policies (module docstring).

    Made at accept time. Over TLS it is admitted before the handshake and ``connection_made``
    comes after it (W17); over TCP it is admitted in ``connection_made``."""

    __slots__ = (
        "_accepted_at",
        "_address",
        "_admitted",
        "_auth_timer",
        "_authenticated",
        "_bucket",
        "_exchanges",
        "_failure",
        "_gone",
        "_hub",
        "_made",
        "_our_reason",
        "_peer_signal",
        "_released",
        "_serving",
        "_writable_waiters",
        "events",
        "peer_certificate",
        "remote",
        "tls",
    )

    def __init__(self, hub: Hub, tls: bool) -> None:
        limits = hub.limits
        config = ConnectionConfig(
            max_message_size=limits.max_message_size,
            request_timeout=_NO_DEADLINE,
            ping_timeout=limits.keepalive_timeout,
            keepalive_interval=limits.keepalive_interval,
            opening_timeout=limits.opening_timeout,
            message_timeout=limits.message_timeout,
        )
        super().__init__(
            _protocol_event,
            config,
            close_timeout=limits.close_timeout,
            max_write_buffer=limits.max_write_buffer,
        )
        self._hub: Final = hub
        self.tls: Final = tls
        self.remote = "-"
        """``"127.0.0.1:4567"`` / ``"[::1]:4567"``."""
        self.peer_certificate: x509.Certificate | None = None
        # futures of the facade's requests waiting for the transport to take writes again
        # (back-pressure, W7): made only while paused, so an idle connection holds none
        self._writable_waiters: list[asyncio.Future[None]] = []
        self.events: LinkEvents | None = None
        self._admitted = False  # counted as unauthenticated by the hub
        self._address: str | None = None  # counted by the hub's per-address limit under this key
        self._authenticated = False
        self._accepted_at = hub.loop.time()
        self._made = False
        self._gone = False
        self._bucket: TokenBucket | None = None
        if limits.request_rate is not None:
            self._bucket = TokenBucket(limits.request_rate, limits.request_burst, self._accepted_at)
        self._auth_timer: asyncio.TimerHandle | None = None
        self._our_reason: str | None = None
        self._failure: str | None = None
        self._peer_signal: str | None = None
        self._released = False
        self._exchanges: dict[bytes, Exchange] = {}
        self._serving: set[asyncio.Task[None]] = set()

    # -- what the facade uses

    @property
    def closing(self) -> bool:
        if self._gone or self._our_reason is not None or self._failure is not None:
            return True
        if self._peer_signal is not None or self.lost or not self._made:
            return True
        return self.connection.state is not State.OPEN

    @property
    def close_reason(self) -> str | None:
        return self._our_reason or self._failure or self._peer_signal

    @property
    def authenticated(self) -> bool:
        return self._authenticated

    def mark_authenticated(self) -> None:
        """The device signed in: no sign-in deadline, no longer counted as unauthenticated."""
        if self._authenticated:
            return
        self._authenticated = True
        if self._auth_timer is not None:
            self._auth_timer.cancel()
            self._auth_timer = None
        self._release_admission()

    @property
    def peer_max_message_size(self) -> int:
        """W20: the device's CSM Max-Message-Size, else RFC 8323's base value."""
        if not self._made or self.lost:
            return BASE_MAX_MESSAGE_SIZE
        return self.connection.peer_max_message_size

    def start(self, request: EncodedRequest, on_event: EventHandler) -> Exchange:
        if self.closing:
            raise ConnectionClosed(f"connection closed ({self.close_reason or 'closing'})")
        frame = request.take()
        try:
            handle = self.send_request(frame)  # Observe=0 in the frame: a registration
        except ConnectionNotOpen as e:
            raise ConnectionClosed(f"connection closed ({self.close_reason or e})") from None
        except MessageTooLarge as e:
            raise CoapTransportError(str(e)) from None
        exchange = Exchange(self, request.request, handle, on_event)
        self._exchanges[handle.token] = exchange
        return exchange

    def abort_with(self, reason: str) -> None:
        """Abort (7.05) with ``reason`` as diagnostic, then close after a FIN (W16)."""
        if self._gone or self._our_reason is not None or not self._made or self.lost:
            if self._our_reason is None and not self._gone:
                self._our_reason = reason
            return
        self._our_reason = reason
        self._cancel_auth_timer()
        self.abort(sig.diagnostic_payload(reason).decode())
        self._fail_exchanges()

    @property
    def released(self) -> bool:
        return self._released

    def release_with(self, alternative_address: str | None, hold_off: int | None) -> None:
        """Send Release (RFC 8323 section 5.5): no new request of ours goes out (``closing``);
        pending ones may complete; the device closes, or the facade aborts."""
        if self.closing:
            return
        self._released = True
        self.release(alternative_address, hold_off)

    # -- for exchanges

    def drop_exchange(self, exchange: Exchange) -> None:
        self._exchanges.pop(exchange.token, None)
        if self._made and not self.lost:
            self.connection.forget(exchange.handle)

    def exchange_ended(self, exchange: Exchange) -> None:
        if self._exchanges.get(exchange.token) is exchange:
            del self._exchanges[exchange.token]

    def deregister(self, exchange: Exchange) -> None:
        if self.closing:
            return
        with contextlib.suppress(ConnectionNotOpen, UnknownHandle):
            self.cancel_observation(exchange.handle)

    # -- admission (driven by the endpoint)

    def admit(self, host: str, port: int) -> bool:
        """Count this connection against its remote address and as unauthenticated; False when
        over one of the hub's limits (nothing is counted then)."""
        self.remote = hostport(host, port)
        key = address_key(host)
        if not self._hub.admit(self.remote, key):
            return False
        self._admitted = True
        self._address = key
        return True

    def handshake_failed(self) -> None:
        """The TLS handshake failed or was cancelled: nothing of this connection remains (unless
        it was already made: then its transport closes and ``connection_lost`` follows)."""
        if self._made or self._gone:
            return
        self._gone = True
        self._release_admission()
        self._release_address()

    def _release_admission(self) -> None:
        if self._admitted:
            self._admitted = False
            self._hub.release()

    def _release_address(self) -> None:
        if self._address is not None:
            self._hub.release_address(self._address)
            self._address = None

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        hub = self._hub
        if hub.stopping:
            self._gone = True
            self._release_admission()
            self._release_address()
            transport.abort()  # type: ignore[attr-defined]
            return
        try:
            host, port = transport.get_extra_info("peername")[:2]
            if not self.tls and not self.admit(str(host), int(port)):
                self._gone = True
                transport.abort()  # type: ignore[attr-defined]
                return
            self.remote = hostport(str(host), int(port))
            self.peer_certificate = peer_certificate(transport.get_extra_info("ssl_object"))
            self._made = True
            super().connection_made(transport)  # the connection, then our CSM
            limits = hub.limits
            if limits.auth_timeout is not None and not self._authenticated:
                self._auth_timer = hub.loop.call_at(
                    self._accepted_at + limits.auth_timeout, self._on_auth_timeout
                )
            self.events = hub.link_made(self)
        except Exception:
            log.exception("cannot set up a connection")
            transport.abort()  # type: ignore[attr-defined]

    async def wait_writable(self) -> None:
        """Until the transport takes writes (at once unless paused) or the connection is gone."""
        while self.writable is False and not self.lost and not self._gone:
            waiter: asyncio.Future[None] = self._hub.loop.create_future()
            self._writable_waiters.append(waiter)
            await waiter

    def _wake_writers(self) -> None:
        waiters, self._writable_waiters = self._writable_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def resume_writing(self) -> None:
        super().resume_writing()
        self._wake_writers()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._gone:
            super().connection_lost(exc)
            return
        made = self._made
        super().connection_lost(exc)  # the connection's last events come first
        self._gone = True
        self._cancel_auth_timer()
        self._release_admission()
        self._release_address()
        if not made:
            return
        reason = self.close_reason or (
            f"connection lost: {exc}" if exc is not None else "closed by the peer"
        )
        self._our_reason = self._our_reason or reason
        self._fail_exchanges()
        for task in list(self._serving):
            task.cancel()
        self._wake_writers()
        if self.events is not None:
            self.events.link_lost(reason)

    # -- the connection's events

    def on_wire_event(self, event: ev.Event) -> None:
        match event:
            case ev.NotificationReceived(handle=handle, frame=frame):
                exchange = self._exchanges.get(handle.token)
                if exchange is not None:
                    exchange.response(frame, False)
            case ev.ResponseReceived(handle=handle, frame=frame, last=last):
                exchange = self._exchanges.get(handle.token)
                if exchange is not None:
                    exchange.response(frame, last)
            case ev.RequestReceived(handle=handle, frame=frame):
                self._on_request(handle, frame)
            case ev.RequestRefused(code=code, diagnostic=diagnostic):
                log.debug("%s: %s to a request: %s", self.remote, code, diagnostic)
            case ev.RequestTimedOut(handle=handle):
                exchange = self._exchanges.get(handle.token)
                if exchange is not None:
                    exchange.fail(CoapTransportError("request timed out on the connection"))
            case ev.ConnectionFailed(kind=kind, diagnostic=diagnostic):
                self._failure = _failure_reason(kind, diagnostic)
                self._fail_exchanges()
            case ev.AbortReceived(diagnostic=diagnostic):
                said = f": {diagnostic}" if diagnostic else ""
                self._peer_signal = f"aborted by the peer{said}"
                self._fail_exchanges()
            case ev.ReleaseReceived():
                # the device goes away; nothing new is sent, and we close at once (as a peer
                # that sent Release expects: RFC 8323 section 5.5)
                self._peer_signal = "released by the peer"
                self.close()
                self._fail_exchanges()
            case ev.ConnectionClosed(reason=reason):
                if self._released:
                    reason = f"released, then {reason}"
                self._peer_signal = self._peer_signal or reason
                self._fail_exchanges()
            case ev.CsmReceived() | ev.PingReceived() | ev.PongReceived():
                pass

    def _fail_exchanges(self) -> None:
        if not self._exchanges:
            return
        error = ConnectionClosed(f"connection closed ({self.close_reason or 'closing'})")
        for exchange in list(self._exchanges.values()):
            exchange.fail(error)
        self._exchanges.clear()

    def _on_request(self, handle: ev.Incoming, frame: Frame) -> None:
        if self._bucket is not None:
            wait = self._bucket.take(self._hub.loop.time())
            if wait:
                log.debug("%s: 4.29 to a request", self.remote)
                options = ((messages.MAX_AGE, encode_uint(math.ceil(wait))),)
                self._answer(handle, Frame(TOO_MANY_REQUESTS, b"", options, b"too many requests"))
                return
        events = self.events
        if events is None or self.closing:
            self._answer(handle, Frame(SERVICE_UNAVAILABLE, b"", (), b""))
            return
        task = self._hub.loop.create_task(self._serve(events, handle, frame), name="coap-serve")
        self._serving.add(task)
        self._hub.serving.add(task)
        task.add_done_callback(self._served)

    def _served(self, task: asyncio.Task[None]) -> None:
        self._serving.discard(task)
        self._hub.serving.discard(task)

    async def _serve(self, events: LinkEvents, handle: ev.Incoming, frame: Frame) -> None:
        response = await events.serve(messages.request_value(frame))
        try:
            answer = messages.response_frame(response)
        except ValueError as e:
            log.error("%s: cannot encode the response %s: %s", self.remote, response.code, e)
            answer = Frame(INTERNAL_SERVER_ERROR, b"", (), b"")
        self._answer(handle, answer)

    def _answer(self, handle: ev.Incoming, answer: Frame) -> None:
        if self.lost or self.connection.state is State.CLOSED:
            return
        try:
            self.send_response(handle, answer)
        except MessageTooLarge as e:
            log.warning("%s: response not sent: %s", self.remote, e)
            diagnostic = sig.diagnostic_payload("response above your Max-Message-Size")
            self.send_response(handle, Frame(INTERNAL_SERVER_ERROR, b"", (), diagnostic))
        except (ConnectionNotOpen, UnknownHandle):
            pass

    # -- the sign-in deadline

    def _on_auth_timeout(self) -> None:
        self._auth_timer = None
        if not self._authenticated and not self.closing:
            self.abort_with(f"not signed in within {self._hub.limits.auth_timeout}s")

    def _cancel_auth_timer(self) -> None:
        if self._auth_timer is not None:
            self._auth_timer.cancel()
            self._auth_timer = None


def _failure_reason(kind: ev.FailureKind, diagnostic: str) -> str:
    """How a failure of the connection reads in logs and ``close_reason``."""
    if kind in (ev.FailureKind.FORMAT_ERROR, ev.FailureKind.TOO_LARGE, ev.FailureKind.BAD_SIGNAL):
        return f"protocol error: {diagnostic}"
    return diagnostic


# --------------------------------------------------------------------------- listeners


class _Endpoint:
    """One listening socket (W1: the port configured, 0 for a free one).

    Plain TCP uses ``loop.create_server`` and admits each connection in ``connection_made``. TLS
    (W17) accepts on its own socket: a connection is admitted first and only then handed to
    ``loop.connect_accepted_socket`` for the handshake, so a refused one costs no handshake."""

    def __init__(self, hub: Hub, ssl_context: ssl.SSLContext | None) -> None:
        self.hub: Final = hub
        self.ssl_context: Final = ssl_context
        self.tls: Final = ssl_context is not None
        self.server: asyncio.Server | None = None
        self._socket: socket.socket | None = None
        self._acceptor: asyncio.Task[None] | None = None

    async def listen(self, host: str, port: int) -> tuple[str, int]:
        loop = self.hub.loop
        if not self.tls:
            self.server = await loop.create_server(lambda: DeviceLink(self.hub, False), host, port)
            sockname = self.server.sockets[0].getsockname()
            return str(sockname[0]), int(sockname[1])
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, *_, address = infos[0]
        try:
            sock = socket.create_server(address[:2], family=family, backlog=128)
        except OSError as e:  # worded as asyncio's create_server words it
            reason = (e.strerror or str(e)).lower()
            raise OSError(
                e.errno, f"error while attempting to bind on address {address[:2]!r}: {reason}"
            ) from None
        sock.setblocking(False)
        self._socket = sock
        sockname = sock.getsockname()
        self._acceptor = loop.create_task(
            self._accept_loop(sock), name=f"tls-accept:{hostport(*sockname[:2])}"
        )
        return str(sockname[0]), int(sockname[1])

    async def _accept_loop(self, sock: socket.socket) -> None:
        loop = self.hub.loop
        while True:
            try:
                conn, address = await loop.sock_accept(sock)
            except OSError as e:  # EMFILE and the like: as asyncio's server does, wait a bit
                log.warning("accepting a TLS connection failed: %s", e)
                await asyncio.sleep(0.5)
                continue
            link = DeviceLink(self.hub, True)
            if not link.admit(str(address[0]), int(address[1])):
                conn.close()
                continue
            self.hub.spawn(self._handshake(conn, link), f"tls-handshake:{link.remote}")

    async def _handshake(self, conn: socket.socket, link: DeviceLink) -> None:
        limits = self.hub.limits
        timeout = limits.opening_timeout
        if limits.auth_timeout is not None:
            timeout = min(timeout, limits.auth_timeout)
        try:
            await self.hub.loop.connect_accepted_socket(
                lambda: link, conn, ssl=self.ssl_context, ssl_handshake_timeout=timeout
            )
        except asyncio.CancelledError:
            link.handshake_failed()
            raise
        except Exception as e:  # the transport closed the socket
            link.handshake_failed()
            log.info("%s: TLS handshake failed: %s", link.remote, str(e) or type(e).__name__)

    def stop_listening(self) -> None:
        if self.server is not None:
            self.server.close()
        if self._acceptor is not None:
            self._acceptor.cancel()
            self._acceptor = None
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    async def shutdown(self) -> None:
        self.stop_listening()
        if self.server is None:
            return
        try:
            async with asyncio.timeout(self.hub.limits.close_timeout):
                await self.server.wait_closed()
        except TimeoutError:
            log.warning("listening socket did not close within %ss", self.hub.limits.close_timeout)


class Hub:
    """The listening endpoints of one server, and what they share: the connections per remote
    address, the count of unauthenticated connections, the TLS handshakes in progress and the
    device requests being served."""

    def __init__(self, limits: Limits, link_made: Callable[[DeviceLink], LinkEvents]) -> None:
        self.loop: Final = asyncio.get_running_loop()
        self.limits: Final = limits
        self._link_made = link_made
        self.serving: set[asyncio.Task[None]] = set()
        """Device requests being served."""
        self.tasks: set[asyncio.Task[None]] = set()
        """TLS handshakes in progress."""
        self.unauthenticated = 0
        """Connections admitted and not yet marked authenticated (handshaking ones included)."""
        self.refused = 0
        """Connections refused so far because of ``max_unauthenticated``."""
        self.per_ip: dict[str, int] = {}
        """Live connections (handshaking ones included) by :func:`address_key`."""
        self.refused_per_ip = 0
        """Connections refused so far because of ``max_connections_per_ip``."""
        self.connections = 0
        """Live connections (handshaking ones included)."""
        self.refused_total = 0
        """Connections refused so far because of ``max_connections``."""
        self._next_total_refusal_log = 0.0
        self._next_refusal_log = 0.0
        self._next_ip_refusal_log = 0.0
        self._endpoints: list[_Endpoint] = []
        self.stopping = False

    def link_made(self, link: DeviceLink) -> LinkEvents:
        return self._link_made(link)

    def _refusal_due(self, attribute: str) -> bool:
        """One log line a second per kind of refusal, under a flood."""
        now = self.loop.time()
        if now < getattr(self, attribute):
            return False
        setattr(self, attribute, now + 1.0)
        return True

    def admit(self, remote: str, address: str) -> bool:
        total = self.limits.max_connections
        if total is not None and self.connections >= total:
            self.refused_total += 1
            if self._refusal_due("_next_total_refusal_log"):
                log.warning(
                    "refused a connection from %s: %d connections (limit %d); %d refused so far",
                    remote,
                    self.connections,
                    total,
                    self.refused_total,
                )
            return False
        per_address = self.limits.max_connections_per_ip
        held = self.per_ip.get(address, 0)
        if per_address is not None and held >= per_address:
            self.refused_per_ip += 1
            if self._refusal_due("_next_ip_refusal_log"):
                log.warning(
                    "refused a connection from %s: %d connections from %s (limit %d per "
                    "address); %d refused so far",
                    remote,
                    held,
                    address,
                    per_address,
                    self.refused_per_ip,
                )
            return False
        limit = self.limits.max_unauthenticated
        if limit is not None and self.unauthenticated >= limit:
            self.refused += 1
            if self._refusal_due("_next_refusal_log"):
                log.warning(
                    "refused a connection from %s: %d unauthenticated connections (limit %d); "
                    "%d refused so far",
                    remote,
                    self.unauthenticated,
                    limit,
                    self.refused,
                )
            return False
        self.unauthenticated += 1
        self.per_ip[address] = held + 1
        self.connections += 1
        return True

    def release(self) -> None:
        self.unauthenticated -= 1

    def release_address(self, address: str) -> None:
        self.connections -= 1
        held = self.per_ip.pop(address, 0) - 1
        if held > 0:
            self.per_ip[address] = held

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = self.loop.create_task(coro, name=name)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def listen(
        self, bind: tuple[str, int], ssl_context: ssl.SSLContext | None
    ) -> tuple[str, int]:
        if ssl_context is not None:
            ssl_context.set_alpn_protocols([ALPN])  # W10
        endpoint = _Endpoint(self, ssl_context)
        self._endpoints.append(endpoint)
        return await endpoint.listen(bind[0], bind[1])

    def stop_listening(self) -> None:
        self.stopping = True
        for endpoint in self._endpoints:
            endpoint.stop_listening()
        for task in list(self.tasks):
            task.cancel()

    async def shutdown(self) -> None:
        handshakes = [t for t in self.tasks if not t.done()]
        for task in handshakes:
            task.cancel()
        if handshakes:
            await asyncio.wait(handshakes, timeout=self.limits.close_timeout)
        for endpoint in self._endpoints:
            await endpoint.shutdown()
        tasks = [t for t in self.serving if not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=self.limits.close_timeout)


__all__ = [
    "ALPN",
    "DeviceLink",
    "EncodedRequest",
    "EventHandler",
    "Exchange",
    "Hub",
    "Limits",
    "LinkEvents",
    "address_key",
    "hostport",
]

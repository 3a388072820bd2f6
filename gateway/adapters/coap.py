"""Device connections of OCF devices: CoAP over TCP and TLS (RFC 8323), gateway side.

Devices open the connection; the gateway is their CoAP server *and* a CoAP client of the device over
the same connection. What the rest of the gateway sees are plain values, never aiocoap types:

* :class:`CoapRequest` / :class:`CoapResponse` -- frozen messages, codes as ``"2.05"`` strings;
* :class:`Connection` -- one device connection: :meth:`~Connection.request`,
  :meth:`~Connection.observe`, :meth:`~Connection.close`, :meth:`~Connection.peer_certificate`;
* :class:`Observation` -- a running observation of a device resource;
* :class:`CoapServer` -- the listening endpoints (an async context manager) calling
  ``on_connect`` / ``on_request`` / ``on_close``.

The listeners and the device links under it are in :mod:`gateway.adapters.coap_tcp`, on our own
RFC 8323 connection (:mod:`gateway.wire`); nothing here imports aiocoap.

Callbacks (``on_connect``, ``on_close``, ``on_notification``, ``on_end``) are synchronous and run
on the connection's receive path: they must not block. Notifications are delivered in arrival
order, one call each, with no queue in between.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType, TracebackType
from typing import Final, Literal, Self

from cryptography import x509

from gateway.adapters import coap_tcp as wire
from gateway.adapters.coap_messages import (
    OCF_CBOR,
    OCF_VERSION_1_0,
    CoapRequest,
    CoapResponse,
    CoapTransportError,
    ConnectionClosed,
    RequestTimeout,
    RequestTooLarge,
    UnsupportedResponse,
)

__all__ = [
    "OCF_CBOR",
    "OCF_VERSION_1_0",
    "CloseHandler",
    "CoapRequest",
    "CoapResponse",
    "CoapServer",
    "CoapServerConfig",
    "CoapTransportError",
    "ConnectHandler",
    "Connection",
    "ConnectionClosed",
    "Observation",
    "RequestHandler",
    "RequestTimeout",
    "RequestTooLarge",
    "UnsupportedResponse",
]

log = logging.getLogger(__name__)

Scheme = Literal["coap+tcp", "coaps+tcp"]
RequestHandler = Callable[["Connection", CoapRequest], Awaitable[CoapResponse]]
ConnectHandler = Callable[["Connection"], str | None]
"""Returns None to accept the connection, or a reason to refuse it: the connection is then
aborted at once (Abort with the reason as diagnostic), before any of its requests is read."""
CloseHandler = Callable[["Connection", str], None]


@dataclass(frozen=True, slots=True)
class CoapServerConfig:
    """Listening endpoints and per-connection limits.

    Ports are the real ones; port 0 picks a free port (read :attr:`CoapServer.tcp_address` /
    :attr:`CoapServer.tls_address`). ``ssl_context`` is required with ``tls_bind``; the server sets
    its ALPN protocols to ``["coap"]`` (RFC 8323 section 4.1), and its verify mode decides whether
    client certificates are requested.
    """

    tcp_bind: tuple[str, int] | None = None
    tls_bind: tuple[str, int] | None = None
    ssl_context: ssl.SSLContext | None = None
    keepalive_interval: float = 20.0
    """Send a Ping after this long without receiving anything."""
    keepalive_timeout: float = 10.0
    """Close when nothing (Pong or else) arrives this long after our Ping."""
    opening_timeout: float = 10.0
    """Close a connection that sends neither a CSM nor a request within this time; also the TLS
    handshake timeout."""
    max_message_size: int = 256 * 1024
    """Largest message accepted, advertised in our CSM; a larger one aborts the connection."""
    max_pending_requests: int = 64
    """Requests to one device in flight at once; further callers wait (within their timeout)."""
    max_concurrent_requests: int = 16
    """Device requests handled at once per connection; beyond that the device gets 5.03."""
    max_write_buffer: int = 4 * 1024 * 1024
    """Bytes queued for a peer that does not read; beyond that the connection is aborted."""
    close_timeout: float = 2.0
    """How long a closing connection may take to flush before it is aborted."""
    auth_timeout: float | None = None
    """Close a connection not marked authenticated (:meth:`Connection.mark_authenticated`) this
    long after it was accepted (TLS handshake included) with Abort "not signed in within ...".
    None: no deadline (the driver must call ``mark_authenticated`` before setting one)."""
    max_unauthenticated: int | None = None
    """Connections accepted and not yet authenticated, at most; beyond that a new connection is
    closed as soon as it is accepted (before any TLS handshake), logged at most once a second.
    None: no limit (it needs ``mark_authenticated`` too)."""
    request_rate: float | None = 20.0
    """Device requests a second per connection (token bucket); beyond that a request gets 4.29
    Too Many Requests with Max-Age = seconds until the next one is accepted. None: no limit."""
    request_burst: int = 100
    """Requests a connection may send at once before ``request_rate`` applies."""
    max_connections: int | None = None
    """Connections at once, from anywhere, from accept to close, signed in or not: beyond that a
    new connection is closed as soon as it is accepted (before any TLS handshake), logged at
    most once a second. A bound on the memory and file descriptors a flood can take."""
    max_connections_per_ip: int | None = None
    """Connections from one remote address at once (an IPv4 address, or an IPv6 /64), from
    accept to close, signed in or not; beyond that a new connection is closed as soon as it is
    accepted (before any TLS handshake), logged with the peer address at most once a second.
    None: no limit."""
    message_timeout: float | None = 30.0
    """Abort (7.05 "message timeout: ...") a connection whose message is not complete this long
    after its first byte arrived, however slowly the peer keeps sending (slowloris). None: no
    deadline."""

    def __post_init__(self) -> None:
        if self.tcp_bind is None and self.tls_bind is None:
            raise ValueError("CoapServerConfig: give tcp_bind and/or tls_bind")
        if self.tls_bind is not None and self.ssl_context is None:
            raise ValueError("CoapServerConfig: tls_bind needs an ssl_context")
        for name in ("keepalive_interval", "keepalive_timeout", "opening_timeout", "close_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"CoapServerConfig.{name} must be > 0")
        for name in ("max_pending_requests", "max_concurrent_requests", "max_write_buffer"):
            if not getattr(self, name) >= 1:
                raise ValueError(f"CoapServerConfig.{name} must be >= 1")
        for name in ("auth_timeout", "request_rate", "message_timeout"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"CoapServerConfig.{name} must be > 0 or None")
        for name in ("max_unauthenticated", "max_connections_per_ip", "max_connections"):
            limit = getattr(self, name)
            if limit is not None and limit < 1:
                raise ValueError(f"CoapServerConfig.{name} must be >= 1 or None")
        if self.request_burst < 1:
            raise ValueError("CoapServerConfig.request_burst must be >= 1")
        if self.max_message_size < 1152:  # RFC 8323 section 5.3.1: the base value
            raise ValueError("CoapServerConfig.max_message_size must be >= 1152")


# --------------------------------------------------------------------------- observation


class Observation:
    """An observation of a device resource (RFC 7641 over RFC 8323).

    Every notification reaches ``on_notification``, in order, whatever its Observe value --
    including the last one when the device ends the observation (an error code, or a response
    without Observe). Notifications may arrive before :meth:`Connection.observe` returns.
    ``on_end(reason)`` is called once when an established observation ends: by the device, by the
    connection's end or by :meth:`cancel`. The connection keeps a strong reference to every
    running observation (:attr:`Connection.observations`).
    """

    def __init__(
        self,
        connection: Connection,
        request: CoapRequest,
        on_notification: Callable[[CoapResponse], None],
        on_end: Callable[[str], None] | None,
        timeout: float,
    ) -> None:
        self.connection: Final = connection
        self.request: Final = request
        self._on_notification = on_notification
        self._on_end = on_end
        self._timeout = timeout
        self._first: asyncio.Future[CoapResponse] = asyncio.get_running_loop().create_future()
        self._exchange: wire.Exchange | None = None
        self._ended = asyncio.Event()
        self._end_reason: str | None = None
        self._established = False
        self._cancelling = False
        self._first_response: CoapResponse | None = None

    def __repr__(self) -> str:
        state = "ended" if self.ended else "established" if self._established else "starting"
        return f"<Observation {self.request.path} on {self.connection.id} ({state})>"

    @property
    def first(self) -> CoapResponse:
        """The device's answer to the registration."""
        if self._first_response is None:
            raise RuntimeError("the observation has no first response yet")
        return self._first_response

    @property
    def established(self) -> bool:
        """The device accepted the registration: a 2.xx with an Observe option."""
        return self._established

    @property
    def ended(self) -> bool:
        return self._ended.is_set()

    @property
    def end_reason(self) -> str | None:
        return self._end_reason

    async def wait_ended(self) -> str:
        """Wait until the observation ended; returns the reason."""
        await self._ended.wait()
        assert self._end_reason is not None
        return self._end_reason

    async def cancel(self) -> None:
        """Deregister explicitly: GET with Observe=1 on the registration's token, then wait
        up to the observation's timeout for the device's answer. Nothing is delivered to
        ``on_notification`` once this is called. Idempotent; never raises for a closed
        connection."""
        if self.ended:
            return
        if self._cancelling:
            await self._ended.wait()
            return
        self._cancelling = True
        if self._exchange is not None and not self.connection.closed:
            self._exchange.deregister()
            try:
                async with asyncio.timeout(self._timeout):
                    await self._ended.wait()
            except TimeoutError:
                log.info(
                    "%s: no answer to the deregistration of %s within %ss",
                    self.connection.id,
                    self.request.path,
                    self._timeout,
                )
        self._finish("cancelled")

    # -- driven by the connection's exchange

    def _on_event(
        self, response: CoapResponse | None, error: BaseException | None, last: bool
    ) -> None:
        if error is not None:
            if not self._first.done():
                self._first.set_exception(error)
            self._finish(f"connection closed: {self.connection.close_reason or error}")
            return
        assert response is not None
        if not self._first.done():
            self._established = response.successful and response.observe is not None and not last
            self._first.set_result(response)
            if not self._established:
                self._finish(f"not established: {response.code}")
            return
        if not self._cancelling:
            try:
                self._on_notification(response)
            except Exception:
                log.exception(
                    "%s: on_notification for %s failed", self.connection.id, self.request.path
                )
        if last:
            ended = "cancelled" if self._cancelling else f"ended by the device: {response.code}"
            self._finish(ended)

    def _abandon(self) -> None:
        """The registering caller gave up (timeout, cancellation): deregister, forget."""
        if self._exchange is not None and self._established and not self.connection.closed:
            self._exchange.deregister()  # else the device notifies forever
        self._established = False  # nobody learnt of it: no on_end
        self._finish("abandoned")

    def _finish(self, reason: str) -> None:
        if self._ended.is_set():
            return
        self._end_reason = reason
        self._ended.set()
        if self._exchange is not None:
            self._exchange.stop()
        self.connection._observations.discard(self)
        if self._established and self._on_end is not None:
            try:
                self._on_end(reason)
            except Exception:
                log.exception("%s: on_end for %s failed", self.connection.id, self.request.path)


# --------------------------------------------------------------------------- connection


class Connection:
    """One device connection, made by :class:`CoapServer` (never constructed by callers)."""

    def __init__(self, link: wire.DeviceLink, server: CoapServer) -> None:
        self.id: Final = uuid.uuid4().hex
        self.scheme: Final[Scheme] = "coaps+tcp" if link.tls else "coap+tcp"
        self.remote: Final = link.remote
        """``"127.0.0.1:4567"`` / ``"[::1]:4567"``."""
        self._link = link
        self._server = server
        config = server.config
        self._max_concurrent_requests = config.max_concurrent_requests
        self._slots = asyncio.Semaphore(config.max_pending_requests)
        self._pending: set[asyncio.Future[CoapResponse]] = set()
        self._observations: set[Observation] = set()
        self._in_flight = 0
        self._lost = False
        self._lost_waiters: list[asyncio.Future[None]] = []  # made only when someone waits
        self._close_reason: str | None = None

    def __repr__(self) -> str:
        state = " closed" if self.closed else ""
        return f"<Connection {self.id} {self.scheme}://{self.remote}{state}>"

    def peer_certificate(self) -> x509.Certificate | None:
        """The certificate the device presented in the TLS handshake (None over TCP, or when the
        server's SSL context did not ask for one)."""
        return self._link.peer_certificate

    @property
    def authenticated(self) -> bool:
        """:meth:`mark_authenticated` was called."""
        return self._link.authenticated

    def mark_authenticated(self) -> None:
        """The device signed in: the ``auth_timeout`` deadline no longer applies and the
        connection no longer counts against ``max_unauthenticated``. Idempotent."""
        self._link.mark_authenticated()

    @property
    def closed(self) -> bool:
        """Closing or closed: nothing new is sent."""
        return self._close_reason is not None or self._link.closing

    @property
    def close_reason(self) -> str | None:
        return self._close_reason or self._link.close_reason

    @property
    def observations(self) -> frozenset[Observation]:
        """The running observations."""
        return frozenset(self._observations)

    async def wait_closed(self) -> str:
        """Wait until the connection is gone; returns the reason."""
        await self._until_lost()
        assert self._close_reason is not None
        return self._close_reason

    async def request(self, request: CoapRequest, timeout: float) -> CoapResponse:  # noqa: ASYNC109
        """Send ``request`` to the device and return its response.

        Raises :class:`ConnectionClosed` (at once on a closed connection, or when it closes while
        waiting), :class:`RequestTimeout` (no response within ``timeout`` seconds, which includes
        waiting for a free slot and for the write buffer to drain), :class:`RequestTooLarge`
        (larger than the device's Max-Message-Size: not sent) and ``ValueError`` (a request
        that cannot be encoded, or Observe=0: use :meth:`observe`).
        """
        if request.observe == 0:
            raise ValueError("register observations with Connection.observe()")
        encoded = wire.EncodedRequest(request)
        self._check_open()
        self._check_size(encoded)
        future: asyncio.Future[CoapResponse] = asyncio.get_running_loop().create_future()

        def on_event(
            response: CoapResponse | None, error: BaseException | None, last: bool
        ) -> None:
            if future.done():
                return
            if error is not None:
                future.set_exception(error)
            else:
                assert response is not None
                future.set_result(response)

        try:
            async with asyncio.timeout(timeout):
                async with self._slots:
                    await self._writable()
                    exchange = self._link.start(encoded, on_event)
                    self._pending.add(future)
                    try:
                        response = await future
                    finally:
                        self._pending.discard(future)
                        exchange.stop()
        except TimeoutError:
            raise RequestTimeout(
                f"{self.id}: no response to {request.method} {request.path} within {timeout}s"
            ) from None
        log.debug("%s: %s %s -> %s", self.id, request.method, request.path, response.code)
        return response

    async def observe(
        self,
        request: CoapRequest,
        on_notification: Callable[[CoapResponse], None],
        timeout: float,  # noqa: ASYNC109  (the API: a deadline per exchange)
        *,
        on_end: Callable[[str], None] | None = None,
    ) -> Observation:
        """Register an observation (``request`` goes out with Observe=0).

        Returns when the first response arrived (:attr:`Observation.first`); a device
        that refuses or cannot observe answers once, so check :attr:`Observation.established`.
        Errors as for :meth:`request`.
        """
        request = replace(request, observe=0)
        encoded = wire.EncodedRequest(request)
        self._check_open()
        self._check_size(encoded)
        observation = Observation(self, request, on_notification, on_end, timeout)
        try:
            async with asyncio.timeout(timeout):
                async with self._slots:
                    await self._writable()
                    self._observations.add(observation)
                    observation._exchange = self._link.start(encoded, observation._on_event)
                    first = await observation._first
        except TimeoutError:
            observation._abandon()
            raise RequestTimeout(
                f"{self.id}: no response to observe {request.path} within {timeout}s"
            ) from None
        except BaseException:
            observation._abandon()
            raise
        observation._first_response = first
        log.debug(
            "%s: observe %s -> %s%s",
            self.id,
            request.path,
            first.code,
            "" if observation.established else " (not established)",
        )
        return observation

    @property
    def released(self) -> bool:
        """:meth:`release` was called: nothing new goes to the device."""
        return self._link.released

    def release(self, alternative_address: str | None = None, hold_off: int | None = None) -> None:
        """RFC 8323 section 5.5: send Release -- the device should go (to
        ``alternative_address``, e.g. ``"coaps+tcp://gw2.example:5684"``, after ``hold_off``
        seconds) once its requests are answered. Requests already sent may complete; new ones
        raise :class:`ConnectionClosed`. The device closes the connection, or :meth:`close`
        does. No-op on a closed connection."""
        if not self.closed:
            self._link.release_with(alternative_address, hold_off)

    async def close(self, reason: str) -> None:
        """Send Abort (7.05) with ``reason`` as diagnostic payload, close the transport and wait
        until the connection is gone (the transport is aborted when it does not flush within
        ``close_timeout``)."""
        if not self._lost:
            if self._close_reason is None:
                self._close_reason = reason
            self._link.abort_with(reason)
        await self._until_lost()

    # -- internal

    async def _until_lost(self) -> None:
        if not self._lost:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._lost_waiters.append(waiter)
            await asyncio.shield(waiter)

    def _check_open(self) -> None:
        if self.closed:
            reason = self.close_reason or "closing"
            raise ConnectionClosed(f"{self.id}: connection closed ({reason})")

    @property
    def peer_max_message_size(self) -> int:
        """The largest message the device accepts: from its CSM, else RFC 8323's base value."""
        return self._link.peer_max_message_size

    def _check_size(self, encoded: wire.EncodedRequest) -> None:
        limit = self._link.peer_max_message_size
        if encoded.size > limit:
            request = encoded.request
            raise RequestTooLarge(
                f"{self.id}: {request.method} {request.path} not sent: {encoded.size} bytes, "
                f"above the device's Max-Message-Size of {limit} bytes",
                encoded.size,
                limit,
            )

    async def _writable(self) -> None:
        self._check_open()
        await self._link.wait_writable()
        self._check_open()

    # -- wire.LinkEvents

    def link_lost(self, reason: str) -> None:
        if self._close_reason is None:
            self._close_reason = reason
        error = ConnectionClosed(f"{self.id}: connection closed ({self._close_reason})")
        for future in list(self._pending):
            if not future.done():
                future.set_exception(error)
        for observation in list(self._observations):
            observation._on_event(None, error, True)
        self._lost = True
        waiters, self._lost_waiters = self._lost_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._server._connection_lost(self)

    async def serve(self, request: CoapRequest) -> CoapResponse:
        if self._in_flight >= self._max_concurrent_requests:
            return CoapResponse("5.03", b"too many concurrent requests", max_age=1)
        self._in_flight += 1
        try:
            response = await self._server._on_request(self, request)
        except Exception:
            log.exception("%s: on_request failed for %s %s", self.id, request.method, request.path)
            return CoapResponse("5.00")
        finally:
            self._in_flight -= 1
        log.debug("%s: device %s %s -> %s", self.id, request.method, request.path, response.code)
        return response


# --------------------------------------------------------------------------- server


class CoapServer:
    """The gateway's CoAP over TCP / TLS endpoints (an async context manager).

    ``on_connect(conn)`` is called once a connection is established (after the TLS handshake)
    and may refuse it (see :data:`ConnectHandler`),
    ``on_request(conn, req)`` for every device request (cancelled when the connection goes),
    ``on_close(conn, reason)`` once when it is gone. On exit every connection is closed with
    Abort "server shutting down".
    """

    def __init__(
        self,
        config: CoapServerConfig,
        *,
        on_request: RequestHandler,
        on_connect: ConnectHandler | None = None,
        on_close: CloseHandler | None = None,
    ) -> None:
        self.config: Final = config
        self._on_request = on_request
        self._on_connect = on_connect
        self._on_close = on_close
        self._connections: dict[str, Connection] = {}
        self._hub: wire.Hub | None = None
        self.tcp_address: tuple[str, int] | None = None
        """The bound TCP (host, port) -- the real port when 0 was configured."""
        self.tls_address: tuple[str, int] | None = None
        """The bound TLS (host, port)."""

    @property
    def connections(self) -> Mapping[str, Connection]:
        """Live connections by id."""
        return MappingProxyType(self._connections)

    @property
    def unauthenticated(self) -> int:
        """Connections accepted and not marked authenticated, TLS handshakes included."""
        return 0 if self._hub is None else self._hub.unauthenticated

    @property
    def refused(self) -> int:
        """Connections refused because of ``max_unauthenticated`` since the start."""
        return 0 if self._hub is None else self._hub.refused

    @property
    def refused_total(self) -> int:
        """Connections refused because of ``max_connections`` since the start."""
        return 0 if self._hub is None else self._hub.refused_total

    @property
    def refused_per_ip(self) -> int:
        """Connections refused because of ``max_connections_per_ip`` since the start."""
        return 0 if self._hub is None else self._hub.refused_per_ip

    def connections_from(self, host: str) -> int:
        """Live connections (TLS handshakes included) counted against ``host``'s limit."""
        return 0 if self._hub is None else self._hub.per_ip.get(wire.address_key(host), 0)

    @property
    def handshakes(self) -> int:
        """TLS handshakes in progress."""
        return 0 if self._hub is None else len(self._hub.tasks)

    async def __aenter__(self) -> Self:
        config = self.config
        limits = wire.Limits(
            keepalive_interval=config.keepalive_interval,
            keepalive_timeout=config.keepalive_timeout,
            opening_timeout=config.opening_timeout,
            max_message_size=config.max_message_size,
            max_write_buffer=config.max_write_buffer,
            close_timeout=config.close_timeout,
            auth_timeout=config.auth_timeout,
            max_unauthenticated=config.max_unauthenticated,
            request_rate=config.request_rate,
            request_burst=config.request_burst,
            max_connections_per_ip=config.max_connections_per_ip,
            message_timeout=config.message_timeout,
            max_connections=config.max_connections,
        )
        self._hub = hub = wire.Hub(limits, self._connection_made)
        try:
            if config.tcp_bind is not None:
                self.tcp_address = await hub.listen(config.tcp_bind, None)
                log.info("CoAP over TCP on %s", wire.hostport(*self.tcp_address))
            if config.tls_bind is not None:
                self.tls_address = await hub.listen(config.tls_bind, config.ssl_context)
                log.info("CoAP over TLS on %s", wire.hostport(*self.tls_address))
        except BaseException:
            await self._shutdown()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._shutdown()

    def stop_listening(self) -> None:
        """Accept no new connection (TLS handshakes in progress are cancelled); the live ones go
        on until they close or the server exits."""
        if self._hub is not None:
            self._hub.stop_listening()

    async def _shutdown(self) -> None:
        hub, self._hub = self._hub, None
        if hub is None:
            return
        hub.stop_listening()
        await asyncio.gather(
            *(c.close("server shutting down") for c in list(self._connections.values()))
        )
        await hub.shutdown()

    def _connection_made(self, link: wire.DeviceLink) -> Connection:
        connection = Connection(link, self)
        self._connections[connection.id] = connection
        log.info("%s: %s connection from %s", connection.id, connection.scheme, connection.remote)
        if self._on_connect is not None:
            try:
                refused = self._on_connect(connection)
            except Exception:
                log.exception("%s: on_connect failed", connection.id)
                link.abort_with("internal error")
            else:
                if refused is not None:
                    link.abort_with(refused)
        return connection

    def _connection_lost(self, connection: Connection) -> None:
        self._connections.pop(connection.id, None)
        reason = connection.close_reason or "closed"
        log.info("%s: connection from %s closed: %s", connection.id, connection.remote, reason)
        if self._on_close is not None:
            try:
                self._on_close(connection, reason)
            except Exception:
                log.exception("%s: on_close failed", connection.id)

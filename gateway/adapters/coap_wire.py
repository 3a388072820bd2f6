"""aiocoap 0.4.17 glue: the only module that imports aiocoap (used by :mod:`gateway.adapters.coap`).

We use aiocoap for RFC 8323 framing and signalling (``TcpConnection``), token matching
(``TokenManager``) and the dispatch of device requests (``Context`` with our own site). Everything
else is ours. Work-arounds, each pinned by ``tests/unit/gateway/adapters/test_coap_workarounds.py``
so that an aiocoap upgrade that changes the behaviour fails a test:

W1  ``TCPServer.create_server`` binds the given port + 1 for TLS and the *default* port for port
    0. -> :meth:`_Endpoint.listen` creates the listening socket itself (subclass of ``TCPServer``,
    which we keep only for its dispatch methods).
W2  A message other than a CSM as the first one aborts the connection ("No CSM received"); OCF
    devices (iotivity-lite) never send a CSM. -> ``_remote_settings`` is preset to "no options" in
    ``connection_made``. Our own CSM still goes out first.
W3  ``Context.request`` loses notifications: the blockwise path coalesces a burst into the latest,
    the plain path drops every notification whose Observe value is not larger than the last (RFC
    8323 section 7.2: over TCP the value "MAY be empty on transmission and MUST be ignored on
    reception"); the blockwise path also holds observations only weakly (an unreferenced one is
    dropped). -> :class:`Exchange` hands its ``Pipe`` to the ``TokenManager`` directly and sees
    every event, in order, synchronously; the facade holds running observations strongly.
W4  Dropping an observation sends nothing over TCP. -> :meth:`Exchange.deregister` sends GET with
    Observe=1 on the registration's token (bypassing the token manager, which would pick a new
    token); the device's answer ends the exchange.
W5  The TLS peer certificate is only on the transport. -> :func:`peer_certificate`, the one place
    that asks the transport for its ``ssl_object``.
W6  A request on a closed connection waits forever (asyncio drops the write; uvloop raises
    ``RuntimeError`` from inside aiocoap). -> writes to a closing transport are dropped here, the
    facade refuses requests on closed connections, times out every request and fails pending ones
    when the connection goes.
W7  No back-pressure (``pause_writing`` is a no-op). -> :attr:`DeviceProtocol.writable` gates our
    requests; a peer that lets the write buffer grow past ``max_write_buffer`` is aborted; device
    requests in flight and our pending requests are bounded by the facade.
W8  No opening timeout and no keepalive Ping. -> timers in :class:`DeviceProtocol`; the TLS
    handshake is bounded by ``ssl_handshake_timeout``.
W9  The Pong to a Ping with a token is built with the deprecated ``Message(token=...)``: a
    ``DeprecationWarning`` that kills the connection where warnings are errors. -> our own Pong.
W10 No ALPN on the server side. -> the server context offers "coap" (RFC 8323 section 4.1).
W11 ``TCPServer.shutdown`` only sends Release and leaves the transports open. -> the facade
    aborts and closes each connection, then shuts the token managers down.
W12 aiocoap knows nothing of OCF-(Accept-)Content-Format-Version (2049 / 2053). -> they are
    added as plain uint options (0x0800 by default with content format 10000); no Accept option
    is added unless the caller gives one.

Not worked around: we send what the caller gives in one message -- no Block-wise transfer and no
check against the peer's advertised Max-Message-Size.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any, Final, Protocol

from aiocoap import error as aiocoap_error
from aiocoap.message import Message
from aiocoap.numbers.codes import ABORT, CSM, PING, PONG, RELEASE, SERVICE_UNAVAILABLE
from aiocoap.numbers.constants import COAP_PORT, COAPS_PORT
from aiocoap.optiontypes import UintOption
from aiocoap.pipe import Pipe
from aiocoap.protocol import Context
from aiocoap.tokenmanager import TokenManager
from aiocoap.transports.tcp import TcpConnection, TCPServer
from cryptography import x509

from gateway.adapters.coap_messages import (
    METHOD_NAMES,
    METHODS,
    OCF_CBOR,
    OCF_VERSION_1_0,
    OPTION_OCF_ACCEPT_VERSION,
    OPTION_OCF_VERSION,
    CoapRequest,
    CoapResponse,
    CoapTransportError,
    ConnectionClosed,
    format_code,
    parse_code,
)

log = logging.getLogger("gateway.adapters.coap")

ALPN: Final = "coap"
MAX_DIAGNOSTIC: Final = 512
"""Longest Abort diagnostic payload we send (bytes)."""

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


class LinkEvents(Protocol):
    """What a connection's owner (the facade's ``Connection``) receives from the wire."""

    def link_lost(self, reason: str) -> None: ...

    def serve(self, request: CoapRequest) -> Awaitable[CoapResponse]: ...


class DeviceLink(Protocol):
    """The aiocoap-free surface of a :class:`DeviceProtocol`, as the facade uses it."""

    @property
    def tls(self) -> bool: ...
    @property
    def remote(self) -> str: ...
    @property
    def peer_certificate(self) -> x509.Certificate | None: ...
    @property
    def writable(self) -> asyncio.Event: ...
    @property
    def closing(self) -> bool: ...
    @property
    def close_reason(self) -> str | None: ...

    def start(self, request: EncodedRequest, on_event: EventHandler) -> Exchange: ...

    def abort_with(self, reason: str) -> None: ...


# --------------------------------------------------------------------------- conversions


def hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _uint(value: int | None, name: str, limit: int) -> int | None:
    if value is not None and not 0 <= value < limit:
        raise ValueError(f"{name} out of range: {value}")
    return value


def _message(request: CoapRequest, ocf_defaults: bool) -> Any:
    code = METHODS.get(request.method)
    if code is None:
        raise ValueError(f"unsupported method: {request.method!r}")
    if not request.path.startswith("/"):
        raise ValueError(f"path must start with '/': {request.path!r}")
    content_format = _uint(request.content_format, "content_format", 1 << 16)
    accept = _uint(request.accept, "accept", 1 << 16)
    observe = _uint(request.observe, "observe", 1 << 24)
    ocf_version = _uint(request.ocf_version, "ocf_version", 1 << 16)
    ocf_accept = _uint(request.ocf_accept_version, "ocf_accept_version", 1 << 16)
    if ocf_defaults and content_format == OCF_CBOR and ocf_version is None:
        ocf_version = OCF_VERSION_1_0
    if ocf_defaults and OCF_CBOR in (content_format, accept) and ocf_accept is None:
        ocf_accept = OCF_VERSION_1_0

    message = Message(code=code, payload=bytes(request.payload))
    if request.path != "/":
        message.opt.uri_path = tuple(request.path[1:].split("/"))
    if request.query:
        message.opt.uri_query = tuple(request.query)
    if content_format is not None:
        message.opt.content_format = content_format
    if accept is not None:
        message.opt.accept = accept
    if observe is not None:
        message.opt.observe = observe
    if ocf_accept is not None:
        message.opt.add_option(UintOption(OPTION_OCF_ACCEPT_VERSION, ocf_accept))
    if ocf_version is not None:
        message.opt.add_option(UintOption(OPTION_OCF_VERSION, ocf_version))
    return message


class EncodedRequest:
    """A request to a device, validated and encoded (single use)."""

    __slots__ = ("_message", "request")

    def __init__(self, request: CoapRequest) -> None:
        self.request: Final = request
        self._message: Any = _message(request, ocf_defaults=True)

    def take(self) -> Any:
        message, self._message = self._message, None
        if message is None:
            raise RuntimeError("an EncodedRequest is sent once")
        return message


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _uint_option(message: Any, number: int) -> int | None:
    options = message.opt.get_option(number)
    if not options:
        return None
    value = options[0].value
    return int.from_bytes(value, "big") if isinstance(value, bytes) else int(value)


def request_value(message: Any) -> CoapRequest:
    """An incoming aiocoap request message as a :class:`CoapRequest`."""
    code = int(message.code)
    return CoapRequest(
        method=METHOD_NAMES.get(code) or format_code(code),
        path="/" + "/".join(message.opt.uri_path),
        query=tuple(message.opt.uri_query),
        payload=bytes(message.payload),
        content_format=_opt_int(message.opt.content_format),
        accept=_opt_int(message.opt.accept),
        observe=_opt_int(message.opt.observe),
        ocf_version=_uint_option(message, OPTION_OCF_VERSION),
        ocf_accept_version=_uint_option(message, OPTION_OCF_ACCEPT_VERSION),
    )


def response_value(message: Any) -> CoapResponse:
    """An incoming aiocoap response message as a :class:`CoapResponse`."""
    etag = message.opt.etag
    return CoapResponse(
        code=format_code(int(message.code)),
        payload=bytes(message.payload),
        content_format=_opt_int(message.opt.content_format),
        max_age=_opt_int(message.opt.max_age),
        etag=None if etag is None else bytes(etag),
        observe=_opt_int(message.opt.observe),
        ocf_version=_uint_option(message, OPTION_OCF_VERSION),
    )


def response_message(response: CoapResponse) -> Any:
    """Our :class:`CoapResponse` to a device request as an aiocoap message (no Observe)."""
    message = Message(code=parse_code(response.code), payload=bytes(response.payload))
    content_format = _uint(response.content_format, "content_format", 1 << 16)
    if content_format is not None:
        message.opt.content_format = content_format
    if response.max_age is not None:
        message.opt.max_age = _uint(response.max_age, "max_age", 1 << 32)
    if response.etag is not None:
        if not 1 <= len(response.etag) <= 8:
            raise ValueError(f"an ETag has 1 to 8 bytes: {response.etag!r}")
        message.opt.etag = bytes(response.etag)
    ocf_version = _uint(response.ocf_version, "ocf_version", 1 << 16)
    if ocf_version is None and content_format == OCF_CBOR:
        ocf_version = OCF_VERSION_1_0
    if ocf_version is not None:
        message.opt.add_option(UintOption(OPTION_OCF_VERSION, ocf_version))
    return message


def peer_certificate(transport: asyncio.BaseTransport) -> x509.Certificate | None:
    """W5: the client certificate of a TLS connection -- the one place that reaches into the
    transport's ``ssl_object`` (aiocoap offers no claims for TLS peers)."""
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der) if der else None


# --------------------------------------------------------------------------- exchanges


class Exchange:
    """One request to the device and its response(s), on aiocoap's token manager (W3)."""

    def __init__(
        self, link: DeviceProtocol, request: EncodedRequest, on_event: EventHandler
    ) -> None:
        self._link = link
        self._request = request.request
        self._on_event = on_event
        self._done = False
        self._stopped = False
        self._in_event = False
        message = request.take()
        message.remote = link
        pipe = Pipe(message, link.log)
        self._unregister: Callable[[], None] = pipe.on_event(self._event)
        link.tokenmanager.request(pipe)  # assigns the token and writes the message
        self.token: Final[bytes] = bytes(message.token)

    def _event(self, event: Any) -> bool:
        if self._done:
            return False
        self._in_event = True
        try:
            if event.exception is not None:
                self._done = True
                self._on_event(None, self._link.translate_error(event.exception), True)
            elif event.message is not None:
                self._done = bool(event.is_last)
                self._on_event(response_value(event.message), None, self._done)
        finally:
            self._in_event = False
        return not self._done

    def stop(self) -> None:
        """Lose interest: later responses on the token are ignored (logged by aiocoap)."""
        if self._stopped:
            return
        self._stopped = self._done = True
        if not self._in_event:  # else returning False from _event unregisters
            self._unregister()

    def deregister(self) -> None:
        """W4: send GET Observe=1 with the registration's token and options."""
        if self._stopped or self._link.closing:
            return
        message = _message(replace(self._request, observe=1), ocf_defaults=True)
        message.token = self.token
        message.remote = self._link
        self._link.send_raw(message)


# --------------------------------------------------------------------------- the connection


class DeviceProtocol(TcpConnection):  # type: ignore[misc]  # aiocoap is untyped
    """aiocoap's RFC 8323 connection with our work-arounds (one per device connection)."""

    _remote_settings: dict[str, Any] | None  # aiocoap's: the peer's CSM options
    _transport: asyncio.Transport | None

    def __init__(self, endpoint: _Endpoint) -> None:
        super().__init__(endpoint, endpoint.log, endpoint.loop, is_server=True)
        self._hub: Final = endpoint.hub
        self._limits: Final = endpoint.hub.limits
        self._ev_loop: Final[asyncio.AbstractEventLoop] = endpoint.loop
        self.tokenmanager: Final[Any] = endpoint.tokenmanager
        self._my_max_message_size = self._limits.max_message_size  # advertised in our CSM
        self.tls: Final = endpoint.tls
        self.remote = "-"
        self.peer_certificate: x509.Certificate | None = None
        self.writable: Final = asyncio.Event()
        self.writable.set()
        self.events: LinkEvents | None = None
        self._opened = False
        self._rx_count = 0
        self._last_rx = 0.0
        self._ping_rx_count: int | None = None
        self._ping_sent = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._hard_close: asyncio.TimerHandle | None = None
        self._our_reason: str | None = None
        self._protocol_error: str | None = None
        self._peer_signal: str | None = None
        self._gone = False
        self._draining = False

    # -- DeviceLink

    @property
    def closing(self) -> bool:
        transport = self._transport
        return (
            self._gone
            or self._our_reason is not None
            or transport is None
            or transport.is_closing()
        )

    @property
    def close_reason(self) -> str | None:
        return self._our_reason or self._protocol_error or self._peer_signal

    def start(self, request: EncodedRequest, on_event: EventHandler) -> Exchange:
        if self.closing:
            raise ConnectionClosed(f"connection closed ({self.close_reason or 'closing'})")
        return Exchange(self, request, on_event)

    def abort_with(self, reason: str) -> None:
        """Abort (7.05) with ``reason`` as diagnostic, then close.

        Over TCP we send FIN and discard what still arrives until the peer closes: closing with
        unread input would send RST, and the peer could lose the Abort. The transport is aborted
        when the peer does not close within ``close_timeout``."""
        transport = self._transport
        if self._gone or self._our_reason is not None:
            return
        self._our_reason = reason
        if transport is None:
            return
        diagnostic = reason.encode()[:MAX_DIAGNOSTIC].decode(errors="ignore").encode()
        self._send_message(Message(code=ABORT, payload=diagnostic))
        self._draining = True
        try:
            if transport.can_write_eof():
                transport.write_eof()
            else:
                transport.close()  # TLS: close_notify, and asyncio reads until the peer's
        except (OSError, RuntimeError):  # the peer is already gone
            transport.abort()
            return
        self._hard_close = self._ev_loop.call_later(self._limits.close_timeout, transport.abort)

    def translate_error(self, exc: BaseException) -> BaseException:
        reason = self.close_reason or str(exc) or type(exc).__name__
        if isinstance(exc, aiocoap_error.NetworkError | aiocoap_error.LibraryShutdown):
            return ConnectionClosed(f"connection closed ({reason})")
        if self.closing:
            return ConnectionClosed(f"connection closed ({reason})")
        return CoapTransportError(repr(exc))

    def send_raw(self, message: Any) -> None:
        self._send_message(message)

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        try:
            super().connection_made(transport)  # addresses, then our CSM
            if self._remote_settings is None:
                self._remote_settings = {}  # W2: a device may send a request first
            host, port = transport.get_extra_info("peername")[:2]
            self.remote = hostport(host, port)
            self.peer_certificate = peer_certificate(transport)
            self._last_rx = self._ev_loop.time()
            self._arm(self._last_rx + self._limits.opening_timeout)
            self.events = self._hub.link_made(self)
        except Exception:
            log.exception("cannot set up a connection")
            transport.abort()  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if self._draining:
            return
        self._last_rx = self._ev_loop.time()
        self._rx_count += 1
        try:
            super().data_received(data)
        except Exception:
            log.exception("%s: failed to process a message", self.remote)
            self.abort_with("internal error")

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._gone:
            return
        self._gone = True
        for handle in (self._timer, self._hard_close):
            if handle is not None:
                handle.cancel()
        self._timer = self._hard_close = None
        reason = self.close_reason or (
            f"connection lost: {exc}" if exc is not None else "closed by the peer"
        )
        self._our_reason = self._our_reason or reason
        try:
            super().connection_lost(exc)  # aiocoap evicts it and fails its exchanges
        except Exception:
            log.exception("%s: aiocoap failed on connection loss", self.remote)
        finally:
            self.writable.set()
            if self.events is not None:
                self.events.link_lost(reason)

    # -- aiocoap hooks

    def _send_message(self, message: Any) -> None:
        transport = self._transport
        if transport is None or transport.is_closing() or self._gone or self._draining:
            log.debug("%s: connection closing, dropped %r", self.remote, message)  # W6
            return
        try:
            super()._send_message(message)
        except RuntimeError:  # uvloop: the handle closed under us
            log.debug("%s: transport gone, dropped %r", self.remote, message)
            transport.abort()
            return
        if transport.get_write_buffer_size() > self._limits.max_write_buffer:  # W7
            self._protocol_error = "peer does not read (write buffer limit exceeded)"
            transport.abort()

    def _process_signaling(self, message: Any) -> None:
        code = message.code
        critical = any(int(o.number) & 1 for o in message.opt.option_list())
        if code == PING and not critical:
            self._send_message(Message(code=PONG, _token=message.token))  # W9
            return
        if code == CSM:
            self.mark_opened()
        elif code == ABORT:
            diagnostic = bytes(message.payload).decode(errors="replace")
            self._peer_signal = "aborted by the peer" + (f": {diagnostic}" if diagnostic else "")
        elif code == RELEASE:
            self._peer_signal = "released by the peer"
        super()._process_signaling(message)

    def abort(self, errormessage: str | None = None, bad_csm_option: int | None = None) -> None:
        if self._protocol_error is None and self._our_reason is None:
            self._protocol_error = f"protocol error: {errormessage}"
        super().abort(errormessage, bad_csm_option)

    # -- opening timeout and keepalive (W8)

    def mark_opened(self) -> None:
        if not self._opened:
            self._opened = True
            self._arm(self._last_rx + self._limits.keepalive_interval)

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._ev_loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self.closing:
            return
        limits, now = self._limits, self._ev_loop.time()
        if not self._opened:
            self.abort_with(f"opening timeout: no CSM or request within {limits.opening_timeout}s")
            return
        if self._ping_rx_count is not None:
            if self._rx_count == self._ping_rx_count:
                if now >= self._ping_sent + limits.keepalive_timeout:
                    self.abort_with(
                        f"keepalive timeout: no Pong within {limits.keepalive_timeout}s"
                    )
                else:
                    self._arm(self._ping_sent + limits.keepalive_timeout)
                return
            self._ping_rx_count = None
        due = self._last_rx + limits.keepalive_interval
        if now < due:
            self._arm(due)
            return
        self._ping_rx_count, self._ping_sent = self._rx_count, now
        self._send_message(Message(code=PING))
        self._arm(now + limits.keepalive_timeout)


class _Endpoint(TCPServer):  # type: ignore[misc]  # aiocoap is untyped
    """One listening socket; aiocoap's ``TCPServer`` minus its ``create_server`` (W1)."""

    server: asyncio.Server | None

    def __init__(self, hub: Hub, tls: bool) -> None:
        super().__init__()
        self.hub: Final = hub
        self.tls: Final = tls
        self._scheme = "coaps+tcp" if tls else "coap+tcp"
        self._default_port = COAPS_PORT if tls else COAP_PORT
        self.log = hub.aiocoap_log
        self.loop: asyncio.AbstractEventLoop = hub.loop
        tokenmanager = TokenManager(hub.context)
        tokenmanager.token_interface = self
        self._tokenmanager = tokenmanager
        self.tokenmanager: Final = tokenmanager

    async def listen(
        self, host: str, port: int, ssl_context: ssl.SSLContext | None
    ) -> tuple[str, int]:
        self.server = await self.loop.create_server(
            self._new_protocol,
            host,
            port,
            ssl=ssl_context,
            ssl_handshake_timeout=self.hub.limits.opening_timeout if ssl_context else None,
        )
        sockname = self.server.sockets[0].getsockname()
        return str(sockname[0]), int(sockname[1])

    def _new_protocol(self) -> DeviceProtocol:
        protocol = DeviceProtocol(self)
        self._pool.add(protocol)
        return protocol

    def _dispatch_incoming(self, connection: DeviceProtocol, message: Any) -> None:
        connection.mark_opened()
        super()._dispatch_incoming(connection, message)

    def stop_listening(self) -> None:
        if self.server is not None:
            self.server.close()

    async def shutdown(self) -> None:  # called by the token manager's shutdown
        self._tokenmanager = None
        if self.server is None:
            return
        self.server.close()
        try:
            async with asyncio.timeout(self.hub.limits.close_timeout):
                await self.server.wait_closed()
        except TimeoutError:
            log.warning("listening socket did not close within %ss", self.hub.limits.close_timeout)


class _Site:
    """aiocoap's server site: every device request goes to its connection's ``serve``."""

    def __init__(self, hub: Hub) -> None:
        self._hub = hub

    async def render_to_pipe(self, pipe: Any) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._hub.render_tasks.add(task)
        try:
            message = pipe.request
            link = message.remote
            events = link.events if isinstance(link, DeviceProtocol) else None
            if events is None:
                pipe.add_response(Message(code=SERVICE_UNAVAILABLE), is_last=True)
                return
            response = await events.serve(request_value(message))
            pipe.add_response(response_message(response), is_last=True)
        finally:
            self._hub.render_tasks.discard(task)


class Hub:
    """The aiocoap context and listening endpoints of one server."""

    def __init__(self, limits: Limits, link_made: Callable[[DeviceLink], LinkEvents]) -> None:
        self.loop: Final = asyncio.get_running_loop()
        self.limits: Final = limits
        self._link_made = link_made
        self.aiocoap_log: Final = logging.getLogger("gateway.adapters.coap.aiocoap")
        self.context: Final[Any] = Context(
            loop=self.loop, serversite=_Site(self), loggername=self.aiocoap_log.name
        )
        self.render_tasks: set[asyncio.Task[Any]] = set()
        self._endpoints: list[_Endpoint] = []

    def link_made(self, link: DeviceProtocol) -> LinkEvents:
        return self._link_made(link)

    async def listen(
        self, bind: tuple[str, int], ssl_context: ssl.SSLContext | None
    ) -> tuple[str, int]:
        if ssl_context is not None:
            ssl_context.set_alpn_protocols([ALPN])  # W10
        endpoint = _Endpoint(self, tls=ssl_context is not None)
        self._endpoints.append(endpoint)
        return await endpoint.listen(bind[0], bind[1], ssl_context)

    def stop_listening(self) -> None:
        for endpoint in self._endpoints:
            endpoint.stop_listening()

    async def shutdown(self) -> None:
        for endpoint in self._endpoints:
            await endpoint.tokenmanager.shutdown()
        tasks = [t for t in self.render_tasks if not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=self.limits.close_timeout)

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
W8  No opening timeout, no keepalive Ping and no bound on how long a message may take to
    arrive (a peer trickling bytes holds the connection forever). -> timers in
    :class:`DeviceProtocol`, the slow-message one (``message_timeout``) running from a message's
    first byte to its last; the TLS handshake is bounded by ``ssl_handshake_timeout``.
W9  The Pong to a Ping with a token is built with the deprecated ``Message(token=...)``: a
    ``DeprecationWarning`` that kills the connection where warnings are errors. -> our own Pong.
W10 No ALPN on the server side. -> the server context offers "coap" (RFC 8323 section 4.1).
W11 ``TCPServer.shutdown`` only sends Release and leaves the transports open. -> the facade
    aborts and closes each connection, then shuts the token managers down.
W12 aiocoap knows nothing of OCF-(Accept-)Content-Format-Version (2049 / 2053). -> they are
    added as plain uint options (0x0800 by default with content format 10000); no Accept option
    is added unless the caller gives one.

W13 Framing: ``data_received`` re-copies its whole receive buffer on every chunk (quadratic in a
    message sent in small pieces), checks the token length only once the whole body is in, calls a
    payload marker without payload, a truncated option and an option number above 65535 fine, and
    lets a string option that is not UTF-8 escape as ``UnicodeDecodeError`` (the connection died
    as "internal error"). -> :class:`gateway.adapters.coap_frames.Deframer` / ``parse_frame``
    (strict, pure, fuzzed) feed messages built by us; every format error aborts with a diagnostic.
W14 Unknown critical options in a request are ignored and the request served. -> 4.02 Bad Option
    (5.05 for the proxy options) from :func:`coap_frames.request_option_problem`, before dispatch;
    malformed or supernumerary elective options are dropped (RFC 7252 section 5.4).
W15 An Empty message (0.00) and codes of the reserved classes 1 and 6 are dispatched as requests.
    -> Empty is ignored (RFC 8323 section 3.3); a reserved class is a format error (Abort).
W16 ``abort`` (protocol errors) closes the transport with unread input: the kernel may send RST and
    the peer lose the Abort. -> ``_abort_with`` goes through the same FIN-and-drain as ours.
W17 ``create_server(ssl=...)`` starts the TLS handshake before we see the connection, so a
    connection cannot be refused before it costs a handshake. -> listeners are plain TCP; a
    connection is admitted (limits of connections per remote address and of unauthenticated
    connections) and then upgraded with ``loop.connect_accepted_socket``; a failed handshake is
    logged with the peer address.
W18 ``Context.render_to_pipe`` creates the rendering coroutine before its task starts: when the
    request loses interest at once (a second request on the same token, the connection aborted
    in the same read), the task is cancelled unstarted and the coroutine is never awaited -- a
    ``RuntimeWarning`` any peer can trigger at will. -> :class:`_Context` creates it inside the
    task.
W19 aiocoap's CSM (``_send_initial_csm``) advertises the Block-wise-Transfer capability (RFC 8323
    section 5.3.2), yet nothing here does block-wise transfer: a device request with Block1 /
    Block2 gets 4.02 (W14) and a Block2 response would have passed as the whole content. -> our
    CSM carries Max-Message-Size only; a response that is one block of several (Block2 with
    More set, or a later block) fails its exchange with :class:`UnsupportedResponse`.
W20 Nothing checks a request against the Max-Message-Size the peer advertised (RFC 8323 section
    5.3.1; the base value 1152 until its CSM arrives). -> :attr:`EncodedRequest.size` (worst-case
    token) against :attr:`DeviceProtocol.peer_max_message_size`: the facade refuses a larger
    request before it is sent (``RequestTooLarge``).

Not worked around: we send what the caller gives in one message -- no Block-wise transfer.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import socket
import ssl
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, replace
from typing import Any, Final, Protocol

from aiocoap import error as aiocoap_error
from aiocoap.message import Direction, Message
from aiocoap.numbers.codes import (
    ABORT,
    BAD_OPTION,
    CSM,
    PING,
    PONG,
    PROXYING_NOT_SUPPORTED,
    RELEASE,
    SERVICE_UNAVAILABLE,
    TOO_MANY_REQUESTS,
)
from aiocoap.numbers.constants import COAP_PORT, COAPS_PORT
from aiocoap.numbers.optionnumbers import OptionNumber
from aiocoap.optiontypes import OpaqueOption, UintOption
from aiocoap.pipe import Pipe, error_to_message
from aiocoap.protocol import Context
from aiocoap.tokenmanager import TokenManager
from aiocoap.transports import rfc8323common
from aiocoap.transports.tcp import TcpConnection, TCPServer, _serialize
from cryptography import x509

from gateway.adapters import coap_frames as frames
from gateway.adapters.coap_messages import (
    METHOD_NAMES,
    OCF_CBOR,
    OCF_VERSION_1_0,
    OPTION_OCF_ACCEPT_VERSION,
    OPTION_OCF_VERSION,
    CoapRequest,
    CoapResponse,
    CoapTransportError,
    ConnectionClosed,
    UnsupportedResponse,
    check_request,
    checked_uint,
    format_code,
    parse_code,
)

log = logging.getLogger("gateway.adapters.coap")

ALPN: Final = "coap"
MAX_DIAGNOSTIC: Final = 512
"""Longest Abort diagnostic payload we send (bytes)."""
BASE_MAX_MESSAGE_SIZE: Final = 1152
"""RFC 8323 section 5.3.1: what a peer accepts until its CSM says otherwise."""

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

    @property
    def peer_max_message_size(self) -> int: ...

    def start(self, request: EncodedRequest, on_event: EventHandler) -> Exchange: ...

    def abort_with(self, reason: str) -> None: ...

    def mark_authenticated(self) -> None: ...

    @property
    def authenticated(self) -> bool: ...


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


def _message(request: CoapRequest, ocf_defaults: bool) -> Any:
    checked = check_request(request, ocf_defaults=ocf_defaults)
    code, content_format, accept = checked.code, checked.content_format, checked.accept
    observe, ocf_version = checked.observe, checked.ocf_version
    ocf_accept = checked.ocf_accept_version

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

    @property
    def size(self) -> int:
        """Bytes on the wire with the longest token the token manager may pick."""
        if self._message is None:
            raise RuntimeError("an EncodedRequest is sent once")
        return len(_serialize(self._message)) + frames.MAX_TOKEN - len(self._message.token)

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
    content_format = checked_uint(response.content_format, "content_format", 1 << 16)
    if content_format is not None:
        message.opt.content_format = content_format
    if response.max_age is not None:
        message.opt.max_age = checked_uint(response.max_age, "max_age", 1 << 32)
    if response.etag is not None:
        if not 1 <= len(response.etag) <= 8:
            raise ValueError(f"an ETag has 1 to 8 bytes: {response.etag!r}")
        message.opt.etag = bytes(response.etag)
    ocf_version = checked_uint(response.ocf_version, "ocf_version", 1 << 16)
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
                block2 = event.message.opt.block2
                if block2 is not None and (block2.more or block2.block_number):  # W19
                    self._done = True
                    error = UnsupportedResponse(
                        f"{self._request.method} {self._request.path}: the device answered "
                        f"block-wise (block {block2.block_number}, more: {block2.more}), "
                        "which this gateway does not support"
                    )
                    self._on_event(None, error, True)
                    return False
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


def incoming_message(frame: frames.Frame, options: tuple[tuple[int, bytes], ...]) -> Any:
    """An aiocoap message from a parsed frame (W13); a value aiocoap's option type cannot decode
    is kept opaque rather than failing the message."""
    message = Message(code=frame.code, _token=frame.token, payload=frame.payload)
    for number, value in options:
        try:
            option = OptionNumber(number).create_option(decode=value)
        except Exception:
            option = OpaqueOption(number, value)
        message.opt.add_option(option)
    message.direction = Direction.INCOMING
    return message


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


class DeviceProtocol(TcpConnection):  # type: ignore[misc]  # aiocoap is untyped
    """aiocoap's RFC 8323 connection with our work-arounds (one per device connection).

    Made at accept time. Over TLS it is admitted before the handshake and ``connection_made``
    comes after it (W17); over TCP it is admitted in ``connection_made``."""

    _remote_settings: dict[str, Any] | None  # aiocoap's: the peer's CSM options
    _transport: asyncio.Transport | None

    def __init__(self, endpoint: _Endpoint) -> None:
        super().__init__(endpoint, endpoint.log, endpoint.loop, is_server=True)
        self._hub: Final = endpoint.hub
        self._limits: Final = endpoint.hub.limits
        self._ev_loop: Final[asyncio.AbstractEventLoop] = endpoint.loop
        self.tokenmanager: Final[Any] = endpoint.tokenmanager
        self._my_max_message_size = self._limits.max_message_size  # advertised in our CSM
        self._deframer = frames.Deframer(self._limits.max_message_size)
        self.tls: Final = endpoint.tls
        self.remote = "-"
        self.peer_certificate: x509.Certificate | None = None
        self.writable: Final = asyncio.Event()
        self.writable.set()
        self.events: LinkEvents | None = None
        self._admitted = False  # counted as unauthenticated by the hub
        self._address: str | None = None  # counted by the hub's per-address limit under this key
        self._authenticated = False
        self._accepted_at = self._ev_loop.time()
        self._made = False
        self._bucket: TokenBucket | None = None
        if self._limits.request_rate is not None:
            self._bucket = TokenBucket(
                self._limits.request_rate, self._limits.request_burst, self._accepted_at
            )
        self._opened = False
        self._rx_count = 0
        self._last_rx = 0.0
        self._ping_rx_count: int | None = None
        self._ping_sent = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._auth_timer: asyncio.TimerHandle | None = None
        self._message_timer: asyncio.TimerHandle | None = None  # a message is incomplete
        self._hard_close: asyncio.TimerHandle | None = None
        self._our_reason: str | None = None
        self._protocol_error: str | None = None
        self._peer_signal: str | None = None
        self._shutting = False
        self._gone = False
        self._draining = False

    # -- DeviceLink

    @property
    def closing(self) -> bool:
        transport = self._transport
        return (
            self._gone
            or self._shutting
            or self._our_reason is not None
            or transport is None
            or transport.is_closing()
        )

    @property
    def close_reason(self) -> str | None:
        return self._our_reason or self._protocol_error or self._peer_signal

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
        """W20: the peer's CSM Max-Message-Size, else RFC 8323's base value."""
        value = (self._remote_settings or {}).get("max-message-size")
        return BASE_MAX_MESSAGE_SIZE if value is None else int(value)

    def start(self, request: EncodedRequest, on_event: EventHandler) -> Exchange:
        if self.closing:
            raise ConnectionClosed(f"connection closed ({self.close_reason or 'closing'})")
        return Exchange(self, request, on_event)

    def abort_with(self, reason: str) -> None:
        """Abort (7.05) with ``reason`` as diagnostic, then close (see :meth:`_abort_with`)."""
        if self._gone or self._shutting or self._our_reason is not None:
            return
        self._our_reason = reason
        diagnostic = reason.encode()[:MAX_DIAGNOSTIC].decode(errors="ignore").encode()
        self._abort_with(Message(code=ABORT, payload=diagnostic))

    def _abort_with(self, abort_msg: Any) -> None:
        """Send ``abort_msg`` and close (W16; aiocoap's ``abort`` ends here too).

        Over TCP we send FIN and discard what still arrives until the peer closes: closing with
        unread input would send RST, and the peer could lose the Abort. The transport is aborted
        when the peer does not close within ``close_timeout``."""
        if self._gone or self._shutting:
            return
        self._shutting = True
        self._cancel_timers()
        transport = self._transport
        if transport is None:
            return
        self._send_message(abort_msg)
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
        self._cancel_timers()
        self._release_admission()
        self._release_address()
        self._ctx._evict_from_pool(self)

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
        self._made = True
        if self._hub.stopping:
            transport.abort()  # type: ignore[attr-defined]
            return
        try:
            host, port = transport.get_extra_info("peername")[:2]
            if not self.tls and not self.admit(host, port):
                transport.abort()  # type: ignore[attr-defined]
                return
            super().connection_made(transport)  # addresses, then our CSM
            if self._remote_settings is None:
                self._remote_settings = {}  # W2: a device may send a request first
            self.remote = hostport(host, port)
            self.peer_certificate = peer_certificate(transport)
            self._last_rx = self._ev_loop.time()
            self._arm(self._last_rx + self._limits.opening_timeout)
            if self._limits.auth_timeout is not None and not self._authenticated:
                self._auth_timer = self._ev_loop.call_at(
                    self._accepted_at + self._limits.auth_timeout, self._on_auth_timeout
                )
            self.events = self._hub.link_made(self)
        except Exception:
            log.exception("cannot set up a connection")
            transport.abort()  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if self._draining or self._gone:
            return
        self._last_rx = self._ev_loop.time()
        self._rx_count += 1
        self._deframer.feed(data)
        completed = self._process()
        if not self.closing:
            self._watch_slow_message(completed)

    def _process(self) -> int:
        """Handle the complete messages buffered; returns how many there were."""
        completed = 0
        try:
            while not self.closing:
                frame = self._deframer.next()
                if frame is None:
                    break
                completed += 1
                self._on_frame(frame)
        except frames.FrameError as e:
            self.abort(str(e))
        except Exception:
            log.exception("%s: failed to process a message", self.remote)
            self.abort_with("internal error")
        return completed

    def _watch_slow_message(self, completed: int) -> None:
        """The slow-message deadline: a message begun must be complete within
        ``message_timeout`` of its first byte, however the peer trickles it (the keepalive only
        sees that bytes arrive)."""
        timeout = self._limits.message_timeout
        if timeout is None:
            return
        if not self._deframer.buffered:
            if self._message_timer is not None:
                self._message_timer.cancel()
                self._message_timer = None
            return
        if self._message_timer is None or completed:  # the incomplete message began now
            if self._message_timer is not None:
                self._message_timer.cancel()
            self._message_timer = self._ev_loop.call_later(timeout, self._on_message_timeout)

    def _on_message_timeout(self) -> None:
        self._message_timer = None
        if not self.closing:
            held = self._deframer.buffered
            log.info(
                "%s: no complete message within %ss (%d bytes of one held): aborting",
                self.remote,
                self._limits.message_timeout,
                held,
            )
            self.abort_with(
                f"message timeout: a message not complete within {self._limits.message_timeout}s"
            )

    def _on_frame(self, frame: frames.Frame) -> None:
        code = frame.code
        if code == 0:
            return  # W15: Empty, RFC 8323 section 3.3
        if 1 <= code < 32:
            self._on_request_frame(frame)
            return
        if 64 <= code < 192:
            message = incoming_message(frame, frame.options)
            message.remote = self
            self._ctx._dispatch_incoming(self, message)
            return
        if code >= 224:
            message = incoming_message(frame, frame.options)
            message.remote = self
            try:
                self._process_signaling(message)
            except rfc8323common.CloseConnection as e:
                self._ctx._dispatch_error(self, e.args[0])
                if self._transport is not None:
                    self._transport.close()
            return
        raise frames.FrameError(f"message format error: reserved code {format_code(code)}")

    def _on_request_frame(self, frame: frames.Frame) -> None:
        if self._bucket is not None:
            wait = self._bucket.take(self._ev_loop.time())
            if wait:
                self._refuse(frame, TOO_MANY_REQUESTS, b"too many requests", math.ceil(wait))
                return
        problem = frames.request_option_problem(frame.options)
        if problem is not None:
            code = BAD_OPTION if problem.code == "4.02" else PROXYING_NOT_SUPPORTED
            self._refuse(frame, code, problem.diagnostic.encode(), None)
            return
        message = incoming_message(frame, frames.usable_request_options(frame.options))
        message.remote = self
        self._ctx._dispatch_incoming(self, message)

    def _refuse(
        self, frame: frames.Frame, code: Any, diagnostic: bytes, max_age: int | None
    ) -> None:
        self.mark_opened()
        log.debug("%s: %s to a request: %s", self.remote, code, diagnostic.decode())
        response = Message(code=code, _token=frame.token, payload=diagnostic[:MAX_DIAGNOSTIC])
        if max_age is not None:
            response.opt.max_age = max_age
        self._send_message(response)

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._gone:
            return
        self._gone = True
        self._cancel_timers()
        self._release_admission()
        self._release_address()
        self._deframer = frames.Deframer(self._limits.max_message_size)  # drop what it held
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

    def _cancel_timers(self) -> None:
        for handle in (self._timer, self._auth_timer, self._message_timer):
            if handle is not None:
                handle.cancel()
        self._timer = self._auth_timer = self._message_timer = None
        if self._gone and self._hard_close is not None:
            self._hard_close.cancel()
            self._hard_close = None

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
        critical = [int(o.number) for o in message.opt.option_list() if int(o.number) & 1]
        if critical and code in (PING, PONG, RELEASE, ABORT):
            # aiocoap aborts, then carries on (and answers a Ping with the deprecated call, W9)
            self.abort(f"unknown critical option {critical[0]} in a signalling message")
            return
        if code == PING:
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

    def _send_initial_csm(self) -> None:
        """W19: Max-Message-Size only -- no Block-wise-Transfer, which we do not do."""
        csm = Message(code=CSM)
        csm.opt.add_option(UintOption(frames.CSM_MAX_MESSAGE_SIZE, self._my_max_message_size))
        self._send_message(csm)

    def abort(self, errormessage: str | None = None, bad_csm_option: int | None = None) -> None:
        if self._protocol_error is None and self._our_reason is None:
            self._protocol_error = f"protocol error: {errormessage}"
        if errormessage is not None:
            errormessage = errormessage[:MAX_DIAGNOSTIC]
        super().abort(errormessage, bad_csm_option)

    # -- opening timeout, sign-in deadline and keepalive (W8)

    def mark_opened(self) -> None:
        if not self._opened:
            self._opened = True
            self._arm(self._last_rx + self._limits.keepalive_interval)

    def _on_auth_timeout(self) -> None:
        self._auth_timer = None
        if not self._authenticated and not self.closing:
            self.abort_with(f"not signed in within {self._limits.auth_timeout}s")

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
    """One listening socket; aiocoap's ``TCPServer`` minus its ``create_server`` (W1).

    Plain TCP uses ``loop.create_server`` and admits each connection in ``connection_made``. TLS
    (W17) accepts on its own socket: a connection is admitted first and only then handed to
    ``loop.connect_accepted_socket`` for the handshake, so a refused one costs no handshake."""

    server: asyncio.Server | None

    def __init__(self, hub: Hub, ssl_context: ssl.SSLContext | None) -> None:
        super().__init__()
        self.hub: Final = hub
        self.ssl_context: Final = ssl_context
        self.tls: Final = ssl_context is not None
        self._scheme = "coaps+tcp" if self.tls else "coap+tcp"
        self._default_port = COAPS_PORT if self.tls else COAP_PORT
        self.log = hub.aiocoap_log
        self.loop: asyncio.AbstractEventLoop = hub.loop
        tokenmanager = TokenManager(hub.context)
        tokenmanager.token_interface = self
        self._tokenmanager = tokenmanager
        self.tokenmanager: Final = tokenmanager
        self._socket: socket.socket | None = None
        self._acceptor: asyncio.Task[None] | None = None

    async def listen(self, host: str, port: int) -> tuple[str, int]:
        if not self.tls:
            self.server = await self.loop.create_server(self._new_protocol, host, port)
            sockname = self.server.sockets[0].getsockname()
            return str(sockname[0]), int(sockname[1])
        infos = await self.loop.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
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
        self._acceptor = self.loop.create_task(
            self._accept_loop(sock), name=f"tls-accept:{hostport(*sockname[:2])}"
        )
        return str(sockname[0]), int(sockname[1])

    def _new_protocol(self) -> DeviceProtocol:
        protocol = DeviceProtocol(self)
        self._pool.add(protocol)
        return protocol

    async def _accept_loop(self, sock: socket.socket) -> None:
        while True:
            try:
                conn, address = await self.loop.sock_accept(sock)
            except OSError as e:  # EMFILE and the like: as asyncio's server does, wait a bit
                log.warning("accepting a TLS connection failed: %s", e)
                await asyncio.sleep(0.5)
                continue
            protocol = DeviceProtocol(self)
            if not protocol.admit(str(address[0]), int(address[1])):
                conn.close()
                continue
            self._pool.add(protocol)
            self.hub.spawn(self._handshake(conn, protocol), f"tls-handshake:{protocol.remote}")

    async def _handshake(self, conn: socket.socket, protocol: DeviceProtocol) -> None:
        limits = self.hub.limits
        timeout = limits.opening_timeout
        if limits.auth_timeout is not None:
            timeout = min(timeout, limits.auth_timeout)
        try:
            await self.loop.connect_accepted_socket(
                lambda: protocol, conn, ssl=self.ssl_context, ssl_handshake_timeout=timeout
            )
        except asyncio.CancelledError:
            protocol.handshake_failed()
            raise
        except Exception as e:  # the transport closed the socket
            protocol.handshake_failed()
            log.info("%s: TLS handshake failed: %s", protocol.remote, str(e) or type(e).__name__)

    def _dispatch_incoming(self, connection: DeviceProtocol, message: Any) -> None:
        connection.mark_opened()
        super()._dispatch_incoming(connection, message)

    def stop_listening(self) -> None:
        if self.server is not None:
            self.server.close()
        if self._acceptor is not None:
            self._acceptor.cancel()
            self._acceptor = None
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    async def shutdown(self) -> None:  # called by the token manager's shutdown
        self._tokenmanager = None
        self.stop_listening()
        if self.server is None:
            return
        self.server.close()
        try:
            async with asyncio.timeout(self.hub.limits.close_timeout):
                await self.server.wait_closed()
        except TimeoutError:
            log.warning("listening socket did not close within %ss", self.hub.limits.close_timeout)


class _Context(Context):  # type: ignore[misc]  # aiocoap is untyped
    """aiocoap's context, rendering without an eagerly created coroutine (W18)."""

    def render_to_pipe(self, pipe: Any) -> None:
        responder = error_to_message(pipe, self.log)

        async def render() -> None:
            try:
                await self._render_to_pipe(responder)
            except Exception as e:
                responder.add_exception(e)

        task = asyncio.get_running_loop().create_task(render(), name="coap-render")
        responder.on_interest_end(task.cancel)


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
    """The aiocoap context and listening endpoints of one server, and what they share: the
    connections per remote address, the count of unauthenticated connections and the TLS
    handshakes in progress."""

    def __init__(self, limits: Limits, link_made: Callable[[DeviceLink], LinkEvents]) -> None:
        self.loop: Final = asyncio.get_running_loop()
        self.limits: Final = limits
        self._link_made = link_made
        self.aiocoap_log: Final = logging.getLogger("gateway.adapters.coap.aiocoap")
        self.context: Final[Any] = _Context(
            loop=self.loop, serversite=_Site(self), loggername=self.aiocoap_log.name
        )
        self.render_tasks: set[asyncio.Task[Any]] = set()
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

    def link_made(self, link: DeviceProtocol) -> LinkEvents:
        return self._link_made(link)

    def admit(self, remote: str, address: str) -> bool:
        total = self.limits.max_connections
        if total is not None and self.connections >= total:
            self.refused_total += 1
            now = self.loop.time()
            if now >= self._next_total_refusal_log:  # one line a second under a flood
                log.warning(
                    "refused a connection from %s: %d connections (limit %d); %d refused so far",
                    remote,
                    self.connections,
                    total,
                    self.refused_total,
                )
                self._next_total_refusal_log = now + 1.0
            return False
        per_address = self.limits.max_connections_per_ip
        held = self.per_ip.get(address, 0)
        if per_address is not None and held >= per_address:
            self.refused_per_ip += 1
            now = self.loop.time()
            if now >= self._next_ip_refusal_log:  # one line a second under a flood
                log.warning(
                    "refused a connection from %s: %d connections from %s (limit %d per "
                    "address); %d refused so far",
                    remote,
                    held,
                    address,
                    per_address,
                    self.refused_per_ip,
                )
                self._next_ip_refusal_log = now + 1.0
            return False
        limit = self.limits.max_unauthenticated
        if limit is not None and self.unauthenticated >= limit:
            self.refused += 1
            now = self.loop.time()
            if now >= self._next_refusal_log:  # one line a second under a flood
                log.warning(
                    "refused a connection from %s: %d unauthenticated connections (limit %d); "
                    "%d refused so far",
                    remote,
                    self.unauthenticated,
                    limit,
                    self.refused,
                )
                self._next_refusal_log = now + 1.0
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
            await endpoint.tokenmanager.shutdown()
        tasks = [t for t in self.render_tasks if not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=self.limits.close_timeout)

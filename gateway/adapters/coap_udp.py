"""Simple devices over CoAP/UDP (RFC 7252): aiocoap's UDP server around :mod:`gateway.simple`.

aiocoap does the transport: confirmable and non-confirmable messages, deduplication of
retransmissions (a retransmitted CON gets the first answer again), block-wise transfers
(RFC 7959) both ways. One resource takes every path (:class:`_Endpoint`) and hands each
request to :class:`SimpleDeviceServer`, which drives the sans-IO core and does its effects:
token lookups (:class:`gateway.devtokens.TokenDirectory`), appends to the log (answered only
once the log acknowledged them), attribute reads (:class:`gateway.simpleattrs.AttributeReader`).

Block-wise uploads are assembled by aiocoap up to the payload limit only: a block that would
take the payload past it (or a Size1 above it) is not assembled but answered 4.13 with Size1.

aiocoap's UDP transport binds with ``SO_REUSEPORT``: a second process binding the same port
would silently share its datagrams. :meth:`SimpleDeviceServer.__aenter__` first binds the
address without that option, so a port in use fails the start; with port 0 that also picks the
port (aiocoap has no public way to tell the one it bound).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Final, Self

import aiocoap
from aiocoap import resource
from aiocoap.numbers.codes import Code
from aiocoap.numbers.contentformat import ContentFormat

from eventstore.errors import EventStoreError, UnavailableError
from eventstore.ports import EventStore
from gateway.devtokens import TokenDirectory
from gateway.simple import (
    Append,
    ReadAttributes,
    Reply,
    SimpleConfig,
    SimpleCore,
    SimpleRequest,
    attributes_reply,
)
from gateway.simpleattrs import AttributeReader
from gateway.simplepresence import Presence, PresenceConfig
from proto import binding
from proto.devtokens import token_id
from proto.events import AnyEvent, DeviceOffline

__all__ = ["PeerOf", "SimpleDeviceServer", "UdpConfig"]

log = logging.getLogger(__name__)

_METHODS: Final = {
    aiocoap.GET: "GET",
    aiocoap.POST: "POST",
    aiocoap.PUT: "PUT",
    aiocoap.DELETE: "DELETE",
    aiocoap.FETCH: "FETCH",
    aiocoap.PATCH: "PATCH",
    aiocoap.iPATCH: "IPATCH",
}


@dataclass(frozen=True, slots=True)
class UdpConfig:
    bind: tuple[str, int] = ("127.0.0.1", 5683)
    timeout: float = 5.0
    """Seconds a token lookup, an attribute read or an append may take before 5.03."""
    max_attribute_devices: int = 10_000
    inactivity_timeout: float = 300.0
    """Seconds without an accepted request after which a device is offline."""
    tick_interval: float = 1.0
    """How often devices are checked for inactivity (and failed offline events retried)."""


PeerOf = Callable[[tuple[str, int]], tuple[str, int] | None]
"""The device address a relay address stands for (a DTLS terminator relaying each session's
plaintext from a loopback socket of its own), None for a device speaking plain UDP."""


def _hostport(hostinfo: str) -> tuple[str, int] | None:
    host, sep, port = hostinfo.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return (host[1:-1] if host.startswith("[") else host, int(port))


def _hostinfo(addr: tuple[str, int]) -> str:
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _code(text: str) -> Code:
    cls, _, detail = text.partition(".")
    return Code(int(cls) << 5 | int(detail))


def _message(reply: Reply) -> aiocoap.Message:
    msg = aiocoap.Message(code=_code(reply.code), payload=reply.payload)
    if reply.content_format is not None:
        msg.opt.content_format = ContentFormat(reply.content_format)
    if reply.max_age is not None:
        msg.opt.max_age = reply.max_age
    if reply.size1 is not None:
        msg.opt.size1 = reply.size1
    return msg


def _probe_bind(host: str, port: int) -> int:
    """Bind ``(host, port)`` without SO_REUSEPORT (fails if the port is in use) and return
    the port bound; the socket is closed at once."""
    addr = ipaddress.ip_address(host)
    if isinstance(addr, ipaddress.IPv4Address):
        family, target = socket.AF_INET, (host, port)
    else:
        family, target = socket.AF_INET6, (host, port)
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.bind(target)
        bound: int = s.getsockname()[1]
        return bound


class _Endpoint(resource.Resource, resource.PathCapable):  # type: ignore[misc]
    """Every path, every method: to the server (which never raises)."""

    def __init__(self, server: SimpleDeviceServer) -> None:
        super().__init__()
        self.server = server

    async def needs_blockwise_assembly(self, request: aiocoap.Message) -> bool:
        return self.server.declared_size(request) is None

    async def render(self, request: aiocoap.Message) -> aiocoap.Message:
        return _message(await self.server.handle(request))


class SimpleDeviceServer:
    """The UDP endpoint of simple devices (an async context manager)::

        async with SimpleDeviceServer(store, tokens, SimpleConfig(gateway_id="gw-1"),
                                      UdpConfig(bind=("0.0.0.0", 5683))) as server:
            ...  # server.address: (host, port) bound

    ``store`` is the event log (appends and attribute reads); ``tokens`` the token registry
    (wrap it in :class:`gateway.devtokens.CachedTokenDirectory`). ``clock`` gives the time
    (seconds since the epoch) for the rate limit and the events' time.
    """

    def __init__(
        self,
        store: EventStore,
        tokens: TokenDirectory,
        config: SimpleConfig,
        udp: UdpConfig | None = None,
        *,
        clock: Callable[[], float] = time.time,
        instance: str | None = None,
        peer_of: PeerOf | None = None,
    ) -> None:
        self.store = store
        self.tokens = tokens
        self.config = config
        self.udp = udp or UdpConfig()
        self.clock = clock
        self.peer_of = peer_of
        self.core = SimpleCore(config)
        self.attributes = AttributeReader(store, max_devices=self.udp.max_attribute_devices)
        self.presence = Presence(
            PresenceConfig(config.gateway_id, self.udp.inactivity_timeout, instance)
        )
        self._offline_backlog: list[AnyEvent] = []
        self._ticker: asyncio.Task[None] | None = None
        self.replies: Counter[str] = Counter()  # code -> replies given
        self.appended = 0  # events written
        self._context: aiocoap.Context | None = None
        self._address: tuple[str, int] | None = None

    @property
    def address(self) -> tuple[str, int]:
        if self._address is None:
            raise RuntimeError("the server is not started")
        return self._address

    async def __aenter__(self) -> Self:
        host, port = self.udp.bind
        port = _probe_bind(host, port)
        self._context = await aiocoap.Context.create_server_context(
            _Endpoint(self), bind=(host, port), transports=["udp6"]
        )
        self._address = (host, port)
        self._ticker = asyncio.create_task(self._tick_loop(), name="simple-devices-ticker")
        log.info("simple devices: coap://%s:%d (udp)", host, port)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop serving, then write the offline events of the devices held online."""
        ticker, self._ticker = self._ticker, None
        if ticker is not None:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
        ctx, self._context = self._context, None
        if ctx is not None:
            await ctx.shutdown()
            self._offline_backlog += self.presence.release("gateway shutting down", self.clock())
            await self._write_offline()

    def adopt_instance(self, instance: str) -> None:
        """Serve as ``instance`` from now on (the lease of the current one was lost): devices
        come online again, on connections of the new instance, with their next request."""
        self.presence.adopt_instance(instance)

    async def tick(self) -> None:
        """Devices silent for the inactivity timeout go offline (run by a task every
        ``tick_interval``; public for tests that drive the clock)."""
        self._offline_backlog += self.presence.expire(self.clock())
        await self._write_offline()

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(self.udp.tick_interval)
            try:
                await self.tick()
            except Exception:
                log.exception("simple devices: inactivity check failed")

    async def _write_offline(self) -> None:
        backlog, self._offline_backlog = self._offline_backlog, []
        for i, ev in enumerate(backlog):
            try:
                async with asyncio.timeout(self.udp.timeout):
                    await self.store.append([binding.to_nats(ev)])
            except (EventStoreError, TimeoutError) as e:
                # kept (same event id: a retry that reaches the log twice is deduplicated)
                log.warning("simple devices: offline of %s not written yet: %s", ev.device_id, e)
                self._offline_backlog = backlog[i:] + self._offline_backlog
                return
            log.info("simple devices: %s offline (%s)", ev.device_id, _reason(ev))

    # -- requests ----------------------------------------------------------------------------

    def declared_size(self, request: aiocoap.Message) -> int | None:
        """The payload size a request announces when it is over the limit (not assembled)."""
        limit = self.config.max_payload
        size1 = request.opt.size1
        if size1 is not None and size1 > limit:
            return int(size1)
        block1 = request.opt.block1
        # One block as it came (an assembled request carries the last block's option and the
        # whole payload, longer than a block): the upload reaches past the limit.
        n = len(request.payload)
        if block1 is not None and n <= block1.size and block1.start + n > limit:
            return int(block1.start + n)
        return None

    def _request(self, request: aiocoap.Message) -> SimpleRequest:
        fmt = request.opt.content_format
        accept = request.opt.accept
        try:
            remote = str(request.remote.hostinfo)
        except Exception:  # an address aiocoap cannot render: only for the logs
            remote = "?"
        secure = False
        if self.peer_of is not None:
            relayed = _hostport(remote)
            peer = None if relayed is None else self.peer_of(relayed)
            if peer is not None:
                remote, secure = _hostinfo(peer), True
        return SimpleRequest(
            method=_METHODS.get(request.code, str(request.code)),
            path=tuple(request.opt.uri_path),
            query=tuple(request.opt.uri_query),
            content_format=None if fmt is None else int(fmt),
            accept=None if accept is None else int(accept),
            payload=bytes(request.payload),
            remote=remote,
            declared_size=self.declared_size(request),
            secure=secure,
        )

    async def handle(self, request: aiocoap.Message) -> Reply:
        """An aiocoap request (block-wise transfers assembled) to its reply."""
        return await self.serve(self._request(request))

    async def serve(self, req: SimpleRequest) -> Reply:
        """One request to its reply, whatever carried it (this UDP endpoint, or another
        transport, e.g. DTLS, sharing the core, the rate buckets and the presence); never
        raises."""
        try:
            reply = await self._handle(req)
        except Exception:
            log.exception("simple devices: request failed")
            reply = Reply("5.00")
        self.replies[reply.code] += 1
        return reply

    async def _handle(self, req: SimpleRequest) -> Reply:
        route = self.core.route(req)
        if isinstance(route, Reply):
            return route
        timeout = self.udp.timeout
        try:
            async with asyncio.timeout(timeout):
                record = await self.tokens.lookup(route.token)
        except (UnavailableError, TimeoutError) as e:
            log.warning("simple devices: token registry unavailable: %s", e)
            return self.core.unavailable()
        now = self.clock()
        refused = self.core.authorize(route, record, now)
        if refused is not None:
            if refused.code == "4.01":
                log.info(
                    "simple devices: %s from %s: token %s %s",
                    req.method,
                    req.remote,
                    token_id(route.token),
                    "revoked" if record is not None else "unknown",
                )
            return refused
        assert record is not None
        outcome = self.core.decide(route, record, req, datetime.fromtimestamp(now, UTC))
        if isinstance(outcome, Reply):
            return outcome
        online = self.presence.arrive(
            record.owner, record.device_id, req.remote, now, secure=req.secure
        )
        if isinstance(outcome, ReadAttributes):
            if online is not None:
                reply = await self._append(Append((online,)))
                self.presence.confirm(online, reply.code == "2.01")
            return await self._read_attributes(outcome)
        if online is None:
            return await self._append(outcome)
        reply = await self._append(Append((online, *outcome.events)))
        self.presence.confirm(online, reply.code == "2.01")
        return reply

    async def _read_attributes(self, read: ReadAttributes) -> Reply:
        try:
            async with asyncio.timeout(self.udp.timeout):
                view = await self.attributes.view(read.owner, read.device_id)
        except (EventStoreError, TimeoutError) as e:
            log.warning("simple devices: attributes of %s unreadable: %s", read.device_id, e)
            return self.core.unavailable()
        return attributes_reply(view, read)

    async def _append(self, append: Append) -> Reply:
        if not append.events:
            return self.core.appended(True)
        messages = [binding.to_nats(ev) for ev in append.events]
        first = append.events[0]
        try:
            async with asyncio.timeout(self.udp.timeout):
                await self.store.append(messages)
        except (UnavailableError, TimeoutError) as e:
            log.warning("simple devices: append for %s failed: %s", first.device_id, e)
            return self.core.appended(False)
        except EventStoreError as e:
            log.error("simple devices: append for %s refused: %s", first.device_id, e)
            return Reply("5.00")
        self.appended += len(messages)
        log.debug("simple devices: %d %s of %s", len(messages), first.kind, first.device_id)
        return self.core.appended(True)


def _reason(ev: AnyEvent) -> str:
    return ev.data.reason if isinstance(ev.data, DeviceOffline) else ""

"""Simple devices over CoAP/UDP (RFC 7252): aiocoap's UDP server around :mod:`gateway.simple`.

aiocoap does the transport: confirmable and non-confirmable messages, deduplication of
retransmissions (a retransmitted CON gets the first answer again), block-wise transfers
(RFC 7959) both ways. One resource takes every path (:class:`_Endpoint`) and hands each
request to :class:`SimpleDeviceServer`, which drives the sans-IO core and does its effects:
token lookups (:class:`gateway.devtokens.TokenDirectory`), appends to the log (answered only
once the log acknowledged them), attribute reads (:class:`gateway.simpleattrs.AttributeReader`).

Server-side RPC (:mod:`gateway.simplerpc`): the resource is observable. An Observe
registration of ``/api/v1/{token}/rpc`` is decided like a request (token, rate, presence) in
:meth:`SimpleDeviceServer.add_observation`; once accepted, the registration is answered 2.03
and each RPC is a notification (2.05, JSON) rendered from the observation's outbox, one per
trigger (aiocoap's trigger is lossy: a render that leaves more in the outbox triggers again).
While a device observes, a task follows its commands in the log (woken by a notifier on their
subjects, as the OCF path is) and notifies each open ``rpc`` once its ``command-sent`` is
written; the device stays online (:meth:`gateway.simplepresence.Presence.hold`) until aiocoap
ends the observation (a deregistration, an RST or an unacknowledged notification).

Client-side RPC (``POST /api/v1/{token}/rpc``, :mod:`gateway.simpleclientrpc`): the render
waits for an application's answer (:class:`gateway.adapters.simple_clientrpc.ClientRpc`, up to
``client_rpc_timeout``, then 5.04) while aiocoap acknowledges the request with an empty ACK.

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
import functools
import ipaddress
import logging
import socket
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Final, Self

import aiocoap
from aiocoap import resource
from aiocoap.numbers.codes import Code
from aiocoap.numbers.contentformat import ContentFormat

from eventstore.errors import EventStoreError, UnavailableError
from eventstore.ports import EventStore
from gateway.adapters.simple_clientrpc import ClientRpc
from gateway.devicestate import CommandLog
from gateway.devtokens import TokenDirectory
from gateway.simple import (
    JSON,
    PROVISION_PATH,
    AnswerRpc,
    Append,
    ReadAttributes,
    Reply,
    SimpleConfig,
    SimpleCore,
    SimpleRequest,
    WatchAttributes,
    WatchRpc,
    attributes_reply,
    shared_reply,
    shared_update,
)
from gateway.simpleattrs import AttributeReader
from gateway.simpleclientrpc import CallServer
from gateway.simplepresence import Presence, PresenceConfig
from gateway.simpleprovision import ProvisionConfig, ProvisionCore, Provisioner
from gateway.simplerpc import RpcChannel
from proto import binding, subjects
from proto.devtokens import token_id
from proto.events import (
    AnyEvent,
    CommandCanceled,
    CommandExpired,
    CommandPending,
    DesiredCleared,
    DesiredSet,
    DeviceOffline,
)

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
    client_rpc_timeout: float = 30.0
    """Seconds a device's client-side RPC (``POST .../rpc``) waits for its answer; then 5.04."""
    client_rpc_max_waits: int = 1000
    """Client-side RPCs that may wait for an answer at once; more: 5.03."""


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


# Linux socket options (socket.IP_RECVERR exists on Python 3.11 only on some builds)
_IP_RECVERR: Final = getattr(socket, "IP_RECVERR", 11)
_IPV6_RECVERR: Final = getattr(socket, "IPV6_RECVERR", 25)


def _no_icmp_errors(context: aiocoap.Context) -> None:
    """Turn off ICMP error reporting (IP_RECVERR / IPV6_RECVERR) on aiocoap's UDP sockets.

    aiocoap's udp6 transport turns it on and reads errors from MSG_ERRQUEUE in its reader
    (``loop.add_reader``). Under uvloop that reader is a libuv poll handle, which libuv
    *stops for good* on POLLERR: the first ICMP port-unreachable (a device that sent a request
    and went away before its answer, a DTLS relay socket closed before a late answer, or a
    spoofed source) made the whole endpoint deaf, every later request unanswered. Without
    RECVERR an unconnected UDP socket gets no ICMP errors at all, as with any plain UDP server;
    aiocoap then retransmits a CON to a vanished peer until its exchange times out instead of
    stopping at the ICMP error. Reaching the socket walks aiocoap 0.4's context → token manager
    → message manager → message interface → transport (public attributes, not documented API;
    pyproject.toml allows 0.4.17 up to 0.5): tests/integration/gateway/test_simple_udp.py fails
    if an upgrade makes that walk find no socket or the endpoint go deaf."""
    found = 0
    for interface in context.request_interfaces:
        messages = getattr(interface, "token_interface", None)
        transport = getattr(getattr(messages, "message_interface", None), "transport", None)
        sock = None if transport is None else transport.get_extra_info("socket")
        if not isinstance(sock, socket.socket):
            continue
        if sock.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, _IPV6_RECVERR, 0)
        sock.setsockopt(socket.IPPROTO_IP, _IP_RECVERR, 0)
        found += 1
    if not found:
        raise RuntimeError("aiocoap's UDP socket not found: ICMP errors would stop the endpoint")


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


_RECHECKS: Final = (0.005, 0.02, 0.1, 0.5, 2.0)
"""Delays of the re-reads of a device's commands after a wake-up that found nothing new (a
wake-up may come before the log lets a read see the message: eventstore.ports.Notifier)."""
_RPC_KINDS: Final = (CommandPending.KIND, CommandCanceled.KIND, CommandExpired.KIND)
_SHARED_KINDS: Final = (DesiredSet.KIND, DesiredCleared.KIND)


@dataclass(eq=False)
class _Observation:
    """One accepted observation of ``/api/v1/{token}/rpc`` or ``.../attributes`` (aiocoap's
    ServerObservation)."""

    owner: str
    device_id: str
    serverobservation: Any
    registration: Reply  # the answer to the registration
    attributes: WatchAttributes | None = None  # None: of rpc
    outbox: deque[Reply] = field(default_factory=deque)  # notifications not rendered yet
    registered: bool = False  # the registration's response went out
    follower: asyncio.Task[None] | None = None  # of an observation of attributes


@dataclass(frozen=True, slots=True)
class _SharedWatch:
    """An accepted observation of ``attributes``, with the shared attributes its registration's
    answer carried (what the first notification is the difference from)."""

    watch: WatchAttributes
    shared: Mapping[str, Any]


_Watch = WatchRpc | _SharedWatch


@dataclass(eq=False)
class _RpcDevice:
    """A device's RPCs in this gateway: kept after its observations end, so that an answer
    that comes later finds the RPC by its id."""

    channel: RpcChannel
    commands: CommandLog
    observations: set[_Observation] = field(default_factory=set)
    follower: asyncio.Task[None] | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class _Endpoint(resource.ObservableResource, resource.PathCapable):  # type: ignore[misc]
    """Every path, every method: to the server (which never raises). Observations of a
    device's ``rpc`` are accepted (:meth:`SimpleDeviceServer.add_observation`); the
    notifications are rendered like any response (:meth:`SimpleDeviceServer.handle`)."""

    def __init__(self, server: SimpleDeviceServer) -> None:
        super().__init__()
        self.server = server

    async def add_observation(self, request: aiocoap.Message, serverobservation: Any) -> None:
        await self.server.add_observation(request, serverobservation)

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
    (seconds since the epoch) for the rate limit and the events' time. ``provisioner``: where
    ``POST /api/v1/provision`` is relayed (:mod:`gateway.simpleprovision`; None: 4.04).
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
        provisioner: Provisioner | None = None,
        provisioning: ProvisionConfig | None = None,
    ) -> None:
        self.store = store
        # POST /api/v1/provision relayed to the twin service (None: 4.04, as any unknown path)
        self.provisioner = provisioner
        self.provisioning = ProvisionCore(config.gateway_id, provisioning)
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
        self.client_rpc = ClientRpc(
            store,
            self._append,
            source=config.source,
            timeout=self.udp.client_rpc_timeout,
            max_waits=self.udp.client_rpc_max_waits,
            read_timeout=self.udp.timeout,
            clock=clock,
        )
        self._offline_backlog: list[AnyEvent] = []
        self._ticker: asyncio.Task[None] | None = None
        self.replies: Counter[str] = Counter()  # code -> replies given
        self.appended = 0  # events written
        self._context: aiocoap.Context | None = None
        self._address: tuple[str, int] | None = None
        self._rpc: dict[tuple[str, str], _RpcDevice] = {}
        self._observations: dict[int, _Observation] = {}  # id(request) -> observation
        self._first: dict[int, Reply] = {}  # id(request) -> answer decided with its observe
        self._tasks: set[asyncio.Task[None]] = set()

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
        _no_icmp_errors(self._context)
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
        tasks = [d.follower for d in self._rpc.values() if d.follower is not None]
        tasks += [o.follower for o in self._observations.values() if o.follower is not None]
        tasks += self._tasks
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
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
            observe=request.opt.observe == 0,
        )

    async def handle(self, request: aiocoap.Message) -> Reply:
        """An aiocoap request (block-wise transfers assembled) to its reply; for an accepted
        observation of ``rpc``, the registration's answer, then each notification."""
        key = id(request)
        first = self._first.pop(key, None)
        if first is not None:
            return first
        obs = self._observations.get(key)
        if obs is not None:
            return self._notification(obs)
        return await self.serve(self._request(request))

    async def serve(self, req: SimpleRequest) -> Reply:
        """One request to its reply, whatever carried it (this UDP endpoint, or another
        transport, e.g. DTLS, sharing the core, the rate buckets and the presence); never
        raises."""
        reply, _ = await self._serve(req)
        return reply

    async def _serve(self, req: SimpleRequest) -> tuple[Reply, _Watch | None]:
        try:
            reply, watch = await self._handle(req)
        except Exception:
            log.exception("simple devices: request failed")
            reply, watch = Reply("5.00"), None
        self.replies[reply.code] += 1
        return reply, watch

    # -- server-side RPC by observe -----------------------------------------------------------

    async def add_observation(self, request: aiocoap.Message, serverobservation: Any) -> None:
        """An Observe registration: decided as a request (token, rate, presence); a device's
        ``rpc`` or ``attributes`` that passed is observed until aiocoap ends the observation.
        The answer decided here is the registration's response (:meth:`handle` gives it)."""
        reply, watch = await self._serve(self._request(request))
        key = id(request)
        if watch is None or not reply.code.startswith("2."):
            # Not observed: answered once. Accepted all the same, then ended before the answer
            # goes out: aiocoap 0.4.17 calls the cancellation callback of every registration
            # when it ends, and one never accepted has none (AttributeError in its task).
            self._first[key] = reply
            serverobservation.accept(_ignore)
            serverobservation.deregister()  # early: the answer is the last, without Observe
            return
        owner, device_id = (
            (watch.owner, watch.device_id)
            if isinstance(watch, WatchRpc)
            else (watch.watch.owner, watch.watch.device_id)
        )
        obs = _Observation(
            owner,
            device_id,
            serverobservation,
            reply,
            None if isinstance(watch, WatchRpc) else watch.watch,
        )
        self._observations[key] = obs
        serverobservation.accept(lambda: self._unwatch(key))
        if not self.presence.hold(owner, device_id):
            # the device went offline between its online event and now
            log.debug("simple devices: %s observes while not held online", device_id)
        if isinstance(watch, _SharedWatch):
            log.info("simple devices: %s observes its shared attributes", device_id)
            obs.follower = asyncio.create_task(
                self._follow_shared(obs, watch), name=f"simple-attributes:{device_id}"
            )
            return
        dev = self._rpc_device(owner, device_id)
        dev.observations.add(obs)
        dev.channel.observe()
        log.info("simple devices: %s observes its rpc (%d open)", device_id, len(dev.channel.open))
        if dev.follower is None or dev.follower.done():
            dev.follower = asyncio.create_task(self._follow(dev), name=f"simple-rpc:{device_id}")
        else:
            self._spawn(self._deliver(dev), f"simple-rpc-deliver:{device_id}")

    def observing(self, owner: str, device_id: str) -> int:
        """How many observations of the device's ``rpc`` are under way here."""
        dev = self._rpc.get((owner, device_id))
        return 0 if dev is None else len(dev.observations)

    def observing_attributes(self, owner: str, device_id: str) -> int:
        """How many observations of the device's ``attributes`` are under way here."""
        return sum(
            1
            for o in self._observations.values()
            if o.attributes is not None and (o.owner, o.device_id) == (owner, device_id)
        )

    def _rpc_device(self, owner: str, device_id: str) -> _RpcDevice:
        dev = self._rpc.get((owner, device_id))
        if dev is None:
            dev = _RpcDevice(
                RpcChannel(owner, device_id, self.config.gateway_id),
                CommandLog(owner, device_id),
            )
            self._rpc[(owner, device_id)] = dev
        return dev

    def _spawn(self, coro: Any, name: str) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _unwatch(self, key: int) -> None:
        obs = self._observations.pop(key, None)
        if obs is None:
            return
        self.presence.unhold(obs.owner, obs.device_id, self.clock())
        if obs.attributes is not None:
            log.info("simple devices: %s stopped observing its shared attributes", obs.device_id)
            if obs.follower is not None:
                obs.follower.cancel()
                obs.follower = None
            return
        dev = self._rpc.get((obs.owner, obs.device_id))
        log.info("simple devices: %s stopped observing its rpc", obs.device_id)
        if dev is None:
            return
        dev.observations.discard(obs)
        dev.channel.unobserve()
        if not dev.observations and dev.follower is not None:
            dev.follower.cancel()
            dev.follower = None
        self._forget_idle(dev)

    def _forget_idle(self, dev: _RpcDevice) -> None:
        """A device neither observed nor awaited is forgotten (its next observation reads its
        commands from the log again), so memory holds the devices that use RPC now only."""
        if not dev.observations and not dev.channel.awaiting_answer:
            key = (dev.channel.owner, dev.channel.device_id)
            if self._rpc.get(key) is dev:
                del self._rpc[key]

    def _notification(self, obs: _Observation) -> Reply:
        if not obs.registered:
            obs.registered = True
            reply = obs.registration
        elif obs.outbox:
            reply = obs.outbox.popleft()
        else:  # a notification asked for with nothing to tell (not expected)
            reply = obs.registration
        if obs.outbox:
            obs.serverobservation.trigger()  # aiocoap's trigger is lossy: one at a time
        return reply

    async def _follow(self, dev: _RpcDevice) -> None:
        """While the device observes: its commands as the log has them (woken by their
        subjects), delivered as they open."""
        channel = dev.channel
        filters = [
            subjects.event_filter(owner=channel.owner, device=channel.device_id, kind=k)
            for k in _RPC_KINDS
        ]
        notifier = None
        try:
            while notifier is None:  # subscribe first, then read: nothing falls in between
                try:
                    notifier = await self.store.notifier(filters)
                except Exception as e:
                    log.warning("simple devices: cannot watch %s's rpc: %s", channel.device_id, e)
                    await asyncio.sleep(self.udp.tick_interval)
            woken = False
            rechecks = list(_RECHECKS)
            while True:
                read_up_to = dev.commands.cursor(_RPC_KINDS)
                try:
                    async with asyncio.timeout(self.udp.timeout):
                        opened, closed = await dev.commands.refresh(self.store)
                except Exception as e:
                    log.warning("simple devices: cannot read %s's rpc: %s", channel.device_id, e)
                    await notifier.wait(self.udp.tick_interval)
                    continue
                channel.closed(closed)
                channel.opened(opened)
                await self._deliver(dev)
                if woken and dev.commands.cursor(_RPC_KINDS) == read_up_to and rechecks:
                    await notifier.wait(rechecks.pop(0))
                    continue
                rechecks = list(_RECHECKS)
                # the timeout also retries deliveries whose command-sent was not written
                woken = await notifier.wait(self.udp.timeout)
        finally:
            if notifier is not None:
                await notifier.close()

    async def _deliver(self, dev: _RpcDevice) -> None:
        """Notify the due RPCs, each once its ``command-sent`` is in the log."""
        channel = dev.channel
        async with dev.lock:
            failed = channel.exhausted(self.clock())
            if failed:
                try:
                    async with asyncio.timeout(self.udp.timeout):
                        await self.store.append([binding.to_nats(e) for e in failed])
                except (EventStoreError, TimeoutError) as e:
                    log.warning(
                        "simple devices: rpc failures of %s not written: %s", channel.device_id, e
                    )
                else:
                    self.appended += len(failed)
                    channel.closed([e.correlation_id for e in failed if e.correlation_id])
                    log.info(
                        "simple devices: %d rpc(s) to %s failed unanswered",
                        len(failed),
                        channel.device_id,
                    )
            while dev.observations:
                connection = self.presence.connection_of(channel.owner, channel.device_id) or ""
                delivery = channel.next_delivery(self.clock(), connection)
                if delivery is None:
                    return
                try:
                    async with asyncio.timeout(self.udp.timeout):
                        await self.store.append([binding.to_nats(delivery.sent)])
                except (EventStoreError, TimeoutError) as e:
                    log.warning(
                        "simple devices: rpc %s to %s not sent yet: %s",
                        delivery.correlation_id,
                        channel.device_id,
                        e,
                    )
                    channel.delivery_failed(delivery)
                    return
                self.appended += 1
                log.info(
                    "simple devices: rpc %d (%s) to %s, attempt %d",
                    delivery.rpc_id,
                    delivery.correlation_id,
                    channel.device_id,
                    delivery.attempt,
                )
                for obs in dev.observations:
                    obs.outbox.append(Reply("2.05", delivery.payload, JSON))
                    obs.serverobservation.trigger()

    async def _answer(self, answer: AnswerRpc, online: AnyEvent | None, now: float) -> Reply:
        dev = self._rpc.get((answer.owner, answer.device_id))
        event = None if dev is None else dev.channel.answer(answer.rpc_id, answer.result, now)
        if event is None:
            if online is not None:
                written = await self._append(Append((online,)))
                self.presence.confirm(online, written.code == "2.01")
            log.info("simple devices: %s answered unknown rpc %d", answer.device_id, answer.rpc_id)
            return Reply("4.04")
        events = (event,) if online is None else (online, event)
        reply = await self._append(Append(events))
        if online is not None:
            self.presence.confirm(online, reply.code == "2.01")
        if reply.code == "2.01" and dev is not None and event.correlation_id is not None:
            dev.channel.closed([event.correlation_id])
            log.info("simple devices: %s answered rpc %d", answer.device_id, answer.rpc_id)
            self._forget_idle(dev)
        return reply

    async def _handle(self, req: SimpleRequest) -> tuple[Reply, _Watch | None]:
        if self.provisioner is not None and req.path == PROVISION_PATH:
            return await self._provision(self.provisioner, req), None
        route = self.core.route(req)
        if isinstance(route, Reply):
            return route, None
        timeout = self.udp.timeout
        try:
            async with asyncio.timeout(timeout):
                record = await self.tokens.lookup(route.token)
        except (UnavailableError, TimeoutError) as e:
            log.warning("simple devices: token registry unavailable: %s", e)
            return self.core.unavailable(), None
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
            return refused, None
        assert record is not None
        outcome = self.core.decide(route, record, req, datetime.fromtimestamp(now, UTC))
        if isinstance(outcome, Reply):
            return outcome, None
        online = self.presence.arrive(
            record.owner, record.device_id, req.remote, now, secure=req.secure
        )
        if isinstance(outcome, AnswerRpc):
            return await self._answer(outcome, online, now), None
        if isinstance(outcome, CallServer):
            confirm = None if online is None else functools.partial(self.presence.confirm, online)
            before = () if online is None else (online,)
            return await self.client_rpc.call(outcome, before, confirm), None
        if isinstance(outcome, ReadAttributes | WatchRpc | WatchAttributes):
            if online is not None:
                reply = await self._append(Append((online,)))
                self.presence.confirm(online, reply.code == "2.01")
                if reply.code != "2.01" and not isinstance(outcome, ReadAttributes):
                    return reply, None  # not online: nothing to observe
            if isinstance(outcome, WatchRpc):
                return self.core.rpc_watched(), outcome
            if isinstance(outcome, WatchAttributes):
                return await self._watch_shared(outcome)
            return await self._read_attributes(outcome), None
        if online is None:
            return await self._append(outcome), None
        reply = await self._append(Append((online, *outcome.events)))
        self.presence.confirm(online, reply.code == "2.01")
        return reply, None

    async def _watch_shared(self, watch: WatchAttributes) -> tuple[Reply, _Watch | None]:
        try:
            async with asyncio.timeout(self.udp.timeout):
                view = await self.attributes.view(watch.owner, watch.device_id)
        except (EventStoreError, TimeoutError) as e:
            log.warning("simple devices: attributes of %s unreadable: %s", watch.device_id, e)
            return self.core.unavailable(), None
        return shared_reply(view, watch), _SharedWatch(watch, dict(view.shared))

    async def _follow_shared(self, obs: _Observation, watch: _SharedWatch) -> None:
        """While the device observes its attributes: each change of its shared attributes (the
        ones asked for) in the log, notified as ThingsBoard's attribute update. Subscribed
        first, then read: a change between the registration's read and the subscription is
        notified all the same (the difference from what the registration carried)."""
        owner, device_id = watch.watch.owner, watch.watch.device_id
        filters = [
            subjects.event_filter(owner=owner, device=device_id, kind=k) for k in _SHARED_KINDS
        ]
        notifier = None
        told = watch.shared  # what the device was last told
        try:
            while notifier is None:
                try:
                    notifier = await self.store.notifier(filters)
                except Exception as e:
                    log.warning("simple devices: cannot watch %s's attributes: %s", device_id, e)
                    await asyncio.sleep(self.udp.tick_interval)
            woken = False
            rechecks = list(_RECHECKS)
            while True:
                try:
                    async with asyncio.timeout(self.udp.timeout):
                        view = await self.attributes.view(owner, device_id)
                except (EventStoreError, TimeoutError) as e:
                    log.warning("simple devices: attributes of %s unreadable: %s", device_id, e)
                    await notifier.wait(self.udp.tick_interval)
                    continue
                update = shared_update(told, view.shared, watch.watch)
                if update is not None:
                    told = dict(view.shared)
                    obs.outbox.append(update)
                    obs.serverobservation.trigger()
                    log.info("simple devices: shared attributes of %s notified", device_id)
                elif woken and rechecks:
                    await notifier.wait(rechecks.pop(0))
                    continue
                rechecks = list(_RECHECKS)
                woken = await notifier.wait(self.udp.timeout)
        finally:
            if notifier is not None:
                await notifier.close()

    async def _provision(self, provisioner: Provisioner, req: SimpleRequest) -> Reply:
        """Self-provisioning (:mod:`gateway.simpleprovision`): parsed and rate-limited here,
        decided by the twin service."""
        relayed = self.provisioning.accept(req, self.clock())
        if isinstance(relayed, Reply):
            return relayed
        return self.provisioning.reply(req, await provisioner.provision(relayed))

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


def _ignore() -> None:
    pass


def _reason(ev: AnyEvent) -> str:
    return ev.data.reason if isinstance(ev.data, DeviceOffline) else ""

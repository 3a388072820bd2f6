"""The gateway's composition root and driver.

:class:`Gateway` runs the CoAP listeners (through :mod:`gateway.adapters.coap`)
and, for every device connection, one :class:`gateway.session.Session`. It feeds
the session what happens (requests, device answers, notifications, append
results, ticks, the connection's end) and carries out the effects the session
returns. Session feeding is synchronous and happens on the event loop only, so a
session never sees two inputs at once and needs no lock.

Device authentication: a TLS connection's client certificate is checked against the
listener's :class:`gateway.identity.TlsAuthPolicy` as soon as the handshake is done
(:meth:`Gateway._on_connect`); a connection that does not meet it is refused before any of its
requests is read, and never gets a session. An accepted certificate's device ID (``ocf-identity``)
and expiry go into the session's configuration; authorization (tokens, owners, device IDs) is
the session's.

Routing: :attr:`Gateway.devices` maps a signed-in device to its current
connection. A second sign-in of the same device closes the older connection; the
older session's offline event names its own connection, so the twin ignores it
when the newer connection is already current (no flapping).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import itertools
import logging
import ssl
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Final, Self

from auth.tokens import TokenIssuer, TokenValidator
from eventstore.ports import EventStore
from gateway import session as s
from gateway.adapters.coap import (
    CoapRequest,
    CoapResponse,
    CoapServer,
    CoapServerConfig,
    RequestTooLarge,
)
from gateway.adapters.coap_udp import SimpleDeviceServer
from gateway.adapters.dtls import DtlsTerminator
from gateway.commands import (
    Answer,
    AppendCommandEvents,
    CommandEffect,
    Dispatcher,
    DispatcherConfig,
    SendCommand,
)
from gateway.devicestate import CommandLog, discover_owner_links, load_device_state
from gateway.errors import Unavailable
from gateway.identity import NO_IDENTITY, CertificateRejected, TlsAuthPolicy, check_peer
from gateway.oauth import OAuthProvider
from gateway.ports import (
    DeviceConnection,
    DeviceObservation,
    DeviceServer,
    DeviceServerFactory,
    RefreshableKeys,
)
from gateway.writer import DeviceWriter, WriterConfig
from proto import subjects
from proto.events import (
    AnyEvent,
    CommandCanceled,
    CommandExpired,
    CommandPending,
    DeviceUnregistered,
)
from proto.leases import connection_id

log = logging.getLogger(__name__)

OCF_VERSION = 0x0800
OCF_CBOR = 10000


_RECHECKS: Final = (0.005, 0.02, 0.1, 0.5, 2.0)
"""Delays of the re-reads of a device's commands after a wake-up that found nothing new."""


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    gateway_id: str = "gw-1"
    tcp_bind: tuple[str, int] | None = ("127.0.0.1", 5683)
    tls_bind: tuple[str, int] | None = None
    ssl_context: ssl.SSLContext | None = None
    # Device authentication on the TLS listener; its ssl_context must match the mode (client
    # certificates required and verified against the CA(s) in the mutual modes). The TCP
    # listener never authenticates devices: development only.
    tls_auth: TlsAuthPolicy = field(default_factory=TlsAuthPolicy)
    access_ttl: float | None = 3600.0
    refresh_ttl: float = 30 * 24 * 3600.0
    batch_observe: bool = True
    request_timeout: float = 10.0
    reply_timeout: float = 15.0  # how long a device request may wait for the log
    keepalive_interval: float = 30.0
    keepalive_timeout: float = 60.0
    opening_timeout: float = 10.0
    max_message_size: int = 64 * 1024
    tick_interval: float = 1.0
    writer: WriterConfig = field(default_factory=WriterConfig)
    # abuse limits (see gateway.adapters.coap.CoapServerConfig)
    sign_in_timeout: float | None = 60.0  # a connection must sign in within this
    max_unauthenticated: int | None = 10_000  # connections not signed in, at once
    request_rate: float | None = 20.0  # device requests per second, per connection
    request_burst: int = 100
    # connections from one IPv4 address / IPv6 /64 at once, signed in or not (devices behind
    # one NAT share it: raise it for large fleets behind one address)
    max_connections_per_ip: int | None = 1024
    max_connections: int | None = 50_000  # at once, from anywhere (~85 kB each over TLS)
    message_timeout: float | None = 30.0  # a message begun must be complete within this
    # graceful drain (Gateway.drain, on SIGTERM): Release to every device, sending it to
    # ``drain_alternative`` (a coap+tcp:// or coaps+tcp:// URI) if set, and wait at most
    # ``drain_timeout`` seconds for the devices to go; 0 disables it (Abort at once)
    drain_timeout: float = 0.0
    drain_alternative: str | None = None
    drain_hold_off: int | None = None
    # command delivery (see gateway.commands)
    command_retry_initial: float = 1.0
    command_retry_max: float = 30.0
    command_resync: float = 60.0  # re-read the device's commands at least this often
    # The interpreter's youngest-generation GC threshold while the gateway runs (None: leave it).
    # Every notification leaves a few objects in cycles (aiocoap's pipes and callbacks) and keeps
    # others alive until its append is acknowledged; at CPython's default of 700 the young
    # collections run so often that those in-flight objects are promoted and trigger full
    # collections of the whole heap (~0.2 s each with 1,000 devices): ~16 % of the gateway's CPU at
    # 4,000 notifications/s, against ~2 % at 10,000.
    gc_young_threshold: int | None = 10_000


@contextlib.contextmanager
def young_gc_threshold(threshold: int) -> Iterator[None]:
    """Run with the youngest generation's GC threshold at ``threshold``; restore the previous
    thresholds on exit unless someone changed them meanwhile."""
    if threshold < 1:
        raise ValueError("the GC threshold must be >= 1")
    before = gc.get_threshold()
    ours = (threshold, *before[1:])
    gc.set_threshold(*ours)
    try:
        yield
    finally:
        if gc.get_threshold() == ours:
            gc.set_threshold(*before)


class SessionRef(int):
    """A writer ref of the session's ``Append`` (its ``AppendResult`` goes to the session)."""

    __slots__ = ()


class CommandRef(int):
    """A writer ref of the dispatcher's ``AppendCommandEvents`` (answered with
    :meth:`gateway.commands.Dispatcher.appended`)."""

    __slots__ = ()


@dataclass(eq=False)
class _Conn:
    conn: DeviceConnection
    session: s.Session
    writer: DeviceWriter = field(init=False)  # made once the connection exists (its callback)
    replies: dict[int, asyncio.Future[s.Respond]] = field(default_factory=dict)
    observations: dict[int, DeviceObservation] = field(default_factory=dict)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    close_reason: str | None = None
    closed: bool = False
    lost: bool = False  # the connection is gone: what the session appends now is its last word
    dispatcher: Dispatcher | None = None  # command delivery while signed in
    commands_task: asyncio.Task[None] | None = None
    writes_for: set[str] = field(default_factory=set)  # devices whose events it appended
    draining: bool = False  # no new command goes to the device: it is asked to go
    sends: set[asyncio.Task[None]] = field(default_factory=set)  # commands in flight


@dataclass
class GatewayStats:
    connections: int = 0
    signed_in: int = 0
    requests: int = 0
    notifications: int = 0
    overflow_closes: int = 0
    refused: int = 0  # TLS connections whose client certificate did not meet the mode


class Gateway:
    """The CoAP gateway service (an async context manager)."""

    def __init__(
        self,
        config: GatewayConfig,
        store: EventStore,
        validator: TokenValidator,
        issuer: TokenIssuer,
        *,
        oauth: Mapping[str, OAuthProvider] | None = None,
        clock: Callable[[], float] = time.time,
        instance: str | None = None,
        server_factory: DeviceServerFactory = CoapServer,
    ) -> None:
        self.config = config
        # the run holding the lease (gateway.leasing); connection ids carry it
        self.instance = instance
        self.store = store
        self.validator = validator
        # the validator's key refresh, when it declares one (gateway.ports.RefreshableKeys)
        self._keys = (
            validator if isinstance(validator, RefreshableKeys) and validator.refreshable else None
        )
        self.issuer = issuer
        self._server_factory = server_factory
        self.oauth = dict(oauth or {})
        self.clock = clock
        self.conns: dict[str, _Conn] = {}
        self.devices: dict[str, _Conn] = {}
        # device -> the writer of its newest connection that appended its events
        self._device_writers: dict[str, DeviceWriter] = {}
        self.stats = GatewayStats()
        self._rids = itertools.count(1)
        self._server: DeviceServer | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._gc_policy = contextlib.ExitStack()
        # The simple devices' UDP endpoint served by this process beside the OCF listeners (set
        # by the composition root, twinhub_cli.services.run_gateway); it follows the instance.
        self.simple: SimpleDeviceServer | None = None
        self.dtls: DtlsTerminator | None = None  # DTLS in front of ``simple``, likewise

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        cfg = self.config
        self._server = self._server_factory(
            CoapServerConfig(
                tcp_bind=cfg.tcp_bind,
                tls_bind=cfg.tls_bind,
                ssl_context=cfg.ssl_context,
                keepalive_interval=cfg.keepalive_interval,
                keepalive_timeout=cfg.keepalive_timeout,
                opening_timeout=cfg.opening_timeout,
                max_message_size=cfg.max_message_size,
                auth_timeout=cfg.sign_in_timeout,
                max_unauthenticated=cfg.max_unauthenticated,
                request_rate=cfg.request_rate,
                request_burst=cfg.request_burst,
                max_connections_per_ip=cfg.max_connections_per_ip,
                max_connections=cfg.max_connections,
                message_timeout=cfg.message_timeout,
            ),
            on_request=self._on_request,
            on_connect=self._on_connect,
            on_close=self._on_close,
        )
        await self._server.__aenter__()
        if cfg.gc_young_threshold is not None:
            self._gc_policy.enter_context(young_gc_threshold(cfg.gc_young_threshold))
        self._ticker = asyncio.create_task(self._tick_loop(), name="gateway-ticker")
        log.info(
            "gateway %s listening tcp=%s tls=%s",
            cfg.gateway_id,
            self._server.tcp_address,
            self._server.tls_address,
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.config.drain_timeout > 0 and exc_type is None:
            await self.drain(self.config.drain_timeout)
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        for c in list(self.conns.values()):
            await c.conn.close("gateway shutting down")
        if self._server is not None:
            await self._server.__aexit__(exc_type, exc, tb)
        # connections' on_close ran: drain their writers
        pending = [t for t in self._background if not t.done()]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        self._gc_policy.close()

    async def drain(
        self, within: float, alternative: str | None = None, hold_off: int | None = None
    ) -> int:
        """Move every device away gracefully, within ``within`` seconds; returns how many
        connections were still open then (the caller aborts them). ``alternative`` and
        ``hold_off`` default to the configuration's ``drain_alternative`` / ``drain_hold_off``.

        No new connection is accepted. Each connection stops delivering new commands (a command
        not yet sent stays pending in the log, for the device's next gateway), waits for the
        ones in flight to be answered and their outcome appended, then gets Release (RFC 8323
        section 5.5) with ``drain_alternative`` / ``drain_hold_off``: the device closes and
        reconnects there, where its pending commands follow it."""
        if self._server is None:
            return 0
        cfg = self.config
        alternative = alternative or cfg.drain_alternative
        hold_off = cfg.drain_hold_off if hold_off is None else hold_off
        self._server.stop_listening()
        conns = [c for c in self.conns.values() if not c.closed]
        log.info("draining %d device connections (at most %ss)", len(conns), within)

        async def drain_one(c: _Conn) -> None:
            c.draining = True
            if c.sends:
                await asyncio.wait(list(c.sends))
            await c.writer.settled()  # what the device sent so far is in the log
            c.conn.release(alternative, hold_off)
            await c.conn.wait_closed()

        tasks = [asyncio.create_task(drain_one(c), name=f"drain:{c.conn.id}") for c in conns]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=within)
            for task in pending:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        left = sum(1 for c in conns if not c.lost)
        log.info("drained: %d devices went, %d left", len(conns) - left, left)
        return left

    def adopt_instance(self, instance: str) -> None:
        """Serve as ``instance`` from now on (the lease of the current one was lost, so the
        twin service may have marked its devices offline) and close every connection: the
        devices reconnect and sign in again as connections of the new instance."""
        self.instance = instance
        for c in list(self.conns.values()):
            self._close_now(c, "gateway lease lost: reconnect")
        if self.simple is not None:
            self.simple.adopt_instance(instance)

    @property
    def tcp_address(self) -> tuple[str, int] | None:
        return self._server.tcp_address if self._server else None

    @property
    def tls_address(self) -> tuple[str, int] | None:
        return self._server.tls_address if self._server else None

    @property
    def udp_address(self) -> tuple[str, int] | None:
        """The simple devices' CoAP/UDP endpoint, if this process serves one."""
        return self.simple.address if self.simple is not None else None

    @property
    def dtls_address(self) -> tuple[str, int] | None:
        """The simple devices' CoAP/DTLS endpoint, if this process serves one."""
        return self.dtls.address if self.dtls is not None else None

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.tick_interval)
            for c in list(self.conns.values()):
                self._feed(c, s.Tick())
                if c.dispatcher is not None and not c.closed:
                    self._commands(c, c.dispatcher.tick(self.clock()))

    # -- adapter callbacks -------------------------------------------------------------------

    def _on_connect(self, conn: DeviceConnection) -> str | None:
        cfg = self.config
        identity = NO_IDENTITY
        if conn.scheme == "coaps+tcp":
            try:
                identity = check_peer(conn.peer_certificate(), cfg.tls_auth, self.clock())
            except CertificateRejected as e:
                self.stats.refused += 1
                log.warning(
                    "refused %s connection %s from %s (%s): %s",
                    cfg.tls_auth.mode.value,
                    conn.id,
                    conn.remote,
                    conn.scheme,
                    e,
                )
                return "client certificate not accepted"
        cert_expires_at = identity.not_after if cfg.tls_auth.end_session_on_cert_expiry else None
        session = s.Session(
            s.SessionConfig(
                gateway_id=cfg.gateway_id,
                connection_id=conn.id
                if self.instance is None
                else connection_id(self.instance, conn.id),
                remote_address=conn.remote,
                protocol=conn.scheme,
                access_ttl=cfg.access_ttl,
                refresh_ttl=cfg.refresh_ttl,
                batch_observe=cfg.batch_observe,
                cert_device_id=identity.device_id,
                cert_expires_at=cert_expires_at,
                refreshable_keys=self._keys is not None,
                oauth_providers=tuple(self.oauth),
            ),
            self.validator,
            self.issuer,
        )
        c = _Conn(conn, session)
        c.writer = DeviceWriter(
            self.store, functools.partial(self._appended, c), cfg.writer, name=conn.id
        )
        self.conns[conn.id] = c
        self.stats.connections += 1
        log.debug("connection %s from %s (%s)", conn.id, conn.remote, identity.described)
        return None

    def _appended(
        self,
        c: _Conn,
        ref: int,
        ok: bool,
        error: str,
        positions: tuple[int, ...],
        conflict: bool,
    ) -> None:
        """The writer's answer to one append: routed to whoever submitted it (by its ref's type)."""
        match ref:
            case CommandRef():
                if c.dispatcher is not None:
                    self._commands(c, c.dispatcher.appended(int(ref), ok, self.clock()))
            case SessionRef():
                self._feed(c, s.AppendResult(int(ref), ok, error, conflict))
            case _:
                log.error("connection %s: append of unknown origin %r", c.conn.id, ref)

    def _on_close(self, conn: DeviceConnection, reason: str) -> None:
        c = self.conns.pop(conn.id, None)
        if c is None:
            return
        c.closed = True
        c.lost = True
        self._feed(c, s.ConnectionLost(reason))
        self._stop_commands(c)
        for fut in c.replies.values():
            if not fut.done():
                fut.cancel()
        for task in c.tasks:
            task.cancel()
        c.observations.clear()
        self._spawn_background(self._drain(c), f"drain:{conn.id}")
        log.debug("connection %s closed: %s", conn.id, reason)

    async def _on_request(self, conn: DeviceConnection, req: CoapRequest) -> CoapResponse:
        c = self.conns.get(conn.id)
        if c is None:
            return CoapResponse("5.03")
        self.stats.requests += 1
        rid = next(self._rids)
        fut: asyncio.Future[s.Respond] = asyncio.get_running_loop().create_future()
        c.replies[rid] = fut
        self._feed(
            c,
            s.DeviceRequest(
                rid, req.method, req.path, req.query, req.payload, req.content_format, req.accept
            ),
        )
        try:
            reply = await asyncio.wait_for(fut, self.config.reply_timeout)
        except (TimeoutError, asyncio.CancelledError):
            c.replies.pop(rid, None)
            return CoapResponse("5.03", b"timed out waiting for the event log", 0)
        finally:
            c.replies.pop(rid, None)
        if c.close_reason is not None and not c.closed:
            self._close_after_reply(c, c.close_reason)
        return CoapResponse(reply.code, reply.payload, reply.content_format)

    # -- the session driver -------------------------------------------------------------------

    def _feed(self, c: _Conn, inp: s.Input) -> None:
        try:
            effects = c.session.handle(inp, self.clock())
        except Exception:  # a bug in the core must not take the gateway down
            log.exception("session %s failed on %s", c.conn.id, type(inp).__name__)
            effects = [s.Close("internal error")]
        for eff in effects:
            self._do(c, eff)

    def _do(self, c: _Conn, eff: s.Effect) -> None:
        match eff:
            case s.Respond():
                fut = c.replies.get(eff.rid)
                if fut is not None and not fut.done():
                    fut.set_result(eff)
            case s.Append():
                self._order_after_older_connections(c, eff)
                # The offline event of a lost connection goes in even over the bound: after an
                # overflow close it is what tells the twin the device went away.
                if not c.writer.submit(
                    SessionRef(eff.ref),
                    eff.events,
                    eff.critical,
                    force=c.lost,
                    expected_last=eff.expected_last,
                    scope=eff.scope,
                ):
                    self.stats.overflow_closes += 1
                    log.warning(
                        "device %s: event buffer full, closing its connection", c.session.device_id
                    )
                    self._close_now(c, "event buffer overflow: reconnect and resynchronise")
                    self._feed(c, s.AppendResult(eff.ref, False, "buffer overflow"))
            case s.SendRequest():
                self._spawn(c, self._send(c, eff), f"req:{c.conn.id}:{eff.ref}")
            case s.CancelObservation():
                obs = c.observations.pop(eff.ref, None)
                if obs is not None and not c.closed:
                    self._spawn_background(obs.cancel(), f"unobserve:{eff.ref}")
            case s.LoadOwner():
                self._spawn(c, self._load_owner(c, eff), f"owner:{eff.device_id}")
            case s.RefreshKeys():
                self._spawn(c, self._refresh_keys(c, eff), f"refresh-keys:{c.conn.id}")
            case s.ExchangeCode():
                self._spawn(c, self._exchange(c, eff), f"oauth:{eff.provider}:{c.conn.id}")
            case s.LoadDeviceState():
                self._spawn(c, self._load(c, eff), f"load:{eff.device_id}")
            case s.Discover():
                self._spawn(c, self._discover(c, eff), f"discover:{eff.owner}")
            case s.Close():
                if c.replies:
                    c.close_reason = eff.reason  # after the pending reply went out
                else:
                    self._close_now(c, eff.reason)
            case s.SignedIn():
                c.conn.mark_authenticated()
                old = self.devices.get(eff.device_id)
                self.devices[eff.device_id] = c
                self.stats.signed_in += 1
                self._start_commands(c, eff.owner, eff.device_id)
                if old is not None and old is not c and not old.closed:
                    log.info(
                        "device %s signed in again: closing its older connection", eff.device_id
                    )
                    self._close_now(old, "replaced by a newer connection")
            case s.SignedOut():
                if self.devices.get(eff.device_id) is c:
                    del self.devices[eff.device_id]
                self._stop_commands(c)
            case s.ResourcesKnown():
                if c.dispatcher is not None:
                    self._commands(c, c.dispatcher.set_published(eff.hrefs, self.clock()))

    # -- command delivery -------------------------------------------------------------------

    def _start_commands(self, c: _Conn, owner: str, device_id: str) -> None:
        self._stop_commands(c)
        cfg = self.config
        c.dispatcher = Dispatcher(
            DispatcherConfig(
                cfg.gateway_id,
                c.session.config.connection_id,
                cfg.command_retry_initial,
                cfg.command_retry_max,
            ),
            owner,
            device_id,
        )
        task: asyncio.Task[None] = asyncio.create_task(
            self._command_loop(c, c.dispatcher), name=f"commands:{device_id}"
        )
        c.commands_task = task
        c.tasks.add(task)
        task.add_done_callback(c.tasks.discard)

    def _stop_commands(self, c: _Conn) -> None:
        if c.dispatcher is not None:
            c.dispatcher.close()
            c.dispatcher = None
        if c.commands_task is not None:
            c.commands_task.cancel()
            c.commands_task = None

    async def _command_loop(self, c: _Conn, d: Dispatcher) -> None:
        """Routing by subscription: this gateway listens for the commands of the devices it
        holds (their own subjects), and reads what is new from the log on every wake-up."""
        kinds = (CommandPending.KIND, CommandCanceled.KIND, CommandExpired.KIND)
        filters = [subjects.event_filter(owner=d.owner, device=d.device_id, kind=k) for k in kinds]
        commands = CommandLog(d.owner, d.device_id)
        notifier = None
        try:
            while notifier is None:  # subscribe first, then read: nothing falls in between
                try:
                    notifier = await self.store.notifier(filters)
                except Exception as e:
                    log.warning("device %s: cannot watch its commands yet: %s", d.device_id, e)
                    await asyncio.sleep(self.config.command_retry_initial)
            woken = False
            rechecks = list(_RECHECKS)
            while True:
                read_up_to = commands.cursor(kinds)
                try:
                    opened, closed = await commands.refresh(self.store)
                except Exception as e:
                    log.warning("device %s: cannot read its commands: %s", d.device_id, e)
                    await notifier.wait(self.config.command_retry_initial)
                    continue
                now = self.clock()
                for corr in closed:
                    self._commands(c, d.cancel(corr, now))
                if opened:
                    self._commands(c, d.add(opened, now))
                if woken and commands.cursor(kinds) == read_up_to and rechecks:
                    # Woken for nothing readable of the kinds we are woken for (what else
                    # was read, our own sent / outcome events, says nothing): JetStream hands
                    # a message to subscribers just before its stream stores it. Look again
                    # shortly (a duplicate publish, never stored, wakes us too: hence a bounded
                    # number of times).
                    await notifier.wait(rechecks.pop(0))
                    continue
                rechecks = list(_RECHECKS)
                woken = await notifier.wait(self.config.command_resync)
        finally:
            if notifier is not None:
                await notifier.close()

    def _commands(self, c: _Conn, effects: list[CommandEffect]) -> None:
        for eff in effects:
            if c.closed or c.dispatcher is None:
                return
            if isinstance(eff, AppendCommandEvents):
                self._order_after_older_connections(c, eff.events)
                if not c.writer.submit(CommandRef(eff.ref), eff.events, False, force=True):
                    self._commands(c, c.dispatcher.appended(eff.ref, False, self.clock()))
            elif not c.draining:  # draining: the command stays pending for the next gateway
                task = self._spawn(
                    c,
                    self._send_command(c, c.dispatcher, eff),
                    f"cmd:{c.conn.id}:{eff.correlation_id}",
                )
                c.sends.add(task)
                task.add_done_callback(c.sends.discard)

    async def _send_command(self, c: _Conn, d: Dispatcher, eff: SendCommand) -> None:
        req = CoapRequest(
            method=eff.method,
            path=eff.href,
            query=eff.query,
            payload=eff.payload,
            content_format=eff.content_format,
            accept=OCF_CBOR,
            ocf_version=OCF_VERSION if eff.payload else None,
            ocf_accept_version=OCF_VERSION,
        )
        answer: Answer | None = None
        error = ""
        permanent = False
        try:
            resp = await c.conn.request(req, self.config.request_timeout)
            answer = Answer(resp.code, resp.payload, resp.content_format)
        except RequestTooLarge as e:  # never sent; a retry would not fit either
            log.warning("device %s: command %s: %s", d.device_id, eff.correlation_id, e)
            error = (
                f"request of {e.size} bytes not sent: the device accepts at most {e.limit} "
                "bytes (its CSM Max-Message-Size)"
            )
            permanent = True
        except Exception as e:  # timeout, closed connection
            error = f"{type(e).__name__}: {e}"
        if c.dispatcher is d and not c.closed:
            now = self.clock()
            answered = d.answered(
                eff.correlation_id, eff.attempt, answer, error, now, permanent=permanent
            )
            self._commands(c, answered)

    def _order_after_older_connections(
        self, c: _Conn, events: tuple[AnyEvent, ...] | s.Append
    ) -> None:
        """A connection's first events of a device wait for what older connections of the
        device still hold (see :mod:`gateway.writer`)."""
        if isinstance(events, s.Append):
            events = events.events
        if not events or events[0].device_id in c.writes_for:
            return
        device = events[0].device_id
        c.writes_for.add(device)
        older = self._device_writers.get(device)
        if older is not None:
            c.writer.follow(older)
        self._device_writers[device] = c.writer

    async def _drain(self, c: _Conn) -> None:
        await c.writer.close()
        for device in c.writes_for:
            if self._device_writers.get(device) is c.writer:
                del self._device_writers[device]

    def _spawn(self, c: _Conn, coro: object, name: str) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.create_task(coro, name=name)  # type: ignore[arg-type]
        c.tasks.add(task)
        task.add_done_callback(c.tasks.discard)
        return task

    def _spawn_background(self, coro: object, name: str) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro, name=name)  # type: ignore[arg-type]
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _close_now(self, c: _Conn, reason: str) -> None:
        if c.closed:
            return
        c.closed = True
        self._spawn_background(c.conn.close(reason), f"close:{c.conn.id}")

    def _close_after_reply(self, c: _Conn, reason: str) -> None:
        """Close once the reply being returned is handed to the connection: the device server
        runs each request handler in a task of its own and writes the handler's response before
        that task ends (:class:`gateway.ports.DeviceServer`), so the task's end is the moment."""
        task = asyncio.current_task()
        if task is None:  # not in a handler's task: nothing to wait for
            self._close_now(c, reason)
            return
        task.add_done_callback(lambda _: self._close_now(c, reason))

    async def _send(self, c: _Conn, eff: s.SendRequest) -> None:
        req = CoapRequest(
            method=eff.method,
            path=eff.path,
            query=eff.query,
            payload=eff.payload,
            content_format=eff.content_format,
            accept=OCF_CBOR,
            ocf_version=OCF_VERSION if eff.payload else None,
            ocf_accept_version=OCF_VERSION,
        )
        timeout = self.config.request_timeout
        try:
            if eff.observe:
                # Notifications are fed as they come, possibly before the first response (which
                # reaches us through the await): the session appends them after it.

                def notify(resp: CoapResponse) -> None:
                    if c.closed:
                        return
                    self.stats.notifications += 1
                    self._feed(c, s.Notification(eff.ref, _reply(resp)))

                obs = await c.conn.observe(req, notify, timeout)
                c.observations[eff.ref] = obs
                first = obs.first
            else:
                first = await c.conn.request(req, timeout)
        except Exception as e:  # closed connection, timeout, protocol error
            if not c.closed:
                self._feed(c, s.DeviceResponse(eff.ref, None, f"{type(e).__name__}: {e}"))
            return
        self._feed(c, s.DeviceResponse(eff.ref, _reply(first)))

    async def _load(self, c: _Conn, eff: s.LoadDeviceState) -> None:
        try:
            state = await load_device_state(self.store, eff.owner, eff.device_id)
        except Exception as e:
            log.warning("device %s: could not load its state: %s", eff.device_id, e)
            self._feed(c, s.DeviceStateLoaded(eff.ref, None, str(e)))
            return
        self._feed(c, s.DeviceStateLoaded(eff.ref, state))

    async def _load_owner(self, c: _Conn, eff: s.LoadOwner) -> None:
        try:
            owner, registered_at = await device_registration(self.store, eff.device_id)
        except Exception as e:
            log.warning("device %s: could not read its owner: %s", eff.device_id, e)
            self._feed(c, s.OwnerLoaded(eff.ref, None, str(e) or type(e).__name__))
            return
        self._feed(c, s.OwnerLoaded(eff.ref, owner, registered_at=registered_at))

    async def _refresh_keys(self, c: _Conn, eff: s.RefreshKeys) -> None:
        if self._keys is not None:
            try:
                await self._keys.refresh_keys()
            except Exception as e:  # the retry fails with the unknown key: 4.01
                log.warning("refreshing the token keys (kid %r) failed: %s", eff.kid, e)
        self._feed(c, s.KeysRefreshed(eff.ref))

    async def _exchange(self, c: _Conn, eff: s.ExchangeCode) -> None:
        provider = self.oauth.get(eff.provider)
        if provider is None:
            self._feed(c, s.CodeExchanged(eff.ref, None, f"unknown provider {eff.provider!r}"))
            return
        try:
            claims = await provider.exchange(eff.code, self.clock())
        except Unavailable as e:
            log.warning("oauth %s: %s (connection %s)", eff.provider, e, c.conn.id)
            self._feed(c, s.CodeExchanged(eff.ref, None, str(e), unavailable=True))
            return
        except Exception as e:  # refused code, invalid token
            log.info("oauth %s: %s (connection %s)", eff.provider, e, c.conn.id)
            self._feed(c, s.CodeExchanged(eff.ref, None, str(e) or type(e).__name__))
            return
        log.info(
            "oauth %s: code exchanged for %s (connection %s)", eff.provider, claims.owner, c.conn.id
        )
        self._feed(c, s.CodeExchanged(eff.ref, claims))

    async def _discover(self, c: _Conn, eff: s.Discover) -> None:
        try:
            found = await discover_owner_links(self.store, eff.owner, eff.device_ids)
        except Exception as e:
            log.warning("discovery for %s failed: %s", eff.owner, e)
            self._feed(c, s.Discovered(eff.ref, None))
            return
        self._feed(c, s.Discovered(eff.ref, found))


async def device_registration(store: EventStore, device_id: str) -> tuple[str | None, int]:
    """The device's current owner per the log -- the owner of its last registration, unless
    that owner unregistered it afterwards (None: the device is free) -- and the position of that
    registration (0: none), which a new registration's conditional append expects."""
    registered = await store.last_message(s.registration_scope(device_id))
    if registered is None:
        return None, 0
    owner = subjects.parse_event_subject(registered.message.subject).owner
    unregistered = await store.last_message(
        subjects.event_filter(owner=owner, device=device_id, kind=DeviceUnregistered.KIND)
    )
    if unregistered is not None and unregistered.position > registered.position:
        return None, registered.position
    return owner, registered.position


def _reply(resp: CoapResponse) -> s.Reply:
    return s.Reply(resp.code, resp.payload, resp.content_format, resp.etag, resp.observe)

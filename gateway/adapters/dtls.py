"""A DTLS 1.2 terminator in front of a plain CoAP/UDP server (server certificate, one-way).

Devices speak CoAP over DTLS to the terminator; for each DTLS session it relays the decrypted
datagrams to the plain CoAP/UDP server on loopback through a UDP socket of its own, so that
server sees one distinct source address per session, answers it as any UDP client, and the
terminator encrypts the answers back. :meth:`DtlsTerminator.peer_of` tells the plain server
which device address a relay address stands for (for logs and rate limits).

Two layers:

* :class:`DtlsEngine`: OpenSSL (pyOpenSSL) on memory BIOs, datagrams and plaintexts in,
  :data:`Effect` values out, no sockets. Stateless cookies (HelloVerifyRequest) come first: a
  ClientHello without a valid cookie creates no session and is answered only with a
  HelloVerifyRequest, smaller than the ClientHello. The DTLS retransmission timer is
  OpenSSL's own (:meth:`DtlsEngine.retransmit_in`, :meth:`DtlsEngine.handle_timeout`).
* :class:`DtlsTerminator`: the asyncio driver (one UDP endpoint for devices, one per session
  towards the plain server, timers and the idle sweep).

pyOpenSSL has no PSK API, so this is certificate-only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Final

from OpenSSL import SSL

from gateway.dtls_sessions import (
    Address,
    CloseReason,
    CookieJar,
    FramingError,
    SessionTable,
    canonical,
    is_client_hello,
    pack_datagrams,
    split_records,
)
from gateway.errors import GatewayError

log = logging.getLogger("gateway.dtls")

DTLS1_2_VERSION: Final = 0xFEFD  # OpenSSL's DTLS1_2_VERSION (the wire version of DTLS 1.2)
MAX_DATAGRAM: Final = 65535
MAX_PENDING: Final = 32  # datagrams held for a session while its relay socket is being made


class DtlsSetupError(GatewayError, ValueError):
    """The DTLS configuration cannot be used (certificate, key, ciphers, limits)."""


@dataclass(frozen=True, slots=True)
class DtlsConfig:
    """The server's certificate (PEM, leaf first, then any intermediates) and its key."""

    cert_chain: Path
    key: Path
    max_sessions: int = 1000
    idle_timeout: float = 300.0
    # a handshake past its cookie must finish within this, or its slot is freed
    handshake_timeout: float = 30.0
    # the largest datagram sent to a device (UDP payload); 1152 leaves room for IPv6 and tunnels
    mtu: int = 1152
    cookie_lifetime: float = 60.0
    ciphers: str = "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:" + (
        "ECDHE-ECDSA-AES128-CCM8:ECDHE-ECDSA-AES128-CCM:ECDHE-RSA-AES128-GCM-SHA256:"
        "ECDHE-RSA-AES256-GCM-SHA384"
    )

    def __post_init__(self) -> None:
        if not 256 <= self.mtu <= 65507:
            raise DtlsSetupError(f"mtu {self.mtu} outside 256..65507")
        limits = (
            self.max_sessions,
            self.idle_timeout,
            self.handshake_timeout,
            self.cookie_lifetime,
        )
        if min(limits) <= 0:
            raise DtlsSetupError(
                "max_sessions, idle_timeout, handshake_timeout and cookie_lifetime must be positive"
            )


@dataclass(frozen=True, slots=True)
class Transmit:
    """Send ``datagram`` to the device at ``peer``."""

    peer: Address
    datagram: bytes


@dataclass(frozen=True, slots=True)
class Deliver:
    """``plaintext`` (one CoAP datagram) arrived from the device at ``peer``."""

    peer: Address
    plaintext: bytes


@dataclass(frozen=True, slots=True)
class Opened:
    """The handshake with ``peer`` completed."""

    peer: Address


@dataclass(frozen=True, slots=True)
class Closed:
    peer: Address
    reason: CloseReason


Effect = Transmit | Deliver | Opened | Closed


@dataclass(slots=True)
class _Session:
    conn: SSL.Connection
    started: float
    established: bool = False


class DtlsEngine:
    """DTLS 1.2 server sessions by device address, on memory BIOs (no I/O, no sockets)."""

    def __init__(self, config: DtlsConfig, *, cookie_secret: bytes | None = None) -> None:
        self.config = config
        self._cookies = CookieJar(cookie_secret or os.urandom(32), config.cookie_lifetime)
        self._sessions: SessionTable[_Session] = SessionTable(
            config.max_sessions, config.idle_timeout
        )
        # the time of the input being handled, for the cookie callbacks
        self._now = 0.0
        self._ctx = self._context()

    def _context(self) -> SSL.Context:
        ctx = SSL.Context(SSL.DTLS_SERVER_METHOD)
        ctx.set_min_proto_version(DTLS1_2_VERSION)
        ctx.set_max_proto_version(DTLS1_2_VERSION)
        # the MTU is ours to set (a memory BIO has none); cookies are checked by DTLSv1_listen
        ctx.set_options(SSL.OP_NO_QUERY_MTU | (SSL.OP_COOKIE_EXCHANGE or 0))
        try:
            ctx.set_cipher_list(self.config.ciphers.encode())
            ctx.use_certificate_chain_file(str(self.config.cert_chain))
            ctx.use_privatekey_file(str(self.config.key))
            ctx.check_privatekey()
        except SSL.Error as exc:
            raise DtlsSetupError(
                f"DTLS certificate {self.config.cert_chain} / key {self.config.key}: {exc}"
            ) from exc
        ctx.set_cookie_generate_callback(self._generate_cookie)
        ctx.set_cookie_verify_callback(self._verify_cookie)
        return ctx

    # Each connection carries its device address as app data (one connection per address).
    def _generate_cookie(self, conn: SSL.Connection) -> bytes:
        peer: Address = conn.get_app_data()
        return self._cookies.make(peer, self._now)

    def _verify_cookie(self, conn: SSL.Connection, cookie: bytes) -> bool:
        peer: Address = conn.get_app_data()
        return self._cookies.check(peer, cookie, self._now)

    # --- queries

    def __contains__(self, peer: object) -> bool:
        return peer in self._sessions

    @property
    def peers(self) -> list[Address]:
        return list(self._sessions)

    def established(self, peer: Address) -> bool:
        session = self._sessions.get(canonical(peer))
        return session is not None and session.established

    def bind_relay(self, peer: Address, relay: Address) -> None:
        self._sessions.bind_relay(canonical(peer), relay)

    def peer_of(self, relay: Address) -> Address | None:
        return self._sessions.peer_of(relay)

    def next_deadline(self) -> float | None:
        """When :meth:`expire` next has something to do (None without sessions)."""
        limit = self.config.handshake_timeout
        deadlines = [s.started + limit for _, s in self._handshakes()]
        idle = self._sessions.next_deadline()
        if idle is not None:
            deadlines.append(idle)
        return min(deadlines, default=None)

    def retransmit_in(self, peer: Address) -> float | None:
        """Seconds until OpenSSL's handshake retransmission timer of ``peer`` fires, if set."""
        session = self._sessions.get(canonical(peer))
        if session is None:
            return None
        return session.conn.DTLSv1_get_timeout()

    # --- inputs

    def datagram_received(self, peer: Address, datagram: bytes, now: float) -> list[Effect]:
        peer = canonical(peer)
        self._now = now
        session = self._sessions.get(peer)
        if session is None:
            return self._listen(peer, datagram, now)
        if session.established and is_client_hello(datagram):
            # The device restarted on the same address: a new handshake (after a cookie)
            # replaces the old session; anything else about it is left to the old one.
            return self._rehandshake(peer, datagram, now)
        session.conn.bio_write(datagram)
        return self._progress(peer, session, now)

    def send(self, peer: Address, plaintext: bytes, now: float) -> list[Effect]:
        """Encrypt one CoAP datagram to ``peer`` (dropped without an established session)."""
        peer = canonical(peer)
        session = self._sessions.get(peer)
        if session is None or not session.established:
            return []
        try:
            session.conn.send(plaintext)
        except SSL.Error as exc:
            log.info("dtls %s:%d: send failed: %s", *peer, exc)
            return self._drop(peer, session, CloseReason.PROTOCOL_ERROR, notify=False)
        self._sessions.touch(peer, now)
        return self._flush(peer, session.conn)

    def handle_timeout(self, peer: Address, now: float) -> list[Effect]:
        """Run OpenSSL's retransmission timer of ``peer`` (when :meth:`retransmit_in` said)."""
        peer = canonical(peer)
        session = self._sessions.get(peer)
        if session is None:
            return []
        try:
            session.conn.DTLSv1_handle_timeout()
        except SSL.Error as exc:
            log.info("dtls %s:%d: handshake timed out: %s", *peer, exc)
            return self._drop(peer, session, CloseReason.HANDSHAKE_FAILED, notify=False)
        return self._flush(peer, session.conn)

    def expire(self, now: float) -> list[Effect]:
        """Close every session idle for ``idle_timeout`` (with close_notify), and every
        handshake older than ``handshake_timeout``, at ``now``."""
        effects: list[Effect] = []
        for peer in self._sessions.expired(now):
            effects += self.close(peer, CloseReason.IDLE)
        for peer in self._stalled(now):
            effects += self.close(peer, CloseReason.HANDSHAKE_FAILED)
        return effects

    def _handshakes(self) -> list[tuple[Address, _Session]]:
        pairs = [(p, self._sessions.get(p)) for p in self._sessions]
        return [(p, s) for p, s in pairs if s is not None and not s.established]

    def _stalled(self, now: float) -> list[Address]:
        limit = self.config.handshake_timeout
        return [p for p, s in self._handshakes() if now - s.started >= limit]

    def close(self, peer: Address, reason: CloseReason = CloseReason.SHUTDOWN) -> list[Effect]:
        peer = canonical(peer)
        session = self._sessions.get(peer)
        if session is None:
            return []
        return self._drop(peer, session, reason, notify=session.established)

    def close_all(self) -> list[Effect]:
        effects: list[Effect] = []
        for peer in self._sessions:
            effects += self.close(peer, CloseReason.SHUTDOWN)
        return effects

    # --- steps

    def _connection(self, peer: Address) -> SSL.Connection:
        conn = SSL.Connection(self._ctx, None)
        conn.set_app_data(peer)
        conn.set_accept_state()
        conn.set_ciphertext_mtu(self.config.mtu)
        return conn

    def _cookie_ok(
        self, peer: Address, datagram: bytes, now: float
    ) -> tuple[SSL.Connection | None, list[Effect]]:
        """Listen to one ClientHello: a connection past the cookie, or the HelloVerifyRequest."""
        if not is_client_hello(datagram):
            return None, []
        # A fresh SSL object per unverified ClientHello: nothing of a stranger's datagram
        # outlives this call.
        conn = self._connection(peer)
        conn.bio_write(datagram)
        try:
            conn.DTLSv1_listen()
        except SSL.WantReadError:
            return None, self._flush(peer, conn)
        except SSL.Error as exc:
            log.debug("dtls %s:%d: bad ClientHello: %s", *peer, exc)
            return None, []
        return conn, []

    def _listen(self, peer: Address, datagram: bytes, now: float) -> list[Effect]:
        if self._sessions.full():
            return []  # not even a HelloVerifyRequest: the device retries later
        conn, effects = self._cookie_ok(peer, datagram, now)
        if conn is None:
            return effects
        session = _Session(conn, now)
        self._sessions.add(peer, session, now)
        log.debug("dtls %s:%d: cookie verified, handshaking", *peer)
        return self._progress(peer, session, now)

    def _rehandshake(self, peer: Address, datagram: bytes, now: float) -> list[Effect]:
        conn, effects = self._cookie_ok(peer, datagram, now)
        if conn is None:
            return effects
        old = self._sessions.get(peer)
        if old is not None:
            effects = self._drop(peer, old, CloseReason.REPLACED, notify=False)
        session = _Session(conn, now)
        self._sessions.add(peer, session, now)
        return effects + self._progress(peer, session, now)

    def _progress(self, peer: Address, session: _Session, now: float) -> list[Effect]:
        effects: list[Effect] = []
        conn = session.conn
        if not session.established:
            try:
                conn.do_handshake()
            except SSL.WantReadError:
                self._sessions.touch(peer, now)
                return self._flush(peer, conn)
            except SSL.Error as exc:
                log.info("dtls %s:%d: handshake failed: %s", *peer, exc)
                return self._flush(peer, conn) + self._drop(
                    peer, session, CloseReason.HANDSHAKE_FAILED, notify=False
                )
            session.established = True
            self._sessions.touch(peer, now)
            log.info("dtls %s:%d: session open (%s)", *peer, conn.get_cipher_name())
            effects.append(Opened(peer))
        while True:
            try:
                plaintext = conn.recv(MAX_DATAGRAM)
            except SSL.WantReadError:
                break
            except SSL.ZeroReturnError:
                return effects + self._drop(peer, session, CloseReason.PEER_CLOSED, notify=True)
            except SSL.Error as exc:
                log.info("dtls %s:%d: protocol error: %s", *peer, exc)
                return effects + self._drop(peer, session, CloseReason.PROTOCOL_ERROR, notify=False)
            self._sessions.touch(peer, now)
            effects.append(Deliver(peer, plaintext))
        return effects + self._flush(peer, conn)

    def _drop(
        self, peer: Address, session: _Session, reason: CloseReason, *, notify: bool
    ) -> list[Effect]:
        effects: list[Effect] = []
        if notify:
            with contextlib.suppress(SSL.Error):
                session.conn.shutdown()
            effects += self._flush(peer, session.conn)
        self._sessions.remove(peer)
        log.info("dtls %s:%d: session closed (%s)", *peer, reason.value)
        effects.append(Closed(peer, reason))
        return effects

    def _flush(self, peer: Address, conn: SSL.Connection) -> list[Effect]:
        out = b""
        while True:
            try:
                chunk = conn.bio_read(MAX_DATAGRAM)
            except SSL.WantReadError:
                break
            if not chunk:
                break
            out += chunk
        if not out:
            return []
        try:
            datagrams = pack_datagrams(split_records(out), self.config.mtu)
        except FramingError:
            datagrams = [out]
        return [Transmit(peer, d) for d in datagrams]


class _FrontProtocol(asyncio.DatagramProtocol):
    def __init__(self, terminator: DtlsTerminator) -> None:
        self.terminator = terminator

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        self.terminator._from_device(addr, data)

    def error_received(self, exc: Exception) -> None:
        log.debug("dtls: socket error: %s", exc)


class _RelayProtocol(asyncio.DatagramProtocol):
    def __init__(self, terminator: DtlsTerminator, peer: Address) -> None:
        self.terminator = terminator
        self.peer = peer

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        self.terminator._from_backend(self.peer, data)

    def error_received(self, exc: Exception) -> None:
        log.debug("dtls %s:%d: relay socket error: %s", *self.peer, exc)


@dataclass(slots=True)
class _Relay:
    transport: asyncio.DatagramTransport | None = None
    pending: list[bytes] = field(default_factory=list)
    task: asyncio.Task[None] | None = None


class DtlsTerminator:
    """DTLS 1.2 on ``bind`` in front of the plain CoAP/UDP server at ``backend``.

    An async context manager; ``address`` is the bound address (port 0 picks one).
    """

    def __init__(
        self,
        config: DtlsConfig,
        *,
        bind: Address,
        backend: Address,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.engine = DtlsEngine(config)
        self.bind = bind
        self.backend = backend
        self.clock = clock
        self._transport: asyncio.DatagramTransport | None = None
        self._relays: dict[Address, _Relay] = {}
        self._timers: dict[Address, asyncio.TimerHandle] = {}
        # the socket's own form of a device address where it differs from the canonical one
        # (an IPv4 device on a dual-stack socket is ``("::ffff:a.b.c.d", port, 0, 0)``)
        self._wire: dict[Address, tuple[str | int, ...]] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False

    @property
    def address(self) -> Address:
        if self._transport is None:
            raise RuntimeError("not started")
        sockname = self._transport.get_extra_info("sockname")
        return (str(sockname[0]), int(sockname[1]))

    @property
    def sessions(self) -> list[Address]:
        """Device addresses with a session (handshaking or established)."""
        return self.engine.peers

    def peer_of(self, relay: Address) -> Address | None:
        """The device address whose session relays from ``relay`` (None if none does)."""
        return self.engine.peer_of(relay)

    async def __aenter__(self) -> DtlsTerminator:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _FrontProtocol(self), local_addr=self.bind
        )
        self._transport = transport
        self._sweeper = asyncio.create_task(self._sweep(), name="dtls-idle-sweep")
        log.info("dtls: listening on %s:%d, relaying to %s:%d", *self.address, *self.backend)

    async def close(self) -> None:
        """Send close_notify to every device, then close all sockets."""
        if self._closing:
            return
        self._closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        self._apply(self.engine.close_all())
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._transport is not None:
            self._transport.close()

    # --- events

    def _from_device(self, addr: tuple[str | int, ...], data: bytes) -> None:
        if self._closing:
            return
        peer = canonical((str(addr[0]), int(addr[1])))
        if addr != peer:
            self._wire[peer] = addr
        self._apply(self.engine.datagram_received(peer, data, self.clock()))
        if peer not in self.engine:
            self._wire.pop(peer, None)
        self._arm(peer)

    def _from_backend(self, peer: Address, data: bytes) -> None:
        if self._closing:
            return
        self._apply(self.engine.send(peer, data, self.clock()))

    def _on_timer(self, peer: Address) -> None:
        self._timers.pop(peer, None)
        self._apply(self.engine.handle_timeout(peer, self.clock()))
        self._arm(peer)

    def _arm(self, peer: Address) -> None:
        """(Re)start the handshake retransmission timer OpenSSL asks for, if any."""
        handle = self._timers.pop(peer, None)
        if handle is not None:
            handle.cancel()
        delay = self.engine.retransmit_in(peer)
        if delay is not None:
            loop = asyncio.get_running_loop()
            self._timers[peer] = loop.call_later(delay, self._on_timer, peer)

    async def _sweep(self) -> None:
        while True:
            deadline = self.engine.next_deadline()
            timeout = self.engine.config.idle_timeout
            delay = timeout if deadline is None else max(deadline - self.clock(), 0.0)
            await asyncio.sleep(min(delay, timeout) + 0.01)
            self._apply(self.engine.expire(self.clock()))

    def _apply(self, effects: list[Effect]) -> None:
        for effect in effects:
            match effect:
                case Transmit(peer, datagram):
                    if self._transport is not None:
                        self._transport.sendto(datagram, self._wire.get(peer, peer))
                case Opened(peer):
                    relay = self._relays.setdefault(peer, _Relay())
                    relay.task = asyncio.create_task(
                        self._open_relay(peer, relay), name=f"dtls-relay-{peer[0]}:{peer[1]}"
                    )
                    self._tasks.add(relay.task)
                    relay.task.add_done_callback(self._tasks.discard)
                case Deliver(peer, plaintext):
                    relay = self._relays.setdefault(peer, _Relay())
                    if relay.transport is not None:
                        relay.transport.sendto(plaintext)
                    elif len(relay.pending) < MAX_PENDING:
                        relay.pending.append(plaintext)
                case Closed(peer, _):
                    self._wire.pop(peer, None)
                    handle = self._timers.pop(peer, None)
                    if handle is not None:
                        handle.cancel()
                    gone = self._relays.pop(peer, None)
                    if gone is not None:
                        if gone.transport is not None:
                            gone.transport.close()
                        elif gone.task is not None:
                            gone.task.cancel()

    async def _open_relay(self, peer: Address, relay: _Relay) -> None:
        loop = asyncio.get_running_loop()
        try:
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _RelayProtocol(self, peer), remote_addr=self.backend
            )
        except OSError as exc:  # out of file descriptors or ports
            log.warning("dtls %s:%d: no relay socket: %s", *peer, exc)
            self._apply(self.engine.close(peer, CloseReason.RELAY_FAILED))
            return
        if self._relays.get(peer) is not relay or peer not in self.engine:
            transport.close()  # the session ended while the socket was being made
            return
        relay.transport = transport
        sockname = transport.get_extra_info("sockname")
        self.engine.bind_relay(peer, (str(sockname[0]), int(sockname[1])))
        for plaintext in relay.pending:
            transport.sendto(plaintext)
        relay.pending.clear()

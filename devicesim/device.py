"""One simulated OCF device: connects to the gateway, signs up / in, publishes, serves, reconnects.

A :class:`SimDevice` is an async context manager (``async with SimDevice(config) as dev``) or is
driven with :meth:`SimDevice.start` / :meth:`SimDevice.stop`. While running it

* keeps one CoAP-over-TCP/TLS connection to the gateway and serves its resources on it
  (see :mod:`devicesim.transport` for how aiocoap does that);
* signs up once per registration (``POST /oic/sec/account``), signs in on every connection
  (``POST /oic/sec/session``), publishes its links (``POST /oic/rd``) on every connection — or, as
  the reference stack (iotivity-lite) does, once per registration;
* refreshes its token (``POST /oic/sec/tokenrefresh``) before it expires and signs in again;
* pings every ``ping_interval`` seconds and drops a connection whose Pong does not come;
* changes its lights at ``rate`` Hz and notifies observers;
* reconnects after any loss or failure with exponential back-off and jitter;
* on :meth:`stop` signs out (``login: false``), releases and closes the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
import ssl
from collections.abc import AsyncIterator, Callable, Coroutine
from types import TracebackType
from typing import Any, Self, TypeVar

from devicesim import ocf
from devicesim.backoff import backoff_delay
from devicesim.clock import EpochClock
from devicesim.config import (
    BatchSupport,
    DeviceConfig,
    GatewayAddress,
    TlsOptions,
    parse_gateway_uri,
)
from devicesim.errors import (
    SimConfigError,
    SimError,
    SimProtocolError,
    SimTimeoutError,
    SimUnauthorizedError,
)
from devicesim.resources import DeviceModel
from devicesim.site import DeviceSite
from devicesim.stats import DeviceStats
from devicesim.transport import Endpoint, Reply, SimConnection
from proto import codecs
from proto.codecs import ContentFormat
from proto.errors import ProtoError

log = logging.getLogger("devicesim")
coap_log = logging.getLogger("devicesim.coap")

T = TypeVar("T")
MIN_REFRESH_DELAY = 0.1
# A session shorter than this does not reset the back-off: a gateway that accepts and drops at
# once is met with growing delays, not a reconnect loop.
STABLE_SESSION_S = 10.0


class DeviceState(enum.StrEnum):
    IDLE = "idle"
    CONNECTING = "connecting"
    SIGNING_UP = "signing-up"
    SIGNING_IN = "signing-in"
    PUBLISHING = "publishing"
    ONLINE = "online"
    BACKOFF = "backoff"
    STOPPING = "stopping"
    STOPPED = "stopped"


class _Stopped(Exception):
    """Raised inside the run loop when :meth:`SimDevice.stop` interrupted a wait."""


class SimDevice:
    """A simulated OCF device (see the module docstring).

    ``ssl_context`` overrides the one built from ``config.tls`` for ``coaps+tcp`` (a fleet builds
    one and shares it);
    ``connect_limiter`` bounds how many devices of a fleet connect and sign in at once;
    ``stats`` lets a fleet own the counters; ``rng`` makes jitter and values reproducible.
    """

    def __init__(
        self,
        config: DeviceConfig,
        *,
        ssl_context: ssl.SSLContext | None = None,
        connect_limiter: asyncio.Semaphore | None = None,
        stats: DeviceStats | None = None,
        clock: EpochClock | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.stats = stats if stats is not None else DeviceStats()
        self._clock = clock or EpochClock()
        self._rng = rng or random.Random()
        if config.gateway.tls and ssl_context is None:
            ssl_context = (config.tls or TlsOptions()).ssl_context()
        self._ssl = ssl_context if config.gateway.tls else None
        self._limiter = connect_limiter
        self.model = DeviceModel(
            device_id=config.device_id,
            name=config.name,
            resources=config.resources,
            batch=BatchSupport.of(config.batch),
            now_ns=self._clock.now_ns(),
            eps=config.eps,
            introspection=config.introspection,
        )
        self._site = DeviceSite(
            self.model,
            content_format=config.content_format,
            reference_stack=config.reference_stack,
            stats=self.stats,
            now_ns=self._clock.now_ns,
        )
        self._log = log
        self._endpoint: Endpoint | None = None
        self._run_task: asyncio.Task[None] | None = None
        self._change_task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._sign_out_on_stop = True
        self._state = DeviceState.IDLE
        self.connection: SimConnection | None = None
        self.registration: ocf.Registration | None = None
        self.published = False
        self._needs_refresh = False
        self._session_expires_in = 0
        self._session_started = 0.0
        self._last_logged = ""
        self.target = config.gateway
        """Where the device connects: the configured gateway, until a gateway that drains
        sends it elsewhere (Release with an Alternative-Address, RFC 8323 section 5.5)."""
        self._released: tuple[float, GatewayAddress | None] | None = None

    # --- public -------------------------------------------------------------------------------

    @property
    def device_id(self) -> str:
        return self.config.device_id

    @property
    def state(self) -> DeviceState:
        return self._state

    async def start(self) -> None:
        if self._run_task is not None:
            raise RuntimeError("device already started")
        self._endpoint = await Endpoint.open(
            self._site.site,
            scheme=self.config.gateway.scheme,
            ssl_context=self._ssl,
            server_hostname=self.config.tls.server_name if self.config.tls else None,
            send_csm=not self.config.reference_stack,
            require_peer_csm=not self.config.reference_stack,
            ocf_versions=self.config.reference_stack,
            stats=self.stats,
            log=coap_log,
        )
        self._run_task = asyncio.create_task(self._run(), name=f"sim-device {self.device_id}")
        if self.config.rate > 0 and self.model.user_hrefs:
            self._change_task = asyncio.create_task(
                self._change_loop(), name=f"sim-changes {self.device_id}"
            )

    async def stop(self, *, sign_out: bool = True) -> None:
        """Stop: sign out when online (unless ``sign_out`` is false), close, release everything."""
        self._sign_out_on_stop = sign_out
        self._stopping.set()
        if self._change_task is not None:
            self._change_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._change_task
        if self._run_task is not None:
            await self._run_task
        if self._endpoint is not None:
            await self._endpoint.close()
            self._endpoint = None
        self._set_state(DeviceState.STOPPED)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def wait_until(self, predicate: Callable[[SimDevice], bool], timeout: float) -> None:  # noqa: ASYNC109
        """Wait (at most ``timeout`` s) until ``predicate(device)`` holds; re-checked on every
        state change and counter bump. Raises :class:`TimeoutError`."""
        await self.stats.signal.wait_until(lambda: predicate(self), timeout)

    def change(self, href: str | None = None) -> dict[str, Any] | None:
        """Change one light now (the next in turn unless ``href``) and notify its observers."""
        href = href or self.model.next_href()
        if href is None:
            return None
        rep = self.model.simulate_change(href, self._clock.now_ns(), self._rng)
        self._site.changed(href)
        self.stats.bump("changes")
        return rep

    # --- run loop -----------------------------------------------------------------------------

    def _set_state(self, state: DeviceState) -> None:
        self._state = state
        self.stats.signal.notify()

    async def _run(self) -> None:
        failures = 0
        attempts = 0
        while not self._stopping.is_set():
            if attempts:
                self.stats.bump("reconnects")
            attempts += 1
            online_for = 0.0
            try:
                online_for = await self._connection_lifetime()
                self._last_logged = ""
            except _Stopped:
                break
            except (SimError, ProtoError) as e:
                # A fleet facing a dead gateway repeats itself: log only what is new per device.
                level = logging.DEBUG if str(e) == self._last_logged else logging.INFO
                self._last_logged = str(e)
                self._log.log(level, "%s: %s", self.device_id, e)
                self.stats.record_error(e)
            except Exception as e:  # a simulator bug must not take the fleet down
                self._log.exception("%s: unexpected error", self.device_id)
                self.stats.record_error(e)
            if self._stopping.is_set():
                break
            failures = 0 if online_for >= STABLE_SESSION_S else failures + 1
            delay = backoff_delay(self.config.backoff, max(failures, 1), self._rng.random())
            if self._released is not None:  # the gateway drains: go at once, or after Hold-Off
                delay, alternative = self._released
                self._released = None
                failures = 0
                if alternative is not None:
                    self.target = alternative
            self._set_state(DeviceState.BACKOFF)
            self._log.debug("%s: reconnecting in %.2f s", self.device_id, delay)
            try:
                await self._unless_stopped(asyncio.sleep(delay))
            except _Stopped:
                break
        self._set_state(DeviceState.STOPPING)

    async def _connection_lifetime(self) -> float:
        """One connection from connect to loss or stop; returns how long it was online (s)."""
        assert self._endpoint is not None
        gw = self.target
        conn: SimConnection | None = None
        try:
            async with self._connect_slot():
                self._set_state(DeviceState.CONNECTING)
                try:
                    conn = await self._unless_stopped(
                        self._endpoint.transport.connect(
                            gw.host, gw.port, self.config.connect_timeout
                        )
                    )
                except SimError:
                    self.stats.bump("connect_failures")
                    raise
                self.connection = conn
                self.stats.bump("connects")
                self.stats.set_gauges(connected=True)
                self._log.debug("%s: connected to %s", self.device_id, gw.uri)
                await self._unless_stopped(self._handshake(conn))
            self._set_state(DeviceState.ONLINE)
            self.stats.set_gauges(signed_in=True)
            loop = asyncio.get_running_loop()
            since = loop.time()
            await self._serve(conn)
            return loop.time() - since
        finally:
            if conn is not None:
                conn.close()
                self.stats.bump("disconnects")
                if conn.released:
                    self._released = (float(conn.hold_off or 0), self._alternative(conn))
            self.connection = None
            self.stats.set_gauges(connected=False, signed_in=False)

    def _alternative(self, conn: SimConnection) -> GatewayAddress | None:
        """The Alternative-Address of the gateway's Release, if it names a gateway of the same
        scheme (the device's TLS context goes with the scheme)."""
        if conn.released_to is None:
            return None
        try:
            address = parse_gateway_uri(conn.released_to)
        except SimConfigError as e:
            self._log.info("%s: ignoring the Release's alternative address: %s", self.device_id, e)
            return None
        if address.scheme != self.target.scheme:
            self._log.info(
                "%s: ignoring the Release's alternative address %s: not %s",
                self.device_id,
                conn.released_to,
                self.target.scheme,
            )
            return None
        return address

    @contextlib.asynccontextmanager
    async def _connect_slot(self) -> AsyncIterator[None]:
        if self._limiter is None:
            yield
            return
        await self._unless_stopped(self._limiter.acquire())
        try:
            yield
        finally:
            self._limiter.release()

    async def _unless_stopped(self, coro: Coroutine[Any, Any, T]) -> T:
        """Await ``coro`` unless :meth:`stop` is called first (then cancel it, raise _Stopped)."""
        if self._stopping.is_set():
            coro.close()
            raise _Stopped
        task = asyncio.create_task(coro, name=f"sim-step {self.device_id}")
        stopper = asyncio.create_task(self._stopping.wait(), name=f"sim-stop {self.device_id}")
        try:
            done, _ = await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            task.cancel()
            raise
        finally:
            stopper.cancel()
        if task in done:
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, SimError):
            await task
        raise _Stopped

    # --- OCF exchanges ------------------------------------------------------------------------

    async def _handshake(self, conn: SimConnection) -> None:
        if self.registration is not None and self._needs_refresh:
            try:
                await self._refresh(conn)
            except SimProtocolError as e:
                self._log.info("%s: refresh refused (%s), signing up again", self.device_id, e)
                self.registration = None
        if self.registration is None:
            await self._sign_up(conn)
        try:
            await self._sign_in(conn)
        except SimUnauthorizedError:
            self._needs_refresh = True
            raise
        if not (self.config.reference_stack and self.published):
            await self._publish(conn)

    async def _sign_up(self, conn: SimConnection) -> None:
        self._set_state(DeviceState.SIGNING_UP)
        token = await self._sign_up_token()
        body = ocf.sign_up_body(self.device_id, token, self.config.auth_provider)
        value = await self._post(conn, "sign-up", ocf.ACCOUNT, body)
        self.registration = ocf.parse_sign_up(value, asyncio.get_running_loop().time())
        self.published = False
        self._needs_refresh = False
        self.stats.bump("sign_ups")
        self._log.debug("%s: signed up as uid %s", self.device_id, self.registration.uid)

    async def _sign_up_token(self) -> str:
        token = self.config.token
        if isinstance(token, str):
            return token
        try:
            minted = token(self.device_id, self.config.owner)
            value = minted if isinstance(minted, str) else await minted
        except Exception as e:
            raise SimError(f"token factory failed: {e!r}") from e
        if not isinstance(value, str) or not value:
            raise SimError("token factory returned no token")
        return value

    async def _sign_in(self, conn: SimConnection) -> None:
        assert self.registration is not None
        self._set_state(DeviceState.SIGNING_IN)
        reg = self.registration
        body = ocf.session_body(self.device_id, reg.uid, reg.access_token, login=True)
        value = await self._post(conn, "sign-in", ocf.SESSION, body)
        self._session_expires_in = ocf.parse_sign_in(value)
        self._session_started = asyncio.get_running_loop().time()
        self.stats.bump("sign_ins")
        self._log.debug("%s: signed in", self.device_id)

    async def _publish(self, conn: SimConnection) -> None:
        self._set_state(DeviceState.PUBLISHING)
        body = ocf.publish_body(self.device_id, self.model.publish_links())
        value = await self._post(conn, "publish", ocf.RD, body, query=(ocf.RD_PUBLISH_QUERY,))
        ocf.parse_publish(value)
        self.published = True
        self.stats.bump("publishes")
        self._log.debug("%s: published %d links", self.device_id, len(body["links"]))

    async def _refresh(self, conn: SimConnection) -> None:
        assert self.registration is not None
        reg = self.registration
        body = ocf.refresh_body(self.device_id, reg.uid, reg.refresh_token)
        value = await self._post(conn, "token refresh", ocf.TOKEN_REFRESH, body)
        tokens = ocf.parse_refresh(value)
        self.registration = reg.refreshed(tokens, asyncio.get_running_loop().time())
        self._needs_refresh = False
        self.stats.bump("token_refreshes")
        self._log.debug("%s: token refreshed", self.device_id)

    async def _sign_out(self, conn: SimConnection) -> None:
        if self.registration is None:
            return
        reg = self.registration
        body = ocf.session_body(self.device_id, reg.uid, reg.access_token, login=False)
        await self._post(conn, "sign-out", ocf.SESSION, body)
        self.stats.bump("sign_outs")
        self._log.debug("%s: signed out", self.device_id)

    async def _post(
        self,
        conn: SimConnection,
        operation: str,
        path: str,
        body: dict[str, Any],
        *,
        query: tuple[str, ...] = (),
    ) -> Any:
        assert self._endpoint is not None
        cf = self.config.content_format
        reply = await self._endpoint.request(
            conn,
            "POST",
            ocf.uri_path(path),
            query=query,
            payload=codecs.encode(body, cf),
            content_format=cf,
            timeout=self.config.request_timeout,
        )
        if reply.code in ("4.01", "4.03"):
            raise SimUnauthorizedError(operation, f"refused: {_describe(reply)}", code=reply.code)
        if reply.code != "2.04":
            raise SimProtocolError(
                operation, f"expected 2.04, got {_describe(reply)}", code=reply.code
            )
        try:
            return codecs.decode(reply.payload, reply.content_format or cf)
        except ProtoError as e:
            raise SimProtocolError(operation, f"undecodable reply: {e}", code=reply.code) from e

    # --- online -------------------------------------------------------------------------------

    async def _serve(self, conn: SimConnection) -> None:
        """Online until the connection goes, a ping or refresh fails, or :meth:`stop`."""
        waits: dict[asyncio.Task[Any], str] = {
            asyncio.create_task(conn.wait_closed(), name="closed"): "closed",
            asyncio.create_task(self._stopping.wait(), name="stop"): "stop",
        }
        if self.config.ping_interval is not None:
            waits[asyncio.create_task(self._ping_loop(conn), name="ping")] = "ping"
        waits[asyncio.create_task(self._refresh_loop(conn), name="refresh")] = "refresh"
        try:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in waits:
                t.cancel()
            await asyncio.gather(*waits, return_exceptions=True)
        reasons = {waits[t] for t in done}
        if "stop" in reasons and conn.is_open:
            self._set_state(DeviceState.STOPPING)
            if self._sign_out_on_stop:
                try:
                    await self._sign_out(conn)
                except SimError as e:
                    self._log.info("%s: sign-out failed: %s", self.device_id, e)
                    self.stats.record_error(e)
            conn.close(release=True)
            return
        for t in done:
            if waits[t] in ("ping", "refresh") and not t.cancelled() and t.exception() is not None:
                exc = t.exception()
                assert exc is not None
                if isinstance(exc, SimError | ProtoError):
                    raise exc
                raise SimError(f"{waits[t]} failed: {exc!r}") from exc
        self._log.debug("%s: connection lost", self.device_id)

    async def _ping_loop(self, conn: SimConnection) -> None:
        assert self.config.ping_interval is not None
        while True:
            await asyncio.sleep(self.config.ping_interval)
            if not await conn.ping(self.config.pong_timeout):
                conn.drop("no Pong")
                raise SimTimeoutError(f"no Pong within {self.config.pong_timeout} s")

    def _refresh_due(self) -> float | None:
        """Loop time at which to refresh the token, ``None`` when nothing expires."""
        due: list[float] = []
        if self.registration is not None:
            at = self.registration.refresh_at(self.config.refresh_fraction)
            if at is not None:
                due.append(at)
        if self._session_expires_in > 0:
            due.append(
                self._session_started + self._session_expires_in * self.config.refresh_fraction
            )
        return min(due) if due else None

    async def _refresh_loop(self, conn: SimConnection) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = self._refresh_due()
            if due is None:
                await asyncio.Event().wait()  # never expires: wait to be cancelled
                return
            await asyncio.sleep(max(due - loop.time(), MIN_REFRESH_DELAY))
            try:
                await self._refresh(conn)
            except SimUnauthorizedError:
                self._needs_refresh = False
                self.registration = None  # refresh token refused: sign up on the next connection
                conn.close()
                raise
            try:
                await self._sign_in(conn)
            except SimUnauthorizedError:
                self._needs_refresh = True
                raise
            self._set_state(DeviceState.ONLINE)

    # --- value changes ------------------------------------------------------------------------

    async def _change_loop(self) -> None:
        loop = asyncio.get_running_loop()
        interval = 1.0 / self.config.rate
        next_at = loop.time() + self._rng.random() * interval  # spread a fleet's phases
        while True:
            delay = next_at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            self.change()
            next_at += interval
            if loop.time() - next_at > 1.0:
                next_at = loop.time()  # more than a second behind: skip, do not burst


def _describe(reply: Reply) -> str:
    text = ""
    if reply.payload and reply.content_format in (None, ContentFormat.TEXT):
        text = reply.payload[:200].decode("utf-8", "replace")
    return f"{reply.code} {text}".strip()

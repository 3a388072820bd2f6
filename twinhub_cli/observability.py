"""Operations endpoints of the gateway and twin processes: ``/metrics``, ``/healthz``, ``/readyz``.

:class:`ObservabilityServer` serves them over HTTP from threads of its own, so that a scrape
neither waits for nor adds work to the event loop, and so that ``/healthz`` can still answer
(503) when the loop is stuck. The loop and those threads share only plain values:

* :class:`Heartbeat` -- a loop task stamps ``time.monotonic()`` every second; ``/healthz`` is 200
  while the last stamp is recent (the loop runs callbacks), 503 once it is ``stall_after`` old
  or when a vital part of the process ended (the twin's projector).
* :class:`Prober` -- a loop task runs the readiness checks (NATS connected, JetStream answers,
  MongoDB answers, the projector runs) every ``probe_interval`` with a timeout and publishes a
  frozen :class:`ProbeResult`; ``/readyz`` is 200 while the latest result is fresh and all ok.
  The JetStream check (:class:`LogHead`) reads the log's last position, which the twin's lag
  metric uses: the scrape thread never calls asyncio code.
* The collectors (:class:`GatewayCollector`, :class:`TwinCollector`) read counters the services
  already keep (``Gateway.stats``, ``TwinProjector.stats``) at scrape time: nothing is added to
  the gateway's per-notification path. Reading an int attribute or ``len()`` of a dict from
  another thread is atomic under the GIL; a scrape may see one counter of a batch moved and the
  next not yet, never a torn value.

Process metrics (``process_*``: RSS, CPU, open file descriptors) and ``python_*`` come from
prometheus-client's default collectors.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import socketserver
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Self

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder

from eventstore.ports import ALL_EVENTS, EventStore
from proto import api
from twin.api import TwinApi

if TYPE_CHECKING:
    from bus.adapters.nats_callout import CalloutService
    from gateway.service import Gateway
    from twin.ports import TwinStore
    from twin.reaper import GatewayReaper
    from twin.service import TwinProjector
    from twin.sweeper import ExpirySweeper

__all__ = [
    "ApiMetrics",
    "Check",
    "CheckFn",
    "CountingTwinApi",
    "GatewayCollector",
    "Heartbeat",
    "LogHead",
    "ObservabilityConfig",
    "ObservabilityServer",
    "ProbeResult",
    "Prober",
    "TwinCollector",
    "liveness",
    "projector_lag",
    "readiness",
    "standard_registry",
]

log = logging.getLogger(__name__)

JSON: Final = "application/json"
CheckFn = Callable[[], Awaitable[str]]  # the detail when ok; raises when not


@dataclass(frozen=True, slots=True)
class ObservabilityConfig:
    """Timings in seconds. ``stall_after``: ``/healthz`` fails once the loop has not run the
    heartbeat for that long. ``/readyz`` fails once the latest probe is older than
    ``probe_interval + probe_timeout + stall_after`` (the loop stopped probing)."""

    heartbeat_interval: float = 1.0
    stall_after: float = 10.0
    probe_interval: float = 2.0
    probe_timeout: float = 2.0

    def __post_init__(self) -> None:
        if not 0 < self.heartbeat_interval < self.stall_after:
            raise ValueError("need 0 < heartbeat_interval < stall_after")
        if not (self.probe_interval > 0 and self.probe_timeout > 0):
            raise ValueError("probe_interval and probe_timeout must be > 0")

    @property
    def probe_max_age(self) -> float:
        return self.probe_interval + self.probe_timeout + self.stall_after


# -- liveness ----------------------------------------------------------------------------------


class Heartbeat:
    """The event loop's pulse: :meth:`run` (a loop task) stamps :attr:`last` every ``interval``
    and records how late the stamp came (:attr:`lag`, the loop's scheduling delay).

    ``vital``: conditions of the process itself (not of the servers it depends on) without which
    it is broken for good, e.g. the projector's loop ended; evaluated on the loop at each beat,
    the names of those that fail kept in :attr:`failed` for ``/healthz``."""

    def __init__(
        self,
        interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        vital: Mapping[str, Callable[[], bool]] | None = None,
    ) -> None:
        self.interval = interval
        self._clock = clock
        self._vital = dict(vital or {})
        self.last = clock()
        self.lag = 0.0
        self.failed: tuple[str, ...] = ()

    def beat(self, now: float, expected: float) -> None:
        self.failed = tuple(name for name, ok in self._vital.items() if not ok())
        self.lag = max(0.0, now - expected)
        self.last = now

    async def run(self) -> None:
        self.beat(self._clock(), self._clock())
        while True:
            expected = self._clock() + self.interval
            await asyncio.sleep(self.interval)
            self.beat(self._clock(), expected)


def liveness(
    last_beat: float, now: float, stall_after: float, failed: Sequence[str] = ()
) -> tuple[int, dict[str, Any]]:
    """``/healthz``: 200 while the loop's last heartbeat is younger than ``stall_after`` and no
    vital condition failed."""
    age = max(0.0, now - last_beat)
    if age >= stall_after:
        return 503, {
            "status": "stalled",
            "heartbeat_age_s": round(age, 3),
            "detail": f"the event loop has not run for {age:.1f} s",
        }
    if failed:
        return 503, {
            "status": "failed",
            "heartbeat_age_s": round(age, 3),
            "detail": f"failed: {', '.join(failed)}",
        }
    return 200, {"status": "ok", "heartbeat_age_s": round(age, 3)}


# -- readiness ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    ok: bool
    detail: str = ""


@dataclass(frozen=True, slots=True)
class ProbeResult:
    at: float  # monotonic time the probe ended
    checks: tuple[Check, ...] = ()

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)


def readiness(result: ProbeResult | None, now: float, max_age: float) -> tuple[int, dict[str, Any]]:
    """``/readyz``: 200 when the latest probe is fresh and every check passed."""
    if result is None:
        return 503, {"status": "starting", "checks": {}}
    checks = {c.name: ("ok" if c.ok else f"failed: {c.detail}") for c in result.checks}
    age = max(0.0, now - result.at)
    if age > max_age:
        return 503, {
            "status": "stale",
            "detail": f"no readiness probe for {age:.1f} s (event loop stalled?)",
            "checks": checks,
        }
    if not result.ok:
        return 503, {"status": "not ready", "checks": checks}
    return 200, {"status": "ready", "checks": checks}


def _why(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


class Prober:
    """Runs named readiness checks concurrently, each bounded by ``timeout``; the latest outcome
    is :attr:`result` (None before the first probe ended)."""

    def __init__(
        self,
        checks: Mapping[str, CheckFn],
        *,
        interval: float = 2.0,
        timeout: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._checks = dict(checks)
        self.interval = interval
        self.timeout = timeout
        self._clock = clock
        self.result: ProbeResult | None = None

    async def _one(self, name: str, fn: CheckFn) -> Check:
        try:
            async with asyncio.timeout(self.timeout):
                return Check(name, True, await fn())
        except TimeoutError:
            return Check(name, False, f"no answer within {self.timeout:g} s")
        except Exception as exc:  # a failed check is the answer, whatever raised it
            return Check(name, False, _why(exc))

    async def probe(self) -> ProbeResult:
        checks = await asyncio.gather(*(self._one(n, f) for n, f in self._checks.items()))
        result = ProbeResult(self._clock(), tuple(checks))
        was_ok = self.result.ok if self.result is not None else None
        if not result.ok and was_ok is not False:
            failed = ", ".join(f"{c.name} ({c.detail})" for c in result.checks if not c.ok)
            log.warning("not ready: %s", failed)
        elif result.ok and was_ok is False:
            log.info("ready again")
        self.result = result
        return result

    async def run(self) -> None:
        while True:
            await self.probe()
            await asyncio.sleep(self.interval)


class LogHead:
    """A readiness check that JetStream answers; it keeps the log's last position in ``scope``
    (:attr:`position`, None until read) for the lag metric."""

    def __init__(self, store: EventStore, scope: str = ALL_EVENTS) -> None:
        self._store = store
        self.scope = scope
        self.position: int | None = None

    async def __call__(self) -> str:
        self.position = await self._store.last_position(self.scope)
        return f"last position {self.position}"


# -- the HTTP server ---------------------------------------------------------------------------


def standard_registry() -> CollectorRegistry:
    """A registry with prometheus-client's process, platform and GC collectors."""
    registry = CollectorRegistry()
    for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        registry.register(collector)
    return registry


class _Handler(BaseHTTPRequestHandler):
    server: _HttpServer
    timeout = 10  # seconds a client may take to send its request
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        owner = self.server.owner
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
            try:
                body = encoder(owner.registry)
            except Exception:
                log.exception("collecting metrics failed")
                self._send(500, "text/plain; charset=utf-8", b"collecting metrics failed\n")
                return
            self._send(200, content_type, body)
            return
        now = time.monotonic()
        if path == "/healthz":
            hb = owner.heartbeat
            status, doc = liveness(hb.last, now, owner.config.stall_after, hb.failed)
        elif path == "/readyz":
            status, doc = readiness(owner.prober.result, now, owner.config.probe_max_age)
        else:
            status, doc = 404, {"status": "not found", "paths": ["/metrics", "/healthz", "/readyz"]}
        self._send(status, JSON, json.dumps(doc, sort_keys=True).encode() + b"\n")

    def _send(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)


class _HttpServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    # TCPServer, not http.server.HTTPServer: that one resolves its own FQDN when it binds
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, bind: tuple[str, int], owner: ObservabilityServer) -> None:
        family, *_, address = socket.getaddrinfo(
            *bind, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        self.address_family = family
        self.owner = owner
        super().__init__((str(address[0]), int(address[1])), _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # a scraper that hung up early: not worth socketserver's traceback on stderr
        log.debug("operations request from %s failed", client_address, exc_info=True)


class ObservabilityServer:
    """``/metrics`` (of ``registry``), ``/healthz`` and ``/readyz`` on ``bind``; while open it runs
    the heartbeat and the prober as tasks of the current loop. An async context manager."""

    def __init__(
        self,
        name: str,
        bind: tuple[str, int],
        registry: CollectorRegistry,
        prober: Prober,
        heartbeat: Heartbeat,
        config: ObservabilityConfig | None = None,
    ) -> None:
        self.name = name
        self.bind = bind
        self.registry = registry
        self.prober = prober
        self.heartbeat = heartbeat
        self.config = config or ObservabilityConfig()
        self._server: _HttpServer | None = None
        self._thread: threading.Thread | None = None
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def address(self) -> tuple[str, int]:
        if self._server is None:
            raise RuntimeError("not serving")
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    async def __aenter__(self) -> Self:
        try:
            self._server = _HttpServer(self.bind, self)
        except OSError as exc:
            raise OSError(exc.errno, f"{self.name} metrics listener {self.bind}: {exc}") from exc
        self._tasks = [
            asyncio.create_task(self.heartbeat.run(), name=f"{self.name}-heartbeat"),
            asyncio.create_task(self.prober.run(), name=f"{self.name}-readiness-probe"),
        ]
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name=f"{self.name}-metrics-http",
            daemon=True,
        )
        self._thread.start()
        log.info("%s: /metrics /healthz /readyz on %s", self.name, self.url)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        server, self._server = self._server, None
        if server is not None:
            await asyncio.to_thread(server.shutdown)  # returns once serve_forever returned
            server.server_close()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []


# -- the gateway's metrics ---------------------------------------------------------------------


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _checks(prefix: str, prober: Prober) -> Iterator[Metric]:
    result = prober.result
    if result is None:
        return
    g = GaugeMetricFamily(
        f"{prefix}_check_ok",
        "1 when the readiness check passed at the latest probe",
        labels=["check"],
    )
    for c in result.checks:
        g.add_metric([c.name], 1.0 if c.ok else 0.0)
    yield g


class GatewayCollector:
    """``twinhub_gateway_*``, read from :class:`gateway.service.Gateway` at scrape time."""

    def __init__(self, gateway: Gateway, heartbeat: Heartbeat, prober: Prober) -> None:
        self._gw = gateway
        self._heartbeat = heartbeat
        self._prober = prober

    def describe(self) -> list[Metric]:
        return []  # nothing to check for duplicates; never collect at registration

    def collect(self) -> Iterator[Metric]:
        p = "twinhub_gateway"
        gw, st = self._gw, self._gw.stats
        info = GaugeMetricFamily(f"{p}_info", "the gateway instance", labels=["gateway_id"])
        info.add_metric([gw.config.gateway_id], 1.0)
        yield info
        yield _counter(f"{p}_connections_total", "CoAP connections accepted", st.connections)
        yield _counter(f"{p}_sign_ins_total", "successful device sign-ins", st.signed_in)
        yield _counter(f"{p}_requests_total", "CoAP requests from devices", st.requests)
        yield _counter(
            f"{p}_notifications_total",
            "observe notifications received from devices",
            st.notifications,
        )
        yield _counter(
            f"{p}_overflow_closes_total",
            "connections closed because the device's event buffer overflowed",
            st.overflow_closes,
        )
        yield _counter(
            f"{p}_refused_total",
            "TLS connections refused: client certificate not accepted by the auth mode",
            st.refused,
        )
        yield _gauge(f"{p}_connections", "open CoAP connections", len(gw.conns))
        yield _gauge(f"{p}_devices_online", "signed-in devices", len(gw.devices))
        yield _gauge(
            f"{p}_event_loop_lag_seconds",
            "how late the event loop ran the last heartbeat",
            self._heartbeat.lag,
        )
        yield from _checks(p, self._prober)


# -- the auth callout's metrics ----------------------------------------------------------------


class CalloutCollector:
    """``twinhub_callout_*``, read from :class:`bus.adapters.nats_callout.CalloutService`."""

    def __init__(self, callout: CalloutService, heartbeat: Heartbeat, prober: Prober) -> None:
        self._callout = callout
        self._heartbeat = heartbeat
        self._prober = prober

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        p = "twinhub_callout"
        st = self._callout.stats
        yield _counter(f"{p}_requests_total", "authorization requests from NATS", st.requests)
        yield _counter(f"{p}_granted_total", "applications admitted", st.granted)
        yield _counter(f"{p}_denied_total", "connections refused (token missing or bad)", st.denied)
        yield _counter(
            f"{p}_malformed_total", "authorization requests that could not be read", st.malformed
        )
        yield _gauge(
            f"{p}_ready", "1 while subscribed to authorization requests", self._callout.ready
        )
        yield _gauge(
            f"{p}_last_latency_seconds", "time to answer the last request", st.last_latency
        )
        yield _gauge(
            f"{p}_event_loop_lag_seconds",
            "how late the event loop ran the last heartbeat",
            self._heartbeat.lag,
        )
        yield from _checks(p, self._prober)


# -- the twin's metrics ------------------------------------------------------------------------


@dataclass
class ApiMetrics:
    """What the command API answered (by operation and outcome) and what the expiry sweeper
    expired. :meth:`record` runs on the loop; :meth:`requests` is read by scrapes."""

    _requests: dict[tuple[str, str], int] = field(default_factory=dict)
    sweeper: ExpirySweeper | None = None  # set by services.run_api
    reaper: GatewayReaper | None = None  # set by services.run_reaper

    def record(self, op: str, outcome: str) -> None:
        # the op is the request subject's last token, chosen by the client: bounded here
        key = (op if op in api.REQUEST_TYPES else "unknown", outcome)
        self._requests[key] = self._requests.get(key, 0) + 1

    def requests(self) -> dict[tuple[str, str], int]:
        return self._requests.copy()  # one C call: atomic with respect to record()


def _reaper_metrics(p: str, reaper: GatewayReaper) -> Iterator[Metric]:
    st = reaper.stats
    instances = GaugeMetricFamily(
        f"{p}_gateway_instances",
        "gateway instances in the lease stream by lease state (held: alive), last poll",
        labels=["state"],
    )
    for state, n in sorted(st.instances.items()):
        instances.add_metric([state.value], n)
    yield instances
    yield _counter(
        f"{p}_gateways_lost_total", "gateway instances this reaper declared lost", st.lost_total
    )
    yield _counter(
        f"{p}_gateway_lost_offline_total",
        "devices marked offline because their gateway instance was lost",
        st.devices_offline_total,
    )
    yield _counter(
        f"{p}_lease_poll_failures_total", "failed reads of the lease stream", st.poll_failures_total
    )


class CountingTwinApi(TwinApi):
    """:class:`TwinApi` that records each request's operation and outcome in ``metrics``."""

    def __init__(self, *args: Any, metrics: ApiMetrics, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.metrics = metrics

    async def handle(self, op: str, body: bytes, token: str | None) -> api.Reply:
        try:
            reply = await super().handle(op, body, token)
        except asyncio.CancelledError:  # the server's request timeout, or shutting down
            self.metrics.record(op, "cancelled")
            raise
        except Exception:
            self.metrics.record(op, "internal")
            raise
        self.metrics.record(op, "ok" if reply.error is None else reply.error.code)
        return reply


def projector_lag(head: int | None, position: int) -> int | None:
    """Log positions the projector is behind the head (None while the head is unknown)."""
    return None if head is None else max(0, head - position)


class TwinCollector:
    """``twinhub_twin_*``, read from the projector, the probe's log head and the API's
    :class:`ApiMetrics` at scrape time."""

    def __init__(
        self,
        projector: TwinProjector,
        head: LogHead,
        api_metrics: ApiMetrics | None,
        heartbeat: Heartbeat,
        prober: Prober,
        running: Callable[[], bool],
        store: TwinStore | None = None,
    ) -> None:
        self._store = store
        self._projector = projector
        self._head = head
        self._api = api_metrics
        self._heartbeat = heartbeat
        self._prober = prober
        self._running = running

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        p = "twinhub_twin"
        st = self._projector.stats
        counters: Sequence[tuple[str, str, int]] = (
            ("events_applied", "events that moved a twin forward, written", st.events_applied),
            (
                "duplicates_skipped",
                "events a twin already reflected (redeliveries, replays) or refused as stale",
                st.duplicates_skipped,
            ),
            ("unknown_events", "events of a type this version does not know", st.unknown_events),
            ("undecodable_events", "log messages that are not events", st.undecodable_events),
            ("batches", "batches written", st.batches),
            ("store_failures", "twin store failures (the batch is retried)", st.store_failures),
            ("log_failures", "event log failures of the projector (retried)", st.log_failures),
            ("commands_ended", "commands whose end the projector folded", st.commands_ended),
        )
        for name, doc, value in counters:
            yield _counter(f"{p}_{name}_total", doc, value)
        if self._store is not None:
            writes = self._store.write_counts()
            family = CounterMetricFamily(
                f"{p}_store_writes_total",
                "write commands sent to the twin store, by collection",
                labels=["collection"],
            )
            for collection in ("twins", "commands", "ended", "checkpoints"):
                family.add_metric([collection], writes.get(collection, 0))
            yield family
            total = sum(writes.values())
            if st.events_applied:
                yield _gauge(
                    f"{p}_store_writes_per_event",
                    "twin store write commands per event applied, since the start",
                    total / st.events_applied,
                )
        yield _gauge(
            f"{p}_projector_position", "highest log position written to the twins", st.position
        )
        head = self._head.position
        if head is not None:
            yield _gauge(f"{p}_log_head_position", "the log's last position (probed)", head)
        lag = projector_lag(head, st.position)
        if lag is not None:
            yield _gauge(f"{p}_projector_lag", "log positions not yet in the twins", lag)
        yield _gauge(
            f"{p}_projector_running", "1 while the projector's loop runs", float(self._running())
        )
        if self._api is not None:
            requests = CounterMetricFamily(
                f"{p}_api_requests_total",
                "command API requests answered, by operation and outcome (ok or the error code)",
                labels=["op", "outcome"],
            )
            for (op, outcome), n in sorted(self._api.requests().items()):
                requests.add_metric([op, outcome], n)
            yield requests
            sweeper = self._api.sweeper
            if sweeper is not None:
                yield _counter(
                    f"{p}_commands_expired_total",
                    "commands the expiry sweeper ended",
                    sweeper.expired_total,
                )
            if self._api.reaper is not None:
                yield from _reaper_metrics(p, self._api.reaper)
        yield _gauge(
            f"{p}_event_loop_lag_seconds",
            "how late the event loop ran the last heartbeat",
            self._heartbeat.lag,
        )
        yield from _checks(p, self._prober)

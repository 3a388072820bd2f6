"""A fleet of simulated devices against one gateway: start, watch, stop, summarise.

:func:`run_fleet` starts ``devices`` :class:`~devicesim.device.SimDevice` s at once, lets at most
``connect_concurrency`` of them connect and sign in at a time (first connections and reconnects
alike, so a gateway restart is not met by a thundering herd), shows live counters while it runs
(a rich live table on a terminal, a log line every ``log_interval`` seconds otherwise), and stops
on SIGINT/SIGTERM, after ``duration`` seconds, or when ``stop`` is set. Devices sign out on the
way down. It returns a :class:`~devicesim.stats.FleetSummary`; ``summary.to_dict()`` is the JSON
report.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from devicesim.backoff import BackoffPolicy
from devicesim.clock import EpochClock
from devicesim.config import (
    BatchSupport,
    DeviceConfig,
    TlsOptions,
    TokenFactory,
    device_id_for,
    parse_gateway_uri,
)
from devicesim.device import SimDevice
from devicesim.errors import SimConfigError
from devicesim.stats import FleetSnapshot, FleetSummary
from proto.codecs import ContentFormat

log = logging.getLogger("devicesim.fleet")

DEFAULT_CONNECT_CONCURRENCY = 64


async def run_fleet(
    uri: str,
    *,
    devices: int = 1,
    resources: int = 1,
    rate: float = 0.0,
    tls: TlsOptions | None = None,
    force_tls: bool = False,
    duration: float | None = None,
    token: str | TokenFactory | None = None,
    owner: str | None = None,
    progress: bool = False,
    reference_stack: bool = False,
    batch: BatchSupport | bool | str = BatchSupport.OBSERVE,
    device_prefix: str = "sim",
    connect_concurrency: int = DEFAULT_CONNECT_CONCURRENCY,
    content_format: int = ContentFormat.OCF_CBOR,
    ping_interval: float | None = 20.0,
    backoff: BackoffPolicy | None = None,
    stop: asyncio.Event | None = None,
    handle_signals: bool = True,
    seed: int | None = None,
    on_started: Callable[[Sequence[SimDevice]], None] | None = None,
    log_interval: float = 10.0,
) -> FleetSummary:
    """Run ``devices`` simulated devices against the gateway at ``uri`` until stopped.

    ``token`` is one sign-up token for every device, or a :class:`TokenFactory` called as
    ``factory(device_id, owner)`` whenever a device signs up. Device IDs are UUIDs derived from
    ``device_prefix`` and the index (stable across runs); names are ``<prefix>-<index>``.
    ``on_started`` receives the devices once they are started (tests and tools watch them).
    """
    if devices < 1:
        raise SimConfigError("devices must be >= 1")
    if connect_concurrency < 1:
        raise SimConfigError("connect_concurrency must be >= 1")
    if duration is not None and duration <= 0:
        raise SimConfigError("duration must be > 0")
    if token is None:
        raise SimConfigError("a sign-up token or token factory is needed")
    gateway = parse_gateway_uri(uri, tls=force_tls or tls is not None)
    ssl_context = (tls or TlsOptions()).ssl_context() if gateway.tls else None
    batch_support = BatchSupport.of(batch)
    rng = random.Random(seed)
    clock = EpochClock()
    limiter = asyncio.Semaphore(connect_concurrency)
    configs = [
        DeviceConfig(
            gateway=gateway,
            device_id=device_id_for(device_prefix, i),
            name=f"{device_prefix}-{i}",
            token=token,
            owner=owner,
            resources=resources,
            rate=rate,
            batch=batch_support,
            reference_stack=reference_stack,
            content_format=content_format,
            ping_interval=ping_interval,
            backoff=backoff or BackoffPolicy(),
            tls=tls,
        )
        for i in range(devices)
    ]
    fleet = [
        SimDevice(
            c,
            ssl_context=ssl_context,
            connect_limiter=limiter,
            clock=clock,
            rng=random.Random(rng.random()),
        )
        for c in configs
    ]
    stop = stop or asyncio.Event()
    stopped_by = "stop"
    started = time.monotonic()
    signals = _SignalStop(stop)
    async with contextlib.AsyncExitStack() as stack:
        if handle_signals:
            stack.enter_context(signals)
        if progress:
            await stack.enter_async_context(_progress(fleet, gateway.uri, log_interval))
        try:
            for d in fleet:
                await d.start()
            log.info("started %d devices against %s", devices, gateway.uri)
            if on_started is not None:
                on_started(fleet)
            try:
                async with asyncio.timeout(duration):
                    await stop.wait()
                stopped_by = "signal" if signals.fired else "stop"
            except TimeoutError:
                stopped_by = "duration"
        finally:
            at_stop = FleetSnapshot.of(d.stats for d in fleet)
            results = await asyncio.gather(*(d.stop() for d in fleet), return_exceptions=True)
            for d, r in zip(fleet, results, strict=True):
                if isinstance(r, Exception):
                    log.error("%s: stop failed: %r", d.device_id, r)
    elapsed = time.monotonic() - started
    return FleetSummary(
        gateway=gateway.uri,
        devices=devices,
        resources=resources,
        rate_hz=rate,
        reference_stack=reference_stack,
        batch=str(batch_support),
        duration_s=elapsed,
        stopped_by=stopped_by,
        snapshot=FleetSnapshot.of(d.stats for d in fleet),
        connected_at_stop=at_stop.connected,
        signed_in_at_stop=at_stop.signed_in,
    )


class _SignalStop(contextlib.AbstractContextManager[None]):
    """The first SIGINT/SIGTERM sets the stop event (devices sign out); the handlers are then
    removed, so a second Ctrl-C interrupts at once."""

    def __init__(self, stop: asyncio.Event) -> None:
        self._stop = stop
        self._installed: list[signal.Signals] = []
        self.fired = False

    def _fire(self) -> None:
        self.fired = True
        self._stop.set()
        self._remove()

    def __enter__(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(signum, self._fire)
            except (NotImplementedError, RuntimeError, ValueError):
                continue  # not the main thread, or no signals here
            self._installed.append(signum)

    def __exit__(self, *exc: object) -> None:
        self._remove()

    def _remove(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in self._installed:
            loop.remove_signal_handler(signum)  # SIGINT goes back to KeyboardInterrupt
        self._installed.clear()


@contextlib.asynccontextmanager
async def _progress(
    fleet: Sequence[SimDevice], gateway: str, log_interval: float
) -> AsyncIterator[None]:
    from rich.console import Console

    console = Console(stderr=True)
    if console.is_terminal:
        task = asyncio.create_task(_live_table(console, fleet, gateway), name="sim-progress")
    else:
        task = asyncio.create_task(_log_lines(fleet, log_interval), name="sim-progress")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def render_table(snap: FleetSnapshot, gateway: str, elapsed: float) -> Any:
    from rich.table import Table

    t = snap.totals
    table = Table(title=f"twinhub sim → {gateway}  ({elapsed:,.0f} s)", expand=False)
    for col in ("devices", "conn", "online", "notifs", "notifs/s", "changes", "reconn", "errors"):
        table.add_column(col, justify="right")
    table.add_row(
        f"{snap.devices:,}",
        f"{snap.connected:,}",
        f"{snap.signed_in:,}",
        f"{t['notifications_sent']:,}",
        f"{t['notifications_sent'] / max(elapsed, 1e-9):,.1f}",
        f"{t['changes']:,}",
        f"{t['reconnects']:,}",
        f"{t['errors']:,}",
    )
    if snap.error_kinds:
        kind, n = next(iter(snap.error_kinds.items()))
        table.caption = f"most frequent error ({n} times): {kind}"
    return table


async def _live_table(console: Any, fleet: Sequence[SimDevice], gateway: str) -> None:
    from rich.live import Live

    started = time.monotonic()

    def draw() -> Any:
        return render_table(
            FleetSnapshot.of(d.stats for d in fleet), gateway, time.monotonic() - started
        )

    with Live(draw(), console=console, refresh_per_second=4, transient=False) as live:
        while True:
            await asyncio.sleep(0.25)  # a display refresh, not a synchronisation
            live.update(draw())


async def _log_lines(fleet: Sequence[SimDevice], interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        snap = FleetSnapshot.of(d.stats for d in fleet)
        t = snap.totals
        top = next(iter(snap.error_kinds), "")
        log.info(
            "devices=%d connected=%d signed_in=%d notifications=%d reconnects=%d errors=%d%s",
            snap.devices,
            snap.connected,
            snap.signed_in,
            t["notifications_sent"],
            t["reconnects"],
            t["errors"],
            f" (most frequent: {top})" if top else "",
        )

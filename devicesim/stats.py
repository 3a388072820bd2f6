"""Counters of simulated devices, their fleet-wide totals and the final summary.

Devices bump their own :class:`DeviceStats`; the fleet sums them when it draws the live table
and at the end. Every change wakes :meth:`Signal.wait_until` callers, so tests and tools wait for
a condition rather than sleep.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

Counter = Literal[
    "connects",
    "connect_failures",
    "reconnects",
    "disconnects",
    "sign_ups",
    "sign_ins",
    "sign_outs",
    "publishes",
    "token_refreshes",
    "changes",
    "notifications_sent",
    "responses_sent",
    "requests_received",
    "updates_applied",
    "pings_sent",
    "pongs_received",
    "releases_received",
    "errors",
]
COUNTERS: tuple[Counter, ...] = get_args(Counter)


class Signal:
    """A change notifier: :meth:`notify` wakes :meth:`wait_until` to re-check its predicate."""

    def __init__(self) -> None:
        self._waiters: list[asyncio.Future[None]] = []

    def notify(self) -> None:
        if self._waiters:
            waiters, self._waiters = self._waiters, []
            for w in waiters:
                if not w.done():
                    w.set_result(None)

    async def wait_until(self, predicate: Callable[[], bool], timeout: float) -> None:  # noqa: ASYNC109
        """Return once ``predicate()`` is true; :class:`TimeoutError` after ``timeout`` seconds."""
        async with asyncio.timeout(timeout):
            while not predicate():
                fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                self._waiters.append(fut)
                await fut


@dataclass(eq=False)
class DeviceStats:
    """Counters (only grow) and gauges (``connected``, ``signed_in``) of one device."""

    connects: int = 0
    connect_failures: int = 0
    reconnects: int = 0
    disconnects: int = 0
    sign_ups: int = 0
    sign_ins: int = 0
    sign_outs: int = 0
    publishes: int = 0
    token_refreshes: int = 0
    changes: int = 0
    notifications_sent: int = 0
    responses_sent: int = 0
    requests_received: int = 0
    updates_applied: int = 0
    pings_sent: int = 0
    pongs_received: int = 0
    releases_received: int = 0
    errors: int = 0
    connected: bool = False
    signed_in: bool = False
    last_error: str | None = None
    error_kinds: collections.Counter[str] = field(default_factory=collections.Counter)
    signal: Signal = field(default_factory=Signal, repr=False)

    def bump(self, counter: Counter, n: int = 1) -> None:
        setattr(self, counter, getattr(self, counter) + n)
        self.signal.notify()

    def set_gauges(self, *, connected: bool | None = None, signed_in: bool | None = None) -> None:
        if connected is not None:
            self.connected = connected
        if signed_in is not None:
            self.signed_in = signed_in
        self.signal.notify()

    def record_error(self, exc: BaseException) -> None:
        text = str(exc) or type(exc).__name__
        self.last_error = f"{type(exc).__name__}: {text}"
        self.error_kinds[_error_kind(exc)] += 1
        self.bump("errors")

    def counters(self) -> dict[str, int]:
        return {c: getattr(self, c) for c in COUNTERS}


def _error_kind(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    kind = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return kind[:120]


@dataclass(frozen=True, slots=True)
class FleetSnapshot:
    """Totals over a fleet at one moment."""

    devices: int
    connected: int
    signed_in: int
    totals: dict[str, int]
    error_kinds: dict[str, int]

    @classmethod
    def of(cls, stats: Iterable[DeviceStats]) -> FleetSnapshot:
        totals: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        kinds: collections.Counter[str] = collections.Counter()
        devices = connected = signed_in = 0
        for s in stats:
            devices += 1
            connected += s.connected
            signed_in += s.signed_in
            for c in COUNTERS:
                totals[c] += getattr(s, c)
            kinds.update(s.error_kinds)
        return cls(devices, connected, signed_in, dict(totals), dict(kinds.most_common(10)))


@dataclass(frozen=True, slots=True)
class FleetSummary:
    """The final report of :func:`devicesim.fleet.run_fleet` (``to_dict`` is its JSON)."""

    gateway: str
    devices: int
    resources: int
    rate_hz: float
    reference_stack: bool
    batch: str
    duration_s: float
    stopped_by: str
    snapshot: FleetSnapshot
    connected_at_stop: int
    signed_in_at_stop: int

    def to_dict(self) -> dict[str, Any]:
        t = self.snapshot.totals
        elapsed = max(self.duration_s, 1e-9)
        return {
            "gateway": self.gateway,
            "devices": self.devices,
            "resources_per_device": self.resources,
            "rate_hz_per_device": self.rate_hz,
            "reference_stack": self.reference_stack,
            "batch": self.batch,
            "duration_s": round(self.duration_s, 3),
            "stopped_by": self.stopped_by,
            "connected_at_stop": self.connected_at_stop,
            "signed_in_at_stop": self.signed_in_at_stop,
            "totals": dict(t),
            "notifications_per_s": round(t["notifications_sent"] / elapsed, 2),
            "changes_per_s": round(t["changes"] / elapsed, 2),
            "error_kinds": dict(self.snapshot.error_kinds),
        }

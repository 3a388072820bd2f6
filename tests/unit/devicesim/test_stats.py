from __future__ import annotations

import asyncio
import json

import pytest

from devicesim.stats import DeviceStats, FleetSnapshot, FleetSummary, Signal


async def test_wait_until_wakes_on_notify() -> None:
    s = DeviceStats()
    waiter = asyncio.create_task(s.signal.wait_until(lambda: s.pongs_received >= 2, 5))
    s.bump("pongs_received")
    await asyncio.sleep(0)  # let the waiter re-check: the condition is still false
    assert not waiter.done()
    s.bump("pongs_received")
    await waiter


async def test_wait_until_times_out() -> None:
    with pytest.raises(TimeoutError):
        await Signal().wait_until(lambda: False, 0.01)


async def test_wait_until_returns_at_once_when_true() -> None:
    await Signal().wait_until(lambda: True, 0)


def test_errors_are_counted_by_kind() -> None:
    s = DeviceStats()
    s.record_error(ConnectionError("refused\nmore"))
    s.record_error(ConnectionError("refused\nmore"))
    s.record_error(TimeoutError())
    assert s.errors == 3
    assert s.error_kinds == {"ConnectionError: refused": 2, "TimeoutError": 1}
    assert s.last_error == "TimeoutError: TimeoutError"


def test_fleet_snapshot_and_summary() -> None:
    a, b = DeviceStats(), DeviceStats()
    a.bump("notifications_sent", 10)
    b.bump("notifications_sent", 5)
    a.set_gauges(connected=True, signed_in=True)
    b.set_gauges(connected=True)
    b.record_error(OSError("x"))
    snap = FleetSnapshot.of([a, b])
    assert (snap.devices, snap.connected, snap.signed_in) == (2, 2, 1)
    assert snap.totals["notifications_sent"] == 15
    assert snap.error_kinds == {"OSError: x": 1}
    summary = FleetSummary(
        gateway="coap+tcp://gw:5683",
        devices=2,
        resources=1,
        rate_hz=1.0,
        reference_stack=False,
        batch="observe",
        duration_s=3.0,
        stopped_by="duration",
        snapshot=snap,
        connected_at_stop=2,
        signed_in_at_stop=1,
    )
    d = json.loads(json.dumps(summary.to_dict()))
    assert d["notifications_per_s"] == 5.0
    assert d["totals"]["errors"] == 1
    assert d["signed_in_at_stop"] == 1

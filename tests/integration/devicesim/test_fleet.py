"""run_fleet against the fake cloud: many devices, bounded connects, live counters, summary."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from collections.abc import Sequence

import pytest

from devicesim import BackoffPolicy, SimDevice, device_id_for, run_fleet
from devicesim.fleet import render_table
from devicesim.stats import DeviceStats, FleetSnapshot

from .fakecloud import FakeCloud

FAST = BackoffPolicy(initial=0.02, maximum=0.2, jitter=0.5)


def notifications(cloud: FakeCloud) -> int:
    return sum(len(o.notifications) for o in cloud.observations.values())


async def test_fleet_runs_until_stopped_and_summarises(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="devicesim.fleet")
    started: list[SimDevice] = []
    async with FakeCloud(auto_observe=True) as cloud:
        stop = asyncio.Event()

        async def stop_when_busy() -> None:
            await cloud.wait_until(
                lambda: (
                    sum(d.sign_ins for d in cloud.devices.values()) >= 3
                    and notifications(cloud) >= 12
                ),
                20,
            )
            stop.set()

        def on_started(devices: Sequence[SimDevice]) -> None:
            started.extend(devices)

        watcher = asyncio.create_task(stop_when_busy())
        summary = await run_fleet(
            cloud.uri,
            devices=3,
            resources=2,
            rate=50.0,
            token="fleet-token",
            owner="alice",
            stop=stop,
            duration=30,
            handle_signals=False,
            progress=True,  # not a terminal here: periodic log lines
            log_interval=0.01,
            connect_concurrency=1,
            backoff=FAST,
            ping_interval=None,
            device_prefix="fleet-test",
            seed=7,
            on_started=on_started,
        )
        await watcher

        report = summary.to_dict()
        json.dumps(report)  # it is JSON
        assert report["stopped_by"] == "stop"
        assert report["devices"] == 3
        assert report["signed_in_at_stop"] == 3
        totals = report["totals"]
        assert totals["sign_ups"] == 3
        assert totals["sign_ins"] == 3
        assert totals["sign_outs"] == 3
        assert totals["errors"] == 0
        assert totals["notifications_sent"] >= 12
        assert totals["changes"] >= totals["notifications_sent"] // 2
        assert report["notifications_per_s"] > 0
        ids = {device_id_for("fleet-test", i) for i in range(3)}
        assert set(cloud.devices) == ids
        assert {d.device_id for d in started} == ids
        assert all(rec.sign_outs == 1 for rec in cloud.devices.values())
    assert any("devices=3" in r.getMessage() for r in caplog.records)


async def test_fleet_stops_after_duration(cloud: FakeCloud) -> None:
    summary = await run_fleet(
        cloud.uri,
        devices=2,
        resources=1,
        token="t",
        duration=0.2,
        handle_signals=False,
        backoff=FAST,
        ping_interval=None,
    )
    assert summary.stopped_by == "duration"
    assert summary.duration_s >= 0.2
    assert summary.snapshot.totals["sign_ups"] <= 2


async def test_fleet_mints_a_token_per_device(cloud: FakeCloud) -> None:
    stop = asyncio.Event()

    def mint(device_id: str, owner: str | None) -> str:
        return f"{owner}:{device_id}"

    async def stop_when_online() -> None:
        await cloud.wait_until(lambda: sum(d.publishes for d in cloud.devices.values()) >= 2)
        stop.set()

    watcher = asyncio.create_task(stop_when_online())
    await run_fleet(
        cloud.uri,
        devices=2,
        token=mint,
        owner="bob",
        stop=stop,
        duration=30,
        handle_signals=False,
        device_prefix="mint",
    )
    await watcher
    tokens = {r.value["accesstoken"] for r in cloud.requests_to("/oic/sec/account")}
    assert tokens == {f"bob:{device_id_for('mint', i)}" for i in range(2)}


async def test_sigint_stops_the_fleet_and_devices_sign_out(cloud: FakeCloud) -> None:
    async def interrupt_when_online() -> None:
        await cloud.wait_until(lambda: sum(d.publishes for d in cloud.devices.values()) >= 2)
        # The fleet's handler must be installed, or this would interrupt pytest itself.
        assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler
        os.kill(os.getpid(), signal.SIGINT)

    watcher = asyncio.create_task(interrupt_when_online())
    summary = await run_fleet(
        cloud.uri, devices=2, token="t", duration=30, handle_signals=True, device_prefix="sig"
    )
    await watcher
    assert summary.stopped_by == "signal"
    assert summary.snapshot.totals["sign_outs"] == 2
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_live_table_renders() -> None:
    from rich.console import Console

    stats = DeviceStats()
    stats.bump("notifications_sent", 40)
    stats.set_gauges(connected=True, signed_in=True)
    stats.record_error(OSError("boom"))
    console = Console(record=True, width=120)
    console.print(render_table(FleetSnapshot.of([stats]), "coap+tcp://gw:5683", 4.0))
    text = console.export_text()
    assert "coap+tcp://gw:5683" in text
    assert "10.0" in text  # notifications per second
    assert "OSError: boom" in text

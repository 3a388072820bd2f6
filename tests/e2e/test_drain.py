"""Graceful drain (issue 13, item 5): a gateway asked to stop sends RFC 8323 Release to every
device, with the address of another gateway; the devices move there, nothing they reported is
lost, and their commands follow them.

Real servers (NATS JetStream with the bus security, FerretDB), two gateways in-process on the
same log, simulated OCF devices that honour Release's Alternative-Address.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from pymongo.asynchronous.database import AsyncDatabase

from auth.tokens import JwtValidator
from devicesim.device import DeviceState, SimDevice
from eventstore.adapters.jetstream import JetStreamEventStore
from gateway.service import Gateway, GatewayConfig
from proto import binding, subjects
from proto import events as ev

from .stack import WAIT, Stack, open_stack
from .test_command_delivery import api_for
from .test_gateway_lost import GatewayProc, gateway_process, gw_id, online_on, running, twin_service

if TYPE_CHECKING:
    from tests.conftest import Bus

pytestmark = pytest.mark.servers

DEVICES = 12


async def _all(devices: list[SimDevice], cond: Any) -> None:
    async with asyncio.timeout(WAIT):
        while not all(cond(d) for d in devices):
            await asyncio.sleep(0.05)


def _values(events: list[ev.AnyEvent], href: str) -> list[Any]:
    return [
        e.data.content.get("seq")
        for e in events
        if isinstance(e.data, ev.ResourceChanged) and e.data.href == href
    ]


@pytest.mark.timeout(180)
async def test_a_drained_gateway_moves_its_devices_to_another(
    bus: Bus, mongo_db: AsyncDatabase[Any], tmp_path: Path
) -> None:
    async with open_stack(
        bus, mongo_db, tmp_path, command_retry_initial=0.2, command_retry_max=0.5
    ) as stack:
        gw1 = stack.gateway
        cfg2 = GatewayConfig(gateway_id="gw-e2e-2", tcp_bind=("127.0.0.1", 0), tls_bind=None)
        gw2 = Gateway(cfg2, stack.gateway_store, JwtValidator(bus.issuer.public_keys), bus.issuer)
        async with gw2, stack.running_projector(), api_for(stack) as client:
            assert gw2.tcp_address is not None
            host, port = gw2.tcp_address
            devices = [stack.device(n, resources=1, ping_interval=None) for n in range(DEVICES)]
            for d in devices:
                await d.start()
            try:
                await _all(devices, lambda d: d.state is DeviceState.ONLINE)
                await _twins(stack, devices, gateway="gw-e2e")
                before = [d.change("/light/1") for d in devices]

                # a command issued as the drain starts: delivered by one gateway or the other
                accepted = await client.update(devices[0].device_id, "/light/1", {"power": 77})
                drain = asyncio.create_task(gw1.drain(WAIT, f"coap+tcp://{host}:{port}"))
                during = [d.change("/light/1") for d in devices]
                left = await drain
                assert left == 0
                assert gw1.conns == {}

                await _all(devices, lambda d: d.target.port == port)
                await _all(devices, lambda d: d.state is DeviceState.ONLINE)
                assert all(d.stats.releases_received == 1 for d in devices)
                await _twins(stack, devices, gateway="gw-e2e-2")
                after = [d.change("/light/1") for d in devices]

                outcome = await client.wait_outcome(accepted, WAIT)
                assert isinstance(outcome.data, ev.CommandSucceeded), outcome.data
                assert outcome.data.content["power"] == 77  # applied once, by one gateway
                # a command issued after the move reaches every device through the new gateway
                for d in devices:
                    done = await client.update(
                        d.device_id, "/light/1", {"power": 5}, wait=True, wait_timeout=WAIT
                    )
                    assert isinstance(done.data, ev.CommandSucceeded), done.data

                # every value each device reported is in the log, in order, once each
                for d, *reps in zip(devices, before, during, after, strict=True):
                    want = [r["seq"] for r in reps if r is not None]
                    await _logged(stack, d, want)
            finally:
                for d in devices:
                    await d.stop()


async def _twins(stack: Stack, devices: list[SimDevice], *, gateway: str) -> None:
    for d in devices:
        await stack.wait_twin(
            d.device_id,
            lambda t: t.online and t.connection.gateway == gateway and t.sync_state == "in_sync",
        )


async def _logged(stack: Stack, d: SimDevice, want: list[int]) -> None:
    await _logged_in(stack.store, stack.owner, d, want)


async def _logged_in(store: JetStreamEventStore, owner: str, d: SimDevice, want: list[int]) -> None:
    """Each of ``want`` is among the device's reported values in the log, once, in order."""
    f = subjects.event_filter(owner=owner, device=d.device_id, kind="resource-changed")
    deadline = time.monotonic() + WAIT
    while True:
        seqs = _values([binding.from_stored(m) async for m in store.read(f)], "/light/1")
        if all(w in seqs for w in want):
            break
        assert time.monotonic() < deadline, f"{d.device_id}: {want} not all in {seqs}"
        await asyncio.sleep(0.1)
    positions = [seqs.index(w) for w in want]
    assert positions == sorted(positions), (want, seqs)
    assert all(seqs.count(w) == 1 for w in want), (want, seqs)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.timeout(180)
async def test_a_rolling_restart_of_two_gateway_processes_by_sigterm(
    bus: Bus, mongo_db: AsyncDatabase[Any], tmp_path: Path
) -> None:
    """``twinhub gateway`` on SIGTERM: Release to every device (to the other gateway), wait for
    them to go, exit 0 within its drain bound. A then B: every device ends where it started,
    online, its reports all in the log."""
    ports = {"a": _free_port(), "b": _free_port()}
    ids = {"a": gw_id("roll-a"), "b": gw_id("roll-b")}

    def env(me: str, other: str) -> dict[str, str]:
        return {
            "TWINHUB_GATEWAY_DRAIN_ALTERNATIVE": f"coap+tcp://127.0.0.1:{ports[other]}",
            "TWINHUB_GATEWAY_DRAIN_TIMEOUT": "20",
        }

    def proc(tw: Any, me: str, other: str, n: int) -> Any:
        return gateway_process(
            bus,
            tw.data_dir,
            ids[me],
            30.0,
            tmp_path / f"gw-{me}{n}.log",
            tcp=f"127.0.0.1:{ports[me]}",
            env_extra=env(me, other),
        )

    async def sigterm(gw: GatewayProc) -> float:
        started = time.monotonic()
        gw.proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(25):
            assert await gw.proc.wait() == 0
        return time.monotonic() - started

    async with (
        twin_service(bus, mongo_db, tmp_path, list(ids.values())) as tw,
        proc(tw, "b", "a", 1) as b1,
        proc(tw, "a", "b", 1) as a1,
    ):
        devices = [tw.device(i, a1.port) for i in range(8)]
        dids = [d.device_id for d in devices]
        async with running(devices):
            await tw.wait(dids, online_on(ids["a"]))
            before = [d.change("/light/1") for d in devices]
            took = await sigterm(a1)
            await tw.wait(dids, online_on(ids["b"]))
            assert all(d.target.port == ports["b"] for d in devices)
            print(f"\ndrain a -> b: gateway a exited {took:.2f} s after SIGTERM")
            async with proc(tw, "a", "b", 2):
                during = [d.change("/light/1") for d in devices]
                took = await sigterm(b1)
                await tw.wait(dids, online_on(ids["a"]))
                print(f"drain b -> a: gateway b exited {took:.2f} s after SIGTERM")
                after = [d.change("/light/1") for d in devices]
                assert all(d.stats.releases_received == 2 for d in devices)
                for d, *reps in zip(devices, before, during, after, strict=True):
                    want = [r["seq"] for r in reps if r is not None]
                    await _logged_in(tw.store, tw.owner, d, want)

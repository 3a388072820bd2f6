"""Dead gateways detected (issue 11, item 3): a real ``twinhub gateway`` process, devices
connected through it, ``kill -9``; the twin service (projector and gateway reaper, in this
process) marks the devices offline within the lease plus 5 s. A restart with the same gateway
id closes the dead run's sessions at once; a device that reconnected elsewhere stays online.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pymongo.asynchronous.database import AsyncDatabase

from auth.tokens import TokenIssuer
from devicesim.config import DeviceConfig, GatewayAddress
from devicesim.device import DeviceState, SimDevice
from eventstore.adapters.jetstream import JetStreamEventStore
from proto import binding, subjects
from proto import events as ev
from proto.leases import (
    GATEWAY_LOST,
    LeaseState,
    decode_entry,
    gateway_scope,
    instance_of,
    latest_per_instance,
)
from proto.message import NatsMessage
from tests.conftest import Bus
from twin.adapters.mongo import MongoTwinStore
from twin.adapters.mongo_held import MongoHeldConnections
from twin.gateways import Cause, Claim, claim_record
from twin.model import Twin
from twin.reaper import GatewayReaper, ReaperConfig
from twin.service import ProjectorConfig, TwinProjector
from twinhub_cli import config as cfgmod
from twinhub_cli import services
from twinhub_cli.datadir import DataDir

pytestmark = pytest.mark.servers

WAIT = 30.0
SLACK = 5.0  # what the issue allows beyond the lease
_LISTENING = re.compile(r"tcp=\('([^']+)', (\d+)\)")
_UDP = re.compile(r"udp=\('([^']+)', (\d+)\)")


@dataclass
class GatewayProc:
    proc: asyncio.subprocess.Process
    gateway_id: str
    port: int
    log: Path
    udp_port: int | None = None  # the simple devices' CoAP/UDP endpoint

    def kill(self) -> float:
        """``kill -9``; returns when (monotonic)."""
        os.kill(self.proc.pid, signal.SIGKILL)
        return time.monotonic()


@contextlib.asynccontextmanager
async def gateway_process(
    bus: Bus,
    data_dir: Path,
    gateway_id: str,
    lease: float,
    log: Path,
    *,
    tcp: str = "127.0.0.1:0",
    env_extra: dict[str, str] | None = None,
) -> AsyncIterator[GatewayProc]:
    """``twinhub gateway`` (TCP on ``tcp``, a free port by default, TLS off) on the session's
    bus as the gateway role, with a lease of ``lease`` s and ``env_extra`` set; killed (if
    still running) afterwards."""
    env = (
        {k: v for k, v in os.environ.items() if not k.startswith("TWINHUB_")}
        | {
            "TWINHUB_NATS_URL": bus.url,
            "TWINHUB_NATS_CREDENTIALS": str(bus.server.credentials.directory),
            "TWINHUB_GATEWAY_ID": gateway_id,
            "TWINHUB_GATEWAY_TCP": tcp,
            "TWINHUB_GATEWAY_TLS": "",
            "TWINHUB_GATEWAY_UDP": "127.0.0.1:0",
            "TWINHUB_GATEWAY_DTLS": "127.0.0.1:0",
            "TWINHUB_GATEWAY_LEASE": str(lease),
            "TWINHUB_GATEWAY_MAX_CONNECTIONS_PER_IP": "0",
        }
        | (env_extra or {})
    )
    with log.open("ab") as log_file:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "twinhub_cli.main",
            "--log-level",
            "INFO",
            "gateway",
            "--data-dir",
            str(data_dir),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=log_file,
            env=env,
        )
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(WAIT):
            while True:
                line = (await proc.stdout.readline()).decode(errors="replace")
                if not line:
                    await proc.wait()
                    raise AssertionError(f"gateway exited ({proc.returncode}), see {log}")
                m = _LISTENING.search(line)
                if m:
                    break
        udp = _UDP.search(line)
        yield GatewayProc(
            proc, gateway_id, int(m.group(2)), log, None if udp is None else int(udp.group(2))
        )
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        await proc.wait()


@dataclass
class Twin_:
    """The twin service of the test: projector and reaper on the owner's events."""

    owner: str
    store: JetStreamEventStore
    leases: JetStreamEventStore
    twins: MongoTwinStore
    issuer: TokenIssuer
    data_dir: Path
    tmp: Path

    def device(self, n: int, port: int) -> SimDevice:
        token = self.issuer.issue(self.owner, now=time.time(), ttl=600)
        return SimDevice(
            DeviceConfig(
                gateway=GatewayAddress("coap+tcp", "127.0.0.1", port),
                device_id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"{self.owner}/{n}")),
                token=token,
                owner=self.owner,
                ping_interval=None,
            )
        )

    async def twin(self, device_id: str) -> Twin | None:
        return await self.twins.get(device_id)

    async def wait(
        self, device_ids: Sequence[str], cond: Callable[[Twin], bool], timeout: float = WAIT
    ) -> float:
        """Until ``cond`` holds for every device's twin; returns when (monotonic)."""
        async with asyncio.timeout(timeout):
            while True:
                twins = [await self.twins.get(d) for d in device_ids]
                if all(t is not None and cond(t) for t in twins):
                    return time.monotonic()
                await asyncio.sleep(0.05)

    async def reaped(self, gateway_id: str) -> None:
        """Until every instance of ``gateway_id`` but a held one is reaped."""
        async with asyncio.timeout(WAIT):
            while True:
                entries = [
                    decode_entry(m) async for m in self.leases.read(gateway_scope(gateway_id))
                ]
                states = {e.record.state for e in latest_per_instance(entries).values()}
                if states <= {LeaseState.REAPED, LeaseState.HELD} and LeaseState.REAPED in states:
                    return
                await asyncio.sleep(0.05)

    async def offlines(self, device_id: str) -> list[ev.DeviceOffline]:
        f = subjects.event_filter(owner=self.owner, device=device_id, kind="device-offline")
        out = []
        async for m in self.store.read(f):
            data = binding.from_stored(m).data
            assert isinstance(data, ev.DeviceOffline)
            out.append(data)
        return out


@contextlib.asynccontextmanager
async def twin_service(
    bus: Bus, db: AsyncDatabase[Any], tmp: Path, gateway_ids: Sequence[str]
) -> AsyncIterator[Twin_]:
    owner = "o" + uuid.uuid4().hex[:10]
    data_dir = tmp / "data"
    # the gateway processes load this key from the data dir: it signs the devices' tokens
    issuer = services.issuer_for(cfgmod.load(None, env={}), DataDir(data_dir))
    name = f"p-{owner}"
    own = subjects.event_filter(owner=owner)
    async with JetStreamEventStore.from_url(bus.endpoint("twin")) as store:
        await store.provision()
        twins = MongoTwinStore(db)
        await twins.ensure_indexes()
        held = MongoHeldConnections(db)
        await held.ensure_indexes()
        reaper_config = ReaperConfig(
            poll_interval=0.25,
            filters=tuple(gateway_scope(g) for g in gateway_ids),
            projector=name,
            projector_filter=own,
        )
        async with (
            JetStreamEventStore(store.connection, services.LEASE_LAYOUT) as leases,
            TwinProjector(twins, store, ProjectorConfig(name=name, filter_subject=own)),
        ):
            await leases.provision()
            # the gateway processes' simple-device endpoint reads the token registry, which the
            # twin service provisions (else they wait for it: an order dependence between tests)
            async with JetStreamEventStore(store.connection, services.TOKEN_LAYOUT) as tokens:
                await tokens.provision()
            async with GatewayReaper(leases, store, twins, held, reaper_config):
                yield Twin_(owner, store, leases, twins, issuer, data_dir, tmp)


@contextlib.asynccontextmanager
async def running(devices: Sequence[SimDevice]) -> AsyncIterator[Sequence[SimDevice]]:
    for d in devices:
        await d.start()
    try:
        for d in devices:
            await d.wait_until(lambda x: x.state is DeviceState.ONLINE, WAIT)
        yield devices
    finally:
        for d in devices:
            await d.stop(sign_out=False)


def online_on(gateway_id: str) -> Callable[[Twin], bool]:
    return lambda t: t.online and t.connection.gateway == gateway_id


def offline(t: Twin) -> bool:
    return not t.online


def gw_id(tag: str) -> str:
    return f"gw-{tag}-{uuid.uuid4().hex[:8]}"


async def test_kill_9_of_a_gateway_marks_its_devices_offline_within_the_lease(
    bus: Bus, mongo_db: AsyncDatabase[Any], tmp_path: Path
) -> None:
    lease = 3.0
    gid = gw_id("kill")
    async with (
        twin_service(bus, mongo_db, tmp_path, [gid]) as tw,
        gateway_process(bus, tw.data_dir, gid, lease, tmp_path / "gw.log") as gw,
    ):
        devices = [tw.device(i, gw.port) for i in range(5)]
        ids = [d.device_id for d in devices]
        async with running(devices):
            await tw.wait(ids, online_on(gw.gateway_id))
            first = await tw.twin(ids[0])
            assert first is not None and instance_of(first.connection.connection_id)
            killed = gw.kill()
            await gw.proc.wait()
        offline_at = await tw.wait(ids, offline, timeout=lease + SLACK + 5)
        took = offline_at - killed
        print(f"\nkill -9 -> offline in the twin: {took:.2f} s (lease {lease:g} s)")
        assert took <= lease + SLACK, f"{took:.2f} s after kill -9 (lease {lease} s)"
        for d in ids:
            (off,) = await tw.offlines(d)
            assert off.reason == GATEWAY_LOST
            assert off.gateway == gid


async def test_a_restart_with_the_same_id_closes_the_dead_runs_sessions_first(
    bus: Bus, mongo_db: AsyncDatabase[Any], tmp_path: Path
) -> None:
    lease = 30.0  # long: what closes the old sessions here is the new run, not the lease
    gid = gw_id("restart")
    async with twin_service(bus, mongo_db, tmp_path, [gid]) as tw:
        async with gateway_process(bus, tw.data_dir, gid, lease, tmp_path / "gw1.log") as gw1:
            stays = [tw.device(i, gw1.port) for i in range(3)]
            moves = tw.device(9, gw1.port)
            ids = [d.device_id for d in stays]
            async with running([*stays, moves]):
                await tw.wait([*ids, moves.device_id], online_on(gw1.gateway_id))
                before = await tw.twin(moves.device_id)
                assert before is not None
                gw1.kill()
                await gw1.proc.wait()
        async with gateway_process(bus, tw.data_dir, gid, lease, tmp_path / "gw2.log") as gw2:
            started = time.monotonic()
            # one device finds the new run (same gateway id, another instance)
            async with running([tw.device(9, gw2.port)]):
                offline_at = await tw.wait(ids, offline, timeout=SLACK + 5)
                print(f"\nrestart -> old sessions offline: {offline_at - started:.2f} s")
                assert offline_at - started < lease / 2
                await tw.wait([moves.device_id], online_on(gw2.gateway_id))
                await tw.reaped(gid)
                t = await tw.twin(moves.device_id)
                assert t is not None and t.online
                new_cid = t.connection.connection_id
                assert new_cid != before.connection.connection_id
                assert instance_of(new_cid) != instance_of(before.connection.connection_id)
                # the dead run's connection ended (offline or not, it is not the current one)
                for off in await tw.offlines(moves.device_id):
                    assert off.connection_id != new_cid
        for d in ids:
            (off,) = await tw.offlines(d)
            assert off.reason == GATEWAY_LOST


async def test_a_device_that_reconnected_elsewhere_is_unaffected(
    bus: Bus, mongo_db: AsyncDatabase[Any], tmp_path: Path
) -> None:
    lease = 4.0
    dead_id, other_id = gw_id("dead"), gw_id("other")
    async with (
        twin_service(bus, mongo_db, tmp_path, [dead_id, other_id]) as tw,
        gateway_process(bus, tw.data_dir, other_id, lease, tmp_path / "other.log") as other,
    ):
        async with gateway_process(bus, tw.data_dir, dead_id, lease, tmp_path / "dead.log") as dead:
            left = tw.device(0, dead.port)
            moves = tw.device(1, dead.port)
            async with running([left, moves]):
                await tw.wait([left.device_id, moves.device_id], online_on(dead.gateway_id))
                killed = dead.kill()
                await dead.proc.wait()
        async with running([tw.device(1, other.port)]):
            await tw.wait([moves.device_id], online_on(other.gateway_id))
            assert time.monotonic() - killed < lease  # reconnected before the lease lapsed
            await tw.wait([left.device_id], offline, timeout=lease + SLACK + 5)
            await tw.reaped(dead_id)
            # the reaper is done with the dead instance: the moved device is still online
            t = await tw.twin(moves.device_id)
            assert t is not None and t.online and t.connection.gateway == other_id
            assert await tw.offlines(moves.device_id) == []
            (off,) = await tw.offlines(left.device_id)
            assert off.reason == GATEWAY_LOST and off.gateway == dead_id


async def test_a_gateway_that_lost_its_lease_reconnects_its_devices(
    bus: Bus, mongo_db: AsyncDatabase[Any], tmp_path: Path
) -> None:
    """Fencing: a twin service declared the instance lost (here: a claim written as the
    reaper would after a network partition); the gateway, still alive, finds its renewal
    refused, takes a new instance and closes its connections; the devices come back on it."""
    gid = gw_id("fenced")
    async with twin_service(bus, mongo_db, tmp_path, [gid]) as tw:
        config = cfgmod.load(
            None,
            env={},
            overrides={
                "nats": {"url": bus.url, "credentials": str(bus.server.credentials.directory)},
                "gateway": {
                    "id": gid,
                    "tcp": "127.0.0.1:0",
                    "tls": "",
                    "udp": "127.0.0.1:0",
                    "dtls": "127.0.0.1:0",
                    "lease": 1.5,
                },
            },
        )
        data = DataDir(tw.data_dir)
        async with (
            services.event_store(config, data, "gateway") as store,
            services.run_gateway(config, data, store) as gw,
        ):
            assert gw.instance is not None and gw.tcp_address is not None
            first = gw.instance
            d = tw.device(0, gw.tcp_address[1])
            async with running([d]):
                await tw.wait([d.device_id], online_on(gid))
                t = await tw.twin(d.device_id)
                assert t is not None and instance_of(t.connection.connection_id) == first
                claim = Claim(
                    gid, first, await tw.leases.last_position(gateway_scope(gid)), Cause.LAPSED
                )
                subject, scope, record = claim_record(
                    claim, LeaseState.REAPING, "twin-test", datetime.now(UTC)
                )
                await tw.leases.append(
                    [NatsMessage(subject, "fence-1", record.encode())],
                    expected_last=claim.expected_last,
                    scope=scope,
                )

                def on_new_instance(t: Twin) -> bool:
                    return t.online and instance_of(t.connection.connection_id) not in (None, first)

                await tw.wait([d.device_id], on_new_instance)
                assert gw.instance != first

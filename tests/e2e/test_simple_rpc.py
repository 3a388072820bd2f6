"""Server-side RPC to simple devices end to end (issue 10 item 3): the command API's ``rpc``
through the client and the CLI, recorded as a command of op ``rpc`` (pending, listed, ended by
the expiry sweeper); an OCF device gets ``bad_request``, as does an OCF operation on a simple
device.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from pymongo.asynchronous.database import AsyncDatabase

from eventstore.adapters.jetstream import JetStreamEventStore
from proto import binding, subjects
from proto import events as ev
from tests.integration.gateway.simple_peers import coap_client
from twin.sweeper import ExpirySweeper, SweeperConfig
from twinhub_cli.datadir import DataDir
from twinhub_client import BadRequestError, ConflictError

from .stack import bus_config, production_callout
from .test_provisioning import WAIT, Env, open_env
from .test_simple_devices import production_gateway

if TYPE_CHECKING:
    from tests.conftest import Bus

pytestmark = pytest.mark.servers


@pytest.fixture
async def env(bus: Bus, mongo_db: AsyncDatabase[Any]) -> AsyncIterator[Env]:
    async with (
        open_env(bus, mongo_db) as e,
        ExpirySweeper(e.twins, e.store, SweeperConfig(interval=0.2)),
    ):
        yield e


async def _register_ocf(env: Env, device: str) -> None:
    async with JetStreamEventStore.from_url(env.bus.endpoint("gateway")) as gw:
        e = ev.Event(owner=env.owner, device_id=device, data=ev.DeviceRegistered(), source="/t")
        await gw.append([binding.to_nats(e)])


async def test_an_rpc_is_accepted_listed_pending_and_expired_by_the_sweeper(env: Env) -> None:
    async with env.client() as app:
        device = (await app.provision(name="valve")).device_id
        accepted = await app.rpc(device, "setGpio", {"pin": 4, "value": 1}, ttl=30)
        assert (accepted.device_id, accepted.href, accepted.state) == (device, "/rpc", "pending")
        (pending,) = await app.list_pending(device)
        assert (pending.correlation_id, pending.op, pending.href) == (
            accepted.correlation_id,
            "rpc",
            "/rpc",
        )
        assert pending.content == {"method": "setGpio", "params": {"pin": 4, "value": 1}}
        # the same request again (same correlation id) is the same command; another is not
        again = await app.rpc(
            device,
            "setGpio",
            {"value": 1, "pin": 4},
            ttl=30,
            correlation_id=accepted.correlation_id,
        )
        assert again.repeated and again.position == accepted.position
        with pytest.raises(ConflictError, match="params"):
            await app.rpc(
                device, "setGpio", {"pin": 5}, ttl=30, correlation_id=accepted.correlation_id
            )
        started = time.monotonic()
        outcome = await app.rpc(device, "reboot", ttl=1, wait=True, wait_timeout=WAIT)
        assert isinstance(outcome.data, ev.CommandExpired)
        assert outcome.data.href == "/rpc"
        assert time.monotonic() - started >= 0.9
    pendings = [
        e
        async for e in env.store.read(
            subjects.event_filter(env.owner, device, ev.CommandPending.KIND)
        )
    ]
    assert len(pendings) == 2  # the repeat was not recorded again


async def test_rpc_is_for_simple_devices_and_ocf_operations_are_not(env: Env) -> None:
    ocf = f"{env.owner}-ocf"
    await _register_ocf(env, ocf)
    await env.wait_twin(ocf, lambda t: True)
    async with env.client() as app:
        device = (await app.provision(name="valve")).device_id
        with pytest.raises(BadRequestError, match="OCF device"):
            await app.rpc(ocf, "reboot")
        with pytest.raises(BadRequestError, match="simple device"):
            await app.update(device, "/light", {"value": True})
        with pytest.raises(BadRequestError, match="method"):
            await app.rpc(device, "")
        assert await app.list_pending(device) == []
        assert await app.list_pending(ocf) == []


async def _twinhub(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "twinhub_cli.main",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=dict(os.environ),
    )
    out, err = await asyncio.wait_for(proc.communicate(), 2 * WAIT)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_cli_rpc_against_a_local_stack(
    bus: Bus, mongo_db: AsyncDatabase[Any], mongo_server: Any, tmp_path: Path
) -> None:
    """``twinhub cmd rpc DEVICE METHOD [PARAMS] [--wait]`` against a stack of ``twinhub up``."""
    data = DataDir(tmp_path / "data")
    data.write_stack(
        {"nats_url": bus.url, "mongo_url": mongo_server.url, "database": mongo_db.name}
    )
    async with (
        production_callout(bus, bus_config(bus), data),
        open_env(bus, mongo_db, issuer=data.issuer()) as env,
        ExpirySweeper(env.twins, env.store, SweeperConfig(interval=0.2)),
    ):
        async with env.client() as app:
            device = (await app.provision(name="cli")).device_id
        dd = ("--data-dir", str(data.root), "--owner", env.owner)
        code, out, err = await _twinhub("cmd", "rpc", device, "setGpio", '{"pin": 4}', *dd)
        assert code == 0, err
        accepted = json.loads(out)
        assert (accepted["device_id"], accepted["href"]) == (device, "/rpc")
        async with env.client() as app:
            (pending,) = await app.list_pending(device)
        assert pending.correlation_id == accepted["correlation_id"]
        assert pending.content == {"method": "setGpio", "params": {"pin": 4}}
        code, out, err = await _twinhub("cmd", "rpc", device, "reboot", "--ttl", "1", "--wait", *dd)
        assert code == 1, err  # not succeeded: it expired, and the outcome is printed
        outcome = json.loads(out)
        assert outcome["type"] == ev.CommandExpired.TYPE
        code, out, err = await _twinhub("cmd", "rpc", device, "m", "{not json", *dd)
        assert code == 2 and "not JSON" in err


async def test_rpc_through_the_api_to_a_coap_client_and_back(
    env: Env, bus: Bus, tmp_path: Path
) -> None:
    """The whole path as ``twinhub up`` composes it: an application's rpc, pending while the
    device is away, reaches ``coap-client`` observing ``rpc`` through the gateway of
    ``run_gateway``; its answer ends the command (``wait=True`` returns it, with the result)."""
    async with env.client() as app:
        issued = await app.provision(name="valve")
        device, token = issued.device_id, issued.token
        accepted = await app.rpc(device, "setGpio", {"pin": 23, "value": 1}, ttl=60)
        async with production_gateway(bus, tmp_path) as (gw, ca):
            assert gw.udp_address is not None
            host, port = gw.udp_address
            base = f"coap://{host}:{port}/api/v1/{token}/rpc"
            observed = await coap_client("-m", "get", "-s", "3", base, timeout=5)
            bodies = [
                json.loads(line.split(" :: ", 1)[1].strip("'"))
                for line in observed.stdout.splitlines()
                if " c:2.05 " in line and " :: " in line
            ]
            assert [(b["method"], b["params"]) for b in bodies] == [
                ("setGpio", {"pin": 23, "value": 1})
            ], observed.stdout
            outcome_task = asyncio.create_task(app.wait_outcome(accepted, WAIT))
            posted = await coap_client(
                "-m", "post", "-t", "json", "-e", '{"done":true}', f"{base}/{bodies[0]['id']}"
            )
            assert posted.code == "2.01", posted.stdout + posted.stderr
            outcome = await outcome_task
            assert isinstance(outcome.data, ev.CommandSucceeded)
            assert outcome.data.content == {"done": True}
            twin = await env.wait_twin(device, lambda t: t.pending == () and t.recent_outcomes)
            assert [o.state for o in twin.recent_outcomes] == ["succeeded"]
            (sent,) = [e for e in await env.events(device) if isinstance(e.data, ev.CommandSent)]
            assert sent.correlation_id == accepted.correlation_id

            # over DTLS (-R the CA), the same: observe, get the next RPC, answer it
            secure = await app.rpc(device, "reboot", ttl=60)
            assert gw.dtls_address is not None
            host, port = gw.dtls_address
            coaps = f"coaps://{host}:{port}/api/v1/{token}/rpc"
            observed = await coap_client("-m", "get", "-s", "3", "-R", str(ca), coaps, timeout=5)
            bodies = [
                json.loads(line.split(" :: ", 1)[1].strip("'"))
                for line in observed.stdout.splitlines()
                if " c:2.05 " in line and " :: " in line
            ]
            assert [b["method"] for b in bodies] == ["reboot"], observed.stdout + observed.stderr
            posted = await coap_client(
                "-m", "post", "-R", str(ca), "-e", "1", f"{coaps}/{bodies[0]['id']}"
            )
            assert posted.code == "2.01", posted.stdout + posted.stderr
            outcome = await app.wait_outcome(secure, WAIT)
            assert isinstance(outcome.data, ev.CommandSucceeded) and outcome.data.content == 1

"""Simple devices end to end, as ``twinhub up`` composes them (issue 10): an application
provisions a device through the command API; libcoap's ``coap-client`` posts the seed's
telemetry over plain CoAP/UDP and over DTLS (``-R ca.crt``) to the gateway that
``twinhub_cli.services.run_gateway`` builds (the gateway role's credentials, the token registry,
the UDP endpoint, the DTLS terminator in front of it); the values reach the twin; a revoked
token gets 4.01.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from pymongo.asynchronous.database import AsyncDatabase

from gateway.service import Gateway
from tests.integration.gateway.simple_peers import coap_client
from twinhub_cli import services as svc
from twinhub_cli.datadir import DataDir

from .stack import bus_config
from .test_provisioning import Env, open_env

if TYPE_CHECKING:
    from tests.conftest import Bus

pytestmark = pytest.mark.servers

CACHE_TTL = 0.5  # gateway.token_cache_ttl here: how soon a revocation applies


@contextlib.asynccontextmanager
async def production_gateway(
    bus: Bus, tmp: Path, **settings: Any
) -> AsyncIterator[tuple[Gateway, Path]]:
    """The gateway as ``twinhub gateway`` runs it, every listener on a free loopback port;
    ``settings``: more (or other) ``gateway.*`` settings."""
    config = bus_config(
        bus,
        gateway={
            "id": "gw-simple",
            "tcp": "127.0.0.1:0",
            "tls": "",
            "udp": "127.0.0.1:0",
            "dtls": "127.0.0.1:0",
            "token_cache_ttl": CACHE_TTL,
            **settings,
        },
    )
    data = DataDir(tmp / "data")
    async with svc.event_store(config, data, "twin"):
        pass  # the twin service provisions the streams the gateway waits for (leases, tokens)
    async with (
        svc.event_store(config, data, "gateway") as store,
        svc.run_gateway(config, data, store) as gw,
    ):
        yield gw, data.pki / "ca.crt"


@pytest.fixture
async def env(bus: Bus, mongo_db: AsyncDatabase[Any]) -> AsyncIterator[Env]:
    async with open_env(bus, mongo_db) as e:
        yield e


def _value(telemetry: Any) -> Any:
    return None if telemetry is None else telemetry.value


def _url(scheme: str, addr: tuple[str, int] | None, token: str, what: str) -> str:
    assert addr is not None
    return f"{scheme}://{addr[0]}:{addr[1]}/api/v1/{token}/{what}"


async def test_the_seeds_coap_client_commands_reach_the_twin_plain_and_over_dtls(
    env: Env, bus: Bus, tmp_path: Path
) -> None:
    async with env.client() as app:
        issued = await app.provision(name="boiler")
    device, token = issued.device_id, issued.token
    async with production_gateway(bus, tmp_path) as (gw, ca):
        # seed 004, plain CoAP: coap-client -m POST coap://HOST:5683/api/v1/TOKEN/telemetry
        #   -t json -e "{temperature:25}"
        plain = await coap_client(
            "-m",
            "POST",
            _url("coap", gw.udp_address, token, "telemetry"),
            "-t",
            "json",
            "-e",
            "{temperature:25}",
        )
        assert plain.code == "2.01", plain.stdout + plain.stderr
        twin = await env.wait_twin(
            device, lambda t: t.online and t.telemetry_for("temperature") is not None
        )
        temperature = twin.telemetry_for("temperature")
        assert temperature is not None and temperature.value == 25
        assert twin.connection is not None and twin.connection.protocol == "coap+udp"

        # seed 004, DTLS: coap-client-openssl -m POST -R ca-root.pem -t "application/json"
        #   -e '{"temperature":42}' coaps://HOST/api/v1/TOKEN/telemetry
        secure = await coap_client(
            "-m",
            "POST",
            "-R",
            str(ca),
            "-t",
            "application/json",
            "-e",
            '{"temperature":42}',
            _url("coaps", gw.dtls_address, token, "telemetry"),
        )
        assert secure.code == "2.01", secure.stdout + secure.stderr
        await env.wait_twin(device, lambda t: _value(t.telemetry_for("temperature")) == 42)

        posted = await coap_client(
            "-m",
            "POST",
            _url("coap", gw.udp_address, token, "attributes"),
            "-t",
            "json",
            "-e",
            '{"firmware":"1.2","mode":"eco"}',
        )
        assert posted.code == "2.01", posted.stdout
        got = await coap_client(
            "-m", "GET", _url("coap", gw.udp_address, token, "attributes") + "?clientKeys=mode"
        )
        assert (got.code, got.body) == ("2.05", '{"client":{"mode":"eco"}}'), got.stdout
        await env.wait_twin(device, lambda t: dict(t.client_attributes).get("firmware") == "1.2")

        async with env.client() as app:
            await app.revoke_token(device)
        async with asyncio.timeout(30):  # within the cache's ttl
            while True:
                refused = await coap_client(
                    "-m",
                    "POST",
                    _url("coap", gw.udp_address, token, "telemetry"),
                    "-t",
                    "json",
                    "-e",
                    '{"temperature":1}',
                )
                if refused.code == "4.01":
                    break
                assert refused.code == "2.01", refused.stdout
                await asyncio.sleep(CACHE_TTL / 2)


async def test_shared_attributes_set_through_the_api_reach_an_observing_device_over_dtls(
    env: Env, bus: Bus, tmp_path: Path
) -> None:
    """Desired state on ``/shared/<key>`` set by an application is the device's shared
    attributes: in the registration's answer of ``coap-client -s`` over DTLS, then as an
    update while it observes; ``GET .../attributes?sharedKeys=`` reads them; the twin of an
    online simple device is in sync."""
    async with env.client() as app:
        issued = await app.provision(name="thermostat")
        device, token = issued.device_id, issued.token
        await app.set_desired(device, "/shared/target", 21.5)
        async with production_gateway(bus, tmp_path) as (gw, ca):
            assert gw.simple is not None
            observer = asyncio.create_task(
                coap_client(
                    "-m",
                    "get",
                    "-s",
                    "5",
                    "-R",
                    str(ca),
                    _url("coaps", gw.dtls_address, token, "attributes"),
                    timeout=10,
                )
            )
            async with asyncio.timeout(30):
                while not gw.simple.observing_attributes(env.owner, device):
                    await asyncio.sleep(0.05)
            await app.set_desired(device, "/shared/mode", "eco")
            await app.clear_desired(device, "/shared/target")
            observed = await observer
            got = await coap_client(
                "-m",
                "GET",
                _url("coap", gw.udp_address, token, "attributes") + "?sharedKeys=mode,target",
            )
            assert (got.code, got.body) == ("2.05", '{"shared":{"mode":"eco"}}'), got.stdout
            twin = await env.wait_twin(device, lambda t: t.online)
            assert twin.sync_state == "in_sync"
    bodies = [
        json.loads(line.split(" :: ", 1)[1].strip("'"))
        for line in observed.stdout.splitlines()
        if " c:2.05 " in line and " :: " in line
    ]
    assert bodies[0] == {"target": 21.5}, observed.stdout + observed.stderr
    updates: dict[str, Any] = {}  # the two changes, in one notification or in two
    for body in bodies[1:]:
        updates.update(body)
    assert updates == {"mode": "eco", "deleted": ["target"]}, bodies

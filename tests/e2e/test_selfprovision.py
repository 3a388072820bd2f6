"""Self-provisioning of simple devices end to end on real servers: ``POST /api/v1/provision``
to the gateway's UDP endpoint (gateway role), relayed on ``twinhub.svc.provision`` to the twin
service (twin role), which checks the profile's key and secret and provisions through the
command API's path into the token registry and the log; the projector puts the device's twin
into MongoDB (FerretDB). Devices: aiocoap's client and libcoap's ``coap-client-openssl``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiocoap
import nats.errors
import pytest
from aiocoap.numbers.contentformat import ContentFormat
from pymongo.asynchronous.database import AsyncDatabase

from auth.application import AppTokenValidator
from eventstore.adapters.jetstream import JetStreamEventStore
from gateway.adapters.coap_udp import SimpleDeviceServer, UdpConfig
from gateway.adapters.devtokens_nats import NatsTokenDirectory
from gateway.adapters.dtls import DtlsConfig, DtlsTerminator
from gateway.adapters.provision_nats import NatsProvisioner
from gateway.devtokens import CachedTokenDirectory, TokenCacheConfig
from gateway.simple import SimpleConfig
from gateway.simpleprovision import ProvisionConfig
from proto import binding, subjects
from proto import events as ev
from proto.selfprovision import SUBJECT, ProvisionRequest, decode_reply, encode
from tests.conftest import Bus
from tests.integration.gateway.simple_peers import coap_client
from twin.adapters.mongo import MongoTwinStore
from twin.adapters.selfprovision_nats import SelfProvisionServer
from twin.adapters.token_registry import LogTokenRegistry
from twin.api import ApiConfig, TwinApi
from twin.model import SIMPLE_PROFILE, Twin
from twin.selfprovision import Profile, Profiles, device_id_for
from twin.service import ProjectorConfig, TwinProjector
from twinhub_cli import pki
from twinhub_cli import services as svc
from twinhub_cli.datadir import DataDir
from twinhub_cli.services import TOKEN_LAYOUT

from .stack import bus_config
from .test_bus_security import app

pytestmark = pytest.mark.servers

WAIT = 30.0


@dataclass
class Env:
    owner: str
    profile: Profile
    secret: str
    server: SimpleDeviceServer
    store: JetStreamEventStore  # the twin service's
    gateway: JetStreamEventStore  # the gateway's (its connection relays)
    twins: MongoTwinStore

    def url(self, path: str) -> str:
        host, port = self.server.address
        return f"coap://{host}:{port}/api/v1/{path}"

    def body(self, name: str, secret: str | None = None, **extra: Any) -> bytes:
        return json.dumps(
            {
                "deviceName": name,
                "provisionDeviceKey": self.profile.key,
                "provisionDeviceSecret": self.secret if secret is None else secret,
                **extra,
            }
        ).encode()

    async def events(self, device: str) -> list[ev.AnyEvent]:
        scope = subjects.device_scope(device)
        return [binding.from_stored(m) async for m in self.store.read(scope)]

    async def wait_twin(self, device: str, cond: Callable[[Twin], bool]) -> Twin:
        async with asyncio.timeout(WAIT):
            while True:
                t = await self.twins.get(device)
                if t is not None and cond(t):
                    return t
                await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def open_env(bus: Bus, db: AsyncDatabase[Any]) -> AsyncIterator[Env]:
    owner = "o" + uuid.uuid4().hex[:10]
    secret = secrets.token_urlsafe(24)
    profile = Profile("factory", owner, f"key-{owner}", secret.encode())
    projector = f"p-{owner}"
    async with (
        JetStreamEventStore.from_url(bus.endpoint("twin")) as store,
        JetStreamEventStore.from_url(bus.endpoint("gateway")) as gateway,
    ):
        await store.provision()
        async with (
            JetStreamEventStore(store.connection, TOKEN_LAYOUT) as tokens,
            JetStreamEventStore(gateway.connection, TOKEN_LAYOUT) as gateway_tokens,
        ):
            await tokens.provision()
            twins = MongoTwinStore(db)
            await twins.ensure_indexes()
            twin_api = TwinApi(
                store,
                twins,
                AppTokenValidator(bus.issuer.public_keys),
                ApiConfig(projector=projector, consumer_secret=os.urandom(32)),
                tokens=LogTokenRegistry(tokens),
            )
            directory = CachedTokenDirectory(
                NatsTokenDirectory(gateway_tokens), TokenCacheConfig(ttl=0.5)
            )
            projector_cfg = ProjectorConfig(
                name=projector, filter_subject=subjects.event_filter(owner)
            )
            async with (
                TwinProjector(twins, store, projector_cfg),
                SelfProvisionServer(store.connection, twin_api, Profiles([profile])),
                SimpleDeviceServer(
                    gateway,
                    directory,
                    SimpleConfig(gateway_id="gw-test"),
                    UdpConfig(bind=("127.0.0.1", 0)),
                    provisioner=NatsProvisioner(gateway.connection, timeout=WAIT),
                    provisioning=ProvisionConfig(rate=50.0, burst=50),
                ) as server,
            ):
                yield Env(owner, profile, secret, server, store, gateway, twins)


def _dumped_payload(stdout: str) -> str:
    """The payload of the last response in ``coap-client -v 6``'s dump (``... :: 'payload'``)."""
    (line,) = [ln for ln in stdout.splitlines() if ln.startswith("v:1 t:ACK")][-1:]
    return line.split(" :: '", 1)[1].removesuffix("'")


@pytest.fixture
async def env(bus: Bus, mongo_db: AsyncDatabase[Any]) -> AsyncIterator[Env]:
    async with open_env(bus, mongo_db) as e:
        yield e


@pytest.fixture
async def client() -> AsyncIterator[aiocoap.Context]:
    ctx = await aiocoap.Context.create_client_context(transports=["udp6"])
    try:
        yield ctx
    finally:
        await ctx.shutdown()


async def post(ctx: aiocoap.Context, uri: str, payload: bytes) -> aiocoap.Message:
    msg = aiocoap.Message(
        code=aiocoap.POST, uri=uri, payload=payload, content_format=ContentFormat.JSON
    )
    return await asyncio.wait_for(ctx.request(msg).response, WAIT)


async def test_a_device_provisions_itself_then_reports_under_the_profiles_owner(
    env: Env, client: aiocoap.Context
) -> None:
    r = await post(client, env.url("provision"), env.body("boiler-1"))
    assert r.code == aiocoap.CREATED, r
    got = json.loads(r.payload)
    assert (got["status"], got["credentialsType"]) == ("SUCCESS", "ACCESS_TOKEN")
    token = got["credentialsValue"]
    device = device_id_for(env.profile, "boiler-1")
    (provisioned,) = await env.events(device)
    assert isinstance(provisioned.data, ev.DeviceProvisioned)
    assert (provisioned.owner, provisioned.data.provisioned_by) == (
        env.owner,
        "provision-key:factory",
    )

    t = await post(client, env.url(f"{token}/telemetry"), b'{"temperature": 21.5}')
    assert t.code == aiocoap.CREATED, t
    twin = await env.wait_twin(device, lambda t: t.telemetry_for("temperature") is not None)
    assert (twin.owner, twin.profile, twin.name) == (env.owner, SIMPLE_PROFILE, "boiler-1")
    temperature = twin.telemetry_for("temperature")
    assert temperature is not None and temperature.value == 21.5


async def test_a_wrong_secret_is_not_found_and_no_larger_than_the_request(
    env: Env, client: aiocoap.Context
) -> None:
    body = env.body("boiler-2", secret="guess")
    r = await post(client, env.url("provision"), body)
    assert r.code == aiocoap.BAD_REQUEST, r
    assert json.loads(r.payload) == {"status": "NOT_FOUND"}
    assert len(r.payload) <= len(body)
    assert await env.events(device_id_for(env.profile, "boiler-2")) == []
    malformed = await post(client, env.url("provision"), b"{deviceName:")
    assert (malformed.code, malformed.payload) == (aiocoap.BAD_REQUEST, b"")


async def test_the_same_name_twice_is_a_failure(env: Env, client: aiocoap.Context) -> None:
    first = await post(client, env.url("provision"), env.body("boiler-3"))
    assert json.loads(first.payload)["status"] == "SUCCESS"
    again = await post(client, env.url("provision"), env.body("boiler-3"))
    assert again.code == aiocoap.BAD_REQUEST
    assert json.loads(again.payload) == {
        "status": "FAILURE",
        "errorMsg": "device already provisioned",
    }
    assert len(await env.events(device_id_for(env.profile, "boiler-3"))) == 1


async def test_device_supplied_credentials_are_refused(env: Env, client: aiocoap.Context) -> None:
    body = env.body("boiler-4", credentialsType="ACCESS_TOKEN", token="mine")
    r = await post(client, env.url("provision"), body)
    got = json.loads(r.payload)
    assert r.code == aiocoap.BAD_REQUEST
    assert got["status"] == "FAILURE" and "ACCESS_TOKEN" in got["errorMsg"]
    assert await env.events(device_id_for(env.profile, "boiler-4")) == []


async def test_coap_client_provisions_as_thingsboards_docs_show(env: Env) -> None:
    body = env.body("sensor-1").decode()
    result = await coap_client("-m", "post", "-t", "json", "-e", body, env.url("provision"))
    assert result.code == "2.01", result
    got = json.loads(result.body)
    assert got["status"] == "SUCCESS", got
    token = got["credentialsValue"]
    sent = await coap_client(
        "-m", "post", "-t", "json", "-e", "{temperature:25}", env.url(f"{token}/telemetry")
    )
    assert sent.code == "2.01", sent
    device = device_id_for(env.profile, "sensor-1")
    await env.wait_twin(device, lambda t: t.telemetry_for("temperature") is not None)


async def test_over_dtls_checking_the_server_against_the_ca(env: Env, tmp_path: Path) -> None:
    ca = pki.create_ca(tmp_path / "ca")
    server = pki.issue_server(ca, tmp_path / "server", ["127.0.0.1"])
    terminator = DtlsTerminator(
        DtlsConfig(server.cert_path, server.key_path),
        bind=("127.0.0.1", 0),
        backend=env.server.address,
    )
    async with terminator:
        url = f"coaps://127.0.0.1:{terminator.address[1]}/api/v1/provision"
        body = env.body("sensor-dtls").decode()
        result = await coap_client(
            "-m", "post", "-R", str(ca.cert_path), "-t", "json", "-e", body, url
        )
    assert result.code == "2.01", result
    # the payload, then coap-client's log of the DTLS close on the same line
    got, _ = json.JSONDecoder().raw_decode(result.body)
    assert got["status"] == "SUCCESS", result
    (provisioned,) = await env.events(device_id_for(env.profile, "sensor-dtls"))
    assert provisioned.owner == env.owner


async def test_without_the_twin_service_the_device_gets_503(
    bus: Bus, client: aiocoap.Context
) -> None:
    async with (
        JetStreamEventStore.from_url(bus.endpoint("gateway")) as gateway,
        JetStreamEventStore(gateway.connection, TOKEN_LAYOUT) as tokens,
        SimpleDeviceServer(
            gateway,
            NatsTokenDirectory(tokens),
            SimpleConfig(gateway_id="gw-test"),
            UdpConfig(bind=("127.0.0.1", 0)),
            provisioner=NatsProvisioner(gateway.connection, timeout=2.0),
        ) as server,
    ):
        host, port = server.address
        body = json.dumps(
            {"deviceName": "x", "provisionDeviceKey": "k", "provisionDeviceSecret": "s"}
        ).encode()
        # no twin service answers on the subject in this test
        r = await post(client, f"coap://{host}:{port}/api/v1/provision", body)
        assert (r.code, r.payload) == (aiocoap.SERVICE_UNAVAILABLE, b"")


async def test_without_a_provisioner_the_path_is_not_found(
    bus: Bus, client: aiocoap.Context
) -> None:
    async with (
        JetStreamEventStore.from_url(bus.endpoint("gateway")) as gateway,
        JetStreamEventStore(gateway.connection, TOKEN_LAYOUT) as tokens,
        SimpleDeviceServer(
            gateway,
            NatsTokenDirectory(tokens),
            SimpleConfig(gateway_id="gw-test"),
            UdpConfig(bind=("127.0.0.1", 0)),
        ) as server,
    ):
        host, port = server.address
        r = await post(client, f"coap://{host}:{port}/api/v1/provision", b"{}")
        assert (r.code, r.payload) == (aiocoap.NOT_FOUND, b"")


async def test_the_gateway_may_relay_and_an_application_may_not(env: Env, bus: Bus) -> None:
    request = ProvisionRequest(device_name="x", key=env.profile.key, secret="wrong")
    msg = await env.gateway.connection.request(SUBJECT, encode(request), timeout=WAIT)
    assert decode_reply(msg.data).status == "NOT_FOUND"
    async with app(bus, env.owner) as application:
        await application.denied_publish(SUBJECT, encode(request))
        heard = await application.denied_subscribe(SUBJECT)
        with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
            await application.nc.request(SUBJECT, encode(request), timeout=1.0)
        assert heard == []


async def test_as_twinhub_up_composes_it(
    bus: Bus, mongo_db: AsyncDatabase[Any], tmp_path: Path
) -> None:
    """The twin service and the gateway as ``twinhub_cli.services`` builds them from the
    configuration: a profile in ``twin.provision_profiles`` with its secret file (0600)."""
    owner = "o" + uuid.uuid4().hex[:10]
    secret_file = tmp_path / "factory.secret"
    secret_file.write_text("s3cret-" + owner + "\n")
    secret_file.chmod(0o600)
    config = bus_config(
        bus,
        gateway={"id": "gw-sp", "tcp": "127.0.0.1:0", "tls": "", "udp": "127.0.0.1:0", "dtls": ""},
        twin={
            "provision_profiles": [f"factory;owner={owner};key=k-{owner};secret_file={secret_file}"]
        },
    )
    data = DataDir(tmp_path / "data")
    twins = MongoTwinStore(mongo_db)
    await twins.ensure_indexes()
    async with (
        svc.event_store(config, data, "twin") as twin_store,
        svc.run_api(config, data, twin_store, twins),
        svc.event_store(config, data, "gateway") as gateway_store,
        svc.run_gateway(config, data, gateway_store) as gw,
    ):
        assert gw.udp_address is not None
        host, port = gw.udp_address
        body = json.dumps(
            {
                "deviceName": "boiler",
                "provisionDeviceKey": f"k-{owner}",
                "provisionDeviceSecret": f"s3cret-{owner}",
            }
        )
        url = f"coap://{host}:{port}/api/v1/provision"
        result = await coap_client("-m", "post", "-t", "json", "-e", body, url)
        assert result.code == "2.01", result
        assert json.loads(result.body)["status"] == "SUCCESS", result
        wrong = await coap_client(
            "-m", "post", "-t", "json", "-e", body.replace("s3cret", "guess"), url
        )
        assert wrong.code == "4.00", wrong
        # coap-client prints an error response's payload only in its message dump
        assert json.loads(_dumped_payload(wrong.stdout)) == {"status": "NOT_FOUND"}, wrong

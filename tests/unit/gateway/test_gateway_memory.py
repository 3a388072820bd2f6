"""The gateway driver over the in-memory device port (no socket): sign-in, a notification into
the log, a command delivered (see tests/unit/gateway/memory_devices.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import cbor2
import pytest

from auth.tokens import JwtValidator, TokenIssuer
from eventstore.memory import InMemoryEventStore
from gateway.adapters.coap_messages import CoapRequest, CoapResponse
from gateway.service import Gateway, GatewayConfig
from proto import binding
from proto.events import (
    AnyEvent,
    CommandPending,
    CommandSucceeded,
    DeviceOnline,
    DeviceRegistered,
    Event,
    ResourceChanged,
)

from .memory_devices import MemoryDevice, MemoryDevices
from .playbook import make_issuer

OCF = 10000
DEVICE = "d1"
OWNER = "alice"
LIGHT = {"href": "/light", "rt": ["oic.r.switch.binary"], "if": ["oic.if.baseline"], "p": {"bm": 3}}


def cbor(code: str, body: Any, observe: int | None = None) -> CoapResponse:
    return CoapResponse(code, cbor2.dumps(body), OCF, observe=observe)


class Light:
    """The device's resources: ``/oic/res`` and an observable ``/light``."""

    def __init__(self) -> None:
        self.on = False
        self.commands: list[CoapRequest] = []

    def __call__(self, req: CoapRequest) -> CoapResponse:
        if req.path == "/oic/res":
            return cbor("2.05", [{"di": DEVICE, "links": [LIGHT]}])
        if req.path == "/light" and req.method == "GET":
            return cbor("2.05", {"value": self.on}, observe=1 if req.observe == 0 else None)
        if req.path == "/light" and req.method == "POST":
            self.commands.append(req)
            self.on = bool(cbor2.loads(req.payload)["value"])
            return cbor("2.04", {"value": self.on})
        return CoapResponse("4.04")


async def until(cond: Callable[[], Any], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


async def events(store: InMemoryEventStore) -> list[AnyEvent]:
    return [binding.from_stored(m) async for m in store.read()]


@pytest.fixture
def issuer() -> TokenIssuer:
    return make_issuer()


@pytest.fixture
async def store() -> InMemoryEventStore:
    store = InMemoryEventStore()
    await store.provision()
    return store


@pytest.fixture
async def devices(store: InMemoryEventStore, issuer: TokenIssuer) -> AsyncIterator[MemoryDevices]:
    factory = MemoryDevices()
    config = GatewayConfig(gc_young_threshold=None, tick_interval=0.05)
    validator = JwtValidator(issuer.public_keys)
    async with Gateway(config, store, validator, issuer, server_factory=factory):
        yield factory


async def post(device: MemoryDevice, path: str, body: Any) -> tuple[str, Any]:
    resp = await device.send(
        CoapRequest("POST", path, payload=cbor2.dumps(body), content_format=OCF)
    )
    return resp.code, cbor2.loads(resp.payload) if resp.payload and resp.content_format else None


async def sign_in(device: MemoryDevice, issuer: TokenIssuer) -> None:
    token = issuer.issue(OWNER, now=time.time(), ttl=600)
    code, tokens = await post(
        device, "/oic/sec/account", {"di": DEVICE, "accesstoken": token, "authprovider": "x"}
    )
    assert code == "2.04", tokens
    code, _ = await post(
        device,
        "/oic/sec/session",
        {"di": DEVICE, "uid": OWNER, "accesstoken": tokens["accesstoken"], "login": True},
    )
    assert code == "2.04"
    code, _ = await post(device, "/oic/rd", {"di": DEVICE, "links": [LIGHT], "ttl": 0})
    assert code == "2.04"


async def test_a_device_signs_in_over_the_memory_port(
    devices: MemoryDevices, store: InMemoryEventStore, issuer: TokenIssuer
) -> None:
    device = devices.server.connect(Light())
    await sign_in(device, issuer)
    assert device.authenticated
    kinds = [type(e.data) for e in await events(store)]
    assert DeviceRegistered in kinds and DeviceOnline in kinds
    await until(lambda: "/light" in device.observations)


async def test_a_notification_becomes_an_event(
    devices: MemoryDevices, store: InMemoryEventStore, issuer: TokenIssuer
) -> None:
    device = devices.server.connect(Light())
    await sign_in(device, issuer)
    await until(lambda: "/light" in device.observations)
    device.notify("/light", cbor("2.05", {"value": True}))

    async def changed() -> list[Any]:
        return [
            e.data.content
            for e in await events(store)
            if isinstance(e.data, ResourceChanged) and e.data.href == "/light"
        ]

    deadline = time.monotonic() + 5
    while {"value": True} not in await changed():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.005)
    assert await changed() == [{"value": False}, {"value": True}]  # the first answer, then it


async def test_a_command_is_delivered(
    devices: MemoryDevices, store: InMemoryEventStore, issuer: TokenIssuer
) -> None:
    light = Light()
    device = devices.server.connect(light)
    await sign_in(device, issuer)
    pending = Event(
        owner=OWNER,
        device_id=DEVICE,
        data=CommandPending(href="/light", op="update", content={"value": True}),
        source="/test",
        correlation_id="cmd-1",
    )
    await store.append([binding.to_nats(pending)])
    await until(lambda: light.commands)
    assert cbor2.loads(light.commands[0].payload) == {"value": True}

    async def succeeded() -> bool:
        return any(isinstance(e.data, CommandSucceeded) for e in await events(store))

    deadline = time.monotonic() + 5
    while not await succeeded():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.005)


async def test_sign_off_closes_after_its_reply(
    devices: MemoryDevices, store: InMemoryEventStore, issuer: TokenIssuer
) -> None:
    device = devices.server.connect(Light())
    await sign_in(device, issuer)
    resp = await device.send(CoapRequest("DELETE", "/oic/sec/account", query=(f"di={DEVICE}",)))
    assert resp.code == "2.02"
    assert await asyncio.wait_for(device.wait_closed(), 5) == "signed off"

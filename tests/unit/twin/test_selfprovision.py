"""Self-provisioning in the twin service: the decision (twin.selfprovision: key and secret,
credentials, the device id) and the requests as the bus carries them
(twin.adapters.selfprovision_nats.SelfProvisionServer.decide) over the in-memory log, twin
store and token registry, through the command API's provisioning path (TwinApi.provision_as)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest

from eventstore.layout import StreamLayout
from eventstore.memory import InMemoryEventStore
from proto import api, binding, subjects
from proto import events as ev
from proto.devtokens import ALL_TOKENS, TOKEN_STREAM, token_hash
from proto.events import AnyEvent
from proto.selfprovision import ProvisionReply, ProvisionRequest, encode
from twin.adapters.selfprovision_nats import SelfProvisionServer
from twin.adapters.token_registry import LogTokenRegistry
from twin.api import ApiConfig, TwinApi, latest_twin
from twin.memory import InMemoryTwinStore
from twin.model import SIMPLE_PROFILE
from twin.selfprovision import (
    ALREADY_PROVISIONED,
    ONLY_ACCESS_TOKEN,
    Create,
    Profile,
    Profiles,
    answer,
    decide,
    device_id_for,
)

from .factory import T0
from .test_provisioning import Tokens, Validator

NOW = T0 + timedelta(seconds=1000)
TOKEN_LAYOUT = StreamLayout(name=TOKEN_STREAM, subjects=(ALL_TOKENS,), max_msgs_per_subject=1)
FACTORY = Profile("factory", "alice", "key-a", b"secret-a-0123456789")
LAB = Profile("lab", "bob", "key-b", b"secret-b-0123456789")
PROFILES = Profiles([FACTORY, LAB])


def request(
    name: str = "boiler", key: str = "key-a", secret: str = "secret-a-0123456789", **kw: Any
) -> Any:
    return ProvisionRequest(device_name=name, key=key, secret=secret, **kw)


# -- decisions ----------------------------------------------------------------------------


def test_the_right_key_and_secret_create_the_device_for_the_profiles_owner() -> None:
    got = decide(request(), PROFILES)
    assert got == Create(
        FACTORY, api.ProvisionDevice(device_id=device_id_for(FACTORY, "boiler"), name="boiler")
    )
    assert got.by == "provision-key:factory"
    lab = decide(request(key="key-b", secret="secret-b-0123456789"), PROFILES)
    assert isinstance(lab, Create) and lab.profile is LAB


@pytest.mark.parametrize(
    ("key", "secret"),
    [
        ("key-a", "secret-b-0123456789"),  # another profile's secret
        ("key-a", "secret-a-0123456789 "),
        ("key-a", ""),
        ("nope", "secret-a-0123456789"),  # an unknown key
        ("", ""),
    ],
)
def test_a_wrong_secret_or_an_unknown_key_is_not_found(key: str, secret: str) -> None:
    assert decide(request(key=key, secret=secret), PROFILES) == ProvisionReply(status="NOT_FOUND")


def test_no_profiles_nothing_found() -> None:
    assert decide(request(), Profiles()) == ProvisionReply(status="NOT_FOUND")


@pytest.mark.parametrize(
    "kw",
    [
        {"credentials_type": "X509_CERTIFICATE", "supplied": ("hash",)},
        {"credentials_type": "ACCESS_TOKEN", "supplied": ("token",)},
        {"credentials_type": "MQTT_BASIC"},
        {"supplied": ("username", "password")},
    ],
)
def test_only_server_generated_access_tokens(kw: dict[str, Any]) -> None:
    assert decide(request(**kw), PROFILES) == ProvisionReply(
        status="FAILURE", error_msg=ONLY_ACCESS_TOKEN
    )
    # said only to who knows the secret
    assert decide(request(secret="x", **kw), PROFILES) == ProvisionReply(status="NOT_FOUND")


def test_access_token_asked_for_explicitly_is_fine() -> None:
    assert isinstance(decide(request(credentials_type="ACCESS_TOKEN"), PROFILES), Create)


def test_a_device_name_is_required() -> None:
    got = decide(request(name=""), PROFILES)
    assert got == ProvisionReply(status="FAILURE", error_msg="deviceName is required")


def test_device_ids_are_derived_from_owner_profile_and_name() -> None:
    same = Profile("factory", "alice", "other-key", b"o" * 16)
    assert device_id_for(FACTORY, "boiler") == device_id_for(same, "boiler")
    ids = {
        device_id_for(FACTORY, "boiler"),
        device_id_for(FACTORY, "boiler2"),
        device_id_for(Profile("factory", "bob", "k", b"s" * 16), "boiler"),
        device_id_for(Profile("other", "alice", "k", b"s" * 16), "boiler"),
    }
    assert len(ids) == 4


def test_profiles_are_checked() -> None:
    with pytest.raises(ValueError, match="same key"):
        Profiles([FACTORY, Profile("x", "o", "key-a", b"s" * 16)])
    with pytest.raises(ValueError, match="twice"):
        Profiles([FACTORY, Profile("factory", "o", "k2", b"s" * 16)])
    with pytest.raises(ValueError, match="at least 16 bytes"):
        Profile("p", "o", "k", b"x" * 15)
    with pytest.raises(ValueError, match="strategy"):
        Profile("p", "o", "k", b"s" * 16, "check-pre-provisioned")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="owner"):
        Profile("p", "", "k", b"s" * 16)
    assert "secret-a" not in repr(FACTORY)


def test_answers_for_the_replies_of_provision_device() -> None:
    issued = api.DeviceTokenIssued(device_id="d", token="t", token_id="i", position=3)
    assert answer(api.Reply(ok=True, result=issued)) == ProvisionReply(
        status="SUCCESS", credentials_value="t", device_id="d"
    )
    as_decoded = api.Reply(
        ok=True, result={"device_id": "d", "token": "t", "token_id": "i", "position": 3}
    )
    assert answer(as_decoded).credentials_value == "t"

    def err(code: api.ErrorCode) -> api.Reply:
        return api.Reply(ok=False, error=api.ApiError(code=code, message="m"))

    assert answer(err("conflict")) == ProvisionReply(
        status="FAILURE", error_msg=ALREADY_PROVISIONED
    )
    assert answer(err("bad_request")) == ProvisionReply(status="FAILURE", error_msg="m")
    assert answer(err("unavailable")).status == "UNAVAILABLE"
    assert answer(err("internal")).status == "UNAVAILABLE"


# -- through the command API's path, as the bus carries the requests ----------------------


@dataclass
class World:
    log: InMemoryEventStore
    registry: LogTokenRegistry
    twins: InMemoryTwinStore
    server: SelfProvisionServer

    async def ask(self, req: ProvisionRequest) -> ProvisionReply:
        return await self.server.decide(encode(req))

    async def events(self, device: str) -> list[AnyEvent]:
        f = subjects.event_filter(device=device)
        return [binding.from_stored(m) async for m in self.log.read(f)]


class NoBus:
    """Not used by ``decide``: the transport is tested on a real server (tests/e2e)."""


@pytest.fixture
async def world() -> World:
    log = InMemoryEventStore()
    await log.provision()
    registry_log = InMemoryEventStore(TOKEN_LAYOUT)
    await registry_log.provision()
    registry = LogTokenRegistry(registry_log)
    twins = InMemoryTwinStore()
    twin_api = TwinApi(
        log,
        twins,
        Validator(),
        ApiConfig(projector="p"),
        clock=lambda: NOW.timestamp(),
        tokens=registry,
        new_token=Tokens(),
    )
    server = SelfProvisionServer(NoBus(), twin_api, PROFILES)  # type: ignore[arg-type]
    return World(log, registry, twins, server)


async def test_provisioned_for_the_owner_recorded_as_the_profiles(world: World) -> None:
    got = await world.ask(request())
    device = device_id_for(FACTORY, "boiler")
    assert got == ProvisionReply(status="SUCCESS", credentials_value="token-1", device_id=device)
    entry = await world.registry.get(token_hash("token-1"))
    assert entry is not None
    assert (entry.record.owner, entry.record.device_id, entry.record.state) == (
        "alice",
        device,
        "active",
    )
    (e,) = await world.events(device)
    assert isinstance(e.data, ev.DeviceProvisioned) and e.owner == "alice"
    assert (e.data.name, e.data.provisioned_by, e.data.token_hash) == (
        "boiler",
        "provision-key:factory",
        token_hash("token-1"),
    )
    twin = await latest_twin(world.twins, world.log, device)
    assert twin is not None
    assert (twin.owner, twin.profile, twin.name) == ("alice", SIMPLE_PROFILE, "boiler")


async def test_the_same_name_twice_is_a_failure(world: World) -> None:
    assert (await world.ask(request())).status == "SUCCESS"
    again = await world.ask(request())
    assert again == ProvisionReply(status="FAILURE", error_msg=ALREADY_PROVISIONED)
    assert len(await world.events(device_id_for(FACTORY, "boiler"))) == 1
    # the token of the refused attempt was never handed out: its record is revoked again
    entry = await world.registry.get(token_hash("token-2"))
    assert entry is None or entry.record.state == "revoked"
    # the same name under another profile is another device
    assert (await world.ask(request(key="key-b", secret="secret-b-0123456789"))).status == "SUCCESS"


async def test_a_wrong_secret_provisions_nothing(world: World) -> None:
    assert await world.ask(request(secret="guess")) == ProvisionReply(status="NOT_FOUND")
    assert await world.events(device_id_for(FACTORY, "boiler")) == []
    assert await world.registry.get(token_hash("token-1")) is None


async def test_a_bad_name_is_a_failure_with_the_reason(world: World) -> None:
    got = await world.ask(request(name="bad\nname"))
    assert got.status == "FAILURE" and "printable" in got.error_msg


async def test_a_malformed_bus_request_is_not_found(world: World) -> None:
    assert await world.server.decide(b"{") == ProvisionReply(status="NOT_FOUND")
    assert await world.server.decide(b'{"key": "key-a"}') == ProvisionReply(status="NOT_FOUND")


async def test_without_a_token_registry_it_is_unavailable(world: World) -> None:
    twin_api = TwinApi(world.log, world.twins, Validator(), ApiConfig(projector="p"))  # no registry
    server = SelfProvisionServer(NoBus(), twin_api, PROFILES)  # type: ignore[arg-type]
    got = await server.decide(encode(request()))
    assert got.status == "UNAVAILABLE"

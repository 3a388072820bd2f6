"""Provisioning of simple devices: the sans-IO decisions (twin.provisioning) and the driver
(twin.api) over the in-memory log, twin store and token registry."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import msgspec
import pytest

from auth.tokens import Claims
from eventstore.errors import ConcurrencyError
from eventstore.layout import StreamLayout
from eventstore.memory import InMemoryEventStore
from proto import api, binding, subjects
from proto import events as ev
from proto.devtokens import ALL_TOKENS, TOKEN_STREAM, TokenRecord, token_hash, token_id
from proto.events import AnyEvent
from twin import provisioning
from twin.adapters.token_registry import LogTokenRegistry
from twin.api import ApiConfig, TwinApi, latest_twin
from twin.commands import Answer
from twin.fold import fold
from twin.memory import InMemoryTwinStore
from twin.model import SIMPLE_PROFILE, Twin
from twin.ports import TokenEntry

from .factory import T0, event

NOW = T0 + timedelta(seconds=1000)
NOW_MS = int(NOW.timestamp() * 1000)
TOKEN_LAYOUT = StreamLayout(name=TOKEN_STREAM, subjects=(ALL_TOKENS,), max_msgs_per_subject=1)


def simple(owner: str = "alice", h: str = "") -> Twin:
    twin = fold(None, event(ev.DeviceProvisioned(token_hash=h or token_hash("t0")), 1, owner=owner))
    assert twin is not None
    return twin


def provision(**kw: Any) -> api.ProvisionDevice:
    return api.ProvisionDevice(**kw)


def plan(decision: Answer | provisioning.TokenPlan) -> provisioning.TokenPlan:
    assert isinstance(decision, provisioning.TokenPlan), decision
    return decision


def code(decision: Answer | provisioning.TokenPlan) -> str | None:
    assert isinstance(decision, Answer)
    return None if decision.reply.error is None else decision.reply.error.code


# -- decisions ------------------------------------------------------------------------------


def test_provisioning_writes_the_record_then_appends_the_event() -> None:
    p = plan(
        provisioning.decide(
            provision(name="boiler"),
            "alice",
            None,
            NOW,
            device_id="d1",
            token="sEcReT-tOkEn",
            caller="alice-app",
            expected_last=0,
        )
    )
    (write,) = p.writes
    assert write == provisioning.RegistryWrite(
        token_hash("sEcReT-tOkEn"),
        TokenRecord(owner="alice", device_id="d1", profile=SIMPLE_PROFILE, issued_at_ms=NOW_MS),
        0,
    )
    assert p.issued == token_hash("sEcReT-tOkEn")
    (e,) = p.record.events
    assert (e.owner, e.device_id) == ("alice", "d1")
    assert e.data == ev.DeviceProvisioned(
        name="boiler", token_hash=token_hash("sEcReT-tOkEn"), provisioned_by="alice-app"
    )
    assert b"sEcReT-tOkEn" not in binding.to_nats(e).data  # the token is never in the log
    assert (p.record.scope, p.record.expected_last) == (subjects.device_scope("d1"), 0)
    reply = p.record.reply([7])
    assert reply.result == api.DeviceTokenIssued(
        device_id="d1", token="sEcReT-tOkEn", token_id=token_id("sEcReT-tOkEn"), position=7
    )


def test_provisioning_an_existing_device_is_a_conflict() -> None:
    for twin in (simple(), simple("bob"), fold(None, event(ev.DeviceRegistered(), 1))):
        d = provisioning.decide(provision(), "alice", twin, NOW, device_id="d1", token="t")
        assert code(d) == "conflict"
    mine = provisioning.decide(provision(), "alice", simple(), NOW, device_id="d1", token="t")
    assert isinstance(mine, Answer) and mine.reply.error is not None
    assert "rotate" in mine.reply.error.message


@pytest.mark.parametrize(
    "request_",
    [
        api.ProvisionDevice(device_id=""),
        api.ProvisionDevice(device_id="x" * 2000),
        api.ProvisionDevice(name="x" * 257),
        api.ProvisionDevice(name="tab\there"),
        api.RevokeDeviceToken(device_id=""),
    ],
)
def test_bad_requests(request_: provisioning.TokenRequest) -> None:
    d = provisioning.decide(request_, "alice", None, NOW, device_id="d1", token="t")
    assert code(d) == "bad_request"


def test_revoke_and_rotate_only_the_owners_simple_devices() -> None:
    ocf = fold(None, event(ev.DeviceRegistered(), 1))
    for request in (api.RevokeDeviceToken(device_id="d1"), api.RotateDeviceToken(device_id="d1")):
        assert code(
            provisioning.decide(request, "alice", None, NOW, device_id="d1", token="t")
        ) == ("not_found")
        d = provisioning.decide(request, "alice", simple("bob"), NOW, device_id="d1", token="t")
        assert code(d) == "forbidden"
        d = provisioning.decide(request, "alice", ocf, NOW, device_id="d1", token="t")
        assert code(d) == "bad_request"


def test_revoke_revokes_the_current_record_then_records_the_change() -> None:
    twin = simple()
    old = token_hash("t0")
    current = TokenEntry(TokenRecord(owner="alice", device_id="d1", issued_at_ms=5), position=12)
    p = plan(
        provisioning.decide(
            api.RevokeDeviceToken(device_id="d1"),
            "alice",
            twin,
            NOW,
            device_id="d1",
            token=None,
            current=current,
            expected_last=3,
        )
    )
    (write,) = p.writes
    assert (write.hashed, write.record.state, write.expected_last) == (old, "revoked", 12)
    assert p.issued == ""
    (e,) = p.record.events
    assert e.data == ev.DeviceTokenChanged(
        token_hash="", previous_token_hash=old, reason="revoked", changed_by="alice"
    )
    assert p.record.scope == subjects.event_filter("alice", "d1", ev.DeviceTokenChanged.KIND)
    assert p.record.expected_last == 3
    assert p.record.reply([20]).result == api.DeviceTokenRevoked(
        device_id="d1", token_id=old[:12], position=20
    )
    # the record says revoked already (a revocation cut short): only the event is left to write
    done = TokenEntry(msgspec.structs.replace(current.record, state="revoked"), 13)
    again = plan(
        provisioning.decide(
            api.RevokeDeviceToken(device_id="d1"),
            "alice",
            twin,
            NOW,
            device_id="d1",
            token=None,
            current=done,
        )
    )
    assert again.writes == () and len(again.record.events) == 1
    # no token any more: nothing to do
    gone = fold(twin, event(ev.DeviceTokenChanged(reason="revoked"), 2))
    d = provisioning.decide(
        api.RevokeDeviceToken(device_id="d1"), "alice", gone, NOW, device_id="d1", token=None
    )
    assert isinstance(d, Answer) and d.reply.result == api.DeviceTokenRevoked(device_id="d1")


def test_rotate_writes_the_new_record_revokes_the_old_then_records_the_change() -> None:
    twin = simple()
    old = token_hash("t0")
    current = TokenEntry(TokenRecord(owner="alice", device_id="d1"), position=12)
    p = plan(
        provisioning.decide(
            api.RotateDeviceToken(device_id="d1"),
            "alice",
            twin,
            NOW,
            device_id="d1",
            token="t1",
            current=current,
        )
    )
    new, revoke = p.writes
    assert (new.hashed, new.record.state, new.expected_last) == (token_hash("t1"), "active", 0)
    assert (revoke.hashed, revoke.record.state, revoke.expected_last) == (old, "revoked", 12)
    (e,) = p.record.events
    assert e.data == ev.DeviceTokenChanged(
        token_hash=token_hash("t1"), previous_token_hash=old, reason="rotated", changed_by="alice"
    )
    assert p.record.reply([30]).result == api.DeviceTokenIssued(
        device_id="d1", token="t1", token_id=token_id("t1"), position=30
    )


# -- the driver ---------------------------------------------------------------------------


class Validator:
    def validate(self, token: str, now: float) -> Claims:
        return Claims(owner=token, device_id=None, expires_at=None, raw={"sub": token})


class Tokens:
    def __init__(self) -> None:
        self.n = 0

    def __call__(self) -> str:
        self.n += 1
        return f"token-{self.n}"


@dataclass
class World:
    log: InMemoryEventStore
    registry_log: InMemoryEventStore
    registry: LogTokenRegistry
    twins: InMemoryTwinStore
    api: TwinApi

    async def call(self, request: api.ApiRequest, token: str = "alice") -> api.Reply:
        reply = await self.api.handle(request.OP, api.encode_request(request), token)
        return api.decode_reply(api.encode_reply(reply))

    async def issued(self, request: api.ApiRequest, token: str = "alice") -> api.DeviceTokenIssued:
        reply = await self.call(request, token)
        assert reply.ok, reply.error
        return msgspec.convert(reply.result, api.DeviceTokenIssued)

    async def code(self, request: api.ApiRequest, token: str = "alice") -> str:
        reply = await self.call(request, token)
        assert reply.error is not None, reply
        return reply.error.code

    async def events(self, device: str) -> list[AnyEvent]:
        f = subjects.event_filter(device=device)
        return [binding.from_stored(m) async for m in self.log.read(f)]

    async def state(self, token: str) -> str | None:
        entry = await self.registry.get(token_hash(token))
        return None if entry is None else entry.record.state


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
        new_device_id=lambda: "generated-1",
    )
    return World(log, registry_log, registry, twins, twin_api)


async def test_provision_rotate_revoke(world: World) -> None:
    got = await world.issued(api.ProvisionDevice(device_id="d1", name="boiler"))
    assert (got.device_id, got.token, got.token_id) == ("d1", "token-1", token_id("token-1"))
    entry = await world.registry.get(token_hash(got.token))
    assert entry is not None
    assert entry.record == TokenRecord(
        owner="alice", device_id="d1", profile=SIMPLE_PROFILE, issued_at_ms=NOW_MS
    )
    (e,) = await world.events("d1")
    assert e.position == got.position and isinstance(e.data, ev.DeviceProvisioned)
    assert (e.data.token_hash, e.data.name, e.data.provisioned_by) == (
        token_hash("token-1"),
        "boiler",
        "alice",
    )
    twin = await latest_twin(world.twins, world.log, "d1")
    assert twin is not None and (twin.owner, twin.profile, twin.name) == (
        "alice",
        SIMPLE_PROFILE,
        "boiler",
    )

    rotated = await world.issued(api.RotateDeviceToken(device_id="d1"))
    assert rotated.token == "token-2"
    assert (await world.state("token-1"), await world.state("token-2")) == ("revoked", "active")
    twin = await latest_twin(world.twins, world.log, "d1")
    assert twin is not None and twin.token_hash == token_hash("token-2")

    reply = await world.call(api.RevokeDeviceToken(device_id="d1"))
    result = msgspec.convert(reply.result, api.DeviceTokenRevoked)
    assert result.token_id == token_id("token-2") and result.position is not None
    assert await world.state("token-2") == "revoked"
    kinds = [e.kind for e in await world.events("d1")]
    assert kinds == ["device-provisioned", "device-token-changed", "device-token-changed"]
    # revoking again: nothing more to revoke, nothing recorded
    again = msgspec.convert(
        (await world.call(api.RevokeDeviceToken(device_id="d1"))).result, api.DeviceTokenRevoked
    )
    assert again == api.DeviceTokenRevoked(device_id="d1")
    assert len(await world.events("d1")) == 3
    # a revoked device gets a token again by rotation
    assert (await world.issued(api.RotateDeviceToken(device_id="d1"))).token == "token-3"
    assert await world.state("token-3") == "active"


async def test_a_generated_device_id(world: World) -> None:
    got = await world.issued(api.ProvisionDevice())
    assert got.device_id == "generated-1"


async def test_provisioning_an_existing_id_conflicts_and_leaves_no_working_token(
    world: World,
) -> None:
    await world.issued(api.ProvisionDevice(device_id="d1"))
    assert await world.code(api.ProvisionDevice(device_id="d1")) == "conflict"
    assert await world.code(api.ProvisionDevice(device_id="d1"), token="bob") == "conflict"
    assert await world.state("token-2") is None  # decided before any write
    assert len(await world.events("d1")) == 1


async def test_another_owner_can_neither_revoke_nor_rotate(world: World) -> None:
    got = await world.issued(api.ProvisionDevice(device_id="d1"))
    assert await world.code(api.RevokeDeviceToken(device_id="d1"), token="bob") == "forbidden"
    assert await world.code(api.RotateDeviceToken(device_id="d1"), token="bob") == "forbidden"
    assert await world.state(got.token) == "active"
    assert len(await world.events("d1")) == 1


async def test_a_lost_race_revokes_the_token_it_wrote(world: World) -> None:
    """Another twin instance records a provisioning of the same id between this one's check and
    its append: this one answers conflict and revokes the record it wrote first."""

    class Racing(LogTokenRegistry):
        async def put(self, hashed: str, record: TokenRecord, *, expected_last: int) -> int:
            position = await super().put(hashed, record, expected_last=expected_last)
            if record.state == "active":
                other: AnyEvent = ev.Event(
                    owner="bob",
                    device_id="d1",
                    data=ev.DeviceProvisioned(token_hash="f" * 64),
                    source="/other-twin",
                )
                await world.log.append([binding.to_nats(other)])
            return position

    world.api = TwinApi(
        world.log,
        world.twins,
        Validator(),
        clock=lambda: NOW.timestamp(),
        tokens=Racing(world.registry_log),
        new_token=Tokens(),
    )
    assert await world.code(api.ProvisionDevice(device_id="d1")) == "conflict"
    assert await world.state("token-1") == "revoked"
    assert [e.owner for e in await world.events("d1")] == ["bob"]


async def test_racing_rotations_leave_one_token_active(world: World) -> None:
    await world.issued(api.ProvisionDevice(device_id="d1"))
    results = await asyncio.gather(
        *(world.issued(api.RotateDeviceToken(device_id="d1")) for _ in range(4))
    )
    twin = await latest_twin(world.twins, world.log, "d1")
    assert twin is not None
    states = {r.token: await world.state(r.token) for r in results}
    active = [t for t, s in states.items() if s == "active"]
    assert [token_hash(t) for t in active] == [twin.token_hash]
    assert await world.state("token-1") == "revoked"


async def test_without_a_registry_the_operations_are_unavailable(world: World) -> None:
    bare = TwinApi(world.log, world.twins, Validator(), clock=lambda: NOW.timestamp())
    for request in (api.ProvisionDevice(), api.RevokeDeviceToken(device_id="d1")):
        reply = await bare.handle(request.OP, api.encode_request(request), "alice")
        assert reply.error is not None and reply.error.code == "unavailable"


async def test_the_registry_writes_conditionally(world: World) -> None:
    record = TokenRecord(owner="alice", device_id="d1")
    first = await world.registry.put("a" * 64, record, expected_last=0)
    assert await world.registry.put("a" * 64, record, expected_last=0) == first  # a retry
    with pytest.raises(ConcurrencyError):
        await world.registry.put(
            "a" * 64, msgspec.structs.replace(record, state="revoked"), expected_last=first + 5
        )
    assert await world.registry.get("a" * 64) == TokenEntry(record, first)
    assert await world.registry.get("b" * 64) is None

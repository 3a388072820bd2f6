"""The command API (sans-IO core and its driver) over the in-memory log and twin store."""

from __future__ import annotations

import dataclasses
import logging
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from auth.application import AppTokenValidator
from auth.errors import TokenError, UnknownKey
from auth.tokens import Claims, TokenIssuer
from eventstore.memory import InMemoryEventStore
from proto import api, binding, subjects
from proto import events as ev
from proto.events import AnyEvent
from twin import commands
from twin.api import ApiConfig, TwinApi, latest_twin
from twin.memory import InMemoryTwinStore
from twin.model import COMMAND_MEMORY
from twin.service import ProjectorConfig, TwinProjector
from twin.sweeper import ExpirySweeper

from .factory import T0

NOW = T0.timestamp() + 1000


def claims(owner: str) -> Claims:
    return Claims(owner=owner, device_id=None, expires_at=None)


class Validator:
    """Tokens are "owner"; anything else is refused (as auth's validators refuse: TokenError).

    The application-token rules themselves (refresh and device tokens refused, ...) are
    auth's, tested in tests/unit/auth/test_application.py."""

    def validate(self, token: str, now: float) -> Claims:
        if not token.isalnum():
            raise TokenError("bad token")
        return claims(token)


class Clock:
    def __init__(self) -> None:
        self.t = NOW

    def __call__(self) -> float:
        return self.t


@dataclass
class World:
    log: InMemoryEventStore
    twins: InMemoryTwinStore
    api: TwinApi
    clock: Clock

    async def call(self, request: api.ApiRequest, token: str | None = "alice") -> api.Reply:
        reply = await self.api.handle(request.OP, api.encode_request(request), token)
        return api.decode_reply(api.encode_reply(reply))  # as a client sees it

    async def ok(self, request: api.ApiRequest, token: str = "alice") -> Any:
        reply = await self.call(request, token)
        assert reply.ok, reply.error
        return reply.result

    async def code(self, request: api.ApiRequest, token: str | None = "alice") -> str:
        reply = await self.call(request, token)
        assert not reply.ok and reply.error is not None
        return reply.error.code

    async def append(self, data: ev.EventData, owner: str = "alice", **kw: Any) -> int:
        e: AnyEvent = ev.Event(
            owner=owner, device_id=kw.pop("device", "d1"), data=data, source="/t", **kw
        )
        return (await self.log.append([binding.to_nats(e)])).last_position

    async def events(self, kind: str | None = None) -> list[AnyEvent]:
        f = subjects.event_filter(device="d1", kind=kind)
        return [binding.from_stored(m) async for m in self.log.read(f)]

    async def project(self) -> None:
        """Fold the whole log into the store (what the projector does)."""
        async with TwinProjector(self.twins, self.log, ProjectorConfig(name="p")) as p:
            await p.wait_for_position(await self.log.last_position(), 5)


@pytest.fixture
async def world() -> World:
    log = InMemoryEventStore()
    await log.provision()
    twins = InMemoryTwinStore()
    clock = Clock()
    w = World(
        log, twins, TwinApi(log, twins, Validator(), ApiConfig(projector="p"), clock=clock), clock
    )
    await w.append(ev.DeviceRegistered())
    await w.append(ev.DeviceRegistered(), owner="bob", device="b1")
    return w


def update(cid: str | None = None, **kw: Any) -> api.UpdateResource:
    kw.setdefault("content", {"value": True})
    return api.UpdateResource(device_id="d1", href="/light", correlation_id=cid, **kw)


async def test_command_is_recorded_before_the_reply(world: World) -> None:
    result = msgspec.convert(await world.ok(update("c-1", ttl=30)), api.CommandAccepted)
    assert result.correlation_id == "c-1"
    (pending,) = await world.events("command-pending")
    assert pending.position == result.position
    assert pending.correlation_id == "c-1"
    assert isinstance(pending.data, ev.CommandPending)
    assert pending.data.content == {"value": True}
    assert pending.data.expires_at is not None
    assert pending.data.expires_at.timestamp() == pytest.approx(NOW + 30)
    assert result.expires_at.endswith("Z")


async def test_generated_correlation_id(world: World) -> None:
    result = await world.ok(api.RetrieveResource(device_id="d1", href="/oic/d"))
    uuid.UUID(result["correlation_id"])


async def test_a_repeated_command_request_gets_the_original_answer(world: World) -> None:
    """Issue 11 item 4: the same request again is never recorded again, open or ended, in the
    log only or projected too; a different one under the same id is a conflict."""
    first = msgspec.convert(await world.ok(update("dup", ttl=30)), api.CommandAccepted)
    assert not first.repeated and first.state == "pending" and first.outcome is None
    original = msgspec.structs.replace(first, repeated=True)  # what every repeat answers

    async def repeat() -> api.CommandAccepted:
        return msgspec.convert(await world.ok(update("dup", ttl=30)), api.CommandAccepted)

    # open, recorded in the log only (the twin that recorded it may have died before replying)
    assert await world.twins.get("d1") is None
    assert await repeat() == original
    assert await world.code(update("dup", ttl=30, content={"value": False})) == "conflict"
    await world.project()  # open, projected
    assert await repeat() == original
    sent = ev.CommandSent(href="/light", gateway="g", connection_id="c")
    await world.append(sent, correlation_id="dup")
    assert await repeat() == msgspec.structs.replace(original, state="sent")
    end = await world.append(
        ev.CommandSucceeded(href="/light", status="2.04"), correlation_id="dup"
    )
    done = await repeat()  # ended, in the log only
    assert done.state == "succeeded" and done.outcome is not None
    assert (done.outcome.position, done.outcome.status, done.outcome.attempts) == (end, "2.04", 1)
    assert msgspec.structs.replace(done, state="pending", outcome=None) == original
    await world.project()  # ended, projected: the store remembers it
    assert await repeat() == done
    reply = await world.call(update("dup", ttl=31))
    assert reply.error is not None and reply.error.code == "conflict"
    assert "ttl" in reply.error.message
    assert len(await world.events("command-pending")) == 1


async def test_a_correlation_id_is_free_again_after_the_memory_of_its_command(
    world: World,
) -> None:
    await world.ok(update("x"))
    await world.append(ev.CommandSucceeded(href="/light", status="2.04"), correlation_id="x")
    await world.project()
    ended = await world.twins.ended_command("d1", "x")
    assert ended is not None and ended.forget_at is not None
    assert ended.forget_at == ended.outcome.at + COMMAND_MEMORY if ended.outcome else False
    world.clock.t = ended.forget_at.timestamp()  # forgotten (not yet deleted): a new command
    again = msgspec.convert(await world.ok(update("x")), api.CommandAccepted)
    assert not again.repeated
    assert [e.position for e in await world.events("command-pending")][-1] == again.position
    assert (await world.ok(update("x")))["repeated"]  # and that one is remembered


async def test_one_id_on_two_devices_names_two_commands(world: World) -> None:
    await world.append(ev.DeviceRegistered(), device="d2")
    a = await world.ok(update("same"))
    b = await world.ok(msgspec.structs.replace(update("same"), device_id="d2"))
    assert a["position"] != b["position"] and not a.get("repeated") and not b.get("repeated")


async def test_a_command_of_the_devices_previous_owner_is_never_shown(world: World) -> None:
    await world.append(ev.DeviceRegistered(), device="b2", owner="bob")
    cmd = msgspec.structs.replace(update("shared"), device_id="b2")
    await world.ok(cmd, token="bob")
    await world.append(ev.DeviceUnregistered(), device="b2", owner="bob")
    await world.append(ev.DeviceRegistered(), device="b2", owner="alice")  # now alice's
    # bob's command is still open (the projector cancels it): the id is in use, nothing shown
    reply = await world.call(cmd)
    assert reply.error is not None and reply.error.code == "conflict"
    assert "bob" not in reply.error.message and "value" not in reply.error.message
    canceled = ev.CommandCanceled(href="/light", reason="device signed off")
    await world.append(canceled, device="b2", owner="bob", correlation_id="shared")
    await world.project()
    assert await world.twins.ended_command("b2", "shared") is not None  # bob's, remembered
    mine = await world.ok(cmd)  # ended: not alice's to see, so a new command of hers
    assert not mine.get("repeated")
    assert "outcome" not in mine


async def test_authorization(world: World) -> None:
    assert await world.code(update(), token=None) == "unauthorized"
    assert await world.code(update(), token="garbage!") == "unauthorized"
    assert await world.code(update(), token="refresh:alice") == "unauthorized"
    assert await world.code(update(), token="bob") == "forbidden"
    assert await world.code(api.GetTwin(device_id="d1"), token="bob") == "forbidden"
    assert await world.code(api.CancelCommands(device_id="d1"), token="bob") == "forbidden"
    assert await world.code(api.ListPending(device_id="d1"), token="bob") == "forbidden"
    assert await world.code(api.GetTwin(device_id="nobody")) == "not_found"
    assert await world.code(update().__class__(device_id="zz", href="/a", content=1)) == (
        "not_found"
    )
    assert await world.events("command-pending") == []


@pytest.mark.parametrize(
    ("op", "body"),
    [
        ("update", b"{not json"),
        ("update", b'{"device_id": "d1"}'),
        ("update", b'{"device_id": "d1", "href": "/a"}'),  # no content
        ("update", b'{"device_id": "d1", "href": "a", "content": 1}'),  # href
        ("update", b'{"device_id": "d1", "href": "/a", "content": 1, "ttl": 0}'),
        ("update", b'{"device_id": "d1", "href": "/a", "content": 1, "ttl": 1e9}'),
        ("update", b'{"device_id": "", "href": "/a", "content": 1}'),
        (
            "update",
            b'{"device_id": "d1", "href": "/a", "content_b64": "***", "content_format": 60}',
        ),
        ("retrieve", b'{"device_id": "d1", "href": "/a", "correlation_id": ""}'),
        ("retrieve", b'{"device_id": "d1", "href": "/a", "max_attempts": 0}'),
        ("pending-list", b'{"limit": 0}'),
        ("nope", b"{}"),
    ],
)
async def test_malformed_requests_get_bad_request(world: World, op: str, body: bytes) -> None:
    reply = await world.api.handle(op, body, "alice")
    assert reply.error is not None and reply.error.code == "bad_request", reply


async def test_cancel(world: World) -> None:
    await world.ok(update("a"))
    await world.ok(update("b"))
    await world.ok(api.RetrieveResource(device_id="d1", href="/other", correlation_id="c"))
    one = await world.ok(api.CancelCommands(device_id="d1", correlation_id="a"))
    assert one["canceled"] == ["a"]
    assert await world.code(api.CancelCommands(device_id="d1", correlation_id="a")) == ("not_found")
    by_href = await world.ok(api.CancelCommands(device_id="d1", href="/light"))
    assert by_href["canceled"] == ["b"]
    rest = await world.ok(api.CancelCommands(device_id="d1"))
    assert rest["canceled"] == ["c"]
    assert (await world.ok(api.CancelCommands(device_id="d1")))["canceled"] == []
    canceled = await world.events("command-canceled")
    assert [e.correlation_id for e in canceled] == ["a", "b", "c"]
    twin = await latest_twin(world.twins, world.log, "d1")
    assert twin is not None and twin.pending == ()


async def test_desired_set_supersedes_pending_desired_updates(world: World) -> None:
    first = await world.ok(api.SetDesired(device_id="d1", href="/light", content={"value": True}))
    assert (first["version"], first["superseded"]) == (1, [])
    # the gateway issued an update for the delta
    await world.append(
        ev.CommandPending(href="/light", op="update", content={"value": True}, reason="desired"),
        correlation_id="desired-1",
    )
    await world.ok(update("user"))  # a user's update is not superseded
    second = await world.ok(api.SetDesired(device_id="d1", href="/light", content={"value": False}))
    assert (second["version"], second["superseded"]) == (2, ["desired-1"])
    (canceled,) = await world.events("command-canceled")
    assert isinstance(canceled.data, ev.CommandCanceled)
    assert (canceled.correlation_id, canceled.data.reason) == ("desired-1", "superseded")
    assert canceled.position is not None and canceled.position < second["position"]
    cleared = await world.ok(api.ClearDesired(device_id="d1", href="/light"))
    assert cleared["version"] == 3
    noop = await world.ok(api.ClearDesired(device_id="d1", href="/light"))
    assert (noop["version"], noop["position"]) == (3, None)
    again = await world.ok(api.SetDesired(device_id="d1", href="/light", content={"value": 1}))
    assert again["version"] == 4
    twin = await latest_twin(world.twins, world.log, "d1")
    assert twin is not None
    assert twin.delta() == {"/light": {"value": 1}}
    assert [c.correlation_id for c in twin.pending] == ["user"]


async def test_get_twin_and_lists(world: World) -> None:
    await world.ok(update("p1"))
    got = msgspec.convert(await world.ok(api.GetTwin(device_id="d1")), api.TwinResult)
    assert got.position == await world.log.last_position(subjects.device_scope("d1"))
    assert [c["correlation_id"] for c in got.twin["pending"]] == ["p1"]
    one = msgspec.convert(await world.ok(api.ListPending(device_id="d1")), api.PendingList)
    (p1,) = one.commands
    assert (p1.correlation_id, p1.op, p1.content, p1.max_attempts) == (
        "p1",
        "update",
        {"value": True},
        3,
    )
    assert p1.position == got.twin["pending"][0]["position"]
    # across devices: from the store, once projected
    await world.project()
    listed = await world.ok(api.ListPending())
    assert [c["correlation_id"] for c in listed["commands"]] == ["p1"]
    assert (await world.ok(api.ListPending(state="sent")))["commands"] == []
    devices = msgspec.convert(await world.ok(api.ListDevices()), api.DeviceList)
    assert [d["device_id"] for d in devices.devices] == ["d1"]  # bob's b1 is not listed
    assert devices.position == await world.log.last_position()


async def test_concurrent_commands_with_one_id_record_one(world: World) -> None:
    import asyncio

    replies = await asyncio.gather(*(world.call(update("same")) for _ in range(5)))
    assert all(r.ok for r in replies)
    results = [msgspec.convert(r.result, api.CommandAccepted) for r in replies]
    assert len({(a.position, a.expires_at) for a in results}) == 1  # the original, to every one
    assert sum(not a.repeated for a in results) == 1
    assert len(await world.events("command-pending")) == 1


async def test_concurrent_different_commands_with_one_id_record_one(world: World) -> None:
    import asyncio

    replies = await asyncio.gather(
        *(world.call(update("same", content={"value": i})) for i in range(5))
    )
    assert sum(r.ok for r in replies) == 1
    assert {r.error.code for r in replies if r.error is not None} == {"conflict"}
    assert len(await world.events("command-pending")) == 1


async def test_sweeper_expires_due_commands_once(world: World) -> None:
    await world.ok(update("short", ttl=5))
    await world.ok(update("long", ttl=500))
    await world.project()
    sweeper = ExpirySweeper(world.twins, world.log, clock=world.clock)
    assert await sweeper.sweep() == 0
    world.clock.t += 6
    assert await sweeper.sweep() == 1
    assert await sweeper.sweep() == 0  # the store still shows it open: the tail says it ended
    (expired,) = await world.events("command-expired")
    assert expired.correlation_id == "short"
    await world.project()
    twin = await world.twins.get("d1")
    assert twin is not None
    assert [c.correlation_id for c in twin.pending] == ["long"]
    assert twin.recent_outcomes[-1].state == "expired"


async def test_projector_appends_desired_reached(world: World) -> None:
    await world.ok(api.SetDesired(device_id="d1", href="/light", content={"value": True}))
    await world.append(ev.ResourceChanged(href="/light", content={"value": False}))
    await world.project()
    assert await world.events("desired-reached") == []
    await world.append(ev.ResourceChanged(href="/light", content={"value": True, "x": 1}))
    await world.project()
    await world.project()  # folds the reached event; a replay appends nothing new
    (reached,) = await world.events("desired-reached")
    assert isinstance(reached.data, ev.DesiredReached) and reached.data.version == 1
    twin = await world.twins.get("d1")
    assert twin is not None and twin.desired[0].reached and twin.delta() == {}


def test_decide_is_pure() -> None:
    from twin.fold import fold_all

    from .factory import event

    twin = fold_all(None, [event(ev.DeviceRegistered(), 1)])
    now = T0 + timedelta(seconds=5)
    a = commands.decide(update("x"), "alice", twin, now, expected_last=0)
    b = commands.decide(update("x"), "alice", twin, now, expected_last=0)
    assert isinstance(a, commands.Record) and isinstance(b, commands.Record)
    assert a.events == b.events  # same decision, same event ids: a retried append dedups
    c = commands.decide(update("x"), "alice", twin, now, expected_last=7)
    assert isinstance(c, commands.Record) and c.events[0].id != a.events[0].id
    assert a.scope == "twinhub.ev.alice.d1.command-pending.>"


async def test_projector_cancels_the_commands_of_a_signed_off_device(world: World) -> None:
    await world.ok(update("a"))
    await world.ok(api.RetrieveResource(device_id="d1", href="/other", correlation_id="b"))
    await world.project()
    await world.append(ev.DeviceUnregistered(reason="sign-off"))
    await world.project()
    await world.project()  # folds the cancels; a replay appends nothing new
    canceled = await world.events("command-canceled")
    assert [e.correlation_id for e in canceled] == ["a", "b"]
    assert all(
        isinstance(e.data, ev.CommandCanceled)
        and e.data.reason == commands.SIGNED_OFF_REASON
        and e.source == commands.TWIN_SOURCE
        for e in canceled
    )
    twin = await world.twins.get("d1")
    assert twin is not None and twin.deleted and twin.pending == ()
    assert [(o.correlation_id, o.state) for o in twin.recent_outcomes] == [
        ("a", "canceled"),
        ("b", "canceled"),
    ]


async def test_sign_off_and_sign_up_again_in_one_batch(world: World) -> None:
    """The projector folds both before it looks: commands from before the sign-off still end."""
    await world.ok(update("before"))
    await world.append(ev.DeviceUnregistered(reason="sign-off"))
    await world.append(ev.DeviceRegistered())
    await world.ok(update("after"))
    await world.project()
    await world.project()
    (canceled,) = await world.events("command-canceled")
    assert canceled.correlation_id == "before"
    twin = await world.twins.get("d1")
    assert twin is not None and not twin.deleted
    assert [c.correlation_id for c in twin.pending] == ["after"]


def test_signoff_cancel_events_are_pure_and_match_a_clients_cancel() -> None:
    from twin.fold import fold, fold_all

    from .factory import event

    def pending(cid: str, position: int) -> AnyEvent:
        data = ev.CommandPending(href="/a", op="retrieve", expires_at=T0 + timedelta(hours=1))
        e = event(data, position)
        return dataclasses.replace(e, correlation_id=cid)

    twin = fold_all(None, [event(ev.DeviceRegistered(), 1), pending("x", 2), pending("y", 3)])
    assert twin is not None
    now = T0 + timedelta(seconds=10)
    assert commands.signoff_cancel_events(twin, now) == ()
    client = commands.decide(api.CancelCommands(device_id="d1"), "alice", twin, now)
    assert isinstance(client, commands.Record)
    off = fold(twin, event(ev.DeviceUnregistered(reason="sign-off"), 4))
    assert off is not None and off.deleted
    ended = commands.signoff_cancel_events(off, now)
    assert ended == commands.signoff_cancel_events(off, now)
    assert [e.correlation_id for e in ended] == ["x", "y"]
    assert [e.id for e in ended] == [e.id for e in client.events], "one id per canceled command"
    assert all(e.data == ev.CommandCanceled(href="/a", reason="device signed off") for e in ended)
    # registered again (in the same batch): only what was issued before the sign-off ends
    back = fold_all(off, [event(ev.DeviceRegistered(), 5), pending("z", 6)])
    assert back is not None and not back.deleted
    assert [c.correlation_id for c in back.pending] == ["x", "y", "z"]
    again = commands.signoff_cancel_events(back, now, signed_off_at=4)
    assert [e.correlation_id for e in again] == ["x", "y"]
    assert commands.signoff_cancel_events(back, now) == ()


async def test_a_token_of_an_unknown_key_is_validated_again_after_a_key_refresh() -> None:
    class Rotating:
        """Tokens are "kid:owner"; a kid is known once refreshed."""

        def __init__(self) -> None:
            self.known = {"k1"}
            self.published = {"k1", "k2"}

        def validate(self, token: str, now: float) -> Claims:
            kid, _, owner = token.partition(":")
            if kid not in self.known:
                raise UnknownKey(kid)
            if not owner.isalnum():
                raise TokenError("bad token")
            return claims(owner)

    keys = Rotating()
    asked: list[Exception] = []

    async def refresh(e: Exception) -> bool:
        asked.append(e)
        if not isinstance(e, UnknownKey):
            return False
        keys.known = set(keys.published)
        return True

    log = InMemoryEventStore()
    await log.provision()
    twin_api = TwinApi(log, InMemoryTwinStore(), keys, refresh_keys=refresh)
    body = api.encode_request(api.ListDevices())

    async def call(token: str) -> api.Reply:
        return await twin_api.handle(api.ListDevices.OP, body, token)

    assert (await call("k1:alice")).ok
    assert asked == []
    assert (await call("k2:alice")).ok
    assert [type(e) for e in asked] == [UnknownKey]
    refused = await call("k3:alice")  # refreshed, still unknown: refused after one more try
    assert refused.error is not None and refused.error.code == "unauthorized"
    bad = await call("k1:al ice")  # not a key problem: no refresh
    assert bad.error is not None and bad.error.code == "unauthorized"
    assert [type(e) for e in asked] == [UnknownKey, UnknownKey, TokenError]


@pytest.mark.parametrize("op", sorted(api.REQUEST_TYPES))
@pytest.mark.parametrize("body", [b'{"device_id": "\xff\xfe"}', b"\xff"])
async def test_a_body_that_is_not_utf8_is_a_bad_request(
    world: World, op: str, body: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    reply = await world.api.handle(op, body, "alice")
    assert reply.error is not None and reply.error.code == "bad_request"
    assert reply.error.message.startswith(f"bad {op} request")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], "no traceback"


async def test_a_validator_bug_is_internal_not_an_exception(world: World) -> None:
    class Broken:
        def validate(self, token: str, now: float) -> Claims:
            raise RuntimeError("bug")

    twin_api = TwinApi(world.log, world.twins, Broken())
    reply = await twin_api.handle(api.ListDevices.OP, api.encode_request(api.ListDevices()), "a")
    assert reply.error is not None and reply.error.code == "internal"


async def test_application_token_rules_apply_through_the_injected_validator(
    world: World,
) -> None:
    issuer = TokenIssuer(ec.generate_private_key(ec.SECP256R1()), kid="k1")
    twin_api = TwinApi(
        world.log, world.twins, AppTokenValidator(issuer.public_keys), clock=world.clock
    )
    body = api.encode_request(api.ListDevices())

    async def error_of(token: str) -> str | None:
        reply = await twin_api.handle(api.ListDevices.OP, body, token)
        return None if reply.error is None else f"{reply.error.code}: {reply.error.message}"

    now = world.clock()
    assert await error_of(issuer.issue("alice", now=now, ttl=3600)) is None
    refused = {
        "device": issuer.issue("alice", now=now, ttl=3600, device_id="d1"),
        "refresh": issuer.issue("alice", now=now, ttl=3600, token_type="refresh"),
        "no exp": issuer.issue("alice", now=now, ttl=None),
        "lifetime": issuer.issue("alice", now=now, ttl=30 * 24 * 3600),
    }
    errors = {name: await error_of(token) for name, token in refused.items()}
    assert errors == {
        "device": "unauthorized: invalid token: a device token is not an application token",
        "refresh": "unauthorized: invalid token: a refresh token is not an application token",
        "no exp": "unauthorized: invalid token: token has no exp claim",
        "lifetime": "unauthorized: invalid token: token lifetime 2592000 s exceeds the maximum"
        " of 604800 s for application tokens",
    }

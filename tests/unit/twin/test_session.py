"""The command API's ``session`` operation over the in-memory log and twin store: what a
token's owner may use of the bus (its subjects, inbox, consumer-name key, log position)."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

import msgspec
import pytest

from auth.errors import TokenError
from auth.tokens import Claims
from eventstore.memory import InMemoryEventStore
from proto import api, binding, subjects
from proto import events as ev
from proto.events import AnyEvent
from twin.api import ApiConfig, TwinApi, owner_consumer_key
from twin.memory import InMemoryTwinStore

from .factory import T0

NOW = T0.timestamp() + 1000
SECRET = bytes(range(32))
EXPIRES = NOW + 600

# token -> (owner, exp): two tokens of alice, one of bob, an owner needing escapes
TOKENS: dict[str, tuple[str, float | None]] = {
    "alice-1": ("alice", EXPIRES),
    "alice-2": ("alice", None),
    "bob": ("bob", EXPIRES),
    "odd": ("a.b c", EXPIRES),
}


class Validator:
    def validate(self, token: str, now: float) -> Claims:
        assert now == NOW
        if token not in TOKENS:
            raise TokenError("bad token")
        owner, exp = TOKENS[token]
        return Claims(owner=owner, device_id=None, expires_at=exp)


@dataclass
class World:
    log: InMemoryEventStore
    api: TwinApi

    async def reply(self, token: str | None) -> api.Reply:
        request = api.GetSession()
        reply = await self.api.handle(request.OP, api.encode_request(request), token)
        return api.decode_reply(api.encode_reply(reply))  # as a client sees it

    async def session(self, token: str) -> api.SessionInfo:
        reply = await self.reply(token)
        assert reply.ok, reply.error
        return msgspec.convert(reply.result, api.SessionInfo)

    async def code(self, token: str | None) -> str:
        reply = await self.reply(token)
        assert not reply.ok and reply.error is not None
        return reply.error.code

    async def append(self, owner: str, device: str = "d1") -> int:
        e: AnyEvent = ev.Event(
            owner=owner, device_id=device, data=ev.DeviceRegistered(), source="/t"
        )
        return (await self.log.append([binding.to_nats(e)])).last_position


async def make_world(secret: bytes | None = SECRET) -> World:
    log = InMemoryEventStore()
    await log.provision()
    config = ApiConfig(projector="p", consumer_secret=secret)
    return World(log, TwinApi(log, InMemoryTwinStore(), Validator(), config, clock=lambda: NOW))


@pytest.fixture
async def world() -> World:
    return await make_world()


async def test_session_names_the_owners_subjects_and_inbox(world: World) -> None:
    info = await world.session("alice-1")
    assert info.owner == "alice"
    assert info.events == "twinhub.ev.alice.>"
    assert info.inbox_prefix == "_INBOX.alice"
    assert info.expires_at == EXPIRES


async def test_an_owner_needing_escapes_gets_escaped_subjects(world: World) -> None:
    info = await world.session("odd")
    assert info.owner == "a.b c"
    assert info.events == "twinhub.ev.a~2Eb~20c.>"
    assert info.inbox_prefix == "_INBOX.a~2Eb~20c"
    assert info.events == subjects.event_filter("a.b c")
    assert info.inbox_prefix == subjects.owner_inbox_prefix("a.b c")


async def test_the_consumer_key_is_the_owners(world: World) -> None:
    one = await world.session("alice-1")
    two = await world.session("alice-2")
    again = await world.session("alice-1")
    bob = await world.session("bob")
    assert one.consumer_key == two.consumer_key == again.consumer_key  # per owner, any token
    assert bob.consumer_key != one.consumer_key
    assert len(bytes.fromhex(one.consumer_key)) == 32
    assert bytes.fromhex(one.consumer_key) == owner_consumer_key(SECRET, "alice")
    assert SECRET.hex() not in {one.consumer_key, bob.consumer_key}
    assert two.expires_at is None


async def test_the_consumer_key_is_a_keyed_hash_of_the_owner(world: World) -> None:
    key = owner_consumer_key(SECRET, "alice")
    assert key == owner_consumer_key(SECRET, "alice")
    assert key != owner_consumer_key(bytes(32), "alice")  # another deployment's secret
    assert key != owner_consumer_key(SECRET, "alicf")
    assert key != hashlib.sha256(b"alice").digest()  # not computable without the secret
    assert key != hmac.new(SECRET, b"alice", hashlib.sha256).digest()  # domain-separated
    other = await make_world(bytes(32))
    assert (await other.session("alice-1")).consumer_key != (
        await world.session("alice-1")
    ).consumer_key


async def test_position_is_the_owners_newest_event(world: World) -> None:
    assert (await world.session("alice-1")).position == 0
    first = await world.append("alice")
    second = await world.append("alice", "d2")
    bobs = await world.append("bob")
    assert first < second < bobs
    assert (await world.session("alice-1")).position == second  # bob's later event is not hers
    assert (await world.session("bob")).position == bobs
    assert (await world.session("odd")).position == 0
    third = await world.append("alice")
    assert (await world.session("alice-2")).position == third


async def test_a_similar_owner_does_not_move_the_position(world: World) -> None:
    await world.append("alice")
    before = (await world.session("alice-1")).position
    await world.append("alice.x")  # escaped: "alice~2Ex", another owner
    await world.append("alicex")
    assert (await world.session("alice-1")).position == before


async def test_session_is_unavailable_without_a_consumer_secret() -> None:
    world = await make_world(None)
    assert await world.code("alice-1") == "unavailable"


@pytest.mark.parametrize("token", [None, "forged"])
async def test_session_needs_a_valid_token(world: World, token: str | None) -> None:
    assert await world.code(token) == "unauthorized"


async def test_session_reply_carries_no_secret(world: World) -> None:
    reply = await world.api.handle("session", b"{}", "alice-1")
    encoded = api.encode_reply(reply)
    assert SECRET not in encoded
    assert SECRET.hex().encode() not in encoded

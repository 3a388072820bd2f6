"""Answers to simple devices' client-side RPCs (op ``answer-rpc``): the sans-IO decision
(:mod:`twin.clientrpc`) and the driver over the in-memory log: the first answer wins, a repeat
of it is answered as it, another answer is ``conflict``; no such request of the caller's owner,
or one whose wait is over, is ``not_found``."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest

from proto import api
from proto import events as ev
from proto.events import AnyEvent, RpcAnswered, RpcRequested
from twin import clientrpc
from twin.commands import Answer, Record

from .test_api import NOW, World, world

__all__ = ["world"]  # the fixture

T = datetime.fromtimestamp(NOW, UTC)


def asked(rid: str = "r-1", *, owner: str = "alice", timeout_ms: int = 30_000) -> AnyEvent:
    data = RpcRequested(request_id=rid, method="getTime", params=None, timeout_ms=timeout_ms)
    return ev.Event(owner=owner, device_id="d1", data=data, source="/gw", time=T, position=5)


def answer(rid: str = "r-1", result: Any = None) -> api.AnswerClientRpc:
    return api.AnswerClientRpc(device_id="d1", request_id=rid, result=result)


def error_of(decision: object) -> tuple[str, str]:
    assert isinstance(decision, Answer) and decision.reply.error is not None, decision
    return decision.reply.error.code, decision.reply.error.message


# -- the decision ---------------------------------------------------------------------------


def test_the_first_answer_is_recorded_conditionally_on_an_empty_answer_subject() -> None:
    d = clientrpc.decide(answer(result={"t": 1}), "alice", asked(), None, T, expected_last=0)
    assert isinstance(d, Record)
    (e,) = d.events
    assert isinstance(e.data, RpcAnswered)
    assert (e.owner, e.device_id, e.data.request_id, e.data.result) == (
        "alice",
        "d1",
        "r-1",
        {"t": 1},
    )
    assert e.correlation_id == "r-1"
    assert d.scope == "twinhub.ev.alice.d1.rpc-answered.r-1" and d.expected_last == 0
    assert e.id == clientrpc.answer_id("d1", "r-1")  # one id per request, whoever answers
    reply = d.reply([42])
    assert reply.ok and reply.result == api.RpcAnswerRecorded(
        device_id="d1", request_id="r-1", position=42
    )


def test_no_request_another_owners_or_another_id_is_not_found() -> None:
    for requested in (None, asked(owner="bob"), asked("r-2")):
        code, msg = error_of(
            clientrpc.decide(answer(), "alice", requested, None, T, expected_last=0)
        )
        assert code == "not_found" and "no rpc request" in msg


def test_an_expired_request_is_not_found_and_says_so() -> None:
    late = T + timedelta(milliseconds=30_001)
    code, msg = error_of(clientrpc.decide(answer(), "alice", asked(), None, late, expected_last=0))
    assert code == "not_found" and "expired" in msg
    on_time = T + timedelta(milliseconds=30_000)
    assert isinstance(
        clientrpc.decide(answer(), "alice", asked(), None, on_time, expected_last=0), Record
    )


def test_a_second_answer_is_a_conflict_the_same_one_its_repeat() -> None:
    first = ev.Event(
        owner="alice",
        device_id="d1",
        data=RpcAnswered(request_id="r-1", result={"t": 1}),
        source="/api",
        position=9,
    )
    code, _ = error_of(
        clientrpc.decide(answer(result={"t": 2}), "alice", asked(), first, T, expected_last=9)
    )
    assert code == "conflict"
    # true is not 1: another answer
    code, _ = error_of(
        clientrpc.decide(answer(result=True), "alice", asked(), first, T, expected_last=9)
    )
    assert code == "conflict"
    same = clientrpc.decide(answer(result={"t": 1}), "alice", asked(), first, T, expected_last=9)
    assert isinstance(same, Answer) and same.reply.ok
    assert same.reply.result == api.RpcAnswerRecorded(
        device_id="d1", request_id="r-1", position=9, repeated=True
    )
    # even after the wait is over: it is the answer the device got
    later = T + timedelta(hours=1)
    assert (
        clientrpc.decide(answer(result={"t": 1}), "alice", asked(), first, later, expected_last=9)
        == same
    )


@pytest.mark.parametrize(
    ("device", "rid"),
    [("", "r"), ("d1", ""), ("d1", "a\x00b"), ("d1", " r"), ("d1", "x" * 65)],
)
def test_bad_values_are_bad_request(device: str, rid: str) -> None:
    request = api.AnswerClientRpc(device_id=device, request_id=rid)
    code, _ = error_of(clientrpc.decide(request, "alice", asked(), None, T, expected_last=0))
    assert code == "bad_request"


# -- the driver -----------------------------------------------------------------------------


async def request_rpc(w: World, rid: str, owner: str = "alice", device: str = "d1") -> None:
    data = RpcRequested(request_id=rid, method="getTime", params={"tz": "UTC"}, timeout_ms=30_000)
    await w.append(data, owner=owner, device=device, time=T, id=rid, correlation_id=rid)


async def test_an_answer_through_the_api_is_in_the_log(world: World) -> None:
    await request_rpc(world, "r-1")
    got = msgspec.convert(await world.ok(answer(result={"time": 17})), api.RpcAnswerRecorded)
    (e,) = await world.events("rpc-answered")
    assert e.position == got.position and not got.repeated
    assert isinstance(e.data, RpcAnswered) and e.data.result == {"time": 17}
    # the same answer again (a lost reply): its repeat; another: conflict
    again = msgspec.convert(await world.ok(answer(result={"time": 17})), api.RpcAnswerRecorded)
    assert again.repeated and again.position == got.position
    assert await world.code(answer(result={"time": 18})) == "conflict"
    assert len(await world.events("rpc-answered")) == 1


async def test_another_owner_cannot_answer_and_unknown_requests_are_not_found(
    world: World,
) -> None:
    await request_rpc(world, "r-1")
    assert await world.code(answer(), token="bob") == "not_found"
    assert await world.code(answer("r-nope")) == "not_found"
    await request_rpc(world, "r-b", owner="bob", device="b1")
    b = api.AnswerClientRpc(device_id="b1", request_id="r-b")
    assert await world.code(b) == "not_found"  # alice's token, bob's device
    assert (await world.call(b, token="bob")).ok
    assert await world.events("rpc-answered") == []  # d1's: none


async def test_an_answer_after_the_wait_is_not_found(world: World) -> None:
    await request_rpc(world, "r-1")
    world.clock.t = NOW + 31
    assert await world.code(answer()) == "not_found"
    assert await world.events("rpc-answered") == []


async def test_concurrent_answers_record_one(world: World) -> None:
    await request_rpc(world, "r-1")
    replies = await asyncio.gather(*(world.call(answer(result=i)) for i in range(5)))
    assert sum(r.ok for r in replies) == 1
    assert all(r.error is not None and r.error.code == "conflict" for r in replies if not r.ok)
    (e,) = await world.events("rpc-answered")
    won = next(i for i, r in enumerate(replies) if r.ok)
    assert isinstance(e.data, RpcAnswered) and e.data.result == won


async def test_malformed_answers_are_bad_request(world: World) -> None:
    reply = await world.api.handle("answer-rpc", b'{"device_id": "d1"}', "alice")
    assert reply.error is not None and reply.error.code == "bad_request"
    assert await world.code(api.AnswerClientRpc(device_id="d1", request_id="")) == "bad_request"

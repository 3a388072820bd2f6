"""Server-side RPC to simple devices, sans-IO (issue 10 item 3): the routes of ``rpc`` in the
core, and :class:`gateway.simplerpc.RpcChannel`: delivery in issue order with ``command-sent``
first, replay on the next observation, answers by id, ended RPCs never delivered."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from gateway.commands import Command
from gateway.simple import (
    AnswerRpc,
    Feature,
    Reply,
    Route,
    SimpleConfig,
    SimpleCore,
    SimpleRequest,
    WatchRpc,
)
from gateway.simplerpc import ANSWERED_STATUS, RpcChannel, parse_rpc_id
from proto.devtokens import TokenRecord, new_token
from proto.events import RPC_HREF, CommandFailed, CommandSent, CommandSucceeded

TOKEN = new_token()
RECORD = TokenRecord(owner="alice", device_id="dev-1")
NOW = datetime(2026, 1, 2, tzinfo=UTC)


def decide(path: tuple[str, ...], method: str, payload: bytes = b"", **kw: Any) -> Any:
    core = SimpleCore(SimpleConfig(gateway_id="gw-1"))
    r = SimpleRequest(method=method, path=("api", "v1", TOKEN, *path), payload=payload, **kw)
    route = core.route(r)
    if isinstance(route, Reply):
        return route
    assert core.authorize(route, RECORD, 0.0) is None
    return core.decide(route, RECORD, r, NOW)


def test_observing_rpc_is_a_watch_and_an_answer_carries_its_id_and_result() -> None:
    assert decide(("rpc",), "GET") == WatchRpc("alice", "dev-1")
    assert decide(("rpc", "7"), "POST", b'{"ok":true}') == AnswerRpc(
        "alice", "dev-1", 7, {"ok": True}
    )
    assert decide(("rpc", "7"), "POST") == AnswerRpc("alice", "dev-1", 7, None)
    cbor = decide(("rpc", "8"), "POST", b"\xa1\x61a\x01", content_format=60)
    assert cbor == AnswerRpc("alice", "dev-1", 8, {"a": 1})


@pytest.mark.parametrize(
    ("path", "method", "code"),
    [
        (("rpc", "1"), "GET", "4.05"),
        (("rpc",), "PUT", "4.05"),
        (("telemetry", "1"), "POST", "4.04"),
        (("rpc", "1", "2"), "POST", "4.04"),
        (("rpc", "x"), "POST", "4.04"),
        (("rpc", "0"), "POST", "4.04"),
        (("rpc", "-1"), "POST", "4.04"),
        (("rpc", "99999999999"), "POST", "4.04"),
    ],
)
def test_other_rpc_requests_are_refused_without_payload(
    path: tuple[str, ...], method: str, code: str
) -> None:
    got = decide(path, method, b"{}")
    assert isinstance(got, Reply) and (got.code, got.payload) == (code, b"")


def test_a_malformed_answer_is_a_400_with_a_diagnostic() -> None:
    got = decide(("rpc", "1"), "POST", b"{not json")
    assert isinstance(got, Reply) and got.code == "4.00" and got.payload


def test_route_keeps_the_id() -> None:
    core = SimpleCore(SimpleConfig(gateway_id="gw-1"))
    r = SimpleRequest(method="POST", path=("api", "v1", TOKEN, "rpc", "12"))
    assert core.route(r) == Route(Feature.RPC, "POST", TOKEN, rpc_id="12")


def test_parse_rpc_id() -> None:
    assert [parse_rpc_id(t) for t in ("1", "2147483647", "2147483648", "٣", "", "01")] == [
        1,
        2147483647,
        None,
        None,
        None,
        1,
    ]


# -- the channel -------------------------------------------------------------------------


def rpc(cid: str, position: int, method: str = "m", **kw: Any) -> Command:
    return Command(
        correlation_id=cid,
        op="rpc",
        href=RPC_HREF,
        position=position,
        content={"method": method, "params": {"n": position}},
        owner="alice",
        **kw,
    )


def channel() -> RpcChannel:
    return RpcChannel("alice", "dev-1", "gw-1")


def deliver_all(ch: RpcChannel, now: float = 0.0) -> list[dict[str, Any]]:
    out = []
    while (d := ch.next_delivery(now, "conn-1")) is not None:
        assert isinstance(d.sent.data, CommandSent)
        assert (d.sent.correlation_id, d.sent.data.attempt) == (d.correlation_id, d.attempt)
        assert (d.sent.data.href, d.sent.data.connection_id) == (RPC_HREF, "conn-1")
        out.append(json.loads(d.payload))
    return out


def test_nothing_is_delivered_until_the_device_observes_then_in_issue_order() -> None:
    ch = channel()
    ch.opened([rpc("b", 20, "second"), rpc("a", 10, "first")])
    assert ch.next_delivery(0.0, "c") is None  # not observing
    ch.observe()
    got = deliver_all(ch)
    assert [(g["method"], g["params"]) for g in got] == [
        ("first", {"n": 10}),
        ("second", {"n": 20}),
    ]
    assert [g["id"] for g in got] == [1, 2]
    ch.opened([rpc("c", 30, "third")])  # while observing: due at once
    assert [g["id"] for g in deliver_all(ch)] == [3]


def test_other_ops_are_not_rpcs() -> None:
    ch = channel()
    ch.observe()
    ch.opened([Command(correlation_id="u", op="update", href="/a", position=1)])
    assert ch.next_delivery(0.0, "c") is None


def test_the_next_observation_delivers_what_is_open_again_under_its_id() -> None:
    ch = channel()
    ch.opened([rpc("a", 10, max_attempts=2)])
    ch.observe()
    (first,) = deliver_all(ch)
    ch.unobserve()
    ch.observe()
    d = ch.next_delivery(0.0, "c")
    assert d is not None and d.attempt == 2 and json.loads(d.payload) == first
    assert ch.exhausted(0.0) == []
    ch.unobserve()
    ch.observe()
    (failed,) = ch.exhausted(7.0)  # notified max_attempts times, never answered
    assert failed.correlation_id == "a"
    assert failed.data == CommandFailed(
        href=RPC_HREF, reason="no answer after 2 attempt(s)", attempts=2
    )
    assert ch.next_delivery(0.0, "c") is None
    ch.closed(["a"])
    assert not ch.awaiting_answer


def test_expired_and_ended_rpcs_are_not_delivered_and_their_ids_are_unknown() -> None:
    ch = channel()
    ch.opened([rpc("old", 1, expires_at=100.0), rpc("a", 2), rpc("b", 3)])
    ch.observe()
    ch.closed(["a"])
    got = deliver_all(ch, now=100.0)
    assert [g["params"]["n"] for g in got] == [3]
    ch.closed(["b"])
    assert ch.answer(got[0]["id"], {"x": 1}, 0.0) is None


def test_an_answer_is_a_command_succeeded_with_a_derived_id() -> None:
    ch = channel()
    ch.opened([rpc("a", 10)])
    ch.observe()
    (got,) = deliver_all(ch)
    assert ch.answer(got["id"] + 1, None, 0.0) is None
    ev = ch.answer(got["id"], {"ok": True}, 5.0)
    assert ev is not None and ev.correlation_id == "a" and ev.owner == "alice"
    assert ev.data == CommandSucceeded(href=RPC_HREF, status=ANSWERED_STATUS, content={"ok": True})
    again = ch.answer(got["id"], {"ok": False}, 6.0)
    assert again is not None and again.id == ev.id  # a second answer is recorded once


def test_a_failed_sent_append_makes_the_rpc_due_again_first() -> None:
    ch = channel()
    ch.opened([rpc("a", 10), rpc("b", 20)])
    ch.observe()
    d = ch.next_delivery(0.0, "c")
    assert d is not None and d.correlation_id == "a"
    ch.delivery_failed(d)
    again = ch.next_delivery(0.0, "c")
    assert again is not None and (again.correlation_id, again.attempt, again.sent.id) == (
        "a",
        1,
        d.sent.id,
    )

"""Scripted conversations with the command dispatcher (sans-IO)."""

from __future__ import annotations

from typing import TypeVar

import cbor2

from gateway.commands import (
    Answer,
    AppendCommandEvents,
    Command,
    CommandEffect,
    Dispatcher,
    DispatcherConfig,
    SendCommand,
)
from proto import events as ev

T = TypeVar("T")
NOW = 1_800_000_000.0


def make() -> Dispatcher:
    return Dispatcher(DispatcherConfig("g1", "c1", retry_initial=1.0, retry_max=8.0), "o", "d")


def cmd(corr: str, href: str = "/a", pos: int = 1, **kw: object) -> Command:
    return Command(
        correlation_id=corr,
        op="update",
        href=href,
        position=pos,  # type: ignore[arg-type]
        content={"v": corr},
        **kw,
    )


def of(effects: list[CommandEffect], kind: type[T]) -> list[T]:
    return [e for e in effects if isinstance(e, kind)]


def ack_all(d: Dispatcher, effects: list[CommandEffect], now: float = NOW) -> list[CommandEffect]:
    out: list[CommandEffect] = []
    for e in of(effects, AppendCommandEvents):
        out += d.appended(e.ref, True, now)
    return out


def data(effects: list[CommandEffect]) -> list[ev.EventData | ev.UnknownData]:
    return [x.data for a in of(effects, AppendCommandEvents) for x in a.events]


def test_nothing_is_sent_before_the_resources_are_known() -> None:
    d = make()
    assert d.add([cmd("c1")], NOW) == []
    effects = d.set_published(["/a"], NOW)
    sent = data(effects)
    assert len(sent) == 1
    assert isinstance(sent[0], ev.CommandSent)
    assert sent[0].attempt == 1
    req = of(ack_all(d, effects), SendCommand)
    assert len(req) == 1
    assert (req[0].method, req[0].href, req[0].content_format) == ("POST", "/a", 10000)
    assert cbor2.loads(req[0].payload) == {"v": "c1"}


def test_per_resource_issue_order_one_at_a_time() -> None:
    d = make()
    d.set_published(["/a", "/b"], NOW)
    effects = d.add([cmd("c3", pos=3), cmd("c1", pos=1), cmd("b1", "/b", pos=2)], NOW)
    assert [(a.events[0].correlation_id) for a in of(effects, AppendCommandEvents)] == ["c1", "b1"]
    reqs = of(ack_all(d, effects), SendCommand)
    first = next(r for r in reqs if r.correlation_id == "c1")
    effects = d.answered("c1", first.attempt, Answer("2.04"), "", NOW)
    outcome = data(effects)
    assert isinstance(outcome[0], ev.CommandSucceeded)
    assert outcome[0].status == "2.04"
    follow = ack_all(d, effects)
    assert [a.events[0].correlation_id for a in of(follow, AppendCommandEvents)] == ["c3"]


def test_no_answer_is_retried_with_backoff_then_failed() -> None:
    d = make()
    d.set_published(["/a"], NOW)
    req = of(ack_all(d, d.add([cmd("c1", max_attempts=3)], NOW)), SendCommand)[0]
    assert d.answered("c1", req.attempt, None, "timeout", NOW) == []
    assert d.tick(NOW + 0.5) == []
    effects = d.tick(NOW + 1.0)
    assert isinstance(data(effects)[0], ev.CommandSent)
    req = of(ack_all(d, effects), SendCommand)[0]
    assert req.attempt == 2
    d.answered("c1", 2, Answer("5.03"), "", NOW + 2)
    req = of(ack_all(d, d.tick(NOW + 4)), SendCommand)[0]
    assert req.attempt == 3
    effects = d.answered("c1", 3, None, "timeout", NOW + 10)
    failed = data(effects)[0]
    assert isinstance(failed, ev.CommandFailed)
    assert failed.attempts == 3
    assert failed.status is None
    ack_all(d, effects)
    assert d.commands == {}


def test_device_error_is_a_failure_without_retry() -> None:
    d = make()
    d.set_published(["/a"], NOW)
    req = of(ack_all(d, d.add([cmd("c1")], NOW)), SendCommand)[0]
    failed = data(d.answered("c1", req.attempt, Answer("4.05"), "", NOW))[0]
    assert isinstance(failed, ev.CommandFailed)
    assert failed.status == "4.05"


def test_a_request_that_cannot_be_sent_fails_at_once_with_its_reason() -> None:
    d = make()
    d.set_published(["/a"], NOW)
    req = of(ack_all(d, d.add([cmd("c1")], NOW)), SendCommand)[0]
    reason = "request of 2048 bytes not sent: the device accepts at most 1152 bytes"
    failed = data(d.answered("c1", req.attempt, None, reason, NOW, permanent=True))[0]
    assert isinstance(failed, ev.CommandFailed)
    assert (failed.status, failed.reason, failed.attempts) == (None, reason, 1)


def test_expired_commands_are_never_sent_and_canceled_ones_dropped() -> None:
    d = make()
    d.set_published(["/a"], NOW)
    effects = d.add([cmd("old", pos=1, expires_at=NOW - 1), cmd("x", pos=2), cmd("y", pos=3)], NOW)
    assert [a.events[0].correlation_id for a in of(effects, AppendCommandEvents)] == ["x"]
    d.cancel("y", NOW)
    req = of(ack_all(d, effects), SendCommand)[0]
    done = ack_all(d, d.answered("x", req.attempt, Answer("2.04"), "", NOW))
    assert done == []
    assert d.commands == {}


def test_unpublished_resource_waits_for_its_publish() -> None:
    d = make()
    d.set_published(["/a"], NOW)
    assert d.add([cmd("c1", "/later")], NOW) == []
    assert len(of(d.set_published(["/later"], NOW), AppendCommandEvents)) == 1


def test_ids_are_derived_so_a_second_gateway_records_nothing_new() -> None:
    a, b = make(), make()
    for d in (a, b):
        d.set_published(["/a"], NOW)
    ea = of(a.add([cmd("c1")], NOW), AppendCommandEvents)[0].events[0]
    eb = of(b.add([cmd("c1")], NOW), AppendCommandEvents)[0].events[0]
    assert ea.id == eb.id
    assert ea.correlation_id == "c1"


def test_retrieve_and_create_and_delete_requests() -> None:
    d = make()
    d.set_published(["/r", "/c", "/d"], NOW)
    cmds = [
        Command(
            correlation_id="r", op="retrieve", href="/r", position=1, interface="oic.if.baseline"
        ),
        Command(correlation_id="c", op="create", href="/c", position=2, content={"n": 1}),
        Command(correlation_id="x", op="delete", href="/d", position=3),
    ]
    reqs = {r.correlation_id: r for r in of(ack_all(d, d.add(cmds, NOW)), SendCommand)}
    assert (reqs["r"].method, reqs["r"].query, reqs["r"].payload) == (
        "GET",
        ("if=oic.if.baseline",),
        b"",
    )
    assert (reqs["c"].method, reqs["c"].query) == ("POST", ("if=oic.if.create",))
    assert reqs["x"].method == "DELETE"
    got = data(d.answered("r", 1, Answer("2.05", cbor2.dumps({"v": 7}), 10000), "", NOW))[0]
    assert isinstance(got, ev.CommandSucceeded)
    assert got.content == {"v": 7}


def test_log_failure_retries_the_step() -> None:
    d = make()
    d.set_published(["/a"], NOW)
    effects = d.add([cmd("c1")], NOW)
    ref = of(effects, AppendCommandEvents)[0].ref
    assert d.appended(ref, False, NOW) == []
    again = d.tick(NOW + 1)
    assert isinstance(data(again)[0], ev.CommandSent)

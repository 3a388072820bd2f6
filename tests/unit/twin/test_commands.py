"""The command API's sans-IO core on repeated correlation ids (issue 11 item 4): the same
request gets the original acceptance (with the outcome once there is one), a different one is
a conflict; open, ended, or ended in the log only; forgotten ids, other owners, other devices.
"""

from __future__ import annotations

import base64
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from proto import api
from proto import events as ev
from proto.events import AnyEvent
from twin import commands
from twin.commands import Answer, Record
from twin.fold import fold, fold_all, fold_batch
from twin.model import EndedCommand, Twin

from .factory import T0, event

NOW = T0 + timedelta(seconds=100)


def update(cid: str | None = "x", **kw: Any) -> api.UpdateResource:
    kw.setdefault("content", {"value": True, "level": 1})
    return api.UpdateResource(device_id="d1", href="/light", correlation_id=cid, **kw)


def registered(owner: str = "alice") -> Twin:
    twin = fold_all(None, [event(ev.DeviceRegistered(), 1, owner=owner)])
    assert twin is not None
    return twin


def record(
    twin: Twin, request: api.UpdateResource | api.RetrieveResource, position: int, **kw: Any
) -> tuple[Twin, AnyEvent]:
    """``twin`` after the API recorded ``request`` at ``position``: the event as logged."""
    decision = commands.decide(request, twin.owner, twin, kw.pop("now", NOW), expected_last=0)
    assert isinstance(decision, Record)
    (pending,) = decision.events
    logged = replace(pending, position=position)
    after = fold(twin, logged)
    assert after is not None
    return after, logged


def end(twin: Twin, data: ev.EventData, position: int, cid: str = "x") -> tuple[Twin, EndedCommand]:
    """``twin`` after ``data`` ended command ``cid``, and the command as the store keeps it."""
    logged = ev.Event(
        owner=twin.owner,
        device_id=twin.device_id,
        data=data,
        source="/gateway/test",
        time=NOW + timedelta(seconds=position),
        correlation_id=cid,
        position=position,
    )
    after = fold(twin, logged)
    assert after is not None
    ended = EndedCommand.between(twin, after, cid)
    assert ended is not None
    return after, replace(ended, forget_at=NOW + timedelta(hours=1))


def answer(
    request: api.UpdateResource | api.RetrieveResource,
    twin: Twin,
    ended: EndedCommand | None = None,
    *,
    owner: str = "alice",
    now: datetime = NOW,
) -> api.Reply:
    decision = commands.decide(request, owner, twin, now, expected_last=9, ended=ended)
    assert isinstance(decision, Answer), "a known correlation id is never recorded again"
    return decision.reply


def accepted(reply: api.Reply) -> api.CommandAccepted:
    assert reply.ok, reply.error
    assert isinstance(reply.result, api.CommandAccepted)
    return reply.result


def conflict(reply: api.Reply) -> str:
    assert not reply.ok and reply.error is not None and reply.error.code == "conflict"
    return reply.error.message


def first_acceptance(logged: AnyEvent) -> api.CommandAccepted:
    """What the request that recorded ``logged`` was answered."""
    assert isinstance(logged.data, ev.CommandPending) and logged.data.expires_at is not None
    assert logged.correlation_id is not None and logged.position is not None
    return api.CommandAccepted(
        correlation_id=logged.correlation_id,
        device_id=logged.device_id,
        href=logged.data.href,
        position=logged.position,
        expires_at=logged.data.expires_at.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
    )


# -- the same request ----------------------------------------------------------------------


def test_the_same_request_while_open_gets_the_original_acceptance() -> None:
    twin, logged = record(registered(), update(ttl=30), 5)
    later = NOW + timedelta(seconds=7)  # a retry comes later: the deadline is the original's
    got = accepted(answer(update(ttl=30), twin, now=later))
    assert got == msgspec.structs.replace(first_acceptance(logged), repeated=True)
    sent = ev.CommandSent(href="/light", gateway="g", connection_id="c")
    twin = fold(twin, event(sent, 6))  # type: ignore[assignment]
    twin = replace(twin, pending=tuple(replace(c, state="sent") for c in twin.pending))
    assert accepted(answer(update(ttl=30), twin)).state == "sent"


@pytest.mark.parametrize(
    ("data", "state", "status"),
    [
        (ev.CommandSucceeded(href="/light", status="2.04"), "succeeded", "2.04"),
        (ev.CommandFailed(href="/light", status="4.00", reason="bad"), "failed", "4.00"),
        (ev.CommandExpired(href="/light", attempts=2), "expired", None),
        (ev.CommandCanceled(href="/light", reason="canceled"), "canceled", None),
    ],
)
def test_the_same_request_after_the_end_gets_the_original_acceptance_and_outcome(
    data: ev.EventData, state: str, status: str | None
) -> None:
    twin, logged = record(registered(), update(), 5)
    twin, ended = end(twin, data, 8)
    got = accepted(answer(update(), twin, ended))
    assert got.repeated and got.state == state
    assert got.outcome is not None
    assert (got.outcome.state, got.outcome.position, got.outcome.status) == (state, 8, status)
    bare = msgspec.structs.replace(got, repeated=False, state="pending", outcome=None)
    assert bare == first_acceptance(logged)


def test_an_end_in_the_log_tail_only_is_found_between_two_folds() -> None:
    """The store has the twin with the command open; the log's tail ends it (the driver folds
    the tail onto the stored twin and keeps what ended, see twin.api.latest_command)."""
    stored, _ = record(registered(), update(), 5)
    done = event(ev.CommandSucceeded(href="/light", status="2.04"), 6)
    tail = replace(done, correlation_id="x")
    latest = fold(stored, tail)
    ended = EndedCommand.between(stored, latest, "x")
    assert ended is not None and ended.forget_at is None  # not stored yet: not forgotten
    assert ended.outcome.state == "succeeded" and ended.command == stored.command("x")
    assert latest is not None
    assert accepted(answer(update(), latest, ended)).state == "succeeded"
    assert EndedCommand.between(latest, latest, "x") is None
    assert EndedCommand.between(stored, latest, "other") is None


def test_a_batch_reports_the_commands_it_ended_even_those_it_opened() -> None:
    twin = registered()
    _, pending = record(twin, update(), 5)
    done = replace(event(ev.CommandSucceeded(href="/light", status="2.04"), 6), correlation_id="x")
    folded = fold_batch({"d1": twin}, [pending, done])
    (ended,) = folded.ended["d1"]
    assert ended.command.position == 5 and ended.outcome.position == 6


def test_key_order_and_base64_spelling_do_not_make_another_request() -> None:
    twin, _ = record(registered(), update(content={"a": 1, "b": [True, None, 1.5]}), 5)
    assert accepted(answer(update(content={"b": [True, None, 1.5], "a": 1}), twin)).repeated
    raw = base64.b64encode(b"\xa1avX").decode()
    request = update("r", content=None, content_b64=raw, content_format=60)
    twin, _ = record(twin, request, 6)
    urlsafe_equal = base64.b64encode(base64.b64decode(raw)).decode()
    again = update("r", content=None, content_b64=urlsafe_equal, content_format=60)
    assert accepted(answer(again, twin)).repeated


def test_max_attempts_absent_is_three() -> None:
    twin, _ = record(registered(), update(), 5)
    assert accepted(answer(update(max_attempts=3), twin)).repeated


# -- a different request --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changed", "field"),
    [
        (update(content={"value": False, "level": 1}), "content"),
        (update(content={"value": True, "level": 1.0}), "content"),  # 1.0 is not 1 (CBOR)
        (update(content={"value": 1, "level": 1}), "content"),  # 1 is not true
        (update(content={"value": True}), "content"),
        (update(ttl=61), "ttl"),
        (update(ttl=60.001), "ttl"),
        (update(interface="oic.if.a"), "interface"),
        (update(max_attempts=4), "max_attempts"),
        (api.UpdateResource(device_id="d1", href="/dark", correlation_id="x", content=1), "href"),
        (api.RetrieveResource(device_id="d1", href="/light", correlation_id="x"), "op"),
        (
            api.CreateResource(
                device_id="d1",
                href="/light",
                correlation_id="x",
                content={"value": True, "level": 1},
            ),
            "op",
        ),
    ],
)
def test_a_different_request_under_the_id_is_a_conflict_open_or_ended(
    changed: api.UpdateResource | api.RetrieveResource, field: str
) -> None:
    twin, _ = record(registered(), update(), 5)
    assert field in conflict(answer(changed, twin))
    twin, ended = end(twin, ev.CommandSucceeded(href="/light", status="2.04"), 6)
    assert field in conflict(answer(changed, twin, ended))


def test_other_content_bytes_or_format_are_a_conflict() -> None:
    raw = base64.b64encode(b"\x01").decode()
    twin, _ = record(registered(), update(content=None, content_b64=raw, content_format=60), 5)
    other = base64.b64encode(b"\x02").decode()
    assert "content_b64" in conflict(
        answer(update(content=None, content_b64=other, content_format=60), twin)
    )
    assert "content_format" in conflict(
        answer(update(content=None, content_b64=raw, content_format=10000), twin)
    )


# -- what is not remembered ---------------------------------------------------------------


def test_a_forgotten_command_leaves_the_id_free_for_a_new_one() -> None:
    twin, _ = record(registered(), update(), 5)
    twin, ended = end(twin, ev.CommandSucceeded(href="/light", status="2.04"), 6)
    assert ended.forget_at is not None
    just_before = ended.forget_at - timedelta(milliseconds=1)
    assert accepted(answer(update(), twin, ended, now=just_before)).repeated
    new = commands.decide(update(), "alice", twin, ended.forget_at, expected_last=5, ended=ended)
    assert isinstance(new, Record)  # recorded again: a new command (the gateway delivers it)


def test_another_owners_command_under_the_id_is_never_shown() -> None:
    bobs, _ = record(registered("bob"), update(content={"secret": 1}), 5)
    alices = fold(bobs, event(ev.DeviceRegistered(), 6, owner="alice"))  # it changed owners
    assert alices is not None and alices.command("x") is not None  # bob's, still open
    message = conflict(answer(update(), alices))
    assert "secret" not in message and "bob" not in message and "content" not in message
    ended_twin, ended = end(bobs, ev.CommandCanceled(href="/light", reason="signed off"), 7)
    alices = fold(ended_twin, event(ev.DeviceRegistered(), 8, owner="alice"))
    assert alices is not None
    new = commands.decide(update(), "alice", alices, NOW, expected_last=0, ended=ended)
    assert isinstance(new, Record)  # bob's ended command is not alice's: a new command of hers


def test_a_request_without_an_id_is_always_new() -> None:
    twin, _ = record(registered(), update(), 5)
    decision = commands.decide(update(None), "alice", twin, NOW, expected_last=5)
    assert isinstance(decision, Record)
    assert decision.events[0].correlation_id not in (None, "x")


# -- derived ids ------------------------------------------------------------------------------


def test_event_ids_name_owner_device_id_request_and_position() -> None:
    twin = registered()

    def first_id(request: api.UpdateResource, owner: str = "alice", last: int = 0) -> str:
        t = twin if owner == "alice" else replace(twin, owner=owner)
        decision = commands.decide(request, owner, t, NOW, expected_last=last)
        assert isinstance(decision, Record)
        return decision.events[0].id

    same = first_id(update())
    later = commands.decide(update(), "alice", twin, NOW + timedelta(seconds=3), expected_last=0)
    assert isinstance(later, Record) and later.events[0].id == same  # a racing retry dedups
    assert first_id(update(content={"level": 1, "value": True})) == same
    assert first_id(update(content={"value": False, "level": 1})) != same  # cannot be taken for it
    assert first_id(update(), owner="bob") != same
    assert first_id(update(), last=7) != same
    assert first_id(update("y")) != same


def test_recorded_times_are_milliseconds_so_the_ttl_compares_exactly() -> None:
    now = T0 + timedelta(seconds=100, microseconds=123_456)
    twin, logged = record(registered(), update(ttl=0.0106), 5, now=now)
    assert logged.time == T0 + timedelta(seconds=100, milliseconds=123)
    assert isinstance(logged.data, ev.CommandPending)
    assert logged.data.expires_at == logged.time + timedelta(milliseconds=11)
    assert accepted(answer(update(ttl=0.0106), twin)).repeated


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)


@given(json_values.filter(lambda v: v is not None), json_values.filter(lambda v: v is not None))
def test_content_is_the_same_exactly_when_it_is_the_same_json_value(a: Any, b: Any) -> None:
    twin, _ = record(registered(), update(content=a), 5)
    wire = msgspec.json.decode(msgspec.json.encode(b))  # as the API decodes it
    reply = answer(update(content=wire), twin)
    same = msgspec.json.encode(a, order="sorted") == msgspec.json.encode(wire, order="sorted")
    assert reply.ok == same

"""Commands and desired state through the fold: scripted sequences and properties."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from proto import events as ev
from proto.events import AnyEvent, EventData
from twin.fold import fold, fold_all
from twin.model import RECENT_OUTCOMES, SENT_GRACE, Twin, delta_of

from .factory import T0, changed, device_logs, event, json_values, online


def cmd(data: EventData, position: int, cid: str, *, owner: str = "alice") -> AnyEvent:
    return ev.Event(
        owner=owner,
        device_id="d1",
        data=data,
        source="/test",
        id=f"{cid}-{position}",
        time=T0 + timedelta(seconds=position),
        correlation_id=cid,
        position=position,
    )


def pending(href: str = "/a", op: ev.CommandOp = "update", **kw: Any) -> ev.CommandPending:
    kw.setdefault("content", {"v": 1} if op in ("update", "create") else None)
    kw.setdefault("expires_at", T0 + timedelta(seconds=100))
    return ev.CommandPending(href=href, op=op, **kw)


def base() -> Twin:
    twin = fold_all(None, [event(ev.DeviceRegistered(), 1), event(online("c1"), 2)])
    assert twin is not None
    return twin


def test_pending_then_sent_then_succeeded() -> None:
    twin = fold(base(), cmd(pending("/a"), 3, "c1"))
    assert twin is not None
    (c,) = twin.pending
    assert (c.correlation_id, c.state, c.op, c.href, c.position, c.owner) == (
        "c1",
        "pending",
        "update",
        "/a",
        3,
        "alice",
    )
    assert c.issued_at == T0 + timedelta(seconds=3)
    assert twin.next_expiry == T0 + timedelta(seconds=100)
    sent = ev.CommandSent(href="/a", gateway="gw-1", connection_id="c1", attempt=1)
    twin = fold(twin, cmd(sent, 4, "c1"))
    assert twin is not None
    assert (twin.pending[0].state, twin.pending[0].attempts, twin.pending[0].gateway) == (
        "sent",
        1,
        "gw-1",
    )
    assert twin.next_expiry == T0 + timedelta(seconds=100) + SENT_GRACE
    twin = fold(twin, cmd(ev.CommandSucceeded(href="/a", status="2.04"), 5, "c1"))
    assert twin is not None
    assert twin.pending == ()
    assert twin.next_expiry is None
    (o,) = twin.recent_outcomes
    assert (o.correlation_id, o.state, o.status, o.attempts, o.position) == (
        "c1",
        "succeeded",
        "2.04",
        1,
        5,
    )


def test_first_end_wins_and_duplicate_pending_is_ignored() -> None:
    twin = fold_all(
        base(),
        [
            cmd(pending("/a"), 3, "c1"),
            cmd(pending("/b"), 4, "c1"),  # same id while open: ignored
            cmd(ev.CommandExpired(href="/a"), 5, "c1"),
            cmd(ev.CommandSucceeded(href="/a", status="2.04"), 6, "c1"),  # late: ignored
            cmd(ev.CommandCanceled(href="/a"), 7, "nope"),  # unknown: ignored
        ],
    )
    assert twin is not None
    assert twin.pending == ()
    assert [o.state for o in twin.recent_outcomes] == ["expired"]
    assert twin.position == 7 and twin.version == 7


def test_issue_order_is_kept_and_outcomes_are_bounded() -> None:
    events = [cmd(pending("/a"), 10 + i, f"c{i}") for i in range(RECENT_OUTCOMES + 5)]
    twin = fold_all(base(), events)
    assert twin is not None
    assert [c.correlation_id for c in twin.pending] == [f"c{i}" for i in range(len(events))]
    ends = [
        cmd(ev.CommandFailed(href="/a", reason="timeout", attempts=3), 100 + i, f"c{i}")
        for i in range(len(events))
    ]
    twin = fold_all(twin, ends)
    assert twin is not None
    assert twin.pending == ()
    assert len(twin.recent_outcomes) == RECENT_OUTCOMES
    assert twin.recent_outcomes[-1].correlation_id == f"c{len(events) - 1}"
    assert twin.recent_outcomes[-1].reason == "timeout"


def test_expired_lists_only_due_commands() -> None:
    twin = fold_all(
        base(),
        [
            cmd(pending("/a", expires_at=T0 + timedelta(seconds=10)), 3, "early"),
            cmd(pending("/a", expires_at=T0 + timedelta(seconds=50)), 4, "late"),
            cmd(pending("/a", expires_at=T0 + timedelta(seconds=10)), 5, "sent"),
            cmd(ev.CommandSent(href="/a", gateway="g", connection_id="c1"), 6, "sent"),
        ],
    )
    assert twin is not None
    now = T0 + timedelta(seconds=20)
    assert [c.correlation_id for c in twin.expired(now)] == ["early"]
    later = T0 + timedelta(seconds=10) + SENT_GRACE
    assert [c.correlation_id for c in twin.expired(later)] == ["early", "sent"]


def test_desired_delta_and_reached() -> None:
    twin = fold_all(
        base(),
        [
            event(changed("/light", {"value": False, "dimming": 3}), 3),
            event(
                ev.DesiredSet(href="/light", content={"value": True, "dimming": 3}, version=1), 4
            ),
        ],
    )
    assert twin is not None
    assert twin.delta() == {"/light": {"value": True}}
    # a reached event before the device reports it is ignored
    early = fold(twin, event(ev.DesiredReached(href="/light", version=1), 5))
    assert early is not None and not early.desired[0].reached
    twin = fold_all(
        twin,
        [
            event(changed("/light", {"value": True, "dimming": 3.0}), 6),
            event(ev.DesiredReached(href="/light", version=1), 7),
        ],
    )
    assert twin is not None
    assert twin.delta() == {}
    assert twin.desired[0].reached
    assert twin.to_document()["delta"] == []
    # the device drifts: not reached any more
    twin = fold(twin, event(changed("/light", {"value": False, "dimming": 3}), 8))
    assert twin is not None
    assert not twin.desired[0].reached
    assert twin.delta() == {"/light": {"value": True}}
    # cleared: no delta, the version goes on
    twin = fold(twin, event(ev.DesiredCleared(href="/light", version=2), 9))
    assert twin is not None
    assert twin.delta() == {} and twin.desired[0].cleared and twin.desired[0].version == 2


def test_delta_is_strict_about_json_types() -> None:
    assert delta_of({"on": True}, {"on": 1}) == {"on": True}
    assert delta_of({"n": 1}, {"n": 1.0}) == {}
    assert delta_of({"a": {"b": [1, True]}}, {"a": {"b": [1, True]}}) == {}
    assert delta_of({"a": 1}, None) == {"a": 1}
    assert delta_of({"a": 1}, [1]) == {"a": 1}


def test_reregistration_for_another_owner_keeps_open_commands_only() -> None:
    twin = fold_all(
        base(),
        [
            cmd(pending("/a"), 3, "c1"),
            event(ev.DesiredSet(href="/a", content={"x": 1}, version=1), 4),
            event(ev.DeviceUnregistered(), 5),
            event(ev.DeviceRegistered(), 6, owner="bob"),
        ],
    )
    assert twin is not None
    assert twin.owner == "bob"
    assert [(c.correlation_id, c.owner) for c in twin.pending] == [("c1", "alice")]
    assert twin.desired == ()


def test_document_round_trip_with_commands_and_desired() -> None:
    twin = fold_all(
        base(),
        [
            cmd(pending("/a.b", content={"k.with.dot": 1}), 3, "c1"),
            cmd(ev.CommandSent(href="/a.b", gateway="g", connection_id="c1"), 4, "c1"),
            cmd(pending("/b", op="retrieve"), 5, "c2"),
            cmd(ev.CommandCanceled(href="/b", reason="canceled"), 6, "c2"),
            event(ev.DesiredSet(href="/a.b", content={"v": [1, 2]}, version=3), 7),
        ],
    )
    assert twin is not None
    assert Twin.from_document(twin.to_document()) == twin
    view = twin.to_json()
    assert view["pending"][0]["issued_at"] == "2026-01-01T00:00:03.000Z"
    assert view["delta"] == [{"href": "/a.b", "content": {"v": [1, 2]}}]


# -- properties ---------------------------------------------------------------------------------

CIDS = ("c1", "c2", "c3")
HREFS = ("/a", "/b")


@st.composite
def command_logs(draw: st.DrawFn) -> list[AnyEvent]:
    """Registration, then commands, reports and desired state of d1 at increasing positions."""
    payload = st.one_of(
        st.builds(
            lambda h, op: pending(h, op),
            st.sampled_from(HREFS),
            st.sampled_from(ev.COMMAND_OPS),
        ),
        st.builds(
            lambda h, a: ev.CommandSent(href=h, gateway="g", connection_id="c1", attempt=a),
            st.sampled_from(HREFS),
            st.integers(1, 3),
        ),
        st.builds(lambda h: ev.CommandSucceeded(href=h, status="2.04"), st.sampled_from(HREFS)),
        st.builds(lambda h: ev.CommandFailed(href=h, status="4.00"), st.sampled_from(HREFS)),
        st.builds(lambda h: ev.CommandExpired(href=h), st.sampled_from(HREFS)),
        st.builds(lambda h: ev.CommandCanceled(href=h), st.sampled_from(HREFS)),
        st.builds(
            lambda h, c, v: ev.DesiredSet(href=h, content=c, version=v),
            st.sampled_from(HREFS),
            st.dictionaries(st.sampled_from("xyz"), json_values, max_size=2),
            st.integers(1, 5),
        ),
        st.builds(
            lambda h, v: ev.DesiredReached(href=h, version=v),
            st.sampled_from(HREFS),
            st.integers(1, 5),
        ),
        st.builds(
            lambda h, v: ev.DesiredCleared(href=h, version=v),
            st.sampled_from(HREFS),
            st.integers(1, 5),
        ),
        st.builds(
            changed,
            st.sampled_from(HREFS),
            st.dictionaries(st.sampled_from("xyz"), json_values, max_size=3),
        ),
    )
    items = draw(st.lists(st.tuples(payload, st.sampled_from(CIDS)), max_size=30))
    out: list[AnyEvent] = [event(ev.DeviceRegistered(), 1)]
    pos = 1
    for data, cid in items:
        pos += draw(st.integers(1, 3))
        out.append(cmd(data, pos, cid))
    return out


@settings(max_examples=200)
@given(command_logs(), st.data())
def test_replaying_any_prefix_is_harmless(log: list[AnyEvent], data: st.DataObject) -> None:
    full = fold_all(None, log)
    cut = data.draw(st.integers(0, len(log)))
    again = fold_all(fold_all(None, log[:cut]), log)  # everything up to cut comes twice
    assert again == full


@settings(max_examples=200)
@given(command_logs())
def test_command_invariants(log: list[AnyEvent]) -> None:
    twin = fold_all(None, log)
    assert twin is not None
    ids = [c.correlation_id for c in twin.pending]
    assert len(ids) == len(set(ids))  # one open command per correlation id
    assert [c.position for c in twin.pending] == sorted(c.position for c in twin.pending)
    assert len(twin.recent_outcomes) <= RECENT_OUTCOMES
    assert [d.href for d in twin.desired] == sorted({d.href for d in twin.desired})
    for d in twin.desired:
        if d.reached:
            assert twin.delta_for(d.href) == {}
    assert set(twin.delta()) <= {d.href for d in twin.desired if not d.cleared}
    assert Twin.from_document(twin.to_document()) == twin


@given(device_logs())
def test_device_logs_without_commands_have_none(log: list[AnyEvent]) -> None:
    twin = fold_all(None, log)
    if twin is not None:
        assert twin.pending == () and twin.desired == () and twin.next_expiry is None

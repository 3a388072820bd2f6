"""The gateway instance's lease as a state machine (gateway.lease): what it writes, when."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from gateway.lease import LeaseConfig, LeaseHolder
from proto.leases import (
    LeaseEntry,
    LeaseRecord,
    LeaseState,
    Writer,
    instance_scope,
    lease_subject,
)

T = 1_700_000_000.0
AT = datetime.fromtimestamp(T, UTC)


def holder(lease: float = 9.0, **kw: float) -> LeaseHolder:
    return LeaseHolder("gw-1", "mine", LeaseConfig(lease=lease, **kw))


def entry(
    instance: str,
    position: int,
    state: LeaseState = LeaseState.HELD,
    gateway: str = "gw-1",
    writer: Writer | None = None,
) -> LeaseEntry:
    record = LeaseRecord(state=state, gateway=gateway, instance=instance, at=AT, lease=9.0)
    w = writer or (
        Writer.TWIN if state in (LeaseState.REAPING, LeaseState.REAPED) else Writer.GATEWAY
    )
    return LeaseEntry(w, gateway, instance, position, record)


def test_config() -> None:
    assert LeaseConfig().lease <= 30  # the default the brief asks for
    assert LeaseConfig(lease=9).renew_every == 3
    assert LeaseConfig(lease=9, renew_interval=2).renew_every == 2
    for bad in ({"lease": 0}, {"lease": 3, "renew_interval": 3}, {"retry_interval": 0}):
        with pytest.raises(ValueError, match="must be"):
            LeaseConfig(**bad)  # type: ignore[arg-type]


def test_acquire_then_renew_every_third_of_the_lease() -> None:
    h = holder()
    w = h.acquire(T)
    assert (w.subject, w.scope, w.expected_last) == (
        lease_subject(Writer.GATEWAY, "gw-1", "mine"),
        instance_scope("gw-1", "mine"),
        0,
    )
    assert w.record.state is LeaseState.HELD and w.record.lease == 9.0
    assert not h.acquired
    h.written(w, 41, T)
    assert h.acquired and h.position == 41
    assert h.next_write(T + 2.9) is None
    assert h.wake_at() == T + 3
    renewal = h.next_write(T + 3)
    assert renewal is not None
    assert renewal.expected_last == 41  # conditional on our own last write
    assert renewal.msg_id != w.msg_id
    h.written(renewal, 57, T + 3)
    assert h.next_write(T + 5.9) is None
    nxt = h.next_write(T + 6)
    assert nxt is not None and nxt.expected_last == 57


def test_a_write_of_unknown_outcome_is_retried_as_it_was() -> None:
    h = holder(retry_interval=0.5)
    h.written(h.acquire(T), 10, T)
    renewal = h.next_write(T + 3)
    assert renewal is not None
    h.failed(renewal, T + 3)
    assert h.next_write(T + 3.4) is None
    assert h.wake_at() == T + 3.5
    # the same id and condition: if the first one was stored, the log answers a duplicate
    assert h.next_write(T + 3.5) == renewal
    h.written(renewal, 12, T + 4)
    assert h.position == 12
    assert h.next_write(T + 6.9) is None
    assert h.next_write(T + 7) is not None


def test_a_refused_renewal_loses_the_lease() -> None:
    h = holder()
    h.written(h.acquire(T), 10, T)
    renewal = h.next_write(T + 3)
    assert renewal is not None
    h.refused(renewal)  # a twin claimed the instance, or a newer run superseded it
    assert h.lost and not h.acquired
    assert h.next_write(T + 100) is None
    assert h.wake_at() is None
    assert h.release(T + 100) is None


def test_release_is_conditional_on_the_last_renewal() -> None:
    h = holder()
    assert h.release(T) is None  # never held
    h.written(h.acquire(T), 10, T)
    w = h.release(T + 1)
    assert w is not None
    assert w.record.state is LeaseState.RELEASED and w.expected_last == 10


def test_supersede_marks_the_other_held_runs_of_this_gateway() -> None:
    h = holder()
    entries = [
        entry("old1", 5),  # died, lease not lapsed yet: superseded
        entry("old2", 3),
        entry("old2", 8, LeaseState.REAPING),  # the twin's already
        entry("old3", 9, LeaseState.RELEASED),  # stopped cleanly
        entry("old4", 11, LeaseState.REAPED),
        entry("other", 12, gateway="gw-2"),  # another gateway's
        entry("mine", 13),  # ours (not expected at start, never superseded)
    ]
    writes = h.supersede(entries, T)
    assert [(w.subject, w.scope, w.expected_last) for w in writes] == [
        (lease_subject(Writer.GATEWAY, "gw-1", "old1"), instance_scope("gw-1", "old1"), 5)
    ]
    record = writes[0].record
    assert record.state is LeaseState.SUPERSEDED
    assert (record.gateway, record.instance, record.by) == ("gw-1", "old1", "mine")
    # a refused supersede (that run renewed meanwhile) is not our lease: nothing is lost
    h.refused(writes[0])
    assert not h.lost

"""The reaper's decisions (twin.gateways): which gateway instances are lost, and which of
their devices go offline."""

from __future__ import annotations

from datetime import UTC, datetime

from proto import events as ev
from proto.events import AnyEvent
from proto.leases import GATEWAY_LOST, LeaseEntry, LeaseRecord, LeaseState, Writer
from twin.gateways import (
    Cause,
    Claim,
    HeldConnection,
    LeaseTable,
    claim_record,
    gateway_lost_id,
    offline_event,
    offline_scope,
)

AT = datetime(2026, 1, 1, tzinfo=UTC)
NOW = datetime(2026, 1, 2, tzinfo=UTC)


def entry(
    instance: str, position: int, state: LeaseState = LeaseState.HELD, lease: float = 3.0
) -> LeaseEntry:
    writer = Writer.TWIN if state in (LeaseState.REAPING, LeaseState.REAPED) else Writer.GATEWAY
    record = LeaseRecord(state=state, gateway="gw", instance=instance, at=AT, lease=lease)
    return LeaseEntry(writer, "gw", instance, position, record)


def claims(table: LeaseTable, entries: list[LeaseEntry], now: float) -> list[tuple[str, Cause]]:
    return [(c.instance, c.cause) for c in table.observe(entries, now)]


# -- LeaseTable ---------------------------------------------------------------------------------


def test_a_held_lease_lapses_after_its_lease_without_a_change() -> None:
    table = LeaseTable()
    assert claims(table, [entry("a", 1)], 100.0) == []
    assert claims(table, [entry("a", 1)], 102.9) == []
    got = table.observe([entry("a", 1)], 103.0)
    assert got == [Claim("gw", "a", 1, Cause.LAPSED)]


def test_renewals_keep_a_lease_alive() -> None:
    table = LeaseTable()
    position = 1
    for t in range(100, 130):  # renewed every 2 s, polled every second
        if t % 2 == 0:
            position += 1
        assert claims(table, [entry("a", position)], float(t)) == [], t
    # the renewals stop: lost a lease after the last change was seen
    assert claims(table, [entry("a", position)], 130.9) == []
    assert claims(table, [entry("a", position)], 131.0) == [("a", Cause.LAPSED)]


def test_each_instance_has_its_own_lease() -> None:
    table = LeaseTable()
    table.observe([entry("short", 1, lease=2.0), entry("long", 2, lease=10.0)], 0.0)
    assert claims(table, [entry("short", 1, lease=2.0), entry("long", 2, lease=10.0)], 2.0) == [
        ("short", Cause.LAPSED)
    ]
    assert claims(table, [entry("short", 1, lease=2.0), entry("long", 2, lease=10.0)], 10.0) == [
        ("long", Cause.LAPSED)
    ]


def test_an_outage_gives_every_lease_its_full_term_again() -> None:
    """A poll that fails (NATS down, our connection lost) says nothing about the gateways:
    their clocks restart at the next poll that works, so nobody is declared lost for it."""
    table = LeaseTable()
    table.observe([entry("a", 1)], 0.0)
    table.unavailable()
    # 60 s later the stream is back, and the gateway has not renewed yet
    assert claims(table, [entry("a", 1)], 60.0) == []
    assert claims(table, [entry("a", 1)], 62.9) == []
    assert claims(table, [entry("a", 1)], 63.0) == [("a", Cause.LAPSED)]


def test_a_fresh_table_waits_a_full_lease() -> None:
    """A twin service that starts does not know when the last renewal was: a full lease."""
    table = LeaseTable()
    assert claims(table, [entry("a", 1)], 5000.0) == []
    assert claims(table, [entry("a", 1)], 5003.0) == [("a", Cause.LAPSED)]


def test_released_and_superseded_are_lost_at_once() -> None:
    table = LeaseTable()
    got = claims(
        table, [entry("r", 1, LeaseState.RELEASED), entry("s", 2, LeaseState.SUPERSEDED)], 0.0
    )
    assert sorted(got) == [("r", Cause.RELEASED), ("s", Cause.SUPERSEDED)]


def test_a_claim_is_made_once_until_done() -> None:
    table = LeaseTable()
    table.observe([entry("a", 1)], 0.0)
    assert claims(table, [entry("a", 1)], 3.0) == [("a", Cause.LAPSED)]
    assert claims(table, [entry("a", 1)], 4.0) == []  # busy: being claimed
    table.done(("gw", "a"))  # the claim failed (the log unavailable): claim again
    assert claims(table, [entry("a", 1)], 5.0) == [("a", Cause.LAPSED)]


def test_a_renewal_before_the_claim_wins() -> None:
    table = LeaseTable()
    table.observe([entry("a", 1)], 0.0)
    (claim,) = table.observe([entry("a", 1)], 3.0)
    assert claim.expected_last == 1  # the claim is conditional on what we saw: a renewal
    table.done(claim.key)  # at position 2 made it fail
    assert claims(table, [entry("a", 2)], 3.5) == []
    assert claims(table, [entry("a", 2)], 6.5) == [("a", Cause.LAPSED)]


def test_an_unfinished_claim_is_taken_over() -> None:
    table = LeaseTable(takeover_after=60.0)
    reaping = entry("a", 7, LeaseState.REAPING)
    assert claims(table, [entry("a", 1), reaping], 0.0) == []  # another reaper's
    assert claims(table, [reaping], 59.0) == []
    (claim,) = table.observe([reaping], 60.0)
    assert (claim.cause, claim.expected_last) == (Cause.TAKEOVER, 7)


def test_reaped_instances_rest_and_vanish_with_the_stream() -> None:
    table = LeaseTable()
    reaped = entry("a", 9, LeaseState.REAPED)
    assert claims(table, [reaped], 0.0) == []
    assert claims(table, [reaped], 10_000.0) == []
    assert table.counts()[LeaseState.REAPED] == 1
    table.observe([], 10_001.0)  # its records expired (the stream's retention)
    assert table.counts()[LeaseState.REAPED] == 0


def test_counts_by_state() -> None:
    table = LeaseTable()
    table.observe(
        [
            entry("a", 1),
            entry("b", 2),
            entry("c", 3, LeaseState.RELEASED),
            entry("c", 4, LeaseState.REAPING),
        ],
        0.0,
    )
    counts = table.counts()
    assert counts[LeaseState.HELD] == 2
    assert counts[LeaseState.REAPING] == 1
    assert counts[LeaseState.RELEASED] == 0


def test_claim_records() -> None:
    claim = Claim("gw.x", "a", 5, Cause.LAPSED)
    subject, scope, record = claim_record(claim, LeaseState.REAPING, "twin-1", AT)
    assert subject == "twinhub.lease.twin.gw~2Ex.a"
    assert scope == "twinhub.lease.*.gw~2Ex.a"
    assert (record.state, record.by, record.cause, record.devices) == (
        LeaseState.REAPING,
        "twin-1",
        "lapsed",
        0,
    )


# -- offline_event ------------------------------------------------------------------------------

LOST = "aaaa"
CID = f"{LOST}.c1"
HELD = HeldConnection("d1", "alice", CID)


def online(cid: str, position: int, gateway: str = "gw", owner: str = "alice") -> AnyEvent:
    return ev.Event(
        owner=owner,
        device_id="d1",
        data=ev.DeviceOnline(gateway=gateway, connection_id=cid, remote_address="10.0.0.5:1"),
        source="/gateway/gw",
        time=AT,
        position=position,
    )


def offline(cid: str, position: int) -> AnyEvent:
    return ev.Event(
        owner="alice",
        device_id="d1",
        data=ev.DeviceOffline(gateway="gw", connection_id=cid),
        source="/gateway/gw",
        time=AT,
        position=position,
    )


def test_the_device_of_a_lost_instance_goes_offline() -> None:
    d = offline_event(HELD, "gw", LOST, online(CID, 40), offline("bbbb.c0", 12), NOW, "/twin/t")
    assert d.event is not None
    assert d.expected_last == 40  # no newer device-online may come between
    e = d.event
    assert isinstance(e.data, ev.DeviceOffline)
    assert (e.owner, e.device_id, e.source, e.time) == ("alice", "d1", "/twin/t", NOW)
    assert e.data == ev.DeviceOffline(
        gateway="gw", connection_id=CID, remote_address="10.0.0.5:1", reason=GATEWAY_LOST
    )
    # derived: every reaper, retry and takeover writes the same event
    assert e.id == gateway_lost_id("d1", CID)
    again = offline_event(HELD, "gw", LOST, online(CID, 40), None, NOW, "/twin/other")
    assert again.event is not None and again.event.id == e.id
    assert gateway_lost_id("d1", "aaaa.c2") != e.id
    assert gateway_lost_id("d2", CID) != e.id


def test_the_owner_is_the_logs() -> None:
    d = offline_event(HELD, "gw", LOST, online(CID, 40, owner="bob"), None, NOW, "/twin/t")
    assert d.event is not None and d.event.owner == "bob"


def test_a_device_that_reconnected_is_left_alone() -> None:
    # through another gateway, or the next run of the same gateway id: another connection
    for newer in (online("cccc.c9", 50, gateway="gw-2"), online("dddd.c1", 50, gateway="gw")):
        d = offline_event(HELD, "gw", LOST, newer, None, NOW, "/twin/t")
        assert d.event is None and d.reason == "reconnected"


def test_a_device_already_offline_is_left_alone() -> None:
    d = offline_event(HELD, "gw", LOST, online(CID, 40), offline(CID, 41), NOW, "/twin/t")
    assert d.event is None and d.reason == "already offline"
    # an offline older than the connection does not count
    d = offline_event(HELD, "gw", LOST, online(CID, 40), offline(CID, 39), NOW, "/twin/t")
    assert d.event is not None


def test_only_connections_of_the_lost_instance() -> None:
    other = HeldConnection("d1", "alice", "bbbb.c1")
    d = offline_event(other, "gw", LOST, online("bbbb.c1", 40), None, NOW, "/twin/t")
    assert d.event is None
    legacy = HeldConnection("d1", "alice", "c1")  # a gateway from before leases
    d = offline_event(legacy, "gw", LOST, online("c1", 40), None, NOW, "/twin/t")
    assert d.event is None


def test_nothing_without_a_device_online_in_the_log() -> None:
    d = offline_event(HELD, "gw", LOST, None, None, NOW, "/twin/t")
    assert d.event is None


def test_offline_scope_covers_the_devices_online_events_only() -> None:
    assert offline_scope("d1") == "twinhub.ev.*.d1.device-online.>"

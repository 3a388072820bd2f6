"""Scripted event sequences through the fold, one behaviour per test."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from proto import events as ev
from twin.errors import FoldError
from twin.fold import fold, fold_all, fold_batch
from twin.model import Connection, Twin

from .factory import T0, changed, event, link, offline, online, unknown

CET = timezone(timedelta(hours=1))


def registered_online(conn: str = "c1") -> Twin:
    twin = fold_all(None, [event(ev.DeviceRegistered(), 1), event(online(conn), 2)])
    assert twin is not None
    return twin


def test_registration_creates_the_twin() -> None:
    twin = fold(None, event(ev.DeviceRegistered(auth_provider="github"), 7, owner="alice"))
    assert twin == Twin(
        device_id="d1",
        owner="alice",
        position=7,
        version=1,
        created_at=T0 + timedelta(seconds=7),
        updated_at=T0 + timedelta(seconds=7),
    )
    assert not twin.online
    assert twin.sync_state == "out_of_sync"


def test_any_known_event_creates_a_missing_twin() -> None:
    twin = fold(None, event(online("c1"), 3, owner="bob"))
    assert twin is not None
    assert (twin.owner, twin.online, twin.position, twin.version) == ("bob", True, 3, 1)


def test_unknown_event_is_a_no_op() -> None:
    assert fold(None, event(unknown(), 1)) is None
    twin = registered_online()
    assert fold(twin, event(unknown(), 9)) is twin


def test_event_at_or_below_the_position_is_a_no_op() -> None:
    twin = registered_online()
    assert fold(twin, event(offline("c1"), 2)) is twin
    assert fold(twin, event(offline("c1"), 1)) is twin


def test_online_records_the_connection_and_resets_sync() -> None:
    twin = fold_all(
        registered_online("c1"),
        [
            event(ev.TwinSyncStateChanged(state="in_sync", connection_id="c1"), 3),
            event(online("c2", gateway="gw-2"), 4),
        ],
    )
    assert twin is not None
    assert twin.connection == Connection(
        online=True,
        since=T0 + timedelta(seconds=4),
        gateway="gw-2",
        connection_id="c2",
        remote_address="10.0.0.5:40122",
        protocol="coap+tcp",
    )
    assert twin.sync_state == "out_of_sync"


def test_offline_of_the_current_connection() -> None:
    twin = fold(registered_online("c1"), event(offline("c1"), 5))
    assert twin is not None
    assert not twin.online
    assert twin.connection.since == T0 + timedelta(seconds=5)
    assert twin.connection.connection_id == "c1"  # the last connection stays on record
    assert (twin.position, twin.version) == (5, 3)


def test_late_offline_of_a_replaced_connection_does_not_flip_the_new_one() -> None:
    # c1 dropped, the device reconnected on c2, then the gateway that held c1 noticed.
    twin = fold_all(registered_online("c1"), [event(online("c2"), 3), event(offline("c1"), 4)])
    assert twin is not None
    assert twin.online
    assert twin.connection.connection_id == "c2"
    assert twin.connection.since == T0 + timedelta(seconds=3)
    # the event is still applied: it counts and it moves the position
    assert (twin.position, twin.version) == (4, 4)


def test_sync_state_only_for_the_current_connection() -> None:
    twin = fold_all(
        registered_online("c1"),
        [
            event(ev.TwinSyncStateChanged(state="syncing", connection_id="c1"), 3),
            event(online("c2"), 4),
            event(ev.TwinSyncStateChanged(state="in_sync", connection_id="c1"), 5),
        ],
    )
    assert twin is not None
    assert twin.sync_state == "out_of_sync"
    twin = fold(twin, event(ev.TwinSyncStateChanged(state="in_sync", connection_id="c2"), 6))
    assert twin is not None
    assert twin.sync_state == "in_sync"
    # no connection id means the current one
    twin = fold(twin, event(ev.TwinSyncStateChanged(state="syncing"), 7))
    assert twin is not None
    assert twin.sync_state == "syncing"


def test_sync_state_ignored_while_offline() -> None:
    twin = fold_all(
        registered_online("c1"),
        [event(offline("c1"), 3), event(ev.TwinSyncStateChanged(state="in_sync"), 4)],
    )
    assert twin is not None
    assert twin.sync_state == "out_of_sync"


def test_unregistered_marks_deleted_and_offline() -> None:
    twin = fold(registered_online(), event(ev.DeviceUnregistered(reason="sign-off"), 3))
    assert twin is not None
    assert twin.deleted
    assert not twin.online
    assert twin.sync_state == "out_of_sync"


def test_reregistration_after_deletion_starts_clean() -> None:
    twin = fold_all(
        registered_online(),
        [
            event(ev.ResourceLinksPublished(links=(link("/a", "x"),)), 3),
            event(changed("/a", {"v": 1}), 4),
            event(ev.DeviceUnregistered(), 5),
            event(ev.DeviceRegistered(), 6, owner="bob"),
        ],
    )
    assert twin is not None
    assert not twin.deleted
    assert twin.owner == "bob"
    assert twin.links == ()
    assert twin.resources == ()
    assert (twin.position, twin.version) == (6, 6)
    assert twin.created_at == T0 + timedelta(seconds=1)


def test_repeated_registration_of_a_live_twin_keeps_its_state() -> None:
    twin = fold_all(
        registered_online(),
        [event(changed("/a", 1), 3), event(ev.DeviceRegistered(), 4)],
    )
    assert twin is not None
    assert twin.resource("/a") is not None
    assert twin.online


def test_links_are_merged_by_href_and_sorted() -> None:
    twin = fold_all(
        registered_online(),
        [
            event(ev.ResourceLinksPublished(links=(link("/b", "rt.b"), link("/a", "rt.a"))), 3),
            event(ev.ResourceLinksPublished(links=(link("/b", "rt.b2", "rt.x"),)), 4),
        ],
    )
    assert twin is not None
    assert [(lk.href, lk.rt) for lk in twin.links] == [
        ("/a", ("rt.a",)),
        ("/b", ("rt.b2", "rt.x")),
    ]
    assert twin.resource_types == ("rt.a", "rt.b2", "rt.x")
    assert twin.link("/b") == link("/b", "rt.b2", "rt.x")
    assert twin.link("/c") is None


def test_unpublish_by_href_by_instance_and_all() -> None:
    start = fold_all(
        registered_online(),
        [
            event(
                ev.ResourceLinksPublished(
                    links=(link("/a", "x", ins=1), link("/b", "y", ins=2), link("/c", "z", ins=3))
                ),
                3,
            ),
            event(changed("/a", 1), 4),
            event(changed("/b", 2), 5),
            event(changed("/unlinked", 3), 6),
        ],
    )
    by_href = fold(start, event(ev.ResourceLinksUnpublished(hrefs=("/a",)), 7))
    assert by_href is not None
    assert [lk.href for lk in by_href.links] == ["/b", "/c"]
    assert [r.href for r in by_href.resources] == ["/b", "/unlinked"]
    by_ins = fold(start, event(ev.ResourceLinksUnpublished(instance_ids=(2, 3)), 7))
    assert by_ins is not None
    assert [lk.href for lk in by_ins.links] == ["/a"]
    assert [r.href for r in by_ins.resources] == ["/a", "/unlinked"]
    everything = fold(start, event(ev.ResourceLinksUnpublished(), 7))
    assert everything is not None
    assert (everything.links, everything.resources) == ((), ())


def test_resource_changed_keeps_the_last_content_per_href() -> None:
    twin = fold_all(
        registered_online(),
        [
            event(changed("/b.c", {"on": True}, etag="e1", observe_seq=3), 3),
            event(changed("/a", [1, 2]), 4),
            event(changed("/b.c", {"on": False}, etag="e2", observe_seq=4, raw="AAE="), 5),
        ],
    )
    assert twin is not None
    assert [r.href for r in twin.resources] == ["/a", "/b.c"]
    res = twin.resource("/b.c")
    assert res is not None
    assert (res.content, res.etag, res.observe_seq, res.raw, res.position) == (
        {"on": False},
        "e2",
        4,
        "AAE=",
        5,
    )
    assert res.updated_at == T0 + timedelta(seconds=5)
    assert twin.resource("/nope") is None


def test_times_are_utc_milliseconds() -> None:
    t = datetime(2026, 3, 1, 12, 0, 0, 123456)
    expected = datetime(2026, 3, 1, 12, 0, 0, 123000, tzinfo=UTC)
    naive = fold(None, event(online(), 1, time=t))  # a naive time is taken as UTC
    aware = fold(None, event(online(), 1, time=t.replace(tzinfo=UTC).astimezone(CET)))
    assert naive is not None
    assert aware is not None
    assert naive.updated_at == aware.updated_at == expected
    assert aware.updated_at.tzinfo is UTC


def test_misuse_raises() -> None:
    with pytest.raises(FoldError, match="no log position"):
        fold(None, ev.Event(owner="a", device_id="d1", data=online(), source="/s"))
    with pytest.raises(FoldError, match="folded into"):
        fold(registered_online(), event(online(), 9, device="d2"))


def test_fold_batch_groups_devices_and_orders_by_position() -> None:
    stored = registered_online()  # d1 at position 2
    batch = [
        event(changed("/a", 2), 12),
        event(online("c9"), 11, device="d2"),
        event(changed("/a", 1), 10),  # a redelivery ahead of newer events: applied first
        event(offline("c1"), 2),  # already in the stored twin
        event(unknown(), 13, device="d3"),
    ]
    result = fold_batch({"d1": stored}, batch)
    assert set(result.twins) == {"d1", "d2"}
    assert result.applied == {"d1": 2, "d2": 1}
    assert (result.stale, result.unknown, result.applied_total) == (1, 1, 3)
    res = result.twins["d1"].resource("/a")
    assert res is not None
    assert res.content == 2
    assert result.twins["d1"].version == stored.version + 2

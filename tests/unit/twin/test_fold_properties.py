"""Properties of the fold over generated logs (hypothesis)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from proto import events as ev
from proto.events import AnyEvent, UnknownData
from twin.fold import fold, fold_all, fold_batch
from twin.model import Twin

from .factory import device_logs, non_destructive


def round_trip(twin: Twin | None) -> Twin | None:
    """What a store gives back: the document form read again."""
    return None if twin is None else Twin.from_document(twin.to_document())


@given(device_logs(), st.data())
def test_folding_an_event_twice_is_folding_it_once(
    log: list[AnyEvent], data: st.DataObject
) -> None:
    k = data.draw(st.integers(0, len(log)))
    twin = fold_all(None, log[:k])
    for e in log[k:]:
        once = fold(twin, e)
        assert fold(once, e) == once
        twin = once


@given(device_logs(), st.data())
def test_fold_of_a_prefix_then_the_rest_is_the_fold_of_all(
    log: list[AnyEvent], data: st.DataObject
) -> None:
    k = data.draw(st.integers(0, len(log)))
    whole = fold_all(None, log)
    # the prefix goes through the document form, as it does between projector batches
    assert fold_all(round_trip(fold_all(None, log[:k])), log[k:]) == whole
    assert round_trip(whole) == whole


@given(device_logs(), st.data())
def test_redeliveries_change_nothing(log: list[AnyEvent], data: st.DataObject) -> None:
    """At-least-once delivery: any earlier event may come again, any number of times."""
    delivered: list[AnyEvent] = []
    for i, e in enumerate(log):
        delivered.append(e)
        delivered.extend(data.draw(st.lists(st.sampled_from(log[: i + 1]), max_size=2)))
    assert fold_all(None, delivered) == fold_all(None, log)


@given(device_logs())
def test_version_counts_known_events_and_position_is_the_last(log: list[AnyEvent]) -> None:
    twin = fold_all(None, log)
    known = [e for e in log if not isinstance(e.data, UnknownData)]
    if not known:
        assert twin is None
        return
    assert twin is not None
    assert twin.version == len(known)
    assert twin.position == known[-1].position
    assert twin.updated_at <= known[-1].time


@given(device_logs())
def test_links_and_resources_are_sorted_and_unique(log: list[AnyEvent]) -> None:
    twin = fold_all(None, log)
    if twin is None:
        return
    for hrefs in ([lk.href for lk in twin.links], [r.href for r in twin.resources]):
        assert hrefs == sorted(set(hrefs))
    assert set(twin.resource_types) == {rt for lk in twin.links for rt in lk.rt}


@given(device_logs(non_destructive))
def test_resources_hold_exactly_the_last_content_per_href(log: list[AnyEvent]) -> None:
    expected: dict[str, tuple[object, int]] = {}
    for e in log:
        if isinstance(e.data, ev.ResourceChanged):
            assert e.position is not None
            expected[e.data.href] = (e.data.content, e.position)
    twin = fold_all(None, log)
    got = {} if twin is None else {r.href: (r.content, r.position) for r in twin.resources}
    assert got == expected


@given(device_logs(non_destructive))
def test_online_follows_the_current_connection(log: list[AnyEvent]) -> None:
    current: str | None = None  # the connection id while online
    for e in log:
        if isinstance(e.data, ev.DeviceOnline):
            current = e.data.connection_id
        elif isinstance(e.data, ev.DeviceOffline) and e.data.connection_id == current:
            current = None
    twin = fold_all(None, log)
    online = twin is not None and twin.online
    assert online == (current is not None)
    if twin is not None and current is not None:
        assert twin.connection.connection_id == current


@given(device_logs(devices=("d1", "d2", "d3"), max_size=40), st.data())
def test_batches_equal_the_per_device_fold(log: list[AnyEvent], data: st.DataObject) -> None:
    """Cut the log into batches, shuffle inside each (redeliveries come first), fold each onto
    the twins the previous batches left: the same twins as folding each device's events."""
    cuts = sorted(data.draw(st.lists(st.integers(0, len(log)), max_size=4)))
    twins: dict[str, Twin | None] = {}
    for lo, hi in zip([0, *cuts], [*cuts, len(log)], strict=True):
        batch = data.draw(st.permutations(log[lo:hi]))
        result = fold_batch(twins, batch)
        twins.update({d: round_trip(t) for d, t in result.twins.items()})
    for device in ("d1", "d2", "d3"):
        mine = [e for e in log if e.device_id == device]
        assert twins.get(device) == fold_all(None, mine)

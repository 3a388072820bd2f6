"""Hypothesis strategies for proto's event types (shared by proto and consumer tests)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from hypothesis import strategies as st

from proto import events

ids = st.text(min_size=1, max_size=24)
hrefs = st.text(min_size=1, max_size=30).map(lambda s: "/" + s)
json_leaf = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**53), max_value=2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=16)
)
json_values: st.SearchStrategy[Any] = st.recursive(
    json_leaf,
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=12,
)
times = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
)
str_tuples = st.lists(st.text(min_size=1, max_size=12), max_size=3).map(tuple)

links = st.builds(
    events.ResourceLink,
    href=hrefs,
    rt=str_tuples,
    interfaces=str_tuples,
    ins=st.none() | st.integers(min_value=0, max_value=2**31),
    observable=st.booleans(),
)

payloads: st.SearchStrategy[events.EventData] = st.one_of(
    st.builds(events.DeviceRegistered, auth_provider=st.text(max_size=10)),
    st.builds(events.DeviceUnregistered, reason=st.text(max_size=10)),
    st.builds(events.DeviceOnline, gateway=ids, connection_id=ids, remote_address=ids),
    st.builds(events.DeviceOffline, gateway=ids, connection_id=ids, reason=st.text(max_size=10)),
    st.builds(
        events.TwinSyncStateChanged,
        state=st.sampled_from(["out_of_sync", "syncing", "in_sync"]),
    ),
    st.builds(events.ResourceLinksPublished, links=st.lists(links, max_size=3).map(tuple)),
    st.builds(
        events.ResourceLinksUnpublished,
        hrefs=st.lists(hrefs, max_size=3).map(tuple),
        instance_ids=st.lists(st.integers(0, 1000), max_size=3).map(tuple),
    ),
    st.builds(
        events.ResourceChanged,
        href=hrefs,
        content=json_values,
        content_format=st.sampled_from([None, 50, 60, 10000]),
        etag=st.none() | st.binary(max_size=8).map(bytes.hex),
        observe_seq=st.none() | st.integers(0, 2**24),
    ),
)

command_payloads: st.SearchStrategy[events.EventData] = st.one_of(
    st.builds(
        events.CommandPending,
        href=hrefs,
        op=st.sampled_from(events.COMMAND_OPS),
        content=json_values,
        interface=st.none() | st.just("oic.if.baseline"),
        expires_at=st.none() | times,
        max_attempts=st.integers(1, 10),
    ),
    st.builds(
        events.CommandSent, href=hrefs, gateway=ids, connection_id=ids, attempt=st.integers(1, 5)
    ),
    st.builds(events.CommandSucceeded, href=hrefs, status=st.just("2.04"), content=json_values),
    st.builds(
        events.CommandFailed,
        href=hrefs,
        status=st.none() | st.just("4.00"),
        reason=st.text(max_size=10),
        attempts=st.integers(0, 5),
    ),
    st.builds(events.CommandExpired, href=hrefs, attempts=st.integers(0, 5)),
    st.builds(events.CommandCanceled, href=hrefs, reason=st.text(max_size=10)),
    st.builds(
        events.DesiredSet,
        href=hrefs,
        content=st.dictionaries(st.text(max_size=8), json_values, max_size=3),
        version=st.integers(1, 100),
    ),
    st.builds(events.DesiredCleared, href=hrefs, version=st.integers(1, 100)),
    st.builds(events.DesiredReached, href=hrefs, version=st.integers(1, 100)),
)

event_objects: st.SearchStrategy[events.AnyEvent] = st.builds(
    events.Event,
    owner=ids,
    device_id=ids,
    data=payloads | command_payloads,
    source=ids.map(lambda s: "/gateway/" + s),
    id=st.uuids().map(str),
    time=times,
    correlation_id=st.none() | ids,
)

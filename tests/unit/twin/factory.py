"""Builders and hypothesis strategies for twin tests: events of a small world of devices,
connections and hrefs, so that generated sequences collide often."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import strategies as st

from proto import events as ev
from proto.events import AnyEvent, EventData, UnknownData

T0 = datetime(2026, 1, 1, tzinfo=UTC)
DEVICES = ("d1", "d2", "d3")
OWNERS = ("alice", "bob")
CONNECTIONS = ("c1", "c2", "c3")
HREFS = ("/a", "/light/1", "/oic/d", "/x.y?if=oic.if.b")
RTS = ("oic.r.switch.binary", "oic.r.light.brightness", "oic.wk.d")


def event(
    data: EventData | UnknownData,
    position: int,
    *,
    device: str = "d1",
    owner: str = "alice",
    time: datetime | None = None,
) -> AnyEvent:
    """A logged event at ``position`` (its time defaults to T0 + position seconds)."""
    return ev.Event(
        owner=owner,
        device_id=device,
        data=data,
        source="/gateway/test",
        id=f"{device}-{position}",
        time=time or T0 + timedelta(seconds=position),
        position=position,
    )


def online(conn: str = "c1", gateway: str = "gw-1") -> ev.DeviceOnline:
    return ev.DeviceOnline(gateway=gateway, connection_id=conn, remote_address="10.0.0.5:40122")


def offline(conn: str = "c1", gateway: str = "gw-1") -> ev.DeviceOffline:
    return ev.DeviceOffline(gateway=gateway, connection_id=conn)


def changed(href: str, content: Any, **kw: Any) -> ev.ResourceChanged:
    return ev.ResourceChanged(href=href, content=content, content_format=50, **kw)


def link(href: str, *rt: str, ins: int | None = None) -> ev.ResourceLink:
    return ev.ResourceLink(href=href, rt=rt, interfaces=("oic.if.baseline",), ins=ins)


def unknown() -> UnknownData:
    return UnknownData(type="io.twinhub.future.thing.v1", kind="future-thing", raw=b"{}")


def positioned(
    payloads: Sequence[tuple[EventData | UnknownData, str, str]], gaps: Sequence[int]
) -> list[AnyEvent]:
    """(payload, device, owner) triples at strictly increasing positions with the given gaps."""
    out: list[AnyEvent] = []
    pos = 0
    for (data, device, owner), gap in zip(payloads, gaps, strict=True):
        pos += gap
        out.append(event(data, pos, device=device, owner=owner))
    return out


# -- strategies -----------------------------------------------------------------------------

json_values: st.SearchStrategy[Any] = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=6),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
    max_leaves=8,
)
conns = st.sampled_from(CONNECTIONS)
hrefs = st.sampled_from(HREFS)
links = st.builds(
    lambda href, rts, ins: ev.ResourceLink(href=href, rt=tuple(rts), ins=ins),
    hrefs,
    st.lists(st.sampled_from(RTS), max_size=2, unique=True),
    st.none() | st.integers(0, 3),
)

resource_changes: st.SearchStrategy[ev.ResourceChanged] = st.builds(
    ev.ResourceChanged,
    href=hrefs,
    content=json_values,
    content_format=st.sampled_from([None, 50, 60, 10000]),
    etag=st.none() | st.sampled_from(["e1", "e2"]),
    observe_seq=st.none() | st.integers(0, 100),
)
non_destructive: st.SearchStrategy[EventData | UnknownData] = st.one_of(
    st.builds(online, conns),
    st.builds(offline, conns),
    st.builds(
        ev.TwinSyncStateChanged,
        state=st.sampled_from(["out_of_sync", "syncing", "in_sync"]),
        connection_id=st.sampled_from(("", *CONNECTIONS)),
    ),
    st.builds(ev.ResourceLinksPublished, links=st.lists(links, max_size=3).map(tuple)),
    resource_changes,
    st.just(unknown()),
)
# Reports with a connection and observe numbers: the fold orders these (twin.freshness).
connected_reports: st.SearchStrategy[ev.ResourceChanged] = st.builds(
    ev.ResourceChanged,
    href=hrefs,
    content=json_values,
    observe_seq=st.none() | st.integers(0, 2**24 - 1) | st.integers(0, 5),
    connection_id=conns,
)
TELEMETRY_KEYS = ("t", "h", "a.b")
HASHES = ("a" * 64, "b" * 64, "")
telemetry_values = st.dictionaries(st.sampled_from(TELEMETRY_KEYS), json_values, max_size=3)
# A sample's ts, near the events' own times (T0 + position seconds) so both orders occur.
sample_ts = st.none() | st.integers(0, 3).map(lambda k: int(T0.timestamp() * 1000) + k * 1000)
simple_payloads: st.SearchStrategy[EventData | UnknownData] = st.one_of(
    st.builds(
        ev.DeviceProvisioned,
        name=st.sampled_from(("", "boiler")),
        token_hash=st.sampled_from(HASHES[:2]),
    ),
    st.builds(
        ev.DeviceTokenChanged,
        token_hash=st.sampled_from(HASHES),
        reason=st.sampled_from(("rotated", "revoked")),
    ),
    st.builds(ev.TelemetryReported, ts=sample_ts, values=telemetry_values),
    st.builds(ev.AttributesReported, values=telemetry_values),
)
any_payload: st.SearchStrategy[EventData | UnknownData] = st.one_of(
    non_destructive,
    simple_payloads,
    connected_reports,
    st.builds(ev.DeviceRegistered),
    st.builds(ev.DeviceUnregistered),
    st.builds(
        ev.ResourceLinksUnpublished,
        hrefs=st.lists(hrefs, max_size=2).map(tuple),
        instance_ids=st.lists(st.integers(0, 3), max_size=2).map(tuple),
    ),
)


@st.composite
def device_logs(
    draw: st.DrawFn,
    payloads: st.SearchStrategy[EventData | UnknownData] = any_payload,
    devices: Sequence[str] = ("d1",),
    max_size: int = 25,
) -> list[AnyEvent]:
    """A log of events of ``devices`` at strictly increasing positions (with gaps)."""
    items = draw(
        st.lists(
            st.tuples(payloads, st.sampled_from(devices), st.sampled_from(OWNERS[:1] * 3 + OWNERS)),
            max_size=max_size,
        )
    )
    gaps = draw(st.lists(st.integers(1, 3), min_size=len(items), max_size=len(items)))
    return positioned(items, gaps)

from __future__ import annotations

from typing import Any

import pytest

from eventstore.errors import UnavailableError
from eventstore.memory import InMemoryEventStore
from gateway.simpleattrs import AttributeReader
from proto import binding
from proto.events import (
    AttributesReported,
    DesiredCleared,
    DesiredSet,
    Event,
    TelemetryReported,
)


async def put(store: InMemoryEventStore, *datas: Any, device: str = "d1") -> None:
    await store.append(
        [
            binding.to_nats(Event(owner="alice", device_id=device, data=d, source="/t"))
            for d in datas
        ]
    )


class Counting(InMemoryEventStore):
    reads = 0
    down = False

    def read(self, *args: Any, **kw: Any) -> Any:
        self.reads += 1
        if self.down:
            raise UnavailableError("down")
        return super().read(*args, **kw)


async def test_the_view_follows_the_log_incrementally() -> None:
    store = Counting()
    await store.provision()
    reader = AttributeReader(store)
    await put(
        store,
        AttributesReported(values={"a": 1}),
        TelemetryReported(values={"t": 1}),
        DesiredSet(href="/shared/s", content={"on": True}, version=1),
    )
    await put(store, AttributesReported(values={"a": 99}), device="other")
    v = await reader.view("alice", "d1")
    assert (dict(v.client), dict(v.shared)) == ({"a": 1}, {"s": {"on": True}})
    await put(
        store,
        AttributesReported(values={"b": 2}),
        DesiredCleared(href="/shared/s", version=2),
    )
    v = await reader.view("alice", "d1")
    assert (dict(v.client), dict(v.shared)) == ({"a": 1, "b": 2}, {})
    assert store.reads == 6  # three filters per view


async def test_a_failed_read_leaves_the_view_as_it_was() -> None:
    store = Counting()
    await store.provision()
    reader = AttributeReader(store)
    await put(store, AttributesReported(values={"a": 1}))
    assert dict((await reader.view("alice", "d1")).client) == {"a": 1}
    store.down = True
    with pytest.raises(UnavailableError):
        await reader.view("alice", "d1")
    store.down = False
    await put(store, AttributesReported(values={"a": 2}))
    assert dict((await reader.view("alice", "d1")).client) == {"a": 2}


async def test_the_cache_is_bounded() -> None:
    store = InMemoryEventStore()
    await store.provision()
    reader = AttributeReader(store, max_devices=2)
    for d in ("d1", "d2", "d3"):
        await reader.view("alice", d)
    assert len(reader) == 2
    with pytest.raises(ValueError, match="max_devices"):
        AttributeReader(store, max_devices=0)

"""Reading a simple device's attributes from the log, incrementally, with a bounded cache.

A device's view (:class:`gateway.simple.AttributeView`) is folded from three subject filters
of the device: ``attributes-reported`` (client attributes), ``desired-set`` and
``desired-cleared`` (shared attributes: desired state on ``/shared/<key>``). Each read goes on
after the last position seen per filter, so a device asking again costs three short reads
that find nothing new, and the view is current with whatever any gateway or the API appended
before the read (the gateway's own appends included). The view of at most ``max_devices``
devices is kept (least recently used forgotten first).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass, field

from eventstore.ports import EventStore
from gateway.simple import AttributeView, fold_attributes
from proto import binding, subjects
from proto.events import AnyEvent, AttributesReported, DesiredCleared, DesiredSet

__all__ = ["AttributeReader"]

_KINDS = (AttributesReported.KIND, DesiredSet.KIND, DesiredCleared.KIND)


@dataclass(slots=True)
class _Entry:
    view: AttributeView = field(default_factory=AttributeView)
    after: dict[str, int] = field(default_factory=dict)  # filter -> last position read
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class AttributeReader:
    def __init__(self, store: EventStore, *, max_devices: int = 10_000) -> None:
        if max_devices < 1:
            raise ValueError("max_devices must be >= 1")
        self.store = store
        self.max_devices = max_devices
        self._entries: OrderedDict[tuple[str, str], _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    async def view(self, owner: str, device_id: str) -> AttributeView:
        """The device's attributes as of now. Raises the store's errors
        (:class:`eventstore.errors.UnavailableError`)."""
        key = (owner, device_id)
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _Entry()
            while len(self._entries) > self.max_devices:
                self._entries.popitem(last=False)
        else:
            self._entries.move_to_end(key)
        async with entry.lock:
            events: list[AnyEvent] = []
            positions: dict[str, int] = {}
            for kind in _KINDS:
                flt = subjects.event_filter(owner, device_id, kind)
                last = entry.after.get(flt, 0)
                async for stored in self.store.read(flt, after=last):
                    events.append(binding.from_stored(stored))
                    last = stored.position
                positions[flt] = last
            view = entry.view
            for ev in sorted(events, key=lambda e: e.position or 0):
                view = fold_attributes(view, ev)
            # commit only once every read succeeded: a failed read leaves the entry as it was
            entry.view = view
            entry.after.update(positions)
            return view

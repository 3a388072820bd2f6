"""What the log says about a device when it signs in (its links, its last contents)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from eventstore.ports import EventStore
from gateway import ocf
from gateway.commands import Command
from gateway.session import DeviceState
from proto import binding, subjects
from proto.events import (
    COMMAND_EVENTS,
    AnyEvent,
    CommandPending,
    CommandSent,
    DeviceUnregistered,
    ResourceChanged,
    ResourceLink,
    ResourceLinksPublished,
    ResourceLinksUnpublished,
)
from proto.message import StoredMessage


async def load_device_state(store: EventStore, owner: str, device_id: str) -> DeviceState:
    """Replay the device's link and registration events (server-side filtered, small), and read
    the last content the log holds of every resource a synchronisation may read: the published
    ones and the device information (:func:`gateway.ocf.is_synced`), so that a re-sync finding
    them unchanged appends nothing (one direct get per resource)."""
    found = await discover_owner_links(store, owner, (device_id,))
    links = {link.href: link for link in found.get(device_id, ())}
    last: dict[str, tuple[int | None, Any]] = {}
    for href in sorted({*links, *ocf.DEVICE_INFO}):
        if not ocf.is_synced(href, published=href in links):
            continue
        subject = subjects.event_subject(owner, device_id, ResourceChanged.KIND, href)
        msg = await store.last_message(subject)
        if msg is None:
            continue
        ev = binding.from_stored(msg).data
        if isinstance(ev, ResourceChanged):
            if ev.status.startswith("2."):
                last[href] = (ev.content_format, ev.content)
            else:
                last[href] = (None, ("status", ev.status))
    return DeviceState(links=tuple(links.values()), last_content=last)


async def discover_owner_links(
    store: EventStore, owner: str, device_ids: tuple[str, ...] = ()
) -> dict[str, tuple[ResourceLink, ...]]:
    """The current links of an owner's devices (all, or the given ones), from the log."""
    stored: list[StoredMessage] = []
    devices = device_ids or (None,)
    for device in devices:
        for kind in (
            ResourceLinksPublished.KIND,
            ResourceLinksUnpublished.KIND,
            DeviceUnregistered.KIND,
        ):
            f = subjects.event_filter(owner=owner, device=device, kind=kind)
            stored += [m async for m in store.read(f)]
    stored.sort(key=lambda m: m.position)
    per_device: dict[str, dict[str, ResourceLink]] = {}
    for m in stored:
        ev = binding.from_stored(m)
        links = per_device.setdefault(ev.device_id, {})
        data = ev.data
        if isinstance(data, ResourceLinksPublished):
            for link in data.links:
                links[link.href] = link
        elif isinstance(data, ResourceLinksUnpublished):
            if not data.hrefs and not data.instance_ids:
                links.clear()
            for href in data.hrefs:
                links.pop(href, None)
            wanted = set(data.instance_ids)
            for href in [h for h, link in links.items() if link.ins in wanted]:
                links.pop(href)
        elif isinstance(data, DeviceUnregistered):
            per_device.pop(ev.device_id, None)
    return {d: tuple(links.values()) for d, links in per_device.items() if links}


@dataclass
class CommandLog:
    """A device's open commands, read incrementally from the log (issue order).

    One cursor per event kind: the kinds are read one after another, and a message of one kind
    appended (or made visible) while another kind is read must not be skipped because that
    other read went further. (With a single cursor, a ``command-pending`` appended between the
    reads was passed over until the device's next sign-in.)

    A correlation id may name a new command once the one before ended (the twin accepts the id
    again when it has forgotten that one, see :mod:`twin.commands`), so ``done`` maps an id to
    the position of the outcome that ended it: events before it are the ended command's (read
    after its outcome), a ``command-pending`` after it is a new command, delivered like any
    other. While a command is open a second ``command-pending`` of its id is ignored (the first
    wins, as in the twin's fold)."""

    owner: str
    device_id: str
    open: dict[str, Command] = field(default_factory=dict)
    done: dict[str, int] = field(default_factory=dict)  # id -> position of its last outcome
    after: dict[str, int] = field(default_factory=dict)  # kind -> the log position read up to

    def cursor(self, kinds: Iterable[str]) -> tuple[int, ...]:
        """Where the reads of these kinds are: it changes exactly when a refresh read one."""
        return tuple(self.after.get(kind, 0) for kind in kinds)

    async def refresh(self, store: EventStore) -> tuple[list[Command], list[str]]:
        """Read what is new; returns (commands that became open, correlation ids now closed)."""
        stored: list[StoredMessage] = []
        for cls in COMMAND_EVENTS:
            f = subjects.event_filter(owner=self.owner, device=self.device_id, kind=cls.KIND)
            read = [m async for m in store.read(f, after=self.after.get(cls.KIND, 0))]
            if read:
                self.after[cls.KIND] = read[-1].position
            stored += read
        stored.sort(key=lambda m: m.position)
        added: dict[str, Command] = {}
        closed: list[str] = []
        for m in stored:
            ev = binding.from_stored(m)
            corr = ev.correlation_id
            if corr is None or m.position < self.done.get(corr, 0):
                continue
            current = self.open.get(corr)
            if current is not None and m.position < current.position:
                continue  # an older command's under the same id
            data = ev.data
            if isinstance(data, CommandPending):
                cmd = command_from_event(ev, m.position)
                if cmd is not None and current is None:
                    self.done.pop(corr, None)
                    self.open[corr] = added[corr] = cmd
            elif isinstance(data, CommandSent):
                if corr in self.open:
                    self.open[corr].attempts = max(self.open[corr].attempts, data.attempt)
            else:  # an outcome: succeeded, failed, expired, canceled
                self.done[corr] = m.position
                self.open.pop(corr, None)
                if added.pop(corr, None) is None:
                    closed.append(corr)
        return sorted(added.values(), key=lambda c: c.position), closed


async def load_pending_commands(store: EventStore, owner: str, device_id: str) -> list[Command]:
    """The device's open commands (pending or sent, no outcome yet), in issue order."""
    opened, _ = await CommandLog(owner, device_id).refresh(store)
    return opened


def command_from_event(ev: AnyEvent, position: int) -> Command | None:
    """A live ``command-pending`` event as a :class:`Command`."""
    data = ev.data
    if not isinstance(data, CommandPending) or ev.correlation_id is None:
        return None
    return Command(
        correlation_id=ev.correlation_id,
        op=data.op,
        href=data.href,
        position=position,
        expires_at=data.expires_at.timestamp() if data.expires_at else None,
        content=data.content,
        content_b64=data.content_b64,
        content_format=data.content_format,
        interface=data.interface,
        max_attempts=data.max_attempts,
        owner=ev.owner,
    )

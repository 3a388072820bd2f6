"""Folding events into twins: pure functions, no I/O, no clock (time comes from the events).

:func:`fold` applies one event to one twin. It is idempotent by log position: an event at or
below the twin's ``position`` changes nothing, so redelivered and replayed events are
harmless, and folding any prefix of a device's log and then the rest gives the same twin as
folding it all at once. Every event of a known type that is newer than the twin advances
``position`` and ``version`` (so ``version`` counts the device's events), even when it leaves
the rest unchanged (a late offline of a replaced connection). Events of unknown types
(:class:`~proto.events.UnknownData`) change nothing at all.

Resource content. ``resource-changed`` replaces a resource's content unless it is older than
what the twin holds (:mod:`twin.freshness`: per connection, RFC 7641's freshness rule on the
observe numbers; a newer connection's report wins over an older one's, a late report of a
replaced connection changes nothing). The twin holds whatever content the log has for a
resource; which resources those are is the gateway's rule (:func:`gateway.ocf.is_synced`: the
published ones and the device information).

Commands. ``command-pending`` adds a command (its correlation id is the envelope's
``correlation_id``; a second pending event with an id that is still open is ignored: the first
one wins), ``command-sent`` marks it sent, and the first final event (succeeded / failed /
expired / canceled) removes it and records the outcome in ``recent_outcomes``; a final event for
a command that is not open (already ended, or never seen) changes nothing but the position.

Desired state. ``desired-set`` / ``desired-cleared`` replace a resource's desired entry with the
event's version (the API gives each a version one higher than the last). ``desired-reached``
marks the entry reached if it is for the current version and the delta is empty. After every
event an entry whose delta is no longer empty is not reached any more.

Simple devices (PRODUCT.md 4.2). ``device-provisioned`` creates the twin of a simple device for
the event's owner, with its profile, name and token hash; on a deleted twin it starts afresh (as
a registration does), on a live twin it changes nothing but the position: the first provisioning
wins and a provisioning for another owner never takes a device over (the API refuses one for a
device that exists; the conditional append makes two racing ones one), and a ``device-registered``
(an OCF sign-up) on a live simple device changes nothing but the position. ``device-token-changed``
sets the token hash (empty: revoked). ``telemetry-reported`` keeps per key the latest value and
its time: the sample's ``ts``, else the event's time (ms); a sample older than the value held
(a smaller ``ts``) never replaces it, an equal one does (the later in the log wins).
``attributes-reported`` merges the client attributes. Those three change only a live simple
device of the event's owner (a late event of a token of a former owner changes nothing). A
simple device is ``in_sync`` whenever it is online: it has no synchronisation phase, what it
sends is the twin. Its shared attributes are desired state on ``/shared/<key>`` whose content is
the attribute's value; they have no delta (nothing reports them back).

:func:`fold_batch` folds a batch of many devices' events; the projector and the rebuild use it.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from proto.events import (
    AnyEvent,
    AttributesReported,
    CommandCanceled,
    CommandExpired,
    CommandFailed,
    CommandPending,
    CommandSent,
    CommandSucceeded,
    DesiredCleared,
    DesiredReached,
    DesiredSet,
    DeviceOffline,
    DeviceOnline,
    DeviceProvisioned,
    DeviceRegistered,
    DeviceTokenChanged,
    DeviceUnregistered,
    ResourceChanged,
    ResourceLink,
    ResourceLinksPublished,
    ResourceLinksUnpublished,
    TelemetryReported,
    TwinSyncStateChanged,
    UnknownData,
)
from twin.errors import FoldError
from twin.freshness import content_replaces
from twin.model import (
    RECENT_OUTCOMES,
    CommandOutcome,
    Connection,
    DesiredState,
    EndedCommand,
    ResourceState,
    Telemetry,
    Twin,
    TwinCommand,
    utc_ms,
)

__all__ = ["BatchFold", "fold", "fold_all", "fold_batch"]


def fold(twin: Twin | None, event: AnyEvent) -> Twin | None:
    """``twin`` with ``event`` applied; ``None`` stays ``None`` only for an unknown event type.

    Raises :class:`FoldError` for an event without a log position or of another device:
    those never come off the log, so they are programming errors.
    """
    position = event.position
    if position is None:
        raise FoldError(f"event {event.id} has no log position: only logged events are folded")
    if twin is not None and event.device_id != twin.device_id:
        raise FoldError(
            f"event {event.id} of device {event.device_id!r} folded into {twin.device_id!r}"
        )
    data = event.data
    if isinstance(data, UnknownData):
        return twin
    if twin is not None and position <= twin.position:
        return twin  # already applied: a redelivery or a replay
    t = utc_ms(event.time)
    base = twin or Twin(
        device_id=event.device_id,
        owner=event.owner,
        position=0,
        version=0,
        created_at=t,
        updated_at=t,
    )
    new = base  # a known type this twin does not model (yet): only the position moves
    match data:
        case DeviceRegistered():
            if twin is not None and twin.simple and not twin.deleted:
                new = base  # an OCF sign-up never turns a live simple device into an OCF one
            else:
                new = _registered(base, event.owner, existed=twin is not None)
        case DeviceUnregistered():
            new = replace(
                base,
                deleted=True,
                connection=_offline(base.connection, t),
                sync_state="out_of_sync",
            )
        case DeviceOnline():
            new = replace(
                base,
                connection=Connection(
                    online=True,
                    since=t,
                    gateway=data.gateway,
                    connection_id=data.connection_id,
                    remote_address=data.remote_address,
                    protocol=data.protocol,
                ),
                # A simple device has no synchronisation phase: what it sends is the twin.
                sync_state="in_sync" if base.simple else "out_of_sync",
            )
        case DeviceOffline():
            # Only the current connection goes offline: a late offline of a connection the
            # device already replaced must not flip the newer one.
            if base.connection.online and data.connection_id == base.connection.connection_id:
                new = replace(
                    base, connection=_offline(base.connection, t), sync_state="out_of_sync"
                )
            else:
                new = base
        case TwinSyncStateChanged():
            # "" means "the current connection" (producers may omit it).
            current = base.connection
            if current.online and data.connection_id in ("", current.connection_id):
                new = replace(base, sync_state=data.state)
            else:
                new = base
        case ResourceLinksPublished():
            new = replace(base, links=_merge_links(base.links, data.links))
        case ResourceLinksUnpublished():
            new = _unpublish(base, data)
        case ResourceChanged():
            stored = base.resource(data.href)
            if content_replaces(stored, data, t, base.connection.connection_id):
                # the hot path: one copy of the twin, not two (position set here too)
                new = replace(
                    base,
                    position=position,
                    version=base.version + 1,
                    updated_at=t,
                    resources=_put_resource(
                        base.resources,
                        ResourceState(
                            href=data.href,
                            content=data.content,
                            content_format=data.content_format,
                            raw=data.raw,
                            status=data.status,
                            etag=data.etag,
                            observe_seq=data.observe_seq,
                            connection_id=data.connection_id,
                            updated_at=t,
                            position=position,
                        ),
                    ),
                )
            else:
                new = base  # older than what the twin holds (see twin.freshness)
        case CommandPending():
            new = _command_pending(base, event, data, position, t)
        case CommandSent():
            new = _command_sent(base, event.correlation_id, data, t)
        case CommandSucceeded() | CommandFailed() | CommandExpired() | CommandCanceled():
            new = _command_ended(base, event.correlation_id, data, position, t)
        case DeviceProvisioned():
            new = _provisioned(base, event.owner, data, existed=twin is not None)
        case DeviceTokenChanged():
            if _reports(base, event.owner):
                new = replace(base, token_hash=data.token_hash)
        case TelemetryReported():
            if _reports(base, event.owner):
                ts = _ms(t) if data.ts is None else data.ts
                new = replace(
                    base,
                    position=position,
                    version=base.version + 1,
                    updated_at=t,
                    telemetry=_put_telemetry(base.telemetry, data.values, ts),
                )
        case AttributesReported():
            if _reports(base, event.owner):
                merged = {**dict(base.client_attributes), **data.values}
                new = replace(base, client_attributes=tuple(sorted(merged.items())))
        case DesiredSet():
            new = replace(
                base,
                desired=_put_desired(
                    base.desired,
                    DesiredState(
                        href=data.href,
                        content=data.content,
                        version=data.version,
                        set_at=t,
                        position=position,
                    ),
                ),
            )
        case DesiredCleared():
            new = replace(
                base,
                desired=_put_desired(
                    base.desired,
                    DesiredState(
                        href=data.href,
                        content=None,
                        version=data.version,
                        set_at=t,
                        position=position,
                    ),
                ),
            )
        case DesiredReached():
            entry = base.desired_for(data.href)
            if (
                entry is not None
                and not entry.reached
                and entry.version == data.version
                and base.delta_for(data.href) == {}
            ):
                new = replace(
                    base, desired=_put_desired(base.desired, replace(entry, reached=True))
                )
            else:
                new = base
    if new.desired:
        new = _unreach(new)
    if new.position == position:
        return new  # a branch above set the position (and version, time) with its change
    return replace(new, position=position, version=base.version + 1, updated_at=t)


def fold_all(twin: Twin | None, events: Iterable[AnyEvent]) -> Twin | None:
    """Fold events in the order given."""
    for event in events:
        twin = fold(twin, event)
    return twin


@dataclass(frozen=True, slots=True)
class BatchFold:
    """What folding a batch produced.

    ``twins``: the twins the batch changed (to be written), by device id. ``applied``: per
    device, how many events advanced its twin. ``stale``: events at or below their twin's
    position (redeliveries, replays). ``unknown``: events of unknown types. ``ended``: per
    device, the commands the batch ended, in log order (the store remembers them by their
    correlation ids, see :class:`~twin.model.EndedCommand`).
    """

    twins: dict[str, Twin]
    applied: dict[str, int]
    stale: int
    unknown: int
    ended: dict[str, list[EndedCommand]] = field(default_factory=dict)

    @property
    def applied_total(self) -> int:
        return sum(self.applied.values())


def fold_batch(current: Mapping[str, Twin | None], events: Iterable[AnyEvent]) -> BatchFold:
    """Fold a batch of events of many devices onto their current twins.

    Events are applied in log-position order (a batch may hold redeliveries ahead of newer
    events). ``current`` maps device ids to their twins as stored; a device missing from it
    has no twin yet.
    """
    state: dict[str, Twin | None] = {}
    twins: dict[str, Twin] = {}
    applied: dict[str, int] = {}
    ended: dict[str, list[EndedCommand]] = {}
    stale = unknown = 0
    for event in sorted(events, key=_position):
        device = event.device_id
        before = state[device] if device in state else current.get(device)
        after = fold(before, event)
        state[device] = after
        if isinstance(event.data, UnknownData):
            unknown += 1
        elif after is before:
            stale += 1
        else:
            assert after is not None
            twins[device] = after
            applied[device] = applied.get(device, 0) + 1
            if (done := EndedCommand.between(before, after, event.correlation_id)) is not None:
                ended.setdefault(device, []).append(done)
    return BatchFold(twins=twins, applied=applied, stale=stale, unknown=unknown, ended=ended)


def _position(event: AnyEvent) -> int:
    if event.position is None:
        raise FoldError(f"event {event.id} has no log position: only logged events are folded")
    return event.position


def _registered(twin: Twin, owner: str, *, existed: bool) -> Twin:
    if existed and (twin.deleted or twin.owner != owner):
        # A fresh start: a device that signed up again (possibly for another owner) must not
        # show what it reported before. The connection is the device's, it stays.
        # Open commands stay: each carries its owner, and they must still end in the log
        # rather than vanish from the twin (the projector cancels those of a sign-off).
        return Twin(
            device_id=twin.device_id,
            owner=owner,
            position=twin.position,
            version=twin.version,
            created_at=twin.created_at,
            updated_at=twin.updated_at,
            connection=twin.connection,
            sync_state=twin.sync_state,
            pending=twin.pending,
        )
    return twin


def _provisioned(twin: Twin, owner: str, data: DeviceProvisioned, *, existed: bool) -> Twin:
    if existed and not twin.deleted:
        return twin  # the first provisioning wins; another owner's never takes the device over
    fresh = _registered(twin, owner, existed=existed)
    return replace(
        fresh, deleted=False, profile=data.profile, name=data.name, token_hash=data.token_hash
    )


def _reports(twin: Twin, owner: str) -> bool:
    """Whether a simple device's own event (token, telemetry, attributes) changes the twin."""
    return twin.simple and not twin.deleted and twin.owner == owner


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _ms(t: datetime) -> int:
    return (t - _EPOCH) // timedelta(milliseconds=1)


def _put_telemetry(
    held: tuple[Telemetry, ...], values: Mapping[str, Any], ts: int
) -> tuple[Telemetry, ...]:
    by_key = {v.key: v for v in held}
    for key, value in values.items():
        old = by_key.get(key)
        if old is None or ts >= old.ts:  # an older sample never replaces a newer value
            by_key[key] = Telemetry(key=key, value=value, ts=ts)
    return tuple(by_key[k] for k in sorted(by_key))


def _command_pending(
    twin: Twin, event: AnyEvent, data: CommandPending, position: int, t: datetime
) -> Twin:
    cid = event.correlation_id
    if not cid or twin.command(cid) is not None:
        return twin  # no id to follow it by, or an id that is still open: the first one wins
    command = TwinCommand(
        correlation_id=cid,
        owner=event.owner,
        op=data.op,
        href=data.href,
        issued_at=t,
        position=position,
        expires_at=None if data.expires_at is None else utc_ms(data.expires_at),
        max_attempts=data.max_attempts,
        content=data.content,
        content_b64=data.content_b64,
        content_format=data.content_format,
        interface=data.interface,
        issued_by=data.issued_by,
        reason=data.reason,
    )
    return replace(twin, pending=(*twin.pending, command))


def _command_sent(twin: Twin, cid: str | None, data: CommandSent, t: datetime) -> Twin:
    if not cid:
        return twin
    for i, c in enumerate(twin.pending):
        if c.correlation_id == cid:
            sent = replace(
                c,
                state="sent",
                attempts=max(c.attempts, data.attempt),
                gateway=data.gateway,
                connection_id=data.connection_id,
                sent_at=t,
            )
            return replace(twin, pending=(*twin.pending[:i], sent, *twin.pending[i + 1 :]))
    return twin


def _command_ended(
    twin: Twin,
    cid: str | None,
    data: CommandSucceeded | CommandFailed | CommandExpired | CommandCanceled,
    position: int,
    t: datetime,
) -> Twin:
    if not cid:
        return twin
    c = twin.command(cid)
    if c is None:
        return twin  # not open: ended already (a late answer, a second sweeper) or unknown
    status: str | None
    match data:
        case CommandSucceeded():
            state, status, reason, attempts = "succeeded", data.status, "", c.attempts
        case CommandFailed():
            state, status, reason = "failed", data.status, data.reason
            attempts = max(c.attempts, data.attempts)
        case CommandExpired():
            state, status, reason, attempts = "expired", None, "", max(c.attempts, data.attempts)
        case CommandCanceled():
            state, status, reason, attempts = "canceled", None, data.reason, c.attempts
    outcome = CommandOutcome(
        correlation_id=cid,
        op=c.op,
        href=c.href,
        state=state,
        at=t,
        position=position,
        attempts=attempts,
        status=status,
        reason=reason,
    )
    return replace(
        twin,
        pending=tuple(p for p in twin.pending if p.correlation_id != cid),
        recent_outcomes=(*twin.recent_outcomes, outcome)[-RECENT_OUTCOMES:],
    )


def _put_desired(
    desired: tuple[DesiredState, ...], entry: DesiredState
) -> tuple[DesiredState, ...]:
    i = bisect.bisect_left(desired, entry.href, key=lambda d: d.href)
    if i < len(desired) and desired[i].href == entry.href:
        return (*desired[:i], entry, *desired[i + 1 :])
    return (*desired[:i], entry, *desired[i:])


def _unreach(twin: Twin) -> Twin:
    """Entries marked reached whose delta is not empty any more are not reached."""
    changed = False
    out: list[DesiredState] = []
    for d in twin.desired:
        if d.reached and twin.delta_for(d.href):
            out.append(replace(d, reached=False))
            changed = True
        else:
            out.append(d)
    return replace(twin, desired=tuple(out)) if changed else twin


def _offline(conn: Connection, t: datetime) -> Connection:
    if not conn.online:
        return conn
    return dataclasses.replace(conn, online=False, since=t)


def _merge_links(
    current: tuple[ResourceLink, ...], published: Iterable[ResourceLink]
) -> tuple[ResourceLink, ...]:
    by_href = {link.href: link for link in current}
    for link in published:  # a later link of the same href replaces an earlier one
        by_href[link.href] = link
    return tuple(by_href[h] for h in sorted(by_href))


def _unpublish(twin: Twin, data: ResourceLinksUnpublished) -> Twin:
    if not data.hrefs and not data.instance_ids:
        gone = {link.href for link in twin.links} | {r.href for r in twin.resources}
    else:
        hrefs, ins = set(data.hrefs), set(data.instance_ids)
        gone = {link.href for link in twin.links if link.href in hrefs or link.ins in ins}
        gone |= hrefs  # a resource reported without a published link goes too
    return replace(
        twin,
        links=tuple(link for link in twin.links if link.href not in gone),
        resources=tuple(r for r in twin.resources if r.href not in gone),
    )


def _put_resource(
    resources: tuple[ResourceState, ...], resource: ResourceState
) -> tuple[ResourceState, ...]:
    i = bisect.bisect_left(resources, resource.href, key=lambda r: r.href)
    if i < len(resources) and resources[i].href == resource.href:
        return (*resources[:i], resource, *resources[i + 1 :])
    return (*resources[:i], resource, *resources[i:])

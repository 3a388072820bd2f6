"""Dead gateways detected, sans-IO: which gateway instances are lost, and which of their
devices go offline (the contract is :mod:`proto.leases`; the driver :mod:`twin.reaper`).

:class:`LeaseTable` follows the lease stream as the reaper polls it, with the reaper's own
clock: an instance whose ``held`` record has not changed for its lease is lost. Its clock
counts only time in which the reaper could see the stream: after a failed poll (NATS down,
the reaper's connection lost) every instance gets a full lease again, so an outage of NATS or
of the twin service never declares live gateways lost. An instance that stopped
(``released``) or whose gateway id started again (``superseded``) is lost at once. A lost
instance is *claimed* (:class:`Claim`: a ``reaping`` record conditional on the entry the
reaper saw, so one of several twin instances wins, and a renewal that came meanwhile wins
over the claim); a claim left ``reaping`` for ``takeover_after`` is claimed again (its reaper
died).

:func:`offline_event` decides, for one device the twin store shows online on a lost
instance, from the device's last ``device-online`` and ``device-offline`` in the log (the store
lags the log): ``device-offline`` (reason :data:`proto.leases.GATEWAY_LOST`) only if its
current connection is still the lost one, appended on the condition that no newer
``device-online`` came meanwhile. Its id is derived from the device and the connection, so
several reapers, retries and takeovers write it once.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Final, Protocol

from proto import subjects
from proto.events import AnyEvent, DeviceOffline, DeviceOnline, Event
from proto.leases import (
    GATEWAY_LOST,
    LeaseEntry,
    LeaseRecord,
    LeaseState,
    Writer,
    instance_of,
    instance_scope,
    latest_per_instance,
    lease_subject,
)

__all__ = [
    "Cause",
    "Claim",
    "HeldConnection",
    "HeldConnections",
    "LeaseTable",
    "OfflineDecision",
    "claim_record",
    "offline_event",
    "offline_scope",
]

_NAMESPACE: Final = uuid.UUID("5d0c3f1e-8a57-4c1b-9f3e-2b6a7d9e4c10")


class Cause(StrEnum):
    """Why an instance was declared lost."""

    LAPSED = "lapsed"  # no renewal for its lease
    RELEASED = "released"  # it stopped cleanly
    SUPERSEDED = "superseded"  # its gateway id started again
    TAKEOVER = "takeover"  # another reaper's claim stayed unfinished


@dataclass(frozen=True, slots=True)
class Claim:
    """Claim ``gateway``/``instance`` (write ``reaping`` expecting ``expected_last`` on its
    scope), then mark its devices offline."""

    gateway: str
    instance: str
    expected_last: int
    cause: Cause

    @property
    def key(self) -> tuple[str, str]:
        return self.gateway, self.instance


def claim_record(
    claim: Claim, state: LeaseState, by: str, at: datetime, devices: int = 0
) -> tuple[str, str, LeaseRecord]:
    """(subject, scope, record) of a claim's ``reaping`` or ``reaped`` write."""
    record = LeaseRecord(
        state=state,
        gateway=claim.gateway,
        instance=claim.instance,
        at=at,
        by=by,
        cause=claim.cause.value,
        devices=devices,
    )
    return (
        lease_subject(Writer.TWIN, claim.gateway, claim.instance),
        instance_scope(claim.gateway, claim.instance),
        record,
    )


@dataclass(slots=True)
class _Seen:
    position: int
    since: float  # reaper clock: when this position was first seen (or the clock restarted)
    entry: LeaseEntry


@dataclass(slots=True)
class LeaseTable:
    """The instances of the lease stream as one reaper sees them (see the module docstring).

    ``now`` is the reaper's monotonic clock in seconds.
    """

    takeover_after: float = 60.0
    _seen: dict[tuple[str, str], _Seen] = field(default_factory=dict)
    _busy: set[tuple[str, str]] = field(default_factory=set)
    _restart: bool = False

    def unavailable(self) -> None:
        """A poll failed: the instances' clocks restart at the next successful one."""
        self._restart = True

    def observe(self, entries: Iterable[LeaseEntry], now: float) -> list[Claim]:
        """One poll's entries (every lease message read; the newest per instance counts).
        Returns the claims to make now; each claim's key is busy until :meth:`done`."""
        latest = latest_per_instance(entries)
        restart, self._restart = self._restart, False
        for key in list(self._seen):
            if key not in latest:  # expired from the stream (its retention)
                del self._seen[key]
        claims: list[Claim] = []
        for key, entry in latest.items():
            seen = self._seen.get(key)
            if seen is None or seen.position != entry.position or restart:
                seen = _Seen(entry.position, now, entry)
                self._seen[key] = seen
            if key in self._busy:
                continue
            cause = self._cause(entry, now - seen.since)
            if cause is not None:
                self._busy.add(key)
                claims.append(Claim(entry.gateway, entry.instance, entry.position, cause))
        return claims

    def _cause(self, entry: LeaseEntry, unchanged_for: float) -> Cause | None:
        match entry.record.state:
            case LeaseState.HELD:
                return Cause.LAPSED if unchanged_for >= entry.record.lease else None
            case LeaseState.RELEASED:
                return Cause.RELEASED
            case LeaseState.SUPERSEDED:
                return Cause.SUPERSEDED
            case LeaseState.REAPING:
                return Cause.TAKEOVER if unchanged_for >= self.takeover_after else None
            case LeaseState.REAPED:
                return None

    def done(self, key: tuple[str, str]) -> None:
        """The claim of ``key`` ended (reaped, lost to another writer, or failed: it may be
        claimed again from the next poll on)."""
        self._busy.discard(key)

    def counts(self) -> dict[LeaseState, int]:
        """Instances per current state (what the metrics show)."""
        out = dict.fromkeys(LeaseState, 0)
        for seen in self._seen.values():
            out[seen.entry.record.state] += 1
        return out


# -- the devices of a lost instance -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HeldConnection:
    """A device the twin store shows online on a connection of some instance."""

    device_id: str
    owner: str
    connection_id: str


class HeldConnections(Protocol):
    """The twin store's view of who holds which device (adapters: :class:`StoreConnections`
    over any :class:`twin.ports.TwinStore`, :class:`twin.adapters.mongo_held.MongoHeldConnections`
    with an index)."""

    def held_by(self, gateway: str, instance: str) -> AsyncIterator[HeldConnection]:
        """The devices online on connections of ``instance`` of ``gateway``."""
        ...


def offline_scope(device_id: str) -> str:
    """The device's ``device-online`` events (any owner): the condition of a gateway-lost
    offline (no newer connection)."""
    return subjects.event_filter(device=device_id, kind=DeviceOnline.KIND)


@dataclass(frozen=True, slots=True)
class OfflineDecision:
    """Append ``event`` if the last position of :func:`offline_scope` is still
    ``expected_last``; or nothing (``event`` None), for ``reason``."""

    event: AnyEvent | None
    expected_last: int = 0
    reason: str = ""


def gateway_lost_id(device_id: str, connection_id: str) -> str:
    """The derived id of the gateway-lost offline of one connection."""
    return str(uuid.uuid5(_NAMESPACE, f"gateway-lost/{device_id}/{connection_id}"))


def offline_event(
    held: HeldConnection,
    gateway: str,
    instance: str,
    last_online: AnyEvent | None,
    last_offline: AnyEvent | None,
    now: datetime,
    source: str,
) -> OfflineDecision:
    """What to append for ``held``, a device the store shows online on lost ``instance``."""
    if instance_of(held.connection_id) != instance:
        return OfflineDecision(None, reason="not a connection of the lost instance")
    if last_online is None or last_online.position is None:
        return OfflineDecision(None, reason="no device-online in the log")
    online = last_online.data
    if not isinstance(online, DeviceOnline):
        return OfflineDecision(None, reason="not a device-online event")
    if online.connection_id != held.connection_id:
        return OfflineDecision(None, reason="reconnected")
    if (
        last_offline is not None
        and last_offline.position is not None
        and last_offline.position > last_online.position
    ):
        return OfflineDecision(None, reason="already offline")
    event: AnyEvent = Event(
        owner=last_online.owner,
        device_id=held.device_id,
        data=DeviceOffline(
            gateway=gateway,
            connection_id=held.connection_id,
            remote_address=online.remote_address,
            reason=GATEWAY_LOST,
        ),
        source=source,
        id=gateway_lost_id(held.device_id, held.connection_id),
        time=now,
    )
    return OfflineDecision(event, expected_last=last_online.position)

"""Online and offline for simple devices (sans-IO; time is an input).

A simple device has no connection to lose: it is online from its first accepted request
that this gateway instance does not know online, until ``timeout`` seconds (default 300) pass
without an accepted request, and while it observes (:meth:`Presence.hold`: its server-side
RPCs). Each such period is one "connection" of the device: the
``device-online`` and ``device-offline`` events carry its id (:func:`proto.leases.connection_id`
of the gateway's instance, like the OCF path), so the twin pairs them as it does for OCF devices.

The online event goes to the log with the request's own events (the adapter prefixes them);
:meth:`Presence.arrive` reserves the device so that concurrent requests do not announce it
twice, :meth:`Presence.confirm` settles the reservation once the log answered (a failed append
forgets it, so the next request announces the device again).
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

from proto.events import AnyEvent, DeviceOffline, DeviceOnline, Event
from proto.leases import connection_id

__all__ = ["PROTOCOL", "SECURE_PROTOCOL", "Presence", "PresenceConfig"]

PROTOCOL: Final = "coap+udp"
SECURE_PROTOCOL: Final = "coaps+udp"


@dataclass(frozen=True, slots=True)
class PresenceConfig:
    gateway_id: str
    timeout: float = 300.0
    """Seconds without an accepted request after which a device is offline."""
    instance: str | None = None
    """The gateway run holding the lease (connection ids carry it), if any."""

    def __post_init__(self) -> None:
        if not self.timeout > 0:
            raise ValueError("timeout must be > 0")

    @property
    def source(self) -> str:
        return f"/gateway/{self.gateway_id}"


@dataclass(slots=True)
class _Entry:
    connection_id: str
    remote: str
    last_seen: float
    confirmed: bool = False
    held: int = 0  # observations under way: online whatever the time since the last request


class Presence:
    """Which devices this gateway instance holds online (key: owner, device)."""

    def __init__(self, config: PresenceConfig) -> None:
        self.config = config
        self.instance = config.instance
        self._entries: dict[tuple[str, str], _Entry] = {}
        self._prefix = os.urandom(4).hex()
        self._ids = itertools.count(1)

    def __len__(self) -> int:
        return len(self._entries)

    def online(self, owner: str, device_id: str) -> bool:
        entry = self._entries.get((owner, device_id))
        return entry is not None and entry.confirmed

    def connection_of(self, owner: str, device_id: str) -> str | None:
        """The id of the device's current connection, if it is online here."""
        entry = self._entries.get((owner, device_id))
        return entry.connection_id if entry is not None and entry.confirmed else None

    def hold(self, owner: str, device_id: str) -> bool:
        """An observation of the device began (after :meth:`arrive`): it stays online until
        the matching :meth:`unhold`, then for the timeout. False when the device is not held
        here (its online event was not written): nothing to undo."""
        entry = self._entries.get((owner, device_id))
        if entry is None:
            return False
        entry.held += 1
        return True

    def unhold(self, owner: str, device_id: str, now: float) -> None:
        """An observation held by :meth:`hold` ended: the timeout counts from ``now``."""
        entry = self._entries.get((owner, device_id))
        if entry is not None and entry.held > 0:
            entry.held -= 1
            entry.last_seen = max(entry.last_seen, now)

    def _connection_id(self) -> str:
        local = f"udp-{self._prefix}-{next(self._ids)}"
        return local if self.instance is None else connection_id(self.instance, local)

    def arrive(
        self, owner: str, device_id: str, remote: str, now: float, *, secure: bool = False
    ) -> AnyEvent | None:
        """An accepted request of the device: the ``device-online`` event to append first when
        the device is not known online (then :meth:`confirm` it), else None."""
        key = (owner, device_id)
        entry = self._entries.get(key)
        if entry is not None:
            entry.last_seen = max(entry.last_seen, now)
            return None
        entry = _Entry(self._connection_id(), remote, now)
        self._entries[key] = entry
        return Event(
            owner=owner,
            device_id=device_id,
            data=DeviceOnline(
                gateway=self.config.gateway_id,
                connection_id=entry.connection_id,
                remote_address=remote,
                protocol=SECURE_PROTOCOL if secure else PROTOCOL,
            ),
            source=self.config.source,
            time=_at(now),
        )

    def confirm(self, event: AnyEvent, ok: bool) -> None:
        """The log wrote the online event from :meth:`arrive` (``ok``), or could not."""
        data = event.data
        assert isinstance(data, DeviceOnline)
        key = (event.owner, event.device_id)
        entry = self._entries.get(key)
        if entry is None or entry.connection_id != data.connection_id:
            return
        if ok:
            entry.confirmed = True
        else:
            del self._entries[key]

    def expire(self, now: float) -> list[AnyEvent]:
        """The ``device-offline`` events of devices silent for the timeout (forgotten here)."""
        out: list[AnyEvent] = []
        for key, entry in list(self._entries.items()):
            if entry.confirmed and not entry.held and now - entry.last_seen >= self.config.timeout:
                del self._entries[key]
                out.append(self._offline(key, entry, "inactive", now))
        return out

    def release(self, reason: str, now: float) -> list[AnyEvent]:
        """Every device offline (the gateway is stopping)."""
        out = [
            self._offline(key, entry, reason, now)
            for key, entry in self._entries.items()
            if entry.confirmed
        ]
        self._entries.clear()
        return out

    def adopt_instance(self, instance: str) -> None:
        """Serve as ``instance`` from now on: every device is forgotten (the twin service may
        have marked the old instance's devices offline) and comes online again with its next
        request, on a connection of the new instance."""
        self.instance = instance
        self._entries.clear()

    def _offline(self, key: tuple[str, str], entry: _Entry, reason: str, now: float) -> AnyEvent:
        return Event(
            owner=key[0],
            device_id=key[1],
            data=DeviceOffline(
                gateway=self.config.gateway_id,
                connection_id=entry.connection_id,
                remote_address=entry.remote,
                reason=reason,
            ),
            source=self.config.source,
            time=_at(now),
        )


def _at(now: float) -> datetime:
    return datetime.fromtimestamp(now, UTC)

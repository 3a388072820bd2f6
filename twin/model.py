"""The device twin: one frozen value per device, and its document form.

A :class:`Twin` is what :func:`twin.fold.fold` produces from a device's events. It is stored
as one document per device (:meth:`Twin.to_document`)::

    {
      "_id": "<device id>",
      "owner": "alice",
      "deleted": false,
      "connection": {"online": true, "since": <datetime>, "gateway": "gw-1",
                     "connection_id": "c-7", "remote_address": "10.0.0.5:40122",
                     "protocol": "coap+tcp"},
      "sync_state": "in_sync",                       # out_of_sync | syncing | in_sync
      "links": [{"href": "/light/1", "rt": ["oic.r.switch.binary"], "if": [...], ...}],
      "resource_types": ["oic.r.switch.binary", ...],  # union of the links' rt, for the index
      "resources": [{"href": "/light/1", "content": {...}, "content_format": 10000,
                     "raw": null, "status": "2.05", "etag": "ab01", "observe_seq": 12,
                     "updated_at": <datetime>, "position": 41}],
      "position": 41,                                # last applied log position
      "version": 17,                                 # number of events applied
      "created_at": <datetime>, "updated_at": <datetime>
    }

Resources are a list sorted by href, not a mapping keyed by href: hrefs contain dots, which
MongoDB field names may not. Links are sorted by href too, one per href. Times are UTC with
millisecond precision (what BSON keeps), so a twin survives a store round trip unchanged.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, get_args

import msgspec

from proto.events import ResourceLink, SyncState
from twin.errors import CorruptTwinError

__all__ = ["SYNC_STATES", "Connection", "ResourceState", "Twin", "utc_ms"]

SYNC_STATES: Final[tuple[str, ...]] = get_args(SyncState)


def utc_ms(t: datetime) -> datetime:
    """``t`` in UTC, truncated to milliseconds (naive times are taken as UTC)."""
    t = t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)
    return t.replace(microsecond=t.microsecond - t.microsecond % 1000)


@dataclass(frozen=True, slots=True)
class Connection:
    """The device's current (or last) connection to a gateway.

    ``since`` is when the device went online (``online``) or offline (not ``online``);
    ``None`` if it never connected.
    """

    online: bool = False
    since: datetime | None = None
    gateway: str = ""
    connection_id: str = ""
    remote_address: str = ""
    protocol: str = ""

    def to_document(self) -> dict[str, Any]:
        return {
            "online": self.online,
            "since": self.since,
            "gateway": self.gateway,
            "connection_id": self.connection_id,
            "remote_address": self.remote_address,
            "protocol": self.protocol,
        }

    @classmethod
    def from_document(cls, doc: Mapping[str, Any]) -> Connection:
        return cls(
            online=_bool(doc["online"]),
            since=_opt_time(doc.get("since")),
            gateway=_str(doc.get("gateway", "")),
            connection_id=_str(doc.get("connection_id", "")),
            remote_address=_str(doc.get("remote_address", "")),
            protocol=_str(doc.get("protocol", "")),
        )

    def to_json(self) -> dict[str, Any]:
        out = self.to_document()
        out["since"] = _iso(self.since)
        return out


@dataclass(frozen=True, slots=True)
class ResourceState:
    """The last content a resource reported, and where in the log it came from."""

    href: str
    content: Any
    updated_at: datetime
    position: int
    content_format: int | None = None
    raw: str | None = None  # base64 of the original bytes when ``content`` is lossy
    status: str = "2.05"
    etag: str | None = None
    observe_seq: int | None = None

    def to_document(self) -> dict[str, Any]:
        return {
            "href": self.href,
            "content": self.content,
            "content_format": self.content_format,
            "raw": self.raw,
            "status": self.status,
            "etag": self.etag,
            "observe_seq": self.observe_seq,
            "updated_at": self.updated_at,
            "position": self.position,
        }

    @classmethod
    def from_document(cls, doc: Mapping[str, Any]) -> ResourceState:
        return cls(
            href=_str(doc["href"]),
            content=doc.get("content"),
            content_format=_opt_int(doc.get("content_format")),
            raw=_opt_str(doc.get("raw")),
            status=_str(doc.get("status", "2.05")),
            etag=_opt_str(doc.get("etag")),
            observe_seq=_opt_int(doc.get("observe_seq")),
            updated_at=_time(doc["updated_at"]),
            position=_int(doc["position"]),
        )

    def to_json(self) -> dict[str, Any]:
        out = self.to_document()
        out["updated_at"] = _iso(self.updated_at)
        return out


@dataclass(frozen=True, slots=True)
class Twin:
    """One device's twin. ``links`` and ``resources`` are sorted by href, unique per href."""

    device_id: str
    owner: str
    position: int
    version: int
    created_at: datetime
    updated_at: datetime
    deleted: bool = False
    connection: Connection = field(default_factory=Connection)
    sync_state: SyncState = "out_of_sync"
    links: tuple[ResourceLink, ...] = ()
    resources: tuple[ResourceState, ...] = ()

    @property
    def online(self) -> bool:
        return self.connection.online

    @property
    def resource_types(self) -> tuple[str, ...]:
        """The union of the links' resource types, sorted."""
        return tuple(sorted({rt for link in self.links for rt in link.rt}))

    def resource(self, href: str) -> ResourceState | None:
        i = bisect.bisect_left(self.resources, href, key=lambda r: r.href)
        if i < len(self.resources) and self.resources[i].href == href:
            return self.resources[i]
        return None

    def link(self, href: str) -> ResourceLink | None:
        i = bisect.bisect_left(self.links, href, key=lambda link: link.href)
        if i < len(self.links) and self.links[i].href == href:
            return self.links[i]
        return None

    # -- document form ------------------------------------------------------------------

    def to_document(self) -> dict[str, Any]:
        """The stored form (BSON-ready apart from resource content, see the Mongo adapter)."""
        return {
            "_id": self.device_id,
            "owner": self.owner,
            "deleted": self.deleted,
            "connection": self.connection.to_document(),
            "sync_state": self.sync_state,
            "links": [_link_document(link) for link in self.links],
            "resource_types": list(self.resource_types),
            "resources": [r.to_document() for r in self.resources],
            "position": self.position,
            "version": self.version,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }

    @classmethod
    def from_document(cls, doc: Mapping[str, Any]) -> Twin:
        """Read a stored document back; :class:`CorruptTwinError` if it is not a twin."""
        try:
            sync_state = doc.get("sync_state", "out_of_sync")
            if sync_state not in SYNC_STATES:
                raise ValueError(f"bad sync_state {sync_state!r}")
            return cls(
                device_id=_str(doc["_id"]),
                owner=_str(doc["owner"]),
                deleted=_bool(doc.get("deleted", False)),
                connection=Connection.from_document(doc["connection"]),
                sync_state=sync_state,
                links=tuple(msgspec.convert(link, ResourceLink) for link in doc.get("links", ())),
                resources=tuple(ResourceState.from_document(r) for r in doc.get("resources", ())),
                position=_int(doc["position"]),
                version=_int(doc["version"]),
                created_at=_time(doc["created_at"]),
                updated_at=_time(doc["updated_at"]),
            )
        except (KeyError, TypeError, ValueError, msgspec.ValidationError) as e:
            raise CorruptTwinError(f"not a twin document (_id={doc.get('_id')!r}): {e}") from e

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready view for the CLI and APIs: ``online`` at top level, times in RFC 3339."""
        return {
            "device_id": self.device_id,
            "owner": self.owner,
            "online": self.online,
            "deleted": self.deleted,
            "sync_state": self.sync_state,
            "connection": self.connection.to_json(),
            "links": [_link_document(link) for link in self.links],
            "resource_types": list(self.resource_types),
            "resources": [r.to_json() for r in self.resources],
            "position": self.position,
            "version": self.version,
            "created_at": _iso(self.created_at),
            "updated_at": _iso(self.updated_at),
        }


def _link_document(link: ResourceLink) -> dict[str, Any]:
    """A link as its wire form (``"if"``, defaults omitted), with lists for tuples."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in msgspec.to_builtins(link).items()}


# -- strict readers for stored values -----------------------------------------------------


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise TypeError(f"expected a string, got {type(v).__name__}")
    return v


def _opt_str(v: Any) -> str | None:
    return None if v is None else _str(v)


def _int(v: Any) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        raise TypeError(f"expected an integer, got {type(v).__name__}")
    return v


def _opt_int(v: Any) -> int | None:
    return None if v is None else _int(v)


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise TypeError(f"expected a boolean, got {type(v).__name__}")
    return v


def _time(v: Any) -> datetime:
    if not isinstance(v, datetime):
        raise TypeError(f"expected a datetime, got {type(v).__name__}")
    return utc_ms(v)


def _opt_time(v: Any) -> datetime | None:
    return None if v is None else _time(v)


def _iso(t: datetime | None) -> str | None:
    if t is None:
        return None
    return t.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")

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
                     "connection_id": "c-7", "updated_at": <datetime>, "position": 41}],
      "pending": [{"correlation_id": "c-1", "owner": "alice", "op": "update",
                   "href": "/light/1", "state": "pending", "issued_at": <datetime>,
                   "position": 40, "expires_at": <datetime>, "attempts": 0, "max_attempts": 3,
                   "gateway": "", "connection_id": "", "sent_at": null, "content": {...},
                   "content_b64": null, "content_format": null, "interface": null,
                   "issued_by": "alice", "reason": ""}],       # issue order (log position)
      "pending_count": 1,                            # for the "has pending commands" index
      "next_expiry": <datetime>,                     # earliest deadline of a pending command
      "recent_outcomes": [{"correlation_id": "c-0", "op": "retrieve", "href": "/oic/d",
                           "state": "succeeded", "at": <datetime>, "position": 39,
                           "attempts": 1, "status": "2.05", "reason": ""}],  # newest last
      "desired": [{"href": "/light/1", "content": {"value": true}, "version": 2,
                   "set_at": <datetime>, "position": 38, "reached": false}],  # by href;
                                                     # content null: cleared (keeps version)
      "delta": [{"href": "/light/1", "content": {"value": true}}],  # computed, by href
      "profile": "thingsboard",                      # "": an OCF device; else a simple device's
      "name": "boiler",                              # a simple device's name (provisioning)
      "token_hash": "9f86d0…",                       # its current token's SHA-256 ("": revoked)
      "telemetry": [{"key": "temperature", "value": 25, "ts": 1700000000000}],  # latest, by key
      "client_attributes": [{"key": "fw", "value": "1.2"}],                       # by key
      "position": 41,                                # last applied log position
      "version": 17,                                 # number of events applied
      "created_at": <datetime>, "updated_at": <datetime>
    }

Commands are removed from ``pending`` when they end (succeeded / failed / expired / canceled)
and their outcome is kept in ``recent_outcomes`` (the last :data:`RECENT_OUTCOMES`). The store
also remembers each ended command by its correlation id for a while (:class:`EndedCommand`,
:data:`COMMAND_MEMORY`), so that a request repeating the id is answered with the original
acceptance and outcome (:mod:`twin.commands`). The
**delta** of a resource is the desired keys whose reported value differs (or is missing); it is
computed from ``desired`` and ``resources``, never stored on its own (the stored copy is for
readers of the collection).

Simple devices (ThingsBoard's device API, PRODUCT.md 4.2) have a ``profile``, a ``name`` and the
hash of their current access token (:mod:`proto.devtokens`; the token itself is never stored),
the latest value of each telemetry key with its timestamp (ms since the epoch: the sample's, or
the event's time) and their client attributes. Their shared attributes are desired state on
hrefs ``/shared/<key>``. ``telemetry`` and ``client_attributes`` are lists sorted by key for the
same reason as ``resources``; their values are JSON values (stored as JSON text when they are
not BSON-safe, like resource content, see the Mongo adapter).

Resources are a list sorted by href, not a mapping keyed by href: hrefs contain dots, which
MongoDB field names may not. Links are sorted by href too, one per href. Times are UTC with
millisecond precision (what BSON keeps), so a twin survives a store round trip unchanged.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Literal, get_args

import msgspec

from proto.codecs import json_equal
from proto.events import (
    COMMAND_OPS,
    FINAL_COMMAND_STATES,
    SHARED_PREFIX,
    CommandOp,
    ResourceLink,
    SyncState,
)
from twin.errors import CorruptTwinError

__all__ = [
    "COMMAND_MEMORY",
    "RECENT_OUTCOMES",
    "SENT_GRACE",
    "SIMPLE_PROFILE",
    "SYNC_STATES",
    "CommandOutcome",
    "Connection",
    "DesiredState",
    "EndedCommand",
    "ResourceState",
    "Telemetry",
    "Twin",
    "TwinCommand",
    "delta_of",
    "utc_ms",
]

SYNC_STATES: Final[tuple[str, ...]] = get_args(SyncState)
RECENT_OUTCOMES: Final = 20
SENT_GRACE: Final = timedelta(seconds=30)
"""How long past its deadline a command already *sent* may still get the device's answer before
the sweeper expires it (longer than the gateway's request timeout)."""

COMMAND_MEMORY: Final = timedelta(hours=24)
"""How long after a command ended the store remembers it by its correlation id, by default (the
store's ``command_memory``, ``twin.command_memory`` in the configuration). Within it a request
repeating the id on the same device gets the original acceptance and outcome (or ``conflict``
when it asks for something else); after it the id is free again and names a new command."""

OpenState = Literal["pending", "sent"]

SIMPLE_PROFILE: Final = "thingsboard"
"""The profile of simple devices (ThingsBoard's device API)."""


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
    connection_id: str = ""  # the connection it was reported on ("": not known)

    def to_document(self) -> dict[str, Any]:
        return {
            "href": self.href,
            "content": self.content,
            "content_format": self.content_format,
            "raw": self.raw,
            "status": self.status,
            "etag": self.etag,
            "observe_seq": self.observe_seq,
            "connection_id": self.connection_id,
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
            connection_id=_str(doc.get("connection_id", "")),
            updated_at=_time(doc["updated_at"]),
            position=_int(doc["position"]),
        )

    def to_json(self) -> dict[str, Any]:
        out = self.to_document()
        out["updated_at"] = _iso(self.updated_at)
        return out


@dataclass(frozen=True, slots=True)
class Telemetry:
    """The latest value of one telemetry key, with its sample's time (ms since the epoch)."""

    key: str
    value: Any
    ts: int

    def to_document(self) -> dict[str, Any]:
        return {"key": self.key, "value": self.value, "ts": self.ts}

    @classmethod
    def from_document(cls, doc: Mapping[str, Any]) -> Telemetry:
        return cls(key=_str(doc["key"]), value=doc.get("value"), ts=_int(doc["ts"]))


@dataclass(frozen=True, slots=True)
class TwinCommand:
    """A command that has not ended yet: ``pending`` (waiting for the device) or ``sent``.

    ``owner`` is the owner the command was issued for (its events' subject token); ``position``
    is where its ``command-pending`` event is in the log (the issue order).
    """

    correlation_id: str
    owner: str
    op: CommandOp
    href: str
    issued_at: datetime
    position: int
    state: OpenState = "pending"
    expires_at: datetime | None = None
    attempts: int = 0
    max_attempts: int = 3
    gateway: str = ""
    connection_id: str = ""
    sent_at: datetime | None = None
    content: Any = None
    content_b64: str | None = None
    content_format: int | None = None
    interface: str | None = None
    issued_by: str = ""
    reason: str = ""

    @property
    def deadline(self) -> datetime | None:
        """When the sweeper may expire it: ``expires_at``, plus :data:`SENT_GRACE` once sent."""
        if self.expires_at is None:
            return None
        return self.expires_at + SENT_GRACE if self.state == "sent" else self.expires_at

    def to_document(self) -> dict[str, Any]:
        return {
            "correlation_id": self.correlation_id,
            "owner": self.owner,
            "op": self.op,
            "href": self.href,
            "state": self.state,
            "issued_at": self.issued_at,
            "position": self.position,
            "expires_at": self.expires_at,
            "attempts": self.attempts,
            "max_attempts": self.max_attempts,
            "gateway": self.gateway,
            "connection_id": self.connection_id,
            "sent_at": self.sent_at,
            "content": self.content,
            "content_b64": self.content_b64,
            "content_format": self.content_format,
            "interface": self.interface,
            "issued_by": self.issued_by,
            "reason": self.reason,
        }

    @classmethod
    def from_document(cls, doc: Mapping[str, Any]) -> TwinCommand:
        op = doc["op"]
        if op not in COMMAND_OPS:
            raise ValueError(f"bad command op {op!r}")
        state = doc.get("state", "pending")
        if state not in ("pending", "sent"):
            raise ValueError(f"bad open command state {state!r}")
        return cls(
            correlation_id=_str(doc["correlation_id"]),
            owner=_str(doc["owner"]),
            op=op,
            href=_str(doc["href"]),
            state=state,
            issued_at=_time(doc["issued_at"]),
            position=_int(doc["position"]),
            expires_at=_opt_time(doc.get("expires_at")),
            attempts=_int(doc.get("attempts", 0)),
            max_attempts=_int(doc.get("max_attempts", 3)),
            gateway=_str(doc.get("gateway", "")),
            connection_id=_str(doc.get("connection_id", "")),
            sent_at=_opt_time(doc.get("sent_at")),
            content=doc.get("content"),
            content_b64=_opt_str(doc.get("content_b64")),
            content_format=_opt_int(doc.get("content_format")),
            interface=_opt_str(doc.get("interface")),
            issued_by=_str(doc.get("issued_by", "")),
            reason=_str(doc.get("reason", "")),
        )

    def to_json(self) -> dict[str, Any]:
        out = self.to_document()
        for key in ("issued_at", "expires_at", "sent_at"):
            out[key] = _iso(out[key])
        return out


@dataclass(frozen=True, slots=True)
class CommandOutcome:
    """How a command ended (kept in the twin's bounded ``recent_outcomes``)."""

    correlation_id: str
    op: CommandOp
    href: str
    state: str  # succeeded | failed | expired | canceled
    at: datetime
    position: int
    attempts: int = 0
    status: str | None = None  # the device's CoAP code, when it answered
    reason: str = ""

    def to_document(self) -> dict[str, Any]:
        return {
            "correlation_id": self.correlation_id,
            "op": self.op,
            "href": self.href,
            "state": self.state,
            "at": self.at,
            "position": self.position,
            "attempts": self.attempts,
            "status": self.status,
            "reason": self.reason,
        }

    @classmethod
    def from_document(cls, doc: Mapping[str, Any]) -> CommandOutcome:
        op, state = doc["op"], doc["state"]
        if op not in COMMAND_OPS or state not in FINAL_COMMAND_STATES:
            raise ValueError(f"bad command outcome {op!r} / {state!r}")
        return cls(
            correlation_id=_str(doc["correlation_id"]),
            op=op,
            href=_str(doc["href"]),
            state=_str(state),
            at=_time(doc["at"]),
            position=_int(doc["position"]),
            attempts=_int(doc.get("attempts", 0)),
            status=_opt_str(doc.get("status")),
            reason=_str(doc.get("reason", "")),
        )

    def to_json(self) -> dict[str, Any]:
        out = self.to_document()
        out["at"] = _iso(self.at)
        return out


@dataclass(frozen=True, slots=True)
class EndedCommand:
    """A command that ended, as the store remembers it until ``forget_at`` (see
    :data:`COMMAND_MEMORY`): the command as it was last open, and how it ended. ``forget_at``
    is ``None`` until it is stored (the store sets it: the end plus its ``command_memory``)."""

    command: TwinCommand
    outcome: CommandOutcome
    forget_at: datetime | None = None

    @classmethod
    def between(
        cls, before: Twin | None, after: Twin | None, cid: str | None
    ) -> EndedCommand | None:
        """The command ``cid`` that was open in ``before`` and ended in ``after``, one fold
        step later (by the event of that correlation id), else ``None``."""
        if before is None or after is None or not cid or after is before:
            return None
        command = before.command(cid)
        if command is None:
            return None
        now = after.command(cid)
        if now is not None and now.position == command.position:
            return None  # still open
        outcome = after.recent_outcomes[-1] if after.recent_outcomes else None
        if outcome is None or outcome.correlation_id != cid:
            return None
        return cls(command, outcome)

    def forgotten(self, now: datetime) -> bool:
        return self.forget_at is not None and now >= self.forget_at

    def to_document(self) -> dict[str, Any]:
        return {
            "command": self.command.to_document(),
            "outcome": self.outcome.to_document(),
            "forget_at": self.forget_at,
        }

    @classmethod
    def from_document(cls, doc: Mapping[str, Any]) -> EndedCommand:
        """Read a stored record back; :class:`CorruptTwinError` if it is not one."""
        try:
            return cls(
                command=TwinCommand.from_document(doc["command"]),
                outcome=CommandOutcome.from_document(doc["outcome"]),
                forget_at=_opt_time(doc.get("forget_at")),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise CorruptTwinError(f"not an ended command (_id={doc.get('_id')!r}): {e}") from e


@dataclass(frozen=True, slots=True)
class DesiredState:
    """The desired content of one resource. ``content`` ``None``: cleared (the version stays,
    so the next set continues from it). ``reached``: a ``desired-reached`` event for this
    version was folded and the reported content still matches. On a simple device's shared
    attribute (``/shared/<key>``) ``content`` is the attribute's value, any JSON value: it has
    no delta (a shared attribute is read by the device, never reported back)."""

    href: str
    content: Any
    version: int
    set_at: datetime
    position: int
    reached: bool = False

    @property
    def cleared(self) -> bool:
        return self.content is None

    def to_document(self) -> dict[str, Any]:
        return {
            "href": self.href,
            "content": self.content,
            "version": self.version,
            "set_at": self.set_at,
            "position": self.position,
            "reached": self.reached,
        }

    @classmethod
    def from_document(cls, doc: Mapping[str, Any]) -> DesiredState:
        content = doc.get("content")
        shared = _str(doc["href"]).startswith(SHARED_PREFIX)
        if content is not None and not isinstance(content, dict) and not shared:
            raise TypeError("desired content must be an object")
        return cls(
            href=_str(doc["href"]),
            content=content,
            version=_int(doc["version"]),
            set_at=_time(doc["set_at"]),
            position=_int(doc["position"]),
            reached=_bool(doc.get("reached", False)),
        )

    def to_json(self) -> dict[str, Any]:
        out = self.to_document()
        out["set_at"] = _iso(self.set_at)
        return out


def delta_of(desired: Mapping[str, Any], reported: Any) -> dict[str, Any]:
    """The desired keys whose reported value differs or is missing, with their desired value."""
    if not isinstance(reported, dict):
        return dict(desired)
    return {k: v for k, v in desired.items() if k not in reported or not json_equal(v, reported[k])}


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
    pending: tuple[TwinCommand, ...] = ()  # by position (issue order)
    recent_outcomes: tuple[CommandOutcome, ...] = ()  # newest last
    desired: tuple[DesiredState, ...] = ()  # by href
    profile: str = ""  # "": an OCF device; SIMPLE_PROFILE: a simple device
    name: str = ""
    token_hash: str = ""  # the current access token's SHA-256 (hex); "": none (revoked)
    telemetry: tuple[Telemetry, ...] = ()  # by key
    client_attributes: tuple[tuple[str, Any], ...] = ()  # (key, value), by key

    @property
    def simple(self) -> bool:
        """A simple device (provisioned with an access token), not an OCF one."""
        return bool(self.profile)

    def telemetry_for(self, key: str) -> Telemetry | None:
        i = bisect.bisect_left(self.telemetry, key, key=lambda v: v.key)
        if i < len(self.telemetry) and self.telemetry[i].key == key:
            return self.telemetry[i]
        return None

    @property
    def online(self) -> bool:
        return self.connection.online

    def command(self, correlation_id: str) -> TwinCommand | None:
        """The pending (or sent) command with this correlation id."""
        for c in self.pending:
            if c.correlation_id == correlation_id:
                return c
        return None

    def desired_for(self, href: str) -> DesiredState | None:
        i = bisect.bisect_left(self.desired, href, key=lambda d: d.href)
        if i < len(self.desired) and self.desired[i].href == href:
            return self.desired[i]
        return None

    def delta(self) -> dict[str, dict[str, Any]]:
        """Per href with desired content, the keys still to reach (empty ones left out)."""
        out: dict[str, dict[str, Any]] = {}
        for d in self.desired:
            if not isinstance(d.content, dict):
                continue  # cleared, or a shared attribute's value
            r = self.resource(d.href)
            diff = delta_of(d.content, None if r is None else r.content)
            if diff:
                out[d.href] = diff
        return out

    def delta_for(self, href: str) -> dict[str, Any] | None:
        """The delta of one resource (``{}`` when reached), ``None`` without desired content."""
        d = self.desired_for(href)
        if d is None or not isinstance(d.content, dict):
            return None
        r = self.resource(href)
        return delta_of(d.content, None if r is None else r.content)

    @property
    def next_expiry(self) -> datetime | None:
        """The earliest :attr:`TwinCommand.deadline` of the open commands."""
        deadlines = [d for c in self.pending if (d := c.deadline) is not None]
        return min(deadlines) if deadlines else None

    def expired(self, now: datetime) -> tuple[TwinCommand, ...]:
        """Open commands whose deadline passed at ``now``."""
        return tuple(c for c in self.pending if (d := c.deadline) is not None and d <= now)

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
            "pending": [c.to_document() for c in self.pending],
            "pending_count": len(self.pending),
            "next_expiry": self.next_expiry,
            "recent_outcomes": [o.to_document() for o in self.recent_outcomes],
            "desired": [d.to_document() for d in self.desired],
            "delta": [{"href": h, "content": c} for h, c in self.delta().items()],
            "profile": self.profile,
            "name": self.name,
            "token_hash": self.token_hash,
            "telemetry": [v.to_document() for v in self.telemetry],
            "client_attributes": [{"key": k, "value": v} for k, v in self.client_attributes],
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
                pending=tuple(TwinCommand.from_document(c) for c in doc.get("pending", ())),
                recent_outcomes=tuple(
                    CommandOutcome.from_document(o) for o in doc.get("recent_outcomes", ())
                ),
                desired=tuple(DesiredState.from_document(d) for d in doc.get("desired", ())),
                profile=_str(doc.get("profile", "")),
                name=_str(doc.get("name", "")),
                token_hash=_str(doc.get("token_hash", "")),
                telemetry=tuple(Telemetry.from_document(v) for v in doc.get("telemetry", ())),
                client_attributes=tuple(
                    (_str(a["key"]), a.get("value")) for a in doc.get("client_attributes", ())
                ),
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
            "pending": [c.to_json() for c in self.pending],
            "recent_outcomes": [o.to_json() for o in self.recent_outcomes],
            "desired": [d.to_json() for d in self.desired],
            "delta": [{"href": h, "content": c} for h, c in self.delta().items()],
            "profile": self.profile,
            "name": self.name,
            "token_id": self.token_hash[:12],  # proto.devtokens.token_id of the current token
            "telemetry": {v.key: {"value": v.value, "ts": v.ts} for v in self.telemetry},
            "client_attributes": dict(self.client_attributes),
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

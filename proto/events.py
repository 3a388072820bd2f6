"""The v1 event types of twinhub's event log.

Each event is a :class:`Event` envelope (CloudEvent attributes: id, source, time,
owner, device, correlation id, log position) around one typed, frozen payload
(its ``data``). Payload classes are ``msgspec.Struct`` types, one per event type;
``EventData`` is their tagged union — the tag is the CloudEvent ``type``
(``TYPE``), which travels in the envelope, not in the payload. ``KIND`` is the
event's token in the NATS subject (see :mod:`proto.subjects`).

An event type the reader does not know decodes to :class:`UnknownData` and keeps
its raw body, so old readers tolerate new writers.

Versioning: a type string ends in ``.v1``. A breaking change adds a ``.v2`` type
next to it; readers upcast older versions on decode.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, ClassVar, Final, Generic, Literal, TypeVar

import msgspec

TYPE_PREFIX: Final = "io.twinhub."

SyncState = Literal["out_of_sync", "syncing", "in_sync"]


class _Data(
    msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, forbid_unknown_fields=False
):
    TYPE: ClassVar[str]
    KIND: ClassVar[str]
    RESOURCE_FIELD: ClassVar[str | None] = None

    def resource(self) -> str | None:
        """The href this event is about (its subject's last token), if any."""
        return None


class ResourceLink(
    msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, forbid_unknown_fields=False
):
    """One published OCF resource link (``/oic/rd`` / ``/oic/res`` entry)."""

    href: str
    rt: tuple[str, ...] = ()
    # "if" is a Python keyword: the attribute is ``interfaces``, the wire name "if".
    interfaces: tuple[str, ...] = msgspec.field(default=(), name="if")
    ins: int | None = None
    observable: bool = False
    discoverable: bool = True
    anchor: str | None = None
    title: str | None = None
    type: tuple[str, ...] = ()  # media types the resource serves


class DeviceRegistered(_Data, frozen=True, kw_only=True):
    """A device signed up: it now belongs to ``owner``."""

    TYPE: ClassVar[str] = "io.twinhub.device.registered.v1"
    KIND: ClassVar[str] = "device-registered"
    auth_provider: str = ""
    gateway: str = ""


class DeviceUnregistered(_Data, frozen=True, kw_only=True):
    """A device signed off (or was removed): its twin is marked deleted."""

    TYPE: ClassVar[str] = "io.twinhub.device.unregistered.v1"
    KIND: ClassVar[str] = "device-unregistered"
    reason: str = ""


class DeviceOnline(_Data, frozen=True, kw_only=True):
    """A device signed in on a connection held by one gateway instance."""

    TYPE: ClassVar[str] = "io.twinhub.device.online.v1"
    KIND: ClassVar[str] = "device-online"
    gateway: str
    connection_id: str
    remote_address: str
    protocol: str = "coap+tcp"


class DeviceOffline(_Data, frozen=True, kw_only=True):
    """A device's session ended (disconnect, sign-out, expiry, replacement)."""

    TYPE: ClassVar[str] = "io.twinhub.device.offline.v1"
    KIND: ClassVar[str] = "device-offline"
    gateway: str
    connection_id: str
    remote_address: str = ""
    reason: str = ""


class TwinSyncStateChanged(_Data, frozen=True, kw_only=True):
    """The twin's synchronisation state for the device's current connection."""

    TYPE: ClassVar[str] = "io.twinhub.twin.sync-state-changed.v1"
    KIND: ClassVar[str] = "twin-sync-state"
    state: SyncState
    connection_id: str = ""


class ResourceLinksPublished(_Data, frozen=True, kw_only=True):
    """The device published (or re-published) resource links."""

    TYPE: ClassVar[str] = "io.twinhub.resource.links-published.v1"
    KIND: ClassVar[str] = "links-published"
    links: tuple[ResourceLink, ...]
    ttl: int | None = None


class ResourceLinksUnpublished(_Data, frozen=True, kw_only=True):
    """The device withdrew links, by href or by instance ID (empty both: all)."""

    TYPE: ClassVar[str] = "io.twinhub.resource.links-unpublished.v1"
    KIND: ClassVar[str] = "links-unpublished"
    hrefs: tuple[str, ...] = ()
    instance_ids: tuple[int, ...] = ()


class ResourceChanged(_Data, frozen=True, kw_only=True):
    """A resource reported its content (notification or one-shot GET).

    ``content`` is the payload decoded to JSON; ``raw`` (base64) keeps the original
    bytes when that mapping was lossy (see :func:`proto.codecs.to_json_value`).
    """

    TYPE: ClassVar[str] = "io.twinhub.resource.changed.v1"
    KIND: ClassVar[str] = "resource-changed"
    href: str
    content: Any = None
    content_format: int | None = None
    raw: str | None = None
    status: str = "2.05"
    etag: str | None = None
    observe_seq: int | None = None
    connection_id: str = ""

    def resource(self) -> str | None:
        return self.href


# --------------------------------------------------------------------------- commands
#
# A command's events all carry its correlation id in the envelope
# (``Event.correlation_id``, CloudEvent extension ``correlationid``) and its href, so
# they share the resource's subject token and a subscriber can follow one resource.

CommandOp = Literal["update", "retrieve", "create", "delete", "rpc"]
COMMAND_OPS: Final = ("update", "retrieve", "create", "delete", "rpc")
RPC_HREF: Final = "/rpc"
"""The href of a server-side RPC to a simple device (op ``rpc``): its ``command-pending``
carries ``content`` ``{"method": m, "params": p}``, its ``command-succeeded`` the device's
result as ``content``."""
SHARED_PREFIX: Final = "/shared/"
"""A simple device's shared attributes are its desired state on hrefs ``/shared/<key>``, each
``desired-set``'s ``content`` the attribute's value (any JSON value but null)."""
CommandState = Literal["pending", "sent", "succeeded", "failed", "expired", "canceled"]
FINAL_COMMAND_STATES: Final = frozenset({"succeeded", "failed", "expired", "canceled"})


class _CommandData(_Data, frozen=True, kw_only=True):
    href: str

    def resource(self) -> str | None:
        return self.href


class CommandPending(_CommandData, frozen=True, kw_only=True):
    """A client asked for a command; it waits for the device (recorded before the reply)."""

    TYPE: ClassVar[str] = "io.twinhub.command.pending.v1"
    KIND: ClassVar[str] = "command-pending"
    op: CommandOp
    content: Any = None  # JSON value to send (update / create; rpc: {"method", "params"})
    content_b64: str | None = None  # or raw bytes in ``content_format`` (base64)
    content_format: int | None = None  # of content_b64; JSON content is sent as OCF CBOR
    interface: str | None = None  # OCF interface query (``if=``)
    expires_at: datetime | None = None  # the time to live, as a deadline (UTC)
    max_attempts: int = 3
    issued_by: str = ""  # the caller (token subject)
    reason: str = ""  # e.g. "desired" for updates issued for desired state


class CommandSent(_CommandData, frozen=True, kw_only=True):
    """The gateway wrote the CoAP request to the device (attempt 1, 2, …)."""

    TYPE: ClassVar[str] = "io.twinhub.command.sent.v1"
    KIND: ClassVar[str] = "command-sent"
    gateway: str
    connection_id: str
    attempt: int = 1


class CommandSucceeded(_CommandData, frozen=True, kw_only=True):
    """The device answered with a success code; ``content`` is its answer decoded to JSON."""

    TYPE: ClassVar[str] = "io.twinhub.command.succeeded.v1"
    KIND: ClassVar[str] = "command-succeeded"
    status: str
    content: Any = None
    content_format: int | None = None
    raw: str | None = None


class CommandFailed(_CommandData, frozen=True, kw_only=True):
    """The device answered with an error, or did not answer within the attempts allowed."""

    TYPE: ClassVar[str] = "io.twinhub.command.failed.v1"
    KIND: ClassVar[str] = "command-failed"
    status: str | None = None  # the device's CoAP code, None when it never answered
    content: Any = None
    content_format: int | None = None
    reason: str = ""
    attempts: int = 0


class CommandExpired(_CommandData, frozen=True, kw_only=True):
    """The time to live passed before the command completed; it will not be sent again."""

    TYPE: ClassVar[str] = "io.twinhub.command.expired.v1"
    KIND: ClassVar[str] = "command-expired"
    attempts: int = 0


class CommandCanceled(_CommandData, frozen=True, kw_only=True):
    """A client canceled the command (or newer desired state superseded it)."""

    TYPE: ClassVar[str] = "io.twinhub.command.canceled.v1"
    KIND: ClassVar[str] = "command-canceled"
    reason: str = ""


class DesiredSet(_Data, frozen=True, kw_only=True):
    """A client set the desired content of a resource (``version`` grows per resource).

    ``content`` is a JSON object, except on a simple device's shared attributes (hrefs
    ``/shared/<key>``): there it is the attribute's value, any JSON value but null."""

    TYPE: ClassVar[str] = "io.twinhub.desired.set.v1"
    KIND: ClassVar[str] = "desired-set"
    href: str
    content: Any
    version: int

    def resource(self) -> str | None:
        return self.href


class DesiredCleared(_Data, frozen=True, kw_only=True):
    """A client cleared the desired content of a resource."""

    TYPE: ClassVar[str] = "io.twinhub.desired.cleared.v1"
    KIND: ClassVar[str] = "desired-cleared"
    href: str
    version: int

    def resource(self) -> str | None:
        return self.href


class DesiredReached(_Data, frozen=True, kw_only=True):
    """The reported content of a resource matches its desired content: the delta is empty."""

    TYPE: ClassVar[str] = "io.twinhub.desired.reached.v1"
    KIND: ClassVar[str] = "desired-reached"
    href: str
    version: int

    def resource(self) -> str | None:
        return self.href


class DeviceProvisioned(_Data, frozen=True, kw_only=True):
    """A simple device (ThingsBoard's device API, PRODUCT.md 4.2) was created for ``owner``,
    with an access token. ``token_hash`` is the SHA-256 of the token (hex,
    :func:`proto.devtokens.token_hash`; not a secret: the token is 192 random bits and the
    hash only finds its registry record); ``provisioned_by`` is the caller (a token subject, or
    ``provision-key:<profile>`` for self-provisioning)."""

    TYPE: ClassVar[str] = "io.twinhub.device.provisioned.v1"
    KIND: ClassVar[str] = "device-provisioned"
    profile: str = "thingsboard"
    name: str = ""
    token_hash: str
    provisioned_by: str = ""


class DeviceTokenChanged(_Data, frozen=True, kw_only=True):
    """A simple device's access token was rotated (``token_hash``: the new one's) or revoked
    (``token_hash`` empty: the device has none until the next rotation)."""

    TYPE: ClassVar[str] = "io.twinhub.device.token-changed.v1"
    KIND: ClassVar[str] = "device-token-changed"
    token_hash: str = ""
    previous_token_hash: str = ""
    reason: Literal["rotated", "revoked"]
    changed_by: str = ""


class TelemetryReported(_Data, frozen=True, kw_only=True):
    """One telemetry sample of a simple device (``POST /api/v1/{token}/telemetry``): the
    device's timestamp ``ts`` (ms since the epoch; absent: the gateway's receive time is the
    event's ``time``) and its ``values`` (key -> JSON value). The twin keeps each key's latest
    value; every sample stays in the log."""

    TYPE: ClassVar[str] = "io.twinhub.telemetry.reported.v1"
    KIND: ClassVar[str] = "telemetry-reported"
    ts: int | None = None
    values: dict[str, Any]


class AttributesReported(_Data, frozen=True, kw_only=True):
    """Client-side attributes a simple device set (``POST /api/v1/{token}/attributes``):
    key -> JSON value, merged into the twin's client attributes."""

    TYPE: ClassVar[str] = "io.twinhub.attributes.reported.v1"
    KIND: ClassVar[str] = "attributes-reported"
    values: dict[str, Any]


class RpcRequested(_Data, frozen=True, kw_only=True):
    """A simple device made a client-side RPC (``POST /api/v1/{token}/rpc``, ThingsBoard's
    device API): ``method`` with ``params``; the gateway waits ``timeout_ms`` for an
    application's answer (``rpc-answered``, API op ``answer-rpc``), then the device gets 5.04.
    ``request_id`` (a random UUID the gateway chose, also the event id) is the subject's
    resource token, so that the answer to one request is one subject."""

    TYPE: ClassVar[str] = "io.twinhub.rpc.requested.v1"
    KIND: ClassVar[str] = "rpc-requested"
    request_id: str
    method: str
    params: Any = None
    timeout_ms: int

    def resource(self) -> str | None:
        return self.request_id


class RpcAnswered(_Data, frozen=True, kw_only=True):
    """An application answered a simple device's client-side RPC ``request_id`` with
    ``result`` (any JSON value): the gateway gives it to the device as the CoAP response. One
    per request: the first answer wins (a second one is refused)."""

    TYPE: ClassVar[str] = "io.twinhub.rpc.answered.v1"
    KIND: ClassVar[str] = "rpc-answered"
    request_id: str
    result: Any = None

    def resource(self) -> str | None:
        return self.request_id


SIMPLE_DEVICE_EVENTS: Final = (
    DeviceProvisioned,
    DeviceTokenChanged,
    TelemetryReported,
    AttributesReported,
    RpcRequested,
    RpcAnswered,
)


COMMAND_EVENTS: Final = (
    CommandPending,
    CommandSent,
    CommandSucceeded,
    CommandFailed,
    CommandExpired,
    CommandCanceled,
)


EventData = (
    DeviceRegistered
    | DeviceUnregistered
    | DeviceOnline
    | DeviceOffline
    | TwinSyncStateChanged
    | ResourceLinksPublished
    | ResourceLinksUnpublished
    | ResourceChanged
    | CommandPending
    | CommandSent
    | CommandSucceeded
    | CommandFailed
    | CommandExpired
    | CommandCanceled
    | DesiredSet
    | DesiredCleared
    | DesiredReached
    | DeviceProvisioned
    | DeviceTokenChanged
    | TelemetryReported
    | AttributesReported
    | RpcRequested
    | RpcAnswered
)

EVENT_TYPES: Final[dict[str, type[EventData]]] = {
    cls.TYPE: cls
    for cls in (
        DeviceRegistered,
        DeviceUnregistered,
        DeviceOnline,
        DeviceOffline,
        TwinSyncStateChanged,
        ResourceLinksPublished,
        ResourceLinksUnpublished,
        ResourceChanged,
        *COMMAND_EVENTS,
        DesiredSet,
        DesiredCleared,
        DesiredReached,
        *SIMPLE_DEVICE_EVENTS,
    )
}
KINDS: Final[dict[str, type[EventData]]] = {cls.KIND: cls for cls in EVENT_TYPES.values()}


@dataclass(frozen=True, slots=True)
class UnknownData:
    """The payload of an event type this reader does not know, kept as it came."""

    type: str
    kind: str
    raw: bytes
    content_type: str | None = None
    resource_href: str | None = None

    def resource(self) -> str | None:
        return self.resource_href

    @property
    def TYPE(self) -> str:
        return self.type

    @property
    def KIND(self) -> str:
        return self.kind


D = TypeVar("D", bound="EventData | UnknownData", covariant=True)


_VARIANT: Final = "89ab" * 4  # a random hex digit -> an RFC 4122 variant digit (10xx)


def new_event_id() -> str:
    """A random (version 4) UUID, as text: ``str(uuid.uuid4())`` without the UUID object,
    2.7 -> 1.1 µs, once per event."""
    h = os.urandom(16).hex()
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT[int(h[16], 16)]}{h[17:20]}-{h[20:]}"


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class Event(Generic[D]):
    """A CloudEvent of twinhub: envelope attributes around a typed payload.

    ``position`` is the event's log position (JetStream stream sequence); it is
    ``None`` until the log acknowledged the event.
    """

    owner: str
    device_id: str
    data: D
    source: str
    id: str = field(default_factory=new_event_id)
    time: datetime = field(default_factory=utcnow)
    correlation_id: str | None = None
    position: int | None = None

    @property
    def type(self) -> str:
        return self.data.TYPE

    @property
    def kind(self) -> str:
        return self.data.KIND

    def at(self, position: int) -> Event[D]:
        """This event as recorded at a log position."""
        return replace(self, position=position)


AnyEvent = Event["EventData | UnknownData"]


def event_type_of(data: EventData | UnknownData) -> str:
    return data.TYPE


def data_schema(cls: type[EventData]) -> dict[str, Any]:
    """The JSON Schema of one payload type (what ``proto/schemas`` holds)."""
    schema = msgspec.json.schema(cls)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"https://twinhub.io/schemas/{cls.TYPE}.json",
        "title": cls.TYPE,
        "description": (cls.__doc__ or "").strip().splitlines()[0],
        **schema,
    }

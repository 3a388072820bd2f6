"""twinhub's CloudEvents NATS protocol binding.

The ``cloudevents`` SDK has no NATS binding; this module is one, on top of the
SDK's v1 event model (:class:`cloudevents.core.v1.event.CloudEvent`) and its JSON
format.

**Output: binary content mode.** Every CloudEvent attribute travels as a NATS
header ``ce-<attribute>``, ``datacontenttype`` as ``Content-Type``, and the body is
the event data alone (JSON). Why binary rather than structured:

* the body is the payload itself, so consumers that only want the data (the twin
  fold, a dashboard) decode one small JSON document and no envelope;
* routing attributes (type, owner, device, correlation id) are readable from the
  headers without parsing the body — the gateway and twin route on them;
* JetStream's own headers (``Nats-Msg-Id`` for dedup = the CloudEvent ``id``) sit
  beside them, and no attribute is written twice.

**Input: both modes.** A message whose ``Content-Type`` is
``application/cloudevents+json`` (or ``…+json; charset=…``) is read as structured
mode through the SDK's JSON format; anything else as binary mode.

Extension attributes used by twinhub: ``owner``, ``deviceid``, ``correlationid``
and, on read, ``sequence`` (the log position, filled in from the store).
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Final

import msgspec
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent

from proto import subjects
from proto.errors import BindingError
from proto.events import EVENT_TYPES, AnyEvent, Event, EventData, UnknownData
from proto.message import NatsMessage, StoredMessage

SPECVERSION: Final = "1.0"
CE: Final = "ce-"
CONTENT_TYPE: Final = "Content-Type"
JSON_TYPE: Final = "application/json"
STRUCTURED_TYPE: Final = "application/cloudevents+json"
MSG_ID: Final = "Nats-Msg-Id"

_REQUIRED: Final = ("id", "source", "type", "specversion")
_KNOWN_EXT: Final = ("owner", "deviceid", "correlationid")

_encoder = msgspec.json.Encoder()
_decoders: dict[type[EventData], msgspec.json.Decoder[Any]] = {
    cls: msgspec.json.Decoder(cls) for cls in EVENT_TYPES.values()
}


def _rfc3339(t: datetime) -> str:
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    s = t.astimezone(UTC).isoformat()
    return s[:-6] + "Z" if s.endswith("+00:00") else s


def _parse_time(value: str | datetime | None) -> datetime:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if not value:
        raise BindingError("missing CloudEvent attribute 'time'")
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as e:
        raise BindingError(f"bad CloudEvent time {value!r}") from e


def event_subject(event: AnyEvent) -> str:
    """The NATS subject an event is published on."""
    return subjects.event_subject(event.owner, event.device_id, event.kind, event.data.resource())


def ce_subject(event: AnyEvent) -> str:
    """The CloudEvent ``subject`` attribute: the href for resource events, else the device."""
    href = event.data.resource()
    return href if href is not None else event.device_id


def to_nats(event: AnyEvent) -> NatsMessage:
    """Encode an event as a binary-mode NATS message."""
    data = event.data
    if isinstance(data, UnknownData):
        body = data.raw
        content_type = data.content_type or JSON_TYPE
    else:
        body = _encoder.encode(data)
        content_type = JSON_TYPE
    headers = {
        CE + "specversion": SPECVERSION,
        CE + "id": event.id,
        CE + "source": event.source,
        CE + "type": event.type,
        CE + "subject": ce_subject(event),
        CE + "time": _rfc3339(event.time),
        CE + "owner": event.owner,
        CE + "deviceid": event.device_id,
        CONTENT_TYPE: content_type,
    }
    if event.correlation_id is not None:
        headers[CE + "correlationid"] = event.correlation_id
    return NatsMessage(subject=event_subject(event), msg_id=event.id, data=body, headers=headers)


def _is_structured(headers: Mapping[str, str]) -> bool:
    ct = _header(headers, CONTENT_TYPE) or ""
    return ct.split(";")[0].strip().lower() == STRUCTURED_TYPE


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is None:
        lname = name.lower()
        for k, v in headers.items():
            if k.lower() == lname:
                return v
    return value


def _attributes_binary(headers: Mapping[str, str]) -> dict[str, Any]:
    attrs: dict[str, Any] = {}
    for k, v in headers.items():
        lk = k.lower()
        if lk.startswith(CE):
            attrs[lk[len(CE) :]] = v
    ct = _header(headers, CONTENT_TYPE)
    if ct is not None:
        attrs["datacontenttype"] = ct
    return attrs


def _decode_data(type_: str, body: bytes, content_type: str | None, href: str | None) -> Any:
    cls = EVENT_TYPES.get(type_)
    kind = cls.KIND if cls is not None else _unknown_kind(type_)
    if cls is None:
        return UnknownData(
            type=type_, kind=kind, raw=body, content_type=content_type, resource_href=href
        )
    try:
        return _decoders[cls].decode(body)
    except (msgspec.ValidationError, msgspec.DecodeError) as e:
        raise BindingError(f"bad data for {type_}: {e}") from e
    except UnicodeDecodeError:  # msgspec's for a string that is not UTF-8
        raise BindingError(f"bad data for {type_}: not valid UTF-8") from None


def _unknown_kind(type_: str) -> str:
    name = type_.removeprefix("io.twinhub.").rsplit(".v", 1)[0]
    return "".join(c if c.isalnum() else "-" for c in name.lower()) or "unknown"


def _build(
    attrs: Mapping[str, Any], body: bytes, position: int | None, subject: str | None
) -> AnyEvent:
    missing = [a for a in _REQUIRED if not attrs.get(a)]
    if missing:
        raise BindingError(f"missing CloudEvent attribute(s): {', '.join(missing)}")
    if attrs["specversion"] != SPECVERSION:
        raise BindingError(f"unsupported CloudEvents specversion {attrs['specversion']!r}")
    owner = attrs.get("owner")
    device = attrs.get("deviceid")
    href: str | None = None
    if subject is not None and subject.startswith(subjects.PREFIX + "."):
        parsed = subjects.parse_event_subject(subject)
        owner = owner or parsed.owner
        device = device or parsed.device
        href = parsed.resource
    if not owner or not device:
        raise BindingError("missing CloudEvent extension 'owner' or 'deviceid'")
    type_ = str(attrs["type"])
    data = _decode_data(type_, body, attrs.get("datacontenttype"), href)
    return Event(
        owner=str(owner),
        device_id=str(device),
        data=data,
        source=str(attrs["source"]),
        id=str(attrs["id"]),
        time=_parse_time(attrs.get("time")),
        correlation_id=attrs.get("correlationid"),
        position=position,
    )


def from_nats(message: NatsMessage, position: int | None = None) -> AnyEvent:
    """Decode a NATS message in binary or structured mode into a typed event."""
    if _is_structured(message.headers):
        ce = from_structured(message.data)
        attrs = ce.get_attributes()
        return _build(attrs, _data_bytes(ce.get_data()), position, message.subject)
    return _build(_attributes_binary(message.headers), message.data, position, message.subject)


def from_stored(stored: StoredMessage) -> AnyEvent:
    """Decode a message read from the log; the event carries its log position."""
    return from_nats(stored.message, stored.position)


def _data_bytes(data: Any) -> bytes:
    if data is None:
        return b"null"
    if isinstance(data, bytes):
        return data
    return msgspec.json.encode(data)


# -- interop with the cloudevents SDK ------------------------------------------------------


def to_cloudevent(event: AnyEvent) -> CloudEvent:
    """The SDK's CloudEvent for an event (data as a JSON value)."""
    msg = to_nats(event)
    attrs: dict[str, Any] = {k[len(CE) :]: v for k, v in msg.headers.items() if k.startswith(CE)}
    attrs["time"] = event.time
    attrs["datacontenttype"] = msg.headers[CONTENT_TYPE]
    if event.position is not None:
        attrs["sequence"] = str(event.position)
    try:
        value: Any = msgspec.json.decode(msg.data) if msg.data else None
    except msgspec.DecodeError:
        value = msg.data
    return CloudEvent(attrs, value)


def to_structured(event: AnyEvent) -> NatsMessage:
    """Encode an event in structured content mode (``application/cloudevents+json``)."""
    body = JSONFormat().write(to_cloudevent(event))
    return NatsMessage(
        subject=event_subject(event),
        msg_id=event.id,
        data=body,
        headers={CONTENT_TYPE: STRUCTURED_TYPE},
    )


def from_structured(body: bytes) -> CloudEvent:
    try:
        ce = JSONFormat().read(None, body)
    except Exception as e:  # the SDK raises assorted errors on malformed input
        raise BindingError(f"malformed structured CloudEvent: {e}") from e
    if not isinstance(ce, CloudEvent):
        raise BindingError("structured CloudEvent is not a v1.0 event")
    return ce


def raw_to_b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")

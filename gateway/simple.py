"""Simple devices (ThingsBoard's CoAP device API, PRODUCT.md 4.2): the sans-IO core.

A simple device has no session: every request carries its access token in the URL,
``/api/v1/{token}/{feature}``. The adapter (:mod:`gateway.adapters.coap_udp`) turns each CoAP
request into a :class:`SimpleRequest` and drives :class:`SimpleCore` step by step; the core
never awaits and takes the time as an input:

1. :meth:`SimpleCore.route` -- path, method, token syntax, size: a :class:`Route`, or a
   :class:`Reply` at once (4.04, 4.05, 4.01, 4.13);
2. the adapter looks the token up (:mod:`gateway.devtokens`), then
   :meth:`SimpleCore.authorize` -- unknown or revoked: 4.01; over the per-token rate: 4.29
   with Max-Age;
3. :meth:`SimpleCore.decide` -- the payload (JSON, lenient like ThingsBoard's Gson, or CBOR):
   an :class:`Append` of events with the reply to give once the log acknowledged them
   (:meth:`SimpleCore.appended`: 2.01, or 5.03), a :class:`ReadAttributes` (answered by
   :func:`attributes_reply` once the adapter read the device's attributes), a
   :class:`~gateway.simpleclientrpc.CallServer` (client-side RPC, ``POST .../rpc``), or a 4.00
   with a diagnostic;
4. a log that cannot be reached, at any step, is 5.03.

Anti-reflection: a source address can be spoofed over UDP, so before the token is validated
no reply carries a payload (each is smaller than its request: the request held the token's
path); diagnostics come only once the token is known.

Telemetry follows ThingsBoard's ``JsonConverter``: an object is one sample at the receive
time, unless it has both ``ts`` and ``values`` (then ``values`` at ``ts``); an array holds
such objects; null values are dropped; integers beyond 64 bits are refused. Attributes are one
object. ``GET .../attributes?clientKeys=a,b&sharedKeys=c`` answers ``{"client": {...},
"shared": {...}}`` (a section without attributes is left out); without keys, every attribute
of both scopes; with keys of one scope only, that scope only.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum
from typing import Any, Final

from gateway.errors import BadRequest
from gateway.simpleclientrpc import CallServer, parse_call
from gateway.simplejson import loads as lenient_loads
from gateway.simplerpc import parse_rpc_id
from proto import codecs
from proto.devtokens import TokenRecord, looks_like_token
from proto.errors import CodecError
from proto.events import (
    SHARED_PREFIX,
    AnyEvent,
    AttributesReported,
    DesiredCleared,
    DesiredSet,
    Event,
    TelemetryReported,
)

__all__ = [
    "SHARED_PREFIX",
    "AnswerRpc",
    "Append",
    "AttributeView",
    "Feature",
    "Outcome",
    "ReadAttributes",
    "Reply",
    "Route",
    "SimpleConfig",
    "SimpleCore",
    "SimpleRequest",
    "TokenBuckets",
    "WatchAttributes",
    "WatchRpc",
    "attributes_reply",
    "fold_attributes",
    "parse_attributes",
    "parse_telemetry",
    "shared_reply",
    "shared_update",
]


JSON: Final = int(codecs.ContentFormat.JSON)
CBOR: Final = int(codecs.ContentFormat.CBOR)
TEXT: Final = int(codecs.ContentFormat.TEXT)
_INT64: Final = 1 << 63
MAX_DIAGNOSTIC: Final = 200  # bytes of a 4.00's text
PROVISION_PATH: Final = ("api", "v1", "provision")
"""Self-provisioning, no token in the path: :mod:`gateway.simpleprovision`, not the core."""


class Feature(Enum):
    TELEMETRY = "telemetry"
    ATTRIBUTES = "attributes"
    RPC = "rpc"


_METHODS: Final[dict[Feature, frozenset[str]]] = {
    Feature.TELEMETRY: frozenset({"POST"}),
    Feature.ATTRIBUTES: frozenset({"POST", "GET"}),
    Feature.RPC: frozenset({"GET", "POST"}),  # observe; the answer to /rpc/{id}
}


@dataclass(frozen=True, slots=True)
class SimpleConfig:
    gateway_id: str
    max_payload: int = 64 * 1024
    """Largest request payload (bytes, after block-wise assembly); above: 4.13 with Size1."""
    request_rate: float = 10.0
    """Requests per second per token (the bucket's refill rate)."""
    request_burst: int = 20
    """Requests a token may make at once (the bucket's size)."""
    max_buckets: int = 100_000
    """Tokens whose rate is tracked at once (least recently used forgotten first)."""

    def __post_init__(self) -> None:
        if self.max_payload < 1:
            raise ValueError("max_payload must be >= 1")
        if not self.request_rate > 0:
            raise ValueError("request_rate must be > 0")
        if self.request_burst < 1:
            raise ValueError("request_burst must be >= 1")
        if self.max_buckets < 1:
            raise ValueError("max_buckets must be >= 1")

    @property
    def source(self) -> str:
        return f"/gateway/{self.gateway_id}"


# --------------------------------------------------------------------------- messages


@dataclass(frozen=True, slots=True)
class SimpleRequest:
    """One CoAP request as the core sees it (block-wise transfers already assembled).

    ``declared_size``: the payload's size when the adapter did not assemble it because it is
    over the limit (Size1, or the block-wise offset reached); ``None`` otherwise.
    """

    method: str
    path: tuple[str, ...]
    query: tuple[str, ...] = ()
    content_format: int | None = None
    accept: int | None = None
    payload: bytes = b""
    remote: str = ""
    declared_size: int | None = None
    secure: bool = False  # it came over DTLS (``coaps+udp``)
    observe: bool = False  # an Observe registration (Observe: 0)


@dataclass(frozen=True, slots=True)
class Reply:
    """A CoAP response: code as ``"2.01"``, options Max-Age / Size1 when set."""

    code: str
    payload: bytes = b""
    content_format: int | None = None
    max_age: int | None = None
    size1: int | None = None


@dataclass(frozen=True, slots=True)
class Route:
    """A request whose path, method, token syntax and size passed."""

    feature: Feature
    method: str
    token: str
    rpc_id: str | None = None  # /api/v1/{token}/rpc/{id}: the device's answer to RPC id


@dataclass(frozen=True, slots=True)
class Append:
    """Append ``events`` (all of one device) to the log, then answer :meth:`SimpleCore.appended`.
    No events: nothing to write, answer at once."""

    events: tuple[AnyEvent, ...]


@dataclass(frozen=True, slots=True)
class ReadAttributes:
    """Read the device's attributes (an :class:`AttributeView`), then answer
    :func:`attributes_reply` with this request."""

    owner: str
    device_id: str
    client_keys: tuple[str, ...] | None  # None: not asked for
    shared_keys: tuple[str, ...] | None
    accept: int


@dataclass(frozen=True, slots=True)
class WatchAttributes:
    """``GET /api/v1/{token}/attributes`` with Observe: the device's shared-attribute updates
    come as notifications (:func:`shared_update`), the registration answered with their current
    values (:func:`shared_reply`). ``shared_keys`` (``?sharedKeys=``): only those (None: all)."""

    owner: str
    device_id: str
    shared_keys: tuple[str, ...] | None
    accept: int


@dataclass(frozen=True, slots=True)
class WatchRpc:
    """``GET /api/v1/{token}/rpc``: the device's server-side RPCs come as notifications of an
    observation (:mod:`gateway.simplerpc`); without Observe, or before any, the answer is
    2.03 with no payload, as ThingsBoard's to the registration."""

    owner: str
    device_id: str


@dataclass(frozen=True, slots=True)
class AnswerRpc:
    """``POST /api/v1/{token}/rpc/{id}``: the device answers RPC ``rpc_id`` with ``result``
    (its payload as JSON; None when empty). Unknown id: 4.04; recorded: 2.01."""

    owner: str
    device_id: str
    rpc_id: int
    result: Any


Outcome = Reply | Append | ReadAttributes | WatchAttributes | WatchRpc | AnswerRpc | CallServer


def _empty(code: str, **kw: Any) -> Reply:
    return Reply(code, **kw)


def _diagnostic(code: str, text: str) -> Reply:
    data = text.encode("utf-8")[:MAX_DIAGNOSTIC]
    return Reply(code, data.decode("utf-8", "ignore").encode("utf-8"), TEXT)


# --------------------------------------------------------------------------- rate limit


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float


class TokenBuckets:
    """One token bucket per key, bounded in number (least recently used forgotten)."""

    def __init__(self, rate: float, burst: int, max_keys: int) -> None:
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: str, now: float) -> float:
        """0.0 when a request of ``key`` may go now (and count it); otherwise the seconds
        until one may."""
        b = self._buckets.get(key)
        if b is None:
            b = _Bucket(float(self.burst), now)
            self._buckets[key] = b
            if len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
            elapsed = max(0.0, now - b.at)
            b.tokens = min(float(self.burst), b.tokens + elapsed * self.rate)
            b.at = max(b.at, now)
        if b.tokens >= 1.0:
            b.tokens -= 1.0
            return 0.0
        return (1.0 - b.tokens) / self.rate


# --------------------------------------------------------------------------- payloads


def decode_payload(payload: bytes, content_format: int | None) -> Any:
    """JSON (50, or no Content-Format: lenient) or CBOR (60) to a JSON value; 4.00 otherwise."""
    if content_format is None or content_format == JSON:
        return lenient_loads(payload)
    if content_format == CBOR:
        try:
            value = codecs.decode(payload, CBOR)
        except CodecError as e:
            raise BadRequest(str(e)) from e
        json_value, lossy = codecs.to_json_value(value)
        if lossy:
            raise BadRequest("CBOR payload has values JSON cannot hold (bytes, tags, NaN)")
        return json_value
    raise BadRequest(f"unsupported content format {content_format}: use JSON (50) or CBOR (60)")


def _check_value(key: str, value: Any) -> None:
    level = [value]
    while level:
        inner: list[Any] = []
        for v in level:
            if isinstance(v, bool) or v is None or isinstance(v, str):
                continue
            if isinstance(v, int):
                if not -_INT64 <= v < _INT64:
                    raise BadRequest(f"big integer values are not supported ({key!r})")
            elif isinstance(v, float):
                if not math.isfinite(v):
                    raise BadRequest(f"not a finite number ({key!r})")
            elif isinstance(v, dict):
                inner.extend(v.values())
            elif isinstance(v, list):
                inner.extend(v)
            else:
                raise BadRequest(f"can't parse value of {key!r}")
        level = inner


def _kv(obj: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in obj.items():
        if v is None:
            continue  # as ThingsBoard: a null value is no value
        _check_value(k, v)
        out[k] = v
    return out


def _ts(value: Any) -> int:
    if isinstance(value, bool):
        raise BadRequest("'ts' must be a number of milliseconds")
    if isinstance(value, int):
        ts = value
    elif isinstance(value, float) and math.isfinite(value):
        ts = int(value)
    elif isinstance(value, str):
        try:
            ts = int(value)
        except ValueError:
            raise BadRequest("'ts' must be a number of milliseconds") from None
    else:
        raise BadRequest("'ts' must be a number of milliseconds")
    if not 0 <= ts < _INT64:
        raise BadRequest("'ts' out of range")
    return ts


def parse_telemetry(value: Any) -> list[TelemetryReported]:
    """ThingsBoard's telemetry shapes to samples (empty ones dropped)."""
    objects: Sequence[Any]
    if isinstance(value, dict):
        objects = [value]
    elif isinstance(value, list):
        objects = value
    else:
        raise BadRequest("telemetry must be an object or an array of objects")
    samples: list[TelemetryReported] = []
    for obj in objects:
        if not isinstance(obj, dict):
            raise BadRequest(f"can't parse value: {json.dumps(obj)[:60]}")
        if "ts" in obj and "values" in obj:
            values = obj["values"]
            if not isinstance(values, dict):
                raise BadRequest("'values' must be an object")
            sample = TelemetryReported(ts=_ts(obj["ts"]), values=_kv(values))
        else:
            sample = TelemetryReported(values=_kv(obj))
        if sample.values:
            samples.append(sample)
    return samples


def parse_attributes(value: Any) -> AttributesReported | None:
    if not isinstance(value, dict):
        raise BadRequest("attributes must be an object")
    values = _kv(value)
    return AttributesReported(values=values) if values else None


def _keys(query: Sequence[str], name: str) -> tuple[str, ...] | None:
    found: list[str] | None = None
    for q in query:
        k, sep, v = q.partition("=")
        if sep and k == name:
            found = (found or []) + [key for key in (s.strip() for s in v.split(",")) if key]
    return None if found is None else tuple(found)


# --------------------------------------------------------------------------- attributes


@dataclass(frozen=True, slots=True)
class AttributeView:
    """A device's attributes as the log says: client ones (merged ``attributes-reported``),
    shared ones (desired state on ``/shared/<key>``), and the position each shared key was
    last changed at (so that events read out of order across two filters are harmless)."""

    client: Mapping[str, Any] = field(default_factory=dict)
    shared: Mapping[str, Any] = field(default_factory=dict)
    shared_at: Mapping[str, int] = field(default_factory=dict)


def fold_attributes(view: AttributeView, event: AnyEvent) -> AttributeView:
    """The view after one event (events of other kinds leave it as it is)."""
    data = event.data
    if isinstance(data, AttributesReported):
        return AttributeView({**view.client, **data.values}, view.shared, view.shared_at)
    if isinstance(data, DesiredSet | DesiredCleared) and data.href.startswith(SHARED_PREFIX):
        key = data.href[len(SHARED_PREFIX) :]
        pos = event.position or 0
        if not key or (pos and view.shared_at.get(key, 0) >= pos):
            return view
        shared = dict(view.shared)
        if isinstance(data, DesiredSet):
            shared[key] = data.content
        else:
            shared.pop(key, None)
        return AttributeView(view.client, shared, {**view.shared_at, key: pos})
    return view


def attributes_reply(view: AttributeView, read: ReadAttributes) -> Reply:
    """ThingsBoard's answer to ``GET /api/v1/{token}/attributes``."""
    client_keys, shared_keys = read.client_keys, read.shared_keys
    if not client_keys and not shared_keys:
        client: dict[str, Any] = dict(view.client)
        shared: dict[str, Any] = dict(view.shared)
    else:
        client = {k: view.client[k] for k in client_keys or () if k in view.client}
        shared = {k: view.shared[k] for k in shared_keys or () if k in view.shared}
    body: dict[str, Any] = {}
    if client:
        body["client"] = client
    if shared:
        body["shared"] = shared
    fmt = CBOR if read.accept == CBOR else JSON
    return Reply("2.05", codecs.encode(body, fmt), fmt)


def _shared(shared: Mapping[str, Any], keys: Sequence[str] | None) -> dict[str, Any]:
    return dict(shared) if keys is None else {k: shared[k] for k in keys if k in shared}


def shared_reply(view: AttributeView, watch: WatchAttributes) -> Reply:
    """The answer to the registration of an observation of ``attributes``: the current shared
    attributes (those asked for), flat, ``{"key": value, ...}``."""
    fmt = CBOR if watch.accept == CBOR else JSON
    return Reply("2.05", codecs.encode(_shared(view.shared, watch.shared_keys), fmt), fmt)


def shared_update(
    before: Mapping[str, Any], after: Mapping[str, Any], watch: WatchAttributes
) -> Reply | None:
    """The notification of what changed in the shared attributes (those asked for) from
    ``before`` to ``after``, as ThingsBoard's attribute update: the keys set (new or changed)
    with their values, and ``"deleted": [keys]`` for the keys cleared; None when nothing did."""
    old, new = _shared(before, watch.shared_keys), _shared(after, watch.shared_keys)
    body: dict[str, Any] = {
        k: v for k, v in new.items() if k not in old or not codecs.json_equal(old[k], v)
    }
    deleted = sorted(k for k in old if k not in new)
    if deleted:
        body["deleted"] = deleted
    if not body:
        return None
    fmt = CBOR if watch.accept == CBOR else JSON
    return Reply("2.05", codecs.encode(body, fmt), fmt)


# --------------------------------------------------------------------------- rpc


def _rpc(route: Route, record: TokenRecord, req: SimpleRequest) -> Outcome:
    if route.rpc_id is None and route.method == "POST":  # client-side RPC
        try:
            value = decode_payload(req.payload, req.content_format)
            return parse_call(value, record.owner, record.device_id, req.accept)
        except BadRequest as e:
            return _diagnostic("4.00", str(e))
    if route.rpc_id is None:
        return WatchRpc(record.owner, record.device_id)
    rpc_id = parse_rpc_id(route.rpc_id)
    if rpc_id is None:
        return _empty("4.04")
    try:
        result = None if not req.payload else decode_payload(req.payload, req.content_format)
    except BadRequest as e:
        return _diagnostic("4.00", str(e))
    return AnswerRpc(record.owner, record.device_id, rpc_id, result)


# --------------------------------------------------------------------------- the core


class SimpleCore:
    """The decisions of the simple-device endpoint; one per gateway (it holds the per-token
    rate buckets). See the module docstring for the steps."""

    def __init__(self, config: SimpleConfig) -> None:
        self.config = config
        self.buckets = TokenBuckets(config.request_rate, config.request_burst, config.max_buckets)

    def route(self, req: SimpleRequest) -> Route | Reply:
        path = req.path
        if len(path) not in (4, 5) or path[0] != "api" or path[1] != "v1":
            return _empty("4.04")
        try:
            feature = Feature(path[3])
        except ValueError:
            return _empty("4.04")
        rpc_id = path[4] if len(path) == 5 else None
        if rpc_id is not None and feature is not Feature.RPC:
            return _empty("4.04")
        if req.method not in _METHODS[feature]:
            return _empty("4.05")
        if feature is Feature.RPC and req.method == "GET" and rpc_id is not None:
            return _empty("4.05")  # GET /rpc/{id} is nothing (POST /rpc: client-side RPC)
        if not looks_like_token(path[2]):
            return _empty("4.01")
        size = req.declared_size if req.declared_size is not None else len(req.payload)
        if size > self.config.max_payload:
            return _empty("4.13", size1=self.config.max_payload)
        return Route(feature, req.method, path[2], rpc_id)

    def authorize(self, route: Route, record: TokenRecord | None, now: float) -> Reply | None:
        """None when the request may go on."""
        if record is None or record.state != "active":
            return _empty("4.01")
        wait = self.buckets.take(route.token, now)
        if wait > 0:
            return _empty("4.29", max_age=max(1, math.ceil(wait)))
        return None

    def decide(
        self, route: Route, record: TokenRecord, req: SimpleRequest, now: datetime
    ) -> Outcome:
        """What to do with an authorized request; ``now`` is the receive time (events' time)."""
        if route.feature is Feature.ATTRIBUTES and route.method == "GET" and req.observe:
            return WatchAttributes(
                record.owner,
                record.device_id,
                _keys(req.query, "sharedKeys") or None,
                CBOR if req.accept == CBOR else JSON,
            )
        if route.feature is Feature.ATTRIBUTES and route.method == "GET":
            return ReadAttributes(
                record.owner,
                record.device_id,
                _keys(req.query, "clientKeys"),
                _keys(req.query, "sharedKeys"),
                CBOR if req.accept == CBOR else JSON,
            )
        if route.feature is Feature.RPC:
            return _rpc(route, record, req)
        try:
            value = decode_payload(req.payload, req.content_format)
            datas: list[TelemetryReported | AttributesReported]
            if route.feature is Feature.TELEMETRY:
                datas = list(parse_telemetry(value))
            else:
                attrs = parse_attributes(value)
                datas = [] if attrs is None else [attrs]
        except BadRequest as e:
            return _diagnostic("4.00", str(e))
        at = now if now.tzinfo is not None else now.replace(tzinfo=UTC)
        events = tuple(
            Event(
                owner=record.owner,
                device_id=record.device_id,
                data=d,
                source=self.config.source,
                time=at,
            )
            for d in datas
        )
        return Append(events)

    @staticmethod
    def rpc_watched() -> Reply:
        """The answer to ``GET .../rpc`` that is no notification (the registration's)."""
        return _empty("2.03")

    @staticmethod
    def appended(ok: bool) -> Reply:
        """The reply once the log acknowledged an :class:`Append` (``ok``) or could not."""
        return _empty("2.01") if ok else _empty("5.03")

    @staticmethod
    def unavailable() -> Reply:
        """The reply when the log (token registry, attributes) cannot be reached."""
        return _empty("5.03")

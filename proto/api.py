"""The command API on NATS (request/reply): typed requests, replies and errors.

A client sends one request to ``twinhub.api.v1.<op>`` (see :func:`api_subject`)
with its JWT in the ``Authorization: Bearer <jwt>`` header and the request as
JSON; the twin service answers with a :class:`Reply` — never silence: a
malformed request gets ``Reply(ok=False, error=ApiError("bad_request", …))``.

Commands (update / retrieve / create / delete; ``rpc`` to a simple device) are answered once the
command is **recorded in the log** as pending, with its correlation id; the outcome follows
as events (``command-sent``, then ``command-succeeded`` / ``-failed`` /
``-expired`` / ``-canceled``) on the device's subjects.

A command request is idempotent by its correlation id: a request that repeats one the device
already has (open, or ended within the twin's memory, 24 h by default) is not recorded again.
The same request gets the original :class:`CommandAccepted` (``repeated``, with the command's
``state`` and ``outcome``), a different one ``conflict`` (what "the same" means:
:mod:`twin.commands`). So a caller that got no answer sends the same request again, with the
same correlation id, as the client library does.

Simple devices (ThingsBoard's device API): ``provision-device`` creates one for the caller's
owner and answers its access token (:class:`DeviceTokenIssued`: the only place the token ever
appears; the service keeps its hash), ``rotate-device-token`` gives it a new one and
``revoke-device-token`` revokes it (:class:`DeviceTokenRevoked`). Each is recorded as an event
(``device-provisioned``, ``device-token-changed``) and in the token registry
(:mod:`proto.devtokens`). They are not idempotent like commands: the client sends them once.
``answer-rpc`` answers a device's client-side RPC (an ``rpc-requested`` event): the first
answer wins (:class:`AnswerClientRpc`).
"""

from __future__ import annotations

from typing import Any, ClassVar, Final, Literal

import msgspec

from proto.errors import ProtoError
from proto.events import RPC_HREF, CommandOp, CommandState

API_PREFIX: Final = "twinhub.api.v1"
APP_JS_PREFIX: Final = "twinhub.js.API"
"""Where an application reaches JetStream (its owner's consumers of the event stream only):
the bus maps it to the JetStream API of twinhub's account (docs/architecture.md, "The bus")."""
AUTH_HEADER: Final = "Authorization"
DEADLINE_HEADER: Final = "Twinhub-Deadline"
"""When the caller stops waiting for the answer, in milliseconds since the Unix epoch
(optional). The service drops a request it picks up later than that: the caller has already
given up (and may retry), so a backlog left by callers that gave up is not worked off at the
expense of those still waiting, and a command nobody waits for any more is not recorded."""
DEFAULT_TTL: Final = 60.0
MAX_TTL: Final = 30 * 24 * 3600.0


class ApiDecodeError(ProtoError, ValueError):
    """A request or reply body is not valid for its operation."""


class _Request(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True
):
    OP: ClassVar[str] = ""


class _CommandRequest(_Request, frozen=True, kw_only=True):
    device_id: str
    href: str
    ttl: float = DEFAULT_TTL  # seconds the command may wait for the device
    # the caller's: names one command per device (a repeat gets the original answer); else generated
    correlation_id: str | None = None
    interface: str | None = None
    max_attempts: int | None = None


class UpdateResource(_CommandRequest, frozen=True, kw_only=True):
    """Update a resource (CoAP POST): ``content`` as JSON, or raw ``content_b64`` in
    ``content_format`` (60 / 10000 for CBOR)."""

    OP: ClassVar[str] = "update"
    content: Any = None
    content_b64: str | None = None
    content_format: int | None = None


class CreateResource(UpdateResource, frozen=True, kw_only=True):
    """Create a resource in a collection (CoAP POST with ``if=oic.if.create``)."""

    OP: ClassVar[str] = "create"


class RetrieveResource(_CommandRequest, frozen=True, kw_only=True):
    """Read a resource from the device (CoAP GET); the content comes in the outcome event."""

    OP: ClassVar[str] = "retrieve"


class DeleteResource(_CommandRequest, frozen=True, kw_only=True):
    """Delete a resource (CoAP DELETE)."""

    OP: ClassVar[str] = "delete"


MAX_RPC_METHOD: Final = 256


class CallRpc(_Request, frozen=True, kw_only=True):
    """A server-side RPC to a simple device (ThingsBoard's device API): the device, observing
    ``/api/v1/{token}/rpc``, gets ``{"id": N, "method": method, "params": params}`` and answers
    with ``POST /api/v1/{token}/rpc/{N}``; the answer is the ``content`` of the outcome
    (``command-succeeded``). Recorded as a command of op ``rpc`` on :data:`RPC_HREF`, with the
    commands' lifecycle, time to live and idempotency. Only for simple devices (an OCF device
    gets ``bad_request``)."""

    OP: ClassVar[str] = "rpc"
    device_id: str
    method: str
    params: Any = None
    ttl: float = DEFAULT_TTL
    correlation_id: str | None = None
    max_attempts: int | None = None

    @property
    def href(self) -> str:
        return RPC_HREF


class AnswerClientRpc(_Request, frozen=True, kw_only=True):
    """Answer a simple device's client-side RPC (ThingsBoard's device API): the device posted
    ``{"method", "params"}`` to ``/api/v1/{token}/rpc`` (an ``rpc-requested`` event, whose
    ``request_id`` this names) and waits for ``result`` (any JSON value) as its CoAP response.
    Recorded as ``rpc-answered`` (:class:`RpcAnswerRecorded`). The first answer wins: another
    answer to the same request is ``conflict`` (the same answer again is its repeat); a request
    the device never made, or whose wait is over (``timeout_ms`` after it), is ``not_found``."""

    OP: ClassVar[str] = "answer-rpc"
    device_id: str
    request_id: str
    result: Any = None


class SetDesired(_Request, frozen=True, kw_only=True):
    """Set the desired content of a resource (the twin computes the delta).

    ``content`` is a JSON object, except on a simple device's shared attributes (hrefs
    ``/shared/<key>``), where it is the attribute's value: any JSON value but null."""

    OP: ClassVar[str] = "desired-set"
    device_id: str
    href: str
    content: Any


class ClearDesired(_Request, frozen=True, kw_only=True):
    OP: ClassVar[str] = "desired-clear"
    device_id: str
    href: str


class CancelCommands(_Request, frozen=True, kw_only=True):
    """Cancel pending commands: one (``correlation_id``), a resource's, or a device's."""

    OP: ClassVar[str] = "cancel"
    device_id: str
    correlation_id: str | None = None
    href: str | None = None


class ListPending(_Request, frozen=True, kw_only=True):
    OP: ClassVar[str] = "pending-list"
    device_id: str | None = None
    href: str | None = None
    state: Literal["pending", "sent"] | None = None
    limit: int = 1000


class GetTwin(_Request, frozen=True, kw_only=True):
    """The twin with the log position it reflects (``position``: subscribe after it)."""

    OP: ClassVar[str] = "twin-get"
    device_id: str


class ListDevices(_Request, frozen=True, kw_only=True):
    OP: ClassVar[str] = "devices-list"
    online: bool | None = None
    resource_type: str | None = None
    limit: int = 100
    after_id: str | None = None


class GetSession(_Request, frozen=True, kw_only=True):
    """What the caller's token is on the bus (:class:`SessionInfo`): an application calls it
    once after connecting, to name its subjects, inbox and consumers."""

    OP: ClassVar[str] = "session"


class ProvisionDevice(_Request, frozen=True, kw_only=True):
    """Create a simple device (ThingsBoard's device API, PRODUCT.md 4.2) for the caller's owner,
    with a fresh access token (:class:`DeviceTokenIssued`). ``device_id`` absent: a random UUID;
    a device id that exists already is ``conflict`` (rotate its token instead)."""

    OP: ClassVar[str] = "provision-device"
    device_id: str | None = None
    name: str = ""


class RevokeDeviceToken(_Request, frozen=True, kw_only=True):
    """Revoke a simple device's access token (:class:`DeviceTokenRevoked`): the gateway refuses
    it from then on, and the device has none until its token is rotated."""

    OP: ClassVar[str] = "revoke-device-token"
    device_id: str


class RotateDeviceToken(_Request, frozen=True, kw_only=True):
    """Give a simple device a new access token and revoke its current one
    (:class:`DeviceTokenIssued`)."""

    OP: ClassVar[str] = "rotate-device-token"
    device_id: str


ApiRequest = (
    UpdateResource
    | CreateResource
    | RetrieveResource
    | DeleteResource
    | CallRpc
    | AnswerClientRpc
    | SetDesired
    | ClearDesired
    | CancelCommands
    | ListPending
    | GetTwin
    | ListDevices
    | GetSession
    | ProvisionDevice
    | RevokeDeviceToken
    | RotateDeviceToken
)
REQUEST_TYPES: Final[dict[str, type[ApiRequest]]] = {
    cls.OP: cls
    for cls in (
        UpdateResource,
        CreateResource,
        RetrieveResource,
        DeleteResource,
        CallRpc,
        AnswerClientRpc,
        SetDesired,
        ClearDesired,
        CancelCommands,
        ListPending,
        GetTwin,
        ListDevices,
        GetSession,
        ProvisionDevice,
        RevokeDeviceToken,
        RotateDeviceToken,
    )
}
COMMAND_REQUESTS: Final[dict[str, CommandOp]] = {
    "update": "update",
    "create": "create",
    "retrieve": "retrieve",
    "delete": "delete",
    "rpc": "rpc",
}

ErrorCode = Literal[
    "bad_request",
    "unauthorized",
    "forbidden",
    "not_found",
    "conflict",
    "unavailable",
    "internal",
]


class ApiError(msgspec.Struct, frozen=True, kw_only=True):
    code: ErrorCode
    message: str


FinalState = Literal["succeeded", "failed", "expired", "canceled"]


class OutcomeSummary(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """How a command ended: ``position`` is the event that ended it (its ``content``, if any,
    is there), ``at`` when (RFC 3339), ``status`` the device's CoAP code when it answered."""

    state: FinalState
    position: int
    at: str
    status: str | None = None
    attempts: int = 0
    reason: str = ""


class CommandAccepted(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """The reply to a command: recorded as pending at ``position`` in the log.

    ``repeated``: the request repeated one already recorded under its correlation id; this is
    that command's acceptance (its position and deadline), with its ``state`` now and, once it
    ended, its ``outcome``. A first acceptance is ``pending``, without outcome."""

    correlation_id: str
    device_id: str
    href: str
    position: int
    expires_at: str  # RFC 3339
    repeated: bool = False
    state: CommandState = "pending"
    outcome: OutcomeSummary | None = None


class PendingCommand(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    correlation_id: str
    device_id: str
    href: str
    op: CommandOp
    state: CommandState
    issued_at: str
    expires_at: str | None = None
    attempts: int = 0
    reason: str = ""  # "desired": issued for desired state
    # what to send (the gateway replays pending commands from this list at sign-in)
    position: int = 0  # of its command-pending event: the issue order
    content: Any = None
    content_b64: str | None = None
    content_format: int | None = None
    interface: str | None = None
    max_attempts: int = 3


class PendingList(msgspec.Struct, frozen=True, kw_only=True):
    """The reply to ``pending-list``: open commands in issue order per device."""

    commands: list[PendingCommand]


class CancelResult(msgspec.Struct, frozen=True, kw_only=True):
    """The reply to ``cancel``: the commands recorded as canceled (``position``: the last
    ``command-canceled`` event; ``None`` when nothing was pending)."""

    device_id: str
    canceled: list[str]
    position: int | None = None


class DesiredResult(msgspec.Struct, frozen=True, kw_only=True):
    """The reply to ``desired-set`` / ``desired-clear``: the new version, where it is in the log
    (``None``: nothing to clear) and the pending desired updates it superseded (canceled)."""

    device_id: str
    href: str
    version: int
    position: int | None = None
    superseded: list[str] = msgspec.field(default_factory=list)


class TwinResult(msgspec.Struct, frozen=True, kw_only=True):
    """The reply to ``twin-get``: the twin (its JSON view) and the log position it reflects —
    subscribe to the device's events after ``position`` and nothing is missed or seen twice."""

    twin: dict[str, Any]
    position: int


class DeviceList(msgspec.Struct, frozen=True, kw_only=True):
    """The reply to ``devices-list``. Every event up to ``position`` is reflected in every twin
    listed (each twin may reflect more: its own ``position``); ``next_after_id`` pages on."""

    devices: list[dict[str, Any]]
    position: int
    next_after_id: str | None = None


class SessionInfo(msgspec.Struct, frozen=True, kw_only=True):
    """The reply to ``session``: the caller's owner and what it may use of the bus.

    ``events``: the subject filter of the owner's events (live subscriptions and consumer
    filters must lie under it); ``inbox_prefix``: the only prefix replies may come back on;
    ``consumer_key`` (hex): the key that names the owner's durable consumers
    (:func:`bus.permissions.consumer_name`), the same for every token of the owner;
    ``position``: the log position of the owner's newest event (a subscription "from now"
    starts after it); ``expires_at``: the token's ``exp`` (Unix seconds)."""

    owner: str
    events: str
    inbox_prefix: str
    consumer_key: str
    position: int
    expires_at: float | None = None


class DeviceTokenIssued(msgspec.Struct, frozen=True, kw_only=True):
    """The reply to ``provision-device`` and ``rotate-device-token``: the device's new access
    ``token`` (shown here only: the service keeps its hash, never the token), its public name
    ``token_id`` (:func:`proto.devtokens.token_id`) and where the event that recorded it is in the
    log (``position``: ``device-provisioned`` / ``device-token-changed``)."""

    device_id: str
    token: str
    token_id: str
    position: int


class DeviceTokenRevoked(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """The reply to ``revoke-device-token``: the token revoked (``token_id``) and the
    ``device-token-changed`` event's position; ``token_id`` empty and ``position`` ``None`` when
    the device had no token to revoke (already revoked)."""

    device_id: str
    token_id: str = ""
    position: int | None = None


class RpcAnswerRecorded(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """The reply to ``answer-rpc``: the ``rpc-answered`` event is in the log at ``position``
    (the gateway hands its result to the waiting device). ``repeated``: this very answer was
    recorded before (a retry), nothing new was written."""

    device_id: str
    request_id: str
    position: int
    repeated: bool = False


class Reply(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    ok: bool
    result: Any = None
    error: ApiError | None = None


def api_subject(op: str) -> str:
    if op not in REQUEST_TYPES:
        raise ApiDecodeError(f"unknown operation {op!r}")
    return f"{API_PREFIX}.{op}"


def op_of_subject(subject: str) -> str:
    prefix = API_PREFIX + "."
    if not subject.startswith(prefix):
        raise ApiDecodeError(f"not an API subject: {subject!r}")
    return subject[len(prefix) :]


_decoders: dict[str, msgspec.json.Decoder[Any]] = {
    op: msgspec.json.Decoder(cls) for op, cls in REQUEST_TYPES.items()
}
_reply_decoder = msgspec.json.Decoder(Reply)


def encode_request(request: ApiRequest) -> bytes:
    return msgspec.json.encode(request)


def decode_request(op: str, body: bytes) -> ApiRequest:
    decoder = _decoders.get(op)
    if decoder is None:
        raise ApiDecodeError(f"unknown operation {op!r}")
    try:
        request: ApiRequest = decoder.decode(body)
    except (msgspec.ValidationError, msgspec.DecodeError) as e:
        raise ApiDecodeError(f"bad {op} request: {e}") from e
    except UnicodeDecodeError:  # msgspec's for a string that is not UTF-8, not a DecodeError
        raise ApiDecodeError(f"bad {op} request: not valid UTF-8") from None
    return request


def _plain(value: Any) -> Any:
    # A store hands back int subclasses (pymongo's bson Int64 for integers beyond 32 bits, in
    # twins' resource content): they are the integers they subclass.
    if isinstance(value, int):
        return int(value)
    raise TypeError(f"Encoding objects of type {type(value).__name__} is unsupported")


_reply_encoder = msgspec.json.Encoder(enc_hook=_plain)


def encode_reply(reply: Reply) -> bytes:
    return _reply_encoder.encode(reply)


def decode_reply(body: bytes) -> Reply:
    try:
        return _reply_decoder.decode(body)
    except (msgspec.ValidationError, msgspec.DecodeError) as e:
        raise ApiDecodeError(f"bad reply: {e}") from e
    except UnicodeDecodeError:
        raise ApiDecodeError("bad reply: not valid UTF-8") from None


def bearer(token: str, deadline: float | None = None) -> dict[str, str]:
    """Request headers: the token, and the caller's deadline (Unix time, seconds) if given."""
    headers = {AUTH_HEADER: f"Bearer {token}"}
    if deadline is not None:
        headers[DEADLINE_HEADER] = str(round(deadline * 1000))
    return headers


def deadline_of(headers: dict[str, str] | None) -> float | None:
    """The caller's deadline (Unix time, seconds), or ``None`` (absent or not a number)."""
    value = headers.get(DEADLINE_HEADER) if headers else None
    if value is None or not value.isascii() or not value.isdigit() or len(value) > 15:
        return None
    return int(value) / 1000


def token_of(headers: dict[str, str] | None) -> str | None:
    if not headers:
        return None
    value = headers.get(AUTH_HEADER) or headers.get(AUTH_HEADER.lower())
    if not value or not value.startswith("Bearer "):
        return None
    return value[len("Bearer ") :].strip() or None

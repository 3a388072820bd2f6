"""The messages of the device session (:mod:`gateway.session`): its inputs, its effects, its
configuration and its typed steps. They live here so that the session's layers
(``session_account``, ``session_links``, ``session_sync``) and the thin
:class:`gateway.session.Session` composing them share one vocabulary; :mod:`gateway.session`
re-exports all of it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import Any, Final

from auth.tokens import Claims
from proto import subjects
from proto.codecs import ContentFormat
from proto.events import (
    AnyEvent,
    DeviceRegistered,
    ResourceLink,
)

# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True, slots=True)
class DeviceRequest:
    """A request the device sent to the cloud."""

    rid: int
    method: str
    path: str
    query: tuple[str, ...] = ()
    payload: bytes = b""
    content_format: int | None = None
    accept: int | None = None


@dataclass(frozen=True, slots=True)
class Reply:
    """The device's answer to one of our requests (or one notification of an observation)."""

    code: str
    payload: bytes = b""
    content_format: int | None = None
    etag: bytes | None = None
    observe: int | None = None


@dataclass(frozen=True, slots=True)
class DeviceResponse:
    """The first answer to ``SendRequest(ref)``; ``reply`` is None when it failed or timed out."""

    ref: int
    reply: Reply | None
    error: str = ""


@dataclass(frozen=True, slots=True)
class Notification:
    """A later notification of the observation started by ``SendRequest(ref, observe=True)``."""

    ref: int
    reply: Reply


@dataclass(frozen=True, slots=True)
class AppendResult:
    ref: int
    ok: bool
    error: str = ""
    conflict: bool = False  # a conditional append whose condition did not hold


@dataclass(frozen=True, slots=True)
class DeviceState:
    """What the log says about a device, loaded at sign-in."""

    links: tuple[ResourceLink, ...] = ()
    last_content: Mapping[str, tuple[int | None, Any]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class DeviceStateLoaded:
    ref: int
    state: DeviceState | None
    error: str = ""


@dataclass(frozen=True, slots=True)
class OwnerLoaded:
    """Answer to ``LoadOwner(ref)``: the device's current owner per the log.

    ``owner`` is None when the device is not registered (never signed up, or signed off);
    ``error`` is set when the log could not be read. ``registered_at``: the position of the
    device's last registration (0: none), the condition of a sign-up's append.
    """

    ref: int
    owner: str | None
    error: str = ""
    registered_at: int = 0


@dataclass(frozen=True, slots=True)
class Discovered:
    """Answer to ``Discover(ref)``: the owner's devices and their links (None: log failed)."""

    ref: int
    links: Mapping[str, tuple[ResourceLink, ...]] | None


@dataclass(frozen=True, slots=True)
class KeysRefreshed:
    """Answer to ``RefreshKeys(ref)``: the validator's key source was refreshed (or could not
    be, or was refreshed too recently); the request is handled again, once."""

    ref: int


@dataclass(frozen=True, slots=True)
class CodeExchanged:
    """Answer to ``ExchangeCode(ref)``: the claims of the provider's validated token, or why
    there are none (``unavailable``: the provider could not be reached; else the code or the
    token was refused)."""

    ref: int
    claims: Claims | None
    error: str = ""
    unavailable: bool = False


@dataclass(frozen=True, slots=True)
class Tick:
    """Time passes (expiry checks)."""


@dataclass(frozen=True, slots=True)
class ConnectionLost:
    reason: str


Input = (
    KeysRefreshed
    | CodeExchanged
    | Discovered
    | OwnerLoaded
    | DeviceRequest
    | DeviceResponse
    | Notification
    | AppendResult
    | DeviceStateLoaded
    | Tick
    | ConnectionLost
)

# --------------------------------------------------------------------------- effects


@dataclass(frozen=True, slots=True)
class Respond:
    rid: int
    code: str
    payload: bytes = b""
    content_format: int | None = None


@dataclass(frozen=True, slots=True)
class SendRequest:
    """Send a request to the device; answer with DeviceResponse(ref) (and Notifications)."""

    ref: int
    method: str
    path: str
    query: tuple[str, ...] = ()
    payload: bytes = b""
    content_format: int | None = None
    observe: bool = False


@dataclass(frozen=True, slots=True)
class CancelObservation:
    ref: int


@dataclass(frozen=True, slots=True)
class Append:
    """Append events (one device, in order); answer with AppendResult(ref).

    With ``expected_last`` the append is conditional: written only if the last position among
    the log's messages matching ``scope`` is still ``expected_last`` (else
    ``AppendResult(conflict=True)`` and nothing is written)."""

    ref: int
    events: tuple[AnyEvent, ...]
    critical: bool = True  # a failure of a non-critical append is not fatal to the session
    expected_last: int | None = None
    scope: str | None = None


@dataclass(frozen=True, slots=True)
class LoadDeviceState:
    ref: int
    device_id: str
    owner: str


@dataclass(frozen=True, slots=True)
class LoadOwner:
    """Find the device's current owner in the log (its last registration or unregistration);
    answer with ``OwnerLoaded(ref)``."""

    ref: int
    device_id: str


@dataclass(frozen=True, slots=True)
class Discover:
    """Find the owner's devices (``device_ids``: only these; empty: all) and their links."""

    ref: int
    owner: str
    device_ids: tuple[str, ...]
    resource_types: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class RefreshKeys:
    """A token named a signing key the validator does not know: refresh its key source (at
    its bounded rate), then answer ``KeysRefreshed(ref)``."""

    ref: int
    kid: str | None


@dataclass(frozen=True, slots=True)
class ExchangeCode:
    """Exchange an OAuth2 authorization code at ``provider``'s token endpoint and validate the
    token it returns; answer ``CodeExchanged(ref)``."""

    ref: int
    provider: str
    code: str


@dataclass(frozen=True, slots=True)
class Close:
    reason: str


@dataclass(frozen=True, slots=True)
class SignedIn:
    """Informational: the driver registers the device's connection (routing, metrics)."""

    device_id: str
    owner: str


@dataclass(frozen=True, slots=True)
class SignedOut:
    device_id: str


@dataclass(frozen=True, slots=True)
class ResourcesKnown:
    """Informational: the resources the device serves (published or discovered) so far;
    the driver's command delivery waits for them."""

    hrefs: tuple[str, ...]


Effect = (
    RefreshKeys
    | ExchangeCode
    | ResourcesKnown
    | Discover
    | LoadOwner
    | Respond
    | SendRequest
    | CancelObservation
    | Append
    | LoadDeviceState
    | Close
    | SignedIn
    | SignedOut
)

# --------------------------------------------------------------------------- the machine


class Phase(Enum):
    CONNECTED = "connected"  # nothing but the security paths
    SIGNING_IN = "signing-in"  # sign-in accepted, waiting for the log
    SIGNED_IN = "signed-in"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class SessionConfig:
    gateway_id: str
    connection_id: str
    remote_address: str
    protocol: str = "coap+tcp"
    access_ttl: float | None = 3600.0  # None: tokens without expiry (expiresin -1)
    refresh_ttl: float = 30 * 24 * 3600.0
    batch_observe: bool = True
    max_links: int = 1000
    cert_device_id: str | None = None
    """The device ID of the connection's OCF identity certificate (``ocf-identity`` mode)."""
    cert_expires_at: float | None = None
    """End the session when the client certificate expires (when the gateway is told to)."""
    refreshable_keys: bool = False
    """The validator's keys can be refreshed (a JWKS URL): an unknown ``kid`` asks for it."""
    oauth_providers: tuple[str, ...] = ()
    """Sign-up ``authprovider`` values whose ``accesstoken`` is an OAuth2 authorization code."""

    @property
    def source(self) -> str:
        return f"/gateway/{self.gateway_id}"


OCF_CBOR: Final = int(ContentFormat.OCF_CBOR)
REPLY_FORMATS: Final = {50: 50, 60: 60, 10000: 10000}
MAX_REGISTRATION_ATTEMPTS: Final = 3
"""Owner checks of one sign-up whose conditional registration keeps losing races (then 5.03)."""


def registration_scope(device_id: str) -> str:
    """The device's registrations, whoever's: the scope of a sign-up's conditional append."""
    return subjects.event_filter(device=device_id, kind=DeviceRegistered.KIND)


class Step(Enum):
    """A follow-up step: what an acknowledged append, or the owner read from the log, leads to."""

    NONE = auto()
    SIGN_UP = auto()  # an owner check of a sign-up: record the registration
    SIGN_IN = auto()  # an owner check of a sign-in: record the device online
    SIGN_OFF = auto()  # an owner check of a sign-off: record the unregistration
    SIGNED_IN = auto()  # the online event is in the log: the session is signed in

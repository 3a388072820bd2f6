"""The sans-IO core of one device connection.

:class:`Session` is a state machine: the driver feeds it :data:`Input` values
(device requests, device responses and notifications, results of log appends,
clock ticks, the connection's end) with the current time and carries out the
:data:`Effect` values it returns (reply to the device, send a request to the
device, append events to the log, load the device's recorded state, close the
connection). Nothing here awaits, reads a clock or touches a socket, which is
what makes the protocol testable by scripted conversations and fuzzable.

Guarantees the driver relies on:

* Effects are returned in the order they must happen. ``Append`` effects of one
  session must be carried out in order (they hold one device's events).
* A device's messages of one exchange may be fed out of their wire order in one way only: the
  notifications of an observation before its first response (the adapter hands notifications
  over at once, the first response through an await). The session appends them after the
  response, so a resource's events enter the log in the order the device produced them.
* A reply that depends on the log (sign-up, sign-in, publish…) is only emitted
  after the driver reported the append as acknowledged (``AppendResult``).
* After a ``Close`` effect the session accepts nothing but ``ConnectionLost``.
"""

from __future__ import annotations

import base64
import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any, Final

import msgspec

from auth.errors import AuthError, UnknownKey
from auth.tokens import Claims, TokenIssuer, TokenValidator
from gateway import ocf
from gateway.errors import (
    BadRequest,
    GatewayError,
    MethodNotAllowed,
    NotFound,
    Unauthorized,
    coap_code,
    from_auth,
)
from proto import codecs, subjects
from proto.codecs import ContentFormat
from proto.errors import CodecError
from proto.events import (
    AnyEvent,
    DeviceOffline,
    DeviceOnline,
    DeviceRegistered,
    DeviceUnregistered,
    Event,
    EventData,
    ResourceChanged,
    ResourceLink,
    ResourceLinksPublished,
    ResourceLinksUnpublished,
    SyncState,
    TwinSyncStateChanged,
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
_REPLY_FORMATS: Final = {50: 50, 60: 60, 10000: 10000}
MAX_REGISTRATION_ATTEMPTS: Final = 3
"""Owner checks of one sign-up whose conditional registration keeps losing races (then 5.03)."""


def registration_scope(device_id: str) -> str:
    """The device's registrations, whoever's: the scope of a sign-up's conditional append."""
    return subjects.event_filter(device=device_id, kind=DeviceRegistered.KIND)


@dataclass(slots=True)
class _Pending:
    """What to do when an append is acknowledged."""

    on_ok: list[Effect]
    on_fail: list[Effect]
    then: str = ""  # a follow-up step name
    cache: tuple[str, Respond] | None = None  # sign-up answer to remember once recorded
    on_conflict: _OwnerCheck | None = None  # a registration raced: check the owner again


@dataclass(frozen=True, slots=True)
class _OwnerCheck:
    """A sign-up / sign-in / sign-off waiting for the device's owner from the log."""

    step: str  # "sign-up" | "sign-in" | "sign-off"
    req: DeviceRequest
    claims: Claims
    device_id: str
    sign_up: ocf.SignUp | None = None
    attempt: int = 1  # a sign-up whose registration lost a race checks again, a few times


MAX_EARLY_NOTIFICATIONS: Final = 256
"""Notifications kept per observation while its first response has not been handled (the
oldest go first beyond it: the window is a loop turn or two, this bounds a hostile peer)."""


@dataclass(slots=True)
class _Resource:
    link: ResourceLink
    ref: int | None = None  # observation / GET in flight
    reported: bool = False
    # A one-shot read is in flight and the batch observation reported the resource meanwhile:
    # the read's answer may be older than that report (it is dropped, see _on_first).
    superseded: bool = False


class Session:
    """One device connection (see module doc)."""

    def __init__(
        self, config: SessionConfig, validator: TokenValidator, issuer: TokenIssuer
    ) -> None:
        self.config = config
        self.validator = validator
        self.issuer = issuer
        self.phase = Phase.CONNECTED
        self.device_id: str | None = None
        self.owner: str | None = None
        self.expires_at: float | None = None
        self.sync_state: SyncState = "out_of_sync"
        self._refs = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._resources: dict[str, _Resource] = {}
        self._by_ref: dict[int, str] = {}  # ref -> href ("" = batch)
        # observations whose first response was not handled yet -> notifications fed meanwhile
        self._early: dict[int, list[Reply]] = {}
        self._batch_ref: int | None = None
        self._discovery_ref: int | None = None
        self._state_ref: int | None = None
        self._last: dict[str, tuple[int | None, Any]] = {}
        self._published: dict[str, ResourceLink] = {}
        self._next_ins = 1
        self.sign_up_cache: dict[str, Respond] = {}
        self.online = False  # the log says this connection's device is online
        # This connection's online event may be in the log with no offline after it: its sign-in
        # append is in flight, or failed with an unknown outcome (an unavailable log may store
        # it still). The connection's end then records an offline too (which the twin ignores
        # when the online never made it: it names this connection).
        self._maybe_online = False
        self._sync_started = False
        self._discoveries: dict[int, DeviceRequest] = {}
        self._owner_checks: dict[int, _OwnerCheck] = {}
        self._key_waits: dict[int, DeviceRequest] = {}  # RefreshKeys ref -> the request
        self._exchanges: dict[int, tuple[ocf.SignUp, list[DeviceRequest]]] = {}
        self._exchanging: dict[str, int] = {}  # code -> ExchangeCode ref in flight
        # A code is single-use at the provider: once exchanged, its claims answer this
        # connection's retries (the sign-up answer cache covers those recorded in the log).
        self._exchanged: dict[str, Claims] = {}

    # -- helpers ----------------------------------------------------------------------------

    def _ref(self) -> int:
        return next(self._refs)

    def _event(
        self, data: EventData, device_id: str | None = None, owner: str | None = None
    ) -> AnyEvent:
        dev = device_id or self.device_id
        own = owner or self.owner
        assert dev is not None
        assert own is not None
        return Event(owner=own, device_id=dev, data=data, source=self.config.source)

    def _reply(self, req: DeviceRequest, code: str, value: Any = None) -> Respond:
        cf = _REPLY_FORMATS.get(req.content_format or req.accept or OCF_CBOR, OCF_CBOR)
        if req.accept in _REPLY_FORMATS:
            cf = req.accept
        if value is None:
            return Respond(req.rid, code)
        return Respond(req.rid, code, codecs.encode(value, cf), cf)

    def _error(self, req: DeviceRequest, err: GatewayError, *, close: bool = False) -> list[Effect]:
        code = coap_code(err)
        out: list[Effect] = [Respond(req.rid, code, str(err).encode("utf-8")[:512], 0)]
        if close or isinstance(err, Unauthorized):
            out.append(Close(f"{code} {err}"))
            self.phase = Phase.CLOSED
        return out

    def _append(
        self,
        events: list[AnyEvent],
        on_ok: list[Effect],
        on_fail: list[Effect],
        then: str = "",
        critical: bool = True,
        cache: tuple[str, Respond] | None = None,
    ) -> Append:
        ref = self._ref()
        self._pending[ref] = _Pending(on_ok, on_fail, then, cache)
        return Append(ref, tuple(events), critical)

    def _expires_in(self, expires_at: float | None, now: float) -> int:
        return -1 if expires_at is None else max(0, int(expires_at - now))

    # -- entry point -----------------------------------------------------------------------

    def handle(self, inp: Input, now: float) -> list[Effect]:
        if self.phase is Phase.CLOSED and not isinstance(inp, ConnectionLost | AppendResult):
            return []
        if (
            self.phase is Phase.CLOSED
            and isinstance(inp, ConnectionLost)
            and not (self.online or self._maybe_online)
        ):
            return []
        match inp:
            case DeviceRequest():
                return self._on_request(inp, now)
            case KeysRefreshed():
                req = self._key_waits.pop(inp.ref, None)
                return [] if req is None else self._on_request(req, now, retried=True)
            case CodeExchanged():
                return self._on_exchanged(inp, now)
            case AppendResult():
                return self._on_append(inp, now)
            case DeviceStateLoaded():
                return self._on_state(inp)
            case OwnerLoaded():
                return self._on_owner(inp, now)
            case Discovered():
                return self._on_discovered(inp)
            case DeviceResponse():
                return self._on_response(inp)
            case Notification():
                return self._on_notification(inp)
            case Tick():
                return self._on_tick(now)
            case ConnectionLost():
                return self._on_lost(inp)

    # -- device requests -------------------------------------------------------------------

    def _on_request(self, req: DeviceRequest, now: float, *, retried: bool = False) -> list[Effect]:
        try:
            payload = codecs.decode(req.payload, req.content_format or OCF_CBOR)
        except CodecError as e:
            return self._error(req, BadRequest(str(e)))
        try:
            match (req.path, req.method):
                case (ocf.ACCOUNT, "POST"):
                    return self._sign_up(req, ocf.parse_sign_up(payload), now)
                case (ocf.ACCOUNT, "DELETE"):
                    return self._sign_off(req, ocf.parse_sign_off(req.query, payload), now)
                case (ocf.SESSION, "POST"):
                    return self._session(req, ocf.parse_session(payload), now)
                case (ocf.TOKEN_REFRESH, "POST"):
                    return self._refresh(req, ocf.parse_refresh(payload), now)
                case (path, _) if path in ocf.SECURITY_PATHS:
                    return self._error(req, _method_not_allowed(req))
            if self.phase is not Phase.SIGNED_IN:
                raise Unauthorized(f"{req.path}: sign in first")
            match (req.path, req.method):
                case (ocf.RD, "POST"):
                    return self._publish(req, ocf.parse_publish(payload))
                case (ocf.RD, "DELETE"):
                    return self._unpublish(req, ocf.parse_unpublish(req.query))
                case (ocf.RES, "GET"):
                    return self._discover(req)
                case (ocf.RD | ocf.RES, _):
                    return self._error(req, _method_not_allowed(req))
            return self._error(req, _not_found(req))
        except UnknownKey as e:
            if retried or not self.config.refreshable_keys:
                return self._error(req, from_auth(e))
            ref = self._ref()
            self._key_waits[ref] = req
            return [RefreshKeys(ref, e.kid)]
        except AuthError as e:  # the validator's: translated at this seam
            return self._error(req, from_auth(e))
        except GatewayError as e:
            return self._error(req, e)

    # -- authorization ---------------------------------------------------------------------

    def _resolve_device(self, claims: Claims, di: str) -> str:
        """Device-ID resolution: the certificate's (``ocf-identity``), else the token's
        device-ID claim, else the request's ``di``. Certificate and claim must agree, and the
        request's ``di`` must name the resolved device."""
        cert = self.config.cert_device_id
        claim = claims.device_id
        if cert is not None and claim is not None and cert != claim:
            raise Unauthorized("the token's device ID is not the certificate's")
        resolved = cert or claim or di
        if di != resolved:
            source = "certificate" if cert else "token"
            raise Unauthorized(f"di {di!r} is not the device of the {source}")
        return resolved

    def _load_owner(self, check: _OwnerCheck) -> LoadOwner:
        ref = self._ref()
        self._owner_checks[ref] = check
        return LoadOwner(ref, check.device_id)

    def _on_owner(self, loaded: OwnerLoaded, now: float) -> list[Effect]:
        check = self._owner_checks.pop(loaded.ref, None)
        if check is None:
            return []
        req = check.req
        if loaded.error:
            if check.step == "sign-in":
                self.phase = Phase.CONNECTED
            return [Respond(req.rid, "5.03", b"event log unavailable", 0)]
        owner = check.claims.owner
        if loaded.owner is not None and loaded.owner != owner:
            return self._error(req, Unauthorized("the device belongs to another owner"))
        try:
            match check.step:
                case "sign-up":
                    return self._signed_up(check, loaded.registered_at, now)
                case "sign-in":
                    if loaded.owner is None:
                        raise Unauthorized("the device is not registered: sign up first")
                    return self._signed_in(req, check.claims, check.device_id, now)
                case _:
                    if loaded.owner is None:  # nothing to unregister (a retry, or never)
                        return [Respond(req.rid, "2.02"), Close("signed off")]
                    return self._unregister(req, check.device_id, owner)
        except GatewayError as e:
            return self._error(req, e)

    # -- the security paths --------------------------------------------------------------

    def _sign_up(self, req: DeviceRequest, su: ocf.SignUp, now: float) -> list[Effect]:
        cached = self.sign_up_cache.get(su.access_token)
        if cached is not None:  # devices retry sign-up: same request, same answer
            return [Respond(req.rid, cached.code, cached.payload, cached.content_format)]
        if su.auth_provider in self.config.oauth_providers:
            return self._sign_up_with_code(req, su)
        if su.auth_provider and su.access_token.count(".") != 2:
            raise Unauthorized(f"unknown auth provider {su.auth_provider!r}")
        claims = self.validator.validate(su.access_token, now)
        if claims.token_type != "access":
            raise Unauthorized("not an access token")
        return self._sign_up_claims(req, su, claims)

    def _sign_up_claims(self, req: DeviceRequest, su: ocf.SignUp, claims: Claims) -> list[Effect]:
        device_id = self._resolve_device(claims, su.device_id)
        return [self._load_owner(_OwnerCheck("sign-up", req, claims, device_id, su))]

    def _sign_up_with_code(self, req: DeviceRequest, su: ocf.SignUp) -> list[Effect]:
        """OAuth2 sign-up: the driver exchanges the code (once per connection) and validates
        the provider's token; retries wait for, or reuse, that one exchange."""
        code = su.access_token
        exchanged = self._exchanged.get(code)
        if exchanged is not None:
            return self._sign_up_claims(req, su, exchanged)
        in_flight = self._exchanging.get(code)
        if in_flight is not None:
            self._exchanges[in_flight][1].append(req)
            return []
        ref = self._ref()
        self._exchanges[ref] = (su, [req])
        self._exchanging[code] = ref
        return [ExchangeCode(ref, su.auth_provider, code)]

    def _on_exchanged(self, res: CodeExchanged, now: float) -> list[Effect]:
        waiting = self._exchanges.pop(res.ref, None)
        if waiting is None:
            return []
        su, reqs = waiting
        self._exchanging.pop(su.access_token, None)
        out: list[Effect] = []
        if res.claims is None:
            for req in reqs:
                if res.unavailable:  # the code was not used: the device may retry it
                    diag = f"auth provider {su.auth_provider!r} unavailable: {res.error}"
                    out.append(Respond(req.rid, "5.03", diag.encode("utf-8")[:512], 0))
                else:
                    err = Unauthorized(f"authorization code refused: {res.error}")
                    out += self._error(req, err)
            return out
        self._exchanged[su.access_token] = res.claims
        for req in reqs:
            try:
                if res.claims.token_type != "access":
                    raise Unauthorized("not an access token")
                out += self._sign_up_claims(req, su, res.claims)
            except GatewayError as e:
                out += self._error(req, e)
        return out

    def _signed_up(self, check: _OwnerCheck, registered_at: int, now: float) -> list[Effect]:
        """Record the registration -- conditional on the device's registrations being as read
        (``registered_at``), so of two owners signing the same free device up at once only one
        wins; the other checks the owner again and gets 4.01."""
        req, su, claims, device_id = check.req, check.sign_up, check.claims, check.device_id
        assert su is not None
        access = self.issuer.issue(
            claims.owner, now=now, ttl=self.config.access_ttl, device_id=device_id
        )
        refresh = self.issuer.issue(
            claims.owner,
            now=now,
            ttl=self.config.refresh_ttl,
            device_id=device_id,
            token_type="refresh",
        )
        expires_at = None if self.config.access_ttl is None else now + self.config.access_ttl
        reply = self._reply(
            req,
            "2.04",
            {
                "accesstoken": access,
                "refreshtoken": refresh,
                "uid": claims.owner,
                "expiresin": self._expires_in(expires_at, now),
                "redirecturi": "",
            },
        )
        ev = self._event(
            DeviceRegistered(auth_provider=su.auth_provider, gateway=self.config.gateway_id),
            device_id=device_id,
            owner=claims.owner,
        )
        append = self._append(
            [ev],
            [reply],
            [Respond(req.rid, "5.03", b"event log unavailable", 0)],
            cache=(su.access_token, reply),
        )
        self._pending[append.ref].on_conflict = check
        return [
            Append(
                append.ref,
                append.events,
                expected_last=registered_at,
                scope=registration_scope(device_id),
            )
        ]

    def _session(self, req: DeviceRequest, si: ocf.SignIn, now: float) -> list[Effect]:
        if not si.login:
            return self._sign_out(req, si)
        if self.phase in (Phase.SIGNED_IN, Phase.SIGNING_IN) and si.device_id != self.device_id:
            raise Unauthorized("already signed in as another device")
        claims = self.validator.validate(si.access_token, now)
        if claims.token_type != "access":
            raise Unauthorized("not an access token")
        if claims.owner != si.user_id:
            raise Unauthorized("uid does not match the token's owner")
        device_id = self._resolve_device(claims, si.device_id)
        if self.phase is Phase.SIGNED_IN:  # a new sign-in on a live session (after refresh)
            if claims.owner != self.owner:
                raise Unauthorized("the token is another owner's")
            self.expires_at = claims.expires_at
            return [
                self._reply(req, "2.04", {"expiresin": self._expires_in(claims.expires_at, now)})
            ]
        self.phase = Phase.SIGNING_IN
        self.device_id = device_id
        return [self._load_owner(_OwnerCheck("sign-in", req, claims, device_id))]

    def _signed_in(
        self, req: DeviceRequest, claims: Claims, device_id: str, now: float
    ) -> list[Effect]:
        self.device_id = device_id
        self.owner = claims.owner
        self.expires_at = claims.expires_at
        reply = self._reply(req, "2.04", {"expiresin": self._expires_in(claims.expires_at, now)})
        online = self._event(
            DeviceOnline(
                gateway=self.config.gateway_id,
                connection_id=self.config.connection_id,
                remote_address=self.config.remote_address,
                protocol=self.config.protocol,
            )
        )
        syncing = self._event(
            TwinSyncStateChanged(state="syncing", connection_id=self.config.connection_id)
        )
        fail: list[Effect] = [Respond(req.rid, "5.03", b"event log unavailable", 0)]
        self._maybe_online = True
        return [self._append([online, syncing], [reply], fail, then="signed-in")]

    def _sign_out(self, req: DeviceRequest, si: ocf.SignIn) -> list[Effect]:
        if self.phase is not Phase.SIGNED_IN or si.device_id != self.device_id:
            return [self._reply(req, "2.04", {})]
        out = self._go_offline("sign-out")
        pending_reply = self._reply(req, "2.04", {})
        self.phase = Phase.CONNECTED
        # reply after the offline event is in the log
        append = out[-1]
        assert isinstance(append, Append)
        self._pending[append.ref].on_ok.append(pending_reply)
        self._pending[append.ref].on_fail.append(pending_reply)
        return out

    def _go_offline(self, reason: str) -> list[Effect]:
        out: list[Effect] = [CancelObservation(ref) for ref in sorted(self._by_ref)]
        self._by_ref.clear()
        self._early.clear()
        self._resources.clear()
        self._batch_ref = self._discovery_ref = None
        self._sync_started = False
        self.sync_state = "out_of_sync"
        self.online = False
        self._maybe_online = False
        assert self.device_id is not None
        out.append(SignedOut(self.device_id))
        ev = self._event(
            DeviceOffline(
                gateway=self.config.gateway_id,
                connection_id=self.config.connection_id,
                remote_address=self.config.remote_address,
                reason=reason,
            )
        )
        out.append(self._append([ev], [], [], critical=False))
        return out

    def _refresh(self, req: DeviceRequest, rf: ocf.Refresh, now: float) -> list[Effect]:
        claims = self.validator.validate(rf.refresh_token, now)
        if claims.token_type != "refresh":
            raise Unauthorized("not a refresh token")
        if rf.user_id and rf.user_id != claims.owner:
            raise Unauthorized("uid does not match the refresh token's owner")
        device_id = self._resolve_device(claims, rf.device_id)
        access = self.issuer.issue(
            claims.owner, now=now, ttl=self.config.access_ttl, device_id=device_id
        )
        refresh = self.issuer.issue(
            claims.owner,
            now=now,
            ttl=self.config.refresh_ttl,
            device_id=device_id,
            token_type="refresh",
        )
        expires_at = None if self.config.access_ttl is None else now + self.config.access_ttl
        if (
            self.phase is Phase.SIGNED_IN
            and device_id == self.device_id
            and claims.owner == self.owner
        ):
            self.expires_at = expires_at
        return [
            self._reply(
                req,
                "2.04",
                {
                    "accesstoken": access,
                    "refreshtoken": refresh,
                    "uid": claims.owner,
                    "expiresin": self._expires_in(expires_at, now),
                },
            )
        ]

    def _sign_off(self, req: DeviceRequest, so: ocf.SignOff, now: float) -> list[Effect]:
        current = self.phase is Phase.SIGNED_IN and so.device_id == self.device_id
        if so.access_token:
            claims = self.validator.validate(so.access_token, now)
            if claims.token_type != "access":
                raise Unauthorized("not an access token")
            if so.user_id and so.user_id != claims.owner:
                raise Unauthorized("uid does not match the token's owner")
            device_id = self._resolve_device(claims, so.device_id)
            if not (current and claims.owner == self.owner):
                return [self._load_owner(_OwnerCheck("sign-off", req, claims, device_id))]
            return self._unregister(req, device_id, claims.owner)
        if current:  # signed in on this connection: its sign-in was authorized
            assert self.owner is not None
            return self._unregister(req, so.device_id, self.owner)
        raise Unauthorized("sign-off needs an access token or a signed-in session")

    def _unregister(self, req: DeviceRequest, device_id: str, owner: str) -> list[Effect]:
        out: list[Effect] = []
        if self.phase is Phase.SIGNED_IN and device_id == self.device_id:
            out += self._go_offline("sign-off")
            self.phase = Phase.CONNECTED
        ev = self._event(DeviceUnregistered(reason="sign-off"), device_id=device_id, owner=owner)
        done: list[Effect] = [Respond(req.rid, "2.02"), Close("signed off")]
        out.append(
            self._append([ev], done, [Respond(req.rid, "5.03", b"event log unavailable", 0)])
        )
        return out

    def _publish(self, req: DeviceRequest, pub: ocf.Publish) -> list[Effect]:
        if pub.device_id != self.device_id:
            raise Unauthorized("publish for another device")
        if len(self._published) + len(pub.links) > self.config.max_links:
            raise BadRequest("too many published links")
        links: list[ResourceLink] = []
        for link in pub.links:
            ins = link.ins
            if ins is None:
                prev = self._published.get(link.href)
                ins = prev.ins if prev is not None and prev.ins is not None else self._next_ins
            self._next_ins = max(self._next_ins, ins + 1)
            links.append(_with_ins(link, ins))
        reply = self._reply(
            req,
            "2.04",
            {
                "di": pub.device_id,
                "links": [ocf.link_reply(link, pub.device_id) for link in links],
                "ttl": pub.ttl,
            },
        )
        ev = self._event(ResourceLinksPublished(links=tuple(links), ttl=pub.ttl))
        for link in links:
            self._published[link.href] = link
        follow = self._track_links(links)
        if self._sync_started and self._discovery_ref is None:
            follow.insert(0, ResourcesKnown(tuple(link.href for link in links)))
        return [
            self._append(
                [ev], [reply, *follow], [Respond(req.rid, "5.03", b"event log unavailable", 0)]
            )
        ]

    def _unpublish(self, req: DeviceRequest, up: ocf.Unpublish) -> list[Effect]:
        if up.device_id != self.device_id:
            raise Unauthorized("unpublish for another device")
        wanted = set(up.instance_ids)
        hrefs = tuple(h for h, link in self._published.items() if not wanted or link.ins in wanted)
        out: list[Effect] = []
        for h in hrefs:
            self._published.pop(h, None)
            res = self._resources.pop(h, None)
            if res is not None and res.ref is not None:
                self._by_ref.pop(res.ref, None)
                self._early.pop(res.ref, None)
                out.append(CancelObservation(res.ref))
        ev = self._event(ResourceLinksUnpublished(hrefs=hrefs, instance_ids=up.instance_ids))
        out.append(
            self._append(
                [ev],
                [Respond(req.rid, "2.02")],
                [Respond(req.rid, "5.03", b"event log unavailable", 0)],
            )
        )
        return out

    def _discover(self, req: DeviceRequest) -> list[Effect]:
        """Cloud-side discovery of the owner's devices: the driver reads the links from the log."""
        assert self.owner is not None
        params = ocf.query_params(req.query)
        ref = self._ref()
        self._discoveries[ref] = req
        return [Discover(ref, self.owner, tuple(params.get("di", [])), tuple(params.get("rt", [])))]

    def _on_discovered(self, res: Discovered) -> list[Effect]:
        req = self._discoveries.pop(res.ref, None)
        if req is None:
            return []
        if res.links is None:
            return [Respond(req.rid, "5.03", b"event log unavailable", 0)]
        params = ocf.query_params(req.query)
        rts = set(params.get("rt", []))
        body = []
        for device_id, links in sorted(res.links.items()):
            chosen = [
                ocf.link_reply(link, device_id)
                for link in links
                if not rts or rts.intersection(link.rt)
            ]
            if chosen:
                body.append({"di": device_id, "links": chosen})
        return [self._reply(req, "2.05", body)]

    # -- log results -------------------------------------------------------------------------

    def _on_append(self, res: AppendResult, now: float) -> list[Effect]:
        pending = self._pending.pop(res.ref, None)
        if pending is None:
            return []
        if not res.ok:
            check = pending.on_conflict
            if res.conflict and check is not None:
                if check.attempt < MAX_REGISTRATION_ATTEMPTS:
                    # another registration of the device got in between: who owns it now?
                    return [self._load_owner(replace(check, attempt=check.attempt + 1))]
                diagnostic = b"concurrent registrations of the device: retry"
                return [Respond(check.req.rid, "5.03", diagnostic, 0)]
            out = list(pending.on_fail)
            if pending.then == "signed-in":
                self.phase = Phase.CONNECTED
            return out
        out = list(pending.on_ok)
        if pending.cache is not None:
            key, answer = pending.cache
            self.sign_up_cache[key] = answer
        if pending.then == "signed-in" and self.phase is Phase.SIGNING_IN:
            self.phase = Phase.SIGNED_IN
            self.online = True
            self.sync_state = "syncing"
            assert self.device_id is not None
            assert self.owner is not None
            self._state_ref = self._ref()
            out += [
                SignedIn(self.device_id, self.owner),
                LoadDeviceState(self._state_ref, self.device_id, self.owner),
            ]
        return out

    def _on_state(self, loaded: DeviceStateLoaded) -> list[Effect]:
        if loaded.ref != self._state_ref or self.phase is not Phase.SIGNED_IN:
            return []
        state = loaded.state or DeviceState()
        for link in state.links:
            self._published.setdefault(link.href, link)
            if link.ins is not None:
                self._next_ins = max(self._next_ins, link.ins + 1)
        self._last.update(state.last_content)
        self._discovery_ref = self._ref()
        self._sync_started = True
        return [SendRequest(self._discovery_ref, "GET", ocf.RES)]

    # -- synchronisation ----------------------------------------------------------------------

    def _on_notification(self, n: Notification) -> list[Effect]:
        early = self._early.get(n.ref)
        if early is None:
            return self._on_report(n.ref, n.reply)
        # The first response came before it on the wire and is on its way: it goes first.
        early.append(n.reply)
        if len(early) > MAX_EARLY_NOTIFICATIONS:
            del early[0]
        return []

    def _on_response(self, resp: DeviceResponse) -> list[Effect]:
        early = self._early.pop(resp.ref, ())
        out = self._on_first(resp)
        for reply in early:
            out += self._on_report(resp.ref, reply)
        return out

    def _on_first(self, resp: DeviceResponse) -> list[Effect]:
        if resp.ref == self._discovery_ref:
            return self._on_discovery(resp)
        if resp.ref not in self._by_ref:
            return []
        href = self._by_ref[resp.ref]
        res = self._resources.get(href)
        if res is not None and res.superseded and resp.ref != self._batch_ref:
            # A one-shot read answered after the batch observation reported the resource: the
            # device sent that report before or after this answer, so the answer is not newer.
            self._by_ref.pop(resp.ref, None)
            res.ref, res.superseded, res.reported = None, False, True
            return self._maybe_in_sync()
        if resp.reply is None:
            return self._failed(resp.ref, href, resp.error or "no answer")
        if resp.ref == self._batch_ref:
            return self._on_batch_first(resp.ref, resp.reply)
        out = self._on_report(resp.ref, resp.reply)
        if res is not None and res.link.observable and resp.reply.observe is None:
            self._by_ref.pop(resp.ref, None)  # the device answered without observing
            res.ref = None
        elif res is not None and not res.link.observable:
            self._by_ref.pop(resp.ref, None)
            res.ref = None
        return out

    def _on_discovery(self, resp: DeviceResponse) -> list[Effect]:
        self._discovery_ref = None
        assert self.device_id is not None
        discovered: tuple[ResourceLink, ...] = ()
        if resp.reply is not None and resp.reply.code.startswith("2."):
            try:
                value = codecs.decode(resp.reply.payload, resp.reply.content_format or OCF_CBOR)
                discovered = ocf.parse_discovery(value, self.device_id)
            except (CodecError, BadRequest):
                discovered = ()
        batch = self.config.batch_observe and any(
            link.href == ocf.RES and ocf.BATCH_INTERFACE in link.interfaces for link in discovered
        )
        links = {link.href: link for link in self._published.values()}
        for link in discovered:
            links.setdefault(link.href, link)
        for href, link in links.items():
            if ocf.is_synced(href, published=href in self._published):
                self._resources.setdefault(href, _Resource(link))
        known: list[Effect] = [ResourcesKnown(tuple(sorted(links)))]
        if batch and self._resources:
            self._batch_ref = self._ref()
            self._by_ref[self._batch_ref] = ""
            self._early[self._batch_ref] = []
            return [
                *known,
                SendRequest(
                    self._batch_ref, "GET", ocf.RES, ("if=" + ocf.BATCH_INTERFACE,), observe=True
                ),
            ]
        return known + self._observe_each() + self._maybe_in_sync()

    def _observe_each(self) -> list[Effect]:
        """Observe every observable resource not observed yet; GET the others once."""
        out: list[Effect] = []
        for href, res in self._resources.items():
            if res.ref is not None or (res.reported and not res.link.observable):
                continue
            res.ref = self._ref()
            self._by_ref[res.ref] = href
            if res.link.observable:
                self._early[res.ref] = []
            out.append(SendRequest(res.ref, "GET", href, observe=res.link.observable))
        return out

    def _track_links(self, links: list[ResourceLink]) -> list[Effect]:
        if not self._sync_started or self._discovery_ref is not None:
            return []  # the discovery to come merges the published links
        added = [
            link.href
            for link in links
            if ocf.is_syncable(link.href) and link.href not in self._resources
        ]
        for link in links:
            if link.href in added:
                self._resources[link.href] = _Resource(link)
        if not added:
            return []
        out: list[Effect] = []
        if self.sync_state == "in_sync":
            self.sync_state = "syncing"
            out.append(
                self._append(
                    [
                        self._event(
                            TwinSyncStateChanged(
                                state="syncing", connection_id=self.config.connection_id
                            )
                        )
                    ],
                    [],
                    [],
                    critical=False,
                )
            )
        if self._batch_ref is None:
            return out + self._observe_each()
        # the batch observation reports later changes; read the new ones once now
        for href in added:
            res = self._resources[href]
            res.ref = self._ref()
            self._by_ref[res.ref] = href
            out.append(SendRequest(res.ref, "GET", href))
        return out

    def _on_batch_first(self, ref: int, reply: Reply) -> list[Effect]:
        if reply.code == "4.00" and reply.payload in (b"", b"\x80", b"[]"):
            reply = Reply("2.05", b"\x80", OCF_CBOR, observe=reply.observe)  # empty collection
        if not reply.code.startswith("2."):
            return self._batch_fallback(ref)
        out = self._on_report(ref, reply)
        if reply.observe is None:  # answered without observing: observe one by one
            out += self._batch_fallback(ref)
        return out

    def _batch_fallback(self, ref: int) -> list[Effect]:
        self._by_ref.pop(ref, None)
        self._early.pop(ref, None)
        self._batch_ref = None
        out: list[Effect] = [CancelObservation(ref)]
        return out + self._observe_each() + self._maybe_in_sync()

    def _failed(self, ref: int, href: str, error: str) -> list[Effect]:
        self._by_ref.pop(ref, None)
        if href == "":
            return self._batch_fallback(ref)
        res = self._resources.get(href)
        if res is not None:
            res.ref = None
        return self._report(href, Reply("5.04"), error=error) + self._maybe_in_sync()

    def _on_report(self, ref: int, reply: Reply) -> list[Effect]:
        href = self._by_ref.get(ref)
        if href is None or self.phase is not Phase.SIGNED_IN:
            return []
        if href == "":
            assert self.device_id is not None
            try:
                value = codecs.decode(reply.payload, reply.content_format or OCF_CBOR)
                items = ocf.parse_batch(value, self.device_id)
            except (CodecError, BadRequest):
                return []
            out: list[Effect] = []
            for item_href, rep in items:
                res = self._resources.get(item_href)
                if res is None:
                    continue  # not synced (see ocf.is_synced): the twin holds what is published
                if res.ref is not None and reply.observe is not None:
                    res.superseded = True  # reported by the established batch observation
                content, lossy = codecs.to_json_value(ocf.strip_baseline(rep))
                raw = codecs.encode(rep, OCF_CBOR) if lossy else None
                out += self._report_value(item_href, reply, content, OCF_CBOR, raw)
            return out + self._maybe_in_sync()
        return self._report(href, reply) + self._maybe_in_sync()

    def _report(self, href: str, reply: Reply, error: str = "") -> list[Effect]:
        cf = reply.content_format
        try:
            value = codecs.decode(reply.payload, cf if cf is not None else OCF_CBOR)
            raw_needed = False
        except CodecError:
            value, raw_needed = None, True
        content, lossy = codecs.to_json_value(value)
        raw = reply.payload if (raw_needed or lossy) else None
        return self._report_value(href, reply, content, cf, raw)

    def _report_value(
        self, href: str, reply: Reply, content: Any, cf: int | None, raw: bytes | None
    ) -> list[Effect]:
        res = self._resources.get(href)
        if res is not None:
            res.reported = True
        key = (cf, content) if reply.code.startswith("2.") else (None, ("status", reply.code))
        if self._last.get(href) == key:
            return []  # identical to what the log holds already
        self._last[href] = key
        ev = self._event(
            ResourceChanged(
                href=href,
                content=content,
                content_format=cf,
                raw=base64.b64encode(raw).decode("ascii") if raw is not None else None,
                status=reply.code,
                etag=reply.etag.hex() if reply.etag else None,
                observe_seq=reply.observe,
                connection_id=self.config.connection_id,
            )
        )
        # Not critical: no device reply waits for it. The writer keeps it (bounded) until the
        # log is back; only a give-up (drain timeout, refusal) fails it and closes.
        return [self._append([ev], [], [Close("event log unavailable")], critical=False)]

    def _maybe_in_sync(self) -> list[Effect]:
        if self.sync_state != "syncing" or self._discovery_ref is not None:
            return []
        if any(not r.reported for r in self._resources.values()):
            return []
        self.sync_state = "in_sync"
        ev = self._event(
            TwinSyncStateChanged(state="in_sync", connection_id=self.config.connection_id)
        )
        return [self._append([ev], [], [Close("event log unavailable")], critical=False)]

    # -- time and the end -------------------------------------------------------------------

    def _on_tick(self, now: float) -> list[Effect]:
        if self.phase is Phase.SIGNED_IN and self.expires_at is not None and now > self.expires_at:
            return self._end("token expired")
        cert_end = self.config.cert_expires_at
        if cert_end is not None and now > cert_end:
            return self._end("client certificate expired")
        return []

    def _end(self, reason: str) -> list[Effect]:
        out = self._go_offline(reason) if self.online or self._maybe_online else []
        self.phase = Phase.CLOSED
        return [*out, Close(reason)]

    def _on_lost(self, lost: ConnectionLost) -> list[Effect]:
        out = self._go_offline(lost.reason) if self.online or self._maybe_online else []
        self.phase = Phase.CLOSED
        return out


def _with_ins(link: ResourceLink, ins: int) -> ResourceLink:
    return msgspec.structs.replace(link, ins=ins)


def _method_not_allowed(req: DeviceRequest) -> GatewayError:
    return MethodNotAllowed(f"{req.method} not allowed on {req.path}")


def _not_found(req: DeviceRequest) -> GatewayError:
    return NotFound(f"no resource {req.path}")

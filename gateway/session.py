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

Layers. :class:`Session` is thin: it routes each input to one of three layers, each a class
with its own state over a small shared core (:class:`gateway.session_core.SessionCore`: who is
signed in, the phase, the refs, the appends waiting for the log):

* :class:`gateway.session_account.Account` -- sign-up, sign-in, refresh, sign-out, sign-off, the
  online / offline events, expiry and the connection's end;
* :class:`gateway.session_links.Links` -- publish, unpublish, cloud-side discovery;
* :class:`gateway.session_sync.Sync` -- the device's recorded state, discovery, observations,
  reports and ``in_sync``.

The inputs and effects are defined in :mod:`gateway.session_io` and re-exported here.
"""

from __future__ import annotations

from auth.errors import AuthError, UnknownKey
from auth.tokens import TokenIssuer, TokenValidator
from gateway import ocf
from gateway.errors import (
    BadRequest,
    GatewayError,
    MethodNotAllowed,
    NotFound,
    Unauthorized,
    from_auth,
)
from gateway.session_account import Account
from gateway.session_core import SessionCore
from gateway.session_io import (
    MAX_REGISTRATION_ATTEMPTS,
    OCF_CBOR,
    REPLY_FORMATS,
    Append,
    AppendResult,
    CancelObservation,
    Close,
    CodeExchanged,
    ConnectionLost,
    DeviceRequest,
    DeviceResponse,
    DeviceState,
    DeviceStateLoaded,
    Discover,
    Discovered,
    Effect,
    ExchangeCode,
    Input,
    KeysRefreshed,
    LoadDeviceState,
    LoadOwner,
    Notification,
    OwnerLoaded,
    Phase,
    RefreshKeys,
    Reply,
    ResourcesKnown,
    Respond,
    SendRequest,
    SessionConfig,
    SignedIn,
    SignedOut,
    Step,
    Tick,
    registration_scope,
)
from gateway.session_links import Links
from gateway.session_sync import MAX_EARLY_NOTIFICATIONS, Sync
from proto import codecs
from proto.errors import CodecError
from proto.events import ResourceLink, SyncState

__all__ = [
    "MAX_EARLY_NOTIFICATIONS",
    "MAX_REGISTRATION_ATTEMPTS",
    "OCF_CBOR",
    "REPLY_FORMATS",
    "Append",
    "AppendResult",
    "CancelObservation",
    "Close",
    "CodeExchanged",
    "ConnectionLost",
    "DeviceRequest",
    "DeviceResponse",
    "DeviceState",
    "DeviceStateLoaded",
    "Discover",
    "Discovered",
    "Effect",
    "ExchangeCode",
    "Input",
    "KeysRefreshed",
    "LoadDeviceState",
    "LoadOwner",
    "Notification",
    "OwnerLoaded",
    "Phase",
    "RefreshKeys",
    "Reply",
    "ResourcesKnown",
    "Respond",
    "SendRequest",
    "Session",
    "SessionConfig",
    "SignedIn",
    "SignedOut",
    "Step",
    "Tick",
    "registration_scope",
]


class Session:
    """One device connection (see module doc): the layers, and the routing of inputs to them."""

    def __init__(
        self, config: SessionConfig, validator: TokenValidator, issuer: TokenIssuer
    ) -> None:
        self.core = SessionCore(config, validator, issuer)
        published: dict[str, ResourceLink] = {}  # the links layer's, read by the sync layer
        self.sync = Sync(self.core, published)
        self.links = Links(self.core, self.sync, published)
        self.account = Account(self.core, self.sync)

    # -- what the driver and tests read -------------------------------------------------------

    @property
    def config(self) -> SessionConfig:
        return self.core.config

    @config.setter
    def config(self, config: SessionConfig) -> None:
        self.core.config = config

    @property
    def validator(self) -> TokenValidator:
        return self.core.validator

    @property
    def issuer(self) -> TokenIssuer:
        return self.core.issuer

    @property
    def phase(self) -> Phase:
        return self.core.phase

    @property
    def device_id(self) -> str | None:
        return self.core.device_id

    @property
    def owner(self) -> str | None:
        return self.core.owner

    @property
    def expires_at(self) -> float | None:
        return self.account.expires_at

    @property
    def online(self) -> bool:
        return self.account.online

    @property
    def sign_up_cache(self) -> dict[str, Respond]:
        return self.account.sign_up_cache

    @property
    def sync_state(self) -> SyncState:
        return self.sync.sync_state

    # -- entry point -----------------------------------------------------------------------

    def handle(self, inp: Input, now: float) -> list[Effect]:
        phase = self.core.phase
        if phase is Phase.CLOSED and not isinstance(inp, ConnectionLost | AppendResult):
            return []
        if (
            phase is Phase.CLOSED
            and isinstance(inp, ConnectionLost)
            and not (self.account.online or self.account.maybe_online)
        ):
            return []
        match inp:
            case DeviceRequest():
                return self._on_request(inp, now)
            case KeysRefreshed():
                req = self.account.keys_refreshed(inp.ref)
                return [] if req is None else self._on_request(req, now, retried=True)
            case CodeExchanged():
                return self.account.on_exchanged(inp, now)
            case AppendResult():
                return self.account.on_append(inp, now)
            case DeviceStateLoaded():
                if not self.sync.expects(inp):
                    return []
                state = inp.state or DeviceState()
                self.links.load(state.links)
                return self.sync.on_state(state)
            case OwnerLoaded():
                return self.account.on_owner(inp, now)
            case Discovered():
                return self.links.on_discovered(inp)
            case DeviceResponse():
                return self.sync.on_response(inp)
            case Notification():
                return self.sync.on_notification(inp)
            case Tick():
                return self.account.on_tick(now)
            case ConnectionLost():
                return self.account.on_lost(inp)

    # -- device requests -------------------------------------------------------------------

    def _on_request(self, req: DeviceRequest, now: float, *, retried: bool = False) -> list[Effect]:
        try:
            payload = codecs.decode(req.payload, req.content_format or OCF_CBOR)
        except CodecError as e:
            return self.core.error(req, BadRequest(str(e)))
        try:
            match (req.path, req.method):
                case (ocf.ACCOUNT, "POST"):
                    return self.account.sign_up(req, ocf.parse_sign_up(payload), now)
                case (ocf.ACCOUNT, "DELETE"):
                    return self.account.sign_off(req, ocf.parse_sign_off(req.query, payload), now)
                case (ocf.SESSION, "POST"):
                    return self.account.session(req, ocf.parse_session(payload), now)
                case (ocf.TOKEN_REFRESH, "POST"):
                    return self.account.refresh(req, ocf.parse_refresh(payload), now)
                case (path, _) if path in ocf.SECURITY_PATHS:
                    return self.core.error(req, _method_not_allowed(req))
            if self.core.phase is not Phase.SIGNED_IN:
                raise Unauthorized(f"{req.path}: sign in first")
            match (req.path, req.method):
                case (ocf.RD, "POST"):
                    return self.links.publish(req, ocf.parse_publish(payload))
                case (ocf.RD, "DELETE"):
                    return self.links.unpublish(req, ocf.parse_unpublish(req.query))
                case (ocf.RES, "GET"):
                    return self.links.discover(req)
                case (ocf.RD | ocf.RES, _):
                    return self.core.error(req, _method_not_allowed(req))
            return self.core.error(req, _not_found(req))
        except UnknownKey as e:
            if retried or not self.core.config.refreshable_keys:
                return self.core.error(req, from_auth(e))
            return self.account.wait_for_keys(req, e.kid)
        except AuthError as e:  # the validator's: translated at this seam
            return self.core.error(req, from_auth(e))
        except GatewayError as e:
            return self.core.error(req, e)


def _method_not_allowed(req: DeviceRequest) -> GatewayError:
    return MethodNotAllowed(f"{req.method} not allowed on {req.path}")


def _not_found(req: DeviceRequest) -> GatewayError:
    return NotFound(f"no resource {req.path}")

"""The account layer of a device session (:mod:`gateway.session`): sign-up (with a token, or
an OAuth2 authorization code the driver exchanges), sign-in, token refresh, sign-out and
sign-off, the device's online and offline events, and the session's end (token or certificate
expiry, the connection lost).

:class:`Account` owns the authorization state -- the owner checks waiting for the log, the key
refreshes and code exchanges in flight, the sign-up answers to repeat to retries, whether the
log may say the device is online -- and, for the appends a device reply waits for, the follow-up
step (:class:`gateway.session_io.Step`) an acknowledgement leads to. A sign-in acknowledged
starts the sync layer; going offline stops it.
"""

from __future__ import annotations

from dataclasses import replace

from auth.tokens import Claims
from gateway import ocf
from gateway.errors import GatewayError, Unauthorized
from gateway.session_core import OwnerCheck, SessionCore, expires_in
from gateway.session_io import (
    MAX_REGISTRATION_ATTEMPTS,
    Append,
    AppendResult,
    Close,
    CodeExchanged,
    ConnectionLost,
    DeviceRequest,
    Effect,
    ExchangeCode,
    LoadOwner,
    OwnerLoaded,
    Phase,
    RefreshKeys,
    Respond,
    SignedIn,
    SignedOut,
    Step,
    registration_scope,
)
from gateway.session_sync import Sync
from proto.events import (
    DeviceOffline,
    DeviceOnline,
    DeviceRegistered,
    DeviceUnregistered,
    TwinSyncStateChanged,
)


class Account:
    """Sign-up / sign-in / refresh / sign-out / sign-off of one connection (see module doc)."""

    def __init__(self, core: SessionCore, sync: Sync) -> None:
        self.core = core
        self.sync = sync
        self.expires_at: float | None = None
        self.sign_up_cache: dict[str, Respond] = {}
        self.online = False  # the log says this connection's device is online
        # This connection's online event may be in the log with no offline after it: its sign-in
        # append is in flight, or failed with an unknown outcome (an unavailable log may store
        # it still). The connection's end then records an offline too (which the twin ignores
        # when the online never made it: it names this connection).
        self.maybe_online = False
        self._owner_checks: dict[int, OwnerCheck] = {}
        self._key_waits: dict[int, DeviceRequest] = {}  # RefreshKeys ref -> the request
        self._exchanges: dict[int, tuple[ocf.SignUp, list[DeviceRequest]]] = {}
        self._exchanging: dict[str, int] = {}  # code -> ExchangeCode ref in flight
        # A code is single-use at the provider: once exchanged, its claims answer this
        # connection's retries (the sign-up answer cache covers those recorded in the log).
        self._exchanged: dict[str, Claims] = {}

    def wait_for_keys(self, req: DeviceRequest, kid: str | None) -> list[Effect]:
        """``req`` named an unknown signing key: refresh the keys, then handle it again."""
        ref = self.core.ref()
        self._key_waits[ref] = req
        return [RefreshKeys(ref, kid)]

    def keys_refreshed(self, ref: int) -> DeviceRequest | None:
        """The request waiting for the key refresh ``ref`` (None: none)."""
        return self._key_waits.pop(ref, None)

    def _resolve_device(self, claims: Claims, di: str) -> str:
        """Device-ID resolution: the certificate's (``ocf-identity``), else the token's
        device-ID claim, else the request's ``di``. Certificate and claim must agree, and the
        request's ``di`` must name the resolved device."""
        cert = self.core.config.cert_device_id
        claim = claims.device_id
        if cert is not None and claim is not None and cert != claim:
            raise Unauthorized("the token's device ID is not the certificate's")
        resolved = cert or claim or di
        if di != resolved:
            source = "certificate" if cert else "token"
            raise Unauthorized(f"di {di!r} is not the device of the {source}")
        return resolved

    def _load_owner(self, check: OwnerCheck) -> LoadOwner:
        ref = self.core.ref()
        self._owner_checks[ref] = check
        return LoadOwner(ref, check.device_id)

    def on_owner(self, loaded: OwnerLoaded, now: float) -> list[Effect]:
        check = self._owner_checks.pop(loaded.ref, None)
        if check is None:
            return []
        req = check.req
        if loaded.error:
            if check.step is Step.SIGN_IN:
                self.core.phase = Phase.CONNECTED
            return [Respond(req.rid, "5.03", b"event log unavailable", 0)]
        owner = check.claims.owner
        if loaded.owner is not None and loaded.owner != owner:
            return self.core.error(req, Unauthorized("the device belongs to another owner"))
        try:
            match check.step:
                case Step.SIGN_UP:
                    return self._signed_up(check, loaded.registered_at, now)
                case Step.SIGN_IN:
                    if loaded.owner is None:
                        raise Unauthorized("the device is not registered: sign up first")
                    return self._signed_in(req, check.claims, check.device_id, now)
                case _:
                    if loaded.owner is None:  # nothing to unregister (a retry, or never)
                        return [Respond(req.rid, "2.02"), Close("signed off")]
                    return self._unregister(req, check.device_id, owner)
        except GatewayError as e:
            return self.core.error(req, e)

    # -- the security paths --------------------------------------------------------------

    def sign_up(self, req: DeviceRequest, su: ocf.SignUp, now: float) -> list[Effect]:
        cached = self.sign_up_cache.get(su.access_token)
        if cached is not None:  # devices retry sign-up: same request, same answer
            return [Respond(req.rid, cached.code, cached.payload, cached.content_format)]
        if su.auth_provider in self.core.config.oauth_providers:
            return self._sign_up_with_code(req, su)
        if su.auth_provider and su.access_token.count(".") != 2:
            raise Unauthorized(f"unknown auth provider {su.auth_provider!r}")
        claims = self.core.validator.validate(su.access_token, now)
        if claims.token_type != "access":
            raise Unauthorized("not an access token")
        return self._sign_up_claims(req, su, claims)

    def _sign_up_claims(self, req: DeviceRequest, su: ocf.SignUp, claims: Claims) -> list[Effect]:
        device_id = self._resolve_device(claims, su.device_id)
        return [self._load_owner(OwnerCheck(Step.SIGN_UP, req, claims, device_id, su))]

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
        ref = self.core.ref()
        self._exchanges[ref] = (su, [req])
        self._exchanging[code] = ref
        return [ExchangeCode(ref, su.auth_provider, code)]

    def on_exchanged(self, res: CodeExchanged, now: float) -> list[Effect]:
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
                    out += self.core.error(req, err)
            return out
        self._exchanged[su.access_token] = res.claims
        for req in reqs:
            try:
                if res.claims.token_type != "access":
                    raise Unauthorized("not an access token")
                out += self._sign_up_claims(req, su, res.claims)
            except GatewayError as e:
                out += self.core.error(req, e)
        return out

    def _tokens(self, owner: str, device_id: str, now: float) -> tuple[str, str, float | None]:
        """A device's new access and refresh tokens, and when the access token expires."""
        config = self.core.config
        access = self.core.issuer.issue(owner, now=now, ttl=config.access_ttl, device_id=device_id)
        refresh = self.core.issuer.issue(
            owner, now=now, ttl=config.refresh_ttl, device_id=device_id, token_type="refresh"
        )
        return access, refresh, None if config.access_ttl is None else now + config.access_ttl

    def _signed_up(self, check: OwnerCheck, registered_at: int, now: float) -> list[Effect]:
        """Record the registration -- conditional on the device's registrations being as read
        (``registered_at``), so of two owners signing the same free device up at once only one
        wins; the other checks the owner again and gets 4.01."""
        req, su, claims, device_id = check.req, check.sign_up, check.claims, check.device_id
        assert su is not None
        access, refresh, expires_at = self._tokens(claims.owner, device_id, now)
        reply = self.core.reply(
            req,
            "2.04",
            {
                "accesstoken": access,
                "refreshtoken": refresh,
                "uid": claims.owner,
                "expiresin": expires_in(expires_at, now),
                "redirecturi": "",
            },
        )
        ev = self.core.event(
            DeviceRegistered(auth_provider=su.auth_provider, gateway=self.core.config.gateway_id),
            device_id=device_id,
            owner=claims.owner,
        )
        append = self.core.append(
            [ev],
            [reply],
            [Respond(req.rid, "5.03", b"event log unavailable", 0)],
            cache=(su.access_token, reply),
        )
        self.core.pending[append.ref].on_conflict = check
        return [
            Append(
                append.ref,
                append.events,
                expected_last=registered_at,
                scope=registration_scope(device_id),
            )
        ]

    def session(self, req: DeviceRequest, si: ocf.SignIn, now: float) -> list[Effect]:
        if not si.login:
            return self._sign_out(req, si)
        if (
            self.core.phase in (Phase.SIGNED_IN, Phase.SIGNING_IN)
            and si.device_id != self.core.device_id
        ):
            raise Unauthorized("already signed in as another device")
        claims = self.core.validator.validate(si.access_token, now)
        if claims.token_type != "access":
            raise Unauthorized("not an access token")
        if claims.owner != si.user_id:
            raise Unauthorized("uid does not match the token's owner")
        device_id = self._resolve_device(claims, si.device_id)
        if self.core.phase is Phase.SIGNED_IN:  # a new sign-in on a live session (after refresh)
            if claims.owner != self.core.owner:
                raise Unauthorized("the token is another owner's")
            self.expires_at = claims.expires_at
            return [self.core.reply(req, "2.04", {"expiresin": expires_in(claims.expires_at, now)})]
        self.core.phase = Phase.SIGNING_IN
        self.core.device_id = device_id
        return [self._load_owner(OwnerCheck(Step.SIGN_IN, req, claims, device_id))]

    def _signed_in(
        self, req: DeviceRequest, claims: Claims, device_id: str, now: float
    ) -> list[Effect]:
        self.core.device_id = device_id
        self.core.owner = claims.owner
        self.expires_at = claims.expires_at
        reply = self.core.reply(req, "2.04", {"expiresin": expires_in(claims.expires_at, now)})
        online = self.core.event(
            DeviceOnline(
                gateway=self.core.config.gateway_id,
                connection_id=self.core.config.connection_id,
                remote_address=self.core.config.remote_address,
                protocol=self.core.config.protocol,
            )
        )
        syncing = self.core.event(
            TwinSyncStateChanged(state="syncing", connection_id=self.core.config.connection_id)
        )
        fail: list[Effect] = [Respond(req.rid, "5.03", b"event log unavailable", 0)]
        self.maybe_online = True
        return [self.core.append([online, syncing], [reply], fail, then=Step.SIGNED_IN)]

    def _sign_out(self, req: DeviceRequest, si: ocf.SignIn) -> list[Effect]:
        if self.core.phase is not Phase.SIGNED_IN or si.device_id != self.core.device_id:
            return [self.core.reply(req, "2.04", {})]
        out = self._go_offline("sign-out")
        pending_reply = self.core.reply(req, "2.04", {})
        self.core.phase = Phase.CONNECTED
        # reply after the offline event is in the log
        append = out[-1]
        assert isinstance(append, Append)
        self.core.pending[append.ref].on_ok.append(pending_reply)
        self.core.pending[append.ref].on_fail.append(pending_reply)
        return out

    def _go_offline(self, reason: str) -> list[Effect]:
        out = self.sync.stop()
        self.online = False
        self.maybe_online = False
        assert self.core.device_id is not None
        out.append(SignedOut(self.core.device_id))
        ev = self.core.event(
            DeviceOffline(
                gateway=self.core.config.gateway_id,
                connection_id=self.core.config.connection_id,
                remote_address=self.core.config.remote_address,
                reason=reason,
            )
        )
        out.append(self.core.append([ev], [], [], critical=False))
        return out

    def refresh(self, req: DeviceRequest, rf: ocf.Refresh, now: float) -> list[Effect]:
        claims = self.core.validator.validate(rf.refresh_token, now)
        if claims.token_type != "refresh":
            raise Unauthorized("not a refresh token")
        if rf.user_id and rf.user_id != claims.owner:
            raise Unauthorized("uid does not match the refresh token's owner")
        device_id = self._resolve_device(claims, rf.device_id)
        access, refresh, expires_at = self._tokens(claims.owner, device_id, now)
        if (
            self.core.phase is Phase.SIGNED_IN
            and device_id == self.core.device_id
            and claims.owner == self.core.owner
        ):
            self.expires_at = expires_at
        return [
            self.core.reply(
                req,
                "2.04",
                {
                    "accesstoken": access,
                    "refreshtoken": refresh,
                    "uid": claims.owner,
                    "expiresin": expires_in(expires_at, now),
                },
            )
        ]

    def sign_off(self, req: DeviceRequest, so: ocf.SignOff, now: float) -> list[Effect]:
        current = self.core.phase is Phase.SIGNED_IN and so.device_id == self.core.device_id
        if so.access_token:
            claims = self.core.validator.validate(so.access_token, now)
            if claims.token_type != "access":
                raise Unauthorized("not an access token")
            if so.user_id and so.user_id != claims.owner:
                raise Unauthorized("uid does not match the token's owner")
            device_id = self._resolve_device(claims, so.device_id)
            if not (current and claims.owner == self.core.owner):
                return [self._load_owner(OwnerCheck(Step.SIGN_OFF, req, claims, device_id))]
            return self._unregister(req, device_id, claims.owner)
        if current:  # signed in on this connection: its sign-in was authorized
            assert self.core.owner is not None
            return self._unregister(req, so.device_id, self.core.owner)
        raise Unauthorized("sign-off needs an access token or a signed-in session")

    def _unregister(self, req: DeviceRequest, device_id: str, owner: str) -> list[Effect]:
        out: list[Effect] = []
        if self.core.phase is Phase.SIGNED_IN and device_id == self.core.device_id:
            out += self._go_offline("sign-off")
            self.core.phase = Phase.CONNECTED
        ev = self.core.event(
            DeviceUnregistered(reason="sign-off"), device_id=device_id, owner=owner
        )
        done: list[Effect] = [Respond(req.rid, "2.02"), Close("signed off")]
        out.append(
            self.core.append([ev], done, [Respond(req.rid, "5.03", b"event log unavailable", 0)])
        )
        return out

    def on_append(self, res: AppendResult, now: float) -> list[Effect]:
        pending = self.core.pending.pop(res.ref, None)
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
            if pending.then is Step.SIGNED_IN:
                self.core.phase = Phase.CONNECTED
            return out
        out = list(pending.on_ok)
        if pending.cache is not None:
            key, answer = pending.cache
            self.sign_up_cache[key] = answer
        if pending.then is Step.SIGNED_IN and self.core.phase is Phase.SIGNING_IN:
            self.core.phase = Phase.SIGNED_IN
            self.online = True
            assert self.core.device_id is not None
            assert self.core.owner is not None
            out.append(SignedIn(self.core.device_id, self.core.owner))
            out += self.sync.start()
        return out

    def on_tick(self, now: float) -> list[Effect]:
        if (
            self.core.phase is Phase.SIGNED_IN
            and self.expires_at is not None
            and now > self.expires_at
        ):
            return self.end("token expired")
        cert_end = self.core.config.cert_expires_at
        if cert_end is not None and now > cert_end:
            return self.end("client certificate expired")
        return []

    def end(self, reason: str) -> list[Effect]:
        out = self._go_offline(reason) if self.online or self.maybe_online else []
        self.core.phase = Phase.CLOSED
        return [*out, Close(reason)]

    def on_lost(self, lost: ConnectionLost) -> list[Effect]:
        out = self._go_offline(lost.reason) if self.online or self.maybe_online else []
        self.core.phase = Phase.CLOSED
        return out

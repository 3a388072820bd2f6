"""Application tokens: the JWT an application presents to the command API (``Authorization:
Bearer``) and as its NATS connection token, checked by the same rules in both places.

On top of everything :class:`~auth.tokens.JwtValidator` checks (signature, ``iss``, ``aud``,
``exp``/``nbf`` with the clock-skew allowance, the owner claim) an application token

* is not a device's: a token carrying the device binding claim
  (:data:`~auth.tokens.DEVICE_BINDING_CLAIM`, in every token the gateway hands a device) or the
  deployment's device-ID claim is refused -- and that claim is *not* required, as it is of
  devices;
* is an access token (``typ`` absent or ``access``: a refresh token is refused);
* expires: a token without ``exp`` is refused;
* lives at most ``max_lifetime`` seconds, measured as ``exp - iat`` (``exp - now`` without
  ``iat``, or when ``iat`` lies in the future), with the same clock-skew allowance. ``None``:
  no maximum.
"""

from __future__ import annotations

from typing import Final

from auth.errors import TokenError
from auth.tokens import (
    DEFAULT_AUDIENCE,
    DEFAULT_ISSUER,
    DEVICE_BINDING_CLAIM,
    Claims,
    JwtValidator,
    KeyLookup,
)

DEFAULT_MAX_LIFETIME: Final = 7 * 24 * 3600.0


class AppTokenValidator:
    """Validates application tokens (see the module doc); a :class:`~auth.tokens.TokenValidator`.

    ``device_claim`` is the deployment's device-ID claim (``auth.device_claim``), refused here.
    """

    def __init__(
        self,
        keys: KeyLookup,
        *,
        issuer: str | None = DEFAULT_ISSUER,
        audience: str | None = DEFAULT_AUDIENCE,
        owner_claim: str = "sub",
        device_claim: str | None = None,
        algorithms: tuple[str, ...] = ("ES256",),
        leeway: float = 30.0,
        max_lifetime: float | None = DEFAULT_MAX_LIFETIME,
    ) -> None:
        if max_lifetime is not None and max_lifetime <= 0:
            raise ValueError("max_lifetime must be positive (None: no maximum)")
        self.jwt = JwtValidator(
            keys,
            issuer=issuer,
            audience=audience,
            owner_claim=owner_claim,
            device_claim=None,  # required of devices; refused below
            algorithms=algorithms,
            leeway=leeway,
        )
        self.device_claims = tuple(
            dict.fromkeys(c for c in (DEVICE_BINDING_CLAIM, device_claim) if c)
        )
        self.max_lifetime = max_lifetime

    @property
    def refreshable(self) -> bool:
        return self.jwt.refreshable

    async def refresh_keys(self) -> bool:
        """Refresh a refreshable key source (the answer to :class:`~auth.errors.UnknownKey`)."""
        return await self.jwt.refresh_keys()

    def validate(self, token: str, now: float) -> Claims:
        claims = self.jwt.validate(token, now)  # an unknown kid raises UnknownKey first
        raw = claims.raw
        if any(c in raw for c in self.device_claims):
            raise TokenError("a device token is not an application token")
        if claims.token_type != "access":
            raise TokenError(f"a {claims.token_type} token is not an application token")
        if claims.expires_at is None:
            raise TokenError("token has no exp claim")
        if self.max_lifetime is not None:
            iat = raw.get("iat", now)
            if isinstance(iat, bool) or not isinstance(iat, int | float):
                raise TokenError("claim iat is not a number")
            lifetime = claims.expires_at - min(float(iat), now)
            if lifetime > self.max_lifetime + self.jwt.leeway:
                raise TokenError(
                    f"token lifetime {lifetime:.0f} s exceeds the maximum of"
                    f" {self.max_lifetime:.0f} s for application tokens"
                )
        return claims

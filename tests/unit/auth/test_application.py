"""Application tokens (auth.application): the JWT checks plus the application rules."""

from __future__ import annotations

from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from auth.application import DEFAULT_MAX_LIFETIME, AppTokenValidator
from auth.errors import TokenError, UnknownKey
from auth.tokens import DEVICE_BINDING_CLAIM, KeySet, PublicKey, TokenIssuer

NOW = 1_800_000_000.0
DAY = 24 * 3600.0
DEVICE_CLAIM = "https://example.com/deviceId"


@pytest.fixture(scope="module")
def issuer() -> TokenIssuer:
    return TokenIssuer(ec.generate_private_key(ec.SECP256R1()), kid="k1")


def raw_token(issuer: TokenIssuer, **claims: Any) -> str:
    """A token with exactly these claims (besides iss and aud), signed by ``issuer``."""
    body = {"iss": issuer.issuer, "aud": issuer.audience, **claims}
    return jwt.encode(body, issuer.private_key, algorithm="ES256", headers={"kid": issuer.kid})


def validator(issuer: TokenIssuer, **kw: Any) -> AppTokenValidator:
    return AppTokenValidator(issuer.public_keys, **kw)


def test_a_valid_application_token(issuer: TokenIssuer) -> None:
    claims = validator(issuer).validate(issuer.issue("alice", now=NOW, ttl=3600), NOW + 10)
    assert (claims.owner, claims.device_id, claims.expires_at) == ("alice", None, NOW + 3600)
    assert claims.token_type == "access"


def test_the_jwt_checks_still_apply(issuer: TokenIssuer) -> None:
    v = validator(issuer)
    with pytest.raises(TokenError, match="expired"):
        v.validate(issuer.issue("alice", now=NOW, ttl=60), NOW + 60 + 31)
    assert v.validate(issuer.issue("alice", now=NOW, ttl=60), NOW + 60 + 29).owner == "alice"
    with pytest.raises(TokenError, match="not yet valid"):
        v.validate(raw_token(issuer, sub="a", exp=NOW + 600, nbf=NOW + 100), NOW)
    other = TokenIssuer(issuer.private_key, kid=issuer.kid, audience="someone-else")
    with pytest.raises(TokenError, match=r"(?i)audience"):
        v.validate(other.issue("alice", now=NOW, ttl=60), NOW)
    with pytest.raises(TokenError, match="owner claim"):
        v.validate(raw_token(issuer, exp=NOW + 60), NOW)
    stranger = TokenIssuer(ec.generate_private_key(ec.SECP256R1()), kid="k1")
    with pytest.raises(TokenError, match="invalid token"):
        v.validate(stranger.issue("alice", now=NOW, ttl=60), NOW)


async def test_an_unknown_key_is_found_after_a_refresh(issuer: TokenIssuer) -> None:
    class Rotating:
        def __init__(self) -> None:
            self.keys: dict[str, PublicKey] = {}

        def find(self, kid: str | None) -> PublicKey:
            return KeySet(self.keys).find(kid)

        async def refresh(self) -> bool:
            self.keys = dict(issuer.public_keys.keys)
            return True

    keys = Rotating()
    v = AppTokenValidator(keys)
    token = issuer.issue("alice", now=NOW, ttl=60)
    with pytest.raises(UnknownKey) as e:  # checked before the application rules
        v.validate(token, NOW)
    assert e.value.kid == "k1"
    assert v.refreshable and await v.refresh_keys()
    assert v.validate(token, NOW).owner == "alice"


async def test_fixed_keys_do_not_refresh(issuer: TokenIssuer) -> None:
    v = validator(issuer)
    assert not v.refreshable
    assert not await v.refresh_keys()


def test_a_token_without_exp_is_refused(issuer: TokenIssuer) -> None:
    for v in (validator(issuer), validator(issuer, max_lifetime=None)):
        with pytest.raises(TokenError, match="token has no exp claim"):
            v.validate(issuer.issue("alice", now=NOW, ttl=None), NOW)


def test_the_lifetime_is_bounded(issuer: TokenIssuer) -> None:
    v = validator(issuer, max_lifetime=DAY)
    assert v.validate(issuer.issue("alice", now=NOW, ttl=DAY), NOW).owner == "alice"
    with pytest.raises(TokenError, match=r"lifetime 86431 s exceeds the maximum of 86400 s"):
        v.validate(issuer.issue("alice", now=NOW, ttl=DAY + 31), NOW + 3600)
    # measured exp - iat, not exp - now: a long token stays refused however late it comes
    with pytest.raises(TokenError, match="exceeds"):
        v.validate(issuer.issue("alice", now=NOW, ttl=2 * DAY), NOW + 1.5 * DAY)


def test_the_default_maximum_is_seven_days(issuer: TokenIssuer) -> None:
    assert DEFAULT_MAX_LIFETIME == 7 * DAY
    v = validator(issuer)
    assert v.validate(issuer.issue("alice", now=NOW, ttl=7 * DAY), NOW).owner == "alice"
    with pytest.raises(TokenError, match="exceeds"):
        v.validate(issuer.issue("alice", now=NOW, ttl=8 * DAY), NOW)
    assert validator(issuer, max_lifetime=None).validate(
        issuer.issue("alice", now=NOW, ttl=365 * DAY), NOW
    )
    with pytest.raises(ValueError, match="positive"):
        validator(issuer, max_lifetime=0)


def test_without_iat_the_lifetime_is_exp_minus_now(issuer: TokenIssuer) -> None:
    v = validator(issuer, max_lifetime=DAY)
    token = raw_token(issuer, sub="alice", exp=NOW + 2 * DAY)
    with pytest.raises(TokenError, match="exceeds"):
        v.validate(token, NOW)
    assert v.validate(token, NOW + 1.5 * DAY).owner == "alice"


def test_an_iat_in_the_future_does_not_extend_the_lifetime(issuer: TokenIssuer) -> None:
    v = validator(issuer, max_lifetime=DAY)
    ahead = raw_token(issuer, sub="alice", iat=NOW + DAY, exp=NOW + 2 * DAY)
    with pytest.raises(TokenError, match="exceeds"):
        v.validate(ahead, NOW)
    skewed = raw_token(issuer, sub="alice", iat=NOW + 20, exp=NOW + 20 + DAY)
    assert v.validate(skewed, NOW).owner == "alice", "within the clock-skew allowance"
    with pytest.raises(TokenError, match="iat is not a number"):
        v.validate(raw_token(issuer, sub="alice", iat="yesterday", exp=NOW + 60), NOW)


def test_device_tokens_are_refused(issuer: TokenIssuer) -> None:
    v = validator(issuer)
    bound = issuer.issue("alice", now=NOW, ttl=3600, device_id="d1")  # what the gateway hands out
    with pytest.raises(TokenError, match="a device token is not an application token"):
        v.validate(bound, NOW)
    odd = raw_token(issuer, sub="alice", exp=NOW + 60, **{DEVICE_BINDING_CLAIM: 5})
    with pytest.raises(TokenError, match="device token"):
        v.validate(odd, NOW)


def test_the_configured_device_claim_is_refused_not_required(issuer: TokenIssuer) -> None:
    v = validator(issuer, device_claim=DEVICE_CLAIM)
    assert v.validate(issuer.issue("alice", now=NOW, ttl=3600), NOW).owner == "alice"
    device = raw_token(issuer, sub="alice", exp=NOW + 60, **{DEVICE_CLAIM: "d1"})
    with pytest.raises(TokenError, match="a device token is not an application token"):
        v.validate(device, NOW)
    configured = TokenIssuer(issuer.private_key, kid=issuer.kid, device_claim=DEVICE_CLAIM)
    with pytest.raises(TokenError, match="device token"):
        v.validate(configured.issue("alice", now=NOW, ttl=60, device_id="d1"), NOW)


def test_refresh_tokens_are_refused(issuer: TokenIssuer) -> None:
    refresh = issuer.issue("alice", now=NOW, ttl=3600, token_type="refresh")
    with pytest.raises(TokenError, match="a refresh token is not an application token"):
        validator(issuer).validate(refresh, NOW)

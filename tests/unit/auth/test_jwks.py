"""JWKS keys against a real HTTP server on loopback: rotation, bounded refresh, allow-list."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import jwt
import pytest

from auth.errors import TokenError, UnknownKey
from auth.jwks import JwksKeys, parse_jwks
from auth.tokens import JwtValidator

from ...e2e.idp import Idp  # noqa: TID252


@pytest.fixture
def idp() -> Iterator[Idp]:
    provider = Idp().start()
    yield provider
    provider.stop()


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def validator(keys: JwksKeys, idp: Idp) -> JwtValidator:
    return JwtValidator(keys, issuer=idp.url, audience=idp.client_id)


async def test_rotation_is_picked_up_on_an_unknown_kid_at_a_bounded_rate(idp: Idp) -> None:
    clock = Clock()
    keys = JwksKeys(idp.url + "/jwks", min_refresh=30.0, clock=clock)
    v = validator(keys, idp)
    token = idp.sign({"sub": "alice"})
    with pytest.raises(UnknownKey):
        v.validate(token, time.time())  # nothing fetched yet: find() never does I/O
    assert await v.refresh_keys()
    assert v.validate(token, time.time()).owner == "alice"
    assert idp.jwks_fetches == 1

    new_kid = idp.rotate()
    rotated = idp.sign({"sub": "bob"})
    with pytest.raises(UnknownKey) as e:
        v.validate(rotated, time.time())
    assert e.value.kid == new_kid
    # too soon: a flood of unknown kids costs no fetch
    results = await asyncio.gather(*(v.refresh_keys() for _ in range(10)))
    assert not any(results)
    assert idp.jwks_fetches == 1
    clock.t += 31
    # concurrent refreshes share one fetch
    results = await asyncio.gather(*(v.refresh_keys() for _ in range(5)))
    assert results.count(True) == 1
    assert idp.jwks_fetches == 2
    assert v.validate(rotated, time.time()).owner == "bob"
    assert v.validate(token, time.time()).owner == "alice", "the old key is still published"


async def test_an_unreachable_jwks_keeps_the_known_keys(idp: Idp) -> None:
    clock = Clock()
    keys = JwksKeys(idp.url + "/jwks", min_refresh=1.0, timeout=2.0, clock=clock)
    assert await keys.refresh()
    token = idp.sign({"sub": "alice"})
    idp.stop()
    clock.t += 5
    assert not await keys.refresh()
    assert keys.fetches == 2
    assert validator(keys, idp).validate(token, time.time()).owner == "alice"


async def test_symmetric_keys_and_none_are_never_accepted(idp: Idp) -> None:
    keys = JwksKeys(idp.url + "/jwks", min_refresh=0.0)
    assert await keys.refresh()
    assert "hs" not in keys.fetched, "oct keys are skipped"
    v = validator(keys, idp)
    forged = jwt.encode(
        {"sub": "eve", "iss": idp.url, "aud": idp.client_id},
        "s" * 32,
        algorithm="HS256",
        headers={"kid": "hs"},
    )
    with pytest.raises(TokenError, match="not allowed"):
        v.validate(forged, time.time())
    unsigned = jwt.encode({"sub": "eve"}, None, algorithm="none", headers={"kid": idp.kid})
    with pytest.raises(TokenError, match="not allowed"):
        v.validate(unsigned, time.time())


def test_parse_jwks_skips_unusable_keys() -> None:
    doc = Idp().jwks()
    doc["keys"].append({"kty": "EC", "kid": "bad", "crv": "P-256", "x": "AA", "y": "AA"})
    doc["keys"].append({"kty": "RSA", "kid": "enc", "use": "enc", "n": "AQAB", "e": "AQAB"})
    assert len(parse_jwks(doc, ("ES256",))) == 1
    assert parse_jwks(doc, ("RS256",)) == {}, "a key whose alg is not allowed is skipped"
    with pytest.raises(ValueError, match="keys"):
        parse_jwks({}, ("ES256",))


def test_only_http_urls() -> None:
    with pytest.raises(ValueError, match="http"):
        JwksKeys("file:///etc/passwd")

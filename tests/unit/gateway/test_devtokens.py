from __future__ import annotations

import pytest

from eventstore.errors import UnavailableError
from gateway.devtokens import CachedTokenDirectory, InMemoryTokenDirectory, TokenCacheConfig
from proto.devtokens import TokenRecord, new_token

ACTIVE = TokenRecord(owner="alice", device_id="d1")
REVOKED = TokenRecord(owner="alice", device_id="d1", state="revoked")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Down:
    lookups = 0

    async def lookup(self, token: str) -> TokenRecord | None:
        self.lookups += 1
        raise UnavailableError("registry down")


async def test_answers_are_kept_for_the_ttl_found_or_not() -> None:
    token, unknown = new_token(), new_token()
    inner = InMemoryTokenDirectory({token: ACTIVE})
    clock = Clock()
    cache = CachedTokenDirectory(inner, TokenCacheConfig(ttl=5.0), clock=clock)
    assert await cache.lookup(token) == ACTIVE
    assert await cache.lookup(unknown) is None
    assert await cache.lookup(token) == ACTIVE
    assert await cache.lookup(unknown) is None
    assert inner.lookups == 2


async def test_a_revocation_takes_effect_within_the_ttl() -> None:
    token = new_token()
    inner = InMemoryTokenDirectory({token: ACTIVE})
    clock = Clock()
    cache = CachedTokenDirectory(inner, TokenCacheConfig(ttl=5.0), clock=clock)
    assert await cache.lookup(token) == ACTIVE
    inner.put(token, REVOKED)
    clock.now += 4.9
    assert await cache.lookup(token) == ACTIVE  # still cached
    clock.now += 0.2
    assert await cache.lookup(token) == REVOKED


async def test_errors_are_not_cached() -> None:
    down = Down()
    cache = CachedTokenDirectory(down, clock=Clock())
    for _ in range(2):
        with pytest.raises(UnavailableError):
            await cache.lookup(new_token())
    assert down.lookups == 2
    assert len(cache) == 0


async def test_the_cache_is_bounded_and_holds_no_token() -> None:
    inner = InMemoryTokenDirectory()
    cache = CachedTokenDirectory(inner, TokenCacheConfig(max_entries=3), clock=Clock())
    tokens = [new_token() for _ in range(10)]
    for t in tokens:
        await cache.lookup(t)
    assert len(cache) == 3
    assert not any(t in repr(vars(cache)) for t in tokens)


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="ttl"):
        TokenCacheConfig(ttl=-1)
    with pytest.raises(ValueError, match="max_entries"):
        TokenCacheConfig(max_entries=0)

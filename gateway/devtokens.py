"""Finding a simple device by its access token: the port, a cache, an in-memory adapter.

:class:`TokenDirectory` is what the simple-device endpoint asks (``lookup(token)``: the
registry's :class:`~proto.devtokens.TokenRecord`, or ``None`` for a token nobody issued, or
whose record is malformed). :class:`CachedTokenDirectory` keeps answers, found or not, for a
short time (``ttl``, default 5 s) so a device posting every second costs one registry read per
TTL; a revocation therefore takes effect within the TTL. Errors (the registry cannot be
reached) are not cached. The real adapter reads the registry stream:
:mod:`gateway.adapters.devtokens_nats`.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from proto.devtokens import TokenRecord, token_hash

__all__ = ["CachedTokenDirectory", "InMemoryTokenDirectory", "TokenCacheConfig", "TokenDirectory"]


class TokenDirectory(Protocol):
    async def lookup(self, token: str) -> TokenRecord | None:
        """The record of ``token`` (active or revoked), or None when there is none.
        Raises :class:`eventstore.errors.UnavailableError` when the registry cannot be read."""
        ...


class InMemoryTokenDirectory:
    """Records by token hash, as the registry keeps them (for unit tests)."""

    def __init__(self, records: Mapping[str, TokenRecord] | None = None) -> None:
        self.records: dict[str, TokenRecord] = {}
        self.lookups = 0
        for token, record in (records or {}).items():
            self.put(token, record)

    def put(self, token: str, record: TokenRecord) -> None:
        self.records[token_hash(token)] = record

    async def lookup(self, token: str) -> TokenRecord | None:
        self.lookups += 1
        return self.records.get(token_hash(token))


@dataclass(frozen=True, slots=True)
class TokenCacheConfig:
    ttl: float = 5.0
    """Seconds an answer is kept: the longest a revocation may take to apply."""
    max_entries: int = 100_000

    def __post_init__(self) -> None:
        if self.ttl < 0:
            raise ValueError("ttl must be >= 0")
        if self.max_entries < 1:
            raise ValueError("max_entries must be >= 1")


class CachedTokenDirectory:
    """A :class:`TokenDirectory` in front of another, keeping its answers for ``ttl`` seconds
    (least recently used forgotten first beyond ``max_entries``). Keys are token hashes: the
    cache holds no token."""

    def __init__(
        self,
        inner: TokenDirectory,
        config: TokenCacheConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.inner = inner
        self.config = config or TokenCacheConfig()
        self.clock = clock
        self._entries: OrderedDict[str, tuple[float, TokenRecord | None]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    async def lookup(self, token: str) -> TokenRecord | None:
        key = token_hash(token)
        now = self.clock()
        hit = self._entries.get(key)
        if hit is not None and now < hit[0]:
            self._entries.move_to_end(key)
            return hit[1]
        record = await self.inner.lookup(token)
        self._entries[key] = (self.clock() + self.config.ttl, record)
        self._entries.move_to_end(key)
        while len(self._entries) > self.config.max_entries:
            self._entries.popitem(last=False)
        return record

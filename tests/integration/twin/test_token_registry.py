"""The token registry adapter (twin.adapters.token_registry) on the real JetStream stream of
TWINHUB_DEVICE_TOKENS, with the twin service's credentials: conditional writes, idempotent
retries, one record kept per token."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import msgspec
import pytest

from eventstore.adapters.jetstream import JetStreamEventStore
from eventstore.errors import ConcurrencyError
from proto.devtokens import TokenRecord, hash_subject, token_hash
from tests.conftest import Bus
from twin.adapters.token_registry import LogTokenRegistry
from twin.ports import TokenEntry
from twinhub_cli.services import TOKEN_LAYOUT

pytestmark = pytest.mark.servers


@pytest.fixture
async def tokens(bus: Bus) -> AsyncIterator[JetStreamEventStore]:
    async with JetStreamEventStore.from_url(bus.endpoint("twin"), TOKEN_LAYOUT) as store:
        await store.provision()
        yield store


async def test_conditional_writes_and_retries(tokens: JetStreamEventStore) -> None:
    registry = LogTokenRegistry(tokens)
    hashed = token_hash(f"t-{uuid.uuid4().hex}")
    record = TokenRecord(owner="alice", device_id="d1", issued_at_ms=1)
    assert await registry.get(hashed) is None
    first = await registry.put(hashed, record, expected_last=0)
    assert await registry.put(hashed, record, expected_last=0) == first  # a retry: deduplicated
    with pytest.raises(ConcurrencyError):  # a writer that saw no record: too late
        await registry.put(
            hashed, msgspec.structs.replace(record, device_id="d2"), expected_last=first + 1
        )
    revoked = msgspec.structs.replace(record, state="revoked", issued_at_ms=2)
    second = await registry.put(hashed, revoked, expected_last=first)
    assert await registry.get(hashed) == TokenEntry(revoked, second)
    with pytest.raises(ConcurrencyError):  # the record it expected is gone
        await registry.put(hashed, record, expected_last=first + 10_000)
    # one record kept per token: only the last is in the stream
    count = 0
    async for _ in tokens.read(hash_subject(hashed)):
        count += 1
    assert count == 1

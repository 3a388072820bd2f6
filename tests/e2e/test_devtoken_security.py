"""The simple devices' token registry (TWINHUB_DEVICE_TOKENS) on the session's authenticated
bus: applications get nothing of it, the gateway only reads it, the twin service writes it.

As in test_bus_security.py, every refusal is observed positively (the server's permission
violation), and each is paired with the legitimate use it resembles.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import nats
import pytest
from pymongo.asynchronous.database import AsyncDatabase

from eventstore.adapters.jetstream import JetStreamEventStore
from proto import api
from proto.devtokens import (
    TOKEN_STREAM,
    TokenRecord,
    decode_record,
    encode_record,
    hash_subject,
    token_hash,
)
from tests.conftest import Bus
from twin.adapters.mongo import MongoTwinStore
from twin.adapters.nats_api import NatsApiServer
from twin.adapters.token_registry import LogTokenRegistry
from twin.api import ApiConfig, TwinApi
from twinhub_cli.services import TOKEN_LAYOUT
from twinhub_client import TwinhubClient

from .test_bus_security import App, app

pytestmark = pytest.mark.servers

JS = api.APP_JS_PREFIX


@pytest.fixture
async def record(bus: Bus) -> AsyncIterator[str]:
    """A token's record written as the twin service writes it; its hash."""
    hashed = token_hash(f"tok-{uuid.uuid4().hex}")
    async with JetStreamEventStore.from_url(bus.endpoint("twin"), TOKEN_LAYOUT) as tokens:
        await tokens.provision()
        registry = LogTokenRegistry(tokens)
        await registry.put(hashed, TokenRecord(owner="bob", device_id="b1"), expected_last=0)
        yield hashed


async def test_an_application_reads_nothing_of_the_registry(bus: Bus, record: str) -> None:
    subject = hash_subject(record)
    async with app(bus, "mallory") as mallory:
        get = json.dumps({"last_by_subj": subject}).encode()
        for prefix in ("$JS.API", JS):
            reply = f"{mallory.inbox}.x"
            await mallory.denied_publish(f"{prefix}.DIRECT.GET.{TOKEN_STREAM}", get, reply)
            await mallory.denied_publish(
                f"{prefix}.DIRECT.GET.{TOKEN_STREAM}.{subject}", b"", reply
            )
            await mallory.denied_publish(f"{prefix}.STREAM.MSG.GET.{TOKEN_STREAM}", get, reply)
            await mallory.denied_publish(f"{prefix}.STREAM.INFO.{TOKEN_STREAM}", b"{}", reply)
            await mallory.denied_publish(f"{prefix}.CONSUMER.CREATE.{TOKEN_STREAM}", b"{}", reply)
        await mallory.denied_subscribe("twinhub.devtoken.>")
        await mallory.denied_publish(subject, b"{}")  # nor write it


async def test_an_application_provisions_through_the_api(
    bus: Bus, mongo_db: AsyncDatabase[Any]
) -> None:
    """What an application may do instead: ask the command API, which writes the registry."""
    owner = f"mallory-{uuid.uuid4().hex[:8]}"
    async with JetStreamEventStore.from_url(bus.endpoint("twin")) as store:
        await store.provision()
        async with JetStreamEventStore(store.connection, TOKEN_LAYOUT) as tokens:
            await tokens.provision()
            registry = LogTokenRegistry(tokens)
            twins = MongoTwinStore(mongo_db)
            twin_api = TwinApi(store, twins, bus.validator(), ApiConfig(), tokens=registry)
            async with (
                NatsApiServer(store.connection, twin_api),
                TwinhubClient(bus.url, bus.token(owner)) as client,
            ):
                got = await client.provision(f"{owner}-d1")
            entry = await registry.get(token_hash(got.token))
            assert entry is not None and entry.record.owner == owner


async def _service(bus: Bus, role: str) -> tuple[Any, App]:
    errors: asyncio.Queue[str] = asyncio.Queue()

    async def on_error(exc: Exception) -> None:
        errors.put_nowait(str(exc))

    endpoint = bus.endpoint(role)  # type: ignore[arg-type]
    nc = await nats.connect(**endpoint.connect_options(), error_cb=on_error)
    return nc, App(nc, role, errors)


async def test_the_gateway_reads_the_registry_but_cannot_write_it(bus: Bus, record: str) -> None:
    async with JetStreamEventStore.from_url(bus.endpoint("gateway"), TOKEN_LAYOUT) as tokens:
        stored = await tokens.last_message(hash_subject(record))
        assert stored is not None
        assert decode_record(stored.message.data) == TokenRecord(owner="bob", device_id="b1")
    nc, gateway = await _service(bus, "gateway")
    try:
        revoked = TokenRecord(owner="mallory", device_id="b1", state="revoked")
        await gateway.denied_publish(hash_subject(record), encode_record(revoked))
        await gateway.denied_publish(hash_subject(token_hash("forged")), b"{}", "_INBOX.gateway.x")
        for op in (f"STREAM.PURGE.{TOKEN_STREAM}", f"STREAM.DELETE.{TOKEN_STREAM}"):
            await gateway.denied_publish(f"$JS.API.{op}", b"{}", "_INBOX.gateway.x")
        await gateway.denied_publish(
            f"$JS.API.STREAM.UPDATE.{TOKEN_STREAM}", b"{}", "_INBOX.gateway.x"
        )
    finally:
        await nc.close()
    async with JetStreamEventStore.from_url(bus.endpoint("gateway"), TOKEN_LAYOUT) as tokens:
        stored = await tokens.last_message(hash_subject(record))
        assert stored is not None and decode_record(stored.message.data).state == "active"

"""Shared fixtures: real servers on loopback, started once per session.

* ``nats_server`` (session): :class:`NatsServer` with JetStream; tests may ``stop()`` / ``start()``
  it (same port, same store). Any test that uses it, directly or through ``nats_url`` /
  ``nats_client``, gets it running again first.
* ``nats_url`` / ``nats_client`` (function): URL and a connected nats-py client, closed afterwards.
* ``mongo_server`` (session): :class:`MongoServer` (FerretDB), or the MongoDB at
  ``$TWINHUB_TEST_MONGO_URL`` when that is set.
* ``mongo_client`` (session): ``AsyncMongoClient``; ``mongo_db`` (function): a fresh database with a
  unique name, dropped afterwards.

Server fixtures never skip: a missing binary fails the test with the fix in the message.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

import nats
import pytest
import pytest_asyncio
from nats.aio.client import Client as NatsClient
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase

from twinhub_cli.devservices import DevServiceError, MongoServer, NatsServer

TEST_MONGO_URL_ENV = "TWINHUB_TEST_MONGO_URL"


class HasUrl(Protocol):
    @property
    def url(self) -> str: ...


@dataclass(frozen=True)
class ExternalServer:
    """A server we did not start (e.g. a real MongoDB named by the environment)."""

    url: str


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def nats_server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[NatsServer]:
    try:
        server = NatsServer(tmp_path_factory.mktemp("nats"))
        await server.start()
    except DevServiceError as exc:
        pytest.fail(f"cannot start nats-server: {exc}", pytrace=False)
    try:
        yield server
    finally:
        await server.stop()


@pytest_asyncio.fixture(loop_scope="session")
async def _nats_running(nats_server: NatsServer) -> NatsServer:
    if not nats_server.running:  # a previous test stopped it
        await nats_server.start()
    return nats_server


@pytest.fixture(autouse=True)
def _restart_stopped_nats(request: pytest.FixtureRequest) -> None:
    # Only for tests that use the server: the others must not start it.
    if "nats_server" in request.fixturenames:
        request.getfixturevalue("_nats_running")


@pytest.fixture
def nats_url(_nats_running: NatsServer) -> str:
    return _nats_running.url


@pytest_asyncio.fixture(loop_scope="session")
async def nats_client(nats_url: str) -> AsyncIterator[NatsClient]:
    nc = await nats.connect(nats_url)
    try:
        yield nc
    finally:
        await nc.close()


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def mongo_server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[HasUrl]:
    external = os.environ.get(TEST_MONGO_URL_ENV)
    if external:
        yield ExternalServer(external)
        return
    try:
        server = MongoServer(tmp_path_factory.mktemp("mongo"))
        await server.start()
    except DevServiceError as exc:
        pytest.fail(f"cannot start mongo-server: {exc}", pytrace=False)
    try:
        yield server
    finally:
        await server.stop()


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def mongo_client(mongo_server: HasUrl) -> AsyncIterator[AsyncMongoClient[dict[str, Any]]]:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
        mongo_server.url, serverSelectionTimeoutMS=10_000, tz_aware=True
    )
    try:
        yield client
    finally:
        await client.close()


@pytest_asyncio.fixture(loop_scope="session")
async def mongo_db(
    mongo_client: AsyncMongoClient[dict[str, Any]],
) -> AsyncIterator[AsyncDatabase[dict[str, Any]]]:
    db = mongo_client[f"test_{uuid.uuid4().hex[:16]}"]
    try:
        yield db
    finally:
        await mongo_client.drop_database(db.name)

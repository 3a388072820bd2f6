"""Shared fixtures: real servers on loopback, started once per session.

* ``nats_server`` (session): :class:`NatsServer` with JetStream and twinhub's bus security, as
  users run it (no anonymous client; services by NKey, applications through the auth callout);
  tests may ``stop()`` / ``start()`` it (same port, same store). Any test that uses it,
  directly or through ``bus`` / ``nats_admin`` / ``nats_client``, gets it running again first.
* ``bus`` (function): the running server with the session's auth callout and the issuer of
  the application tokens it admits (:class:`Bus`: ``bus.endpoint(role)``, ``bus.token(owner)``).
* ``nats_admin`` / ``nats_client`` (function): the admin role's endpoint and a connected
  nats-py client of it, closed afterwards.
* ``nats_cluster`` (function): :class:`NatsCluster`, three nats-servers on loopback as one
  JetStream cluster with the same bus security as ``nats_server`` (what ``twinhub up
  --nats-cluster 3`` starts), fresh for each test (a test may kill members).
* ``mongo_server`` (session): :class:`MongoServer` (FerretDB), or the MongoDB at
  ``$TWINHUB_TEST_MONGO_URL`` when that is set.
* ``mongo_client`` (session): ``AsyncMongoClient``; ``mongo_db`` (function): a fresh database with a
  unique name, dropped afterwards.

Server fixtures never skip: a missing binary fails the test with the fix in the message.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

import nats
import pytest
import pytest_asyncio
from cryptography.hazmat.primitives.asymmetric import ec
from nats.aio.client import Client as NatsClient
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase

from auth.application import AppTokenValidator
from auth.tokens import TokenIssuer
from bus.adapters.nats_callout import CalloutService
from bus.credentials import ensure_credentials
from bus.permissions import Role
from eventstore.adapters.endpoint import NatsEndpoint
from eventstore.layout import DEFAULT_STREAM
from twinhub_cli.devservices import DevServiceError, MongoServer, NatsCluster, NatsServer

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
    root = tmp_path_factory.mktemp("nats")
    try:
        server = NatsServer(root, credentials=ensure_credentials(root / "bus"))
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


@pytest_asyncio.fixture(loop_scope="session")
async def nats_cluster(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[NatsCluster]:
    root = tmp_path_factory.mktemp("nats-cluster")
    try:
        cluster = NatsCluster(root, 3, credentials=ensure_credentials(root / "bus"))
        await cluster.start()
    except DevServiceError as exc:
        pytest.fail(f"cannot start a nats-server cluster: {exc}", pytrace=False)
    try:
        yield cluster
    finally:
        await cluster.stop()


APP_ISSUER_KEY = ec.generate_private_key(ec.SECP256R1())


@dataclass(frozen=True)
class Bus:
    """The session's NATS server as users get it, with the auth callout running."""

    server: NatsServer
    issuer: TokenIssuer  # signs the application tokens the callout (and test APIs) accept
    callout: CalloutService

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def admin(self) -> NatsEndpoint:
        return self.server.endpoint("admin")

    def endpoint(self, role: Role) -> NatsEndpoint:
        return self.server.endpoint(role)

    def token(self, owner: str, *, ttl: float = 600.0, **kw: Any) -> str:
        return self.issuer.issue(owner, now=time.time(), ttl=ttl, **kw)

    def validator(self) -> AppTokenValidator:
        """The application-token rules, over this bus's issuer (what the callout uses)."""
        return AppTokenValidator(self.issuer.public_keys)


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def _bus(nats_server: NatsServer) -> AsyncIterator[Bus]:
    issuer = TokenIssuer(APP_ISSUER_KEY, kid="tests")
    callout = CalloutService(
        nats_server.endpoint("callout"),
        nats_server.credentials.issuer_file,
        AppTokenValidator(issuer.public_keys),
        stream=DEFAULT_STREAM,
        reserved=("twin-projector",),
    )
    async with callout:
        yield Bus(nats_server, issuer, callout)


@pytest.fixture
def bus(_nats_running: NatsServer, _bus: Bus) -> Bus:
    return _bus


@pytest.fixture
def nats_admin(_nats_running: NatsServer) -> NatsEndpoint:
    return _nats_running.endpoint("admin")


@pytest_asyncio.fixture(loop_scope="session")
async def nats_client(nats_admin: NatsEndpoint) -> AsyncIterator[NatsClient]:
    nc = await nats.connect(**nats_admin.connect_options())
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

"""A whole twinhub stack on real servers for end-to-end tests.

The gateway publishes on ``twinhub.ev.>`` (the production subjects), so every e2e
test shares one stream on the session's NATS server and isolates itself by owner:
its projector consumes ``twinhub.ev.<owner>.>`` only.

Every process connects as it does in production (the bus is authenticated): the gateway
with the gateway role's NKey, the projector and the command API with the twin role's (which
provisions the stream), applications with a token of the bus's issuer through the session's
auth callout (:class:`tests.conftest.Bus`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pymongo.asynchronous.database import AsyncDatabase

from auth.tokens import JwtValidator, TokenIssuer
from bus.adapters.nats_callout import CalloutService
from devicesim.config import DeviceConfig, GatewayAddress, TlsOptions
from devicesim.device import SimDevice
from eventstore.adapters.jetstream import JetStreamEventStore
from gateway.service import Gateway, GatewayConfig
from proto import binding, subjects
from proto.events import AnyEvent
from twin.adapters.mongo import MongoTwinStore
from twin.model import Twin
from twin.service import ProjectorConfig, TwinProjector
from twinhub_cli import config as cfgmod
from twinhub_cli import pki
from twinhub_cli import services as svc
from twinhub_cli.config import Config
from twinhub_cli.datadir import DataDir
from twinhub_client import TwinhubClient

if TYPE_CHECKING:
    from tests.conftest import Bus

WAIT = 30.0


@dataclass
class Stack:
    owner: str
    store: JetStreamEventStore  # the twin role's: the projector's, the API's, the test's reads
    gateway_store: JetStreamEventStore  # the gateway role's (what the gateway got, unwrapped)
    gateway: Gateway
    bus: Bus
    twins: MongoTwinStore
    ca_file: Path
    projector: TwinProjector | None = None

    @property
    def issuer(self) -> TokenIssuer:
        """Signs the devices' tokens (the gateway's) and the applications' (the callout's)."""
        return self.bus.issuer

    def token(self, device: str | None = None) -> str:
        """A device's token for the gateway (bound to ``device`` when given)."""
        return self.issuer.issue(self.owner, now=time.time(), ttl=600, device_id=device)

    def app_token(self, owner: str | None = None) -> str:
        """An application token (no device binding) the bus admits."""
        return self.bus.token(owner or self.owner)

    def client(self, owner: str | None = None, **kw: Any) -> TwinhubClient:
        """An application of ``owner`` (default: the stack's) on the bus."""
        return TwinhubClient(self.bus.url, self.app_token(owner), **kw)

    def device(self, n: int = 0, *, tls: bool = False, **kw: Any) -> SimDevice:
        addr = self.gateway.tls_address if tls else self.gateway.tcp_address
        assert addr is not None
        device_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{self.owner}/{n}"))
        cfg = DeviceConfig(
            gateway=GatewayAddress("coaps+tcp" if tls else "coap+tcp", addr[0], addr[1]),
            device_id=device_id,
            token=lambda di, owner: self.token(),
            owner=self.owner,
            tls=TlsOptions(ca_file=self.ca_file, server_name="127.0.0.1") if tls else None,
            **kw,
        )
        return SimDevice(cfg)

    async def events(self, device_id: str, kind: str | None = None) -> list[AnyEvent]:
        f = subjects.event_filter(owner=self.owner, device=device_id, kind=kind)
        return [binding.from_stored(m) async for m in self.store.read(f)]

    async def twin(self, device_id: str) -> Twin | None:
        return await self.twins.get(device_id)

    async def wait_twin(
        self, device_id: str, cond: Callable[[Twin], bool], timeout: float = WAIT
    ) -> Twin:
        async with asyncio.timeout(timeout):
            while True:
                t = await self.twins.get(device_id)
                if t is not None and cond(t):
                    return t
                await asyncio.sleep(0.05)

    @contextlib.asynccontextmanager
    async def running_projector(self) -> AsyncIterator[TwinProjector]:
        cfg = ProjectorConfig(
            name=f"p-{self.owner}", filter_subject=subjects.event_filter(owner=self.owner)
        )
        async with TwinProjector(self.twins, self.store, cfg) as p:
            self.projector = p
            yield p
        self.projector = None


def server_tls(tmp: Path) -> tuple[ssl.SSLContext, Path]:
    ca = pki.create_ca(tmp / "pki")
    server = pki.issue_server(ca, tmp / "pki", ["127.0.0.1", "localhost"])
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(server.cert_path, server.key_path)
    return ctx, ca.cert_path


@contextlib.asynccontextmanager
async def open_stack(
    bus: Bus,
    db: AsyncDatabase[Any],
    tmp: Path,
    *,
    store_timeout: float = 5.0,
    gateway_store: Callable[[JetStreamEventStore], Any] | None = None,
    **gateway_kw: Any,
) -> AsyncIterator[Stack]:
    """``store_timeout``: the event store's request timeout; ``gateway_store`` wraps the store
    the gateway is given (a fault-injecting proxy); the rest goes to :class:`GatewayConfig`."""
    owner = "o" + uuid.uuid4().hex[:10]
    ctx, ca_file = server_tls(tmp)
    async with (
        JetStreamEventStore.from_url(bus.endpoint("twin"), timeout=store_timeout) as store,
        JetStreamEventStore.from_url(
            bus.endpoint("gateway"), timeout=store_timeout, shared_notifiers=True
        ) as gw_store,  # as twinhub_cli.services gives the gateway its store
    ):
        await store.provision()  # the twin service's job: the gateway may not
        cfg = GatewayConfig(
            gateway_id="gw-e2e",
            tcp_bind=("127.0.0.1", 0),
            tls_bind=("127.0.0.1", 0),
            ssl_context=ctx,
            **gateway_kw,
        )
        twins = MongoTwinStore(db)
        await twins.ensure_indexes()
        given = gw_store if gateway_store is None else gateway_store(gw_store)
        async with Gateway(cfg, given, JwtValidator(bus.issuer.public_keys), bus.issuer) as gw:
            yield Stack(owner, store, gw_store, gw, bus, twins, ca_file)


def bus_config(bus: Bus, **sections: dict[str, Any]) -> Config:
    """A configuration of the session's bus (its URL and credentials), plus ``sections``."""
    nats = {"url": bus.url, "credentials": str(bus.server.credentials.directory)}
    overrides = {"nats": nats | sections.pop("nats", {}), **sections}
    return cfgmod.load(None, env={}, overrides=overrides)


@contextlib.asynccontextmanager
async def production_callout(
    bus: Bus, config: Config, data: DataDir
) -> AsyncIterator[CalloutService]:
    """The auth callout as ``twinhub up`` / ``twinhub callout`` runs it from ``config`` and
    ``data`` (its token issuer, JWKS, ...), in place of the session's for the block: the
    server asks one callout, and it must be this one. The session's is back afterwards."""
    await bus.callout.__aexit__(None, None, None)
    try:
        async with svc.run_callout(config, data) as callout:
            yield callout
    finally:
        await bus.callout.__aenter__()

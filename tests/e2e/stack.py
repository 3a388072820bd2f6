"""A whole twinhub stack on real servers for end-to-end tests.

The gateway publishes on ``twinhub.ev.>`` (the production subjects), so every e2e
test shares one stream on the session's NATS server and isolates itself by owner:
its projector consumes ``twinhub.ev.<owner>.>`` only.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from pymongo.asynchronous.database import AsyncDatabase

from auth.tokens import JwtValidator, TokenIssuer
from devicesim.config import DeviceConfig, GatewayAddress, TlsOptions
from devicesim.device import SimDevice
from eventstore.adapters.jetstream import JetStreamEventStore
from gateway.service import Gateway, GatewayConfig
from proto import binding, subjects
from proto.events import AnyEvent
from twin.adapters.mongo import MongoTwinStore
from twin.model import Twin
from twin.service import ProjectorConfig, TwinProjector
from twinhub_cli import pki

WAIT = 30.0


@dataclass
class Stack:
    owner: str
    store: JetStreamEventStore
    gateway: Gateway
    issuer: TokenIssuer
    twins: MongoTwinStore
    ca_file: Path
    projector: TwinProjector | None = None

    def token(self, device: str | None = None) -> str:
        import time

        return self.issuer.issue(self.owner, now=time.time(), ttl=600, device_id=device)

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
    nats_url: str,
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
    issuer = TokenIssuer(ec.generate_private_key(ec.SECP256R1()), kid="e2e")
    ctx, ca_file = server_tls(tmp)
    async with JetStreamEventStore.from_url(nats_url, timeout=store_timeout) as store:
        await store.provision()
        cfg = GatewayConfig(
            gateway_id="gw-e2e",
            tcp_bind=("127.0.0.1", 0),
            tls_bind=("127.0.0.1", 0),
            ssl_context=ctx,
            **gateway_kw,
        )
        twins = MongoTwinStore(db)
        await twins.ensure_indexes()
        gw_store = store if gateway_store is None else gateway_store(store)
        async with Gateway(cfg, gw_store, JwtValidator(issuer.public_keys), issuer) as gw:
            yield Stack(owner, store, gw, issuer, twins, ca_file)

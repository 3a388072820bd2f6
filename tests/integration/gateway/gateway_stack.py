"""The full gateway (:class:`gateway.service.Gateway`) on loopback with an in-memory event log,
and what hostile-input tests do with it: well-behaved devices, raw peers, counts to compare."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import cbor2
from cryptography.hazmat.primitives.asymmetric import ec

from auth.tokens import JwtValidator, TokenIssuer
from devicesim.config import DeviceConfig, GatewayAddress
from devicesim.device import DeviceState, SimDevice
from eventstore.memory import InMemoryEventStore
from gateway.adapters.coap import CoapServer
from gateway.service import Gateway, GatewayConfig

from .coap_peers import CHANGED, CONTENT_FORMAT, POST, RawPeer, request, uint

DEADLINE = 10.0
ACCOUNT, SESSION = "/oic/sec/account", "/oic/sec/session"


@dataclass
class Stack:
    gateway: Gateway
    issuer: TokenIssuer
    store: InMemoryEventStore
    owner: str

    @property
    def tcp(self) -> tuple[str, int]:
        address = self.gateway.tcp_address
        assert address is not None
        return address

    @property
    def tls(self) -> tuple[str, int]:
        address = self.gateway.tls_address
        assert address is not None
        return address

    @property
    def server(self) -> CoapServer:
        server = self.gateway._server
        assert server is not None
        return server

    def token(self, device_id: str | None = None) -> str:
        return self.issuer.issue(self.owner, now=time.time(), ttl=600, device_id=device_id)

    def device(self, **kw: Any) -> SimDevice:
        host, port = self.tcp
        config = DeviceConfig(
            gateway=GatewayAddress("coap+tcp", host, port),
            device_id=str(uuid.uuid4()),
            token=lambda di, owner: self.token(),
            owner=self.owner,
            **kw,
        )
        return SimDevice(config)

    async def well_behaved_device_works(self) -> None:
        """A simulated device signs up, signs in, publishes and goes online, then signs out."""
        device = self.device()
        await device.start()
        try:
            await device.wait_until(lambda d: d.state is DeviceState.ONLINE, DEADLINE)
        finally:
            await device.stop()

    def counts(self) -> dict[str, int]:
        """What must return to its baseline once hostile peers are gone."""
        server = self.gateway._server
        assert server is not None
        return {
            "sessions": len(self.gateway.conns),
            "devices": len(self.gateway.devices),
            "connections": len(server.connections),
            "unauthenticated": server.unauthenticated,
            "handshakes": server.handshakes,
            "tasks": len(asyncio.all_tasks()),
        }

    async def settle(self, baseline: dict[str, int], timeout: float = DEADLINE) -> None:
        """Wait until :meth:`counts` is back to ``baseline``."""
        try:
            async with asyncio.timeout(timeout):
                while self.counts() != baseline:
                    await asyncio.sleep(0.02)
        except TimeoutError:
            raise AssertionError(f"not back to {baseline}: {self.counts()}") from None


@contextlib.asynccontextmanager
async def running_gateway(
    *, store: InMemoryEventStore | None = None, **config: Any
) -> AsyncIterator[Stack]:
    issuer = TokenIssuer(ec.generate_private_key(ec.SECP256R1()), kid="test")
    store = store or InMemoryEventStore()
    await store.provision()
    config.setdefault("tcp_bind", ("127.0.0.1", 0))
    async with Gateway(
        GatewayConfig(gateway_id="gw-test", **config),
        store,
        JwtValidator(issuer.public_keys),
        issuer,
    ) as gw:
        yield Stack(gw, issuer, store, "o" + uuid.uuid4().hex[:10])


async def wait_for(condition: Callable[[], bool], timeout: float = DEADLINE) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


async def sign_in(stack: Stack, peer: RawPeer, device_id: str | None = None) -> str:
    """Sign up and sign in over a raw peer (OCF cloud endpoints); returns the device ID."""
    di = device_id or str(uuid.uuid4())
    cbor = [(CONTENT_FORMAT, uint(10000))]
    body = {"di": di, "accesstoken": stack.token(), "authprovider": "twinhub"}
    peer.send(request(POST, ACCOUNT, peer.token(), payload=cbor2.dumps(body), options=cbor))
    up = await peer.recv_until(CHANGED)
    answer = cbor2.loads(up.payload)
    body = {"di": di, "uid": answer["uid"], "accesstoken": answer["accesstoken"], "login": True}
    peer.send(request(POST, SESSION, peer.token(), payload=cbor2.dumps(body), options=cbor))
    await peer.recv_until(CHANGED)
    return di

"""An in-memory implementation of the gateway's device ports (:mod:`gateway.ports`).

:class:`MemoryDeviceServer` stands where :class:`gateway.adapters.coap.CoapServer` does, with no
socket: a test connects a :class:`MemoryDevice`, sends its requests to the gateway as the wire
would hand them over, and answers the gateway's requests with a handler of its own (the way
httpx's ``MockTransport`` answers a client's). Notifications of an observation are pushed with
:meth:`MemoryDevice.notify`.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import Self

from cryptography import x509

from gateway.adapters.coap import CoapServerConfig
from gateway.adapters.coap_messages import CoapRequest, CoapResponse
from gateway.ports import (
    CloseHandler,
    ConnectHandler,
    DeviceConnection,
    DeviceObservation,
    RequestHandler,
    Scheme,
)

DeviceHandler = Callable[[CoapRequest], CoapResponse]
"""How the device answers the gateway's requests (observations included: their first answer)."""


@dataclass(eq=False)
class MemoryObservation:
    first: CoapResponse
    on_notification: Callable[[CoapResponse], None]
    canceled: bool = False

    async def cancel(self) -> None:
        self.canceled = True


@dataclass(eq=False)
class MemoryDevice:
    """Both sides of one connection: the gateway's :class:`gateway.ports.DeviceConnection` and
    the device's (:meth:`send`, :meth:`notify`)."""

    server: MemoryDeviceServer
    handler: DeviceHandler
    scheme: Scheme = "coap+tcp"
    remote: str = "127.0.0.1:40000"
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    authenticated: bool = False
    released: tuple[str | None, int | None] | None = None
    close_reason: str | None = None
    received: list[CoapRequest] = field(default_factory=list)  # the gateway's requests
    observations: dict[str, MemoryObservation] = field(default_factory=dict)  # by path
    _closed: asyncio.Event = field(default_factory=asyncio.Event)
    _seq: itertools.count[int] = field(default_factory=lambda: itertools.count(2))

    # -- the gateway's side (gateway.ports.DeviceConnection) ------------------------------

    def peer_certificate(self) -> x509.Certificate | None:
        return None

    def mark_authenticated(self) -> None:
        self.authenticated = True

    async def request(self, request: CoapRequest, timeout: float) -> CoapResponse:
        self._check_open()
        self.received.append(request)
        return self.handler(request)

    async def observe(
        self,
        request: CoapRequest,
        on_notification: Callable[[CoapResponse], None],
        timeout: float,
    ) -> DeviceObservation:
        self._check_open()
        request = replace(request, observe=0)  # as on the wire: Observe=0 registers
        self.received.append(request)
        first = self.handler(request)
        obs = MemoryObservation(first, on_notification)
        if first.observe is not None:
            self.observations[request.path] = obs
        return obs

    def release(self, alternative_address: str | None = None, hold_off: int | None = None) -> None:
        self.released = (alternative_address, hold_off)
        self.server.lose(self, "released")

    async def close(self, reason: str) -> None:
        self.server.lose(self, reason)

    async def wait_closed(self) -> str:
        await self._closed.wait()
        assert self.close_reason is not None
        return self.close_reason

    def _check_open(self) -> None:
        if self.close_reason is not None:
            raise ConnectionError(f"connection closed: {self.close_reason}")

    # -- the device's side -----------------------------------------------------------------

    async def send(self, request: CoapRequest) -> CoapResponse:
        """A device request, answered as the gateway's request handler answers it."""
        self._check_open()
        # in a task of its own, as on the wire (the gateway.ports.DeviceServer contract)
        return await asyncio.create_task(self.server.on_request(self, request))

    def notify(self, path: str, response: CoapResponse) -> None:
        """A notification of the observation of ``path`` (the next sequence number)."""
        obs = self.observations[path]
        if response.observe is None:
            response = CoapResponse(
                response.code, response.payload, response.content_format, observe=next(self._seq)
            )
        obs.on_notification(response)


class MemoryDeviceServer:
    """A :class:`gateway.ports.DeviceServer` of in-memory connections (made by
    :class:`MemoryDevices`)."""

    def __init__(
        self,
        config: CoapServerConfig,
        *,
        on_request: RequestHandler,
        on_connect: ConnectHandler | None = None,
        on_close: CloseHandler | None = None,
    ) -> None:
        self.config = config
        self.on_request = on_request
        self.on_connect = on_connect
        self.on_close = on_close
        self.listening = False
        self.connections: dict[str, MemoryDevice] = {}
        self.tcp_address: tuple[str, int] | None = ("memory", 0)
        self.tls_address: tuple[str, int] | None = None

    def connect(self, handler: DeviceHandler, remote: str = "127.0.0.1:40000") -> MemoryDevice:
        """A device connects (refused connections are closed at once, as on the wire)."""
        assert self.listening, "not listening"
        device = MemoryDevice(self, handler, remote=remote)
        conn: DeviceConnection = device
        refused = self.on_connect(conn) if self.on_connect is not None else None
        self.connections[device.id] = device
        if refused is not None:
            self.lose(device, refused)
        return device

    def lose(self, device: MemoryDevice, reason: str) -> None:
        if device.close_reason is not None:
            return
        device.close_reason = reason
        device._closed.set()
        self.connections.pop(device.id, None)
        if self.on_close is not None:
            self.on_close(device, reason)

    def stop_listening(self) -> None:
        self.listening = False

    async def __aenter__(self) -> Self:
        self.listening = True
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.listening = False
        for device in list(self.connections.values()):
            self.lose(device, "server shutting down")


class MemoryDevices:
    """A :class:`gateway.ports.DeviceServerFactory` of :class:`MemoryDeviceServer`:
    ``Gateway(..., server_factory=devices)`` runs a gateway with no socket, and
    :attr:`server` is the server it made."""

    def __init__(self) -> None:
        self._server: MemoryDeviceServer | None = None

    @property
    def server(self) -> MemoryDeviceServer:
        assert self._server is not None, "the gateway has not started"
        return self._server

    def __call__(
        self,
        config: CoapServerConfig,
        *,
        on_request: RequestHandler,
        on_connect: ConnectHandler | None = None,
        on_close: CloseHandler | None = None,
    ) -> MemoryDeviceServer:
        self._server = MemoryDeviceServer(
            config, on_request=on_request, on_connect=on_connect, on_close=on_close
        )
        return self._server

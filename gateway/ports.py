"""The ports the gateway's driver (:class:`gateway.service.Gateway`) depends on.

The driver needs a device connection to ask things of (requests, observations, Release,
close) and a server that makes such connections and hands their requests over. Declaring
both here, instead of importing the CoAP adapter's classes, is what lets the driver run over
something other than sockets: :mod:`gateway.adapters.coap` satisfies them on the wire, an
in-memory implementation does in tests (``tests/unit/gateway/memory_devices.py``), the way
httpx's mock transport stands in for the network.

The validator's key refresh is declared too, so the driver asks a validator whether its keys
can be refreshed through an attribute it declares, not by probing for one.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import TYPE_CHECKING, Literal, Protocol, Self, runtime_checkable

from cryptography import x509

from gateway.adapters.coap_messages import CoapRequest, CoapResponse

if TYPE_CHECKING:
    from gateway.adapters.coap import CoapServerConfig

Scheme = Literal["coap+tcp", "coaps+tcp"]


class DeviceObservation(Protocol):
    """An observation registered on a device (its first response and its cancellation)."""

    @property
    def first(self) -> CoapResponse: ...

    async def cancel(self) -> None: ...


class DeviceConnection(Protocol):
    """One device connection as the driver uses it (:class:`gateway.adapters.coap.Connection`)."""

    @property
    def id(self) -> str: ...

    @property
    def scheme(self) -> Scheme: ...

    @property
    def remote(self) -> str: ...

    def peer_certificate(self) -> x509.Certificate | None: ...

    def mark_authenticated(self) -> None:
        """The connection signed in: the server's limits on unauthenticated ones no longer apply."""
        ...

    async def request(self, request: CoapRequest, timeout: float) -> CoapResponse: ...  # noqa: ASYNC109

    async def observe(
        self,
        request: CoapRequest,
        on_notification: Callable[[CoapResponse], None],
        timeout: float,  # noqa: ASYNC109
    ) -> DeviceObservation: ...

    def release(self, alternative_address: str | None = None, hold_off: int | None = None) -> None:
        """Ask the device to go (RFC 8323 Release), to ``alternative_address`` if given."""
        ...

    async def close(self, reason: str) -> None: ...

    async def wait_closed(self) -> str: ...


RequestHandler = Callable[[DeviceConnection, CoapRequest], Awaitable[CoapResponse]]
"""A device request; the response it returns is the reply written to the device."""
ConnectHandler = Callable[[DeviceConnection], str | None]
"""A connection is established: None accepts it, a reason refuses it."""
CloseHandler = Callable[[DeviceConnection, str], None]
"""The connection is gone (called once per connection)."""


class DeviceServer(Protocol):
    """The device endpoints (an async context manager): listens while entered.

    Contract the driver relies on: each device request's handler (:data:`RequestHandler`) runs
    in an asyncio task of its own, and the response it returns is handed to the connection
    before that task ends -- so a driver that must close the connection after a reply (a
    sign-off, a refused sign-in) closes it when that task is done.
    """

    @property
    def tcp_address(self) -> tuple[str, int] | None: ...

    @property
    def tls_address(self) -> tuple[str, int] | None: ...

    def stop_listening(self) -> None: ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


class DeviceServerFactory(Protocol):
    """Makes a gateway's :class:`DeviceServer` from its listener settings and handlers;
    :class:`gateway.adapters.coap.CoapServer` is one (the default)."""

    def __call__(
        self,
        config: CoapServerConfig,
        *,
        on_request: RequestHandler,
        on_connect: ConnectHandler | None = None,
        on_close: CloseHandler | None = None,
    ) -> DeviceServer: ...


@runtime_checkable
class RefreshableKeys(Protocol):
    """A token validator whose signing keys may be refreshed (a JWKS URL): a token naming an
    unknown key asks for a refresh (at the source's bounded rate), then is checked again."""

    @property
    def refreshable(self) -> bool: ...

    async def refresh_keys(self) -> bool: ...

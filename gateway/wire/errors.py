"""What a caller of :class:`gateway.wire.connection.CoapTcpConnection` can be refused."""

from __future__ import annotations

from gateway.errors import GatewayError


class WireError(GatewayError):
    """Root of the errors of :mod:`gateway.wire`."""

    code = "5.03"


class ConnectionNotOpen(WireError, ConnectionError):
    """The connection is releasing or closed: no new request goes out on it."""


class MessageTooLarge(WireError, ValueError):
    """A message above the Max-Message-Size the peer advertised (RFC 8323 section 5.3.1; 1152
    bytes until its CSM arrives): it was not sent."""

    code = "4.13"

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"message of {size} bytes above the peer's Max-Message-Size {limit}")
        self.size = size
        self.limit = limit


class UnknownHandle(WireError, LookupError):
    """A handle that is not (or no longer) live on this connection."""

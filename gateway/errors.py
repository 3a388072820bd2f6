"""The exception tree of :mod:`gateway`, and the one table mapping errors to CoAP codes."""

from __future__ import annotations


class GatewayError(Exception):
    """Root of every error raised by :mod:`gateway`."""

    code = "5.00"


class BadRequest(GatewayError, ValueError):
    """The device sent a malformed request (missing field, wrong type, bad payload)."""

    code = "4.00"


class Unauthorized(GatewayError, PermissionError):
    """Authentication or authorization failed; the connection is closed after the reply."""

    code = "4.01"


class Forbidden(GatewayError, PermissionError):
    code = "4.03"


class NotFound(GatewayError, LookupError):
    code = "4.04"


class MethodNotAllowed(GatewayError, ValueError):
    code = "4.05"


class Unavailable(GatewayError, ConnectionError):
    """A backend (the event log) is unavailable; the device should retry."""

    code = "5.03"


class TokenError(Unauthorized):
    """A token failed validation (signature, expiry, issuer, audience, claims)."""


class UnknownKey(TokenError):
    """The token names a signing key (``kid``) the key set does not hold (yet): a key source
    that can refresh (a JWKS URL) may know it after a refresh."""

    def __init__(self, kid: str | None) -> None:
        super().__init__(f"unknown signing key {kid!r}")
        self.kid = kid


def coap_code(error: BaseException) -> str:
    """The CoAP response code for an error (5.00 for anything unexpected)."""
    if isinstance(error, GatewayError):
        return error.code
    return "5.00"

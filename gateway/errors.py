"""The exception tree of :mod:`gateway`, and the one table mapping errors to CoAP codes.

Token validation is :mod:`auth`; its errors are translated here (:func:`from_auth`): a refused
token is 4.01, a key source or provider that cannot be reached is 5.03.
"""

from __future__ import annotations

from auth.errors import AuthError, KeySourceUnavailable


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


def from_auth(error: AuthError) -> GatewayError:
    """The gateway's error for an error of :mod:`auth`, message kept."""
    if isinstance(error, KeySourceUnavailable):
        return Unavailable(str(error))
    return Unauthorized(str(error))


def coap_code(error: BaseException) -> str:
    """The CoAP response code for an error (5.00 for anything unexpected)."""
    if isinstance(error, AuthError):
        error = from_auth(error)
    if isinstance(error, GatewayError):
        return error.code
    return "5.00"

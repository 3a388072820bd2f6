"""The exception tree of :mod:`auth`.

Callers translate it at their seam: the gateway to CoAP codes (``gateway.errors.coap_code``:
a refused token 4.01, an unavailable key source 5.03), the command API to ``unauthorized``.
"""

from __future__ import annotations


class AuthError(Exception):
    """Root of every error raised by :mod:`auth`."""


class TokenError(AuthError, PermissionError):
    """A token failed validation (signature, expiry, issuer, audience, claims, lifetime)."""


class UnknownKey(TokenError):
    """The token names a signing key (``kid``) the key set does not hold (yet): a key source
    that can refresh (a JWKS URL) may know it after a refresh."""

    def __init__(self, kid: str | None) -> None:
        super().__init__(f"unknown signing key {kid!r}")
        self.kid = kid


class KeySourceUnavailable(AuthError, ConnectionError):
    """An HTTP peer of token validation (a JWKS URL, an OAuth2 provider's discovery document
    or token endpoint) could not be reached, failed (5xx) or answered garbage: retry later."""

"""The one table of CoAP codes, errors of auth included (translated at the gateway's seam)."""

from __future__ import annotations

import socket

import pytest

from auth.errors import AuthError, KeySourceUnavailable, TokenError, UnknownKey
from gateway.errors import (
    BadRequest,
    GatewayError,
    Unauthorized,
    Unavailable,
    coap_code,
    from_auth,
)
from gateway.oauth import OAuthProvider, ProviderConfig


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (TokenError("token expired"), "4.01"),
        (UnknownKey("k9"), "4.01"),
        (AuthError("anything else of auth"), "4.01"),
        (KeySourceUnavailable("https://idp/jwks unreachable"), "5.03"),
        (Unauthorized("x"), "4.01"),
        (Unavailable("x"), "5.03"),
        (BadRequest("x"), "4.00"),
        (RuntimeError("a bug"), "5.00"),
    ],
)
def test_coap_codes(error: Exception, code: str) -> None:
    assert coap_code(error) == code


def test_auth_errors_become_gateway_errors_with_their_message() -> None:
    refused = from_auth(UnknownKey("k9"))
    assert type(refused) is Unauthorized and str(refused) == "unknown signing key 'k9'"
    down = from_auth(KeySourceUnavailable("idp down"))
    assert type(down) is Unavailable and str(down) == "idp down"
    assert all(isinstance(e, GatewayError) for e in (refused, down))


async def test_an_unreachable_provider_is_the_gateways_unavailable() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    provider = OAuthProvider(
        ProviderConfig(
            name="acme",
            client_id="id",
            client_secret="secret",
            token_endpoint=f"http://127.0.0.1:{port}/token",
            jwks_uri=f"http://127.0.0.1:{port}/jwks",
        ),
        time_limit=2.0,
    )
    with pytest.raises(Unavailable, match="unreachable"):
        await provider.exchange("code", 0.0)

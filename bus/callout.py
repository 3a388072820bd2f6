"""The auth callout's core, sans-IO: an authorization request in, a signed response out.

nats-server (2.10+) sends every connection that is not one of the service users to the callout
as an *authorization request*: a JWT signed by the server, carrying the client's connect
options (the application's twinhub token is its ``auth_token``) and a user NKey the server
generated for this connection. The callout answers with an *authorization response* JWT that
either holds a user JWT (placed in the APPS account, with the owner's permissions of
:func:`bus.permissions.application_permissions`, expiring with the token) or an error. Both
JWTs are signed with the issuer account key named in the server's ``auth_callout.issuer``.

The JWT format is NATS's (header ``{"typ":"JWT","alg":"ed25519-nkey"}``, base64url parts, an
Ed25519 signature by an NKey); signing is the ``nkeys`` package's. Requests are authentic by
construction: they arrive in the AUTH account, where the callout's own user is the only
client and may publish nothing but replies, so only the server can send one.

Time is an input (``now``); the token validator is injected (the one the command API uses).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

from bus.permissions import ACCOUNT_APPS, Permissions, application_permissions

__all__ = [
    "AuthRequest",
    "Caller",
    "CalloutError",
    "Signer",
    "TokenCheck",
    "decode_request",
    "deny",
    "grant",
]

JWT_HEADER: Final = {"typ": "JWT", "alg": "ed25519-nkey"}
REQUEST_AUDIENCE: Final = "nats-authorization-request"
MAX_REQUEST: Final = 64 * 1024


class CalloutError(ValueError):
    """An authorization request that cannot be read (never answered with a grant)."""


class Signer(Protocol):
    """An NKey that signs: ``nkeys.KeyPair`` of the issuer account."""

    def sign(self, input: bytes) -> bytes: ...

    @property
    def public_key(self) -> bytes: ...


class Caller(Protocol):
    """What a valid application token says (``auth.tokens.Claims`` is one)."""

    @property
    def owner(self) -> str: ...

    @property
    def expires_at(self) -> float | None: ...


class TokenCheck(Protocol):
    def validate(self, token: str, now: float) -> Caller: ...


@dataclass(frozen=True, slots=True)
class AuthRequest:
    user_nkey: str
    server_id: str
    token: str | None
    client_host: str
    client_name: str
    client_id: int


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def _claims_of(token: bytes) -> dict[str, Any]:
    try:
        parts = token.decode("ascii").split(".")
        if len(parts) != 3:
            raise CalloutError("not a JWT")
        header = json.loads(_unb64(parts[0]))
        claims = json.loads(_unb64(parts[1]))
    except (UnicodeDecodeError, ValueError, binascii.Error, RecursionError) as e:
        raise CalloutError(f"unreadable authorization request: {e}") from e
    if not isinstance(header, dict) or header.get("alg") != JWT_HEADER["alg"]:
        raise CalloutError("authorization request is not an NKey-signed JWT")
    if not isinstance(claims, dict):
        raise CalloutError("authorization request claims are not an object")
    return claims


def decode_request(data: bytes) -> AuthRequest:
    """The request the server sent (plain, not xkey-encrypted: the server config sets no xkey)."""
    if len(data) > MAX_REQUEST:
        raise CalloutError("authorization request too large")
    claims = _claims_of(data.strip())
    if claims.get("aud") != REQUEST_AUDIENCE:
        raise CalloutError(f"not an authorization request (aud {claims.get('aud')!r})")
    nats = claims.get("nats")
    if not isinstance(nats, dict) or nats.get("type") != "authorization_request":
        raise CalloutError("not an authorization request (type)")
    user = nats.get("user_nkey")
    server = nats.get("server_id")
    if not isinstance(user, str) or not user.startswith("U"):
        raise CalloutError("authorization request without a user NKey")
    if not isinstance(server, dict) or not isinstance(server.get("id"), str):
        raise CalloutError("authorization request without a server id")
    opts = nats.get("connect_opts") or {}
    info = nats.get("client_info") or {}
    token = opts.get("auth_token") if isinstance(opts, dict) else None
    client_id = info.get("id", 0) if isinstance(info, dict) else 0
    return AuthRequest(
        user_nkey=user,
        server_id=server["id"],
        token=token if isinstance(token, str) and token else None,
        client_host=str(info.get("host", "")) if isinstance(info, dict) else "",
        client_name=str(info.get("name", "")) if isinstance(info, dict) else "",
        client_id=client_id if type(client_id) is int else 0,  # informational, like host
    )


def encode_jwt(claims: Mapping[str, Any], signer: Signer) -> str:
    """A NATS JWT: ``jti`` is the hash of the other claims, as nats-io/jwt computes it."""
    body = dict(claims)
    body["jti"] = ""
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).digest()
    body["jti"] = base64.b32encode(digest).decode().rstrip("=")
    signing_input = _b64(json.dumps(JWT_HEADER).encode()) + "." + _b64(json.dumps(body).encode())
    return signing_input + "." + _b64(signer.sign(signing_input.encode()))


def _permissions_claims(p: Permissions) -> dict[str, Any]:
    pub: dict[str, Any] = {"allow": list(p.pub_allow)} if p.pub_allow else {}
    if p.pub_deny:
        pub["deny"] = list(p.pub_deny)
    sub: dict[str, Any] = {"allow": list(p.sub_allow)} if p.sub_allow else {}
    if p.sub_deny:
        sub["deny"] = list(p.sub_deny)
    return {"pub": pub, "sub": sub}


def _response(request: AuthRequest, signer: Signer, now: float, nats: dict[str, Any]) -> bytes:
    issuer = bytes(signer.public_key).decode()
    claims = {
        "iat": int(now),
        "iss": issuer,
        "sub": request.user_nkey,
        "aud": request.server_id,
        "nats": nats | {"type": "authorization_response", "version": 2},
    }
    return encode_jwt(claims, signer).encode()


def grant(
    request: AuthRequest,
    caller: Caller,
    signer: Signer,
    now: float,
    *,
    stream: str,
    reserved: Sequence[str],
    max_lifetime: float,
) -> tuple[bytes, int]:
    """A response admitting the client as an application of ``caller.owner``, and the expiry
    of its user JWT: the token's, never more than ``max_lifetime`` from now."""
    expires = now + max_lifetime
    if caller.expires_at is not None:
        expires = min(expires, caller.expires_at)
    exp = max(int(now) + 1, int(expires))
    perms = application_permissions(caller.owner, stream, reserved)
    user = {
        "iat": int(now),
        "iss": bytes(signer.public_key).decode(),
        "sub": request.user_nkey,
        "name": caller.owner,
        "aud": ACCOUNT_APPS,  # the account the user is placed in (server config mode)
        "exp": exp,
        "nats": _permissions_claims(perms)
        | {"subs": -1, "data": -1, "payload": -1, "type": "user", "version": 2},
    }
    return _response(request, signer, now, {"jwt": encode_jwt(user, signer)}), exp


def deny(request: AuthRequest, signer: Signer, now: float, reason: str) -> bytes:
    """A response refusing the client; the server logs ``reason`` and closes the connection."""
    return _response(request, signer, now, {"error": reason[:200]})

"""Access tokens of simple devices: the contract between who issues them and the gateway.

A simple device (ThingsBoard's device API, PRODUCT.md 4.2) puts its access token in every
request's URL: ``/api/v1/{token}/telemetry``. Tokens are random (:func:`new_token`, 192 bits),
shown once when issued and **stored only hashed**: the registry is the JetStream stream
:data:`TOKEN_STREAM`, one message per subject (the last one kept), on::

    twinhub.devtoken.<SHA-256 of the token, hex>      a TokenRecord (JSON)

so the gateway finds a token's device with one direct get of the last message on its hash's
subject (:func:`token_subject`), and nobody who reads the registry learns a token. A token is
revoked by writing a record with ``state: "revoked"`` on its subject (kept, so a revoked token
is told apart from an unknown one in the logs; both get 4.01); rotation writes the new token's
record and revokes the old one. SHA-256 without salt or stretching is right here: the input is
192 random bits, not a password.

Events carry a token's full hash (``token_hash``: it finds the registry record, e.g. to revoke
it, and reveals nothing of the token); ``token_id`` (:func:`token_id`) is its short name for
people: the first 12 hex digits.

Only the twin service (the command API's provisioning operations) writes the registry; the
gateway reads it (bus/permissions.py); applications get nothing of it.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from typing import Final, Literal

import msgspec

__all__ = [
    "ALL_TOKENS",
    "TOKEN_STREAM",
    "TokenRecord",
    "decode_record",
    "encode_record",
    "hash_subject",
    "looks_like_token",
    "new_token",
    "token_hash",
    "token_id",
    "token_subject",
]

TOKEN_STREAM: Final = "TWINHUB_DEVICE_TOKENS"
SUBJECT_PREFIX: Final = "twinhub.devtoken"
ALL_TOKENS: Final = f"{SUBJECT_PREFIX}.>"
TOKEN_BYTES: Final = 24  # 192 bits; base64url: 32 characters
MAX_TOKEN_LENGTH: Final = 128
_TOKEN_RE: Final = re.compile(r"[A-Za-z0-9._~-]{1," + str(MAX_TOKEN_LENGTH) + "}")

TokenState = Literal["active", "revoked"]


class TokenRecord(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=False):
    """What the registry says of one token (by its hash)."""

    owner: str
    device_id: str
    state: TokenState = "active"
    profile: str = "thingsboard"
    issued_at_ms: int = 0  # when this record was written (ms since the epoch)


def new_token() -> str:
    """A fresh access token: 192 random bits, URL-safe (unreserved characters of RFC 3986,
    so it goes into a CoAP Uri-Path as it is)."""
    return secrets.token_urlsafe(TOKEN_BYTES)


def looks_like_token(text: str) -> bool:
    """Whether ``text`` could be a token at all (cheap, before any lookup): 1..128 unreserved
    characters. ThingsBoard's own tokens (20 alphanumerics) pass; so does anything a user set
    by hand within that alphabet."""
    return _TOKEN_RE.fullmatch(text) is not None


def token_hash(token: str) -> str:
    """SHA-256 of the token's UTF-8 bytes, lower-case hex (the registry's key)."""
    return hashlib.sha256(token.encode()).hexdigest()


def token_id(token_or_hash: str, *, hashed: bool = False) -> str:
    """The public name of a token: the first 12 hex digits of its hash."""
    h = token_or_hash if hashed else token_hash(token_or_hash)
    return h[:12]


def token_subject(token: str) -> str:
    """The registry subject of ``token`` (by its hash)."""
    return hash_subject(token_hash(token))


def hash_subject(hashed: str) -> str:
    """The registry subject of a token by its hash (as events carry it)."""
    return f"{SUBJECT_PREFIX}.{hashed}"


def encode_record(record: TokenRecord) -> bytes:
    return msgspec.json.encode(record)


def decode_record(data: bytes) -> TokenRecord:
    """Raises ``msgspec.ValidationError`` / ``msgspec.DecodeError`` on a malformed record."""
    return msgspec.json.decode(data, type=TokenRecord)

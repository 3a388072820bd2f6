"""JWT validation (PyJWT) and the development token issuer.

:class:`JwtValidator` is the one place tokens are checked: signature against
configured public keys (by ``kid`` when the token names one), an allow-list of
algorithms (never ``none``, never HS* with an asymmetric key), ``exp``, ``nbf``,
``iss``, ``aud`` with a small clock-skew allowance. The owner comes from a
configurable claim (default ``sub``), the device ID from an optional one.

Validation is pure CPU work with keys already loaded, so the gateway's sans-IO session
core can call it. Key sources that need I/O (a JWKS URL, an OAuth2 exchange) refresh
a :class:`KeySet` from the driver and plug in behind the same
:class:`TokenValidator` protocol. Refusals are :class:`auth.errors.TokenError`.
The stricter rules for application tokens are :mod:`auth.application`.

:class:`TokenIssuer` signs ES256 tokens with a key from the data dir: the tokens
``twinhub token`` prints, and the access/refresh tokens the gateway hands out at
sign-up and refresh.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from auth.errors import TokenError, UnknownKey

ASYMMETRIC_ALGORITHMS: Final = (
    "ES256",
    "ES384",
    "ES512",
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "EdDSA",
)
TOKEN_ALGORITHMS: Final = ("ES256", "ES384", "RS256", "PS256", "EdDSA")
"""What a deployment's validators accept (its own keys, ``auth.public_keys``, JWKS, OAuth2)."""
REFRESH_TYPE: Final = "refresh"
DEFAULT_ISSUER: Final = "twinhub"
DEFAULT_AUDIENCE: Final = "twinhub"
DEVICE_BINDING_CLAIM: Final = "twinhub/device"
"""The device a gateway-issued token is bound to; honoured when no device-ID claim is
configured (a configured claim replaces it)."""


@dataclass(frozen=True, slots=True)
class Claims:
    """What a valid token says about its bearer."""

    owner: str
    device_id: str | None
    expires_at: float | None
    token_type: str = "access"
    raw: Mapping[str, Any] = field(default_factory=dict)


class TokenValidator(Protocol):
    """Validates a token at ``now`` (seconds since the epoch); raises
    :class:`~auth.errors.TokenError` (:class:`~auth.errors.UnknownKey` for an unknown ``kid``)
    for a bad one."""

    def validate(self, token: str, now: float) -> Claims: ...


PublicKey = ec.EllipticCurvePublicKey | Any


@dataclass(frozen=True, slots=True)
class KeySet:
    """Public keys by key ID ("" for a key without one)."""

    keys: Mapping[str, PublicKey]

    def find(self, kid: str | None) -> PublicKey:
        if kid is not None and kid in self.keys:
            return self.keys[kid]
        if kid is None and len(self.keys) == 1:
            return next(iter(self.keys.values()))
        raise UnknownKey(kid)


class KeyLookup(Protocol):
    """Where a validator finds a token's key: a :class:`KeySet`, or a refreshable source
    (:class:`auth.jwks.JwksKeys`) that raises :class:`UnknownKey` until it knows the key."""

    def find(self, kid: str | None) -> PublicKey: ...


class RefreshableKeys(KeyLookup, Protocol):
    async def refresh(self) -> bool:
        """Fetch the keys again unless fetched too recently; True when fetched."""
        ...


class JwtValidator:
    """Validates JWTs against a key set (see module doc)."""

    def __init__(
        self,
        keys: KeyLookup,
        *,
        issuer: str | None = DEFAULT_ISSUER,
        audience: str | None = DEFAULT_AUDIENCE,
        owner_claim: str = "sub",
        device_claim: str | None = None,
        algorithms: tuple[str, ...] = ("ES256",),
        leeway: float = 30.0,
    ) -> None:
        bad = [a for a in algorithms if a not in ASYMMETRIC_ALGORITHMS]
        if bad:
            raise ValueError(f"algorithms not allowed: {bad}")
        self.keys = keys
        self.issuer = issuer
        self.audience = audience
        self.owner_claim = owner_claim
        self.device_claim = device_claim
        self.algorithms = algorithms
        self.leeway = leeway

    @property
    def refreshable(self) -> bool:
        return hasattr(self.keys, "refresh")

    async def refresh_keys(self) -> bool:
        """Refresh a refreshable key source (the driver's answer to an unknown ``kid``)."""
        refresh = getattr(self.keys, "refresh", None)
        if refresh is None:
            return False
        return bool(await refresh())

    def validate(self, token: str, now: float) -> Claims:
        if not token or len(token) > 16_384:
            raise TokenError("missing or oversized token")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError as e:
            raise TokenError(f"malformed token: {e}") from e
        alg = header.get("alg")
        if alg not in self.algorithms:
            raise TokenError(f"token algorithm {alg!r} not allowed")
        key = self.keys.find(header.get("kid"))
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key=key,
                algorithms=list(self.algorithms),
                audience=self.audience,
                issuer=self.issuer,
                leeway=0,
                options={
                    "verify_exp": False,  # checked below against the injected clock
                    "verify_nbf": False,
                    "verify_iat": False,
                    "verify_aud": self.audience is not None,
                    "verify_iss": self.issuer is not None,
                },
            )
        except jwt.InvalidTokenError as e:
            raise TokenError(f"invalid token: {e}") from e
        exp = claims.get("exp")
        if exp is not None:
            if not isinstance(exp, int | float):
                raise TokenError("claim exp is not a number")
            if now > exp + self.leeway:
                raise TokenError("token expired")
        nbf = claims.get("nbf")
        if isinstance(nbf, int | float) and now + self.leeway < nbf:
            raise TokenError("token not yet valid")
        owner = claims.get(self.owner_claim)
        if not isinstance(owner, str) or not owner:
            raise TokenError(f"token has no owner claim {self.owner_claim!r}")
        device: str | None = None
        if self.device_claim is not None:
            d = claims.get(self.device_claim)
            if not isinstance(d, str) or not d:
                raise TokenError(f"token has no device claim {self.device_claim!r}")
            device = d
        elif isinstance(claims.get(DEVICE_BINDING_CLAIM), str):
            device = claims[DEVICE_BINDING_CLAIM]
        return Claims(
            owner=owner,
            device_id=device,
            expires_at=float(exp) if exp is not None else None,
            token_type=str(claims.get("typ", "access")),
            raw=claims,
        )


class TokenIssuer:
    """Signs ES256 tokens (development tokens, gateway-issued access/refresh tokens)."""

    def __init__(
        self,
        private_key: ec.EllipticCurvePrivateKey,
        *,
        kid: str,
        issuer: str = DEFAULT_ISSUER,
        audience: str = DEFAULT_AUDIENCE,
        owner_claim: str = "sub",
        device_claim: str | None = None,
    ) -> None:
        self.private_key = private_key
        self.kid = kid
        self.issuer = issuer
        self.audience = audience
        self.owner_claim = owner_claim
        # A configured device-ID claim is required in every token the gateway accepts, its own
        # access/refresh tokens included: they carry the device ID under that name too.
        self.device_claim = device_claim

    @property
    def public_keys(self) -> KeySet:
        return KeySet({self.kid: self.private_key.public_key()})

    def issue(
        self,
        owner: str,
        *,
        now: float,
        ttl: float | None,
        device_id: str | None = None,
        token_type: str = "access",
        extra: Mapping[str, Any] | None = None,
    ) -> str:
        claims: dict[str, Any] = {
            self.owner_claim: owner,
            "iss": self.issuer,
            "aud": self.audience,
            "iat": int(now),
            "jti": str(uuid.uuid4()),
        }
        if ttl is not None:
            claims["exp"] = int(now + ttl)
        if device_id is not None:
            claims[DEVICE_BINDING_CLAIM] = device_id
            if self.device_claim:
                claims[self.device_claim] = device_id
        if token_type != "access":
            claims["typ"] = token_type
        if extra:
            claims.update(extra)
        return jwt.encode(claims, self.private_key, algorithm="ES256", headers={"kid": self.kid})


SIGNING_KEY_FILE: Final = "jwt-signing-key.pem"


def load_or_create_signing_key(keys_dir: Path) -> tuple[ec.EllipticCurvePrivateKey, str]:
    """The ES256 signing key of a local stack (created on first use) and its key ID."""
    keys_dir.mkdir(parents=True, exist_ok=True)
    path = keys_dir / SIGNING_KEY_FILE
    if path.exists():
        loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(loaded, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{path} is not an EC private key")
        key = loaded
    else:
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        os.replace(tmp, path)
        (keys_dir / "jwt-signing-key.pub.pem").write_bytes(
            key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
    return key, key_id(key)


def key_id(key: ec.EllipticCurvePrivateKey) -> str:
    """A stable key ID derived from the public key."""
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return uuid.uuid5(uuid.NAMESPACE_OID, der.hex()).hex[:16]


def load_public_keys(paths: Mapping[str, Path]) -> KeySet:
    """Public keys from PEM files, by key ID."""
    out: dict[str, PublicKey] = {}
    for kid, p in paths.items():
        out[kid] = serialization.load_pem_public_key(p.read_bytes())
    return KeySet(out)

"""OAuth2 sign-up: exchanging a device's authorization code at an external provider.

A device signing up with ``authprovider`` naming a configured provider sends an OAuth2
authorization code as its ``accesstoken``. The session emits ``ExchangeCode``; the driver calls
:meth:`OAuthProvider.exchange`, which POSTs the code to the provider's token endpoint
(``grant_type=authorization_code``, ``code``, ``client_id``, ``client_secret``, ``redirect_uri``
when configured; form-encoded), takes the JWT the provider returns (``access_token`` or
``id_token``, per configuration) and validates it against the provider's JWKS
(:class:`auth.jwks.JwksKeys`: an unknown ``kid`` refreshes it, at a bounded rate). With OIDC
discovery (``<issuer>/.well-known/openid-configuration``) the token endpoint, the JWKS URI and
the issuer come from the discovery document, fetched once (again after a failure).

Errors: a refused code (4xx from the token endpoint, no token, a token that does not validate)
is :class:`CodeRefused` (4.01); a provider that cannot be reached or fails (5xx, timeout,
garbage) is :class:`gateway.errors.Unavailable` (5.03: the code was not spent, retry),
translated here from :class:`auth.errors.KeySourceUnavailable`.

Providers are configured as one string each (``auth.oauth_providers``)::

    NAME;discovery=https://idp.example/;client_id_file=/run/secrets/id;client_secret_file=...

keys: ``discovery`` (issuer URL, or the full ``.well-known`` URL) or both ``token_endpoint``
and ``jwks_uri``; ``client_id`` or ``client_id_file``; ``client_secret_file``; optional
``redirect_uri``, ``token`` (``access_token``, the default, or ``id_token``), ``issuer`` (the
discovered one by default), ``audience`` (default: the client ID; ``-`` skips the check).
"""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from auth.errors import KeySourceUnavailable, TokenError, UnknownKey
from auth.jwks import JwksKeys, check_url, get_json, http_request
from auth.tokens import TOKEN_ALGORITHMS, Claims, JwtValidator
from gateway.errors import Unauthorized, Unavailable

log = logging.getLogger(__name__)

WELL_KNOWN: Final = "/.well-known/openid-configuration"
_KEYS: Final = frozenset(
    {
        "discovery",
        "token_endpoint",
        "jwks_uri",
        "client_id",
        "client_id_file",
        "client_secret_file",
        "redirect_uri",
        "token",
        "issuer",
        "audience",
    }
)


class CodeRefused(Unauthorized):
    """The provider refused the code, or its token did not validate."""


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    name: str
    client_id: str
    client_secret: str
    discovery_url: str = ""
    token_endpoint: str = ""
    jwks_uri: str = ""
    redirect_uri: str = ""
    token_field: str = "access_token"
    issuer: str = ""
    audience: str | None = None  # None: the client ID; "": not checked


def parse_provider(spec: str, read: Callable[[Path], str] | None = None) -> ProviderConfig:
    """One ``auth.oauth_providers`` entry; ValueError names what is wrong."""

    def read_secret(path: str) -> str:
        try:
            text = read(Path(path)) if read else Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise ValueError(f"provider {name!r}: cannot read {path}: {e}") from None
        if not text.strip():
            raise ValueError(f"provider {name!r}: {path} is empty")
        return text.strip()

    name, *items = [p.strip() for p in spec.split(";")]
    if not name or "=" in name:
        raise ValueError(f"provider entry {spec!r} must start with the provider's name")
    kv: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in _KEYS:
            raise ValueError(f"provider {name!r}: unknown setting {item!r}")
        kv[key] = value.strip()
    for key in ("discovery", "token_endpoint", "jwks_uri", "redirect_uri"):
        if kv.get(key):
            check_url(kv[key], f"provider {name!r} {key}")
    if not kv.get("discovery") and not (kv.get("token_endpoint") and kv.get("jwks_uri")):
        raise ValueError(f"provider {name!r}: needs discovery, or token_endpoint and jwks_uri")
    if kv.get("client_id_file"):
        client_id = read_secret(kv["client_id_file"])
    elif kv.get("client_id"):
        client_id = kv["client_id"]
    else:
        raise ValueError(f"provider {name!r}: needs client_id_file (or client_id)")
    if not kv.get("client_secret_file"):
        raise ValueError(f"provider {name!r}: needs client_secret_file")
    token_field = kv.get("token", "access_token")
    if token_field not in ("access_token", "id_token"):
        raise ValueError(f"provider {name!r}: token must be access_token or id_token")
    audience = kv.get("audience")
    return ProviderConfig(
        name=name,
        client_id=client_id,
        client_secret=read_secret(kv["client_secret_file"]),
        discovery_url=kv.get("discovery", ""),
        token_endpoint=kv.get("token_endpoint", ""),
        jwks_uri=kv.get("jwks_uri", ""),
        redirect_uri=kv.get("redirect_uri", ""),
        token_field=token_field,
        issuer=kv.get("issuer", ""),
        audience="" if audience == "-" else audience,
    )


class OAuthProvider:
    """One provider: discovery (once), code exchange, token validation (see module doc)."""

    def __init__(
        self,
        config: ProviderConfig,
        *,
        owner_claim: str = "sub",
        device_claim: str | None = None,
        algorithms: tuple[str, ...] = TOKEN_ALGORITHMS,
        time_limit: float = 10.0,
        min_refresh: float = 30.0,
    ) -> None:
        self.config = config
        self.owner_claim = owner_claim
        self.device_claim = device_claim
        self.algorithms = algorithms
        self.time_limit = time_limit
        self.min_refresh = min_refresh
        self._validator: JwtValidator | None = None
        self._token_endpoint = config.token_endpoint
        self._lock = asyncio.Lock()

    @property
    def name(self) -> str:
        return self.config.name

    async def _ready(self) -> JwtValidator:
        async with self._lock:
            if self._validator is not None:
                return self._validator
            cfg = self.config
            jwks_uri, issuer = cfg.jwks_uri, cfg.issuer
            if cfg.discovery_url:
                url = cfg.discovery_url
                if WELL_KNOWN not in url:
                    url = url.rstrip("/") + WELL_KNOWN
                doc = await get_json(url, self.time_limit)
                try:
                    self._token_endpoint = self._token_endpoint or check_url(
                        str(doc.get("token_endpoint", "")), "token_endpoint"
                    )
                    jwks_uri = jwks_uri or check_url(str(doc.get("jwks_uri", "")), "jwks_uri")
                except ValueError as e:
                    raise Unavailable(f"discovery {url}: {e}") from None
                issuer = issuer or str(doc.get("issuer", ""))
            audience = cfg.client_id if cfg.audience is None else cfg.audience
            keys = JwksKeys(
                jwks_uri,
                min_refresh=self.min_refresh,
                timeout=self.time_limit,
                algorithms=self.algorithms,
            )
            self._validator = JwtValidator(
                keys,
                issuer=issuer or None,
                audience=audience or None,
                owner_claim=self.owner_claim,
                device_claim=self.device_claim,
                algorithms=self.algorithms,
            )
            return self._validator

    async def exchange(self, code: str, now: float) -> Claims:
        """The claims of the token the provider gives for ``code``; :class:`CodeRefused`, or
        :class:`~gateway.errors.Unavailable` when the provider cannot be reached."""
        try:
            return await self._exchange(code, now)
        except KeySourceUnavailable as e:
            raise Unavailable(str(e)) from None

    async def _exchange(self, code: str, now: float) -> Claims:
        validator = await self._ready()
        cfg = self.config
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "client_id": cfg.client_id,
            "client_secret": cfg.client_secret,
        }
        if cfg.redirect_uri:
            form["redirect_uri"] = cfg.redirect_uri
        status, body = await http_request(
            "POST",
            self._token_endpoint,
            body=urllib.parse.urlencode(form).encode("ascii"),
            headers={
                "Content-Type": "application/x-www-form-urlencoded",
                "Accept": "application/json",
            },
            time_limit=self.time_limit,
        )
        try:
            answer = json.loads(body) if body else {}
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise Unavailable(f"provider {cfg.name!r}: token endpoint answered {status}, not JSON")
        if status != 200:
            reason = answer.get("error_description") or answer.get("error") or status
            raise CodeRefused(f"provider {cfg.name!r} refused the code: {reason}")
        token = answer.get(cfg.token_field)
        if not isinstance(token, str) or not token:
            raise CodeRefused(f"provider {cfg.name!r} returned no {cfg.token_field}")
        try:
            return validator.validate(token, now)
        except UnknownKey:
            pass  # first use, or the provider rotated its keys
        except TokenError as e:
            raise CodeRefused(f"provider {cfg.name!r} token: {e}") from None
        await validator.refresh_keys()
        try:
            return validator.validate(token, now)
        except TokenError as e:
            raise CodeRefused(f"provider {cfg.name!r} token: {e}") from None

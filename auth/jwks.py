"""Signing keys from a JWKS URL, and the HTTP helpers of token validation.

:class:`JwksKeys` is a key lookup for :class:`auth.tokens.JwtValidator`: ``find`` is pure
(it answers from the keys fetched so far, after any static keys) and raises
:class:`auth.errors.UnknownKey` for a ``kid`` it does not hold. The driver then awaits
:meth:`JwksKeys.refresh` and retries (the gateway's session emits ``RefreshKeys`` and
re-handles the request on ``KeysRefreshed``; the command API refreshes and validates once
more), so validation itself stays sans-IO.

Refreshes are bounded: at most one fetch per ``min_refresh`` seconds whatever the tokens say
(a flood of made-up ``kid`` values costs one fetch per interval), and concurrent refreshes
share one fetch. Only asymmetric keys are taken from the document (no ``oct``: no HS*), and a
key whose ``alg`` is outside the allow-list is skipped.

HTTP is the standard library's ``urllib.request`` in a thread (:func:`http_request`, also the
gateway's OAuth2 code exchange), with a timeout, ``http``/``https`` only; errors are
translated here to :class:`auth.errors.KeySourceUnavailable` (unreachable, 5xx, garbage) or
returned as a status. A thread cannot be cancelled, so the limit is the socket's timeout, not
``asyncio.timeout``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from typing import Any, Final

import jwt

from auth.errors import KeySourceUnavailable, UnknownKey
from auth.tokens import ASYMMETRIC_ALGORITHMS, KeySet, PublicKey

log = logging.getLogger(__name__)

MAX_DOCUMENT: Final = 1 << 20
_KEY_TYPES: Final = frozenset({"EC", "RSA", "OKP"})


def check_url(url: str, where: str) -> str:
    """An ``http(s)://host...`` URL, or ValueError (no ``file:``, no relative URL)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{where}: not an http(s) URL: {url!r}")
    return url


def _fetch(
    method: str, url: str, body: bytes | None, headers: Mapping[str, str], timeout: float
) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method=method, headers=dict(headers))
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # the scheme is checked
            return int(resp.status), resp.read(MAX_DOCUMENT)
    except urllib.error.HTTPError as e:
        with e:
            return int(e.code), e.read(MAX_DOCUMENT)


async def http_request(
    method: str,
    url: str,
    *,
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    time_limit: float = 10.0,
) -> tuple[int, bytes]:
    """The status and body of one HTTP exchange; :class:`KeySourceUnavailable` when there is
    none (refused, timed out, TLS failure) or the server failed (5xx)."""
    check_url(url, "request")
    try:
        status, data = await asyncio.to_thread(_fetch, method, url, body, headers or {}, time_limit)
    except (OSError, ValueError) as e:  # URLError, timeouts and TLS errors are OSErrors
        log.warning("%s %s: %s", method, url, e)
        raise KeySourceUnavailable(f"{url} unreachable: {e}") from None
    log.info("%s %s -> %d", method, url, status)
    if status >= 500:
        raise KeySourceUnavailable(f"{url} answered {status}")
    return status, data


async def get_json(url: str, time_limit: float) -> dict[str, Any]:
    status, data = await http_request(
        "GET", url, headers={"Accept": "application/json"}, time_limit=time_limit
    )
    if status != 200:
        raise KeySourceUnavailable(f"{url} answered {status}")
    try:
        doc = json.loads(data)
    except ValueError:
        raise KeySourceUnavailable(f"{url}: not JSON") from None
    if not isinstance(doc, dict):
        raise KeySourceUnavailable(f"{url}: not a JSON object")
    return doc


def parse_jwks(doc: Mapping[str, Any], algorithms: tuple[str, ...]) -> dict[str, PublicKey]:
    """The usable public keys of a JWKS document by ``kid`` (``""`` for one without)."""
    keys = doc.get("keys")
    if not isinstance(keys, list):
        raise ValueError("a JWKS needs a 'keys' list")
    out: dict[str, PublicKey] = {}
    for item in keys:
        if not isinstance(item, dict) or item.get("kty") not in _KEY_TYPES:
            continue  # symmetric keys never verify our tokens
        if item.get("use", "sig") != "sig":
            continue
        alg = item.get("alg")
        if alg is not None and alg not in algorithms:
            continue
        if "d" in item:
            continue  # a private key published by mistake: refuse to use it
        try:
            key = jwt.PyJWK.from_dict(item)
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError) as e:
            log.warning("skipping a JWKS key: %s", e)
            continue
        out[str(item.get("kid", ""))] = key.key
    return out


class JwksKeys:
    """Keys from a JWKS URL (plus static ones), refreshed on demand, at a bounded rate."""

    def __init__(
        self,
        url: str,
        *,
        static: KeySet | None = None,
        min_refresh: float = 30.0,
        timeout: float = 5.0,
        algorithms: tuple[str, ...] = ASYMMETRIC_ALGORITHMS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = check_url(url, "jwks_url")
        self.static = static or KeySet({})
        self.min_refresh = min_refresh
        self.timeout = timeout
        self.algorithms = algorithms
        self.clock = clock
        self.fetched: dict[str, PublicKey] = {}
        self.fetches = 0  # attempts, successful or not
        self._last: float | None = None
        self._lock = asyncio.Lock()

    def find(self, kid: str | None) -> PublicKey:
        if kid is not None and kid in self.static.keys:
            return self.static.keys[kid]
        if kid is not None and kid in self.fetched:
            return self.fetched[kid]
        if kid is None:
            both = {**self.static.keys, **self.fetched}
            if len(both) == 1:
                return next(iter(both.values()))
        raise UnknownKey(kid)

    async def refresh(self) -> bool:
        """Fetch the document again unless it was fetched less than ``min_refresh`` seconds
        ago; True when this call fetched it. A failed fetch keeps the keys known so far."""
        started = self.clock()
        async with self._lock:
            if self._last is not None and (
                self._last >= started or self.clock() - self._last < self.min_refresh
            ):
                return False  # fetched while we waited, or too recently
            self._last = self.clock()
            self.fetches += 1
            try:
                doc = await get_json(self.url, self.timeout)
                keys = parse_jwks(doc, self.algorithms)
            except (KeySourceUnavailable, ValueError) as e:
                log.warning("JWKS %s: %s", self.url, e)
                return False
            log.info("JWKS %s: %d key(s) %s", self.url, len(keys), sorted(keys))
            self.fetched = keys
            return True

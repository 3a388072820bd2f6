"""How to reach NATS: the URL(s) and the credentials of one connection, never in the URL.

Every process of twinhub and every application connects to an authenticated NATS server
(PRODUCT.md section 10): twinhub's services with an NKey seed file (``seed_file``, mode 0600),
applications with their twinhub JWT as the connection token (``token``; the server's auth
callout validates it). ``ca_file`` turns on TLS verification against that CA. ``inbox_prefix``
names the subjects replies come back on: an application may only receive on its own prefix.

``str(endpoint)`` is the URL alone, so an endpoint can be logged; the token and the seed
never are.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

__all__ = ["NatsEndpoint"]


@dataclass(frozen=True, slots=True)
class NatsEndpoint:
    url: str
    seed_file: Path | None = None
    token: str | None = None
    ca_file: Path | None = None
    inbox_prefix: str | None = None

    def __post_init__(self) -> None:
        if self.seed_file is not None and self.token is not None:
            raise ValueError("a NATS endpoint has a seed file or a token, not both")
        if any("@" in u.split("//", 1)[-1].split("/", 1)[0] for u in self.servers):
            raise ValueError("credentials do not belong in the NATS URL (use a seed or a token)")

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:  # no secret in a repr either
        who = "seed" if self.seed_file else "token" if self.token else "anonymous"
        return f"NatsEndpoint({self.url!r}, {who})"

    @property
    def servers(self) -> list[str]:
        return [u.strip() for u in self.url.split(",") if u.strip()]

    def with_token(self, token: str, inbox_prefix: str | None = None) -> NatsEndpoint:
        return replace(self, token=token, seed_file=None, inbox_prefix=inbox_prefix)

    def ssl_context(self) -> ssl.SSLContext | None:
        if self.ca_file is None:
            return None
        return ssl.create_default_context(cafile=str(self.ca_file))

    def connect_options(self) -> dict[str, Any]:
        """Keyword arguments for ``nats.connect`` (servers and credentials)."""
        opts: dict[str, Any] = {"servers": self.servers}
        if self.seed_file is not None:
            opts["nkeys_seed"] = str(self.seed_file)
        if self.token is not None:
            opts["token"] = self.token
        tls = self.ssl_context()
        if tls is not None:
            opts["tls"] = tls
        if self.inbox_prefix is not None:
            opts["inbox_prefix"] = self.inbox_prefix
        return opts

"""The data dir of a local stack: keys, certificates, server data, and the endpoints file.

Layout::

    DIR/keys/jwt-signing-key.pem      ES256 key of the stack's tokens (0600)
    DIR/pki/ca.crt, ca.key            development CA
    DIR/pki/server.crt, server.key    the gateway's TLS certificate
    DIR/nats/, DIR/mongo/             server data
    DIR/stack.json                    what `twinhub up` is running (URLs, ports)

Commands given ``--data-dir`` find a running stack's keys and endpoints here.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from auth.tokens import TokenIssuer, load_or_create_signing_key
from twinhub_cli import pki as devpki


@dataclass(frozen=True, slots=True)
class DataDir:
    root: Path

    @property
    def keys(self) -> Path:
        return self.root / "keys"

    @property
    def pki(self) -> Path:
        return self.root / "pki"

    @property
    def bus(self) -> Path:
        """The bus credentials (:mod:`bus.credentials`): service NKeys, the callout's key."""
        return self.root / "bus"

    @property
    def stack_file(self) -> Path:
        return self.root / "stack.json"

    def issuer(self, *, issuer: str = "twinhub", audience: str = "twinhub") -> TokenIssuer:
        key, kid = load_or_create_signing_key(self.keys)
        return TokenIssuer(key, kid=kid, issuer=issuer, audience=audience)

    def ensure_tls(
        self, hosts: tuple[str, ...] = ("127.0.0.1", "localhost", "::1")
    ) -> devpki.Issued:
        """The gateway's server certificate, created (with the CA) on first use."""
        ca = devpki.load_or_create_ca(self.pki)
        if (self.pki / "server.crt").exists() and (self.pki / "server.key").exists():
            return devpki.Issued(ca.cert, ca.key, self.pki / "server.crt", self.pki / "server.key")
        return devpki.issue_server(ca, self.pki, hosts)

    def write_stack(self, info: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.stack_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(info | {"written_at": time.time()}, indent=2), encoding="utf-8")
        tmp.replace(self.stack_file)

    def read_stack(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads(self.stack_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(
                f"no running stack found in {self.root} (start one with `twinhub up`)"
            ) from None
        return data

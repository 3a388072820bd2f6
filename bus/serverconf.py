"""The nats-server configuration of a twinhub bus: accounts, service users, the auth callout.

Rendered as JSON, which nats-server reads as configuration. It holds public keys only (the
service users' NKeys and the callout's issuer account key): nothing in it is secret. The
listen address, port and store directory are the command line's (``twinhub_cli.devservices``)
or the deployment's, and TLS is added when a certificate is given.

Anonymous connections are impossible: every client either is one of the service users (an
NKey signature) or goes through the auth callout, which admits only valid twinhub tokens.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bus.permissions import (
    ACCOUNT_APPS,
    ACCOUNT_AUTH,
    ACCOUNT_SYS,
    ACCOUNT_TWINHUB,
    ROLES,
    Permissions,
    Role,
    app_imports,
    service_permissions,
)

__all__ = ["ServerTls", "render_server_config"]


@dataclass(frozen=True, slots=True)
class ServerTls:
    cert_file: Path
    key_file: Path


def _perms(p: Permissions) -> dict[str, Any] | None:
    if p.unrestricted:
        return None
    out: dict[str, Any] = {}
    pub: dict[str, Any] = {}
    if p.pub_allow:
        pub["allow"] = list(p.pub_allow)
    if p.pub_deny:
        pub["deny"] = list(p.pub_deny)
    # an empty allow list would mean "anything": a responder without publish rights gets a
    # deny of everything, its replies go through allow_responses
    out["publish"] = pub or {"deny": [">"]}
    sub: dict[str, Any] = {}
    if p.sub_allow:
        sub["allow"] = list(p.sub_allow)
    if p.sub_deny:
        sub["deny"] = list(p.sub_deny)
    out["subscribe"] = sub or {"deny": [">"]}
    if p.responses:
        out["allow_responses"] = {"max": 1, "expires": "5m"}
    return out


def render_server_config(
    *,
    issuer: str,
    users: Mapping[Role, str],
    stream: str,
    projector: str,
    tls: ServerTls | None = None,
    auth_timeout: float = 5.0,
    max_connections: int | None = None,
) -> str:
    """The configuration text. ``issuer``: public key (A...) of the account key the auth
    callout signs with; ``users``: each role's public NKey (U...)."""
    missing = [r for r in ROLES if r not in users]
    if missing:
        raise ValueError(f"no NKey for {', '.join(missing)}")

    def user(role: Role) -> dict[str, Any]:
        entry: dict[str, Any] = {"nkey": users[role]}
        perms = _perms(service_permissions(role, stream, projector))
        if perms is not None:
            entry["permissions"] = perms
        return entry

    exports: list[dict[str, Any]] = []
    imports: list[dict[str, Any]] = []
    for kind, subject, local in app_imports(stream):
        export: dict[str, Any] = {kind: subject, "accounts": [ACCOUNT_APPS]}
        if kind == "service" and ".MSG.NEXT." in subject:
            export["response_type"] = "stream"  # a pull request is answered by many messages
        exports.append(export)
        imp: dict[str, Any] = {kind: {"account": ACCOUNT_TWINHUB, "subject": subject}}
        if local is not None:
            imp["to"] = local
        imports.append(imp)

    conf: dict[str, Any] = {
        "server_name": "twinhub",
        "jetstream": {},
        "accounts": {
            ACCOUNT_TWINHUB: {
                "jetstream": "enabled",
                "users": [user("gateway"), user("twin"), user("admin")],
                "exports": exports,
            },
            ACCOUNT_APPS: {"imports": imports},
            ACCOUNT_AUTH: {"users": [user("callout")]},
            ACCOUNT_SYS: {},
        },
        "system_account": ACCOUNT_SYS,
        "authorization": {
            "timeout": auth_timeout,
            "auth_callout": {
                "issuer": issuer,
                "account": ACCOUNT_AUTH,
                "auth_users": [users[r] for r in ROLES],
            },
        },
    }
    if max_connections is not None:
        conf["max_connections"] = max_connections
    if tls is not None:
        conf["tls"] = {
            "cert_file": str(tls.cert_file),
            "key_file": str(tls.key_file),
            "timeout": 5,
        }
    return json.dumps(conf, indent=2) + "\n"

"""The nats-server configuration of a twinhub bus: accounts, service users, the auth callout.

Rendered as JSON, which nats-server reads as configuration. It holds public keys only (the
service users' NKeys and the callout's issuer account key): nothing in it is secret. The
listen address, port and store directory are the command line's (``twinhub_cli.devservices``)
or the deployment's, and TLS is added when a certificate is given.

Anonymous connections are impossible: every client either is one of the service users (an
NKey signature) or goes through the auth callout, which admits only valid twinhub tokens.

A server of a cluster (:class:`ClusterRoutes`, PRODUCT.md section 11) gets a ``cluster`` block
besides: its route listener, the routes to its peers, and the route authorization. Routes
carry every account's traffic and JetStream's replication, so a route is admitted only with
the cluster's route password (one user, nothing else is accepted on the route port: a wrong
or missing password is refused) and, with TLS, over TLS verified against the CA. That
configuration then holds a secret (the route password, in the routes' URLs as nats-server
wants it) and is written mode 0600 by its writers.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote

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

__all__ = [
    "CLUSTER_NAME",
    "ROUTE_USER",
    "ClusterRoutes",
    "ServerTls",
    "WebSocketListener",
    "render_server_config",
    "server_name_of",
]

CLUSTER_NAME: Final = "twinhub"
ROUTE_USER: Final = "twinhub-route"
SERVER_NAME: Final = "twinhub"


@dataclass(frozen=True, slots=True)
class ServerTls:
    cert_file: Path
    key_file: Path


@dataclass(frozen=True, slots=True)
class WebSocketListener:
    """nats-server's ``websocket`` listener, where browsers (the web console) connect.

    It has no authorization of its own, so its clients go through the same auth callout as
    every other client: an application token, the same permissions. It speaks TLS with the
    server's certificate; without one (``tls`` not given to :func:`render_server_config`) it
    may only listen on loopback, where nothing leaves the host. ``port`` -1: any free port
    (nats-server writes it to its ports file)."""

    host: str
    port: int

    def __post_init__(self) -> None:
        if self.port == 0 or not -1 <= self.port < 65536:  # 0 would turn it off
            raise ValueError(f"websocket port out of range: {self.port}")


def _websocket_block(ws: WebSocketListener, tls: ServerTls | None) -> dict[str, Any]:
    block: dict[str, Any] = {"host": ws.host, "port": ws.port}
    if tls is not None:
        block["tls"] = {"cert_file": str(tls.cert_file), "key_file": str(tls.key_file)}
    elif ws.host in ("127.0.0.1", "::1", "localhost"):
        block["no_tls"] = True
    else:
        raise ValueError(f"a websocket listener on {ws.host} needs TLS (a server certificate)")
    return block


@dataclass(frozen=True, slots=True)
class ClusterRoutes:
    """One server's place in a cluster: where it listens for routes, where its peers do.

    ``routes`` may name this server too (one configuration for every member): nats-server
    recognises a route to itself and drops it. ``ca_file``: with TLS, routes are TLS too,
    each server verifying its peer's certificate against this CA (the names in ``routes``
    must be in the certificates).
    """

    listen_host: str
    listen_port: int
    routes: tuple[tuple[str, int], ...]
    password: str
    name: str = CLUSTER_NAME
    ca_file: Path | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "routes", tuple(self.routes))
        if len(self.password) < 16:
            raise ValueError("a route password of at least 16 characters is needed")
        if not self.routes:
            raise ValueError("a cluster member needs the routes of its peers")
        if not 0 < self.listen_port < 65536:
            raise ValueError(f"route port out of range: {self.listen_port}")

    def route_urls(self) -> list[str]:
        secret = quote(self.password, safe="")
        return [
            f"nats-route://{ROUTE_USER}:{secret}@{_host(host)}:{port}" for host, port in self.routes
        ]


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def server_name_of(index: int | None) -> str:
    """The ``server_name`` of a single server (``None``) or of a cluster's member ``index``
    (from 1): unique in the cluster, as JetStream requires."""
    return SERVER_NAME if index is None else f"{SERVER_NAME}-{index}"


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
    cluster: ClusterRoutes | None = None,
    server_name: str = SERVER_NAME,
    websocket: WebSocketListener | None = None,
) -> str:
    """The configuration text. ``issuer``: public key (A...) of the account key the auth
    callout signs with; ``users``: each role's public NKey (U...); ``cluster``: this server
    is a member of a cluster (``server_name`` then unique among them); ``websocket``: a
    listener for browsers too (:class:`WebSocketListener`)."""
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
        "server_name": server_name,
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
    if cluster is not None:
        conf["cluster"] = _cluster_block(cluster, tls)
    if websocket is not None:
        conf["websocket"] = _websocket_block(websocket, tls)
    return json.dumps(conf, indent=2) + "\n"


def _cluster_block(cluster: ClusterRoutes, tls: ServerTls | None) -> dict[str, Any]:
    block: dict[str, Any] = {
        "name": cluster.name,
        "host": cluster.listen_host,
        "port": cluster.listen_port,
        # one user on the route port: a peer without the password is refused
        "authorization": {
            "user": ROUTE_USER,
            "password": cluster.password,
            "timeout": 2,
        },
        "routes": cluster.route_urls(),
        # clients are given every member's URL by their configuration (nats.url): the
        # members do not advertise addresses of theirs that a client might not reach
        "no_advertise": True,
    }
    if tls is not None:
        if cluster.ca_file is None:
            raise ValueError("TLS routes need the CA that verifies the peers (ca_file)")
        block["tls"] = {
            "cert_file": str(tls.cert_file),
            "key_file": str(tls.key_file),
            "ca_file": str(cluster.ca_file),
            "timeout": 5,
        }
    return block

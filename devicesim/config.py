"""Configuration of simulated devices: frozen values, validated once, passed down explicitly."""

from __future__ import annotations

import enum
import ssl
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Protocol
from urllib.parse import urlsplit

from devicesim.backoff import BackoffPolicy
from devicesim.errors import SimConfigError
from proto.codecs import ContentFormat

COAP_TCP: Final = "coap+tcp"
COAPS_TCP: Final = "coaps+tcp"
DEFAULT_PORTS: Final = {COAP_TCP: 5683, COAPS_TCP: 5684}
# Device IDs are UUIDs derived from prefix and index, so a re-run is the same fleet again.
DEVICE_ID_NAMESPACE: Final = uuid.UUID("6c1b3f1e-8f7a-4f0e-9d53-7477696e6875")


class TokenFactory(Protocol):
    """Mints the sign-up token (authorization code / JWT) of one device: ``(device_id, owner)``."""

    def __call__(self, device_id: str, owner: str | None, /) -> str | Awaitable[str]: ...


class BatchSupport(enum.StrEnum):
    """How the device answers ``GET /oic/res?if=oic.if.b`` (the batch interface).

    All three advertise ``oic.if.b`` on ``/oic/res`` so a gateway tries it:

    * ``observe``: batch GET and batch Observe (notifications carry the changed resources);
    * ``get-only``: batch GET, but an Observe is answered without the Observe option;
    * ``reject``: 4.00 Bad Request.
    """

    OBSERVE = "observe"
    GET_ONLY = "get-only"
    REJECT = "reject"

    @classmethod
    def of(cls, value: BatchSupport | bool | str) -> BatchSupport:
        if isinstance(value, bool):
            return cls.OBSERVE if value else cls.GET_ONLY
        return cls(value)


@dataclass(frozen=True, slots=True)
class GatewayAddress:
    scheme: str
    host: str
    port: int

    @property
    def tls(self) -> bool:
        return self.scheme == COAPS_TCP

    @property
    def uri(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


def parse_gateway_uri(uri: str, *, tls: bool = False) -> GatewayAddress:
    """``coap+tcp://host[:port]`` or ``coaps+tcp://host[:port]``; ``tls`` upgrades the former."""
    try:
        parts = urlsplit(uri)
        port = parts.port
    except ValueError as e:
        raise SimConfigError(f"invalid gateway URI {uri!r}: {e}") from None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise SimConfigError(
            f"gateway URI must be coap+tcp:// or coaps+tcp://, got {uri!r} (UDP is not OCF cloud)"
        )
    if not parts.hostname:
        raise SimConfigError(f"gateway URI has no host: {uri!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise SimConfigError(f"gateway URI must not have a path or query: {uri!r}")
    if tls and scheme == COAP_TCP:
        scheme = COAPS_TCP
        port = port if port is not None else DEFAULT_PORTS[COAPS_TCP]
    return GatewayAddress(
        scheme, parts.hostname, port if port is not None else DEFAULT_PORTS[scheme]
    )


@dataclass(frozen=True, slots=True)
class TlsOptions:
    """Client TLS: ``ca_file`` verifies the gateway (system roots when ``None``); ``cert_file`` and
    ``key_file`` give the device an identity for mutual TLS; ``server_name`` overrides the name
    checked against the gateway certificate (and sent as SNI)."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    server_name: str | None = None
    verify: bool = True

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise SimConfigError("a client certificate needs both cert_file and key_file")

    def ssl_context(self) -> ssl.SSLContext:
        try:
            ctx = ssl.create_default_context(
                cafile=str(self.ca_file) if self.ca_file is not None else None
            )
            if self.cert_file is not None and self.key_file is not None:
                ctx.load_cert_chain(str(self.cert_file), str(self.key_file))
        except (OSError, ssl.SSLError) as e:
            raise SimConfigError(f"cannot load TLS files: {e}") from e
        if not self.verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        ctx.set_alpn_protocols(["coap"])
        return ctx


def device_id_for(prefix: str, index: int) -> str:
    return str(uuid.uuid5(DEVICE_ID_NAMESPACE, f"{prefix}:{index}"))


@dataclass(frozen=True, slots=True)
class DeviceConfig:
    """One simulated device.

    ``token`` is the sign-up token itself or a :class:`TokenFactory` called with
    ``(device_id, owner)`` whenever the device has to sign up. ``rate`` is value changes per second
    for the whole device, spread round-robin over its ``resources`` (0 = never).
    ``reference_stack`` imitates iotivity-lite on the wire: no CSM, OCF content-format-version
    options on requests, publish once per registration, and it tolerates a gateway that sends no
    CSM either.
    """

    gateway: GatewayAddress
    device_id: str
    token: str | TokenFactory
    name: str = "sim"
    owner: str | None = None
    resources: int = 1
    rate: float = 0.0
    batch: BatchSupport | bool = BatchSupport.OBSERVE  # True = OBSERVE, False = GET_ONLY
    reference_stack: bool = False
    # Serve /oc/wk/introspection as the reference stack does: discovered, never published, and a
    # GET answered 4.00.
    introspection: bool = False
    content_format: int = ContentFormat.OCF_CBOR
    auth_provider: str = "twinhub"
    ping_interval: float | None = 20.0
    pong_timeout: float = 10.0
    connect_timeout: float = 10.0
    request_timeout: float = 10.0
    refresh_fraction: float = 0.75
    backoff: BackoffPolicy = field(default_factory=BackoffPolicy)
    eps: tuple[str, ...] = ()
    tls: TlsOptions | None = None

    def __post_init__(self) -> None:
        if self.resources < 0:
            raise SimConfigError("resources must be >= 0")
        if self.rate < 0:
            raise SimConfigError("rate must be >= 0")
        if self.content_format not in (
            ContentFormat.OCF_CBOR,
            ContentFormat.CBOR,
            ContentFormat.JSON,
        ):
            raise SimConfigError(f"unsupported content format {self.content_format}")
        if self.ping_interval is not None and self.ping_interval <= 0:
            raise SimConfigError("ping_interval must be > 0 (or None to never ping)")
        if not 0 < self.refresh_fraction < 1:
            raise SimConfigError("refresh_fraction must be within (0, 1)")
        for name in ("pong_timeout", "connect_timeout", "request_timeout"):
            if getattr(self, name) <= 0:
                raise SimConfigError(f"{name} must be > 0")
        if isinstance(self.token, str) and not self.token:
            raise SimConfigError("the sign-up token must not be empty")

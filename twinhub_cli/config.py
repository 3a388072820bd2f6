"""Configuration: one TOML file plus environment overrides, validated once at start.

Every setting has a default, can be set in the file (``[section] key = value``)
and overridden by the environment variable ``TWINHUB_<SECTION>_<KEY>`` (upper
case), e.g. ``TWINHUB_NATS_URL``, ``TWINHUB_GATEWAY_TLS``. The result is a frozen
:class:`Config`; an unknown key or a value of the wrong type stops the program
with a message naming the key and where it came from.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

DeviceAuth = Literal["none", "any-certificate", "ocf-identity"]
ENV_PREFIX: Final = "TWINHUB_"


class ConfigError(ValueError):
    """The configuration is invalid; the message says which key and why."""


@dataclass(frozen=True, slots=True)
class NatsSettings:
    url: str = "nats://127.0.0.1:4222"
    stream: str = "TWINHUB_EVENTS"
    duplicate_window: float = 120.0
    # directory of the bus credentials (twinhub init): a process reads only its own NKey seed
    # (<role>.nk), the callout issuer.nk, the twin service consumer-key; "" = <data-dir>/bus
    credentials: str = ""
    ca_file: str = ""  # PEM CA that verifies the NATS server's TLS certificate ("" = none)
    # seconds a service (gateway, twin, callout) tries to reach NATS when it starts; then it
    # exits with code 4 (twinhub_cli.exitcodes). 0 = forever. Once up, it reconnects forever
    startup_timeout: float = 30.0
    # replicas of the streams the twin service creates (events, leases, device tokens): 1 on
    # a single server, 3 (or 5) on a cluster of at least as many servers; a stream that has
    # more already keeps them
    replicas: int = 1

    def __post_init__(self) -> None:
        if self.replicas not in (1, 3, 5):
            raise ConfigError(f"nats.replicas: must be 1, 3 or 5, not {self.replicas}")


@dataclass(frozen=True, slots=True)
class CalloutSettings:
    # the user JWT the callout grants lives until the token expires, at most this long (s);
    # the server then disconnects the application, which reconnects with its token
    max_lifetime: float = 24 * 3600.0
    # HOST:PORT of /metrics, /healthz, /readyz (":9466" = every address); "" = off
    metrics_listen: str = ""


@dataclass(frozen=True, slots=True)
class MongoSettings:
    url: str = "mongodb://127.0.0.1:27017/?directConnection=true"
    database: str = "twinhub"
    # seconds the twin service tries to reach MongoDB when it starts (each try waits up to 5 s
    # for a server); then it exits with code 4. 0 = forever. Once up, it retries forever
    startup_timeout: float = 30.0
    # a MongoDB with authentication (compose: the twin service's own user, from `twinhub
    # init`): the user, and a file (mode 0600) holding its password, which is read when
    # connecting and never kept in the configuration nor logged; "" = no credentials
    username: str = ""
    password_file: str = ""
    auth_source: str = ""  # the database the user is defined in; "" = mongo.database

    def __post_init__(self) -> None:
        if self.password_file and not self.username:
            raise ConfigError("mongo.password_file: set, but mongo.username is not")

    def password(self) -> str:
        """The user's password, read from ``password_file`` now (mode 0600, UTF-8, a final
        newline ignored); raises :class:`ConfigError` when it cannot be had."""
        if not self.password_file:
            raise ConfigError(f"mongo.username {self.username!r}: mongo.password_file is not set")
        path = Path(self.password_file)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise ConfigError(f"mongo.password_file: no such file: {path}") from None
        except OSError as e:
            raise ConfigError(f"mongo.password_file: {path}: {e.strerror}") from None
        with os.fdopen(fd, "rb") as f:
            if os.fstat(f.fileno()).st_mode & 0o077:
                raise ConfigError(
                    f"mongo.password_file: {path} is readable by others: chmod 600 it"
                )
            raw = f.read()
        try:
            password = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            raise ConfigError(f"mongo.password_file: {path} is not UTF-8 text") from None
        if not password:
            raise ConfigError(f"mongo.password_file: {path} is empty")
        return password


@dataclass(frozen=True, slots=True)
class AuthSettings:
    signing_key: str = ""  # ES256 PEM of the gateway's own tokens (dev: from the data dir)
    public_keys: tuple[str, ...] = ()  # extra PEM public keys accepted ("kid=path" or "path")
    issuer: str = "twinhub"
    audience: str = "twinhub"
    owner_claim: str = "sub"
    device_claim: str = ""
    access_ttl: float = 3600.0  # seconds; 0 = tokens without expiry (expiresin -1)
    refresh_ttl: float = 30 * 24 * 3600.0
    jwks_url: str = ""  # accept tokens signed by the keys of this JWKS (fetched on unknown kid)
    jwks_min_refresh: float = 30.0  # seconds: at most one JWKS fetch per interval
    # OAuth2 sign-up providers, one string each: "NAME;discovery=URL;client_id_file=PATH;
    # client_secret_file=PATH[;token_endpoint=URL;jwks_uri=URL;redirect_uri=URL;
    # token=access_token|id_token;issuer=ISS;audience=AUD]" (see gateway.oauth)
    oauth_providers: tuple[str, ...] = ()
    oauth_timeout: float = 10.0  # seconds per HTTP exchange with a provider
    # seconds an application token (command API) may live, exp - iat; 0 = no maximum
    app_token_max_lifetime: float = 7 * 24 * 3600.0


@dataclass(frozen=True, slots=True)
class GatewaySettings:
    id: str = "gw-1"
    tcp: str = "127.0.0.1:5683"  # "" disables the listener
    tls: str = "127.0.0.1:5684"
    # simple devices (ThingsBoard's CoAP device API, PRODUCT.md 4.2): CoAP over UDP
    udp: str = "127.0.0.1:5683"  # "" disables it
    udp_max_payload: int = 64 * 1024  # bytes of a request (after block-wise); above: 4.13
    udp_inactivity_timeout: float = 300.0  # seconds without a request: the device is offline
    client_rpc_timeout: float = 30.0  # seconds a device's POST .../rpc waits for an answer
    token_cache_ttl: float = 5.0  # seconds a token lookup is cached (a revocation's delay)
    # POST /api/v1/provision relayed to the twin service (which holds the profiles and their
    # secrets: twin.provision_profiles); requests per second and at once, per source address
    # and per provision key
    udp_provision: bool = True
    udp_provision_rate: float = 1.0
    udp_provision_burst: int = 5
    # CoAP over DTLS 1.2 with the server's certificate (tls_cert/tls_key), in front of udp
    dtls: str = "127.0.0.1:5684"  # "" disables it (it needs udp)
    dtls_max_sessions: int = 1000
    dtls_idle_timeout: float = 300.0  # seconds without a datagram: the session is dropped
    tls_cert: str = ""
    tls_key: str = ""
    client_ca: str = ""  # PEM (one or more CAs) for mutual TLS; "" = the data dir's CA
    device_auth: DeviceAuth = "none"  # of the TLS listener; the mutual modes disable plain TCP
    crl_file: str = ""  # PEM/DER CRL(s) of the client CA(s), checked after the handshake
    end_session_on_cert_expiry: bool = False  # close a session when its certificate expires
    keepalive_interval: float = 30.0
    keepalive_timeout: float = 60.0
    opening_timeout: float = 10.0
    request_timeout: float = 10.0
    max_message_size: int = 64 * 1024
    batch_observe: bool = True
    max_buffered_events: int = 10_000
    # abuse limits (see gateway.adapters.coap.CoapServerConfig); 0 = no limit
    sign_in_timeout: float = 60.0  # seconds from accept (TLS handshake included) to sign-in
    max_unauthenticated: int = 10_000  # connections not signed in, at once
    max_connections_per_ip: int = 1024  # from one IPv4 address / IPv6 /64, signed in or not
    max_connections: int = 50_000  # at once, from anywhere; 0: no limit
    request_rate: float = 20.0  # device requests a second, per connection
    request_burst: int = 100  # requests at once before request_rate applies
    message_timeout: float = 30.0  # seconds from a message's first byte to its last (slowloris)
    # graceful drain on SIGTERM: Release (RFC 8323 5.5) to every OCF device, which reconnects
    # to drain_alternative ("coaps+tcp://gw2.example:5684"; "" = the address it knows) after
    # drain_hold_off seconds; at most drain_timeout seconds, then Abort; 0 = Abort at once
    drain_timeout: float = 10.0
    drain_alternative: str = ""
    drain_hold_off: int = 0
    # seconds without a lease renewal after which the twin service declares this gateway
    # instance lost and marks its devices offline (renewed every third of it)
    lease: float = 15.0
    # HOST:PORT of /metrics, /healthz, /readyz (":9464" = every address); "" = off
    metrics_listen: str = ""


@dataclass(frozen=True, slots=True)
class TwinSettings:
    consumer: str = "twin-projector"
    collection: str = "twins"
    # Events per projector batch at most. A batch writes each device's twin once, so under
    # load bigger batches fold more events into one write (FerretDB: ~2 ms per twin write).
    batch: int = 2000
    # seconds between two reads of the gateway leases (a lost gateway's devices go offline
    # within its lease plus this)
    lease_poll_interval: float = 1.0
    # HOST:PORT of /metrics, /healthz, /readyz (":9465" = every address); "" = off
    metrics_listen: str = ""
    # self-provisioning profiles of simple devices (POST /api/v1/provision), one string each:
    # "NAME;owner=OWNER;key=PROVISION_KEY;secret_file=PATH[;strategy=allow-create]" (the
    # secret file of mode 0600); none by default (every request: NOT_FOUND)
    provision_profiles: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        provision_profiles(self)  # a malformed profile stops the start


@dataclass(frozen=True, slots=True)
class ProvisionProfile:
    """One of ``twin.provision_profiles``: devices that present ``key`` and the secret in
    ``secret_file`` are created for ``owner`` (strategy ``allow-create``: by their name)."""

    name: str
    owner: str
    key: str
    secret_file: str
    strategy: Literal["allow-create"] = "allow-create"

    def secret(self) -> bytes:
        """The secret, read from ``secret_file`` now (mode 0600, UTF-8, a final newline
        ignored); raises :class:`ConfigError` when it cannot be had."""
        where = f"twin.provision_profiles {self.name!r}: secret_file"
        return read_secret_file(Path(self.secret_file), where).encode("utf-8")


PROFILE_KEYS: Final = frozenset({"owner", "key", "secret_file", "strategy"})


def provision_profiles(twin: TwinSettings) -> tuple[ProvisionProfile, ...]:
    """The profiles of ``twin.provision_profiles``, checked (names and keys unique)."""
    out: list[ProvisionProfile] = []
    for i, spec in enumerate(twin.provision_profiles):
        where = f"twin.provision_profiles[{i}]"
        name, *pairs = (part.strip() for part in spec.split(";"))
        if not name or "=" in name:
            raise ConfigError(f"{where}: must start with the profile's name, then ;key=value")
        values: dict[str, str] = {}
        for pair in pairs:
            k, sep, v = pair.partition("=")
            k, v = k.strip(), v.strip()
            if not sep or k not in PROFILE_KEYS:
                raise ConfigError(
                    f"{where} ({name}): {pair!r}: expected one of "
                    f"{', '.join(sorted(PROFILE_KEYS))} as key=value"
                )
            if k in values:
                raise ConfigError(f"{where} ({name}): {k} twice")
            values[k] = v
        missing = sorted({"owner", "key", "secret_file"} - {k for k, v in values.items() if v})
        if missing:
            raise ConfigError(f"{where} ({name}): missing {', '.join(missing)}")
        strategy = values.get("strategy", "allow-create")
        if strategy != "allow-create":
            raise ConfigError(
                f"{where} ({name}): strategy must be allow-create (new devices by name), "
                f"not {strategy!r}"
            )
        profile = ProvisionProfile(name, values["owner"], values["key"], values["secret_file"])
        for other in out:
            if other.name == profile.name:
                raise ConfigError(f"{where}: profile {name!r} twice")
            if other.key == profile.key:
                raise ConfigError(f"{where} ({name}): the same key as profile {other.name!r}")
        out.append(profile)
    return tuple(out)


def read_secret_file(path: Path, where: str) -> str:
    """A secret from a file of mode 0600 (no access for group or others), UTF-8, a final
    newline ignored; :class:`ConfigError` naming ``where`` when it cannot be had."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise ConfigError(f"{where}: no such file: {path}") from None
    except OSError as e:
        raise ConfigError(f"{where}: {path}: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        if os.fstat(f.fileno()).st_mode & 0o077:
            raise ConfigError(f"{where}: {path} is readable by others: chmod 600 it")
        raw = f.read()
    try:
        secret = raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: {path} is not UTF-8 text") from None
    if not secret:
        raise ConfigError(f"{where}: {path} is empty")
    return secret


@dataclass(frozen=True, slots=True)
class Config:
    nats: NatsSettings = field(default_factory=NatsSettings)
    mongo: MongoSettings = field(default_factory=MongoSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    gateway: GatewaySettings = field(default_factory=GatewaySettings)
    twin: TwinSettings = field(default_factory=TwinSettings)
    callout: CalloutSettings = field(default_factory=CalloutSettings)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(
                f"{where}: must be one of {', '.join(map(str, allowed))}, not {value!r}"
            )
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: must be a list of strings")
        return tuple(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in (
            "1",
            "true",
            "yes",
            "on",
            "0",
            "false",
            "no",
            "off",
        ):
            return value.lower() in ("1", "true", "yes", "on")
        raise ConfigError(f"{where}: must be a boolean, not {value!r}")
    if tp is int or tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: must be a number")
        try:
            out = tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: must be a number, not {value!r}") from None
        if out < 0:
            raise ConfigError(f"{where}: must not be negative")
        return out
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: must be a string")
        return value
    raise ConfigError(f"{where}: unsupported type {tp}")  # pragma: no cover


def _section(
    cls: type[Any], name: str, values: Mapping[str, Any], env: Mapping[str, str], source: str
) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) in [{name}]: {', '.join(sorted(unknown))}")
    kwargs: dict[str, Any] = {}
    for key in known:
        env_name = f"{ENV_PREFIX}{name.upper()}_{key.upper()}"
        if env_name in env:
            kwargs[key] = _coerce(env[env_name], hints[key], env_name)
        elif key in values:
            kwargs[key] = _coerce(values[key], hints[key], f"{source} [{name}] {key}")
    return cls(**kwargs)


def load(
    path: Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> Config:
    """Build the configuration: defaults < file < ``overrides`` < environment."""
    env = os.environ if env is None else env
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: {e}") from None
    for section, vals in (overrides or {}).items():
        data.setdefault(section, {}).update(vals)
    hints = typing.get_type_hints(Config)
    unknown = set(data) - set(hints)
    if unknown:
        raise ConfigError(f"{source}: unknown section(s): {', '.join(sorted(unknown))}")
    kwargs: dict[str, Any] = {}
    for name, cls in hints.items():
        section_values = data.get(name, {})
        if not isinstance(section_values, dict):
            raise ConfigError(f"{source}: [{name}] must be a table")
        kwargs[name] = _section(cls, name, section_values, env, source)
    return Config(**kwargs)


def env_names() -> list[str]:
    """Every environment variable the configuration reads (for docs and compose checks)."""
    out = []
    for name, cls in typing.get_type_hints(Config).items():
        for f in dataclasses.fields(cls):
            out.append(f"{ENV_PREFIX}{name.upper()}_{f.name.upper()}")
    return out


def parse_hostport(value: str, where: str) -> tuple[str, int] | None:
    """``"host:port"`` / ``"[::1]:port"`` → (host, port); ``""`` → None (disabled)."""
    if not value:
        return None
    host, sep, port = value.rpartition(":")
    if not sep:
        raise ConfigError(f"{where}: expected HOST:PORT, not {value!r}")
    host = host.strip("[]")
    try:
        p = int(port)
    except ValueError:
        raise ConfigError(f"{where}: bad port in {value!r}") from None
    if not 0 <= p <= 65535:
        raise ConfigError(f"{where}: port out of range in {value!r}")
    return host or "0.0.0.0", p

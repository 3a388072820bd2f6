"""Composition of the services from the configuration: the gateway, the twin projector and the
twin's command API (with its expiry sweeper).

``twinhub gateway``, ``twinhub twin run`` and ``twinhub up`` all build their
services here, so the local stack and the containers run the same code.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import ssl
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase

from auth.application import AppTokenValidator
from auth.errors import UnknownKey
from auth.jwks import JwksKeys
from auth.tokens import (
    TOKEN_ALGORITHMS,
    JwtValidator,
    KeyLookup,
    KeySet,
    TokenIssuer,
    key_id,
    load_or_create_signing_key,
    load_public_keys,
)
from bus.adapters.nats_callout import CalloutService
from bus.permissions import Role
from eventstore.adapters.jetstream import JetStreamEventStore
from eventstore.layout import StreamLayout
from gateway.adapters.coap_udp import SimpleDeviceServer, UdpConfig
from gateway.adapters.devtokens_nats import NatsTokenDirectory
from gateway.adapters.dtls import DtlsConfig, DtlsTerminator
from gateway.adapters.provision_nats import NatsProvisioner
from gateway.devtokens import CachedTokenDirectory, TokenCacheConfig
from gateway.identity import AuthMode, TlsAuthPolicy, parse_crls
from gateway.lease import LeaseConfig
from gateway.leasing import GatewayLease
from gateway.oauth import OAuthProvider, parse_provider
from gateway.service import Gateway, GatewayConfig
from gateway.simple import SimpleConfig
from gateway.simpleprovision import ProvisionConfig
from gateway.writer import WriterConfig
from proto.devtokens import ALL_TOKENS, TOKEN_STREAM
from proto.leases import ALL_LEASES, LEASE_STREAM
from twin.adapters.mongo import MongoTwinStore
from twin.adapters.mongo_held import MongoHeldConnections
from twin.adapters.nats_api import NatsApiServer
from twin.adapters.selfprovision_nats import SelfProvisionServer
from twin.adapters.token_registry import LogTokenRegistry
from twin.api import ApiConfig, KeyRefresh, TwinApi
from twin.errors import StoreUnavailableError
from twin.reaper import GatewayReaper, ReaperConfig
from twin.selfprovision import Profile, Profiles
from twin.service import ProjectorConfig, TwinProjector
from twin.sweeper import ExpirySweeper
from twinhub_cli import pki as devpki
from twinhub_cli.busconfig import bus_credentials, nats_endpoint, secret_file
from twinhub_cli.config import Config, ConfigError, parse_hostport, provision_profiles
from twinhub_cli.datadir import DataDir
from twinhub_cli.exitcodes import UnreachableError, listening, one_line
from twinhub_cli.health import redact
from twinhub_cli.observability import (
    ApiMetrics,
    CalloutCollector,
    CheckFn,
    CountingTwinApi,
    GatewayCollector,
    Heartbeat,
    LogHead,
    ObservabilityConfig,
    ObservabilityServer,
    Prober,
    TwinCollector,
    standard_registry,
)

log = logging.getLogger(__name__)
T = TypeVar("T")


def issuer_for(config: Config, data: DataDir) -> TokenIssuer:
    """The signer of the gateway's tokens: ``auth.signing_key`` or the data dir's key."""
    if config.auth.signing_key:
        path = Path(config.auth.signing_key)
        try:
            loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (OSError, ValueError) as e:
            raise ConfigError(f"auth.signing_key {path}: {e}") from None
        if not isinstance(loaded, ec.EllipticCurvePrivateKey):
            raise ConfigError(f"auth.signing_key {path}: not an EC (ES256) private key")
        key, kid = loaded, key_id(loaded)
    else:
        key, kid = load_or_create_signing_key(data.keys)
    return TokenIssuer(
        key,
        kid=kid,
        issuer=config.auth.issuer,
        audience=config.auth.audience,
        owner_claim=config.auth.owner_claim,
        device_claim=config.auth.device_claim or None,
    )


def key_lookup_for(config: Config, issuer: TokenIssuer) -> KeyLookup:
    """The keys tokens may be signed with: the issuer's, ``auth.public_keys`` and, with
    ``auth.jwks_url``, those of the JWKS (fetched on an unknown ``kid``)."""
    keys = dict(issuer.public_keys.keys)
    extra: dict[str, Path] = {}
    for i, item in enumerate(config.auth.public_keys):
        kid, sep, path = item.partition("=")
        extra[kid if sep else f"key{i}"] = Path(path if sep else kid)
    try:
        keys.update(load_public_keys(extra).keys)
    except (OSError, ValueError) as e:
        raise ConfigError(f"auth.public_keys: {e}") from None
    if not config.auth.jwks_url:
        return KeySet(keys)
    try:
        return JwksKeys(
            config.auth.jwks_url,
            static=KeySet(keys),
            min_refresh=config.auth.jwks_min_refresh,
            algorithms=TOKEN_ALGORITHMS,
        )
    except ValueError as e:
        raise ConfigError(f"auth.jwks_url: {e}") from None


def validator_for(config: Config, issuer: TokenIssuer) -> JwtValidator:
    """The gateway's validator of device tokens (``auth.device_claim`` required if set)."""
    return JwtValidator(
        key_lookup_for(config, issuer),
        issuer=config.auth.issuer or None,
        audience=config.auth.audience or None,
        owner_claim=config.auth.owner_claim,
        device_claim=config.auth.device_claim or None,
        algorithms=TOKEN_ALGORITHMS,
    )


def app_validator_for(config: Config, issuer: TokenIssuer) -> AppTokenValidator:
    """The validator of application tokens (the command API's): the same keys, issuer and
    audience as the gateway's, the rules of :mod:`auth.application` (no device token, an
    ``exp`` required, at most ``auth.app_token_max_lifetime``)."""
    return AppTokenValidator(
        key_lookup_for(config, issuer),
        issuer=config.auth.issuer or None,
        audience=config.auth.audience or None,
        owner_claim=config.auth.owner_claim,
        device_claim=config.auth.device_claim or None,
        algorithms=TOKEN_ALGORITHMS,
        max_lifetime=config.auth.app_token_max_lifetime or None,
    )


def key_refresh_for(validator: JwtValidator | AppTokenValidator) -> KeyRefresh | None:
    """The command API's answer to a token signed by an unknown key: refresh the validator's
    JWKS (at its bounded rate) and validate again, as the gateway does; None without a JWKS."""
    if not validator.refreshable:
        return None

    async def refresh(error: Exception) -> bool:
        if not isinstance(error, UnknownKey):
            return False
        await validator.refresh_keys()  # fetched now, by a concurrent request, or too recently
        return True

    return refresh


def oauth_providers_for(config: Config) -> dict[str, OAuthProvider]:
    """The OAuth2 sign-up providers of ``auth.oauth_providers``, by name."""
    out: dict[str, OAuthProvider] = {}
    for i, spec in enumerate(config.auth.oauth_providers):
        try:
            provider = parse_provider(spec)
        except ValueError as e:
            raise ConfigError(f"auth.oauth_providers[{i}]: {e}") from None
        if provider.name in out:
            raise ConfigError(f"auth.oauth_providers: provider {provider.name!r} twice")
        out[provider.name] = OAuthProvider(
            provider,
            owner_claim=config.auth.owner_claim,
            device_claim=config.auth.device_claim or None,
            algorithms=TOKEN_ALGORITHMS,
            time_limit=config.auth.oauth_timeout,
            min_refresh=config.auth.jwks_min_refresh,
        )
    return out


def client_ca_file(config: Config, data: DataDir) -> Path:
    """The CA(s) device certificates must chain to: ``gateway.client_ca`` or the data dir's."""
    if config.gateway.client_ca:
        return Path(config.gateway.client_ca)
    return devpki.load_or_create_ca(data.pki).cert_path


def server_certificate(config: Config, data: DataDir) -> tuple[Path, Path]:
    """The gateway's certificate (chain) and key files: ``gateway.tls_cert`` / ``tls_key``, else
    the data dir's development certificate (made if missing). TLS and DTLS serve the same."""
    g = config.gateway
    if g.tls_cert and g.tls_key:
        return Path(g.tls_cert), Path(g.tls_key)
    issued = data.ensure_tls()
    return issued.cert_path, issued.key_path


def server_ssl_context(config: Config, data: DataDir) -> ssl.SSLContext:
    """The TLS listener's context: the server certificate, and in the mutual-TLS modes a
    required client certificate verified against the client CA(s) (chain and validity)."""
    g = config.gateway
    cert, key = server_certificate(config, data)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"gateway TLS certificate {cert} / key {key}: {e}") from None
    if AuthMode(g.device_auth).mutual:
        ca = client_ca_file(config, data)
        try:
            ctx.load_verify_locations(cafile=str(ca))
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(f"gateway.client_ca {ca}: {e}") from None
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:
        ctx.verify_mode = ssl.CERT_NONE  # no certificate request at all
    return ctx


def tls_auth_policy(config: Config, data: DataDir) -> TlsAuthPolicy:
    g = config.gateway
    mode = AuthMode(g.device_auth)
    crls: tuple[x509.CertificateRevocationList, ...] = ()
    if g.crl_file:
        if not mode.mutual:
            raise ConfigError("gateway.crl_file: only with a mutual-TLS device_auth")
        ca = client_ca_file(config, data)
        try:
            cas = x509.load_pem_x509_certificates(ca.read_bytes())
            crls = parse_crls(Path(g.crl_file).read_bytes(), cas)
        except (OSError, ValueError) as e:
            raise ConfigError(f"gateway.crl_file {g.crl_file}: {e}") from None
    return TlsAuthPolicy(
        mode=mode, crls=crls, end_session_on_cert_expiry=g.end_session_on_cert_expiry
    )


def layout_for(config: Config) -> StreamLayout:
    return StreamLayout(
        name=config.nats.stream,
        duplicate_window=config.nats.duplicate_window,
        replicas=config.nats.replicas,
    )


LEASE_RETENTION: Final = 24 * 3600.0
"""How long a lease stream record outlives its last write: a dead instance must be reaped
(a twin service running) within this time, after which its records are gone."""

LEASE_LAYOUT: Final = StreamLayout(
    name=LEASE_STREAM,
    subjects=(ALL_LEASES,),
    max_msgs_per_subject=1,  # the last record of each instance: a read is the lease table
    max_age=LEASE_RETENTION,
)
"""The gateway leases' stream (see proto.leases and docs/architecture.md)."""

TOKEN_LAYOUT: Final = StreamLayout(
    name=TOKEN_STREAM,
    subjects=(ALL_TOKENS,),
    max_msgs_per_subject=1,  # a token's current record (active or revoked), by its hash
)
"""The simple devices' access-token registry (see proto.devtokens): written by the twin
service's provisioning operations, read by the gateway."""


def lease_config(config: Config) -> LeaseConfig:
    if not config.gateway.lease > 0:
        raise ConfigError("gateway.lease: must be > 0 (seconds)")
    return LeaseConfig(lease=config.gateway.lease)


def gateway_config(config: Config, data: DataDir) -> GatewayConfig:
    g = config.gateway
    tcp = parse_hostport(g.tcp, "gateway.tcp")
    tls = parse_hostport(g.tls, "gateway.tls")
    mode = AuthMode(g.device_auth)
    if mode.mutual:
        if tls is None:
            raise ConfigError(f"gateway.device_auth {mode.value} needs the TLS listener")
        if tcp is not None:
            # a plain listener would let any device skip the certificate
            log.warning(
                "gateway.device_auth %s: the plain TCP listener (%s) stays disabled",
                mode.value,
                g.tcp,
            )
            tcp = None
    if tcp is None and tls is None:
        raise ConfigError("gateway: both listeners are disabled (gateway.tcp and gateway.tls)")
    return GatewayConfig(
        gateway_id=g.id,
        tcp_bind=tcp,
        tls_bind=tls,
        ssl_context=server_ssl_context(config, data) if tls else None,
        tls_auth=tls_auth_policy(config, data) if tls else TlsAuthPolicy(),
        access_ttl=config.auth.access_ttl or None,
        refresh_ttl=config.auth.refresh_ttl,
        batch_observe=g.batch_observe,
        request_timeout=g.request_timeout,
        keepalive_interval=g.keepalive_interval,
        keepalive_timeout=g.keepalive_timeout,
        opening_timeout=g.opening_timeout,
        max_message_size=g.max_message_size,
        writer=WriterConfig(max_buffered=g.max_buffered_events),
        sign_in_timeout=g.sign_in_timeout or None,
        max_unauthenticated=g.max_unauthenticated or None,
        max_connections_per_ip=g.max_connections_per_ip or None,
        max_connections=g.max_connections or None,
        request_rate=g.request_rate or None,
        request_burst=max(1, g.request_burst),
        message_timeout=g.message_timeout or None,
        drain_timeout=max(0.0, g.drain_timeout),
        drain_alternative=drain_alternative(g.drain_alternative),
        drain_hold_off=g.drain_hold_off or None,
    )


def drain_alternative(uri: str) -> str | None:
    """``gateway.drain_alternative``: a ``coap+tcp://`` or ``coaps+tcp://`` URI with host and
    port, sent to the devices in the Release of a drain; "" for none."""
    if not uri:
        return None
    try:
        parts = urlsplit(uri)
        port = parts.port
    except ValueError as e:
        raise ConfigError(f"gateway.drain_alternative: {e}") from None
    if parts.scheme not in ("coap+tcp", "coaps+tcp") or not parts.hostname or port is None:
        raise ConfigError(
            f"gateway.drain_alternative: want coap+tcp://HOST:PORT or coaps+tcp://HOST:PORT, "
            f"not {uri!r}"
        )
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"gateway.drain_alternative: no path or query, not {uri!r}")
    return uri


# -- the bus (PRODUCT.md section 10) ---------------------------------------------------------

PROVISION_WAIT: Final = 120.0  # seconds a gateway waits for the twin service to create the stream


@contextlib.asynccontextmanager
async def event_store(
    config: Config, data: DataDir, role: Role
) -> AsyncIterator[JetStreamEventStore]:
    """The event log as service ``role`` sees it. Only the twin service (and the admin path)
    create or update the stream; a gateway waits for it to exist."""
    endpoint = nats_endpoint(config, data, role)
    # A gateway watches the commands of each device it holds: on shared subscriptions, a few
    # per process rather than a few per device (its role may hear every owner's events).
    connecting = JetStreamEventStore.from_url(
        endpoint, layout_for(config), shared_notifiers=role == "gateway"
    )
    async with nats_reached(connecting, config, str(endpoint)) as store:
        if role in ("twin", "admin"):
            await store.provision()
            # the other streams as replicated as the log (nats.replicas)
            for layout in (LEASE_LAYOUT, TOKEN_LAYOUT):
                replicated = dataclasses.replace(layout, replicas=config.nats.replicas)
                async with JetStreamEventStore(store.connection, replicated) as other:
                    await other.provision()
        else:
            await store.wait_provisioned(PROVISION_WAIT)
        yield store


@contextlib.asynccontextmanager
async def nats_reached(
    connection: AbstractAsyncContextManager[T], config: Config, where: str
) -> AsyncIterator[T]:
    """``connection`` (a NATS client that connects when entered) entered within
    ``nats.startup_timeout`` seconds, else :class:`UnreachableError`. nats-py retries a refused
    first connect forever (reconnects are on): without a budget a service whose NATS is away
    or refuses its credentials would wait silently, never failing for its supervisor."""
    budget = config.nats.startup_timeout
    async with contextlib.AsyncExitStack() as stack:
        try:
            async with asyncio.timeout(budget or None) as deadline:
                entered = await stack.enter_async_context(connection)
        except TimeoutError as e:
            if not deadline.expired():
                raise
            raise UnreachableError(
                "NATS", where, f"no connection within {budget:g} s (nats.startup_timeout)"
            ) from e
        yield entered


@contextlib.asynccontextmanager
async def lease_store(store: JetStreamEventStore) -> AsyncIterator[JetStreamEventStore]:
    """The lease stream on ``store``'s connection (provisioned with the event stream by the
    twin service, :func:`event_store`; waited for here)."""
    async with JetStreamEventStore(store.connection, LEASE_LAYOUT) as leases:
        await leases.wait_provisioned(PROVISION_WAIT)
        yield leases


@contextlib.asynccontextmanager
async def token_store(store: JetStreamEventStore) -> AsyncIterator[JetStreamEventStore]:
    """The device-token registry on ``store``'s connection (provisioned with the event stream
    by the twin service, :func:`event_store`; waited for here)."""
    async with JetStreamEventStore(store.connection, TOKEN_LAYOUT) as tokens:
        await tokens.wait_provisioned(PROVISION_WAIT)
        yield tokens


@contextlib.asynccontextmanager
async def run_callout(config: Config, data: DataDir) -> AsyncIterator[CalloutService]:
    """The auth callout: admits applications by their token (the command API's validator),
    scoped to the token's owner (:func:`bus.permissions.application_permissions`)."""
    creds = bus_credentials(config, data)
    validator = app_validator_for(config, issuer_for(config, data))
    endpoint = nats_endpoint(config, data, "callout")
    service = CalloutService(
        endpoint,
        secret_file(creds.issuer_file, "callout issuer key"),
        validator,
        stream=config.nats.stream,
        reserved=(config.twin.consumer,),
        max_lifetime=config.callout.max_lifetime or 24 * 3600.0,
        refresh_keys=key_refresh_for(validator),
    )
    async with nats_reached(service, config, str(endpoint)) as callout:
        yield callout


def consumer_key(config: Config, data: DataDir) -> bytes:
    """The twin service's secret from which each owner's consumer-name key is derived."""
    path = secret_file(bus_credentials(config, data).consumer_key_file, "consumer key")
    return path.read_bytes()


@contextlib.asynccontextmanager
async def run_gateway(
    config: Config, data: DataDir, store: JetStreamEventStore
) -> AsyncIterator[Gateway]:
    """The gateway, serving as an instance that holds a lease (gateway.leasing): entered
    after the lease, left before it is released."""
    issuer = issuer_for(config, data)
    gw_config = gateway_config(config, data)
    async with (
        lease_store(store) as leases,
        GatewayLease(leases, config.gateway.id, lease_config(config)) as lease,
    ):
        gw = Gateway(
            gw_config,
            store,
            validator_for(config, issuer),
            issuer,
            oauth=oauth_providers_for(config),
            instance=lease.instance,
        )
        lease.on_new_instance = gw.adopt_instance
        listeners = {"gateway.tcp": gw_config.tcp_bind, "gateway.tls": gw_config.tls_bind}
        async with listening(gw, listeners), contextlib.AsyncExitStack() as stack:
            udp = parse_hostport(config.gateway.udp, "gateway.udp")
            dtls = parse_hostport(config.gateway.dtls, "gateway.dtls")
            if dtls is not None and udp is None:
                raise ConfigError("gateway.dtls needs gateway.udp (DTLS relays to it)")
            if udp is not None:
                terminator: DtlsTerminator | None = None

                def peer_of(relay: tuple[str, int]) -> tuple[str, int] | None:
                    return terminator.peer_of(relay) if terminator is not None else None

                gw.simple = await stack.enter_async_context(
                    simple_device_server(config, store, udp, lease.instance, peer_of)
                )
                if dtls is not None:
                    terminator = await stack.enter_async_context(
                        listening(
                            dtls_terminator(config, data, dtls, gw.simple.address),
                            {"gateway.dtls": dtls},
                        )
                    )
                    gw.dtls = terminator
            yield gw


def dtls_terminator(
    config: Config, data: DataDir, bind: tuple[str, int], backend: tuple[str, int]
) -> DtlsTerminator:
    """DTLS 1.2 on ``bind`` with the gateway's server certificate (``gateway.tls_cert`` /
    ``tls_key``, else the data dir's), relaying each session to the plain UDP server at
    ``backend`` (loopback)."""
    g = config.gateway
    cert, key = server_certificate(config, data)
    if backend[0] in ("0.0.0.0", "::"):
        backend = ("127.0.0.1" if backend[0] == "0.0.0.0" else "::1", backend[1])
    cfg = DtlsConfig(
        cert_chain=cert,
        key=key,
        max_sessions=g.dtls_max_sessions,
        idle_timeout=g.dtls_idle_timeout,
    )
    return DtlsTerminator(cfg, bind=bind, backend=backend)


@contextlib.asynccontextmanager
async def simple_device_server(
    config: Config,
    store: JetStreamEventStore,
    bind: tuple[str, int],
    instance: str,
    peer_of: Callable[[tuple[str, int]], tuple[str, int] | None] | None = None,
) -> AsyncIterator[SimpleDeviceServer]:
    """The simple devices' CoAP/UDP endpoint (gateway/adapters/coap_udp.py) of the gateway
    instance ``instance``: tokens looked up in the registry (cached ``gateway.token_cache_ttl``
    seconds), the request rate per token as the OCF connections' (``gateway.request_rate``,
    ``gateway.request_burst``)."""
    g = config.gateway
    async with token_store(store) as registry:
        tokens = CachedTokenDirectory(
            NatsTokenDirectory(registry), TokenCacheConfig(ttl=g.token_cache_ttl)
        )
        simple = SimpleConfig(
            gateway_id=g.id,
            max_payload=g.udp_max_payload,
            request_rate=g.request_rate or 1e9,
            request_burst=max(1, g.request_burst),
        )
        udp = UdpConfig(
            bind=bind,
            inactivity_timeout=g.udp_inactivity_timeout,
            client_rpc_timeout=g.client_rpc_timeout,
        )
        server_cm = SimpleDeviceServer(
            store,
            tokens,
            simple,
            udp,
            instance=instance,
            peer_of=peer_of,
            **self_provisioning(config, store),
        )
        async with listening(server_cm, {"gateway.udp": bind}) as server:
            yield server


def self_provisioning(config: Config, store: JetStreamEventStore) -> dict[str, Any]:
    """The simple-device server's self-provisioning arguments (``gateway.udp_provision``): the
    requests relayed to the twin service on the bus, rate-limited per source and per key."""
    g = config.gateway
    if not g.udp_provision:
        return {}
    if not g.udp_provision_rate > 0:
        raise ConfigError("gateway.udp_provision_rate: must be > 0 (requests a second)")
    return {
        "provisioner": NatsProvisioner(store.connection, timeout=g.request_timeout),
        "provisioning": ProvisionConfig(
            rate=g.udp_provision_rate, burst=max(1, g.udp_provision_burst)
        ),
    }


def profiles_for(config: Config) -> Profiles:
    """The self-provisioning profiles of ``twin.provision_profiles``, their secrets read now
    (files of mode 0600)."""
    try:
        return Profiles(
            Profile(p.name, p.owner, p.key, p.secret(), p.strategy)
            for p in provision_profiles(config.twin)
        )
    except ValueError as e:  # ConfigError included
        raise ConfigError(str(e)) from None


@contextlib.asynccontextmanager
async def twin_store(
    config: Config,
    database: AsyncDatabase[dict[str, Any]] | None = None,
    *,
    starting: bool = False,
) -> AsyncIterator[MongoTwinStore]:
    """The twins in ``mongo.database`` (of ``database``'s client when given, see
    :func:`mongo_database`). ``starting`` (a service starts): MongoDB is tried for
    ``mongo.startup_timeout`` seconds, else :class:`UnreachableError`; otherwise once (a
    server selection of 5 s)."""
    async with contextlib.AsyncExitStack() as stack:
        if database is None:
            database = await stack.enter_async_context(mongo_database(config))
        store = MongoTwinStore(database, config.twin.collection)
        if starting:
            await _mongo_reached(store, config)
        else:
            await store.resolve_generation()  # the generation a rebuild made active
        await store.ensure_indexes()
        yield store


async def _mongo_reached(store: MongoTwinStore, config: Config) -> None:
    """The store's first read (the generation a rebuild made active) within
    ``mongo.startup_timeout`` seconds: a MongoDB that starts later than its service (compose)
    is waited for, one that never answers ends the start."""
    budget = config.mongo.startup_timeout
    where = redact(config.mongo.url)
    failed: StoreUnavailableError | None = None
    try:
        async with asyncio.timeout(budget or None) as deadline:
            while True:
                try:
                    await store.resolve_generation()
                    break
                except StoreUnavailableError as e:
                    if failed is None:
                        log.warning("MongoDB at %s unreachable; trying for %g s", where, budget)
                    failed = e
                    await asyncio.sleep(0.5)
    except TimeoutError as e:
        if not deadline.expired():
            raise
        detail = f"no answer within {budget:g} s (mongo.startup_timeout)"
        if failed is not None:
            detail += f"; last: {one_line(str(failed))}"
        raise UnreachableError("MongoDB", where, detail) from e


@contextlib.asynccontextmanager
async def mongo_database(config: Config) -> AsyncIterator[AsyncDatabase[dict[str, Any]]]:
    """``mongo.database``; with ``mongo.username`` the client authenticates as that user
    (password from ``mongo.password_file``, in ``mongo.auth_source``, by default the database
    itself)."""
    mongo = config.mongo
    client: AsyncMongoClient[dict[str, object]]
    if mongo.username:
        client = AsyncMongoClient(
            mongo.url,
            serverSelectionTimeoutMS=5000,
            tz_aware=True,
            username=mongo.username,
            password=mongo.password(),
            authSource=mongo.auth_source or mongo.database,
        )
    else:
        client = AsyncMongoClient(mongo.url, serverSelectionTimeoutMS=5000, tz_aware=True)
    try:
        yield client[config.mongo.database]
    finally:
        await client.close()


@contextlib.asynccontextmanager
async def run_projector(
    config: Config, store: JetStreamEventStore, twins: MongoTwinStore
) -> AsyncIterator[TwinProjector]:
    cfg = ProjectorConfig(
        name=config.twin.consumer,
        batch_size=config.twin.batch,
        max_ack_pending=max(1000, config.twin.batch),
    )
    async with TwinProjector(twins, store, cfg) as projector:
        yield projector


@contextlib.asynccontextmanager
async def run_api(
    config: Config,
    data: DataDir,
    store: JetStreamEventStore,
    twins: MongoTwinStore,
    *,
    metrics: ApiMetrics | None = None,
) -> AsyncIterator[NatsApiServer]:
    """The command API on ``twinhub.api.v1.>`` (application tokens, :func:`app_validator_for`)
    and the expiry sweeper; several twin instances may run both. With ``metrics`` the requests'
    outcomes and the sweeper's count are recorded there (for :func:`twin_observability`)."""
    validator = app_validator_for(config, issuer_for(config, data))
    api_config = ApiConfig(
        projector=config.twin.consumer, consumer_secret=consumer_key(config, data)
    )
    api_args = (store, twins, validator, api_config)
    refresh = key_refresh_for(validator)
    async with token_store(store) as token_log:
        # the provisioning operations write the simple devices' token registry
        registry = LogTokenRegistry(token_log)
        twin_api = (
            TwinApi(*api_args, refresh_keys=refresh, tokens=registry)
            if metrics is None
            else CountingTwinApi(*api_args, refresh_keys=refresh, metrics=metrics, tokens=registry)
        )
        sweeper = ExpirySweeper(twins, store)
        if metrics is not None:
            metrics.sweeper = sweeper
        # self-provisioning (POST /api/v1/provision, relayed by the gateways): answered even
        # without profiles (NOT_FOUND), as ThingsBoard does
        self_provision = SelfProvisionServer(store.connection, twin_api, profiles_for(config))
        async with NatsApiServer(store.connection, twin_api) as server, sweeper, self_provision:
            yield server


@contextlib.asynccontextmanager
async def run_reaper(
    config: Config,
    store: JetStreamEventStore,
    twins: MongoTwinStore,
    database: AsyncDatabase[dict[str, Any]],
    *,
    metrics: ApiMetrics | None = None,
) -> AsyncIterator[GatewayReaper]:
    """The gateway reaper (twin.reaper): the devices of lost gateway instances go offline.
    Several twin instances may run it. With ``metrics`` its counts are scraped with the twin's."""
    held = MongoHeldConnections(database, config.twin.collection)
    await held.ensure_indexes()
    if not config.twin.lease_poll_interval > 0:
        raise ConfigError("twin.lease_poll_interval: must be > 0 (seconds)")
    reaper_config = ReaperConfig(
        poll_interval=config.twin.lease_poll_interval, projector=config.twin.consumer
    )
    async with JetStreamEventStore(store.connection, LEASE_LAYOUT) as leases:
        reaper = GatewayReaper(leases, store, twins, held, reaper_config)
        if metrics is not None:
            metrics.reaper = reaper
        async with reaper:
            yield reaper


# -- operations endpoints (see twinhub_cli.observability) ------------------------------------


@contextlib.asynccontextmanager
async def callout_observability(
    config: Config, callout: CalloutService, obs: ObservabilityConfig | None = None
) -> AsyncIterator[ObservabilityServer | None]:
    """``/metrics``, ``/healthz``, ``/readyz`` of the auth callout on
    ``callout.metrics_listen`` (None when empty). Ready: connected and subscribed."""
    bind = parse_hostport(config.callout.metrics_listen, "callout.metrics_listen")
    if bind is None:
        yield None
        return
    obs = obs or ObservabilityConfig()
    heartbeat = Heartbeat(obs.heartbeat_interval)

    async def serving() -> str:
        if not callout.ready:
            raise ConnectionError("not connected to NATS / not subscribed")
        return f"serving as issuer {callout.issuer}"

    prober = Prober({"callout": serving}, interval=obs.probe_interval, timeout=obs.probe_timeout)
    registry = standard_registry()
    registry.register(CalloutCollector(callout, heartbeat, prober))
    async with listening(
        ObservabilityServer("auth callout", bind, registry, prober, heartbeat, obs),
        {"callout.metrics_listen": bind},
    ) as server:
        yield server


def _nats_connected(store: JetStreamEventStore) -> CheckFn:
    async def check() -> str:
        nc = store.connection
        if not nc.is_connected:
            state = "reconnecting" if nc.is_reconnecting else "disconnected"
            raise ConnectionError(f"NATS {state}")
        return f"connected to {nc.connected_url.netloc if nc.connected_url else '?'}"

    return check


@contextlib.asynccontextmanager
async def gateway_observability(
    config: Config,
    store: JetStreamEventStore,
    gateway: Gateway,
    obs: ObservabilityConfig | None = None,
) -> AsyncIterator[ObservabilityServer | None]:
    """``/metrics``, ``/healthz``, ``/readyz`` of the gateway on ``gateway.metrics_listen``
    (None when it is empty). Ready: NATS connected and JetStream answering."""
    bind = parse_hostport(config.gateway.metrics_listen, "gateway.metrics_listen")
    if bind is None:
        yield None
        return
    obs = obs or ObservabilityConfig()
    heartbeat = Heartbeat(obs.heartbeat_interval)
    prober = Prober(
        {"nats": _nats_connected(store), "jetstream": LogHead(store)},
        interval=obs.probe_interval,
        timeout=obs.probe_timeout,
    )
    registry = standard_registry()
    registry.register(GatewayCollector(gateway, heartbeat, prober))
    async with listening(
        ObservabilityServer(f"gateway {config.gateway.id}", bind, registry, prober, heartbeat, obs),
        {"gateway.metrics_listen": bind},
    ) as server:
        yield server


@contextlib.asynccontextmanager
async def twin_observability(
    config: Config,
    store: JetStreamEventStore,
    twins: MongoTwinStore,
    projector: TwinProjector,
    api_metrics: ApiMetrics | None = None,
    obs: ObservabilityConfig | None = None,
) -> AsyncIterator[ObservabilityServer | None]:
    """``/metrics``, ``/healthz``, ``/readyz`` of the twin service on ``twin.metrics_listen``
    (None when it is empty). Live: the loop runs and so does the projector. Ready: NATS
    connected, JetStream and MongoDB answering (the projector's checkpoint is read), the
    projector running."""
    bind = parse_hostport(config.twin.metrics_listen, "twin.metrics_listen")
    if bind is None:
        yield None
        return
    obs = obs or ObservabilityConfig()
    # the projector retries failures of the log and the store forever: ended, it is a bug
    heartbeat = Heartbeat(obs.heartbeat_interval, vital={"projector": lambda: projector.running})
    head = LogHead(store, projector.config.filter_subject)

    async def mongo() -> str:
        return f"checkpoint {await twins.checkpoint(projector.config.name)}"

    async def running() -> str:
        if not projector.running:
            raise RuntimeError(f"projector {projector.config.name} stopped")
        return f"at position {projector.position}"

    prober = Prober(
        {"nats": _nats_connected(store), "jetstream": head, "mongo": mongo, "projector": running},
        interval=obs.probe_interval,
        timeout=obs.probe_timeout,
    )
    registry = standard_registry()
    registry.register(
        TwinCollector(
            projector, head, api_metrics, heartbeat, prober, lambda: projector.running, twins
        )
    )
    async with listening(
        ObservabilityServer(f"twin {config.twin.consumer}", bind, registry, prober, heartbeat, obs),
        {"twin.metrics_listen": bind},
    ) as server:
        yield server


def first_device_token(config: Config, data: DataDir, owner: str = "dev") -> str:
    return issuer_for(config, data).issue(owner, now=time.time(), ttl=24 * 3600)

"""Device security as a matrix, against the real gateway over real TLS.

For every TLS authentication mode of the listener x device-ID claim configured or not x the
certificate the device presents x the token (and request) it sends, the outcome of a sign-up
and of a sign-in, each on a connection of its own. The expected outcomes are written out in
:data:`EXPECTED`, derived from these rules (README "Device security"):

* TLS: ``none`` asks for no certificate; ``any-certificate`` and ``ocf-identity`` require one
  that chains to the stack's CA (else the handshake fails); ``ocf-identity`` also refuses, right
  after the handshake and before any request, a certificate that is not an OCF identity.
* Token: signature, ``exp``, ``aud`` (and ``iss``) are checked; when a device-ID claim is
  configured the token must carry it.
* Device ID: from the certificate in ``ocf-identity`` mode, else from the claim (when
  configured), else from the request's ``di``; certificate and claim must agree, and ``di``
  must be the resolved ID.
* Owner: the device is registered to ``OWNER`` in the log before the matrix runs; a token of
  another owner can neither sign up nor sign in. Sign-in needs a registration.

Every refusal by the session is 4.01 followed by the connection's close (checked).

The gateways are built the way ``twinhub up --device-auth MODE`` builds them (configuration ->
:func:`twinhub_cli.services.gateway_config`), with the certificates made by ``twinhub pki``.
One gateway per (mode, claim), shared by its 28 cases.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
import ssl
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import cbor2
import pytest
import pytest_asyncio
from pymongo.asynchronous.database import AsyncDatabase

from auth.tokens import TokenIssuer
from eventstore.adapters.jetstream import JetStreamEventStore
from gateway.service import Gateway
from proto import binding, subjects
from proto import events as ev
from twinhub_cli import config as cfgmod
from twinhub_cli import pki, services
from twinhub_cli.datadir import DataDir
from twinhub_cli.devservices import NatsServer
from twinhub_cli.main import main as twinhub

# the raw RFC 8323 peer of the transport tests: a device we fully control
from ..integration.gateway.coap_peers import (  # noqa: TID252
    ABORT,
    CONTENT_FORMAT,
    CSM,
    DELETE,
    POST,
    RawPeer,
    request,
    uint,
)
from .stack import Stack, open_stack

if TYPE_CHECKING:
    from tests.conftest import Bus

pytestmark = pytest.mark.servers

RUN = uuid.uuid4().hex[:8]
OWNER: Final = f"alice-{RUN}"
OTHER_OWNER: Final = f"mallory-{RUN}"
DEVICE: Final = str(uuid.uuid4())  # registered to OWNER; the OCF identity certificate's device
OTHER_DEVICE: Final = str(uuid.uuid4())
CLAIM: Final = "https://twinhub.test/deviceId"

# --------------------------------------------------------------------------- the matrix

MODES = ("none", "any-certificate", "ocf-identity")
CERTS = (
    "ocf",  # OCF identity certificate of DEVICE (CN uuid:DEVICE, OCF EKU), signed by the CA
    "other",  # a manufacturer-style certificate (CN acme-sensor-0001, clientAuth), by the CA
    "untrusted",  # an OCF identity certificate of DEVICE signed by another CA
    "none",  # no client certificate
)
REQUESTS = (
    "valid",  # OWNER's token naming DEVICE in the claim; di = DEVICE
    "expired",  # ... expired an hour ago
    "wrong-owner",  # OTHER_OWNER's token (uid OTHER_OWNER); DEVICE belongs to OWNER
    "wrong-device",  # the claim names OTHER_DEVICE
    "wrong-audience",  # aud is not the gateway's
    "no-device-claim",  # OWNER's token without the device-ID claim
    "other-di",  # the valid token, but di = a fresh, unregistered device ID
)

# Outcomes, "sign-up/sign-in": a CoAP code, or
TLS = "tls/tls"  # the TLS handshake fails (no certificate / not from the CA)
CERT = "cert/cert"  # handshake done, then Abort before any request ("not an OCF identity")
OK = "2.04/2.04"
NO = "4.01/4.01"  # and the connection is closed

# columns:     valid expired wrong-owner wrong-device wrong-audience no-device-claim other-di
EXPECTED: Final[dict[tuple[str, bool], dict[str, tuple[str, ...]]]] = {
    # server-side TLS only: the certificate plays no part; the ID is the di
    ("none", False): {
        "ocf": (OK, NO, NO, OK, NO, OK, OK),
        "other": (OK, NO, NO, OK, NO, OK, OK),
        "untrusted": (OK, NO, NO, OK, NO, OK, OK),
        "none": (OK, NO, NO, OK, NO, OK, OK),
    },
    # ... the ID is the claim's, which must be there and name the di
    ("none", True): {
        "ocf": (OK, NO, NO, NO, NO, NO, NO),
        "other": (OK, NO, NO, NO, NO, NO, NO),
        "untrusted": (OK, NO, NO, NO, NO, NO, NO),
        "none": (OK, NO, NO, NO, NO, NO, NO),
    },
    # any certificate from the CA; the ID comes from the request (plgd fails "other" here)
    ("any-certificate", False): {
        "ocf": (OK, NO, NO, OK, NO, OK, OK),
        "other": (OK, NO, NO, OK, NO, OK, OK),
        "untrusted": (TLS, TLS, TLS, TLS, TLS, TLS, TLS),
        "none": (TLS, TLS, TLS, TLS, TLS, TLS, TLS),
    },
    ("any-certificate", True): {
        "ocf": (OK, NO, NO, NO, NO, NO, NO),
        "other": (OK, NO, NO, NO, NO, NO, NO),
        "untrusted": (TLS, TLS, TLS, TLS, TLS, TLS, TLS),
        "none": (TLS, TLS, TLS, TLS, TLS, TLS, TLS),
    },
    # the ID is the certificate's; the di must be it (plgd does not compare)
    ("ocf-identity", False): {
        "ocf": (OK, NO, NO, OK, NO, OK, NO),
        "other": (CERT, CERT, CERT, CERT, CERT, CERT, CERT),
        "untrusted": (TLS, TLS, TLS, TLS, TLS, TLS, TLS),
        "none": (TLS, TLS, TLS, TLS, TLS, TLS, TLS),
    },
    # ... and the claim must be there and agree with the certificate
    ("ocf-identity", True): {
        "ocf": (OK, NO, NO, NO, NO, NO, NO),
        "other": (CERT, CERT, CERT, CERT, CERT, CERT, CERT),
        "untrusted": (TLS, TLS, TLS, TLS, TLS, TLS, TLS),
        "none": (TLS, TLS, TLS, TLS, TLS, TLS, TLS),
    },
}


def expected(mode: str, claim: bool, cert: str, req: str) -> str:
    return EXPECTED[(mode, claim)][cert][REQUESTS.index(req)]


def test_the_table_is_complete() -> None:
    assert set(EXPECTED) == {(m, c) for m in MODES for c in (False, True)}
    for rows in EXPECTED.values():
        assert set(rows) == set(CERTS)
        assert all(len(cells) == len(REQUESTS) for cells in rows.values())


# --------------------------------------------------------------------------- the material


@dataclasses.dataclass(frozen=True)
class Material:
    data: DataDir
    ca_file: Path
    certs: dict[str, tuple[Path, Path] | None]
    tokens: dict[str, tuple[str, str]]  # request kind -> (owner, token)

    def client_context(self, cert: str) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        files = self.certs[cert]
        if files is not None:
            ctx.load_cert_chain(*files)
        return ctx


def _pki(*args: str) -> None:
    assert twinhub(["pki", *args]) == 0


@pytest.fixture(scope="module")
def material(tmp_path_factory: pytest.TempPathFactory) -> Material:
    root = tmp_path_factory.mktemp("security")
    data = DataDir(root / "data")
    elsewhere = root / "elsewhere"
    out = root / "certs"
    _pki("init", "--data-dir", str(data.root))
    _pki("device", "--data-dir", str(data.root), "--device-id", DEVICE, "--out", str(out))
    _pki(
        "device",
        "--data-dir",
        str(data.root),
        "--any",
        "--cn",
        "acme-sensor-0001",
        "--out",
        str(out),
    )
    untrusted = root / "untrusted"
    _pki("device", "--data-dir", str(elsewhere), "--device-id", DEVICE, "--out", str(untrusted))
    certs: dict[str, tuple[Path, Path] | None] = {
        "ocf": (out / f"{DEVICE}.crt", out / f"{DEVICE}.key"),
        "other": (out / "acme-sensor-0001.crt", out / "acme-sensor-0001.key"),
        "untrusted": (untrusted / f"{DEVICE}.crt", untrusted / f"{DEVICE}.key"),
        "none": None,
    }
    data.ensure_tls(("127.0.0.1",))
    issuer = data.issuer()  # the stack's signing key: what the gateway validates against
    other_audience = TokenIssuer(issuer.private_key, kid=issuer.kid, audience="someone-else")
    now = time.time()

    def mint(owner: str = OWNER, device: str | None = DEVICE, **kw: Any) -> str:
        by = kw.pop("by", issuer)
        extra = {CLAIM: device} if device is not None else None
        return str(by.issue(owner, now=kw.get("now", now), ttl=600, extra=extra))

    valid = mint()
    tokens = {
        "valid": (OWNER, valid),
        "expired": (OWNER, mint(now=now - 3600 - 600)),
        "wrong-owner": (OTHER_OWNER, mint(OTHER_OWNER)),
        "wrong-device": (OWNER, mint(device=OTHER_DEVICE)),
        "wrong-audience": (OWNER, mint(by=other_audience)),
        "no-device-claim": (OWNER, mint(device=None)),
        "other-di": (OWNER, valid),
    }
    return Material(data, data.pki / "ca.crt", certs, tokens)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def log_store(nats_server: NatsServer) -> AsyncIterator[JetStreamEventStore]:
    """The gateways' store (their role), with DEVICE registered to OWNER."""
    if not nats_server.running:
        await nats_server.start()
    async with JetStreamEventStore.from_url(nats_server.endpoint("twin")) as twin:
        await twin.provision()  # the twin service's job: the gateways' role may not
    async with JetStreamEventStore.from_url(nats_server.endpoint("gateway")) as store:
        registered = ev.Event(
            owner=OWNER, device_id=DEVICE, data=ev.DeviceRegistered(), source="/test"
        )
        await store.append([binding.to_nats(registered)])
        yield store


def load_config(mode: str, claim: bool, **gateway: Any) -> cfgmod.Config:
    """What ``twinhub up --device-auth MODE`` configures (and the claim setting)."""
    return cfgmod.load(
        None,
        env={},
        overrides={
            "gateway": {"tcp": "127.0.0.1:0", "tls": "127.0.0.1:0", "device_auth": mode} | gateway,
            "auth": {"device_claim": CLAIM if claim else ""},
        },
    )


@contextlib.asynccontextmanager
async def tls_gateway(
    store: JetStreamEventStore,
    data: DataDir,
    mode: str,
    claim: bool,
    settings: dict[str, Any] | None = None,
    **overrides: Any,
) -> AsyncIterator[Gateway]:
    config = load_config(mode, claim, **(settings or {}))
    cfg = services.gateway_config(config, data)
    assert cfg.ssl_context is not None
    if mode == "none":
        assert cfg.ssl_context.verify_mode == ssl.CERT_NONE
        assert cfg.tcp_bind is not None
    else:
        assert cfg.ssl_context.verify_mode == ssl.CERT_REQUIRED
        assert cfg.tcp_bind is None, "no plain listener next to a mutual-TLS one"
    cfg = dataclasses.replace(cfg, gateway_id=f"gw-{mode}", **overrides)
    issuer = services.issuer_for(config, data)
    async with Gateway(cfg, store, services.validator_for(config, issuer), issuer) as gw:
        yield gw


@dataclasses.dataclass(frozen=True)
class Served:
    mode: str
    claim: bool
    gateway: Gateway

    @property
    def address(self) -> tuple[str, int]:
        addr = self.gateway.tls_address
        assert addr is not None
        return addr


@pytest_asyncio.fixture(
    scope="module",
    loop_scope="session",
    params=[(m, c) for m in MODES for c in (False, True)],
    ids=lambda p: f"{p[0]}-{'claim' if p[1] else 'noclaim'}",
)
async def served(
    request: pytest.FixtureRequest, material: Material, log_store: JetStreamEventStore
) -> AsyncIterator[Served]:
    mode, claim = request.param
    async with tls_gateway(log_store, material.data, mode, claim) as gw:
        yield Served(mode, claim, gw)


# --------------------------------------------------------------------------- a device


async def connect(address: tuple[str, int], ctx: ssl.SSLContext | None) -> RawPeer | str:
    """A connected peer past the server's CSM, or the outcome of a refused connection."""
    try:
        peer = await RawPeer.connect(address, ctx)
    except OSError:
        return "tls"
    try:
        first = await peer.recv()  # the server's CSM: its first words on any connection
    except (OSError, EOFError):
        await _close(peer)
        return "tls"  # TLS 1.3: the client learns of the refused certificate here
    assert first.code == CSM, first
    return peer


async def ask(
    peer: RawPeer, method: int, path: str, body: Any = None, query: tuple[str, ...] = ()
) -> str:
    """Send a request; the response code, or "cert" when the server aborted instead.

    A 4.01 must be followed by the connection's end."""
    token = peer.token()
    payload = b"" if body is None else cbor2.dumps(body)
    options = [(CONTENT_FORMAT, uint(10000))] if body is not None else []
    peer.send(request(method, path, token, query=query, payload=payload, options=options))
    while True:
        frame = await peer.recv()
        if frame.code == ABORT:
            assert b"client certificate not accepted" in frame.payload, frame
            return "cert"
        if frame.token == token and 64 <= frame.code < 224:
            code = f"{frame.code >> 5}.{frame.code & 31:02d}"
            break
    if code == "4.01":
        assert await closed(peer), "a 4.01 closes the connection"
    return code


async def closed(peer: RawPeer) -> bool:
    try:
        await peer.expect_eof()
    except (OSError, TimeoutError):
        return False
    return True


async def _close(peer: RawPeer) -> None:
    with contextlib.suppress(OSError, TimeoutError):
        peer.writer.transport.abort()


async def attempt(
    address: tuple[str, int], ctx: ssl.SSLContext | None, op: str, di: str, owner: str, tok: str
) -> str:
    peer = await connect(address, ctx)
    if isinstance(peer, str):
        return peer
    try:
        if op == "sign-up":
            body = {"di": di, "accesstoken": tok, "authprovider": "test"}
            return await ask(peer, POST, "/oic/sec/account", body)
        body = {"di": di, "uid": owner, "accesstoken": tok, "login": True}
        return await ask(peer, POST, "/oic/sec/session", body)
    finally:
        await _close(peer)


# --------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("req", REQUESTS)
@pytest.mark.parametrize("cert", CERTS)
async def test_sign_up_and_sign_in(served: Served, material: Material, cert: str, req: str) -> None:
    owner, tok = material.tokens[req]
    di = str(uuid.uuid4()) if req == "other-di" else DEVICE
    ctx = material.client_context(cert)
    sign_up = attempt(served.address, ctx, "sign-up", di, owner, tok)
    sign_in = attempt(served.address, ctx, "sign-in", di, owner, tok)
    if req == "other-di":  # a fresh device: its sign-in needs the sign-up's registration
        up, inn = await sign_up, await sign_in
    else:  # DEVICE is registered already: independent, so at once
        up, inn = await asyncio.gather(sign_up, sign_in)
    assert f"{up}/{inn}" == expected(served.mode, served.claim, cert, req)


async def test_refused_certificates_are_logged_with_the_peer_address(
    material: Material, log_store: JetStreamEventStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.service")
    async with tls_gateway(log_store, material.data, "ocf-identity", False) as gw:
        assert gw.tls_address is not None
        peer = await connect(gw.tls_address, material.client_context("other"))
        assert isinstance(peer, RawPeer)
        host, port = peer.writer.get_extra_info("sockname")[:2]
        try:
            assert await ask(peer, POST, "/oic/sec/account", {"di": DEVICE}) == "cert"
        finally:
            await _close(peer)
        assert gw.stats.refused == 1
        assert not gw.conns, "no session for a refused connection"
    [line] = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert f"{host}:{port}" in line
    assert "no OCF identity EKU" in line


async def test_the_session_ends_when_the_client_certificate_expires(
    material: Material, log_store: JetStreamEventStore, tmp_path: Path
) -> None:
    ca = pki.load_ca(material.data.pki)
    soon = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=3)
    device = str(uuid.uuid4())
    short = pki.issue_device(ca, tmp_path, device_id=device, not_after=soon)
    ctx = ssl.create_default_context(cafile=str(material.ca_file))
    ctx.load_cert_chain(short.cert_path, short.key_path)
    tok = material.data.issuer().issue(OWNER, now=time.time(), ttl=600)
    settings = {"end_session_on_cert_expiry": True}
    async with tls_gateway(
        log_store, material.data, "ocf-identity", False, settings, tick_interval=0.1
    ) as gw:
        assert gw.tls_address is not None
        assert await attempt(gw.tls_address, ctx, "sign-up", device, OWNER, tok) == "2.04"
        peer = await connect(gw.tls_address, ctx)
        assert isinstance(peer, RawPeer)
        body = {"di": device, "uid": OWNER, "accesstoken": tok, "login": True}
        assert await ask(peer, POST, "/oic/sec/session", body) == "2.04"
        frames = await peer.expect_eof(timeout=10)
        assert any(f.code == ABORT and f.payload == b"client certificate expired" for f in frames)
    offline = [
        e.data async for e in _events(log_store, device) if isinstance(e.data, ev.DeviceOffline)
    ]
    assert [o.reason for o in offline] == ["client certificate expired"]


async def _events(store: JetStreamEventStore, device: str) -> AsyncIterator[ev.AnyEvent]:
    async for m in store.read(subjects.event_filter(owner=OWNER, device=device)):
        yield binding.from_stored(m)


# --------------------------------------------------------------------------- sign-off, expiry


@pytest_asyncio.fixture(loop_scope="session")
async def stack(bus: Bus, mongo_db: AsyncDatabase[Any], tmp_path: Path) -> Any:
    async with open_stack(bus, mongo_db, tmp_path, tick_interval=0.1) as st:
        yield st


async def _signed_in(stack: Stack, device: str, ttl: float = 600) -> tuple[RawPeer, str]:
    assert stack.gateway.tcp_address is not None
    peer = await connect(stack.gateway.tcp_address, None)
    assert isinstance(peer, RawPeer)
    tok = stack.issuer.issue(stack.owner, now=time.time(), ttl=ttl, device_id=device)
    sign_up = {"di": device, "accesstoken": tok, "authprovider": "test"}
    assert await ask(peer, POST, "/oic/sec/account", sign_up) == "2.04"
    body = {"di": device, "uid": stack.owner, "accesstoken": tok, "login": True}
    assert await ask(peer, POST, "/oic/sec/session", body) == "2.04"
    return peer, tok


async def test_sign_off_unregisters_the_device_and_frees_it(stack: Stack) -> None:
    device = str(uuid.uuid4())
    async with stack.running_projector():
        peer, tok = await _signed_in(stack, device)
        await stack.wait_twin(device, lambda t: t.online)
        # the token in the payload: a JWT is longer than a Uri-Query option may be (255)
        query = (f"di={device}", f"uid={stack.owner}")
        body = {"accesstoken": tok}
        assert await ask(peer, DELETE, "/oic/sec/account", body, query=query) == "2.02"
        assert await closed(peer), "sign-off closes the connection"
        twin = await stack.wait_twin(device, lambda t: t.deleted)
        assert not twin.online
    kinds = [e.kind for e in await stack.events(device)]
    assert kinds[-2:] == ["device-offline", "device-unregistered"]
    # the device is free: another owner may sign it up
    assert stack.gateway.tcp_address is not None
    other = stack.issuer.issue(OTHER_OWNER, now=time.time(), ttl=600)
    address = stack.gateway.tcp_address
    assert await attempt(address, None, "sign-up", device, OTHER_OWNER, other) == "2.04"
    # ... and its former owner no longer can
    assert await attempt(address, None, "sign-up", device, stack.owner, tok) == "4.01"


async def test_the_session_ends_when_its_token_expires(stack: Stack) -> None:
    device = str(uuid.uuid4())
    async with stack.running_projector():
        peer, _ = await _signed_in(stack, device, ttl=2)
        await stack.wait_twin(device, lambda t: t.online)
        frames = await peer.expect_eof(timeout=10)
        assert any(f.code == ABORT and f.payload == b"token expired" for f in frames)
        await stack.wait_twin(device, lambda t: not t.online)

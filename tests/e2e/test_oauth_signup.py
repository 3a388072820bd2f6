"""OAuth2 sign-up and JWKS keys over the real gateway, against a real provider on loopback
(:mod:`tests.e2e.idp`: discovery, a token endpoint with one-time codes, a JWKS endpoint).

The gateway is built from configuration (``auth.oauth_providers``, ``auth.jwks_url``) the way
``twinhub gateway`` builds it, and devices speak raw CoAP over TCP.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cbor2
import jwt
import nats
import nats.errors
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from nats.aio.client import Client as NatsClient
from pymongo.asynchronous.database import AsyncDatabase

from eventstore.adapters.endpoint import NatsEndpoint
from gateway.service import Gateway
from proto import subjects
from twin.adapters.mongo import MongoTwinStore
from twinhub_cli import config as cfgmod
from twinhub_cli import services
from twinhub_cli.datadir import DataDir
from twinhub_client import TwinhubClient, UnauthorizedError

from ..integration.gateway.coap_peers import CONTENT_FORMAT, POST, RawPeer, request, uint  # noqa: TID252
from .idp import Idp
from .stack import WAIT, bus_config, production_callout
from .test_security_matrix import closed, connect

if TYPE_CHECKING:
    from tests.conftest import Bus

pytestmark = pytest.mark.servers


@contextlib.asynccontextmanager
async def gateway(bus: Bus, tmp: Path, **auth: Any) -> AsyncIterator[Gateway]:
    config = bus_config(bus, gateway={"tcp": "127.0.0.1:0", "tls": ""}, auth=auth)
    data = DataDir(tmp / "data")
    issuer = services.issuer_for(config, data)
    cfg = dataclasses.replace(services.gateway_config(config, data), gateway_id="gw-oauth")
    async with services.event_store(config, data, "twin"):
        pass  # the twin service provisions the stream; the gateway's role may not
    async with (
        services.event_store(config, data, "gateway") as store,
        Gateway(
            cfg,
            store,
            services.validator_for(config, issuer),
            issuer,
            oauth=services.oauth_providers_for(config),
        ) as gw,
    ):
        yield gw


def provider_spec(idp: Idp, tmp: Path, name: str = "idp") -> str:
    (tmp / "client-id").write_text(idp.client_id + "\n")
    (tmp / "client-secret").write_text(idp.client_secret)
    return (
        f"{name};discovery={idp.url};client_id_file={tmp / 'client-id'};"
        f"client_secret_file={tmp / 'client-secret'};redirect_uri=https://app.test/cb"
    )


async def peer_of(gw: Gateway) -> RawPeer:
    assert gw.tcp_address is not None
    peer = await connect(gw.tcp_address, None)
    assert isinstance(peer, RawPeer)
    return peer


async def sign_up(peer: RawPeer, device: str, code: str, provider: str = "idp") -> tuple[str, Any]:
    body = {"di": device, "accesstoken": code, "authprovider": provider}
    token = peer.token()
    peer.send(
        request(
            POST,
            "/oic/sec/account",
            token,
            payload=cbor2.dumps(body),
            options=[(CONTENT_FORMAT, uint(10000))],
        )
    )
    while True:
        frame = await peer.recv()
        if frame.token == token and 64 <= frame.code < 224:
            code_s = f"{frame.code >> 5}.{frame.code & 31:02d}"
            if code_s == "2.04":
                return code_s, cbor2.loads(frame.payload)
            return code_s, frame.payload


async def test_sign_up_with_an_authorization_code(bus: Bus, tmp_path: Path) -> None:
    idp = Idp().start()
    owner = "o" + uuid.uuid4().hex[:10]
    try:
        spec = provider_spec(idp, tmp_path)
        async with gateway(bus, tmp_path, oauth_providers=[spec]) as gw:
            device = str(uuid.uuid4())
            code = idp.code(owner)
            peer = await peer_of(gw)
            status, body = await sign_up(peer, device, code)
            assert status == "2.04", body
            assert body["uid"] == owner
            sent = idp.token_requests[-1]
            assert sent == {
                "grant_type": "authorization_code",
                "code": code,
                "client_id": idp.client_id,
                "client_secret": idp.client_secret,
                "redirect_uri": "https://app.test/cb",
            }
            # the device retries on the same connection: same answer, no second exchange
            assert await sign_up(peer, device, code) == (status, body)
            assert len(idp.token_requests) == 1
            # the gateway's own tokens sign the device in
            t = peer.token()
            login = {"di": device, "uid": owner, "accesstoken": body["accesstoken"], "login": True}
            peer.send(
                request(
                    POST,
                    "/oic/sec/session",
                    t,
                    payload=cbor2.dumps(login),
                    options=[(CONTENT_FORMAT, uint(10000))],
                )
            )
            while (frame := await peer.recv()).token != t:
                pass
            assert frame.code == (2 << 5) | 4
            peer.writer.transport.abort()

            # the spent code on a new connection: the provider refuses it
            other = await peer_of(gw)
            status, diag = await sign_up(other, device, code)
            assert status == "4.01"
            assert b"invalid_grant" in diag
            assert await closed(other)
            # a made-up code
            other = await peer_of(gw)
            assert (await sign_up(other, device, "not-a-code"))[0] == "4.01"
            assert await closed(other)
            # a provider nobody configured
            other = await peer_of(gw)
            assert (await sign_up(other, device, idp.code(owner), "nope"))[0] == "4.01"
            assert await closed(other)
            # the provider is down: 5.03 with a diagnostic, the connection stays
            idp.stop()
            other = await peer_of(gw)
            t0 = time.monotonic()
            status, diag = await sign_up(other, str(uuid.uuid4()), idp.code(owner))
            assert status == "5.03"
            assert b"unavailable" in diag
            assert time.monotonic() - t0 < 10
            other.writer.transport.abort()
    finally:
        idp.stop()


async def test_tokens_signed_by_a_jwks_key_and_its_rotation(bus: Bus, tmp_path: Path) -> None:
    idp = Idp().start()
    owner = "o" + uuid.uuid4().hex[:10]
    try:
        auth = {
            "jwks_url": idp.url + "/jwks",
            "jwks_min_refresh": 60,
            "issuer": idp.url,
            "audience": idp.client_id,
        }
        async with gateway(bus, tmp_path, **auth) as gw:
            peer = await peer_of(gw)
            status, _ = await sign_up(peer, str(uuid.uuid4()), idp.sign({"sub": owner}), "")
            assert status == "2.04"
            assert idp.jwks_fetches == 1
            idp.rotate()
            # the new kid right away: within min_refresh, so the gateway may not fetch yet
            status, _ = await sign_up(peer, str(uuid.uuid4()), idp.sign({"sub": owner}), "")
            assert status == "4.01"
            assert idp.jwks_fetches == 1, "refreshes are rate-limited"
            peer.writer.transport.abort()
    finally:
        idp.stop()


async def test_a_rotated_jwks_key_is_fetched_on_first_sight(bus: Bus, tmp_path: Path) -> None:
    idp = Idp().start()
    owner = "o" + uuid.uuid4().hex[:10]
    try:
        auth = {
            "jwks_url": idp.url + "/jwks",
            "jwks_min_refresh": 0,
            "issuer": idp.url,
            "audience": idp.client_id,
        }
        async with gateway(bus, tmp_path, **auth) as gw:
            peer = await peer_of(gw)
            for _ in range(2):
                status, _ = await sign_up(peer, str(uuid.uuid4()), idp.sign({"sub": owner}), "")
                assert status == "2.04"
                idp.rotate()
            assert idp.jwks_fetches == 2, "one fetch per new kid"
            peer.writer.transport.abort()
    finally:
        idp.stop()


async def test_the_command_api_takes_a_rotated_jwks_key_without_a_restart(
    bus: Bus, mongo_db: AsyncDatabase[Any], tmp_path: Path
) -> None:
    """The twin's command API, built as ``twinhub twin run`` builds it, refreshes the JWKS on
    an unknown kid like the gateway: a key rotated at the URL works at once.

    The requests go over an application connection of the owner that the session's callout
    admitted; each carries the provider's token, which the API alone validates here (the
    callout's own JWKS refresh: the next test)."""
    idp = Idp().start()
    owner = "o" + uuid.uuid4().hex[:10]
    auth = {
        "jwks_url": idp.url + "/jwks",
        "jwks_min_refresh": 0,
        "issuer": idp.url,
        "audience": idp.client_id,
    }
    config = bus_config(bus, auth=auth)
    data = DataDir(tmp_path / "data")
    app = NatsEndpoint(
        bus.url, token=bus.token(owner), inbox_prefix=subjects.owner_inbox_prefix(owner)
    )

    async def devices(token: str) -> list[Any]:  # on the production subjects, as configured
        async with TwinhubClient(nc, token) as client:
            return (await client.list_devices()).devices

    nc = await nats.connect(**app.connect_options())
    try:
        async with services.event_store(config, data, "twin") as store:
            twins = MongoTwinStore(mongo_db)
            await twins.ensure_indexes()
            async with services.run_api(config, data, store, twins):
                assert await devices(idp.sign({"sub": owner})) == []
                assert idp.jwks_fetches == 1
                idp.rotate()
                assert await devices(idp.sign({"sub": owner})) == []
                assert idp.jwks_fetches == 2, "fetched on the new kid's first sight"
                # a key the JWKS does not publish: looked up once more, then refused
                with pytest.raises(UnauthorizedError):
                    await devices(_forged(idp, owner))
                assert idp.jwks_fetches == 3
    finally:
        idp.stop()
        await nc.close()


async def test_the_callout_takes_a_rotated_jwks_key_without_a_restart(
    bus: Bus, tmp_path: Path
) -> None:
    """The auth callout, built as ``twinhub callout`` builds it, admits applications whose
    tokens the provider signed, and refreshes the JWKS on an unknown kid like the API."""
    idp = Idp().start()
    owner = "o" + uuid.uuid4().hex[:10]
    auth = {
        "jwks_url": idp.url + "/jwks",
        "jwks_min_refresh": 0,
        "issuer": idp.url,
        "audience": idp.client_id,
    }
    config = bus_config(bus, auth=auth)

    async def admitted(token: str) -> bool:
        opts = NatsEndpoint(
            bus.url, token=token, inbox_prefix=subjects.owner_inbox_prefix(owner)
        ).connect_options()
        nc = NatsClient()  # not nats.connect: a refused connect would leak its socket
        try:
            await nc.connect(**opts, allow_reconnect=False, connect_timeout=WAIT)
        except (nats.errors.Error, OSError):
            return False
        finally:
            connected = nc.is_connected
            await nc.close()
        return connected

    try:
        async with production_callout(bus, config, DataDir(tmp_path / "data")) as callout:
            assert await admitted(idp.sign({"sub": owner}))
            assert idp.jwks_fetches == 1
            idp.rotate()
            assert await admitted(idp.sign({"sub": owner}))
            assert idp.jwks_fetches == 2, "fetched on the new kid's first sight"
            assert not await admitted(_forged(idp, owner))
            assert idp.jwks_fetches == 3
            assert not await admitted(bus.token(owner)), "another issuer's token"
            assert (callout.stats.granted, callout.stats.denied) == (2, 2)
    finally:
        idp.stop()


def _forged(idp: Idp, owner: str) -> str:
    """A token with the provider's claims, signed by a key its JWKS does not publish."""
    stranger = ec.generate_private_key(ec.SECP256R1())
    now = int(time.time())
    claims = {"sub": owner, "iss": idp.url, "aud": idp.client_id, "iat": now, "exp": now + 600}
    return jwt.encode(claims, stranger, algorithm="ES256", headers={"kid": "k-x"})


def test_provider_configuration_errors_name_the_problem(tmp_path: Path) -> None:
    bad = [
        ("idp;discovery=file:///etc", "http"),
        ("idp;client_id=x;client_secret_file=/nope;discovery=http://a", "cannot read"),
        ("idp;discovery=http://a;client_secret_file=/x", "client_id"),
        ("idp;token_endpoint=http://a/t;client_id=x", "jwks_uri"),
        ("idp;colour=blue", "unknown setting"),
    ]
    for spec, msg in bad:
        config = cfgmod.load(None, env={}, overrides={"auth": {"oauth_providers": [spec]}})
        with pytest.raises(cfgmod.ConfigError, match=msg):
            services.oauth_providers_for(config)

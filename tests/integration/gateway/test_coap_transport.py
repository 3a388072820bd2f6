"""The CoAP device adapter over real sockets on loopback: TCP and TLS, both directions.

Device peers are the raw RFC 8323 peer of :mod:`.coap_peers` (requests without CSM, floods,
silence) and aiocoap client contexts with a site (a well-behaved device that answers the gateway's
requests over the connection it opened). Waits are for events, each with a deadline.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiocoap
import aiocoap.resource
import pytest
import uvloop
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.adapters.coap import (
    CoapRequest,
    CoapResponse,
    CoapServer,
    CoapServerConfig,
    Connection,
    ConnectionClosed,
    RequestTimeout,
)

from .coap_peers import (
    ABORT,
    ACCEPT,
    CHANGED,
    CONTENT,
    CONTENT_FORMAT,
    CSM,
    DEADLINE,
    GET,
    MAX_MESSAGE_SIZE,
    NOT_FOUND,
    OBSERVE,
    OCF_ACCEPT_VERSION,
    OCF_VERSION,
    PING,
    PONG,
    POST,
    SERVICE_UNAVAILABLE,
    Frame,
    Pki,
    RawPeer,
    free_port,
    ipv6_available,
    make_pki,
    request,
    run_in_thread,
    uint,
)

Handler = Callable[[Connection, CoapRequest], Awaitable[CoapResponse]]


async def echo(conn: Connection, req: CoapRequest) -> CoapResponse:
    return CoapResponse("2.04", req.payload)


@dataclass
class Gateway:
    server: CoapServer
    handler: Handler = echo
    connected: asyncio.Queue[Connection] = field(default_factory=asyncio.Queue)
    closed: dict[str, asyncio.Future[str]] = field(default_factory=dict)
    requests: list[tuple[str, CoapRequest]] = field(default_factory=list)

    async def next_connection(self) -> Connection:
        async with asyncio.timeout(DEADLINE):
            return await self.connected.get()

    async def close_reason(self, conn: Connection) -> str:
        async with asyncio.timeout(DEADLINE):
            return await self.closed[conn.id]


@asynccontextmanager
async def gateway(**config: Any) -> AsyncIterator[Gateway]:
    config.setdefault("tcp_bind", ("127.0.0.1", 0))
    loop = asyncio.get_running_loop()
    holder: list[Gateway] = []

    async def on_request(conn: Connection, req: CoapRequest) -> CoapResponse:
        holder[0].requests.append((conn.id, req))
        return await holder[0].handler(conn, req)

    def on_connect(conn: Connection) -> None:
        holder[0].closed[conn.id] = loop.create_future()
        holder[0].connected.put_nowait(conn)

    def on_close(conn: Connection, reason: str) -> None:
        holder[0].closed[conn.id].set_result(reason)

    server = CoapServer(
        CoapServerConfig(**config), on_request=on_request, on_connect=on_connect, on_close=on_close
    )
    holder.append(Gateway(server))
    async with server:
        yield holder[0]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def addr(address: tuple[str, int] | None) -> tuple[str, int]:
    assert address is not None
    return address


# --------------------------------------------------------------------------- aiocoap as device


class _Resource(aiocoap.resource.Resource):  # type: ignore[misc]
    def __init__(self, payload: bytes) -> None:
        super().__init__()
        self.payload = payload
        self.seen: list[Any] = []

    async def render_get(self, request: Any) -> Any:
        self.seen.append(request)
        return aiocoap.Message(code=aiocoap.CONTENT, payload=self.payload, content_format=10000)

    async def render_post(self, request: Any) -> Any:
        self.seen.append(request)
        return aiocoap.Message(code=aiocoap.CHANGED, payload=request.payload[::-1])


@asynccontextmanager
async def aiocoap_device(resource: _Resource, *, tls: Pki | None = None) -> AsyncIterator[Any]:
    """An aiocoap context acting as the device: a client with a site answering the gateway."""
    site = aiocoap.resource.Site()
    site.add_resource(["oic", "d"], resource)
    transports = ["tlsclient"] if tls else ["tcpclient"]
    ctx = await aiocoap.Context.create_server_context(site, transports=transports)
    if tls is not None:
        client = tls.client_context(alpn=False)  # aiocoap's TLS client adds ALPN "coap" itself
        ctx.client_credentials.ssl_client_context = lambda scheme, hostinfo: client
    try:
        yield ctx
    finally:
        await ctx.shutdown()


async def _both_directions(
    gw: Gateway, scheme: str, address: tuple[str, int], pki: Pki | None
) -> Connection:
    resource = _Resource(b"\xa1\x61n\x61x")
    async with aiocoap_device(resource, tls=pki) as device:
        host, port = address
        # device -> gateway
        msg = aiocoap.Message(
            code=aiocoap.POST,
            uri=f"{scheme}://{host}:{port}/oic/sec/account?di=abc&x=1",
            payload=b"sign-up",
            content_format=10000,
        )
        async with asyncio.timeout(DEADLINE):
            response = await device.request(msg).response
        assert response.code == aiocoap.CHANGED
        assert response.payload == b"sign-up"
        conn = await gw.next_connection()
        assert conn.scheme == scheme
        ((cid, seen),) = gw.requests
        assert cid == conn.id
        assert seen == CoapRequest(
            "POST", "/oic/sec/account", ("di=abc", "x=1"), b"sign-up", content_format=10000
        )
        # gateway -> device, over the connection the device opened
        got = await conn.request(CoapRequest("GET", "/oic/d", accept=10000), timeout=DEADLINE)
        assert got.code == "2.05"
        assert got.payload == b"\xa1\x61n\x61x"
        assert got.content_format == 10000
        changed = await conn.request(
            CoapRequest("POST", "/oic/d", payload=b"abc", content_format=60), timeout=DEADLINE
        )
        assert (changed.code, changed.payload) == ("2.04", b"cba")
        assert [m.code for m in resource.seen] == [aiocoap.GET, aiocoap.POST]
    return conn


async def test_tcp_request_response_both_directions() -> None:
    async with gateway() as gw:
        conn = await _both_directions(gw, "coap+tcp", addr(gw.server.tcp_address), None)
        assert conn.peer_certificate() is None
        assert await gw.close_reason(conn) == "released by the peer"


async def test_tls_request_response_both_directions_with_client_certificate(pki: Pki) -> None:
    async with gateway(
        tcp_bind=None, tls_bind=("127.0.0.1", 0), ssl_context=pki.server_context()
    ) as gw:
        conn = await _both_directions(gw, "coaps+tcp", addr(gw.server.tls_address), pki)
        cert = conn.peer_certificate()
        assert cert is not None
        cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        assert cn == f"uuid:{pki.device_id}"


async def test_configured_ports_are_the_real_ones(pki: Pki) -> None:
    tcp_port, tls_port = free_port(), free_port()
    async with gateway(
        tcp_bind=("127.0.0.1", tcp_port),
        tls_bind=("127.0.0.1", tls_port),
        ssl_context=pki.server_context(client_cert=False),
    ) as gw:
        assert gw.server.tcp_address == ("127.0.0.1", tcp_port)
        assert gw.server.tls_address == ("127.0.0.1", tls_port)
        for port, ctx in ((tcp_port, None), (tls_port, pki.client_context(client_cert=False))):
            peer = await RawPeer.connect(("127.0.0.1", port), ctx)
            peer.send(request(POST, "/a", peer.token(), payload=b"x"))
            assert (await peer.recv_until(CHANGED)).payload == b"x"
            await peer.close()


async def test_port_zero_binds_ephemeral_ports(pki: Pki) -> None:
    async with gateway(tls_bind=("127.0.0.1", 0), ssl_context=pki.server_context()) as gw:
        tcp, tls = addr(gw.server.tcp_address), addr(gw.server.tls_address)
        assert tcp[1] not in (0, 5683, 5684)
        assert tls[1] not in (0, 5683, 5684, tcp[1])


async def test_a_port_in_use_fails_to_start_and_releases_what_was_bound(pki: Pki) -> None:
    async with gateway() as running:
        taken = addr(running.server.tcp_address)
        tcp_port = free_port()
        server = CoapServer(
            CoapServerConfig(
                tcp_bind=("127.0.0.1", tcp_port),  # bound first ...
                tls_bind=taken,  # ... then this fails
                ssl_context=pki.server_context(),
            ),
            on_request=echo,
        )
        with pytest.raises(OSError, match="address already in use"):
            await server.__aenter__()
    async with gateway(tcp_bind=("127.0.0.1", tcp_port)) as again:  # released
        assert again.server.tcp_address == ("127.0.0.1", tcp_port)


@pytest.mark.skipif(not ipv6_available(), reason="no IPv6 loopback on this machine")
async def test_ipv6_remote_address() -> None:
    async with gateway(tcp_bind=("::1", 0)) as gw:
        peer = await RawPeer.connect(addr(gw.server.tcp_address))
        peer.send(request(POST, "/a", peer.token()))
        await peer.recv_until(CHANGED)
        conn = await gw.next_connection()
        local = peer.writer.get_extra_info("sockname")
        assert conn.remote == f"[::1]:{local[1]}"
        await peer.close()


async def test_first_request_without_csm_is_accepted_and_our_csm_goes_first() -> None:
    async with gateway(max_message_size=65536) as gw:
        peer = await RawPeer.connect(addr(gw.server.tcp_address))
        token = peer.token()
        peer.send(request(POST, "/oic/sec/account", token, payload=b"\xa0"))  # no CSM: OCF style
        csm = await peer.recv()
        assert csm.code == CSM
        assert csm.uint(MAX_MESSAGE_SIZE) == 65536
        response = await peer.recv()
        assert (response.code, response.token, response.payload) == (CHANGED, token, b"\xa0")
        conn = await gw.next_connection()
        assert not conn.closed
        await peer.close()
        assert await gw.close_reason(conn) == "closed by the peer"


async def test_ping_is_answered_with_pong_echoing_the_token() -> None:
    async with gateway() as gw:
        peer = await RawPeer.connect(addr(gw.server.tcp_address))
        peer.send(request(GET, "/x", peer.token()))
        await peer.recv_until(CHANGED)
        peer.send(
            Frame(PING, b"\x01\x02\x03\x04\x05\x06\x07\x08")
        )  # iotivity-lite pings with a token
        pong = await peer.recv_until(PONG)
        assert pong.token == b"\x01\x02\x03\x04\x05\x06\x07\x08"
        peer.send(Frame(PING))
        assert (await peer.recv_until(PONG)).token == b""
        await peer.close()


async def test_keepalive_pings_an_idle_peer_and_closes_it_when_it_stays_silent() -> None:
    async with gateway(keepalive_interval=0.2, keepalive_timeout=0.3) as gw:
        peer = await RawPeer.connect(addr(gw.server.tcp_address))
        peer.send(request(POST, "/a", peer.token()))
        await peer.recv_until(CHANGED)
        conn = await gw.next_connection()
        await peer.recv_until(PING)  # idle: the gateway pings
        # ... and we never answer
        frames = await peer.expect_eof()
        aborts = [f for f in frames if f.code == ABORT]
        assert aborts
        assert aborts[0].payload.startswith(b"keepalive timeout")
        assert (await gw.close_reason(conn)).startswith("keepalive timeout")
        with pytest.raises(ConnectionClosed):
            await conn.request(CoapRequest("GET", "/x"), timeout=DEADLINE)


async def test_keepalive_pong_keeps_the_connection_open() -> None:
    async with gateway(keepalive_interval=0.1, keepalive_timeout=0.2) as gw:
        peer = await RawPeer.connect(addr(gw.server.tcp_address))
        peer.send(Frame(CSM))
        conn = await gw.next_connection()
        for _ in range(5):  # five rounds: each Pong keeps the connection alive
            ping = await peer.recv_until(PING)
            peer.send(Frame(PONG, ping.token))
        assert not conn.closed
        peer.send(request(POST, "/still-here", peer.token()))
        await peer.recv_until(CHANGED)
        await peer.close()


async def test_opening_timeout_closes_a_connection_that_sends_nothing() -> None:
    async with gateway(opening_timeout=0.2) as gw:
        peer = await RawPeer.connect(addr(gw.server.tcp_address))
        conn = await gw.next_connection()
        frames = await peer.expect_eof()
        assert [f.code for f in frames] == [CSM, ABORT]
        assert frames[1].payload.startswith(b"opening timeout")
        assert (await gw.close_reason(conn)).startswith("opening timeout")


async def test_opening_timeout_also_bounds_the_tls_handshake(pki: Pki) -> None:
    async with gateway(
        tcp_bind=None,
        tls_bind=("127.0.0.1", 0),
        ssl_context=pki.server_context(),
        opening_timeout=0.2,
    ) as gw:
        peer = await RawPeer.connect(addr(gw.server.tls_address))  # plain TCP: never says hello
        assert await peer.expect_eof() == []
        assert gw.connected.empty()


async def test_pings_before_opening_do_not_open_the_connection() -> None:
    async with gateway(opening_timeout=0.3) as gw:
        peer = await RawPeer.connect(addr(gw.server.tcp_address))
        peer.send(Frame(PING))
        await peer.recv_until(PONG)
        conn = await gw.next_connection()
        frames = await peer.expect_eof()
        assert frames[-1].code == ABORT
        assert (await gw.close_reason(conn)).startswith("opening timeout")


# --------------------------------------------------------------------------- observations


async def _observe_from_raw_peer(
    gw: Gateway, peer: RawPeer, on_notification: Callable[[CoapResponse], None], **kw: Any
) -> tuple[Connection, Any, Frame]:
    peer.send(Frame(CSM))
    conn = await gw.next_connection()
    task = asyncio.create_task(
        conn.observe(
            CoapRequest("GET", "/oic/res", ("if=oic.if.b",), accept=10000),
            on_notification,
            timeout=DEADLINE,
            **kw,
        ),
        name="observe",
    )
    registration = await peer.recv_request()
    assert registration.uint(OBSERVE) == 0
    peer.send(Frame(CONTENT, registration.token, ((OBSERVE, b""),), b"first"))
    async with asyncio.timeout(DEADLINE):
        observation = await task
    return conn, observation, registration


@pytest.mark.parametrize("observe_values", ["increasing", "empty"])
async def test_a_flood_of_notifications_is_delivered_completely_and_in_order(
    observe_values: str,
) -> None:
    count = 2000
    got: list[bytes] = []
    all_in = asyncio.Event()

    def on_notification(response: CoapResponse) -> None:
        got.append(response.payload)
        if len(got) == count:
            all_in.set()

    async with gateway() as gw:
        peer = await RawPeer.connect(addr(gw.server.tcp_address))
        _, observation, registration = await _observe_from_raw_peer(gw, peer, on_notification)
        assert observation.established
        assert observation.first.payload == b"first"
        # RFC 8323 7.2: over TCP the Observe value may be empty and must be ignored on reception
        peer.send(
            *(
                Frame(
                    CONTENT,
                    registration.token,
                    ((OBSERVE, uint(i + 1) if observe_values == "increasing" else b""),),
                    str(i).encode(),
                )
                for i in range(count)
            )
        )
        async with asyncio.timeout(DEADLINE):
            await all_in.wait()
        assert got == [str(i).encode() for i in range(count)]
        await peer.close()


async def test_cancel_sends_a_deregistration_on_the_same_token() -> None:
    got: list[bytes] = []
    ended: list[str] = []
    notified = asyncio.Event()

    def on_notification(response: CoapResponse) -> None:
        got.append(response.payload)
        notified.set()

    async with gateway() as gw:
        peer = await RawPeer.connect(addr(gw.server.tcp_address))
        conn, observation, registration = await _observe_from_raw_peer(
            gw, peer, on_notification, on_end=ended.append
        )
        assert conn.observations == {observation}
        peer.send(Frame(CONTENT, registration.token, ((OBSERVE, uint(2)),), b"n1"))
        async with asyncio.timeout(DEADLINE):
            await notified.wait()
        cancel = asyncio.create_task(observation.cancel(), name="cancel")
        deregistration = await peer.recv_request()
        assert deregistration.code == GET
        assert deregistration.token == registration.token
        assert deregistration.uint(OBSERVE) == 1
        assert deregistration.path == "/oic/res"
        assert deregistration.query == ("if=oic.if.b",)
        assert deregistration.uint(ACCEPT) == 10000
        # a notification still in flight, then the answer to the deregistration
        peer.send(
            Frame(CONTENT, registration.token, ((OBSERVE, uint(3)),), b"late"),
            Frame(CONTENT, registration.token, (), b"final"),
        )
        async with asyncio.timeout(DEADLINE):
            await cancel
        assert observation.ended
        assert ended == ["cancelled"]
        assert got == [b"n1"]
        assert conn.observations == set()
        await peer.close()


async def test_the_device_ending_an_observation_is_reported() -> None:
    got: list[str] = []
    ended: list[str] = []
    async with gateway() as gw:
        peer = await RawPeer.connect(addr(gw.server.tcp_address))
        _, observation, registration = await _observe_from_raw_peer(
            gw, peer, lambda r: got.append(r.code), on_end=ended.append
        )
        peer.send(Frame(NOT_FOUND, registration.token, (), b"gone"))
        async with asyncio.timeout(DEADLINE):
            reason = await observation.wait_ended()
        assert reason == "ended by the device: 4.04"
        assert got == ["4.04"]
        assert ended == [reason]
        await peer.close()


async def test_a_refused_observation_is_not_established() -> None:
    async with gateway() as gw:
        peer = await RawPeer.connect(addr(gw.server.tcp_address))
        peer.send(Frame(CSM))
        conn = await gw.next_connection()
        task = asyncio.create_task(
            conn.observe(CoapRequest("GET", "/light"), lambda r: None, timeout=DEADLINE)
        )
        registration = await peer.recv_request()
        peer.send(Frame(CONTENT, registration.token, (), b"no observe option"))
        async with asyncio.timeout(DEADLINE):
            observation = await task
        assert not observation.established
        assert observation.ended
        assert observation.first.payload == b"no observe option"
        await peer.close()


async def test_observations_end_when_the_connection_closes() -> None:
    ended: list[str] = []
    async with gateway() as gw:
        peer = await RawPeer.connect(addr(gw.server.tcp_address))
        _, observation, _ = await _observe_from_raw_peer(
            gw, peer, lambda r: None, on_end=ended.append
        )
        await peer.close()
        async with asyncio.timeout(DEADLINE):
            await observation.wait_ended()
        assert len(ended) == 1
        assert ended[0].startswith("connection closed")
        await observation.cancel()  # harmless now


# --------------------------------------------------------------------------- failures, closing


async def test_request_to_a_closed_connection_fails_fast() -> None:
    async with gateway() as gw:
        peer = await RawPeer.connect(addr(gw.server.tcp_address))
        peer.send(Frame(CSM))
        conn = await gw.next_connection()
        await peer.close()
        await gw.close_reason(conn)
        assert conn.closed
        async with asyncio.timeout(DEADLINE / 2):  # the request's own timeout is far longer
            with pytest.raises(ConnectionClosed):
                await conn.request(CoapRequest("GET", "/oic/d"), timeout=3600)
            with pytest.raises(ConnectionClosed):
                await conn.observe(CoapRequest("GET", "/oic/d"), lambda r: None, timeout=3600)


async def test_pending_requests_fail_when_the_connection_closes() -> None:
    async with gateway() as gw:
        peer = await RawPeer.connect(addr(gw.server.tcp_address))
        peer.send(Frame(CSM))
        conn = await gw.next_connection()
        pending = asyncio.create_task(conn.request(CoapRequest("GET", "/slow"), timeout=3600))
        await peer.recv_request()
        await peer.close()  # never answers
        async with asyncio.timeout(DEADLINE):
            with pytest.raises(ConnectionClosed):
                await pending


async def test_request_timeout() -> None:
    async with gateway() as gw:
        peer = await RawPeer.connect(addr(gw.server.tcp_address))
        peer.send(Frame(CSM))
        conn = await gw.next_connection()
        with pytest.raises(RequestTimeout):
            await conn.request(CoapRequest("GET", "/silent"), timeout=0.2)
        assert not conn.closed
        # the connection stays usable, and a late answer to the abandoned token is ignored
        first = await peer.recv_request()
        task = asyncio.create_task(conn.request(CoapRequest("GET", "/b"), timeout=DEADLINE))
        second = await peer.recv_request()
        peer.send(Frame(CONTENT, first.token, (), b"late"), Frame(CONTENT, second.token, (), b"b"))
        async with asyncio.timeout(DEADLINE):
            assert (await task).payload == b"b"
        await peer.close()


async def test_close_sends_abort_with_the_reason() -> None:
    async with gateway() as gw:
        peer = await RawPeer.connect(addr(gw.server.tcp_address))
        peer.send(Frame(CSM))
        conn = await gw.next_connection()
        eof = asyncio.create_task(peer.expect_eof())
        async with asyncio.timeout(DEADLINE):
            await conn.close("sign-in failed: token expired")
        frames = await eof
        assert frames[-1].code == ABORT
        assert frames[-1].payload == b"sign-in failed: token expired"
        assert await gw.close_reason(conn) == "sign-in failed: token expired"
        assert gw.server.connections == {}


async def test_server_exit_aborts_every_connection() -> None:
    async with gateway() as gw:
        peers = [await RawPeer.connect(addr(gw.server.tcp_address)) for _ in range(3)]
        for peer in peers:
            peer.send(Frame(CSM))
        conns = [await gw.next_connection() for _ in peers]
        eofs = [asyncio.create_task(peer.expect_eof()) for peer in peers]
    for eof in eofs:
        frames = await eof
        assert frames[-1].code == ABORT
        assert frames[-1].payload == b"server shutting down"
    assert all(c.closed for c in conns)
    assert all(gw.closed[c.id].result() == "server shutting down" for c in conns)


async def test_device_requests_beyond_the_concurrency_limit_get_503() -> None:
    release = asyncio.Event()

    async def slow(conn: Connection, req: CoapRequest) -> CoapResponse:
        await release.wait()
        return CoapResponse("2.04")

    async with gateway(max_concurrent_requests=2) as gw:
        gw.handler = slow
        peer = await RawPeer.connect(addr(gw.server.tcp_address))
        tokens = [peer.token() for _ in range(3)]
        for token in tokens[:2]:
            peer.send(request(POST, "/a", token))
        async with asyncio.timeout(DEADLINE):
            while len(gw.requests) < 2:
                await asyncio.sleep(0)  # let the two handlers start
        peer.send(request(POST, "/a", tokens[2]))
        busy = await peer.recv_until(SERVICE_UNAVAILABLE)
        assert busy.token == tokens[2]
        release.set()
        done = {(await peer.recv_until(CHANGED)).token for _ in range(2)}
        assert done == set(tokens[:2])
        await peer.close()


async def test_an_oversized_message_aborts_the_connection() -> None:
    async with gateway(max_message_size=2048) as gw:
        peer = await RawPeer.connect(addr(gw.server.tcp_address))
        peer.send(request(POST, "/big", peer.token(), payload=b"x" * 4096))
        conn = await gw.next_connection()
        frames = await peer.expect_eof()
        assert frames[-1].code == ABORT
        assert (await gw.close_reason(conn)).startswith("protocol error")


async def test_a_peer_that_does_not_read_is_aborted() -> None:
    """Back-pressure: above the write buffer's high-water mark the gateway stops reading the
    peer (a peer that does not read does not get to send), so the buffer stays bounded; the
    keepalive Ping then goes unanswered and the connection is aborted."""
    big = b"x" * 60000

    async def large(conn: Connection, req: CoapRequest) -> CoapResponse:
        return CoapResponse("2.05", big)

    config = {"keepalive_interval": 0.3, "keepalive_timeout": 0.3}
    async with gateway(max_write_buffer=256 * 1024, request_rate=None, **config) as gw:
        gw.handler = large
        peer = await RawPeer.connect(addr(gw.server.tcp_address))
        peer.send(Frame(CSM, options=((MAX_MESSAGE_SIZE, uint(1 << 20)),)))
        peer.send(request(GET, "/a", peer.token()))
        conn = await gw.next_connection()
        # never read: requests for large responses, far more than the buffers hold
        for _ in range(200):
            peer.send(request(GET, "/a", peer.token()))
        reason = await gw.close_reason(conn)
        assert "keepalive timeout" in reason or "write buffer" in reason, reason
        peer.writer.transport.abort()


# --------------------------------------------------------------------------- OCF options, TLS


async def test_ocf_content_format_version_options_go_on_the_wire() -> None:
    async with gateway() as gw:
        peer = await RawPeer.connect(addr(gw.server.tcp_address))
        peer.send(Frame(CSM))
        conn = await gw.next_connection()

        async def exchange(req: CoapRequest) -> Frame:
            task = asyncio.create_task(conn.request(req, timeout=DEADLINE))
            frame = await peer.recv_request()
            peer.send(
                Frame(
                    CHANGED,
                    frame.token,
                    ((CONTENT_FORMAT, uint(10000)), (OCF_VERSION, b"\x08\x00")),
                    b"\xa0",
                )
            )
            async with asyncio.timeout(DEADLINE):
                response = await task
            assert response.ocf_version == 0x0800
            assert response.content_format == 10000
            return frame

        cbor = await exchange(CoapRequest("POST", "/light", payload=b"\xa0", content_format=10000))
        assert cbor.value(OCF_VERSION) == b"\x08\x00"
        assert cbor.value(OCF_ACCEPT_VERSION) == b"\x08\x00"
        assert cbor.value(ACCEPT) is None  # never added by default

        plain = await exchange(CoapRequest("GET", "/light"))
        assert plain.value(OCF_VERSION) is None
        assert plain.value(OCF_ACCEPT_VERSION) is None
        assert plain.value(ACCEPT) is None

        explicit = await exchange(
            CoapRequest("GET", "/light", accept=10000, ocf_accept_version=0x0801)
        )
        assert explicit.uint(ACCEPT) == 10000
        assert explicit.uint(OCF_ACCEPT_VERSION) == 0x0801
        assert explicit.value(OCF_VERSION) is None
        await peer.close()


async def test_ocf_options_of_device_requests_and_our_responses() -> None:
    async def reply(conn: Connection, req: CoapRequest) -> CoapResponse:
        assert (req.ocf_version, req.ocf_accept_version) == (0x0800, 0x0800)
        return CoapResponse("2.04", b"\xa0", content_format=10000, max_age=60, etag=b"v1")

    async with gateway() as gw:
        gw.handler = reply
        peer = await RawPeer.connect(addr(gw.server.tcp_address))
        peer.send(
            request(
                POST,
                "/oic/sec/session",
                peer.token(),
                payload=b"\xa0",
                options=[
                    (CONTENT_FORMAT, uint(10000)),
                    (OCF_ACCEPT_VERSION, b"\x08\x00"),
                    (OCF_VERSION, b"\x08\x00"),
                ],
            )
        )
        response = await peer.recv_until(CHANGED)
        assert response.uint(CONTENT_FORMAT) == 10000
        assert response.value(OCF_VERSION) == b"\x08\x00"
        assert response.uint(14) == 60  # Max-Age
        assert response.value(4) == b"v1"  # ETag
        await peer.close()


async def test_alpn_coap_is_negotiated(pki: Pki) -> None:
    async with gateway(
        tcp_bind=None, tls_bind=("127.0.0.1", 0), ssl_context=pki.server_context()
    ) as gw:
        peer = await RawPeer.connect(addr(gw.server.tls_address), pki.client_context())
        assert peer.writer.get_extra_info("ssl_object").selected_alpn_protocol() == "coap"
        await peer.close()
        # a device that offers no ALPN is served all the same
        peer = await RawPeer.connect(addr(gw.server.tls_address), pki.client_context(alpn=False))
        peer.send(request(POST, "/a", peer.token(), payload=b"ok"))
        assert (await peer.recv_until(CHANGED)).payload == b"ok"
        await peer.close()


async def test_server_side_tls_only_has_no_peer_certificate(pki: Pki) -> None:
    async with gateway(
        tcp_bind=None, tls_bind=("127.0.0.1", 0), ssl_context=pki.server_context(client_cert=False)
    ) as gw:
        peer = await RawPeer.connect(addr(gw.server.tls_address), pki.client_context())
        peer.send(Frame(CSM))
        conn = await gw.next_connection()
        assert conn.scheme == "coaps+tcp"
        assert conn.peer_certificate() is None
        await peer.close()


async def test_a_client_certificate_from_another_ca_is_refused(pki: Pki, tmp_path: Path) -> None:
    other = make_pki(tmp_path)
    async with gateway(
        tcp_bind=None, tls_bind=("127.0.0.1", 0), ssl_context=pki.server_context()
    ) as gw:
        ctx = pki.client_context(client_cert=False)
        ctx.load_cert_chain(other.client_cert, other.client_key)
        peer = await RawPeer.connect(addr(gw.server.tls_address), ctx)
        peer.send(Frame(CSM))
        with pytest.raises((EOFError, ConnectionError, ssl.SSLError)):
            await peer.recv()
        assert gw.connected.empty()
        peer.writer.transport.abort()


# --------------------------------------------------------------------------- hostile input


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(garbage=st.binary(min_size=1, max_size=300))
def test_hostile_bytes_never_break_the_server(garbage: bytes) -> None:
    async def scenario() -> None:
        async with gateway(opening_timeout=1.0) as gw:
            peer = await RawPeer.connect(addr(gw.server.tcp_address))
            peer.send(request(POST, "/a", peer.token()))
            await peer.recv_until(CHANGED)
            conn = await gw.next_connection()
            peer.writer.write(garbage)
            await peer.close()
            reason = await gw.close_reason(conn)
            assert reason
            # the server still serves
            peer = await RawPeer.connect(addr(gw.server.tcp_address))
            peer.send(request(POST, "/a", peer.token(), payload=b"ok"))
            assert (await peer.recv_until(CHANGED)).payload == b"ok"
            await peer.close()

    run_in_thread(lambda: asyncio.run(scenario()))


# --------------------------------------------------------------------------- uvloop


@pytest.mark.parametrize(
    "runner", ["uvloop.run", "asyncio.Runner(loop_factory=uvloop.new_event_loop)"]
)
def test_works_under_uvloop(runner: str, pki: Pki) -> None:
    async def scenario() -> None:
        assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
        notes: list[bytes] = []
        async with gateway(tls_bind=("127.0.0.1", 0), ssl_context=pki.server_context()) as gw:
            # TCP, aiocoap device, both directions
            await _both_directions(gw, "coap+tcp", addr(gw.server.tcp_address), None)
            # TLS, raw device: no CSM, observation, Ping, cancel, close
            peer = await RawPeer.connect(addr(gw.server.tls_address), pki.client_context())
            peer.send(request(POST, "/a", peer.token(), payload=b"hi"))
            assert (await peer.recv_until(CHANGED)).payload == b"hi"
            conn = await gw.next_connection()
            cert = conn.peer_certificate()
            assert cert is not None
            task = asyncio.create_task(
                conn.observe(CoapRequest("GET", "/o"), lambda r: notes.append(r.payload), DEADLINE)
            )
            reg = await peer.recv_request()
            peer.send(Frame(CONTENT, reg.token, ((OBSERVE, b""),), b"0"))
            peer.send(
                *(Frame(CONTENT, reg.token, ((OBSERVE, b""),), b"%d" % i) for i in range(1, 101))
            )
            observation = await task
            peer.send(Frame(PING, b"\x07"))
            await peer.recv_until(PONG)
            cancel = asyncio.create_task(observation.cancel())
            dereg = await peer.recv_request()
            assert dereg.uint(OBSERVE) == 1
            peer.send(Frame(CONTENT, dereg.token, (), b""))
            await cancel
            assert notes == [b"%d" % i for i in range(1, 101)]
            await conn.close("bye")
            frames = await peer.expect_eof()
            assert frames[-1].code == ABORT
            with pytest.raises(ConnectionClosed):
                await conn.request(CoapRequest("GET", "/o"), timeout=DEADLINE)

    if runner == "uvloop.run":
        run_in_thread(lambda: uvloop.run(scenario()))
    else:

        def with_runner() -> None:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as r:
                r.run(scenario())

        run_in_thread(with_runner)

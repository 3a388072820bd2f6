"""The gateway's CoAP over TCP / TLS server (:mod:`gateway.adapters.coap` on
:mod:`gateway.adapters.coap_tcp` and :mod:`gateway.wire`) does what the aiocoap work-arounds
W1-W20 were for, and what real devices need.

Peers are raw sockets on 127.0.0.1 speaking RFC 8323 with their own framing
(``tests/integration/gateway/coap_peers.py``), so they can do what devices do: send a request
before any CSM, Ping with a token, flood notifications with empty Observe values, never read.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvloop
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.adapters import coap_tcp
from gateway.adapters.coap import (
    CoapRequest,
    CoapResponse,
    CoapServer,
    CoapServerConfig,
    Connection,
    ConnectionClosed,
    UnsupportedResponse,
)
from gateway.adapters.coap_frames import encode_frame, parse_frame
from gateway.wire import messages

from ....integration.gateway.coap_peers import (  # noqa: TID252
    ABORT,
    CONTENT,
    CSM,
    DEADLINE,
    GET,
    MAX_MESSAGE_SIZE,
    OBSERVE,
    PING,
    PONG,
    Frame,
    Pki,
    RawPeer,
    free_port,
    make_pki,
    request,
    run_in_thread,
    uint,
)

COUNT = 2000
REQUESTS = 200  # x 60 KB responses: more than loopback's kernel buffers hold
BAD_OPTION = 130  # 4.02

# --------------------------------------------------------------------------- helpers


@dataclass
class Ours:
    server: CoapServer
    connections: asyncio.Queue[Connection]
    address: tuple[str, int]

    async def next_connection(self) -> Connection:
        async with asyncio.timeout(DEADLINE):
            return await self.connections.get()

    async def peer(self, ssl_context: Any = None) -> RawPeer:
        return await RawPeer.connect(self.address, ssl_context)


@asynccontextmanager
async def our_server(**config: Any) -> AsyncIterator[Ours]:
    config.setdefault("tcp_bind", ("127.0.0.1", 0))
    connections: asyncio.Queue[Connection] = asyncio.Queue()

    async def on_request(conn: Connection, req: CoapRequest) -> CoapResponse:
        return CoapResponse("2.05", b"ours")

    async with CoapServer(
        CoapServerConfig(**config), on_request=on_request, on_connect=connections.put_nowait
    ) as server:
        address = server.tls_address if config.get("tls_bind") else server.tcp_address
        assert address is not None
        yield Ours(server, connections, address)


def abort(peer: RawPeer) -> None:
    peer.writer.transport.abort()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory: Path = tmp_path_factory.mktemp("pki")
    return make_pki(directory)


# --------------------------------------------------------------------------- W1 ports


async def test_ours_binds_the_configured_ports(pki: Pki) -> None:
    tcp_port, tls_port = free_port(), free_port()
    config = CoapServerConfig(
        tcp_bind=("127.0.0.1", tcp_port),
        tls_bind=("127.0.0.1", tls_port),
        ssl_context=pki.server_context(),
    )
    async with CoapServer(config, on_request=_never) as server:
        assert server.tcp_address == ("127.0.0.1", tcp_port)
        assert server.tls_address == ("127.0.0.1", tls_port)
    config = CoapServerConfig(
        tcp_bind=("127.0.0.1", 0), tls_bind=("127.0.0.1", 0), ssl_context=pki.server_context()
    )
    async with CoapServer(config, on_request=_never) as server:
        assert server.tcp_address is not None
        assert server.tls_address is not None
        assert server.tcp_address[1] not in (0, 5683, 5684)
        assert server.tls_address[1] not in (0, 5683, 5684)
        peer = await RawPeer.connect(server.tls_address, pki.client_context())  # it listens
        assert (await peer.recv()).code == CSM
        abort(peer)


async def _never(conn: Connection, req: CoapRequest) -> CoapResponse:
    raise AssertionError("no request expected")


# --------------------------------------------------------------------------- W2 no CSM


async def test_ours_answers_a_first_request_without_csm() -> None:
    """OCF devices send their first request without waiting for (or sending) a CSM."""
    async with our_server() as ours:
        peer = await ours.peer()
        peer.send(request(GET, "/echo", b"\x01"))
        assert (await peer.recv()).code == CSM  # ours still goes first
        response = await peer.recv()
        assert (response.code, response.token, response.payload) == (CONTENT, b"\x01", b"ours")
        abort(peer)


# --------------------------------------------------------------------------- W3 notifications


def notifications(token: bytes, observe: Callable[[int], bytes]) -> list[Frame]:
    flood = [Frame(CONTENT, token, ((OBSERVE, observe(i)),), str(i).encode()) for i in range(COUNT)]
    return [*flood, Frame(CONTENT, token, (), b"end")]  # no Observe: the last one


@pytest.mark.parametrize("observe", ["increasing", "empty"])
async def test_ours_delivers_every_notification_in_order(observe: str) -> None:
    """Over TCP the Observe value may be empty (RFC 8323 section 7.2) and devices send it so:
    every notification counts, in order, none coalesced."""
    got: list[bytes] = []
    ended: list[str] = []
    done = asyncio.Event()

    def on_end(reason: str) -> None:
        ended.append(reason)
        done.set()

    async with our_server() as ours:
        peer = await ours.peer()
        peer.send(Frame(CSM))
        conn = await ours.next_connection()
        task = asyncio.create_task(
            conn.observe(
                CoapRequest("GET", "/o"), lambda r: got.append(r.payload), DEADLINE, on_end=on_end
            )
        )
        registration = await peer.recv_request()
        peer.send(Frame(CONTENT, registration.token, ((OBSERVE, b""),), b"first"))
        observation = await task
        assert observation.established
        values: Callable[[int], bytes] = (
            (lambda i: uint(i + 1)) if observe == "increasing" else (lambda i: b"")
        )
        peer.send(*notifications(registration.token, values))
        async with asyncio.timeout(DEADLINE):
            await done.wait()
        assert got == [str(i).encode() for i in range(COUNT)] + [b"end"]
        assert ended == ["ended by the device: 2.05"]
        abort(peer)


# --------------------------------------------------------------------------- W4 deregistration


async def test_ours_deregisters_on_the_same_token() -> None:
    async with our_server() as ours:
        peer = await ours.peer()
        peer.send(Frame(CSM))
        conn = await ours.next_connection()
        task = asyncio.create_task(
            conn.observe(CoapRequest("GET", "/o", ("x=1",)), lambda r: None, DEADLINE)
        )
        registration = await peer.recv_request()
        peer.send(Frame(CONTENT, registration.token, ((OBSERVE, b""),)))
        observation = await task
        cancel = asyncio.create_task(observation.cancel())
        deregistration = await peer.recv_request()
        assert deregistration.code == GET
        assert deregistration.token == registration.token
        assert deregistration.uint(OBSERVE) == 1
        assert deregistration.path == "/o"
        assert deregistration.query == ("x=1",)
        peer.send(Frame(CONTENT, registration.token))
        async with asyncio.timeout(DEADLINE):
            await cancel
        assert observation.end_reason == "cancelled"
        abort(peer)


# --------------------------------------------------------------------------- W5 peer certificate


async def test_ours_exposes_the_peer_certificate(pki: Pki) -> None:
    async with our_server(
        tcp_bind=None, tls_bind=("127.0.0.1", 0), ssl_context=pki.server_context()
    ) as ours:
        peer = await ours.peer(pki.client_context())
        peer.send(Frame(CSM))
        conn = await ours.next_connection()
        cert = conn.peer_certificate()
        assert cert is not None
        assert cert.subject.rfc4514_string() == f"CN=uuid:{pki.device_id}"
        abort(peer)


# --------------------------------------------------------------------------- W6 closed connection


async def _request_to_a_closed_connection() -> None:
    async with our_server() as ours:
        peer = await ours.peer()
        peer.send(Frame(CSM))
        conn = await ours.next_connection()
        abort(peer)
        async with asyncio.timeout(DEADLINE):  # not the request's timeout of an hour
            await conn.wait_closed()
            with pytest.raises(ConnectionClosed):
                await conn.request(CoapRequest("GET", "/x"), timeout=3600)


async def test_ours_fails_requests_to_a_closed_connection_at_once() -> None:
    await _request_to_a_closed_connection()


def test_ours_fails_requests_to_a_closed_connection_at_once_under_uvloop() -> None:
    run_in_thread(lambda: uvloop.run(_request_to_a_closed_connection()))


# --------------------------------------------------------------------------- W7 back-pressure


async def test_ours_cuts_off_a_peer_that_does_not_read() -> None:
    """Above the transport's high-water mark the driver stops reading the peer, so the write
    buffer stays bounded; the connection ends by the write-buffer limit or, when the peer gets
    no further request in, by the unanswered keepalive Ping (see
    ``tests/integration/gateway/test_coap_transport.py``)."""
    big = b"x" * 60000
    closed: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def on_request(conn: Connection, req: CoapRequest) -> CoapResponse:
        return CoapResponse("2.05", big)

    def on_close(conn: Connection, reason: str) -> None:
        if not closed.done():
            closed.set_result(reason)

    config = CoapServerConfig(
        tcp_bind=("127.0.0.1", 0),
        max_write_buffer=256 * 1024,
        request_rate=None,
        keepalive_interval=0.3,
        keepalive_timeout=0.3,
    )
    async with CoapServer(config, on_request=on_request, on_close=on_close) as server:
        assert server.tcp_address is not None
        peer = await RawPeer.connect(server.tcp_address)
        # a Max-Message-Size that takes the large responses; then never read
        peer.send(Frame(CSM, options=((MAX_MESSAGE_SIZE, uint(1 << 20)),)))
        peer.send(*(request(GET, "/a", peer.token()) for _ in range(REQUESTS)))
        async with asyncio.timeout(DEADLINE):
            reason = await closed
        assert "write buffer" in reason or "keepalive timeout" in reason, reason
        abort(peer)


# --------------------------------------------------------------------------- W8 timeouts, keepalive


async def test_ours_times_out_a_silent_connection() -> None:
    async with our_server(opening_timeout=0.2, keepalive_interval=60) as ours:
        silent = await ours.peer()
        received = await silent.expect_eof()
        assert [f.code for f in received] == [CSM, ABORT]
        assert received[1].payload.startswith(b"opening timeout")


async def test_ours_pings_an_idle_connection() -> None:
    async with our_server(keepalive_interval=0.1, keepalive_timeout=5) as ours:
        idle = await ours.peer()
        idle.send(Frame(CSM))
        assert (await idle.recv()).code == CSM
        assert (await idle.recv()).code == PING
        abort(idle)


# --------------------------------------------------------------------------- W9 Pong


async def test_ours_answers_a_ping_with_token() -> None:
    """Devices send Ping with a token (RFC 8323 section 5.4 allows it): the Pong echoes it."""
    async with our_server() as ours:
        peer = await ours.peer()
        peer.send(Frame(PING, b"\x07"))
        assert (await peer.recv()).code == CSM
        pong = await peer.recv()
        assert (pong.code, pong.token) == (PONG, b"\x07")
        abort(peer)


# --------------------------------------------------------------------------- W10 ALPN


async def test_ours_negotiates_alpn_coap(pki: Pki) -> None:
    async with our_server(
        tcp_bind=None, tls_bind=("127.0.0.1", 0), ssl_context=pki.server_context()
    ) as ours:
        peer = await ours.peer(pki.client_context())  # offers "coap"
        assert peer.writer.get_extra_info("ssl_object").selected_alpn_protocol() == "coap"
        abort(peer)


# --------------------------------------------------------------------------- W11 shutdown


async def test_ours_aborts_and_closes_on_exit() -> None:
    async with our_server() as ours:
        peer = await ours.peer()
        peer.send(Frame(CSM))
        await ours.next_connection()
    received = await peer.expect_eof()
    assert [(f.code, f.payload) for f in received] == [
        (CSM, received[0].payload),
        (ABORT, b"server shutting down"),
    ]


# --------------------------------------------------------------------------- OCF options, codecs


def _wire_round_trip(request: CoapRequest) -> tuple[Any, CoapRequest]:
    frame = coap_tcp.EncodedRequest(request).take()
    decoded = parse_frame(encode_frame(frame))
    return decoded, messages.request_value(decoded)


def test_ours_puts_the_ocf_versions_on_cbor_requests_and_no_accept() -> None:
    decoded, value = _wire_round_trip(
        CoapRequest("POST", "/light", payload=b"\xa0", content_format=10000)
    )
    assert [v for n, v in decoded.options if n == 2053] == [b"\x08\x00"]
    assert [v for n, v in decoded.options if n == 2049] == [b"\x08\x00"]
    assert [v for n, v in decoded.options if n == 17] == []  # no Accept
    assert (value.ocf_version, value.ocf_accept_version, value.accept) == (0x0800, 0x0800, None)
    _, value = _wire_round_trip(CoapRequest("GET", "/light"))
    assert (value.ocf_version, value.ocf_accept_version, value.accept) == (None, None, None)


paths = st.lists(
    st.text(st.characters(codec="utf-8", exclude_characters="/"), min_size=1, max_size=8),
    max_size=4,
).map(lambda segments: "/" + "/".join(segments))


@settings(deadline=None)
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE"]),
    path=paths,
    query=st.lists(st.text(max_size=12), max_size=3).map(tuple),
    payload=st.binary(max_size=64),
    content_format=st.none() | st.sampled_from([0, 50, 60, 10000]),
    accept=st.none() | st.sampled_from([50, 60, 10000]),
    observe=st.none() | st.integers(1, (1 << 24) - 1),
    ocf_version=st.none() | st.integers(0, 0xFFFF),
    ocf_accept_version=st.none() | st.integers(0, 0xFFFF),
)
def test_requests_survive_the_wire(
    method: str,
    path: str,
    query: tuple[str, ...],
    payload: bytes,
    content_format: int | None,
    accept: int | None,
    observe: int | None,
    ocf_version: int | None,
    ocf_accept_version: int | None,
) -> None:
    request = CoapRequest(
        method,
        path,
        query,
        payload,
        content_format,
        accept,
        observe,
        ocf_version,
        ocf_accept_version,
    )
    _, value = _wire_round_trip(request)
    if content_format == 10000 and ocf_version is None:
        request = CoapRequest(**{**_fields(request), "ocf_version": 0x0800})
    if 10000 in (content_format, accept) and ocf_accept_version is None:
        request = CoapRequest(**{**_fields(request), "ocf_accept_version": 0x0800})
    assert value == request


@settings(deadline=None)
@given(
    code=st.sampled_from(["2.01", "2.02", "2.04", "2.05", "4.00", "4.01", "4.04", "5.00", "5.03"]),
    payload=st.binary(max_size=64),
    content_format=st.none() | st.sampled_from([0, 50, 60, 10000]),
    max_age=st.none() | st.integers(0, (1 << 32) - 1),
    etag=st.none() | st.binary(min_size=1, max_size=8),
)
def test_responses_survive_the_wire(
    code: str, payload: bytes, content_format: int | None, max_age: int | None, etag: bytes | None
) -> None:
    response = CoapResponse(code, payload, content_format, max_age, etag)
    frame = messages.response_frame(response)
    with_token = type(frame)(frame.code, b"\x01", frame.options, frame.payload)
    value = messages.response_value(parse_frame(encode_frame(with_token)))
    expected_version = 0x0800 if content_format == 10000 else None
    assert value == CoapResponse(
        code, payload, content_format, max_age, etag, None, expected_version
    )


def _fields(request: CoapRequest) -> dict[str, Any]:
    return {name: getattr(request, name) for name in request.__slots__}


@pytest.mark.parametrize("bad", ["2.5", "25", "x.05", "8.00", "2.32", "", "2.0五"])
def test_bad_codes_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="CoAP code"):
        CoapResponse(bad)


@pytest.mark.parametrize(
    "bad",
    [
        CoapRequest("BREW", "/a"),
        CoapRequest("GET", "a"),
        CoapRequest("GET", "/a", content_format=1 << 16),
        CoapRequest("GET", "/a", observe=1 << 24),
    ],
)
def test_unencodable_requests_are_refused(bad: CoapRequest) -> None:
    with pytest.raises(ValueError, match=r"method|path|range"):
        coap_tcp.EncodedRequest(bad)


def test_request_codes_are_not_responses() -> None:
    with pytest.raises(ValueError, match="response code"):
        CoapResponse("0.01")


# --------------------------------------------------------------------------- references


async def test_ours_keeps_an_observation_nobody_references() -> None:
    got: list[bytes] = []
    async with our_server() as ours:
        peer = await ours.peer()
        peer.send(Frame(CSM))
        conn = await ours.next_connection()
        task = asyncio.create_task(
            conn.observe(CoapRequest("GET", "/o"), lambda r: got.append(r.payload), DEADLINE)
        )
        registration = await peer.recv_request()
        peer.send(Frame(CONTENT, registration.token, ((OBSERVE, b""),)))
        await task
        del task
        gc.collect()
        peer.send(Frame(CONTENT, registration.token, ((OBSERVE, b"\x01"),), b"kept"))
        # a later exchange on the same connection shows the notification was processed
        marker = asyncio.create_task(conn.request(CoapRequest("GET", "/marker"), DEADLINE))
        answer = await peer.recv_request()
        peer.send(Frame(CONTENT, answer.token))
        await marker
        assert got == [b"kept"]
        abort(peer)


# --------------------------------------------------------------------------- W13-W16 hostile input


async def test_ours_aborts_on_format_errors_and_answers_bad_values_with_4_02() -> None:
    async with our_server() as ours:
        peer = await ours.peer()
        peer.writer.write(bytes([0x30, 0x02, 0xB2, 0xFF, 0xFE]))  # GET, Uri-Path b"\xff\xfe"
        answer = await peer.recv_until(BAD_OPTION)
        assert answer.code == BAD_OPTION
        peer.writer.write(bytes([0x09]))  # a token of 9 bytes
        received = await peer.expect_eof()
        assert received[-1].code == ABORT
        assert received[-1].payload == b"message format error: token length 9 (at most 8)"


@pytest.mark.parametrize(("code", "name"), [(0x21, "1.01"), (0xC1, "6.01")])
async def test_ours_aborts_on_reserved_codes(code: int, name: str) -> None:
    """W15: classes 1 and 6 are reserved, not requests."""
    async with our_server() as ours:
        peer = await ours.peer()
        peer.send(Frame(CSM), Frame(code, b"\x01"))
        received = await peer.expect_eof()
        assert [f.code for f in received] == [CSM, ABORT]
        assert received[1].payload == f"message format error: reserved code {name}".encode()


async def test_ours_ignores_an_empty_message() -> None:
    """RFC 8323 section 3.3: code 0.00 is ignored (not served as a request)."""
    async with our_server() as ours:
        peer = await ours.peer()
        peer.send(Frame(CSM), Frame(0, b"\x01"), request(GET, "/echo", b"\x02"))
        answer = await peer.recv_until(CONTENT)
        assert (answer.token, answer.payload) == (b"\x02", b"ours")
        abort(peer)


async def test_ours_abort_arrives_although_the_peer_sent_more() -> None:
    """W16: after our Abort we half-close and drain what the peer still sends, so unread input
    does not reset the connection and destroy the Abort in flight."""
    async with our_server() as ours:
        peer = await ours.peer()
        conn = await ours.next_connection()
        peer.writer.write(bytes([0x09]) + b"\x00" * 4_000_000)  # far more than one read takes
        async with asyncio.timeout(DEADLINE):  # the Abort is sent; only then do we read
            while not conn.closed:
                await asyncio.sleep(0.01)
        received = await peer.expect_eof()
        assert [f.code for f in received] == [CSM, ABORT]
        assert received[1].payload == b"message format error: token length 9 (at most 8)"


def _unknown_critical(token: bytes) -> Frame:
    return request(GET, "/echo", token, options=((2051, b"x"),))


async def test_ours_answers_unknown_critical_options_with_4_02() -> None:
    """W14."""
    async with our_server() as ours:
        peer = await ours.peer()
        peer.send(_unknown_critical(b"\x01"))
        answer = await peer.recv_until(BAD_OPTION)
        assert answer.token == b"\x01"
        assert answer.payload == b"unrecognised critical option 2051"
        abort(peer)


# --------------------------------------------------------------------------- W19 block-wise


async def test_ours_advertises_max_message_size_only() -> None:
    async with our_server(max_message_size=4096) as ours:
        peer = await ours.peer()
        csm = await peer.recv()
        assert csm.code == CSM
        assert csm.options == ((MAX_MESSAGE_SIZE, b"\x10\x00"),)
        abort(peer)


async def test_ours_refuses_a_block_wise_response() -> None:
    async with our_server() as ours:
        peer = await ours.peer()
        peer.send(Frame(CSM))
        conn = await ours.next_connection()
        task = asyncio.create_task(conn.request(CoapRequest("GET", "/big"), DEADLINE))
        asked = await peer.recv_request()
        peer.send(Frame(CONTENT, asked.token, ((23, b"\x0e"),), b"x" * 1024))  # block 0, more
        with pytest.raises(UnsupportedResponse, match="block-wise"):
            async with asyncio.timeout(DEADLINE):
                await task
        abort(peer)

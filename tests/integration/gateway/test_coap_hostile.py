"""Hostile input against the CoAP device adapter, over real sockets on loopback.

Malformed RFC 8323 frames abort their connection with a diagnostic (and nothing else); requests
with unrecognised critical options get 4.02; oversized messages are refused from their header;
unauthenticated connections have a deadline and a limit; requests have a per-connection rate.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import tracemalloc
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from gateway.adapters.coap import (
    CoapRequest,
    CoapResponse,
    CoapServer,
    CoapServerConfig,
    Connection,
)

from .coap_peers import (
    ABORT,
    CHANGED,
    CSM,
    DEADLINE,
    GET,
    POST,
    URI_PATH,
    Frame,
    Pki,
    RawPeer,
    make_pki,
    request,
)

BAD_OPTION, TOO_MANY_REQUESTS, PROXYING_NOT_SUPPORTED = 130, 157, 165
MAX_AGE = 14


@dataclass
class Server:
    server: CoapServer
    connected: asyncio.Queue[Connection] = field(default_factory=asyncio.Queue)
    closed: dict[str, asyncio.Future[str]] = field(default_factory=dict)
    requests: list[CoapRequest] = field(default_factory=list)

    @property
    def tcp(self) -> tuple[str, int]:
        assert self.server.tcp_address is not None
        return self.server.tcp_address

    @property
    def tls(self) -> tuple[str, int]:
        assert self.server.tls_address is not None
        return self.server.tls_address

    async def next_connection(self) -> Connection:
        async with asyncio.timeout(DEADLINE):
            return await self.connected.get()

    async def close_reason(self, conn: Connection) -> str:
        async with asyncio.timeout(DEADLINE):
            return await self.closed[conn.id]


@contextlib.asynccontextmanager
async def serve(**config: Any) -> AsyncIterator[Server]:
    """A CoapServer answering 2.04 with the request payload; ``POST /signin`` marks the
    connection authenticated."""
    config.setdefault("tcp_bind", ("127.0.0.1", 0))
    loop = asyncio.get_running_loop()
    holder: list[Server] = []

    async def on_request(conn: Connection, req: CoapRequest) -> CoapResponse:
        holder[0].requests.append(req)
        if req.path == "/signin":
            conn.mark_authenticated()
        return CoapResponse("2.04", req.payload)

    def on_connect(conn: Connection) -> None:
        holder[0].closed[conn.id] = loop.create_future()
        holder[0].connected.put_nowait(conn)

    def on_close(conn: Connection, reason: str) -> None:
        holder[0].closed[conn.id].set_result(reason)

    server = CoapServer(
        CoapServerConfig(**config), on_request=on_request, on_connect=on_connect, on_close=on_close
    )
    holder.append(Server(server))
    async with server:
        yield holder[0]


async def still_serves(peer: RawPeer, payload: bytes = b"ok") -> None:
    peer.send(request(POST, "/echo", peer.token(), payload=payload))
    assert (await peer.recv_until(CHANGED)).payload == payload


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def raw(body: bytes, code: int = GET, token: bytes = b"") -> bytes:
    """A message with ``body`` (options and payload) exactly as given."""
    assert len(body) < 13
    return bytes([(len(body) << 4) | len(token), code]) + token + body


# --------------------------------------------------------------------------- 1. malformed frames

MALFORMED = {
    "token length 9": (bytes([0x09, GET]) + b"123456789", "message format error: token length 9"),
    "token length 15": (bytes([0x0F, GET]) + b"x" * 15, "message format error: token length 15"),
    "option delta 15": (raw(bytes([0xF1, 0x00])), "message format error: option delta uses"),
    "option length 15": (raw(bytes([0x1F, 0x00])), "message format error: option length uses"),
    "option delta extension truncated": (raw(bytes([0xD0])), "message format error: option delta"),
    "option value truncated": (raw(bytes([0xB5, 0x61])), "message format error: option 11 trunc"),
    "option number above 65535": (
        raw(bytes([0xE0, 0xFF, 0x00, 0xE0, 0xFF, 0x00])),
        "message format error: option number 65549 above 65535",
    ),
    "payload marker without payload": (raw(b"\xff"), "message format error: payload marker"),
    "reserved code class 1": (raw(b"", code=0x21), "message format error: reserved code 1.01"),
    "reserved code class 6": (raw(b"", code=0xC1), "message format error: reserved code 6.01"),
    "Len 15, 4 GiB announced": (
        bytes([0xF0, 0xFF, 0xFF, 0xFF, 0xFF, GET]),
        "message too large: 4295033106 bytes announced, limit 65536",
    ),
    "Len 14, beyond the limit": (
        bytes([0xE0, 0xFF, 0x00, GET]) + b"\x00" * 100,
        "message too large: 65553 bytes announced, limit 65536",
    ),
    "unknown critical option in a Ping": (
        bytes([0x11, 0xE2, 0x07, 0x10]),  # token 07, option 1, empty
        "unknown critical option 1 in a signalling message",
    ),
    "unknown critical option in a CSM": (
        bytes([0x21, 0xE1, 0x00, 0x91, 0x00]),  # token 00, option 9, empty
        "unknown critical option 9 in a CSM",
    ),
}


@pytest.mark.parametrize(("data", "diagnostic"), MALFORMED.values(), ids=MALFORMED.keys())
async def test_a_malformed_message_aborts_its_connection_and_nothing_else(
    data: bytes, diagnostic: str
) -> None:
    async with serve(max_message_size=65536) as srv:
        bystander = await RawPeer.connect(srv.tcp)
        await still_serves(bystander)
        bystander_conn = await srv.next_connection()

        hostile = await RawPeer.connect(srv.tcp)
        await still_serves(hostile, b"first a good request")
        conn = await srv.next_connection()
        hostile.writer.write(data)
        frames = await hostile.expect_eof()
        assert frames[-1].code == ABORT
        assert frames[-1].payload.decode().startswith(diagnostic)
        assert (await srv.close_reason(conn)) == f"protocol error: {frames[-1].payload.decode()}"

        await still_serves(bystander, b"still here")
        assert not bystander_conn.closed
        newcomer = await RawPeer.connect(srv.tcp)
        await still_serves(newcomer)
        for peer in (bystander, newcomer):
            await peer.close()


async def test_the_abort_reaches_a_peer_that_keeps_sending() -> None:
    """After the Abort we send FIN and discard the peer's input (no RST that would lose it)."""
    async with serve() as srv:
        peer = await RawPeer.connect(srv.tcp)
        peer.writer.write(bytes([0x09]) + b"\x00" * 60000)
        peer.writer.write(b"\x00" * 60000)
        frames = await peer.expect_eof()
        assert [f.code for f in frames] == [CSM, ABORT]
        assert frames[1].payload == b"message format error: token length 9 (at most 8)"


async def test_unrecognised_critical_options_get_4_02_and_the_connection_stays() -> None:
    async with serve() as srv:
        peer = await RawPeer.connect(srv.tcp)
        cases = [
            ([(2051, b"x")], BAD_OPTION, b"unrecognised critical option 2051"),
            ([(1, b"etag")], BAD_OPTION, b"unrecognised critical option 1"),  # If-Match
            ([(27, b"\x0e")], BAD_OPTION, b"unrecognised critical option 27"),  # Block1
            ([(17, b"\x00\x00\x01")], BAD_OPTION, b"option 17: length 3 not in 0..2"),
            ([(35, b"coap://elsewhere/")], PROXYING_NOT_SUPPORTED, b"proxying not supported"),
        ]
        for options, code, diagnostic in cases:
            token = peer.token()
            peer.send(request(POST, "/echo", token, payload=b"x", options=options))
            frame = await peer.recv_until(code)
            assert frame.token == token
            assert frame.payload.startswith(diagnostic)
        # a Uri-Path that is not UTF-8 (aiocoap would fail the whole connection: W13)
        token = peer.token()
        peer.send(Frame(POST, token, ((URI_PATH, b"\xff\xfe"),)))
        assert (await peer.recv_until(BAD_OPTION)).payload == b"option 11: not UTF-8"
        # elective options we do not know are ignored
        token = peer.token()
        peer.send(request(POST, "/echo", token, payload=b"e", options=[(40, b"?"), (6, b"")]))
        assert (await peer.recv_until(CHANGED)).payload == b"e"
        assert [r.payload for r in srv.requests] == [b"e"]  # nothing else reached the handler
        conn = await srv.next_connection()
        assert not conn.closed
        await peer.close()


async def test_an_empty_message_is_ignored() -> None:
    async with serve() as srv:
        peer = await RawPeer.connect(srv.tcp)
        peer.writer.write(bytes([0x00, 0x00]) * 3)
        await still_serves(peer)
        assert len(srv.requests) == 1
        await peer.close()


# --------------------------------------------------------------------------- 2. oversized


async def test_a_100_mb_message_is_refused_from_its_header_and_never_buffered() -> None:
    body = 100 * 1024 * 1024
    header = bytes([0xF0, *(body - 65805).to_bytes(4, "big"), POST])
    chunk = bytes(1024 * 1024)
    async with serve(max_message_size=65536, close_timeout=DEADLINE) as srv:
        tracemalloc.start()
        try:
            peer = await RawPeer.connect(srv.tcp)
            reading = asyncio.create_task(read_to_eof(peer))
            peer.writer.write(header)
            sent = 0
            with contextlib.suppress(ConnectionError):
                while sent < body:
                    peer.writer.write(chunk)
                    await peer.writer.drain()
                    sent += len(chunk)
                peer.writer.write_eof()
            frames = await reading
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        await peer.close()
        assert sent == body  # all of it went through the server: read and discarded
        assert frames[-1].code == ABORT
        assert frames[-1].payload == b"message too large: 104857606 bytes announced, limit 65536"
        assert peak < 12 * 1024 * 1024, f"peak {peak} bytes"


async def read_to_eof(peer: RawPeer) -> list[Frame]:
    """What arrives until the server's FIN (our side stays open for writing)."""
    frames = []
    with contextlib.suppress(EOFError):
        while True:
            frames.append(await peer.recv())
    return frames


# --------------------------------------------------------------------------- 3. timeouts, limits


async def test_a_connection_that_does_not_sign_in_in_time_is_closed() -> None:
    async with serve(auth_timeout=0.3, keepalive_interval=0.25, keepalive_timeout=0.25) as srv:
        idle = await RawPeer.connect(srv.tcp)
        await still_serves(idle)  # busy, ...
        signed = await RawPeer.connect(srv.tcp)
        signed.send(request(POST, "/signin", signed.token()))
        await signed.recv_until(CHANGED)
        frames = await idle.expect_eof()  # ... but never signed in
        assert frames[-1].code == ABORT
        assert frames[-1].payload == b"not signed in within 0.3s"
        for _ in range(2):  # signed in: kept well past the deadline (keepalive answered)
            ping = await signed.recv_until(226)
            signed.send(Frame(227, ping.token))
        await still_serves(signed)
        assert srv.server.unauthenticated == 0
        await signed.close()


async def test_the_sign_in_deadline_also_bounds_the_tls_handshake(pki: Pki) -> None:
    async with serve(
        tcp_bind=None,
        tls_bind=("127.0.0.1", 0),
        ssl_context=pki.server_context(),
        opening_timeout=30,
        auth_timeout=0.3,
    ) as srv:
        peer = await RawPeer.connect(srv.tls)  # plain TCP on the TLS port: never says hello
        async with asyncio.timeout(5):
            assert await peer.expect_eof() == []
        assert srv.connected.empty()
        assert srv.server.unauthenticated == 0
        assert srv.server.handshakes == 0


async def test_connections_beyond_the_unauthenticated_limit_are_refused_at_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with serve(max_unauthenticated=2) as srv:
        first, second = await RawPeer.connect(srv.tcp), await RawPeer.connect(srv.tcp)
        for peer in (first, second):
            await still_serves(peer)
        with caplog.at_level(logging.WARNING, "gateway.adapters.coap"):
            third = await RawPeer.connect(srv.tcp)
            assert await third.expect_eof(timeout=2) == []  # not even our CSM
        assert srv.server.refused == 1
        assert "refused a connection from 127.0.0.1:" in caplog.text
        assert "2 unauthenticated connections (limit 2)" in caplog.text
        # one signs in: room for one more
        first.send(request(POST, "/signin", first.token()))
        await first.recv_until(CHANGED)
        fourth = await RawPeer.connect(srv.tcp)
        await still_serves(fourth)
        await still_serves(first)
        for peer in (first, second, fourth):
            await peer.close()
        async with asyncio.timeout(DEADLINE):
            while srv.server.connections:
                await asyncio.sleep(0.01)
        assert srv.server.unauthenticated == 0


async def test_tls_connections_beyond_the_limit_are_refused_before_the_handshake(
    pki: Pki,
) -> None:
    async with serve(
        tcp_bind=None,
        tls_bind=("127.0.0.1", 0),
        ssl_context=pki.server_context(),
        max_unauthenticated=2,
        opening_timeout=30,
    ) as srv:
        silent = [await RawPeer.connect(srv.tls) for _ in range(2)]  # handshakes never started
        async with asyncio.timeout(DEADLINE):
            while srv.server.unauthenticated < 2:
                await asyncio.sleep(0.01)
        async with asyncio.timeout(5):  # far less than the handshake timeout
            with pytest.raises((ConnectionError, ssl.SSLError, OSError)):
                await RawPeer.connect(srv.tls, pki.client_context())
        assert srv.server.refused == 1
        for peer in silent:
            peer.writer.transport.abort()
        async with asyncio.timeout(DEADLINE):
            while srv.server.unauthenticated:
                await asyncio.sleep(0.01)
        peer = await RawPeer.connect(srv.tls, pki.client_context())
        await still_serves(peer)
        await peer.close()


async def test_requests_beyond_the_rate_get_4_29_with_max_age() -> None:
    async with serve(request_rate=0.5, request_burst=3) as srv:
        peer = await RawPeer.connect(srv.tcp)
        tokens = [peer.token() for _ in range(5)]
        peer.send(*(request(POST, "/echo", t, payload=t) for t in tokens))
        answers = {}
        while len(answers) < 5:
            frame = await peer.recv()
            if frame.code != CSM:
                answers[frame.token] = frame
        assert [answers[t].code for t in tokens] == [CHANGED] * 3 + [TOO_MANY_REQUESTS] * 2
        for t in tokens[3:]:
            assert answers[t].payload == b"too many requests"
            assert answers[t].uint(MAX_AGE) == 2  # one request per 2 s
        assert len(srv.requests) == 3
        conn = await srv.next_connection()
        assert not conn.closed
        await peer.close()

"""The asyncio driver of our RFC 8323 connection over real loopback TLS (and TCP), against
aiocoap's TCP / TLS client as the independent peer: CSM both ways, a GET the device sends and we
answer, an observation of the device's resource with three notifications, a deregistration,
and the device's Release when it shuts down. Waits are for events, each with a deadline."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiocoap
import aiocoap.resource
import pytest
import uvloop

from gateway.adapters.coap_frames import Deframer, Frame, encode_frame
from gateway.wire import events as ev
from gateway.wire.connection import ConnectionConfig, State
from gateway.wire.options import encode_uint
from gateway.wire.protocol import CoapTcpProtocol

from .coap_peers import DEADLINE, Pki, make_pki

pytestmark = pytest.mark.servers

CONTENT = 69
URI_PATH = 11
CONTENT_FORMAT = 12


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("wire-pki"))


class Recorder:
    """Our server side: every connection's events, and the answer to ``GET /hello``."""

    def __init__(self) -> None:
        self.protocols: list[CoapTcpProtocol] = []
        self.events: list[ev.Event] = []
        self.observers: list[ev.Incoming] = []
        self._changed = asyncio.Event()

    def factory(self) -> CoapTcpProtocol:
        protocol = CoapTcpProtocol(self.on_event, ConnectionConfig(max_message_size=8192))
        self.protocols.append(protocol)
        return protocol

    def on_event(self, protocol: CoapTcpProtocol, event: ev.Event) -> None:
        self.events.append(event)
        self._changed.set()
        if isinstance(event, ev.RequestReceived):
            path = [v for n, v in event.frame.options if n == URI_PATH]
            if path == [b"clock"] and event.handle.observe:
                self.observers.append(event.handle)
                protocol.send_response(
                    event.handle, Frame(CONTENT, b"", (), b"tick 0"), keep_observing=True
                )
                return
            payload = b"world" if path == [b"hello"] else b"?"
            protocol.send_response(
                event.handle, Frame(CONTENT, b"", ((CONTENT_FORMAT, b""),), payload)
            )
        elif isinstance(event, ev.ReleaseReceived):
            protocol.close()  # nothing of ours pending: go (RFC 8323 section 5.5)

    async def wait_for(self, predicate: Callable[[list[ev.Event]], bool]) -> None:
        async with asyncio.timeout(DEADLINE):
            while not predicate(self.events):
                self._changed.clear()
                await self._changed.wait()

    def of(self, kind: type[Any]) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]


class Counter(aiocoap.resource.ObservableResource):
    def __init__(self) -> None:
        super().__init__()
        self.value = 0

    def bump(self) -> None:
        self.value += 1
        self.updated_state()

    async def render_get(self, request: Any) -> Any:
        return aiocoap.Message(
            code=aiocoap.CONTENT, payload=str(self.value).encode(), content_format=0
        )


@asynccontextmanager
async def device(resource: Counter, tls: Pki | None) -> AsyncIterator[Any]:
    site = aiocoap.resource.Site()
    site.add_resource(["counter"], resource)
    transports = ["tlsclient"] if tls else ["tcpclient"]
    ctx = await aiocoap.Context.create_server_context(site, transports=transports)
    if tls is not None:
        client = tls.client_context(alpn=False)  # aiocoap's TLS client adds ALPN itself
        ctx.client_credentials.ssl_client_context = lambda scheme, hostinfo: client
    try:
        yield ctx
    finally:
        await ctx.shutdown()


async def _conversation(ssl_context: ssl.SSLContext | None, pki: Pki | None) -> Recorder:
    loop = asyncio.get_running_loop()
    recorder = Recorder()
    server = await loop.create_server(recorder.factory, "127.0.0.1", 0, ssl=ssl_context)
    port = server.sockets[0].getsockname()[1]
    scheme = "coaps+tcp" if pki is not None else "coap+tcp"
    counter = Counter()
    try:
        async with device(counter, pki) as ctx:
            request = aiocoap.Message(code=aiocoap.GET, uri=f"{scheme}://127.0.0.1:{port}/hello")
            async with asyncio.timeout(DEADLINE):
                response = await ctx.request(request).response
            assert (response.code, response.payload) == (aiocoap.CONTENT, b"world")
            (protocol,) = recorder.protocols
            conn = protocol.connection
            # aiocoap's CSM came first, with its Max-Message-Size and Block-wise-Transfer
            assert isinstance(recorder.events[0], ev.CsmReceived)
            assert recorder.events[0] == ev.CsmReceived(conn.peer_max_message_size, True)
            assert conn.peer_max_message_size > 1152
            assert isinstance(recorder.events[1], ev.RequestReceived)

            # we observe the device's resource over the connection it opened
            path = Frame(1, b"", ((URI_PATH, b"counter"),))
            handle = protocol.observe(path, timeout=DEADLINE)
            await recorder.wait_for(lambda e: any(isinstance(x, ev.ResponseReceived) for x in e))
            (first,) = recorder.of(ev.ResponseReceived)
            assert (first.handle, first.last, first.frame.payload) == (handle, False, b"0")
            assert first.observe is not None
            for n in (1, 2, 3):
                counter.bump()
                await recorder.wait_for(
                    lambda e, n=n: (
                        len([x for x in e if isinstance(x, ev.NotificationReceived)]) == n
                    )
                )
            notes = recorder.of(ev.NotificationReceived)
            assert [x.frame.payload for x in notes] == [b"1", b"2", b"3"]
            assert all(x.fresh and x.handle == handle for x in notes)
            seqs = [first.observe, *(x.seq for x in notes)]
            assert seqs == sorted(seqs) and len(set(seqs)) == 4

            protocol.cancel_observation(handle, timeout=DEADLINE)
            await recorder.wait_for(
                lambda e: len([x for x in e if isinstance(x, ev.ResponseReceived)]) == 2
            )
            assert recorder.of(ev.ResponseReceived)[-1].last
            assert conn.pending == 0

            # and a Ping of ours is answered
            protocol.ping()
            await recorder.wait_for(lambda e: any(isinstance(x, ev.PongReceived) for x in e))
        # the device shut down: its Release, and we close (aiocoap leaves the stream open, W11)
        await recorder.wait_for(lambda e: any(isinstance(x, ev.ReleaseReceived) for x in e))
        async with asyncio.timeout(DEADLINE):
            await protocol.wait_closed()
        assert not recorder.of(ev.ConnectionFailed)
        assert conn.state is State.CLOSED
    finally:
        server.close()
        await server.wait_closed()
    return recorder


async def test_over_tls_against_aiocoaps_tls_client(pki: Pki) -> None:
    await _conversation(pki.server_context(), pki)


async def test_over_tcp_against_aiocoaps_tcp_client() -> None:
    await _conversation(None, None)


def test_over_tls_on_uvloop(pki: Pki) -> None:
    uvloop.run(_conversation(pki.server_context(), pki))


async def test_a_peer_that_does_not_read_is_not_read_either() -> None:
    """Back-pressure: while our write buffer is over its high-water mark we stop reading, and
    read again once the peer drained it."""
    loop = asyncio.get_running_loop()
    recorder = Recorder()
    server = await loop.create_server(recorder.factory, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(encode_frame(Frame(225, b"", ((2, encode_uint(1 << 20)),))))
        await recorder.wait_for(lambda e: any(isinstance(x, ev.CsmReceived) for x in e))
        (protocol,) = recorder.protocols
        assert protocol.reading
        big = Frame(2, b"", ((URI_PATH, b"x"),), b"y" * 1000)
        async with asyncio.timeout(DEADLINE):
            while protocol.writable:  # we send, the peer does not read
                for _ in range(64):
                    if protocol.connection.state is not State.OPEN:
                        break  # cut off as soon as the bytes queued pass the bound
                    protocol.send_request(big, timeout=3600)
                await asyncio.sleep(0)
        assert not protocol.reading
        async with asyncio.timeout(DEADLINE):
            while not protocol.writable:  # the peer reads at last
                await reader.read(1 << 16)
        assert protocol.reading
        writer.write(encode_frame(Frame(226, b"p")))
        await recorder.wait_for(lambda e: any(isinstance(x, ev.PingReceived) for x in e))
        writer.close()
        await writer.wait_closed()
    finally:
        server.close()
        await server.wait_closed()


async def test_aiocoap_observes_us_and_gets_three_notifications(pki: Pki) -> None:
    """The other direction: the peer observes a resource of ours; our notifications carry
    increasing Observe values (aiocoap drops any that is not larger, W3)."""
    loop = asyncio.get_running_loop()
    recorder = Recorder()
    server = await loop.create_server(recorder.factory, "127.0.0.1", 0, ssl=pki.server_context())
    port = server.sockets[0].getsockname()[1]
    try:
        async with device(Counter(), pki) as ctx:
            uri = f"coaps+tcp://127.0.0.1:{port}/clock"
            observation = ctx.request(aiocoap.Message(code=aiocoap.GET, uri=uri, observe=0))
            async with asyncio.timeout(DEADLINE):
                first = await observation.response
            assert first.payload == b"tick 0"
            (protocol,), (handle,) = recorder.protocols, recorder.observers
            got = []
            async with asyncio.timeout(DEADLINE):
                notifications = aiter(observation.observation)
                for n in (1, 2, 3):
                    protocol.send_response(
                        handle, Frame(CONTENT, b"", (), b"tick %d" % n), keep_observing=True
                    )
                    got.append((await anext(notifications)).payload)
            assert got == [b"tick 1", b"tick 2", b"tick 3"]
            observation.observation.cancel()
    finally:
        server.close()
        await server.wait_closed()


async def test_what_one_loop_turn_sends_is_one_write() -> None:
    loop = asyncio.get_running_loop()
    recorder = Recorder()
    server = await loop.create_server(recorder.factory, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(encode_frame(Frame(225)))
        await recorder.wait_for(lambda e: any(isinstance(x, ev.CsmReceived) for x in e))
        (protocol,) = recorder.protocols
        before = protocol.writes
        for _ in range(50):
            protocol.send_request(Frame(1, b"", ((URI_PATH, b"a"),)), timeout=DEADLINE)
        protocol.ping()
        deframer = Deframer(1 << 20)
        seen: list[Frame] = []
        async with asyncio.timeout(DEADLINE):
            while not any(f.code == 226 for f in seen):
                deframer.feed(await reader.read(1 << 16))
                while (frame := deframer.next()) is not None:
                    seen.append(frame)
        assert [f.code for f in seen if f.code != 225] == [1] * 50 + [226]
        assert protocol.writes == before + 1
        writer.close()
        await writer.wait_closed()
    finally:
        server.close()
        await server.wait_closed()


async def test_a_peer_that_never_answers_our_ping_is_aborted_by_the_timer() -> None:
    """The timer drives ``tick``: keepalive Ping when idle, then Abort when no Pong comes; the
    peer reads the Abort, then the end of the stream."""
    loop = asyncio.get_running_loop()
    events: list[ev.Event] = []
    config = ConnectionConfig(keepalive_interval=0.2, ping_timeout=0.3)
    server = await loop.create_server(
        lambda: CoapTcpProtocol(lambda p, e: events.append(e), config), "127.0.0.1", 0
    )
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(encode_frame(Frame(225)))
        deframer = Deframer(1 << 20)
        seen: list[Frame] = []
        async with asyncio.timeout(DEADLINE):
            while chunk := await reader.read(1 << 16):  # until our EOF
                deframer.feed(chunk)
                while (frame := deframer.next()) is not None:
                    seen.append(frame)
        diagnostic = "keepalive timeout: no Pong within 0.3s"
        assert [f.code for f in seen] == [225, 226, 229]
        assert seen[-1].payload == diagnostic.encode()
        assert events[-1] == ev.ConnectionFailed(ev.FailureKind.PING_TIMEOUT, diagnostic)
        writer.close()
        await writer.wait_closed()
    finally:
        server.close()
        await server.wait_closed()


async def test_a_peer_that_lets_our_writes_pile_up_is_cut_off() -> None:
    """W7: past ``max_write_buffer`` the transport is aborted and the failure reported."""
    loop = asyncio.get_running_loop()
    events: list[ev.Event] = []
    made: list[CoapTcpProtocol] = []

    def factory() -> CoapTcpProtocol:
        made.append(CoapTcpProtocol(lambda p, e: events.append(e), max_write_buffer=256 * 1024))
        return made[-1]

    server = await loop.create_server(factory, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(encode_frame(Frame(225, b"", ((2, encode_uint(1 << 20)),))))
        async with asyncio.timeout(DEADLINE):
            while not events:
                await asyncio.sleep(0.01)
        (protocol,) = made
        big = Frame(2, b"", ((URI_PATH, b"x"),), b"y" * 4000)
        async with asyncio.timeout(DEADLINE):
            while protocol.connection.state is State.OPEN:
                for _ in range(64):
                    if protocol.connection.state is not State.OPEN:
                        break  # cut off as soon as the bytes queued pass the bound
                    protocol.send_request(big, timeout=3600)
                await asyncio.sleep(0)
            await protocol.wait_closed()
        assert events[-1] == ev.ConnectionFailed(
            ev.FailureKind.WRITE_BUFFER, "peer does not read (write buffer above 262144 bytes)"
        )
        writer.close()
    finally:
        server.close()
        await server.wait_closed()


async def test_after_our_abort_a_peer_that_keeps_the_stream_open_is_cut_off() -> None:
    """W16: Abort, then FIN while we read on (no RST that could lose the Abort); a peer that
    does not close within ``close_timeout`` gets the transport aborted."""
    loop = asyncio.get_running_loop()
    events: list[ev.Event] = []
    made: list[CoapTcpProtocol] = []

    def factory() -> CoapTcpProtocol:
        made.append(CoapTcpProtocol(lambda p, e: events.append(e), close_timeout=0.3))
        return made[-1]

    server = await loop.create_server(factory, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"\x09\x01" + b"t" * 9)  # token length 9: a format error
        deframer = Deframer(1 << 20)
        seen: list[Frame] = []
        async with asyncio.timeout(DEADLINE):
            while chunk := await reader.read(1 << 16):  # our FIN ends this
                deframer.feed(chunk)
                while (frame := deframer.next()) is not None:
                    seen.append(frame)
            writer.write(b"more, ignored")  # the stream is still open our way in
            (protocol,) = made
            await protocol.wait_closed()  # then close_timeout passes
        assert [f.code for f in seen] == [225, 229]
        assert seen[1].payload == b"message format error: token length 9 (at most 8)"
        assert [type(e) for e in events] == [ev.ConnectionFailed]
        writer.close()
    finally:
        server.close()
        await server.wait_closed()


async def test_a_socket_admitted_before_its_handshake_is_driven_the_same(pki: Pki) -> None:
    """W17: the gateway accepts on its own socket, admits, then hands the socket over with
    ``loop.connect_accepted_socket(..., ssl=)``; the driver is made before the handshake and
    starts (CSM first) after it."""
    loop = asyncio.get_running_loop()
    recorder = Recorder()
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    port = listener.getsockname()[1]
    try:
        async with device(Counter(), pki) as ctx:
            uri = f"coaps+tcp://127.0.0.1:{port}/hello"
            answer = asyncio.ensure_future(
                ctx.request(aiocoap.Message(code=aiocoap.GET, uri=uri)).response
            )
            async with asyncio.timeout(DEADLINE):
                conn, _ = await loop.sock_accept(listener)
                await loop.connect_accepted_socket(
                    recorder.factory, conn, ssl=pki.server_context(), ssl_handshake_timeout=DEADLINE
                )
                response = await answer
            assert response.payload == b"world"
            assert isinstance(recorder.events[0], ev.CsmReceived)
    finally:
        listener.close()

"""aiocoap 0.4.17 behaviours we work around (``gateway.adapters.coap_wire`` W1-W19), pinned.

Each ``test_aiocoap_*`` asserts the behaviour of *raw* aiocoap: if an upgrade changes it, the test
fails and the work-around must be revisited. Each ``test_ours_*`` asserts what our adapter gives
instead. Peers are raw sockets on 127.0.0.1 speaking RFC 8323 with aiocoap's own framing functions
(here we test aiocoap, after all). Tests that show that something does *not* happen wait a short,
fixed time for it: that is the claim, not synchronisation.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import gc
import inspect
import ipaddress
import logging
import socket
import ssl
import threading
import warnings
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiocoap
import aiocoap.resource
import pytest
import uvloop
from aiocoap import Message
from aiocoap.numbers.optionnumbers import OptionNumber
from aiocoap.optiontypes import OpaqueOption, UintOption
from aiocoap.protocol import ClientObservation
from aiocoap.transports.tcp import (
    TcpConnection,
    TCPServer,
    _decode_message,
    _extract_message_size,
    _serialize,
)
from aiocoap.transports.tls import TLSServer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given
from hypothesis import strategies as st

from gateway.adapters import coap_wire as wire
from gateway.adapters.coap import (
    CoapRequest,
    CoapResponse,
    CoapServer,
    CoapServerConfig,
    Connection,
    ConnectionClosed,
)

DEADLINE = 10.0
ABSENCE = 0.4  # how long we watch for something that must not happen
COUNT = 2000
REQUESTS = 400  # x 64 KiB responses: more than loopback's kernel buffers hold


# --------------------------------------------------------------------------- helpers


class Peer:
    """A raw RFC 8323 peer on a socket (aiocoap's framing functions)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self._buffer = b""

    @classmethod
    async def connect(cls, port: int, ssl_context: ssl.SSLContext | None = None) -> Peer:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ssl_context, server_hostname="127.0.0.1" if ssl_context else None
        )
        return cls(reader, writer)

    def send(self, *messages: Any) -> None:
        self.writer.write(b"".join(_serialize(m) for m in messages))

    async def recv(self, timeout: float = DEADLINE) -> Any:
        """The next message, or None at EOF."""
        async with asyncio.timeout(timeout):
            while True:
                size = _extract_message_size(self._buffer)
                if size is not None and sum(size) <= len(self._buffer):
                    data, self._buffer = self._buffer[: sum(size)], self._buffer[sum(size) :]
                    return _decode_message(data)
                try:
                    data = await self.reader.read(65536)
                except ConnectionResetError:
                    data = b""
                if not data:
                    self.close()
                    return None
                self._buffer += data

    async def recv_non_signalling(self) -> Any:
        while True:
            message = await self.recv()
            assert message is not None, "connection closed"
            if not message.code.is_signalling():
                return message

    async def nothing_for(self, seconds: float) -> bool:
        """True when nothing (neither a message nor EOF) arrives within ``seconds``."""
        try:
            await self.recv(seconds)
        except TimeoutError:
            return True
        return False

    def close(self) -> None:
        self.writer.transport.abort()


def msg(code: Any, token: bytes = b"", **options: Any) -> Any:
    return Message(code=code, _token=token, **options)


def free_port_pair() -> int:
    """A port p with p and p + 1 free (for the port + 1 pin)."""
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = int(a.getsockname()[1])
            try:
                with socket.socket() as b:
                    b.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port
    raise RuntimeError("no two adjacent free ports")


class _Echo(aiocoap.resource.Resource):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self.remotes: list[Any] = []

    async def render_get(self, request: Any) -> Any:
        self.remotes.append(request.remote)
        return Message(code=aiocoap.CONTENT, payload=b"raw aiocoap")

    render_post = render_get


@asynccontextmanager
async def raw_aiocoap_server(
    *, tls: ssl.SSLContext | None = None, port: int | None = None, resource: _Echo | None = None
) -> AsyncIterator[tuple[Any, int]]:
    """aiocoap's own TCP (or TLS) server, as an application would create it."""
    site = aiocoap.resource.Site()
    site.add_resource(["echo"], resource or _Echo())
    port = port or free_port_pair()
    ctx = await aiocoap.Context.create_server_context(
        site,
        bind=("127.0.0.1", port),
        transports=["tlsserver" if tls else "tcpserver"],
        _ssl_context=tls,
    )
    server = ctx.request_interfaces[0].token_interface.server
    try:
        yield ctx, int(server.sockets[0].getsockname()[1])
    finally:
        await ctx.shutdown()


@dataclass
class Ours:
    server: CoapServer
    connections: asyncio.Queue[Connection]
    port: int


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
        yield Ours(server, connections, address[1])


async def next_connection(ours: Ours) -> Connection:
    async with asyncio.timeout(DEADLINE):
        return await ours.connections.get()


@dataclass(frozen=True)
class Tls:
    ca: Path
    server_files: tuple[Path, Path]
    client: ssl.SSLContext
    device_cn: str

    @property
    def server(self) -> ssl.SSLContext:
        """A fresh server context asking for a client certificate (nothing configured ALPN)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(*self.server_files)
        ctx.load_verify_locations(self.ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate."""
    directory: Path = tmp_path_factory.mktemp("tls")
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pin CA")])

    def cert(cn: str, key: Any, *, ca: bool = False, ip: str | None = None) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(hours=2))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if ip:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]), False
            )
        return builder.sign(ca_key, hashes.SHA256())

    def write(name: str, certificate: x509.Certificate, key: Any) -> tuple[Path, Path]:
        c, k = directory / f"{name}.crt", directory / f"{name}.key"
        c.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        k.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return c, k

    ca_path, _ = write("ca", cert("pin CA", ca_key, ca=True), ca_key)
    server_key, client_key = (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
    )
    server_files = write("server", cert("127.0.0.1", server_key, ip="127.0.0.1"), server_key)
    cn = "uuid:00000000-0000-4000-8000-0000000000aa"
    client_files = write("client", cert(cn, client_key), client_key)

    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_verify_locations(ca_path)
    client.load_cert_chain(*client_files)
    client.set_alpn_protocols(["coap"])
    return Tls(ca_path, server_files, client, cn)


def run_in_thread(target: Callable[[], None]) -> None:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            target()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, name="uvloop-pin")
    thread.start()
    thread.join(60)
    assert not thread.is_alive()
    if errors:
        raise errors[0]


# --------------------------------------------------------------------------- W1 ports


class _RecordingLoop:
    def __init__(self) -> None:
        self.binds: list[tuple[str, int]] = []

    async def create_server(self, factory: Any, host: str, port: int, **kw: Any) -> object:
        self.binds.append((host, port))
        return object()


async def test_aiocoap_binds_port_plus_one_for_tls_and_the_default_port_for_zero() -> None:
    loop = _RecordingLoop()
    log = logging.getLogger("pin")
    await TCPServer.create_server(("127.0.0.1", 0), None, log, loop)
    await TLSServer.create_server(("127.0.0.1", 0), None, log, loop, None)
    await TCPServer.create_server(("127.0.0.1", 7000), None, log, loop)
    await TLSServer.create_server(("127.0.0.1", 7000), None, log, loop, None)
    assert loop.binds == [
        ("127.0.0.1", 5683),  # port 0 means "the default port" to aiocoap
        ("127.0.0.1", 5684),
        ("127.0.0.1", 7000),
        ("127.0.0.1", 7001),  # the TLS server binds the given port + 1
    ]


async def test_aiocoap_tls_server_really_listens_on_port_plus_one(tls: Tls) -> None:
    port = free_port_pair()
    async with raw_aiocoap_server(tls=tls.server, port=port) as (_, bound):
        assert bound == port + 1


async def test_ours_binds_the_configured_ports(tls: Tls) -> None:
    tcp_port, tls_port = free_port_pair(), free_port_pair()
    config = CoapServerConfig(
        tcp_bind=("127.0.0.1", tcp_port), tls_bind=("127.0.0.1", tls_port), ssl_context=tls.server
    )
    async with CoapServer(config, on_request=_never) as server:
        assert server.tcp_address == ("127.0.0.1", tcp_port)
        assert server.tls_address == ("127.0.0.1", tls_port)
    config = CoapServerConfig(
        tcp_bind=("127.0.0.1", 0), tls_bind=("127.0.0.1", 0), ssl_context=tls.server
    )
    async with CoapServer(config, on_request=_never) as server:
        assert server.tcp_address is not None
        assert server.tls_address is not None
        assert server.tcp_address[1] not in (0, 5683, 5684)
        assert server.tls_address[1] not in (0, 5683, 5684)


async def _never(conn: Connection, req: CoapRequest) -> CoapResponse:
    raise AssertionError("no request expected")


# --------------------------------------------------------------------------- W2 no CSM


async def test_aiocoap_aborts_a_connection_whose_first_message_is_a_request() -> None:
    async with raw_aiocoap_server() as (_, port):
        peer = await Peer.connect(port)
        peer.send(msg(aiocoap.GET, b"\x01", uri_path=("echo",)))
        assert (await peer.recv()).code == aiocoap.CSM
        abort = await peer.recv()
        assert abort.code == aiocoap.ABORT
        assert abort.payload == b"No CSM received"
        assert await peer.recv() is None
        peer.close()


async def test_ours_answers_a_first_request_without_csm() -> None:
    async with our_server() as ours:
        peer = await Peer.connect(ours.port)
        peer.send(msg(aiocoap.GET, b"\x01", uri_path=("echo",)))
        assert (await peer.recv()).code == aiocoap.CSM  # ours still goes first
        response = await peer.recv()
        assert (response.code, response.token, response.payload) == (
            aiocoap.CONTENT,
            b"\x01",
            b"ours",
        )
        peer.close()


# --------------------------------------------------------------------------- W3 notifications


@asynccontextmanager
async def device_server() -> AsyncIterator[tuple[int, asyncio.Queue[Peer]]]:
    """A raw device that accepts aiocoap's client connection."""
    peers: asyncio.Queue[Peer] = asyncio.Queue()

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = Peer(reader, writer)
        peer.send(msg(aiocoap.CSM))
        peers.put_nowait(peer)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    try:
        yield int(server.sockets[0].getsockname()[1]), peers
    finally:
        server.close()


def notifications(token: bytes, observe: Callable[[int], int]) -> list[Any]:
    flood = [
        msg(aiocoap.CONTENT, token, observe=observe(i), payload=str(i).encode())
        for i in range(COUNT)
    ]
    return [*flood, msg(aiocoap.CONTENT, token, payload=b"end")]  # no Observe: the last one


async def test_aiocoap_default_request_coalesces_a_flood_of_notifications() -> None:
    async with device_server() as (port, peers):
        ctx = await aiocoap.Context.create_client_context(transports=["tcpclient"])
        try:
            req = ctx.request(msg(aiocoap.GET, uri=f"coap+tcp://127.0.0.1:{port}/o", observe=0))
            async with asyncio.timeout(DEADLINE):
                peer = await peers.get()
            registration = await peer.recv_non_signalling()
            peer.send(msg(aiocoap.CONTENT, registration.token, observe=0, payload=b"first"))
            await req.response
            got = []
            peer.send(*notifications(registration.token, lambda i: i + 1))
            async with asyncio.timeout(DEADLINE):
                async for notification in req.observation:
                    got.append(notification.payload)
            assert len(got) < COUNT  # the async iterator keeps only the latest
            peer.close()
        finally:
            await ctx.shutdown()


async def test_aiocoap_drops_notifications_whose_observe_value_does_not_increase() -> None:
    """RFC 8323 7.2: over TCP the Observe value may be empty and must be ignored."""
    async with device_server() as (port, peers):
        ctx = await aiocoap.Context.create_client_context(transports=["tcpclient"])
        try:
            req = ctx.request(
                msg(aiocoap.GET, uri=f"coap+tcp://127.0.0.1:{port}/o", observe=0),
                handle_blockwise=False,
            )
            async with asyncio.timeout(DEADLINE):
                peer = await peers.get()
            registration = await peer.recv_non_signalling()
            peer.send(msg(aiocoap.CONTENT, registration.token, observe=0, payload=b"first"))
            await req.response
            got: list[bytes] = []
            ended = asyncio.Event()
            req.observation.register_callback(
                lambda m: got.append(m.payload), _suppress_deprecation=True
            )
            req.observation.register_errback(lambda e: ended.set(), _suppress_deprecation=True)
            peer.send(*notifications(registration.token, lambda i: 0))
            async with asyncio.timeout(DEADLINE):
                await ended.wait()
            assert got == [b"end"]  # all 2000 empty-Observe notifications dropped
            peer.close()
        finally:
            await ctx.shutdown()


def test_aiocoap_register_callback_is_deprecated() -> None:
    with pytest.warns(DeprecationWarning, match="register_callback"):
        ClientObservation().register_callback(lambda m: None)


@pytest.mark.parametrize("observe", ["increasing", "empty"])
async def test_ours_delivers_every_notification_in_order(observe: str) -> None:
    got: list[bytes] = []
    ended: list[str] = []
    done = asyncio.Event()

    def on_end(reason: str) -> None:
        ended.append(reason)
        done.set()

    async with our_server() as ours:
        peer = await Peer.connect(ours.port)
        peer.send(msg(aiocoap.CSM))
        conn = await next_connection(ours)
        task = asyncio.create_task(
            conn.observe(
                CoapRequest("GET", "/o"), lambda r: got.append(r.payload), DEADLINE, on_end=on_end
            )
        )
        registration = await peer.recv_non_signalling()
        peer.send(msg(aiocoap.CONTENT, registration.token, observe=0, payload=b"first"))
        observation = await task
        assert observation.established
        values: Callable[[int], int] = (
            (lambda i: i + 1) if observe == "increasing" else (lambda i: 0)
        )
        peer.send(*notifications(registration.token, values))
        async with asyncio.timeout(DEADLINE):
            await done.wait()
        assert got == [str(i).encode() for i in range(COUNT)] + [b"end"]
        assert ended == ["ended by the device: 2.05"]
        peer.close()


# --------------------------------------------------------------------------- W4 deregistration


async def test_aiocoap_sends_nothing_when_an_observation_is_cancelled() -> None:
    async with device_server() as (port, peers):
        ctx = await aiocoap.Context.create_client_context(transports=["tcpclient"])
        try:
            uri = f"coap+tcp://127.0.0.1:{port}"
            req = ctx.request(msg(aiocoap.GET, uri=uri + "/o", observe=0), handle_blockwise=False)
            async with asyncio.timeout(DEADLINE):
                peer = await peers.get()
            registration = await peer.recv_non_signalling()
            peer.send(msg(aiocoap.CONTENT, registration.token, observe=0, payload=b"first"))
            await req.response
            req.observation.cancel()
            marker = ctx.request(msg(aiocoap.GET, uri=uri + "/marker"), handle_blockwise=False)
            after = await peer.recv_non_signalling()
            # the next message after the cancellation is the marker: no deregistration
            assert after.opt.uri_path == ("marker",)
            assert after.opt.observe is None
            peer.send(msg(aiocoap.CONTENT, after.token))
            await marker.response
            peer.close()
        finally:
            await ctx.shutdown()


async def test_ours_deregisters_on_the_same_token() -> None:
    async with our_server() as ours:
        peer = await Peer.connect(ours.port)
        peer.send(msg(aiocoap.CSM))
        conn = await next_connection(ours)
        task = asyncio.create_task(
            conn.observe(CoapRequest("GET", "/o", ("x=1",)), lambda r: None, DEADLINE)
        )
        registration = await peer.recv_non_signalling()
        peer.send(msg(aiocoap.CONTENT, registration.token, observe=0))
        observation = await task
        cancel = asyncio.create_task(observation.cancel())
        deregistration = await peer.recv_non_signalling()
        assert deregistration.code == aiocoap.GET
        assert deregistration.token == registration.token
        assert deregistration.opt.observe == 1
        assert deregistration.opt.uri_path == ("o",)
        assert deregistration.opt.uri_query == ("x=1",)
        peer.send(msg(aiocoap.CONTENT, registration.token))
        async with asyncio.timeout(DEADLINE):
            await cancel
        assert observation.end_reason == "cancelled"
        peer.close()


# --------------------------------------------------------------------------- W5 peer certificate


async def test_aiocoap_offers_no_claims_for_a_tls_client_certificate(tls: Tls) -> None:
    resource = _Echo()
    async with raw_aiocoap_server(tls=tls.server, resource=resource) as (_, port):
        peer = await Peer.connect(port, tls.client)
        peer.send(msg(aiocoap.CSM), msg(aiocoap.GET, b"\x01", uri_path=("echo",)))
        assert (await peer.recv_non_signalling()).code == aiocoap.CONTENT
        (remote,) = resource.remotes
        assert tuple(remote.authenticated_claims) == ()
        assert not hasattr(remote, "peer_certificate")
        # ... the certificate is there, but only on the private transport
        der = remote._transport.get_extra_info("ssl_object").getpeercert(binary_form=True)
        assert x509.load_der_x509_certificate(der).subject.rfc4514_string() == f"CN={tls.device_cn}"
        peer.close()


async def test_ours_exposes_the_peer_certificate(tls: Tls) -> None:
    async with our_server(tcp_bind=None, tls_bind=("127.0.0.1", 0), ssl_context=tls.server) as ours:
        peer = await Peer.connect(ours.port, tls.client)
        peer.send(msg(aiocoap.CSM))
        conn = await next_connection(ours)
        cert = conn.peer_certificate()
        assert cert is not None
        assert cert.subject.rfc4514_string() == f"CN={tls.device_cn}"
        peer.close()


# --------------------------------------------------------------------------- W6 closed connection


async def _aiocoap_request_to_a_closed_connection() -> BaseException | str:
    resource = _Echo()
    async with raw_aiocoap_server(resource=resource) as (ctx, port):
        peer = await Peer.connect(port)
        peer.send(msg(aiocoap.CSM), msg(aiocoap.GET, b"\x01", uri_path=("echo",)))
        await peer.recv_non_signalling()
        (remote,) = resource.remotes
        lost = asyncio.Event()
        connection_lost = remote.connection_lost

        def spy(exc: Exception | None) -> None:
            connection_lost(exc)
            lost.set()

        remote.connection_lost = spy
        peer.close()
        async with asyncio.timeout(DEADLINE):
            await lost.wait()  # aiocoap has seen the connection go
        request = msg(aiocoap.GET, uri_path=("x",))
        request.remote = remote
        try:
            async with asyncio.timeout(ABSENCE):
                await ctx.request(request, handle_blockwise=False).response
        except TimeoutError:
            return "hangs"
        except Exception as exc:
            return exc
        return "answered"


async def test_aiocoap_request_to_a_closed_connection_waits_forever() -> None:
    assert await _aiocoap_request_to_a_closed_connection() == "hangs"


def test_aiocoap_request_to_a_closed_connection_under_uvloop_raises_runtime_error() -> None:
    outcome: list[BaseException | str] = []
    run_in_thread(lambda: outcome.append(uvloop.run(_aiocoap_request_to_a_closed_connection())))
    assert isinstance(outcome[0], RuntimeError)  # not an aiocoap error


async def test_ours_fails_requests_to_a_closed_connection_at_once() -> None:
    async with our_server() as ours:
        peer = await Peer.connect(ours.port)
        peer.send(msg(aiocoap.CSM))
        conn = await next_connection(ours)
        peer.close()
        async with asyncio.timeout(DEADLINE):
            await conn.wait_closed()
            with pytest.raises(ConnectionClosed):
                await conn.request(CoapRequest("GET", "/x"), timeout=3600)


# --------------------------------------------------------------------------- W7 back-pressure


async def test_aiocoap_keeps_writing_to_a_peer_that_does_not_read() -> None:
    big = b"x" * 65536
    answered = asyncio.Event()
    buffered: list[int] = []

    class Big(_Echo):
        async def render_get(self, request: Any) -> Any:
            buffered.append(request.remote._transport.get_write_buffer_size())
            if len(buffered) == REQUESTS:
                answered.set()
            return Message(code=aiocoap.CONTENT, payload=big)

    async with raw_aiocoap_server(resource=Big()) as (_, port):
        peer = await Peer.connect(port)
        csm = msg(aiocoap.CSM)  # large messages and BERT: aiocoap sends 64 KiB unsplit
        csm.opt.add_option(UintOption(2, 1 << 20))
        csm.opt.add_option(UintOption(4, 0))
        peer.send(csm, *(msg(aiocoap.GET, b"%d" % i, uri_path=("echo",)) for i in range(REQUESTS)))
        async with asyncio.timeout(DEADLINE):
            await answered.wait()
        # nothing read: kernel buffers fill, then aiocoap's user-space buffer grows unbounded
        assert max(buffered) > 2 * 1024 * 1024
        assert TcpConnection.pause_writing.__code__.co_code == (lambda self: None).__code__.co_code
        peer.close()


async def test_ours_aborts_a_peer_that_does_not_read() -> None:
    big = b"x" * 65536
    closed: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def on_request(conn: Connection, req: CoapRequest) -> CoapResponse:
        return CoapResponse("2.05", big)

    config = CoapServerConfig(tcp_bind=("127.0.0.1", 0), max_write_buffer=512 * 1024)
    async with CoapServer(
        config, on_request=on_request, on_close=lambda c, r: closed.set_result(r)
    ) as server:
        assert server.tcp_address is not None
        peer = await Peer.connect(server.tcp_address[1])
        peer.send(msg(aiocoap.CSM), *(msg(aiocoap.GET, b"%d" % i) for i in range(REQUESTS)))
        async with asyncio.timeout(DEADLINE):
            reason = await closed
        assert reason == "peer does not read (write buffer limit exceeded)"
        peer.close()


# --------------------------------------------------------------------------- W8 timeouts, keepalive


async def test_aiocoap_neither_times_out_a_silent_connection_nor_pings() -> None:
    async with raw_aiocoap_server() as (_, port):
        silent = await Peer.connect(port)
        assert (await silent.recv()).code == aiocoap.CSM
        idle = await Peer.connect(port)
        idle.send(msg(aiocoap.CSM))
        assert (await idle.recv()).code == aiocoap.CSM
        # no Abort or close of the silent one, no Ping to the idle one
        assert await asyncio.gather(silent.nothing_for(ABSENCE), idle.nothing_for(ABSENCE)) == [
            True,
            True,
        ]
        silent.close()
        idle.close()


async def test_ours_times_out_a_silent_connection_and_pings_an_idle_one() -> None:
    async with our_server(opening_timeout=0.2, keepalive_interval=0.1, keepalive_timeout=5) as ours:
        silent = await Peer.connect(ours.port)
        assert (await silent.recv()).code == aiocoap.CSM
        abort = await silent.recv()
        assert abort.code == aiocoap.ABORT
        assert abort.payload.startswith(b"opening timeout")
        idle = await Peer.connect(ours.port)
        idle.send(msg(aiocoap.CSM))
        assert (await idle.recv()).code == aiocoap.CSM
        assert (await idle.recv()).code == aiocoap.PING
        silent.close()
        idle.close()


# --------------------------------------------------------------------------- W9 Pong


def test_aiocoap_message_with_a_token_argument_is_deprecated() -> None:
    with pytest.warns(DeprecationWarning, match="with a token"):
        Message(code=aiocoap.PONG, token=b"\x01")


async def test_aiocoap_pong_to_a_ping_with_token_fails_when_warnings_are_errors() -> None:
    async with raw_aiocoap_server() as (_, port):
        peer = await Peer.connect(port)
        with warnings.catch_warnings():
            warnings.simplefilter("error", DeprecationWarning)
            peer.send(msg(aiocoap.CSM), msg(aiocoap.PING, b"\x07"))
            assert (await peer.recv()).code == aiocoap.CSM
            # the Pong is never sent: building it raises, and asyncio drops the connection
            assert await peer.recv() is None


async def test_ours_answers_a_ping_with_token() -> None:
    async with our_server() as ours:
        peer = await Peer.connect(ours.port)
        with warnings.catch_warnings():
            warnings.simplefilter("error", DeprecationWarning)
            peer.send(msg(aiocoap.PING, b"\x07"))
            assert (await peer.recv()).code == aiocoap.CSM
            pong = await peer.recv()
            assert (pong.code, pong.token) == (aiocoap.PONG, b"\x07")
        peer.close()


# --------------------------------------------------------------------------- W10 ALPN


async def test_aiocoap_tls_server_negotiates_no_alpn(tls: Tls) -> None:
    async with raw_aiocoap_server(tls=tls.server) as (_, port):
        peer = await Peer.connect(port, tls.client)  # offers "coap"
        assert peer.writer.get_extra_info("ssl_object").selected_alpn_protocol() is None
        peer.close()


async def test_ours_negotiates_alpn_coap(tls: Tls) -> None:
    async with our_server(tcp_bind=None, tls_bind=("127.0.0.1", 0), ssl_context=tls.server) as ours:
        peer = await Peer.connect(ours.port, tls.client)
        assert peer.writer.get_extra_info("ssl_object").selected_alpn_protocol() == "coap"
        peer.close()


# --------------------------------------------------------------------------- W11 shutdown


async def test_aiocoap_shutdown_sends_release_and_leaves_the_connection_open() -> None:
    site = aiocoap.resource.Site()
    ctx = await aiocoap.Context.create_server_context(
        site, bind=("127.0.0.1", free_port_pair()), transports=["tcpserver"]
    )
    port = int(ctx.request_interfaces[0].token_interface.server.sockets[0].getsockname()[1])
    peer = await Peer.connect(port)
    peer.send(msg(aiocoap.CSM))
    assert (await peer.recv()).code == aiocoap.CSM
    connections = set(ctx.request_interfaces[0].token_interface._pool)
    assert connections  # the server's CSM came: it set the connection up
    await ctx.shutdown()
    assert (await peer.recv()).code == aiocoap.RELEASE
    assert await peer.nothing_for(ABSENCE)  # not closed
    peer.close()
    for connection in connections:
        connection._transport.abort()


async def test_ours_aborts_and_closes_on_exit() -> None:
    async with our_server() as ours:
        peer = await Peer.connect(ours.port)
        peer.send(msg(aiocoap.CSM))
        await next_connection(ours)
    assert (await peer.recv()).code == aiocoap.CSM
    abort = await peer.recv()
    assert (abort.code, abort.payload) == (aiocoap.ABORT, b"server shutting down")
    assert await peer.recv() is None
    peer.close()


# --------------------------------------------------------------------------- OCF options, codecs


def test_aiocoap_knows_nothing_of_the_ocf_version_options() -> None:
    assert OptionNumber(2053).format is OpaqueOption
    assert OptionNumber(2049).format is OpaqueOption
    message = Message(code=aiocoap.POST, content_format=10000, payload=b"\xa0")
    assert message.opt.get_option(2053) == ()
    assert message.opt.get_option(2049) == ()


def _wire_round_trip(request: CoapRequest) -> tuple[Any, CoapRequest]:
    message = wire.EncodedRequest(request).take()
    decoded = _decode_message(_serialize(message))
    return decoded, wire.request_value(decoded)


def test_ours_puts_the_ocf_versions_on_cbor_requests_and_no_accept() -> None:
    decoded, value = _wire_round_trip(
        CoapRequest("POST", "/light", payload=b"\xa0", content_format=10000)
    )
    assert [o.value for o in decoded.opt.get_option(2053)] == [b"\x08\x00"]
    assert [o.value for o in decoded.opt.get_option(2049)] == [b"\x08\x00"]
    assert decoded.opt.accept is None
    assert (value.ocf_version, value.ocf_accept_version, value.accept) == (0x0800, 0x0800, None)
    _, value = _wire_round_trip(CoapRequest("GET", "/light"))
    assert (value.ocf_version, value.ocf_accept_version, value.accept) == (None, None, None)


paths = st.lists(
    st.text(st.characters(codec="utf-8", exclude_characters="/"), min_size=1, max_size=8),
    max_size=4,
).map(lambda segments: "/" + "/".join(segments))


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
    message = wire.response_message(response)
    message.token = b"\x01"
    value = wire.response_value(_decode_message(_serialize(message)))
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
        wire.EncodedRequest(bad)


def test_request_codes_are_not_responses() -> None:
    with pytest.raises(ValueError, match="response code"):
        CoapResponse("0.01")


# --------------------------------------------------------------------------- references


async def test_aiocoap_forgets_an_observation_nobody_references() -> None:
    got: list[bytes] = []
    async with device_server() as (port, peers):
        ctx = await aiocoap.Context.create_client_context(transports=["tcpclient"])
        try:
            uri = f"coap+tcp://127.0.0.1:{port}"
            req = ctx.request(msg(aiocoap.GET, uri=uri + "/o", observe=0))
            async with asyncio.timeout(DEADLINE):
                peer = await peers.get()
            registration = await peer.recv_non_signalling()
            peer.send(msg(aiocoap.CONTENT, registration.token, observe=0, payload=b"first"))
            await req.response
            req.observation.register_callback(
                lambda m: got.append(m.payload), _suppress_deprecation=True
            )
            del req
            gc.collect()
            peer.send(msg(aiocoap.CONTENT, registration.token, observe=1, payload=b"lost"))
            # a later exchange on the same connection shows the notification was processed
            marker = ctx.request(msg(aiocoap.GET, uri=uri + "/marker"), handle_blockwise=False)
            answer = await peer.recv_non_signalling()
            peer.send(msg(aiocoap.CONTENT, answer.token))
            await marker.response
            assert got == []
            peer.close()
        finally:
            await ctx.shutdown()


async def test_ours_keeps_an_observation_nobody_references() -> None:
    got: list[bytes] = []
    async with our_server() as ours:
        peer = await Peer.connect(ours.port)
        peer.send(msg(aiocoap.CSM))
        conn = await next_connection(ours)
        task = asyncio.create_task(
            conn.observe(CoapRequest("GET", "/o"), lambda r: got.append(r.payload), DEADLINE)
        )
        registration = await peer.recv_non_signalling()
        peer.send(msg(aiocoap.CONTENT, registration.token, observe=0))
        await task
        del task
        gc.collect()
        peer.send(msg(aiocoap.CONTENT, registration.token, observe=1, payload=b"kept"))
        marker = asyncio.create_task(conn.request(CoapRequest("GET", "/marker"), DEADLINE))
        answer = await peer.recv_non_signalling()
        peer.send(msg(aiocoap.CONTENT, answer.token))
        await marker
        assert got == [b"kept"]
        peer.close()


# --------------------------------------------------------------------------- W13-W18 hostile input


def test_aiocoap_framing_is_lenient_and_leaks_unicode_errors() -> None:
    """W13: aiocoap's framing functions, as its ``data_received`` uses them."""
    assert _extract_message_size(bytes([0x09])) == (2, 9, 0)  # a token of 9: no complaint yet
    assert _decode_message(bytes([0x10, 0x01, 0xFF])).payload == b""  # marker, no payload
    with pytest.raises(UnicodeDecodeError):  # not UnparsableMessage: escapes data_received
        _decode_message(bytes([0x30, 0x02, 0xB2, 0xFF, 0xFE]))  # Uri-Path b"\xff\xfe"


async def test_ours_aborts_on_format_errors_and_answers_bad_values_with_4_02() -> None:
    async with our_server() as ours:
        peer = await Peer.connect(ours.port)
        peer.writer.write(bytes([0x30, 0x02, 0xB2, 0xFF, 0xFE]))
        answer = await peer.recv_non_signalling()
        assert answer.code == aiocoap.BAD_OPTION
        peer.writer.write(bytes([0x09]))
        abort = await peer.recv()
        while abort is not None and abort.code != aiocoap.ABORT:
            abort = await peer.recv()
        assert abort is not None
        assert abort.payload == b"message format error: token length 9 (at most 8)"
        peer.close()


def _unknown_critical(request: Any) -> Any:
    request.opt.add_option(OpaqueOption(2051, b"x"))
    return request


async def test_aiocoap_serves_requests_with_unknown_critical_options() -> None:
    """W14."""
    async with raw_aiocoap_server() as (_, port):
        peer = await Peer.connect(port)
        request = _unknown_critical(msg(aiocoap.GET, b"\x01", uri_path=("echo",)))
        peer.send(msg(aiocoap.CSM), request)
        assert (await peer.recv_non_signalling()).code == aiocoap.CONTENT
        peer.close()


async def test_ours_answers_unknown_critical_options_with_4_02() -> None:
    async with our_server() as ours:
        peer = await Peer.connect(ours.port)
        peer.send(_unknown_critical(msg(aiocoap.GET, b"\x01", uri_path=("echo",))))
        answer = await peer.recv_non_signalling()
        assert answer.code == aiocoap.BAD_OPTION
        assert answer.payload == b"unrecognised critical option 2051"
        peer.close()


@pytest.mark.parametrize("code", [0, 0x21, 0xC1])
def test_aiocoap_dispatches_empty_and_reserved_codes_as_requests(code: int) -> None:
    """W15."""
    seen: list[Any] = []

    class Manager:
        def process_request(self, message: Any) -> None:
            seen.append(message)

    server = TCPServer()
    server._tokenmanager = Manager()
    server._dispatch_incoming(None, Message(code=code))
    assert [int(m.code) for m in seen] == [code]


def test_aiocoap_abort_closes_with_unread_input() -> None:
    """W16: ``transport.close()`` right after the Abort, no half-close."""
    calls: list[str] = []

    class Transport:
        def write(self, data: bytes) -> None:
            calls.append("write")

        def close(self) -> None:
            calls.append("close")

        def write_eof(self) -> None:
            calls.append("write_eof")

    connection = TcpConnection.__new__(TcpConnection)
    connection.log = logging.getLogger("test")
    connection._transport = Transport()
    connection.abort("bad")
    assert calls == ["write", "close"]


async def test_aiocoap_render_to_pipe_leaves_a_coroutine_never_awaited() -> None:
    """W18: a request that loses interest at once (here: nobody listens to its pipe)."""
    from aiocoap.pipe import Pipe
    from aiocoap.protocol import Context

    for context, leaves_one in ((Context, True), (wire._Context, False)):
        created: list[Any] = []

        class Spy(context):  # type: ignore[misc, valid-type]
            def _render_to_pipe(self, pipe: Any, created: list[Any] = created) -> Any:
                coroutine = super()._render_to_pipe(pipe)
                created.append(coroutine)
                return coroutine

        ctx = Spy(loop=asyncio.get_running_loop(), serversite=None, loggername="test")
        ctx.render_to_pipe(Pipe(Message(code=aiocoap.GET), logging.getLogger("test")))
        for _ in range(3):
            await asyncio.sleep(0)
        unstarted = [c for c in created if inspect.getcoroutinestate(c) == inspect.CORO_CREATED]
        for coroutine in unstarted:
            coroutine.close()  # what the RuntimeWarning is about
        assert bool(unstarted) is leaves_one, context


# --------------------------------------------------------------------------- W19 block-wise


async def test_aiocoap_advertises_block_wise_transfer_in_its_csm() -> None:
    async with raw_aiocoap_server() as (_, port):
        peer = await Peer.connect(port)
        csm = await peer.recv()
        assert csm.code == aiocoap.CSM
        assert [int(o.number) for o in csm.opt.option_list()] == [2, 4]
        peer.close()


async def test_ours_advertises_max_message_size_only() -> None:
    async with our_server(max_message_size=4096) as ours:
        peer = await Peer.connect(ours.port)
        csm = await peer.recv()
        assert csm.code == aiocoap.CSM
        assert [(int(o.number), o.value) for o in csm.opt.option_list()] == [(2, b"\x10\x00")]
        peer.close()

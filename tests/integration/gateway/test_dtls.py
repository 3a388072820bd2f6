"""The DTLS terminator over real UDP on loopback, with libcoap's coap-client as the device.

Behind the terminator runs a plain aiocoap UDP server of the test's own (ThingsBoard's URL
shape), so what is proven is the relay: DTLS 1.2 with the server's ECDSA certificate from
``twinhub_cli.pki`` in front, plain CoAP behind, one relay address per session.
``coap-client-openssl`` exits 0 even when the handshake fails, so outcomes are read from its
output and from what the plain server saw.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiocoap
import aiocoap.resource
import pytest
from OpenSSL import SSL

from gateway.adapters.dtls import DtlsConfig, DtlsTerminator
from gateway.dtls_sessions import Address, split_records
from twinhub_cli import pki

pytestmark = pytest.mark.servers

COAP_CLIENT = "coap-client-openssl"
TOKEN = "A1_TEST_TOKEN"
DEADLINE = 60.0
BIG = b"".join(b"%04d," % i for i in range(700))  # 3500 bytes: four blocks of 1024
CONTENT_ALERT = 21
HANDSHAKE_HELLO_VERIFY_REQUEST = 3


@dataclass(frozen=True)
class Pki:
    ca: Path
    other_ca: Path
    cert: Path
    key: Path


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("dtls-pki")
    ca = pki.create_ca(d / "ca")
    server = pki.issue_server(ca, d / "server", ["127.0.0.1", "localhost"])
    other = pki.create_ca(d / "other", common_name="not our CA")
    return Pki(ca.cert_path, other.cert_path, server.cert_path, server.key_path)


def remote_address(request: Any) -> Address:
    host, port = str(request.remote.hostinfo).rsplit(":", 1)
    return (host.strip("[]"), int(port))


@dataclass
class Seen:
    payload: bytes
    relay: Address
    device: Address | None


@dataclass
class Backend:
    """What the plain server received, and the device each request came from (``peer_of``)."""

    seen: list[Seen] = field(default_factory=list)
    peer_of: Callable[[Address], Address | None] = lambda _relay: None


class Telemetry(aiocoap.resource.Resource):  # type: ignore[misc]
    def __init__(self, backend: Backend) -> None:
        super().__init__()
        self.backend = backend

    async def render_post(self, request: Any) -> Any:
        relay = remote_address(request)
        self.backend.seen.append(Seen(request.payload, relay, self.backend.peer_of(relay)))
        return aiocoap.Message(code=aiocoap.CHANGED, payload=request.payload)


class Big(aiocoap.resource.Resource):  # type: ignore[misc]
    async def render_get(self, request: Any) -> Any:
        return aiocoap.Message(code=aiocoap.CONTENT, payload=BIG)


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def running(
    certs: Pki, bind: str = "127.0.0.1", **config: Any
) -> AsyncIterator[tuple[DtlsTerminator, Backend]]:
    backend = Backend()
    site = aiocoap.resource.Site()
    site.add_resource(["api", "v1", TOKEN, "telemetry"], Telemetry(backend))
    site.add_resource(["api", "v1", TOKEN, "big"], Big())
    port = free_udp_port()
    ctx = await aiocoap.Context.create_server_context(
        site, bind=("127.0.0.1", port), transports=["udp6"]
    )
    try:
        terminator = DtlsTerminator(
            DtlsConfig(certs.cert, certs.key, **config),
            bind=(bind, 0),
            backend=("127.0.0.1", port),
        )
        backend.peer_of = terminator.peer_of
        async with terminator:
            yield terminator, backend
    finally:
        await ctx.shutdown()


async def coap_client(*args: str) -> str:
    """Run coap-client-openssl to completion; its output (stdout and stderr)."""
    exe = shutil.which(COAP_CLIENT)
    assert exe, f"{COAP_CLIENT} missing: apt-get install libcoap3-bin"
    proc = await asyncio.create_subprocess_exec(
        exe,
        "-B",
        "30",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), DEADLINE)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return out.decode(errors="replace")


def url(terminator: DtlsTerminator, resource: str) -> str:
    return f"coaps://127.0.0.1:{terminator.address[1]}/api/v1/{TOKEN}/{resource}"


async def until(condition: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)
    assert condition(), what


async def test_post_telemetry_checking_the_server_against_the_ca(certs: Pki) -> None:
    async with running(certs) as (terminator, backend):
        out = await coap_client(
            "-m", "post", "-R", str(certs.ca), "-t", "json", "-e", '{"temperature":42}',
            url(terminator, "telemetry"),
        )  # fmt: skip
        assert [s.payload for s in backend.seen] == [b'{"temperature":42}'], out
        assert '{"temperature":42}' in out  # the echo came back through the terminator
        (seen,) = backend.seen
        assert seen.device is not None
        assert seen.device[0] == "127.0.0.1"
        assert seen.device != seen.relay
        await until(lambda: terminator.sessions == [], "the client's close_notify ended it")


async def test_ipv4_devices_on_a_dual_stack_socket(certs: Pki) -> None:
    # an IPv6 socket bound to the IPv4-mapped loopback sees devices as ::ffff:127.0.0.1; the
    # answers must go back to that form of the address
    async with running(certs, bind="::ffff:127.0.0.1") as (terminator, backend):
        out = await coap_client(
            "-m", "post", "-R", str(certs.ca), "-e", "dual", url(terminator, "telemetry")
        )
        assert [s.payload for s in backend.seen] == [b"dual"], out
        assert "dual" in out
        (seen,) = backend.seen
        assert seen.device is not None
        assert seen.device[0] == "127.0.0.1"


async def test_without_a_ca_the_client_still_connects(certs: Pki) -> None:
    async with running(certs) as (terminator, backend):
        out = await coap_client(
            "-v", "6", "-m", "post", "-t", "json", "-e", '{"temperature":43}',
            url(terminator, "telemetry"),
        )  # fmt: skip
        assert [s.payload for s in backend.seen] == [b'{"temperature":43}'], out
        assert "unable to get local issuer certificate: overridden" in out  # the seed's warning


async def test_a_wrong_ca_fails_the_handshake(certs: Pki) -> None:
    async with running(certs) as (terminator, backend):
        out = await coap_client(
            "-v", "6", "-m", "post", "-R", str(certs.other_ca), "-e", '{"temperature":44}',
            url(terminator, "telemetry"),
        )  # fmt: skip
        assert "certificate verify failed" in out
        assert backend.seen == []
        await until(lambda: terminator.sessions == [], "the failed handshake left no session")


async def test_a_get_larger_than_a_datagram_comes_block_wise(certs: Pki) -> None:
    async with running(certs) as (terminator, _):
        out = await coap_client("-m", "get", "-R", str(certs.ca), url(terminator, "big"))
        assert BIG.decode() in out


class _Queue(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.queue.put_nowait(data)


@contextlib.asynccontextmanager
async def udp(server: Address) -> AsyncIterator[tuple[asyncio.DatagramTransport, _Queue]]:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(_Queue, remote_addr=server)
    try:
        yield transport, protocol
    finally:
        transport.close()


class DtlsDevice:
    """A DTLS 1.2 device on a real UDP socket (pyOpenSSL on memory BIOs), for what coap-client
    cannot do from a test: stay connected and silent, or send a raw ClientHello."""

    def __init__(self, ca: Path, transport: asyncio.DatagramTransport, inbox: _Queue) -> None:
        ctx = SSL.Context(SSL.DTLS_CLIENT_METHOD)
        ctx.load_verify_locations(str(ca))
        ctx.set_verify(SSL.VERIFY_PEER, lambda _c, _x, _e, _d, ok: bool(ok))
        self.conn = SSL.Connection(ctx, None)
        self.conn.set_connect_state()
        self.transport = transport
        self.inbox = inbox.queue

    @property
    def address(self) -> Address:
        host, port = self.transport.get_extra_info("sockname")[:2]
        return (str(host), int(port))

    def flush(self) -> None:
        while True:
            try:
                self.transport.sendto(self.conn.bio_read(65535))
            except SSL.WantReadError:
                return

    async def handshake(self) -> None:
        async with asyncio.timeout(DEADLINE):
            while True:
                try:
                    self.conn.do_handshake()
                    self.flush()
                    return
                except SSL.WantReadError:
                    self.flush()
                try:
                    data = await asyncio.wait_for(
                        self.inbox.get(), self.conn.DTLSv1_get_timeout() or 1.0
                    )
                except TimeoutError:
                    self.conn.DTLSv1_handle_timeout()
                    continue
                self.conn.bio_write(data)

    async def receive(self) -> bytes:
        """The next plaintext; SSL.ZeroReturnError on close_notify."""
        async with asyncio.timeout(DEADLINE):
            while True:
                self.conn.bio_write(await self.inbox.get())
                with contextlib.suppress(SSL.WantReadError):
                    return self.conn.recv(65535)


def _option(delta: int, value: bytes) -> bytes:
    def nibble(n: int) -> tuple[int, bytes]:
        if n < 13:
            return n, b""
        if n < 269:
            return 13, bytes([n - 13])
        return 14, (n - 269).to_bytes(2, "big")

    d, dx = nibble(delta)
    n, nx = nibble(len(value))
    return bytes([d << 4 | n]) + dx + nx + value


def telemetry_request(mid: int, payload: bytes) -> bytes:
    """A confirmable POST to .../telemetry, encoded by hand (RFC 7252 section 3)."""
    token = mid.to_bytes(2, "big")
    head = bytes([0x40 | len(token), 0x02]) + mid.to_bytes(2, "big") + token
    path = [b"api", b"v1", TOKEN.encode(), b"telemetry"]
    options = _option(11, path[0]) + b"".join(_option(0, p) for p in path[1:])
    return head + options + b"\xff" + payload


async def test_a_client_hello_without_cookie_gets_only_a_small_hello_verify_request(
    certs: Pki,
) -> None:
    async with running(certs) as (terminator, _), udp(terminator.address) as (transport, inbox):
        device = DtlsDevice(certs.ca, transport, inbox)
        with contextlib.suppress(SSL.WantReadError):
            device.conn.do_handshake()
        hello = device.conn.bio_read(65535)
        for _ in range(2):
            # sent twice: a certificate flight after the first answer would come before the
            # second answer (loopback keeps order), and is caught below
            transport.sendto(hello)
            answer = await asyncio.wait_for(inbox.queue.get(), DEADLINE)
            (record,) = split_records(answer)
            assert record[0] == 22
            assert record[13] == HANDSHAKE_HELLO_VERIFY_REQUEST
            assert len(answer) <= len(hello)
        assert terminator.sessions == []
        assert inbox.queue.empty()


async def test_idle_sessions_are_dropped_with_close_notify(certs: Pki) -> None:
    async with (
        running(certs, idle_timeout=1.5) as (terminator, backend),
        udp(terminator.address) as (transport, inbox),
    ):
        device = DtlsDevice(certs.ca, transport, inbox)
        await device.handshake()
        device.conn.send(telemetry_request(0x1234, b'{"humidity":5}'))
        device.flush()
        answer = await device.receive()
        assert answer[1] == 0x44  # 2.04 Changed
        assert answer[2:4] == (0x1234).to_bytes(2, "big")
        (seen,) = backend.seen
        assert seen.device == device.address  # peer_of maps the relay back to the device
        assert terminator.sessions == [device.address]
        with pytest.raises(SSL.ZeroReturnError):
            await device.receive()  # the idle timeout's close_notify
        assert terminator.sessions == []
        assert terminator.peer_of(seen.relay) is None


async def test_shutdown_sends_close_notify(certs: Pki) -> None:
    async with running(certs) as (terminator, _), udp(terminator.address) as (transport, inbox):
        device = DtlsDevice(certs.ca, transport, inbox)
        await device.handshake()
        await until(lambda: terminator.sessions == [device.address], "session open")
        await terminator.close()
        with pytest.raises(SSL.ZeroReturnError):
            await device.receive()


async def test_the_server_retransmits_a_lost_flight_on_its_own_timer(certs: Pki) -> None:
    async with running(certs) as (terminator, _), udp(terminator.address) as (transport, inbox):
        device = DtlsDevice(certs.ca, transport, inbox)
        with contextlib.suppress(SSL.WantReadError):
            device.conn.do_handshake()
        device.flush()  # ClientHello
        device.conn.bio_write(await asyncio.wait_for(inbox.queue.get(), DEADLINE))  # HVR
        with contextlib.suppress(SSL.WantReadError):
            device.conn.do_handshake()
        device.flush()  # ClientHello with the cookie
        lost = await asyncio.wait_for(inbox.queue.get(), DEADLINE)  # the server's flight: dropped
        # the device stays silent (no retransmission of its own): only the server's timer can
        # bring the flight again; retransmitted records carry new record sequence numbers
        again = await asyncio.wait_for(inbox.queue.get(), DEADLINE)
        assert [r[13:] for r in split_records(again)] == [r[13:] for r in split_records(lost)]
        device.conn.bio_write(again)
        await device.handshake()
        await until(lambda: terminator.engine.established(device.address), "established")

"""Abuse limits of the full gateway over real loopback sockets (real TLS where it matters):
connections per remote address, the slow-message deadline, what our CSM advertises, the
device's own Max-Message-Size, and concurrent sign-ups of one device by two owners.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
import uuid

import cbor2
import pytest

from devicesim.device import DeviceState
from eventstore.memory import InMemoryEventStore
from gateway.adapters.coap import (
    CoapRequest,
    CoapResponse,
    CoapServer,
    CoapServerConfig,
    Connection,
    RequestTooLarge,
    UnsupportedResponse,
)
from gateway.session import registration_scope
from proto import binding
from proto import events as ev
from proto.message import StoredMessage

from .coap_peers import (
    ABORT,
    CHANGED,
    CONTENT_FORMAT,
    CSM,
    GET,
    PING,
    PONG,
    POST,
    Frame,
    Pki,
    RawPeer,
    make_pki,
    request,
    uint,
)
from .gateway_stack import DEADLINE, Stack, running_gateway, sign_in, wait_for


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def tls_config(pki: Pki, **config: object) -> dict[str, object]:
    return {
        "tcp_bind": None,
        "tls_bind": ("127.0.0.1", 0),
        "ssl_context": pki.server_context(client_cert=False),
        **config,
    }


async def alive(peer: RawPeer) -> None:
    """A Ping is answered."""
    peer.send(Frame(PING, b"\x01"))
    assert (await peer.recv_until(PONG)).token == b"\x01"


# --------------------------------------------------------------------------- connections per IP


async def test_connections_beyond_the_per_ip_limit_are_refused_before_the_tls_handshake(
    pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    client = pki.client_context(client_cert=False)
    async with running_gateway(**tls_config(pki, max_connections_per_ip=2)) as stack:
        signed = await RawPeer.connect(stack.tls, client)
        await sign_in(stack, signed)  # a signed-in connection still counts
        silent = await RawPeer.connect(stack.tls)  # plain TCP: its handshake never starts
        await wait_for(lambda: stack.server.connections_from("127.0.0.1") == 2)
        with caplog.at_level(logging.WARNING, "gateway.adapters.coap"):
            async with asyncio.timeout(5):  # far less than the handshake timeout
                with pytest.raises((ConnectionError, ssl.SSLError, OSError)):
                    await RawPeer.connect(stack.tls, client)
        assert stack.server.refused_per_ip == 1
        assert stack.server.handshakes == 1  # the silent one's: the refused one never started
        assert "refused a connection from 127.0.0.1:" in caplog.text
        assert "2 connections from 127.0.0.1 (limit 2 per address)" in caplog.text
        # another address is not affected
        other = await RawPeer.connect(stack.tls, client, local_host="127.0.0.2")
        await sign_in(stack, other)
        # a connection that goes makes room
        silent.writer.transport.abort()
        await wait_for(lambda: stack.server.connections_from("127.0.0.1") == 1)
        again = await RawPeer.connect(stack.tls, client)
        await sign_in(stack, again)
        await alive(signed)
        for peer in (signed, other, again):
            await peer.close()
        await wait_for(lambda: not stack.server.connections, DEADLINE)
        assert stack.server.connections_from("127.0.0.1") == 0
        assert stack.server.unauthenticated == 0


async def test_connections_beyond_the_total_limit_are_refused_from_any_address(
    pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    client = pki.client_context(client_cert=False)
    async with running_gateway(**tls_config(pki, max_connections=2)) as stack:
        signed = await RawPeer.connect(stack.tls, client)
        await sign_in(stack, signed)
        silent = await RawPeer.connect(stack.tls, local_host="127.0.0.2")  # never handshakes
        await wait_for(lambda: stack.server.connections_from("127.0.0.2") == 1)
        with caplog.at_level(logging.WARNING, "gateway.adapters.coap"):
            async with asyncio.timeout(5):
                with pytest.raises((ConnectionError, ssl.SSLError, OSError)):
                    await RawPeer.connect(stack.tls, client, local_host="127.0.0.3")
        assert stack.server.refused_total == 1
        assert "2 connections (limit 2)" in caplog.text
        silent.writer.transport.abort()  # a connection that goes makes room
        await wait_for(lambda: stack.server.connections_from("127.0.0.2") == 0)
        again = await RawPeer.connect(stack.tls, client, local_host="127.0.0.3")
        await sign_in(stack, again)
        await alive(signed)
        for peer in (signed, again):
            await peer.close()
        await wait_for(lambda: not stack.server.connections, DEADLINE)


@pytest.mark.parametrize(
    ("host", "key"),
    [
        ("192.0.2.7", "192.0.2.7"),
        ("::ffff:192.0.2.7", "192.0.2.7"),  # an IPv4 peer on a dual-stack socket
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),  # one subscriber's prefix
        ("2001:db8:1:2:bbbb::9", "2001:db8:1:2::/64"),
        ("fe80::1%eth0", "fe80::/64"),
    ],
)
def test_connections_are_counted_per_ipv4_address_or_ipv6_64(host: str, key: str) -> None:
    from gateway.adapters.coap_tcp import address_key

    assert address_key(host) == key


# --------------------------------------------------------------------------- slow messages


async def _trickle(peer: RawPeer, data: bytes, interval: float) -> int:
    """Send ``data`` a byte at a time; returns how many bytes went before the server closed."""
    sent = 0
    try:
        for byte in data:
            peer.writer.write(bytes([byte]))
            await peer.writer.drain()
            sent += 1
            await asyncio.sleep(interval)
    except (ConnectionError, ssl.SSLError, OSError):
        pass
    return sent


async def test_a_message_trickled_past_the_deadline_is_aborted_though_bytes_keep_coming(
    pki: Pki,
) -> None:
    config = tls_config(pki, message_timeout=0.5, keepalive_interval=0.2, keepalive_timeout=0.2)
    async with running_gateway(**config) as stack:
        peer = await RawPeer.connect(stack.tls, pki.client_context(client_cert=False))
        await sign_in(stack, peer)
        message = request(POST, "/oic/rd", peer.token(), payload=bytes(200)).encode()
        trickler = asyncio.create_task(_trickle(peer, message, 0.02))  # ~4.5 s in all
        frames = await peer.expect_eof(timeout=3)
        sent = await trickler
        assert frames[-1].code == ABORT
        assert frames[-1].payload == b"message timeout: a message not complete within 0.5s"
        assert sent < len(message)  # it was still sending
        await wait_for(lambda: not stack.server.connections)


async def test_a_slow_header_is_aborted_too() -> None:
    async with running_gateway(message_timeout=0.3) as stack:
        peer = await RawPeer.connect(stack.tcp)
        peer.writer.write(b"\xe4")  # a 2-byte extended length announced, never given
        frames = await peer.expect_eof(timeout=3)
        assert frames[-1].code == ABORT
        assert frames[-1].payload.startswith(b"message timeout")


async def test_complete_messages_far_apart_and_messages_in_pieces_within_the_deadline_pass(
    pki: Pki,
) -> None:
    async with running_gateway(**tls_config(pki, message_timeout=0.4)) as stack:
        peer = await RawPeer.connect(stack.tls, pki.client_context(client_cert=False))
        await sign_in(stack, peer)
        await asyncio.sleep(0.6)  # idle longer than the deadline: no message was begun
        await alive(peer)
        ping = Frame(PING, b"\x02").encode()
        for _ in range(3):  # each message in two pieces, the deadline restarts with each
            peer.writer.write(ping[:1])
            await asyncio.sleep(0.25)
            peer.writer.write(ping[1:])
            assert (await peer.recv_until(PONG)).token == b"\x02"
        await alive(peer)
        await peer.close()


# --------------------------------------------------------------------------- block-wise

BLOCK1, BLOCK2, BAD_OPTION, CONTENT, UNAUTHORIZED = 27, 23, 130, 69, 129
CSM_MAX_MESSAGE_SIZE, CSM_BLOCK_WISE = 2, 4


async def test_our_csm_does_not_advertise_block_wise_which_we_refuse(pki: Pki) -> None:
    async with running_gateway(**tls_config(pki, max_message_size=8192)) as stack:
        peer = await RawPeer.connect(stack.tls, pki.client_context(client_cert=False))
        csm = await peer.recv()
        assert csm.code == CSM
        assert [n for n, _ in csm.options] == [CSM_MAX_MESSAGE_SIZE]  # no Block-wise-Transfer
        assert csm.uint(CSM_MAX_MESSAGE_SIZE) == 8192
        # ... and indeed: a block-wise request is refused (unrecognised critical option)
        token = peer.token()
        peer.send(request(POST, "/oic/sec/account", token, options=[(BLOCK1, b"\x0e")]))
        refused = await peer.recv_until(BAD_OPTION)
        assert (refused.token, refused.payload) == (token, b"unrecognised critical option 27")
        await alive(peer)
        await peer.close()


async def test_a_block_wise_response_of_the_device_fails_the_request_not_truncates_it() -> None:
    async with CoapServer(CoapServerConfig(tcp_bind=("127.0.0.1", 0)), on_request=_echo) as srv:
        assert srv.tcp_address is not None
        peer = await RawPeer.connect(srv.tcp_address)
        peer.send(Frame(CSM))
        await wait_for(lambda: bool(srv.connections))
        (conn,) = srv.connections.values()
        for block2 in (b"\x0e", b"\x16"):  # block 0 of more (szx 6), block 1 of the last
            pending = asyncio.create_task(conn.request(CoapRequest("GET", "/big"), DEADLINE))
            asked = await peer.recv_request()
            peer.send(Frame(CONTENT, asked.token, ((BLOCK2, block2),), bytes(1024)))
            with pytest.raises(UnsupportedResponse, match="answered block-wise"):
                await pending
        pending = asyncio.create_task(conn.request(CoapRequest("GET", "/small"), DEADLINE))
        asked = await peer.recv_request()
        peer.send(Frame(CONTENT, asked.token, ((BLOCK2, b"\x06"),), b"all"))  # the only block
        assert (await pending).payload == b"all"
        await peer.close()


async def _echo(conn: Connection, req: CoapRequest) -> CoapResponse:
    return CoapResponse("2.04", req.payload)


# --------------------------------------------------------------------------- device's max size


async def test_requests_above_the_devices_max_message_size_are_not_sent() -> None:
    async with CoapServer(CoapServerConfig(tcp_bind=("127.0.0.1", 0)), on_request=_echo) as srv:
        assert srv.tcp_address is not None
        peer = await RawPeer.connect(srv.tcp_address)
        peer.send(request(GET, "/hello", peer.token()))  # no CSM (OCF style): 1152 applies
        await wait_for(lambda: bool(srv.connections))
        (conn,) = srv.connections.values()
        assert conn.peer_max_message_size == 1152
        big = CoapRequest("POST", "/oic/d", payload=bytes(1200), content_format=60)
        with pytest.raises(RequestTooLarge, match="above the device's Max-Message-Size of 1152"):
            await conn.request(big, DEADLINE)
        with pytest.raises(RequestTooLarge):
            await conn.observe(CoapRequest("GET", "/" + "p" * 1200), lambda r: None, DEADLINE)
        peer.send(Frame(CSM, options=((CSM_MAX_MESSAGE_SIZE, uint(1400)),)))
        await wait_for(lambda: conn.peer_max_message_size == 1400)
        fits = asyncio.create_task(conn.request(big, DEADLINE))
        asked = await peer.recv_request()  # the first request the peer ever sees
        assert (asked.path, len(asked.payload)) == ("/oic/d", 1200)
        peer.send(Frame(CHANGED, asked.token))
        assert (await fits).code == "2.04"
        with pytest.raises(RequestTooLarge, match="of 1400"):
            await conn.request(CoapRequest("POST", "/oic/d", payload=bytes(1400)), DEADLINE)
        assert not conn.closed
        await peer.close()


async def test_a_command_larger_than_the_device_accepts_fails_with_the_reason() -> None:
    async with running_gateway() as stack:
        device = stack.device(reference_stack=True)  # iotivity-lite style: no CSM, so 1152
        await device.start()
        try:
            await device.wait_until(lambda d: d.state is DeviceState.ONLINE, DEADLINE)
            di = device.config.device_id
            href = device.model.user_hrefs[0]
            for cid, content in (
                ("too-big", {"value": True, "n": "x" * 2000}),
                ("ok", {"value": True}),
            ):
                pending = ev.CommandPending(href=href, op="update", content=content)
                event = ev.Event(stack.owner, di, pending, "/test", correlation_id=cid)
                await stack.store.append([binding.to_nats(event)])
            outcomes: dict[str, ev.AnyEvent] = {}

            async def settled() -> bool:
                async for stored in stack.store.read("twinhub.ev.>"):
                    event = binding.from_stored(stored)
                    if isinstance(event.data, ev.CommandSucceeded | ev.CommandFailed):
                        assert event.correlation_id is not None
                        outcomes[event.correlation_id] = event
                return len(outcomes) == 2

            async with asyncio.timeout(DEADLINE):
                while not await settled():
                    await asyncio.sleep(0.05)
            failed = outcomes["too-big"].data
            assert isinstance(failed, ev.CommandFailed)
            assert failed.attempts == 1  # no retries: it would not fit either
            assert "not sent: the device accepts at most 1152 bytes" in failed.reason
            assert isinstance(outcomes["ok"].data, ev.CommandSucceeded)
        finally:
            await device.stop()


# --------------------------------------------------------------------------- registration race


class RacingStore(InMemoryEventStore):
    """Holds every read of the device's registrations until two readers are in: both sign-ups
    have read "free" before either records anything -- the race, every time."""

    def __init__(self, device_id: str) -> None:
        super().__init__()
        self.scope = registration_scope(device_id)
        self.readers = 0
        self.both_read = asyncio.Event()

    async def last_message(self, scope: str) -> StoredMessage | None:
        if scope == self.scope and not self.both_read.is_set():
            self.readers += 1
            if self.readers == 2:
                self.both_read.set()
            async with asyncio.timeout(DEADLINE):
                await self.both_read.wait()
        return await super().last_message(scope)


async def _sign_up(stack: Stack, peer: RawPeer, di: str, owner: str) -> int:
    token = stack.issuer.issue(owner, now=time.time(), ttl=600)
    body = {"di": di, "accesstoken": token, "authprovider": "twinhub"}
    cbor = [(CONTENT_FORMAT, uint(10000))]
    sent = peer.token()
    peer.send(request(POST, "/oic/sec/account", sent, payload=cbor2.dumps(body), options=cbor))
    while True:
        answer = await peer.recv()
        if answer.token == sent:
            return answer.code


@pytest.mark.parametrize("same_owner", [False, True])
async def test_concurrent_sign_ups_of_one_device_by_two_owners_cannot_both_win(
    pki: Pki, same_owner: bool
) -> None:
    di = str(uuid.uuid4())
    store = RacingStore(di)
    async with running_gateway(store=store, **tls_config(pki)) as stack:
        owners = [stack.owner, stack.owner if same_owner else "mallory"]
        client = pki.client_context(client_cert=False)
        peers = [await RawPeer.connect(stack.tls, client) for _ in owners]
        codes = await asyncio.gather(
            *(_sign_up(stack, peer, di, owner) for peer, owner in zip(peers, owners, strict=True))
        )
        assert store.readers == 2  # both checked the owner before either registration
        registrations = [binding.from_stored(m) async for m in store.read(registration_scope(di))]
        if same_owner:
            assert codes == [CHANGED, CHANGED]  # the loser checked again: its own device
            assert {r.owner for r in registrations} == {stack.owner}
        else:
            assert sorted(codes) == [CHANGED, UNAUTHORIZED]
            winner = owners[codes.index(CHANGED)]
            assert [r.owner for r in registrations] == [winner]
            loser = peers[codes.index(UNAUTHORIZED)]
            frames = await loser.expect_eof()  # 4.01 closes the connection
            assert frames[-1].code == ABORT
        for peer in peers:
            peer.writer.transport.abort()

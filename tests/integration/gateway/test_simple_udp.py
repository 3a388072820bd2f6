"""Simple devices over UDP against a real log (nats-server, authenticated, from the fixtures):
libcoap's coap-client and aiocoap's client as the devices."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiocoap
import pytest
from aiocoap.numbers.codes import Code
from aiocoap.numbers.contentformat import ContentFormat

from eventstore.adapters.jetstream import JetStreamEventStore
from gateway.adapters.coap_udp import SimpleDeviceServer, UdpConfig
from gateway.adapters.devtokens_nats import NatsTokenDirectory
from gateway.devtokens import CachedTokenDirectory, TokenCacheConfig
from gateway.simple import SimpleConfig
from proto import binding, subjects
from proto.devtokens import TokenRecord, encode_record, new_token, token_subject
from proto.events import AnyEvent, DesiredSet, DeviceOffline, DeviceOnline, Event
from proto.message import NatsMessage
from tests.conftest import Bus
from twinhub_cli.devservices import NatsServer
from twinhub_cli.services import TOKEN_LAYOUT

from .simple_peers import coap_client

pytestmark = pytest.mark.servers

DEADLINE = 15.0


@dataclass
class Stack:
    server: SimpleDeviceServer
    admin: JetStreamEventStore  # the event log, admin role (to read back, to write desired state)
    registry: JetStreamEventStore  # the token registry, admin role (to issue and revoke)
    owner: str
    log: JetStreamEventStore  # the event log, gateway role (what the server writes with)
    directory: CachedTokenDirectory  # the token registry, gateway role

    def url(self, token: str, feature: str, query: str = "") -> str:
        host, port = self.server.address
        return f"coap://{host}:{port}/api/v1/{token}/{feature}" + (f"?{query}" if query else "")

    async def issue(
        self, device_id: str | None = None, *, state: str = "active"
    ) -> tuple[str, str]:
        token, device = new_token(), device_id or "d" + uuid.uuid4().hex[:12]
        record = TokenRecord(owner=self.owner, device_id=device, state=state)  # type: ignore[arg-type]
        await self.put_record(token, encode_record(record))
        return token, device

    async def put_record(self, token: str, data: bytes) -> None:
        subject = token_subject(token)
        await self.registry.append(
            [NatsMessage(subject=subject, msg_id=uuid.uuid4().hex, data=data)]
        )

    async def events(self, device: str, kind: str) -> list[AnyEvent]:
        flt = subjects.event_filter(self.owner, device, kind)
        return [binding.from_stored(m) async for m in self.admin.read(flt)]


@contextlib.asynccontextmanager
async def open_stack(bus: Bus, *, max_payload: int = 2048, **udp: Any) -> AsyncIterator[Stack]:
    """A simple-device server on the gateway role and a fresh owner; ``udp``: more
    :class:`UdpConfig` settings."""
    owner = "o" + uuid.uuid4().hex[:10]
    async with (
        JetStreamEventStore.from_url(bus.admin) as admin,
        JetStreamEventStore.from_url(bus.admin, TOKEN_LAYOUT) as registry,
    ):
        await admin.provision()
        await registry.provision()
        async with (
            JetStreamEventStore.from_url(bus.endpoint("gateway")) as log,
            JetStreamEventStore.from_url(bus.endpoint("gateway"), TOKEN_LAYOUT) as tokens,
        ):
            directory = CachedTokenDirectory(NatsTokenDirectory(tokens), TokenCacheConfig(ttl=0.5))
            config = SimpleConfig(
                gateway_id="gw-test", max_payload=max_payload, request_rate=50.0, request_burst=50
            )
            settings = UdpConfig(bind=("127.0.0.1", 0), **udp)
            async with SimpleDeviceServer(log, directory, config, settings) as server:
                yield Stack(server, admin, registry, owner, log, directory)


@pytest.fixture
async def stack(bus: Bus) -> AsyncIterator[Stack]:
    async with open_stack(bus) as s:
        yield s


async def until(check: Callable[[], Any], what: str, deadline: float = DEADLINE) -> Any:
    end = time.monotonic() + deadline
    while True:
        got = await check()
        if got:
            return got
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.fixture
async def client() -> AsyncIterator[aiocoap.Context]:
    ctx = await aiocoap.Context.create_client_context(transports=["udp6"])
    try:
        yield ctx
    finally:
        await ctx.shutdown()


async def request(
    ctx: aiocoap.Context, code: Code, uri: str, payload: bytes = b"", **opts: Any
) -> aiocoap.Message:
    msg = aiocoap.Message(code=code, uri=uri, payload=payload, **opts)
    return await asyncio.wait_for(ctx.request(msg).response, DEADLINE)


# -- coap-client, as seed 004 drives it ---------------------------------------------------------


async def test_seed_004_telemetry_reaches_the_log(stack: Stack) -> None:
    token, device = await stack.issue()
    result = await coap_client(
        "-m", "POST", stack.url(token, "telemetry"), "-t", "json", "-e", "{temperature:25}"
    )
    assert result.code == "2.01", result
    # answered only once the log acknowledged it: the event is there now
    (ev,) = await stack.events(device, "telemetry-reported")
    assert (ev.owner, ev.device_id, ev.source) == (stack.owner, device, "/gateway/gw-test")
    assert ev.data.values == {"temperature": 25}  # type: ignore[union-attr]


async def test_attributes_posted_then_read_back_with_client_keys(stack: Stack) -> None:
    token, _ = await stack.issue()
    posted = await coap_client(
        "-m", "post", stack.url(token, "attributes"), "-t", "json", "-e", '{"fw":"1.0",mode:eco}'
    )
    assert posted.code == "2.01", posted
    got = await coap_client("-m", "get", stack.url(token, "attributes", "clientKeys=fw,nope"))
    assert got.code == "2.05", got
    assert json.loads(got.body) == {"client": {"fw": "1.0"}}


async def test_unknown_and_revoked_tokens_get_401(stack: Stack) -> None:
    result = await coap_client("-m", "post", stack.url(new_token(), "telemetry"), "-e", "{a:1}")
    assert result.code == "4.01", result
    token, device = await stack.issue()
    ok = await coap_client("-m", "post", stack.url(token, "telemetry"), "-e", "{a:1}")
    assert ok.code == "2.01", ok
    await stack.put_record(
        token,
        encode_record(TokenRecord(owner=stack.owner, device_id=device, state="revoked")),
    )

    async def refused() -> bool:
        r = await coap_client("-m", "post", stack.url(token, "telemetry"), "-e", "{a:2}")
        return r.code == "4.01"

    await until(refused, "the revocation to take effect (cache TTL 0.5 s)")
    written = len(await stack.events(device, "telemetry-reported"))
    assert await refused()
    assert len(await stack.events(device, "telemetry-reported")) == written


async def test_malformed_registry_record_is_an_unknown_token(stack: Stack) -> None:
    token = new_token()
    await stack.put_record(token, b'{"owner": 5}')
    result = await coap_client("-m", "post", stack.url(token, "telemetry"), "-e", "{a:1}")
    assert result.code == "4.01", result


# -- aiocoap's client ----------------------------------------------------------------------------


async def test_malformed_json_is_400_with_a_diagnostic(
    stack: Stack, client: aiocoap.Context
) -> None:
    token, device = await stack.issue()
    r = await request(client, aiocoap.POST, stack.url(token, "telemetry"), b"{temperature:")
    assert r.code == aiocoap.BAD_REQUEST
    assert b"malformed JSON" in r.payload
    assert await stack.events(device, "telemetry-reported") == []


async def test_cbor_telemetry_and_shared_attributes_from_desired_state(
    stack: Stack, client: aiocoap.Context
) -> None:
    import cbor2

    token, device = await stack.issue()
    payload = cbor2.dumps([{"ts": 1700000000000, "values": {"t": 1.5}}, {"h": 3}])
    r = await request(
        client,
        aiocoap.POST,
        stack.url(token, "telemetry"),
        payload,
        content_format=ContentFormat.CBOR,
    )
    assert r.code == aiocoap.CREATED
    evs = await stack.events(device, "telemetry-reported")
    assert [(e.data.ts, e.data.values) for e in evs] == [  # type: ignore[union-attr]
        (1700000000000, {"t": 1.5}),
        (None, {"h": 3}),
    ]
    desired = Event(
        owner=stack.owner,
        device_id=device,
        data=DesiredSet(href="/shared/target", content={"c": 21}, version=1),
        source="/test",
    )
    await stack.admin.append([binding.to_nats(desired)])
    r = await request(client, aiocoap.GET, stack.url(token, "attributes", "sharedKeys=target"))
    assert r.code == aiocoap.CONTENT
    assert json.loads(r.payload) == {"shared": {"target": {"c": 21}}}


async def test_oversized_blockwise_upload_is_413_with_size1(
    stack: Stack, client: aiocoap.Context
) -> None:
    token, device = await stack.issue()
    big = json.dumps({"blob": "x" * 3000}).encode()  # > 2048, several 1024-byte blocks
    r = await request(client, aiocoap.POST, stack.url(token, "telemetry"), big)
    assert r.code == aiocoap.REQUEST_ENTITY_TOO_LARGE
    assert r.opt.size1 == 2048
    # a block-wise upload within the limit is assembled and accepted
    fits = json.dumps({"blob": "y" * 1500}).encode()
    r = await request(client, aiocoap.POST, stack.url(token, "telemetry"), fits)
    assert r.code == aiocoap.CREATED
    (ev,) = await stack.events(device, "telemetry-reported")
    assert ev.data.values == {"blob": "y" * 1500}  # type: ignore[union-attr]


async def test_rate_limit_is_429_with_max_age(stack: Stack) -> None:
    """60 requests sent at once (burst 50 at 50/s): however slow the machine answers, the
    bucket cannot refill 10 tokens before they all arrived, so some get 4.29 with Max-Age."""
    token, _ = await stack.issue()
    host, port = stack.server.address
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setblocking(False)
        s.connect((host, port))
        for i in range(60):
            m = aiocoap.Message(code=Code.POST, payload=b"{a:1}")
            m.opt.uri_path = ("api", "v1", token, "telemetry")
            m.mtype, m.mid, m.token = aiocoap.CON, 0x5000 + i, i.to_bytes(2, "big")
            s.send(m.encode())
        answers: dict[bytes, aiocoap.Message] = {}
        async with asyncio.timeout(30):
            while len(answers) < 60:
                answer = aiocoap.Message.decode(await loop.sock_recv(s, 2048))
                answers[answer.token] = answer
    refused = [a for a in answers.values() if a.code == aiocoap.TOO_MANY_REQUESTS]
    assert refused, sorted({str(a.code) for a in answers.values()})
    assert all(a.opt.max_age is not None and a.opt.max_age >= 1 for a in refused)
    assert {a.code for a in answers.values()} <= {aiocoap.CREATED, aiocoap.TOO_MANY_REQUESTS}


async def test_non_confirmable_requests_are_answered(stack: Stack, client: aiocoap.Context) -> None:
    token, device = await stack.issue()
    r = await request(
        client,
        aiocoap.POST,
        stack.url(token, "telemetry"),
        b'{"n":1}',
        transport_tuning=aiocoap.Unreliable,
    )
    assert r.code == aiocoap.CREATED
    assert r.mtype == aiocoap.NON
    assert len(await stack.events(device, "telemetry-reported")) == 1


async def test_errors_before_the_token_carry_no_payload(
    stack: Stack, client: aiocoap.Context
) -> None:
    host, port = stack.server.address
    for code, path, expected in (
        (aiocoap.POST, "/nothing/here", aiocoap.NOT_FOUND),
        (aiocoap.GET, f"/api/v1/{new_token()}/telemetry", aiocoap.METHOD_NOT_ALLOWED),
        (aiocoap.POST, f"/api/v1/{new_token()}/telemetry", aiocoap.UNAUTHORIZED),
    ):
        r = await request(client, code, f"coap://{host}:{port}{path}", b"{not json")
        assert r.code == expected
        assert r.payload == b""


async def test_log_unavailable_is_503_then_back(
    stack: Stack, client: aiocoap.Context, nats_server: NatsServer
) -> None:
    token, device = await stack.issue()
    r = await request(client, aiocoap.POST, stack.url(token, "telemetry"), b"{a:1}")
    assert r.code == aiocoap.CREATED
    await nats_server.stop()
    try:
        r = await request(client, aiocoap.POST, stack.url(token, "telemetry"), b"{a:2}")
        assert r.code == aiocoap.SERVICE_UNAVAILABLE
        assert r.payload == b""
    finally:
        await nats_server.start()

    async def accepted() -> bool:
        r = await request(client, aiocoap.POST, stack.url(token, "telemetry"), b"{a:3}")
        return bool(r.code == aiocoap.CREATED)

    await until(accepted, "the gateway to write again once the log is back", 30.0)
    values = [e.data.values for e in await stack.events(device, "telemetry-reported")]  # type: ignore[union-attr]
    # {"a": 2} may be there too: the client buffered the publish and sent it once reconnected,
    # after the device was told 5.03 (at least once: a device retrying writes it twice)
    assert values[0] == {"a": 1}
    assert values[-1] == {"a": 3}


async def test_a_device_is_online_from_its_first_request_until_it_falls_silent(
    stack: Stack,
) -> None:
    config = SimpleConfig(gateway_id="gw-presence")
    udp = UdpConfig(bind=("127.0.0.1", 0), inactivity_timeout=1.0, tick_interval=0.1)
    async with SimpleDeviceServer(stack.log, stack.directory, config, udp) as server:
        token, device = await stack.issue()
        host, port = server.address
        url = f"coap://{host}:{port}/api/v1/{token}/telemetry"
        for i in range(2):
            result = await coap_client("-m", "post", url, "-e", f"{{n:{i}}}")
            assert result.code == "2.01", result
        (online,) = await stack.events(device, "device-online")
        assert isinstance(online.data, DeviceOnline)
        assert (online.data.gateway, online.data.protocol) == ("gw-presence", "coap+udp")
        assert online.data.remote_address.startswith("127.0.0.1")
        first = (await stack.events(device, "telemetry-reported"))[0]
        assert online.position is not None and first.position is not None
        assert online.position < first.position  # online comes first

        async def offline() -> list[AnyEvent]:
            return await stack.events(device, "device-offline")

        (off,) = await until(offline, "the device to go offline after 1 s of silence")
        assert isinstance(off.data, DeviceOffline)
        assert off.data.connection_id == online.data.connection_id
        assert off.data.reason == "inactive"
    # back online, on a new connection; the gateway stopping takes it offline
    udp = UdpConfig(bind=("127.0.0.1", 0))
    async with SimpleDeviceServer(stack.log, stack.directory, config, udp) as server:
        host, port = server.address
        url = f"coap://{host}:{port}/api/v1/{token}/telemetry"
        result = await coap_client("-m", "post", url, "-e", "{n:3}")
        assert result.code == "2.01", result
    onlines = await stack.events(device, "device-online")
    offlines = await stack.events(device, "device-offline")
    assert len(onlines) == len(offlines) == 2
    assert isinstance(onlines[1].data, DeviceOnline)
    assert isinstance(offlines[1].data, DeviceOffline)
    assert onlines[1].data.connection_id != online.data.connection_id
    assert offlines[1].data.connection_id == onlines[1].data.connection_id
    assert offlines[1].data.reason == "gateway shutting down"


def _uri_path(*segments: bytes) -> bytes:
    """Uri-Path options (11), encoded by hand (RFC 7252 section 3.1)."""
    out, delta = b"", 11
    for seg in segments:
        assert len(seg) < 269
        if len(seg) < 13:
            out += bytes([delta << 4 | len(seg)]) + seg
        else:
            out += bytes([delta << 4 | 13, len(seg) - 13]) + seg
        delta = 0
    return out


async def test_raw_datagrams_never_get_a_reply_larger_than_themselves(stack: Stack) -> None:
    """Anti-reflection, below the CoAP clients: malformed and odd datagrams, as a spoofed
    source would send them; aiocoap's own answers (RST, 4.04, empty ACK) included."""
    token, _ = await stack.issue()
    path = _uri_path(b"api", b"v1", new_token().encode(), b"telemetry")
    # distinct tokens: a request reusing the token of one still open from the same address
    # replaces it (RFC 7252 5.3.1), and the first one waits on the registry
    datagrams = [
        b"\x41\x02\x00\x01\x01" + path + b"\xff{a:1}",  # unknown token
        b"\x41\x02\x00\x02\x02" + bytes([0x91, 0x41]),  # an unknown critical option
        b"\x41\x02\x00\x03\x03\xff",  # payload marker, no payload
        b"\x49\x02\x00\x04" + b"x" * 9,  # token length 9 (reserved)
        b"\x40\x00\x00\x05",  # empty CON (ping)
        b"\x41\x01\x00\x06\x06",  # GET /
        b"\x80\x02\x00\x07",  # version 2
        b"\x40",
    ]
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setblocking(False)
        s.bind(("127.0.0.1", 0))
        for d in datagrams:
            await loop.sock_sendto(s, d, stack.server.address)
        # a valid request after them (another socket): once it is answered, they were handled
        r = await coap_client("-m", "post", stack.url(token, "telemetry"), "-e", "{a:1}")
        assert r.code == "2.01", r
        replies = []
        while True:
            try:
                replies.append(await asyncio.wait_for(loop.sock_recv(s, 4096), 0.5))
            except TimeoutError:
                break
    sizes = {d[2:4]: len(d) for d in datagrams if len(d) >= 4}
    codes = {r[2:4]: r[1] for r in replies}
    assert codes[b"\x00\x01"] == 0x81  # the unknown token: 4.01, empty
    for reply in replies:
        assert len(reply) <= sizes[reply[2:4]], reply


async def test_requests_relayed_by_a_dtls_terminator_are_of_the_device_address(
    stack: Stack,
) -> None:
    relays: list[tuple[str, int]] = []

    def peer_of(relay: tuple[str, int]) -> tuple[str, int] | None:
        relays.append(relay)
        return ("2001:db8::7", 40000)

    config = SimpleConfig(gateway_id="gw-dtls")
    udp = UdpConfig(bind=("127.0.0.1", 0))
    async with SimpleDeviceServer(
        stack.log, stack.directory, config, udp, peer_of=peer_of
    ) as server:
        token, device = await stack.issue()
        host, port = server.address
        url = f"coap://{host}:{port}/api/v1/{token}/telemetry"
        result = await coap_client("-m", "post", url, "-e", "{n:1}")
        assert result.code == "2.01", result
        (online,) = await stack.events(device, "device-online")
    assert isinstance(online.data, DeviceOnline)
    assert online.data.protocol == "coaps+udp"
    assert online.data.remote_address == "[2001:db8::7]:40000"
    assert relays
    assert relays[0][0] == "127.0.0.1"

"""Client-side RPC of simple devices over UDP against a real log (issue 10 item 3): a device's
``POST /api/v1/{token}/rpc`` is an ``rpc-requested`` event (with the device's online event);
the ``rpc-answered`` of that request, written by whoever answers (here the admin role, as the
twin's ``answer-rpc`` would), comes back as the CoAP response (2.05, JSON or CBOR); none in
time is 5.04; more waits than the gateway allows get 5.03. The application's side (the
command API, the client) is tests/e2e/test_simple_clientrpc.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from typing import Any

import aiocoap
import cbor2
import pytest
from aiocoap.numbers.codes import Code
from aiocoap.numbers.contentformat import ContentFormat

from proto import binding
from proto.events import Event, RpcAnswered, RpcRequested
from tests.conftest import Bus

from . import test_simple_udp
from .test_simple_udp import DEADLINE, Stack, client, until

__all__ = ["client"]  # the fixture

pytestmark = pytest.mark.servers

TIMEOUT = 20.0  # client_rpc_timeout of the server that answers


def open_stack(bus: Bus, **udp: Any) -> Any:
    """As test_simple_udp's stack, with the client-side RPC settings ``udp``."""
    return test_simple_udp.open_stack(bus, max_payload=64 * 1024, **udp)


async def call(
    ctx: aiocoap.Context, uri: str, body: bytes, deadline: float = DEADLINE, **opts: object
) -> aiocoap.Message:
    msg = aiocoap.Message(code=Code.POST, uri=uri, payload=body, **opts)
    return await asyncio.wait_for(ctx.request(msg).response, deadline)


async def requested(stack: Stack, device: str, n: int = 1) -> list[Event[RpcRequested]]:
    async def found() -> list[Event[RpcRequested]] | None:
        evs = await stack.events(device, "rpc-requested")
        return evs if len(evs) >= n else None  # type: ignore[return-value]

    got: list[Event[RpcRequested]] = await until(found, f"{n} rpc-requested of {device}")
    return got


async def answer(stack: Stack, device: str, request_id: str, result: object) -> None:
    e = Event(
        owner=stack.owner,
        device_id=device,
        data=RpcAnswered(request_id=request_id, result=result),
        source="/test",
        correlation_id=request_id,
    )
    await stack.admin.append([binding.to_nats(e)])


async def test_a_call_is_requested_then_answered_as_its_response(
    bus: Bus, client: aiocoap.Context
) -> None:
    async with open_stack(bus, client_rpc_timeout=TIMEOUT) as stack:
        token, device = await stack.issue()
        pending = asyncio.create_task(
            call(
                client,
                stack.url(token, "rpc"),
                b'{method:"getCurrentTime", params:{"tz":"UTC"}}',
                TIMEOUT + 5,
            )
        )
        (req,) = await requested(stack, device)
        assert (req.data.method, req.data.params, req.data.timeout_ms) == (
            "getCurrentTime",
            {"tz": "UTC"},
            int(TIMEOUT * 1000),
        )
        assert req.id == req.data.request_id == req.correlation_id
        assert req.source == "/gateway/gw-test"
        # the device came online with the call: its online event is before it in the log
        (online,) = await stack.events(device, "device-online")
        assert online.position is not None and req.position is not None
        assert online.position < req.position
        assert stack.server.client_rpc.waiting == 1
        await answer(stack, device, "another-request", {"not": "this"})
        await answer(stack, device, req.data.request_id, {"time": 1700000000000})
        got = await pending
        assert got.code == Code.CONTENT and got.opt.content_format == ContentFormat.JSON
        assert json.loads(got.payload) == {"time": 1700000000000}
        assert stack.server.client_rpc.waiting == 0

        # CBOR in, CBOR out (Accept: 60); a null result
        pending = asyncio.create_task(
            call(
                client,
                stack.url(token, "rpc"),
                cbor2.dumps({"method": "ping"}),
                TIMEOUT + 5,
                content_format=ContentFormat.CBOR,
                accept=ContentFormat.CBOR,
            )
        )
        second = (await requested(stack, device, 2))[1]
        assert (second.data.method, second.data.params) == ("ping", None)
        await answer(stack, device, second.data.request_id, None)
        got = await pending
        assert got.code == Code.CONTENT and got.opt.content_format == ContentFormat.CBOR
        assert cbor2.loads(got.payload) is None


async def test_no_answer_in_time_is_504(bus: Bus, client: aiocoap.Context) -> None:
    async with open_stack(bus, client_rpc_timeout=1.5) as stack:
        token, device = await stack.issue()
        started = time.monotonic()
        got = await call(client, stack.url(token, "rpc"), b'{"method":"getTime"}')
        assert got.code == Code.GATEWAY_TIMEOUT and got.payload == b""
        assert time.monotonic() - started >= 1.4
        (req,) = await stack.events(device, "rpc-requested")
        assert req.data.timeout_ms == 1500  # type: ignore[union-attr]
        assert stack.server.client_rpc.waiting == 0 and stack.server.client_rpc.timed_out == 1


async def test_more_waits_than_allowed_get_503(bus: Bus, client: aiocoap.Context) -> None:
    async with open_stack(bus, client_rpc_timeout=3.0, client_rpc_max_waits=1) as stack:
        token, device = await stack.issue()
        first = asyncio.create_task(call(client, stack.url(token, "rpc"), b'{"method":"a"}'))
        await requested(stack, device)
        busy = await call(client, stack.url(token, "rpc"), b'{"method":"b"}')
        assert busy.code == Code.SERVICE_UNAVAILABLE
        assert (await first).code == Code.GATEWAY_TIMEOUT
        assert len(await stack.events(device, "rpc-requested")) == 1  # the refused one: not written


async def test_malformed_calls_are_400_and_nothing_is_written(
    bus: Bus, client: aiocoap.Context
) -> None:
    async with open_stack(bus, client_rpc_timeout=TIMEOUT) as stack:
        token, device = await stack.issue()
        for body, text in ((b"[1]", b"object"), (b'{"params":1}', b"method"), (b"{x:", b"JSON")):
            got = await call(client, stack.url(token, "rpc"), body)
            assert got.code == Code.BAD_REQUEST and text in got.payload, (body, got.payload)
        assert await stack.events(device, "rpc-requested") == []


async def test_a_confirmable_call_is_acknowledged_empty_then_answered_separately(
    bus: Bus,
) -> None:
    """The wire as a device sees it (a raw UDP socket): the CON request gets an empty ACK
    while no answer is there (aiocoap's, after EMPTY_ACK_DELAY), then the answer comes as a
    separate CON 2.05 with the request's token, which the device acknowledges."""
    async with open_stack(bus, client_rpc_timeout=TIMEOUT) as stack:
        token, device = await stack.issue()
        host, port = stack.server.address
        loop = asyncio.get_running_loop()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.setblocking(False)
            s.connect((host, port))
            m = aiocoap.Message(code=Code.POST, payload=b'{"method":"getTime"}')
            m.opt.uri_path = ("api", "v1", token, "rpc")
            m.mtype, m.mid, m.token = aiocoap.CON, 0x4242, b"\x07\x08"
            s.send(m.encode())
            async with asyncio.timeout(DEADLINE):
                ack = aiocoap.Message.decode(await loop.sock_recv(s, 2048))
            assert (ack.mtype, ack.code, ack.mid) == (aiocoap.ACK, Code.EMPTY, 0x4242)
            (req,) = await requested(stack, device)
            await answer(stack, device, req.data.request_id, [1, 2, 3])
            async with asyncio.timeout(DEADLINE):
                separate = aiocoap.Message.decode(await loop.sock_recv(s, 2048))
            assert (separate.mtype, separate.code, separate.token) == (
                aiocoap.CON,
                Code.CONTENT,
                b"\x07\x08",
            )
            assert json.loads(separate.payload) == [1, 2, 3]
            done = aiocoap.Message(code=Code.EMPTY)
            done.mtype, done.mid = aiocoap.ACK, separate.mid
            s.send(done.encode())


async def test_a_gateway_stops_without_waiting_for_the_answers(
    bus: Bus, client: aiocoap.Context
) -> None:
    async with open_stack(bus, client_rpc_timeout=TIMEOUT * 10) as stack:
        token, device = await stack.issue()
        pending = asyncio.create_task(
            call(client, stack.url(token, "rpc"), b'{"method":"m"}', TIMEOUT * 10)
        )
        await requested(stack, device)
        started = time.monotonic()
        await stack.server.close()
        assert time.monotonic() - started < TIMEOUT  # not the 200 s of the wait
        assert stack.server.client_rpc.waiting == 0
    pending.cancel()
    with contextlib.suppress(asyncio.CancelledError, aiocoap.error.Error):
        await pending

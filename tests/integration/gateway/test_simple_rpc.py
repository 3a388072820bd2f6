"""Server-side RPC to simple devices over UDP against a real log (issue 10 item 3): the device
observes ``/api/v1/{token}/rpc`` and gets each RPC as a notification ``{"id", "method",
"params"}``, in issue order, the ones issued while it was away first; it answers with
``POST /api/v1/{token}/rpc/{id}``: ``command-sent`` then ``command-succeeded`` in the log.
aiocoap's client (for the order of notifications) and libcoap's coap-client as the devices."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import aiocoap
import pytest
from aiocoap.numbers.codes import Code
from aiocoap.numbers.contentformat import ContentFormat

from gateway.adapters.coap_udp import SimpleDeviceServer, UdpConfig
from gateway.simple import SimpleConfig
from proto import binding
from proto import events as ev
from proto.devtokens import new_token
from proto.events import RPC_HREF

from .simple_peers import coap_client
from .test_simple_udp import DEADLINE, Stack, client, request, stack, until

__all__ = ["client", "stack"]  # the fixtures

pytestmark = pytest.mark.servers


async def issue(
    stack: Stack,
    device: str,
    method: str,
    params: Any = None,
    *,
    ttl: float = 60.0,
    max_attempts: int = 3,
) -> str:
    """Record an rpc command as the command API does; returns its correlation id."""
    cid = "rpc-" + uuid.uuid4().hex[:8]
    data = ev.CommandPending(
        href=RPC_HREF,
        op="rpc",
        content={"method": method, "params": params},
        expires_at=datetime.now(UTC) + timedelta(seconds=ttl),
        max_attempts=max_attempts,
    )
    e = ev.Event(
        owner=stack.owner,
        device_id=device,
        data=data,
        source="/twinhub/twin/api",
        correlation_id=cid,
    )
    await stack.admin.append([binding.to_nats(e)])
    return cid


class Observer:
    """An aiocoap observation of a device's ``rpc``, notifications queued as JSON."""

    def __init__(self, ctx: aiocoap.Context, uri: str) -> None:
        self.request = ctx.request(aiocoap.Message(code=Code.GET, uri=uri, observe=0))
        self.notifications: asyncio.Queue[aiocoap.Message] = asyncio.Queue()
        self.first: aiocoap.Message | None = None
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Observer:
        self.first = await asyncio.wait_for(self.request.response, DEADLINE)
        self._task = asyncio.create_task(self._pump(), name="rpc-observer")
        return self

    async def _pump(self) -> None:
        async for n in self.request.observation:
            await self.notifications.put(n)

    async def next(self) -> dict[str, Any]:
        n = await asyncio.wait_for(self.notifications.get(), DEADLINE)
        assert n.code == Code.CONTENT and n.opt.content_format == ContentFormat.JSON
        body: dict[str, Any] = json.loads(n.payload)
        return body

    async def __aexit__(self, *exc: object) -> None:
        self.request.observation.cancel()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


async def answer(ctx: aiocoap.Context, stack: Stack, token: str, rpc_id: int, body: bytes) -> Code:
    got = await request(
        ctx,
        Code.POST,
        stack.url(token, f"rpc/{rpc_id}"),
        body,
        content_format=ContentFormat.JSON,
    )
    return got.code


async def test_rpcs_issued_while_away_arrive_in_order_then_new_ones_at_once(
    stack: Stack, client: aiocoap.Context
) -> None:
    token, device = await stack.issue()
    cids = [await issue(stack, device, "setGpio", {"pin": i, "value": 1}) for i in range(1, 4)]
    async with Observer(client, stack.url(token, "rpc")) as obs:
        assert obs.first is not None and obs.first.code == Code.VALID  # ThingsBoard's 2.03
        got = [await obs.next() for _ in cids]
        assert [(g["method"], g["params"]["pin"]) for g in got] == [
            ("setGpio", 1),
            ("setGpio", 2),
            ("setGpio", 3),
        ]
        assert len({g["id"] for g in got}) == 3 and all(isinstance(g["id"], int) for g in got)
        sent = await stack.events(device, "command-sent")
        assert [(e.correlation_id, e.data.attempt) for e in sent] == [(c, 1) for c in cids]  # type: ignore[union-attr]
        online = await stack.events(device, "device-online")
        assert len(online) == 1  # observing made it online
        assert all(
            e.data.connection_id == online[0].data.connection_id  # type: ignore[union-attr]
            for e in sent
        )

        for g in got:
            code = await answer(
                client, stack, token, g["id"], b'{"ok": true, "pin": %d}' % g["params"]["pin"]
            )
            assert code == Code.CREATED
        succeeded = await stack.events(device, "command-succeeded")
        assert [(e.correlation_id, e.data.content) for e in succeeded] == [  # type: ignore[union-attr]
            (c, {"ok": True, "pin": i}) for i, c in enumerate(cids, 1)
        ]
        # an answer to an id that is answered, or never given, is 4.04
        assert await answer(client, stack, token, got[0]["id"], b"{}") == Code.NOT_FOUND
        assert await answer(client, stack, token, 999, b"{}") == Code.NOT_FOUND
        assert len(await stack.events(device, "command-succeeded")) == 3

        # a new RPC while the device observes comes at once
        late = await issue(stack, device, "reboot")
        n = await obs.next()
        assert (n["method"], n["params"]) == ("reboot", None)
        assert n["id"] not in {g["id"] for g in got}
        assert await answer(client, stack, token, n["id"], b"") == Code.CREATED
        last = (await stack.events(device, "command-succeeded"))[-1]
        assert (last.correlation_id, last.data.content) == (late, None)  # type: ignore[union-attr]
        assert stack.server.presence.online(stack.owner, device)


async def test_an_unanswered_rpc_is_delivered_again_on_the_next_observation(
    stack: Stack, client: aiocoap.Context
) -> None:
    token, device = await stack.issue()
    async with Observer(client, stack.url(token, "rpc")) as obs:
        cid = await issue(stack, device, "getTemp")
        first = await obs.next()
    # the observation ended; the device observes again without having answered
    async with Observer(client, stack.url(token, "rpc")) as obs:
        again = await obs.next()
        assert again == first  # the same RPC under the same id
        sent = await stack.events(device, "command-sent")
        assert [(e.correlation_id, e.data.attempt) for e in sent] == [(cid, 1), (cid, 2)]  # type: ignore[union-attr]
        assert await answer(client, stack, token, again["id"], b"21.5") == Code.CREATED
    (done,) = await stack.events(device, "command-succeeded")
    assert done.data.content == 21.5  # type: ignore[union-attr]


async def test_an_rpc_notified_max_attempts_times_unanswered_fails(
    stack: Stack, client: aiocoap.Context
) -> None:
    token, device = await stack.issue()
    once = await issue(stack, device, "once", max_attempts=1)
    async with Observer(client, stack.url(token, "rpc")) as obs:
        first = await obs.next()
        assert first["method"] == "once"
    later = await issue(stack, device, "later")
    async with Observer(client, stack.url(token, "rpc")) as obs:
        n = await obs.next()
        assert n["method"] == "later"  # not "once" again: it failed
        (failed,) = await stack.events(device, "command-failed")
        assert failed.correlation_id == once
        assert failed.data.attempts == 1  # type: ignore[union-attr]
        assert await answer(client, stack, token, first["id"], b"{}") == Code.NOT_FOUND
        assert await answer(client, stack, token, n["id"], b"{}") == Code.CREATED
    (done,) = await stack.events(device, "command-succeeded")
    assert done.correlation_id == later


async def test_ended_rpcs_are_not_delivered_and_bad_answers(
    stack: Stack, client: aiocoap.Context
) -> None:
    token, device = await stack.issue()
    canceled = await issue(stack, device, "one")
    cancel = ev.Event(
        owner=stack.owner,
        device_id=device,
        data=ev.CommandCanceled(href=RPC_HREF, reason="canceled"),
        source="/twinhub/twin/api",
        correlation_id=canceled,
    )
    await stack.admin.append([binding.to_nats(cancel)])
    await issue(stack, device, "expired", ttl=0.001)
    await issue(stack, device, "two")
    async with Observer(client, stack.url(token, "rpc")) as obs:
        n = await obs.next()
        assert n["method"] == "two"
        bad = await request(
            client, Code.POST, stack.url(token, f"rpc/{n['id']}"), b"{not: json", content_format=0
        )
        assert bad.code == Code.BAD_REQUEST
        assert (
            await request(client, Code.POST, stack.url(token, "rpc/x"), b"{}")
        ).code == Code.NOT_FOUND
        assert (
            await request(client, Code.GET, stack.url(token, "rpc/1"))
        ).code == Code.METHOD_NOT_ALLOWED
        assert await answer(client, stack, token, n["id"], b"[1, 2]") == Code.CREATED
    assert obs.notifications.empty()
    (sent,) = await stack.events(device, "command-sent")
    assert sent.data.href == RPC_HREF  # type: ignore[union-attr]


async def test_a_bad_token_cannot_observe(stack: Stack, client: aiocoap.Context) -> None:
    token, _ = await stack.issue(state="revoked")
    msg = aiocoap.Message(code=Code.GET, uri=stack.url(token, "rpc"), observe=0)
    req = client.request(msg)
    got = await asyncio.wait_for(req.response, DEADLINE)
    assert got.code == Code.UNAUTHORIZED and got.payload == b""


async def test_coap_client_observes_and_answers(stack: Stack) -> None:
    """``coap-client -m get coap://HOST/api/v1/TOKEN/rpc -s N`` (ThingsBoard's docs) gets a
    pending RPC; ``coap-client -m post .../rpc/{id}`` answers it."""
    token, device = await stack.issue()
    cid = await issue(stack, device, "setGpio", {"pin": 23, "value": 1})
    observed = await coap_client("-m", "get", "-s", "3", stack.url(token, "rpc"), timeout=5)
    bodies = [
        json.loads(line.split(" :: ", 1)[1].strip("'"))
        for line in observed.stdout.splitlines()
        if " c:2.05 " in line and " :: " in line
    ]
    assert bodies, observed.stdout + observed.stderr
    assert (bodies[0]["method"], bodies[0]["params"]) == ("setGpio", {"pin": 23, "value": 1})
    posted = await coap_client(
        "-m",
        "post",
        "-t",
        "json",
        "-e",
        '{"result":"ok"}',
        stack.url(token, f"rpc/{bodies[0]['id']}"),
    )
    assert posted.code == "2.01", posted.stdout + posted.stderr
    (done,) = await stack.events(device, "command-succeeded")
    assert (done.correlation_id, done.data.content) == (cid, {"result": "ok"})  # type: ignore[union-attr]
    # coap-client ended its observation when -s ran out: the device is not held online
    await until(lambda: _true(stack.server.observing(stack.owner, device) == 0), "the end")


async def _true(value: bool) -> bool:
    return value


async def test_observing_holds_the_device_online_past_the_inactivity_timeout(
    stack: Stack,
) -> None:
    """coap-client observes for a while (and deregisters at the end, as libcoap does):
    online throughout, whatever the inactivity timeout; offline a timeout after the end."""
    now = [time.time()]
    udp = UdpConfig(bind=("127.0.0.1", 0), inactivity_timeout=5.0, tick_interval=3600.0)
    async with SimpleDeviceServer(
        stack.log, stack.directory, SimpleConfig(gateway_id="gw-hold"), udp, clock=lambda: now[0]
    ) as server:
        token, device = await stack.issue()
        host, port = server.address
        uri = f"coap://{host}:{port}/api/v1/{token}/rpc"
        observer = asyncio.create_task(coap_client("-m", "get", "-s", "4", uri, timeout=6))
        await until(lambda: _true(server.observing(stack.owner, device) == 1), "the observation")
        now[0] += 60.0
        await server.tick()
        assert server.presence.online(stack.owner, device)
        assert await stack.events(device, "device-offline") == []
        await observer
        await until(lambda: _true(server.observing(stack.owner, device) == 0), "its end")
        now[0] += 4.0
        await server.tick()
        assert server.presence.online(stack.owner, device)  # the timeout counts from the end
        now[0] += 1.0
        await server.tick()
        (off,) = await stack.events(device, "device-offline")
        assert off.data.reason == "inactive"  # type: ignore[union-attr]


async def test_other_observe_requests_are_answered_once_without_observe(
    stack: Stack, client: aiocoap.Context
) -> None:
    """An Observe registration of anything but a device's ``rpc`` or ``attributes`` (or
    refused) is answered as a request, once: no Observe option, no observation left open."""
    token, device = await stack.issue()
    for uri in (
        stack.url(token, "telemetry"),
        stack.url(token, "nothing"),
        stack.url(new_token(), "rpc"),
        stack.url(new_token(), "attributes"),
    ):
        req = client.request(aiocoap.Message(code=Code.GET, uri=uri, observe=0))
        got = await asyncio.wait_for(req.response, DEADLINE)
        assert got.code in (Code.METHOD_NOT_ALLOWED, Code.NOT_FOUND, Code.UNAUTHORIZED), uri
        assert got.opt.observe is None
    assert stack.server.observing(stack.owner, device) == 0
    assert stack.server.observing_attributes(stack.owner, device) == 0

"""Commands delivered to devices end to end: client → twin API (NATS request/reply) → log →
gateway (routing by subscription) → device → outcome events → twin.

Real servers (NATS JetStream, FerretDB), the gateway in-process, simulated OCF devices.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cbor2
import pytest
from pymongo.asynchronous.database import AsyncDatabase

import devicesim.site
from auth.tokens import JwtValidator
from devicesim.device import SimDevice
from gateway.service import Gateway, GatewayConfig
from proto import events as ev
from twin.adapters.nats_api import NatsApiServer
from twin.api import ApiConfig, TwinApi
from twin.commands import SIGNED_OFF_REASON
from twinhub_client import TwinhubClient

# the raw RFC 8323 peer of the transport tests: a device that signs off (the simulator never does)
from ..integration.gateway.coap_peers import (  # noqa: TID252
    CONTENT_FORMAT,
    CSM,
    DELETE,
    POST,
    RawPeer,
    request,
    uint,
)
from .stack import WAIT, Stack, open_stack, server_tls

if TYPE_CHECKING:
    from tests.conftest import Bus

pytestmark = pytest.mark.servers


@contextlib.asynccontextmanager
async def api_for(stack: Stack) -> AsyncIterator[TwinhubClient]:
    """The twin's command API on the production subjects (the only ones an application may
    reach) and a client of the stack's owner, admitted by the bus with an application token."""
    twin_api = TwinApi(
        stack.store,
        stack.twins,
        stack.bus.validator(),
        ApiConfig(projector=f"p-{stack.owner}", consumer_secret=os.urandom(32)),
    )
    async with NatsApiServer(stack.store.connection, twin_api), stack.client() as client:
        yield client


@pytest.fixture
async def stack(bus: Bus, mongo_db: AsyncDatabase[Any], tmp_path: Path) -> Any:
    async with open_stack(
        bus,
        mongo_db,
        tmp_path,
        request_timeout=2.0,
        command_retry_initial=0.2,
        command_retry_max=0.5,
    ) as st:
        yield st


async def _online(stack: Stack, d: SimDevice) -> None:
    await stack.wait_twin(
        d.device_id,
        lambda t: (
            t.online
            and t.sync_state == "in_sync"
            and all(t.resource(h) is not None for h in d.model.user_hrefs)
        ),
    )


def _by_kind(events: list[ev.AnyEvent], cls: type[Any]) -> list[ev.AnyEvent]:
    return [e for e in events if isinstance(e.data, cls)]


async def test_update_to_an_online_device(stack: Stack) -> None:
    async with stack.running_projector(), api_for(stack) as client:
        d = stack.device(resources=2, ping_interval=None)
        async with d:
            await _online(stack, d)
            outcome = await client.update(
                d.device_id, "/light/1", {"power": 42, "state": True}, wait=True, wait_timeout=WAIT
            )
            assert isinstance(outcome.data, ev.CommandSucceeded)
            assert outcome.data.status == "2.04"
            assert outcome.data.content["power"] == 42
            assert d.model.representation("/light/1")["power"] == 42
            twin = await stack.wait_twin(
                d.device_id,
                lambda t: (
                    (r := t.resource("/light/1")) is not None
                    and r.content.get("power") == 42
                    and not t.pending
                ),
            )
            assert twin.resource("/light/1") is not None
            got = await client.retrieve(d.device_id, "/light/2", wait=True, wait_timeout=WAIT)
            assert isinstance(got.data, ev.CommandSucceeded)
            assert got.data.content["seq"] >= 0


@pytest.mark.timeout(300)
async def test_pending_commands_are_delivered_in_issue_order_at_sign_in(stack: Stack) -> None:
    # 1,000 as the issue asks: issuing one costs the same whatever the queue holds (the API
    # reads the twin with at most the command it names; open commands are stored apart).
    n = 1000
    async with stack.running_projector(), api_for(stack) as client:
        d = stack.device(resources=1, ping_interval=None)
        async with d:  # register once, then go away
            await _online(stack, d)
        await stack.wait_twin(d.device_id, lambda t: not t.online)
        # issued one after another: concurrent commands to one device contend on its
        # optimistic-concurrency check, and past a few retries the API asks the caller to retry
        accepted = [
            await client.update(
                d.device_id, "/light/1", {"power": i}, ttl=600, correlation_id=f"c{i:04d}"
            )
            for i in range(n)
        ]
        assert len({a.correlation_id for a in accepted}) == n
        d2 = stack.device(resources=1, ping_interval=None)
        started = time.monotonic()
        async with d2:
            await d2.wait_until(lambda dev: dev.stats.updates_applied >= n, WAIT * 4)
            elapsed = time.monotonic() - started
            assert d2.model.representation("/light/1")["power"] == n - 1
    log = await stack.events(d.device_id)
    pending = {e.correlation_id: e.position for e in _by_kind(log, ev.CommandPending)}
    succeeded = [e.correlation_id for e in _by_kind(log, ev.CommandSucceeded)]
    assert len(succeeded) == n
    assert succeeded == sorted(succeeded, key=lambda c: pending[c]), "issue order"
    assert len(_by_kind(log, ev.CommandSent)) == n, "each sent once"
    print(f"\n{n} pending commands delivered in {elapsed:.2f}s after sign-in")


async def test_device_that_does_not_answer_is_retried_then_failed(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = 0

    async def silent(self: Any, request: Any) -> Any:
        nonlocal calls
        calls += 1
        await asyncio.Event().wait()  # never answers

    async with stack.running_projector(), api_for(stack) as client:
        d = stack.device(resources=1, ping_interval=None)
        async with d:
            await _online(stack, d)
            monkeypatch.setattr(devicesim.site._LightResource, "render_post", silent)
            outcome = await client.update(
                d.device_id,
                "/light/1",
                {"power": 1},
                ttl=60,
                max_attempts=3,
                wait=True,
                wait_timeout=WAIT,
            )
            assert isinstance(outcome.data, ev.CommandFailed)
            assert outcome.data.attempts == 3
            assert outcome.data.status is None
            assert calls == 3
    sent = _by_kind(await stack.events(d.device_id), ev.CommandSent)
    assert [e.data.attempt for e in sent] == [1, 2, 3]  # type: ignore[union-attr]


async def test_gateway_killed_between_sent_and_answer(
    stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The command is sent again by the next gateway; an answered one is never sent again."""
    hold = asyncio.Event()
    original = devicesim.site._LightResource.render_post

    async def held(self: Any, request: Any) -> Any:
        if not hold.is_set():
            await asyncio.Event().wait()  # the first gateway dies before this answers
        return await original(self, request)

    async with stack.running_projector(), api_for(stack) as client:
        d = stack.device(resources=1, ping_interval=None)
        await d.start()
        try:
            await _online(stack, d)
            done = await client.update(
                d.device_id, "/light/1", {"power": 5}, wait=True, wait_timeout=WAIT
            )
            assert isinstance(done.data, ev.CommandSucceeded)
            applied_before = d.stats.updates_applied
            monkeypatch.setattr(devicesim.site._LightResource, "render_post", held)
            accepted = await client.update(d.device_id, "/light/1", {"power": 7}, ttl=120)
            async with asyncio.timeout(WAIT):
                while not any(
                    e.correlation_id == accepted.correlation_id
                    for e in _by_kind(await stack.events(d.device_id), ev.CommandSent)
                ):
                    await asyncio.sleep(0.05)
            port = stack.gateway.tcp_address
            assert port is not None
            await stack.gateway.__aexit__(None, None, None)  # the gateway goes away
            hold.set()
            ctx, _ = server_tls(tmp_path / "again")
            cfg = GatewayConfig(
                gateway_id="gw-e2e-2",
                tcp_bind=port,
                tls_bind=None,
                ssl_context=ctx,
                request_timeout=2.0,
            )
            async with Gateway(
                cfg, stack.gateway_store, JwtValidator(stack.issuer.public_keys), stack.issuer
            ):
                outcome = await client.wait_outcome(accepted, WAIT)
                assert isinstance(outcome.data, ev.CommandSucceeded)
                async with asyncio.timeout(WAIT):
                    while d.model.representation("/light/1")["power"] != 7:
                        await asyncio.sleep(0.05)
                await stack.wait_twin(d.device_id, lambda t: not t.pending)
        finally:
            await d.stop()
    log = await stack.events(d.device_id)
    sent = [e for e in _by_kind(log, ev.CommandSent) if e.correlation_id == accepted.correlation_id]
    assert [e.data.attempt for e in sent] == [1, 2]  # type: ignore[union-attr]
    outcomes = [
        e for e in _by_kind(log, ev.CommandSucceeded) if e.correlation_id == accepted.correlation_id
    ]
    assert len(outcomes) == 1
    first = [e for e in _by_kind(log, ev.CommandSent) if e.correlation_id == done.correlation_id]
    assert len(first) == 1, "an answered command is never sent again"
    assert d.stats.updates_applied == applied_before + 1


async def test_desired_state_is_carried_to_the_device_and_reached(stack: Stack) -> None:
    async with stack.running_projector(), api_for(stack) as client:
        d = stack.device(resources=1, ping_interval=None)
        async with d:
            await _online(stack, d)
            await client.set_desired(d.device_id, "/light/1", {"power": 77, "state": True})
            async with asyncio.timeout(WAIT):
                while d.model.representation("/light/1")["power"] != 77:
                    await asyncio.sleep(0.05)
            twin = await stack.wait_twin(
                d.device_id,
                lambda t: (
                    t.delta_for("/light/1") == {}
                    and any(x.href == "/light/1" and x.reached for x in t.desired)
                ),
            )
            assert twin.resource("/light/1").content["power"] == 77  # type: ignore[union-attr]
    log = await stack.events(d.device_id)
    updates = [e for e in _by_kind(log, ev.CommandPending) if e.data.reason == "desired"]  # type: ignore[union-attr]
    assert len(updates) == 1
    assert updates[0].data.content == {"power": 77, "state": True}  # type: ignore[union-attr]
    assert len(_by_kind(log, ev.DesiredReached)) == 1


async def _ask(
    peer: RawPeer, method: int, path: str, body: Any, query: tuple[str, ...] = ()
) -> str:
    token = peer.token()
    options = [(CONTENT_FORMAT, uint(10000))]
    peer.send(request(method, path, token, query=query, payload=cbor2.dumps(body), options=options))
    while True:  # skipping the server's CSM and its requests (discovery) to us
        frame = await peer.recv()
        if frame.token == token and 64 <= frame.code < 224:
            return f"{frame.code >> 5}.{frame.code & 31:02d}"


async def _sign_off(stack: Stack, peer: RawPeer, device_id: str) -> None:
    # the token in the payload: a JWT is longer than a Uri-Query option may be (255)
    query = (f"di={device_id}", f"uid={stack.owner}")
    body = {"accesstoken": stack.token(device_id)}
    assert await _ask(peer, DELETE, "/oic/sec/account", body, query) == "2.02"


async def test_sign_off_cancels_the_devices_pending_commands(stack: Stack) -> None:
    """Offline (queued while away) and signed in (waiting for a publish): all end as canceled."""
    assert stack.gateway.tcp_address is not None
    async with stack.running_projector(), api_for(stack) as client:
        away = stack.device(resources=1, ping_interval=None)
        async with away:  # register once, then go away
            await _online(stack, away)
        await stack.wait_twin(away.device_id, lambda t: not t.online)
        here = str(uuid.uuid4())
        peer = await RawPeer.connect(stack.gateway.tcp_address)
        try:
            assert (await peer.recv()).code == CSM
            tok = stack.token(here)
            sign_up = {"di": here, "accesstoken": tok, "authprovider": "test"}
            assert await _ask(peer, POST, "/oic/sec/account", sign_up) == "2.04"
            sign_in = {"di": here, "uid": stack.owner, "accesstoken": tok, "login": True}
            assert await _ask(peer, POST, "/oic/sec/session", sign_in) == "2.04"
            await stack.wait_twin(here, lambda t: t.online)
            queued = [
                await client.update(away.device_id, "/light/1", {"power": i}, ttl=600)
                for i in range(3)
            ]
            queued.append(await client.retrieve(away.device_id, "/oic/d", ttl=600))
            # /light/1 is not published: the gateway holds these until it is
            waiting = [
                await client.update(here, "/light/1", {"power": i}, ttl=600) for i in range(2)
            ]
            assert len(await client.list_pending(here)) == 2
            await _sign_off(stack, peer, here)
        finally:
            await peer.close()
        other = await RawPeer.connect(stack.gateway.tcp_address)
        try:  # the away device signs off from a connection without a sign-in (token only)
            await _sign_off(stack, other, away.device_id)
        finally:
            await other.close()
        for accepted in queued + waiting:
            outcome = await client.wait_outcome(accepted, WAIT)
            assert isinstance(outcome.data, ev.CommandCanceled), outcome
            assert outcome.data.reason == SIGNED_OFF_REASON
        for device_id in (away.device_id, here):
            # The projector writes a batch's commands before its twin: a read between the two
            # sees the commands gone and the twin without their outcomes yet.
            twin = await stack.wait_twin(
                device_id, lambda t: t.deleted and not t.pending and len(t.recent_outcomes) >= 2
            )
            assert [o.state for o in twin.recent_outcomes][-2:] == ["canceled", "canceled"]
    for device_id, n in ((away.device_id, 4), (here, 2)):
        log = await stack.events(device_id)
        assert len(_by_kind(log, ev.CommandCanceled)) == n, "each canceled once"
        assert _by_kind(log, ev.CommandSent) == [], "none reached the device"
        kinds = [e.kind for e in log]
        assert kinds.index("device-unregistered") < kinds.index("command-canceled")

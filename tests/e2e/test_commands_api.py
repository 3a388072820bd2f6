"""The command API and subscriptions end to end on real servers: the twin's API served on NATS
request/reply, the client, the projector into MongoDB (FerretDB), the expiry sweeper, and
JetStream subscriptions across the subscriber's restart and a NATS restart.

The gateway's side (delivering commands to devices) is not here: where a device's answer is
needed, the test appends it to the log as the gateway would (with the gateway's role). Each
test has its own owner (the stream is shared) and its own database; the API is served on the
production subjects (the only ones an application may reach on the authenticated bus), by
one test at a time. Clients are applications with a token the bus admits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nats.errors
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from nats.aio.client import Client as NatsClient
from pymongo.asynchronous.database import AsyncDatabase

from auth.application import AppTokenValidator
from auth.tokens import TokenIssuer
from eventstore.adapters.jetstream import JetStreamEventStore
from proto import api, binding, subjects
from proto import events as ev
from proto.events import AnyEvent, EventData
from twin.adapters.mongo import MongoTwinStore
from twin.adapters.nats_api import NatsApiServer
from twin.api import ApiConfig, TwinApi
from twin.model import Twin
from twin.service import ProjectorConfig, TwinProjector
from twin.sweeper import ExpirySweeper, SweeperConfig
from twinhub_cli.datadir import DataDir
from twinhub_cli.devservices import NatsServer
from twinhub_client import (
    BadRequestError,
    ConflictError,
    ForbiddenError,
    NotFoundError,
    ServiceUnavailableError,
    TwinhubClient,
    UnauthorizedError,
)

from .stack import bus_config, production_callout

if TYPE_CHECKING:
    from tests.conftest import Bus

pytestmark = pytest.mark.servers

WAIT = 30.0


@dataclass
class Env:
    owner: str
    other: str
    bus: Bus
    store: JetStreamEventStore  # the twin service's: the API's, the projector's, the sweeper's
    gateway_store: JetStreamEventStore  # the gateway's: what devices' events come through
    twins: MongoTwinStore
    issuer: TokenIssuer  # of the application tokens (the bus's, unless the test runs a callout)
    projector: TwinProjector
    prefix: str = api.API_PREFIX

    def dev(self, name: str) -> str:
        """A device id of this test's own (device ids are global in the shared stream)."""
        return f"{self.owner}-{name}"

    def token(self, owner: str | None = None) -> str:
        """An application token of ``owner`` (default: the test's)."""
        return self.issuer.issue(owner or self.owner, now=time.time(), ttl=600)

    def client(self, owner: str | None = None, **kw: Any) -> TwinhubClient:
        return TwinhubClient(self.bus.url, self.token(owner), **kw)

    async def append(
        self, device: str, data: EventData, *, owner: str | None = None, cid: str | None = None
    ) -> int:
        e: AnyEvent = ev.Event(
            owner=owner or self.owner,
            device_id=device,
            data=data,
            source="/test/gateway",
            correlation_id=cid,
        )
        return (await self.gateway_store.append([binding.to_nats(e)])).last_position

    async def register(self, device: str, owner: str | None = None) -> int:
        return await self.append(device, ev.DeviceRegistered(), owner=owner)

    async def events(self, device: str, kind: str | None = None) -> list[AnyEvent]:
        f = subjects.event_filter(device=device, kind=kind)
        return [binding.from_stored(m) async for m in self.store.read(f)]

    async def wait_twin(self, device: str, cond: Any, timeout: float = WAIT) -> Twin:
        async with asyncio.timeout(timeout):
            while True:
                t = await self.twins.get(device)
                if t is not None and cond(t):
                    return t
                await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def open_env(
    bus: Bus, db: AsyncDatabase[Any], *, issuer: TokenIssuer | None = None
) -> AsyncIterator[Env]:
    """``issuer``: of the tokens the API accepts (default: the bus's, which the session's
    callout admits; another one needs a callout that admits its tokens too)."""
    owner = "o" + uuid.uuid4().hex[:10]
    issuer = issuer or bus.issuer
    projector_name = f"p-{owner}"
    async with (
        JetStreamEventStore.from_url(bus.endpoint("twin")) as store,
        JetStreamEventStore.from_url(bus.endpoint("gateway")) as gateway_store,
    ):
        await store.provision()
        twins = MongoTwinStore(db)
        await twins.ensure_indexes()
        cfg = ProjectorConfig(name=projector_name, filter_subject=subjects.event_filter(owner))
        twin_api = TwinApi(
            store,
            twins,
            AppTokenValidator(issuer.public_keys),
            ApiConfig(projector=projector_name, consumer_secret=os.urandom(32)),
        )
        async with (
            TwinProjector(twins, store, cfg) as projector,
            NatsApiServer(store.connection, twin_api),
            ExpirySweeper(twins, store, SweeperConfig(interval=0.2)),
        ):
            yield Env(owner, "x" + owner, bus, store, gateway_store, twins, issuer, projector)


@pytest.fixture
async def env(bus: Bus, mongo_db: AsyncDatabase[Any]) -> AsyncIterator[Env]:
    async with open_env(bus, mongo_db) as e:
        yield e


async def test_authorization(env: Env, nats_client: NatsClient) -> None:
    await env.register(env.dev("d1"))
    await env.register(env.dev("theirs"), owner=env.other)
    async with env.client(env.other) as other, env.client() as mine:
        with pytest.raises(ForbiddenError):
            await other.update(env.dev("d1"), "/light", {"value": True})
        with pytest.raises(ForbiddenError):
            await other.get_twin(env.dev("d1"))
        with pytest.raises(ForbiddenError):
            await mine.cancel(env.dev("theirs"))
        with pytest.raises(NotFoundError):
            await mine.get_twin(env.dev("no-such-device"))
        with pytest.raises(BadRequestError):
            await mine.update(env.dev("d1"), "no-slash", {"value": True})
        assert [d["device_id"] for d in (await mine.list_devices()).devices] in (
            [],
            [env.dev("d1")],
        )
        # an admitted connection does not vouch for a request: each one's token is checked
        async with TwinhubClient(mine.nc, "garbage") as bad:
            with pytest.raises(UnauthorizedError):
                await bad.get_twin(env.dev("d1"))
    # a client with a token the bus does not take gets no connection, let alone an answer
    with pytest.raises(ValueError, match="not a JWT"):
        TwinhubClient(env.bus.url, "garbage")
    stranger = TokenIssuer(ec.generate_private_key(ec.SECP256R1()), kid=env.issuer.kid)
    forged = stranger.issue(env.owner, now=time.time(), ttl=600)
    with pytest.raises(ServiceUnavailableError):
        async with TwinhubClient(env.bus.url, forged, timeout=2.0):
            pass
    # without a token, and with a body that is not a request: typed errors, never silence
    no_token = await nats_client.request(f"{env.prefix}.twin-get", b'{"device_id":"d1"}', 5)
    assert api.decode_reply(no_token.data).error == api.ApiError(
        code="unauthorized", message="missing bearer token (Authorization header)"
    )
    for subject, body in ((f"{env.prefix}.update", b"{]"), (f"{env.prefix}.bogus", b"{}")):
        msg = await nats_client.request(subject, body, 5, headers=api.bearer(env.token()))
        reply = api.decode_reply(msg.data)
        assert reply.error is not None and reply.error.code == "bad_request"
    assert await env.events(env.dev("d1"), "command-pending") == []


async def test_commands_are_recorded_then_deduplicated_and_canceled(env: Env) -> None:
    await env.register(env.dev("d1"))
    async with env.client() as c:
        accepted = await c.update(
            env.dev("d1"), "/light", {"value": True}, correlation_id="c-1", ttl=60
        )
        # recorded in the log before the reply
        (pending,) = await env.events(env.dev("d1"), "command-pending")
        assert (pending.position, pending.correlation_id) == (accepted.position, "c-1")
        with pytest.raises(ConflictError):
            await c.update(env.dev("d1"), "/light", {"value": False}, correlation_id="c-1")
        await c.retrieve(env.dev("d1"), "/oic/d", correlation_id="c-2")
        await c.delete(
            env.dev("d1"), "/unpublished/yet", correlation_id="c-3"
        )  # waits for a publish
        listed = await c.list_pending(env.dev("d1"))
        assert [p.correlation_id for p in listed] == ["c-1", "c-2", "c-3"]
        twin, position = await c.get_twin(env.dev("d1"))
        assert position >= accepted.position
        assert [p["correlation_id"] for p in twin["pending"]] == ["c-1", "c-2", "c-3"]
        canceled = await c.cancel(env.dev("d1"), correlation_id="c-2")
        assert canceled.canceled == ["c-2"]
        rest = await c.cancel(env.dev("d1"))
        assert rest.canceled == ["c-1", "c-3"]
        assert await c.list_pending(env.dev("d1")) == []
    twin_doc = await env.wait_twin(
        env.dev("d1"), lambda t: not t.pending and len(t.recent_outcomes) == 3
    )
    assert {o.state for o in twin_doc.recent_outcomes} == {"canceled"}


async def test_wait_returns_the_outcome_the_gateway_records(env: Env) -> None:
    await env.register(env.dev("d1"))
    async with env.client() as c:

        async def device_answers() -> None:
            # as the gateway would: sent, then the device's answer
            async with asyncio.timeout(WAIT):
                while not (pending := await env.events(env.dev("d1"), "command-pending")):
                    await asyncio.sleep(0.02)
            cid = pending[0].correlation_id
            sent = ev.CommandSent(href="/light", gateway="gw", connection_id="k", attempt=1)
            await env.append(env.dev("d1"), sent, cid=cid)
            answer = ev.CommandSucceeded(href="/light", status="2.04", content={"value": True})
            await env.append(env.dev("d1"), answer, cid=cid)

        answering = asyncio.create_task(device_answers())
        outcome = await c.update(
            env.dev("d1"), "/light", {"value": True}, wait=True, wait_timeout=WAIT
        )
        await answering
        assert isinstance(outcome.data, ev.CommandSucceeded)
        assert outcome.data.status == "2.04"
        pending = await c.list_pending(env.dev("d1"))
        assert pending == []


async def test_a_request_repeated_after_its_command_ended_gets_that_outcome_never_a_new_command(
    env: Env,
) -> None:
    """Issue 11 item 4: the twin died between recording a command and replying, the command
    ran, and the client sends the request again with the same correlation id. The retry gets
    the original acceptance with its outcome (never "accepted" and then left to expire); the
    log holds one command; a different request under that id is a conflict."""
    device = env.dev("d1")
    await env.register(device)
    async with env.client() as c:
        first = await c.update(device, "/light", {"value": True}, correlation_id="r-1", ttl=45.5)
        sent = ev.CommandSent(href="/light", gateway="gw", connection_id="k", attempt=1)
        await env.append(device, sent, cid="r-1")
        done = ev.CommandSucceeded(href="/light", status="2.04", content={"value": True})
        done_at = await env.append(device, done, cid="r-1")
        await env.wait_twin(device, lambda t: any(o.position == done_at for o in t.recent_outcomes))

        again = await c.update(device, "/light", {"value": True}, correlation_id="r-1", ttl=45.5)
        assert isinstance(again, api.CommandAccepted)
        assert again.repeated and again.state == "succeeded"
        assert (again.position, again.expires_at) == (first.position, first.expires_at)
        assert again.outcome is not None and again.outcome.position == done_at
        outcome = await c.update(
            device, "/light", {"value": True}, correlation_id="r-1", ttl=45.5, wait=True
        )
        assert isinstance(outcome.data, ev.CommandSucceeded) and outcome.position == done_at
        with pytest.raises(ConflictError, match="differs in ttl"):
            await c.update(device, "/light", {"value": True}, correlation_id="r-1", ttl=30)
        with pytest.raises(ConflictError, match="differs in content"):
            await c.update(device, "/light", {"value": 1}, correlation_id="r-1", ttl=45.5)
        assert await c.list_pending(device) == []
    assert len(await env.events(device, "command-pending")) == 1


async def test_expiry_by_the_sweeper_for_a_device_that_never_comes_online(env: Env) -> None:
    await env.register(env.dev("offline-forever"))
    async with env.client() as c:
        started = time.monotonic()
        outcome = await c.retrieve(
            env.dev("offline-forever"), "/oic/d", ttl=1, wait=True, wait_timeout=WAIT
        )
        assert isinstance(outcome.data, ev.CommandExpired)
        assert time.monotonic() - started >= 0.9
        await c.update(env.dev("offline-forever"), "/a", {"x": 1}, ttl=1)
        await c.update(env.dev("offline-forever"), "/b", {"x": 1}, ttl=1)
    twin = await env.wait_twin(env.dev("offline-forever"), lambda t: len(t.recent_outcomes) == 3)
    assert twin.pending == () and twin.next_expiry is None
    assert [o.state for o in twin.recent_outcomes] == ["expired"] * 3
    expired = await env.events(env.dev("offline-forever"), "command-expired")
    assert len(expired) == 3  # once each, though the sweeper saw the twins several times


async def test_desired_state_delta_supersede_and_reached(env: Env) -> None:
    await env.register(env.dev("d1"))
    await env.append(
        env.dev("d1"), ev.ResourceChanged(href="/light", content={"value": False, "dim": 5})
    )
    async with env.client() as c:
        first = await c.set_desired(env.dev("d1"), "/light", {"value": True, "dim": 5})
        assert first.version == 1
        twin = await env.wait_twin(env.dev("d1"), lambda t: t.desired)
        assert twin.delta() == {"/light": {"value": True}}
        # the gateway issues an update for the delta; newer desired state supersedes it
        await env.append(
            env.dev("d1"),
            ev.CommandPending(
                href="/light", op="update", content={"value": True}, reason="desired"
            ),
            cid="desired-upd-1",
        )
        second = await c.set_desired(env.dev("d1"), "/light", {"value": True, "dim": 7})
        assert (second.version, second.superseded) == (2, ["desired-upd-1"])
        (canceled,) = await env.events(env.dev("d1"), "command-canceled")
        assert isinstance(canceled.data, ev.CommandCanceled)
        assert canceled.data.reason == "superseded"
        doc, _ = await c.get_twin(env.dev("d1"))
        assert doc["delta"] == [{"href": "/light", "content": {"value": True, "dim": 7}}]
        # the device reports the desired content: the delta empties and an event says so
        await env.append(
            env.dev("d1"), ev.ResourceChanged(href="/light", content={"value": True, "dim": 7})
        )
        reached_twin = await env.wait_twin(
            env.dev("d1"), lambda t: t.desired and t.desired[0].reached
        )
        assert reached_twin.delta() == {}
        (reached,) = await env.events(env.dev("d1"), "desired-reached")
        assert isinstance(reached.data, ev.DesiredReached) and reached.data.version == 2
        cleared = await c.clear_desired(env.dev("d1"), "/light")
        assert cleared.version == 3
    twin = await env.wait_twin(env.dev("d1"), lambda t: t.desired and t.desired[0].cleared)
    assert twin.to_json()["delta"] == []


async def test_list_pending_across_devices_and_list_devices(env: Env) -> None:
    for d in (env.dev("a"), env.dev("b")):
        await env.register(d)
    async with env.client() as c:
        await c.update(env.dev("a"), "/x", 1, correlation_id="1")
        await c.update(env.dev("b"), "/x", 2, correlation_id="2")
        await env.wait_twin(env.dev("b"), lambda t: t.pending)
        await env.wait_twin(env.dev("a"), lambda t: t.pending)
        listed = await c.list_pending()
        assert {(p.device_id, p.correlation_id) for p in listed} == {
            (env.dev("a"), "1"),
            (env.dev("b"), "2"),
        }
        devices = await c.list_devices()
        assert [d["device_id"] for d in devices.devices] == [env.dev("a"), env.dev("b")]
        assert devices.position >= 1


async def test_twins_with_64_bit_integers_are_served(env: Env) -> None:
    """A device's ``ts`` in nanoseconds comes back from the store as bson's Int64: the twin is
    still served (get and list), not an encoding failure with no reply at all."""
    device = env.dev("ns")
    await env.register(device)
    ts = time.time_ns()
    await env.append(device, ev.ResourceChanged(href="/light/1", content={"ts": ts, "n": 2**40}))
    await env.wait_twin(device, lambda t: t.resource("/light/1") is not None)
    async with env.client(timeout=5.0) as c:
        twin, _ = await c.get_twin(device)
        (resource,) = twin["resources"]
        assert resource["content"] == {"ts": ts, "n": 2**40}
        devices = await c.list_devices()
        assert devices.devices[0]["resources"][0]["content"]["ts"] == ts


# -- subscriptions ---------------------------------------------------------------------------


async def _changes(env: Env, device: str, values: Sequence[int]) -> list[int]:
    out = []
    for v in values:
        out.append(await env.append(device, ev.ResourceChanged(href="/n", content={"v": v})))
    return out


async def _take(sub: Any, n: int) -> list[AnyEvent]:
    out = []
    async with asyncio.timeout(WAIT):
        async for e in sub:
            out.append(e)
            if len(out) == n:
                break
    return out


async def test_resync_contract_subscribe_from_the_twins_position(env: Env) -> None:
    await env.register(env.dev("d1"))
    await env.register(env.dev("d2"))
    await _changes(env, env.dev("d1"), range(3))
    async with env.client() as c:
        _, position = await c.get_twin(env.dev("d1"))
        later = await _changes(env, env.dev("d1"), range(3, 6))
        await _changes(env, env.dev("d2"), range(2))  # another device: filtered out by the server
        sub = c.subscribe(
            env.owner, env.dev("d1"), types=["resource-changed"], from_position=position
        )
        async with sub:
            got = await _take(sub, 3)
        assert [e.position for e in got] == later
        assert [e.data.content for e in got] == [{"v": 3}, {"v": 4}, {"v": 5}]  # type: ignore[union-attr]


async def test_durable_subscription_survives_its_own_restart(env: Env) -> None:
    await env.register(env.dev("d1"))
    start = await env.store.last_position()
    positions = await _changes(env, env.dev("d1"), range(10))
    seen: list[int] = []
    async with env.client() as c:
        async with c.subscribe(
            env.owner, env.dev("d1"), from_position=start, durable=f"w-{env.owner}"
        ) as s:
            seen += [e.position or 0 for e in await _take(s, 4)]
        positions += await _changes(env, env.dev("d1"), range(10, 15))
        # a crash: the last event handed out is not acknowledged, it comes again
        s2 = c.subscribe(env.owner, env.dev("d1"), from_position=0, durable=f"w-{env.owner}")
        await s2.open()
        seen += [e.position or 0 for e in await _take(s2, 3)]
        await s2.close(ack=False)
    async with (
        env.client() as c2,  # another process, same name
        c2.subscribe(env.owner, env.dev("d1"), durable=f"w-{env.owner}") as s3,
    ):
        redelivered = await _take(s3, 1)
        assert redelivered[0].position == seen[-1]
        seen += [e.position or 0 for e in await _take(s3, len(positions) - len(seen))]
        assert await s3.next(timeout=0.3) is None
    assert seen == positions  # everything once, in order


async def test_subscription_and_api_survive_a_nats_restart(
    env: Env, nats_server: NatsServer
) -> None:
    await env.register(env.dev("d1"))
    start = await env.store.last_position()
    before = await _changes(env, env.dev("d1"), range(5))
    async with env.client() as c:
        async with c.subscribe(
            env.owner, env.dev("d1"), types=[ev.ResourceChanged], from_position=start
        ) as s:
            got = [e.position for e in await _take(s, 3)]
            await nats_server.stop()
            await nats_server.start()
            after: list[int] = []
            async with asyncio.timeout(WAIT):
                while not after:
                    with contextlib.suppress(Exception):
                        after = await _changes(env, env.dev("d1"), range(5, 10))
                    await asyncio.sleep(0.1)
            got += [e.position for e in await _take(s, 7)]
        assert got == before + after
        # the API answers again too (the service re-subscribed on reconnect)
        async with asyncio.timeout(WAIT):
            while True:
                try:
                    accepted = await c.retrieve(env.dev("d1"), "/oic/d")
                    break
                except Exception:
                    await asyncio.sleep(0.1)
        assert accepted.position > after[-1]


async def test_an_application_that_reconnects_before_the_callout_gets_in_once_it_is_back(
    env: Env, nats_server: NatsServer
) -> None:
    """NATS restarts while the auth callout is away: the application's reconnect is refused
    (no callout answers), and it does not give up: once a callout answers again, the same
    client is back, its subscription included."""
    await env.register(env.dev("d1"))
    start = await env.store.last_position()
    before = await _changes(env, env.dev("d1"), range(2))
    async with env.client() as c:
        async with c.subscribe(env.owner, env.dev("d1"), from_position=start) as s:
            got = [e.position for e in await _take(s, 2)]
            await env.bus.callout.__aexit__(None, None, None)
            try:
                await nats_server.stop()
                await nats_server.start()
                async with asyncio.timeout(WAIT):  # the server's authorization timeout (5 s)
                    while getattr(c.nc, "refusals", 0) == 0:
                        await asyncio.sleep(0.05)
                assert not c.nc.is_closed
            finally:
                await env.bus.callout.__aenter__()
            after = await _changes(env, env.dev("d1"), range(2, 4))
            got += [e.position for e in await _take(s, 2)]
        assert got == before + after
        assert (await c.retrieve(env.dev("d1"), "/oic/d")).position > after[-1]


# -- the CLI -------------------------------------------------------------------------------------


async def _twinhub(*args: str, env_vars: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "twinhub_cli.main",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env_vars or {})},
    )
    out, err = await asyncio.wait_for(proc.communicate(), WAIT)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_cli_commands_against_a_local_stack(
    bus: Bus, mongo_db: AsyncDatabase[Any], mongo_server: Any, tmp_path: Path
) -> None:
    """The app commands against a stack of ``twinhub up``: its data dir's key signs the
    ``--owner`` development tokens, which its auth callout admits and its API accepts."""
    data = DataDir(tmp_path / "data")
    data.write_stack(
        {"nats_url": bus.url, "mongo_url": mongo_server.url, "database": mongo_db.name}
    )
    async with (
        production_callout(bus, bus_config(bus), data),
        open_env(bus, mongo_db, issuer=data.issuer()) as env,
    ):
        await env.register(env.dev("d1"))
        dd = ("--data-dir", str(data.root), "--owner", env.owner)
        code, out, err = await _twinhub(
            "cmd", "update", env.dev("d1"), "/light", '{"value": true}', *dd
        )
        assert code == 0, err
        accepted = json.loads(out)
        assert accepted["device_id"] == env.dev("d1")
        code, out, err = await _twinhub(
            "cmd", "retrieve", env.dev("d1"), "/oic/d", "--ttl", "1", "--wait", *dd
        )
        assert code == 1, err  # not succeeded: printed the outcome
        assert json.loads(out)["type"] == ev.CommandExpired.TYPE
        code, out, err = await _twinhub("pending", "--device", env.dev("d1"), "--json", *dd)
        assert code == 0, err
        assert [json.loads(line)["correlation_id"] for line in out.splitlines()] == [
            accepted["correlation_id"]
        ]
        # into a pipe: the table's identifiers whole (issue 15), -o json as --json
        code, table, err = await _twinhub("pending", "--device", env.dev("d1"), *dd)
        assert code == 0, err
        (row,) = table.splitlines()[1:]
        assert row.split()[:5] == [
            env.dev("d1"),
            "/light",
            "update",
            "pending",
            accepted["correlation_id"],
        ]
        assert (await _twinhub("pending", "--device", env.dev("d1"), "-o", "json", *dd))[1] == out
        code, out, err = await _twinhub(
            "desired", "set", env.dev("d1"), "/light", '{"value": false}', *dd
        )
        assert (code, out.strip()) == (0, f"desired /light of {env.dev('d1')}: version 1"), err
        code, out, _ = await _twinhub("cmd", "cancel", env.dev("d1"), *dd)
        assert code == 0 and out.startswith("canceled 1 command(s)")
        code, out, err = await _twinhub(
            "cmd", "update", env.dev("d1"), "/light", "1", "--token", env.token(env.other), *dd[:2]
        )
        assert code == 1 and "forbidden" in err
        code, out, err = await _twinhub(
            "watch",
            "--owner",
            env.owner,
            "--device",
            env.dev("d1"),
            "--from",
            "0",
            "--count",
            "3",
            *dd[:2],
        )
        assert code == 0, err
        kinds = [json.loads(line)["type"] for line in out.splitlines()]
        assert kinds == [ev.DeviceRegistered.TYPE, ev.CommandPending.TYPE, ev.CommandPending.TYPE]


async def test_a_request_picked_up_after_its_callers_deadline_is_dropped(
    env: Env, nats_client: NatsClient
) -> None:
    """The caller gave up (Twinhub-Deadline passed): the command is not recorded and no answer
    comes, while a request whose caller still waits is served."""
    await env.register(env.dev("d1"))
    body = api.encode_request(
        api.UpdateResource(
            device_id=env.dev("d1"), href="/light", content={"v": 1}, correlation_id="late"
        )
    )
    subject = f"{env.prefix}.update"
    late = api.bearer(env.token(), deadline=time.time() - 1)
    with pytest.raises(nats.errors.TimeoutError):
        await nats_client.request(subject, body, 1.0, headers=late)
    on_time = api.bearer(env.token(), deadline=time.time() + 5)
    reply = api.decode_reply((await nats_client.request(subject, body, 5, headers=on_time)).data)
    assert reply.ok, reply.error
    (pending,) = await env.events(env.dev("d1"), "command-pending")  # only the one on time
    assert pending.correlation_id == "late"

"""The bus as an attacker meets it: the session's NATS server exactly as users run it, the real
auth callout, the command API on the production subjects.

Each attack of issue 9 is tried by ``mallory`` -- an application holding a valid token of her
own -- against ``bob``'s data, and must fail; anonymous clients, expired tokens, tokens signed
by an unknown key (and other tokens that are not application tokens) do not get in at all.
Every refusal is observed positively, never as "nothing came within a while": the server
reports a permission violation to the client (``-ERR``), which the tests wait for, or the
connection is refused. Each attack is paired with the legitimate use it resembles, which must
work, so that no test passes because nothing works.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import nats
import nats.errors
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from pymongo.asynchronous.database import AsyncDatabase

from auth.tokens import TokenIssuer
from eventstore.adapters.endpoint import NatsEndpoint
from eventstore.adapters.jetstream import JetStreamEventStore
from eventstore.layout import DEFAULT_STREAM
from proto import api, binding, subjects
from proto import events as ev
from tests.conftest import Bus
from tests.natsprobe import refused
from twin.adapters.mongo import MongoTwinStore
from twin.adapters.nats_api import NatsApiServer
from twin.api import ApiConfig, TwinApi
from twinhub_client import ForbiddenError, TwinhubClient

pytestmark = pytest.mark.servers

S = DEFAULT_STREAM
JS = api.APP_JS_PREFIX
PROJECTOR = "twin-projector"
WAIT = 10.0


@dataclass
class App:
    """A raw nats-py application connection and the errors the server sent it."""

    nc: NatsClient
    owner: str
    errors: asyncio.Queue[str] = field(default_factory=asyncio.Queue)

    @property
    def inbox(self) -> str:
        return subjects.owner_inbox_prefix(self.owner)

    async def violation(self, kind: str, subject: str) -> None:
        """Wait for the server's "Permissions Violation for <kind> to <subject>"."""
        want = f"permissions violation for {kind} to {subject}".lower()
        async with asyncio.timeout(WAIT):
            while True:
                got = (await self.errors.get()).lower()
                if want in got:
                    return

    async def denied_publish(self, subject: str, body: bytes = b"", reply: str = "") -> None:
        await self.nc.publish(subject, body, reply=reply)
        await self.violation("publish", f'"{subject}"')

    async def denied_subscribe(self, subject: str, queue: str = "") -> list[Msg]:
        got: list[Msg] = []

        async def on(msg: Msg) -> None:
            got.append(msg)

        await self.nc.subscribe(subject, queue=queue, cb=on)
        await self.violation("subscription", f'"{subject}"')
        return got

    async def request(self, subject: str, body: bytes = b"") -> dict[str, Any]:
        msg = await self.nc.request(subject, body, timeout=WAIT)
        out: dict[str, Any] = json.loads(msg.data)
        return out


@contextlib.asynccontextmanager
async def app(bus: Bus, owner: str, token: str | None = None) -> AsyncIterator[App]:
    errors: asyncio.Queue[str] = asyncio.Queue()

    async def on_error(exc: Exception) -> None:
        errors.put_nowait(str(exc))

    endpoint = NatsEndpoint(
        bus.url, token=token or bus.token(owner), inbox_prefix=subjects.owner_inbox_prefix(owner)
    )
    nc = await nats.connect(
        **endpoint.connect_options(),
        error_cb=on_error,
        allow_reconnect=False,
        max_reconnect_attempts=1,
        connect_timeout=WAIT,
    )
    try:
        yield App(nc, owner, errors)
    finally:
        await nc.close()


@dataclass
class World:
    bus: Bus
    admin: JetStreamEventStore
    bob: str
    mallory: str
    bob_device: str

    async def bob_event(self, value: int = 1) -> int:
        e: Any = ev.Event(
            owner=self.bob,
            device_id=self.bob_device,
            data=ev.ResourceChanged(href="/light/1", content={"value": value}, status="2.05"),
            source="/test/gateway",
        )
        return (await self.admin.append([binding.to_nats(e)])).last_position

    async def head(self) -> int:
        return await self.admin.last_position(subjects.ALL_EVENTS)

    async def js(self, op: str) -> dict[str, Any]:
        msg = await self.admin.request(f"$JS.API.{op}", b"", WAIT)
        out: dict[str, Any] = json.loads(msg.data)
        return out


@pytest.fixture
async def world(bus: Bus, mongo_db: AsyncDatabase[Any]) -> AsyncIterator[World]:
    """Bob's device with an event, the twin service's command API (twin role) and its
    projector consumer, mallory another owner."""
    tag = uuid.uuid4().hex[:8]
    bob, mallory = f"bob-{tag}", f"mallory-{tag}"
    async with (
        JetStreamEventStore.from_url(bus.admin) as admin,
        JetStreamEventStore.from_url(bus.endpoint("twin")) as twin_store,
    ):
        await twin_store.provision()
        await _ensure_projector(twin_store)
        twins = MongoTwinStore(mongo_db)
        await twins.ensure_indexes()
        twin_api = TwinApi(
            twin_store, twins, bus.validator(), ApiConfig(consumer_secret=os.urandom(32))
        )
        async with NatsApiServer(twin_store.connection, twin_api):
            w = World(bus, admin, bob, mallory, f"{bob}-dev")
            reg: Any = ev.Event(
                owner=bob, device_id=w.bob_device, data=ev.DeviceRegistered(), source="/test"
            )
            await admin.append([binding.to_nats(reg)])
            await w.bob_event()
            yield w


async def _ensure_projector(store: JetStreamEventStore) -> None:
    consumer = await store.consumer(PROJECTOR, (subjects.ALL_EVENTS,), start_after=0)
    await consumer.close()


# -- who gets in -----------------------------------------------------------------------------


async def test_anonymous_connections_are_refused(bus: Bus) -> None:
    why = await refused(bus.url)
    assert "authorization" in why.lower()


@pytest.mark.parametrize(
    "kind",
    ["expired", "unknown key", "garbage", "no exp", "too long", "device-bound", "refresh"],
)
async def test_tokens_that_are_not_valid_application_tokens_are_refused(
    bus: Bus, kind: str
) -> None:
    now = time.time()
    stranger = TokenIssuer(ec.generate_private_key(ec.SECP256R1()), kid="tests")
    token = {
        "expired": lambda: bus.issuer.issue("bob", now=now - 3600, ttl=60),
        "unknown key": lambda: stranger.issue("bob", now=now, ttl=600),
        "garbage": lambda: "not-a-jwt",
        "no exp": lambda: bus.issuer.issue("bob", now=now, ttl=None),
        "too long": lambda: bus.issuer.issue("bob", now=now, ttl=30 * 86400),
        "device-bound": lambda: bus.issuer.issue("bob", now=now, ttl=600, device_id="d1"),
        "refresh": lambda: bus.issuer.issue("bob", now=now, ttl=600, token_type="refresh"),
    }[kind]()
    before = bus.callout.stats.denied
    why = await refused(bus.url, token=token)
    assert "authorization" in why.lower()
    assert bus.callout.stats.denied == before + 1


async def test_a_valid_token_gets_in_and_is_counted(bus: Bus) -> None:
    before = bus.callout.stats.granted
    async with app(bus, "bob") as a:
        assert a.nc.is_connected
    assert bus.callout.stats.granted == before + 1


async def test_the_connection_ends_when_the_token_expires(bus: Bus) -> None:
    closed = asyncio.Event()

    async def on_closed() -> None:
        closed.set()

    token = bus.issuer.issue("bob", now=time.time(), ttl=2)
    nc = await nats.connect(
        bus.url,
        token=token,
        inbox_prefix=subjects.owner_inbox_prefix("bob"),
        allow_reconnect=False,
        closed_cb=on_closed,
        connect_timeout=WAIT,
    )
    try:
        async with asyncio.timeout(WAIT):
            await closed.wait()  # the server disconnects it when the user JWT expires
    finally:
        await nc.close()


async def test_with_the_callout_down_nobody_new_gets_in(bus: Bus) -> None:
    async with app(bus, "bob") as before:  # admitted while it ran: stays connected
        await bus.callout.__aexit__(None, None, None)
        try:
            assert not bus.callout.ready
            await refused(bus.url, token=bus.token("bob"))
            assert before.nc.is_connected
            # the services are not behind the callout
            svc = await nats.connect(**bus.endpoint("gateway").connect_options())
            try:
                await svc.flush(timeout=WAIT)
            finally:
                await svc.close()
        finally:
            await bus.callout.__aenter__()
    assert bus.callout.ready
    async with app(bus, "bob") as after:
        assert after.nc.is_connected


# -- reading another owner's data ------------------------------------------------------------


async def test_live_events_only_of_the_own_owner(world: World) -> None:
    async with app(world.bus, world.bob) as bob, app(world.bus, world.mallory) as mallory:
        got_bob: asyncio.Queue[Msg] = asyncio.Queue()

        async def on_bob(msg: Msg) -> None:
            got_bob.put_nowait(msg)

        await bob.nc.subscribe(f"twinhub.ev.{world.bob}.>", cb=on_bob)
        for subject in ("twinhub.ev.>", f"twinhub.ev.{world.bob}.>", ">", "twinhub.>"):
            stolen = await mallory.denied_subscribe(subject)
            await bob.nc.flush()
            await world.bob_event()
            async with asyncio.timeout(WAIT):
                await got_bob.get()  # bob hears his own event...
            await mallory.nc.flush()
            assert stolen == []  # ...mallory's subscription never does


async def test_consumers_only_on_the_own_subjects(world: World) -> None:
    create = f"{JS}.CONSUMER.CREATE.{S}"
    body = {"stream_name": S, "config": {"name": "c1", "ack_policy": "explicit"}}
    async with app(world.bus, world.mallory) as mallory:
        for filt in (
            f"twinhub.ev.{world.bob}.>",
            "twinhub.ev.>",
            f"twinhub.ev.*.{world.bob_device}.>",
        ):
            cfg = body | {"config": body["config"] | {"filter_subject": filt}}
            await mallory.denied_publish(
                f"{create}.c1.{filt}", json.dumps(cfg).encode(), reply=f"{mallory.inbox}.x"
            )
        # the unfiltered create subject (any filter in the body, or several) is not hers
        cfg = body | {"config": body["config"] | {"filter_subjects": [f"twinhub.ev.{world.bob}.>"]}}
        await mallory.denied_publish(f"{create}.c1", json.dumps(cfg).encode(), f"{mallory.inbox}.x")
        # the filter in the body must be the one in the subject: the server checks
        own = f"twinhub.ev.{world.mallory}.>"
        cfg = body | {"config": body["config"] | {"filter_subject": f"twinhub.ev.{world.bob}.>"}}
        answer = await mallory.request(f"{create}.c1.{own}", json.dumps(cfg).encode())
        assert "error" in answer, answer
        # what she may: a consumer of her own events
        cfg = body | {"config": body["config"] | {"filter_subject": own}}
        answer = await mallory.request(f"{create}.c1.{own}", json.dumps(cfg).encode())
        assert answer["config"]["filter_subject"] == own
        assert (await mallory.request(f"{JS}.CONSUMER.DELETE.{S}.c1"))["success"] is True


async def test_no_stream_reads_direct_gets_or_listings(world: World) -> None:
    async with app(world.bus, world.mallory) as mallory:
        get = json.dumps({"last_by_subj": f"twinhub.ev.{world.bob}.>"}).encode()
        for prefix in ("$JS.API", JS):
            await mallory.denied_publish(f"{prefix}.STREAM.MSG.GET.{S}", get, f"{mallory.inbox}.x")
            await mallory.denied_publish(f"{prefix}.DIRECT.GET.{S}", get, f"{mallory.inbox}.x")
            await mallory.denied_publish(
                f"{prefix}.DIRECT.GET.{S}.twinhub.ev.{world.bob}.>", b"", f"{mallory.inbox}.x"
            )
            for op in (f"STREAM.INFO.{S}", f"CONSUMER.LIST.{S}", f"CONSUMER.NAMES.{S}", "INFO"):
                await mallory.denied_publish(f"{prefix}.{op}", b"{}", f"{mallory.inbox}.x")


async def test_the_client_library_refuses_another_owners_subscription(world: World) -> None:
    async with TwinhubClient(world.bus.url, world.bus.token(world.mallory)) as mallory:
        with pytest.raises(ForbiddenError):
            async with mallory.subscribe(world.bob):
                pass


async def test_the_projectors_consumer_is_out_of_reach(world: World) -> None:
    async with app(world.bus, world.mallory) as mallory:
        for op in ("INFO", "DELETE", "MSG.NEXT"):
            subject = f"{JS}.CONSUMER.{op}.{S}.{PROJECTOR}"
            await mallory.denied_publish(subject, b"", f"{mallory.inbox}.x")
        own = f"twinhub.ev.{world.mallory}.>"
        cfg = {"stream_name": S, "config": {"name": PROJECTOR, "filter_subject": own}}
        await mallory.denied_publish(
            f"{JS}.CONSUMER.CREATE.{S}.{PROJECTOR}.{own}",
            json.dumps(cfg).encode(),
            f"{mallory.inbox}.x",
        )
        await mallory.denied_publish(f"$JS.ACK.{S}.{PROJECTOR}.1.1.1.1.1", b"")
    info = await world.js(f"CONSUMER.INFO.{S}.{PROJECTOR}")
    assert info.get("name") == PROJECTOR, info


# -- writing into the log ----------------------------------------------------------------------


async def test_no_publish_into_the_log(world: World) -> None:
    head = await world.head()
    forged: Any = ev.Event(
        owner=world.bob,
        device_id=world.bob_device,
        data=ev.DeviceRegistered(),
        source="/mallory",
    )
    msg = binding.to_nats(forged)
    async with app(world.bus, world.mallory) as mallory:
        await mallory.denied_publish(msg.subject, msg.data)
        await mallory.denied_publish(msg.subject, msg.data, reply=f"{mallory.inbox}.ack")
        await mallory.denied_publish(f"twinhub.ev.{world.mallory}.d.device-registered", b"{}")
        # a reply subject inside the log: the request crosses into twinhub's account with its
        # reply rewritten, so the API's answer never lands in the stream
        answer = await mallory.nc.request(
            f"{api.API_PREFIX}.devices-list",
            b"{}",
            timeout=WAIT,
            headers=api.bearer(world.bus.token(world.mallory)),
        )
        assert api.decode_reply(answer.data).ok
        await mallory.nc.publish(
            f"{api.API_PREFIX}.devices-list",
            b"{}",
            reply=msg.subject,
            headers=api.bearer(world.bus.token(world.mallory)),
        )
        # a second request after it: the service has had the first one by the time it answers
        await mallory.request(f"{api.API_PREFIX}.devices-list")
    assert await world.head() == head


async def test_no_damage_to_the_stream(world: World) -> None:
    async with app(world.bus, world.mallory) as mallory:
        for prefix in ("$JS.API", JS):
            for op in (f"STREAM.PURGE.{S}", f"STREAM.DELETE.{S}", f"STREAM.UPDATE.{S}"):
                await mallory.denied_publish(f"{prefix}.{op}", b"{}", f"{mallory.inbox}.x")
    info = await world.js(f"STREAM.INFO.{S}")
    assert info["state"]["messages"] > 0, info


@pytest.mark.parametrize("role", ["gateway", "twin"])
async def test_services_cannot_destroy_the_stream_either(world: World, role: str) -> None:
    errors: asyncio.Queue[str] = asyncio.Queue()

    async def on_error(exc: Exception) -> None:
        errors.put_nowait(str(exc))

    endpoint = world.bus.endpoint(role)  # type: ignore[arg-type]
    nc = await nats.connect(**endpoint.connect_options(), error_cb=on_error)
    try:
        svc = App(nc, role, errors)
        for op in (f"STREAM.PURGE.{S}", f"STREAM.DELETE.{S}"):
            await svc.denied_publish(f"$JS.API.{op}", b"{}", f"_INBOX.{role}.x")
        if role == "gateway":  # only the twin service provisions the stream and its projector
            await svc.denied_publish(f"$JS.API.STREAM.CREATE.{S}", b"{}", "_INBOX.gateway.x")
            await svc.denied_publish(
                f"$JS.API.CONSUMER.DELETE.{S}.{PROJECTOR}", b"", "_INBOX.gateway.x"
            )
    finally:
        await nc.close()
    assert (await world.js(f"STREAM.INFO.{S}"))["state"]["messages"] > 0


# -- intercepting the API ----------------------------------------------------------------------


async def test_no_listening_to_or_answering_others_requests(world: World) -> None:
    async with app(world.bus, world.mallory) as mallory, app(world.bus, world.bob) as bob:
        stolen = await mallory.denied_subscribe(f"{api.API_PREFIX}.>")
        stolen += await mallory.denied_subscribe(f"{api.API_PREFIX}.>", queue="twinhub-twin-api")
        stolen += await mallory.denied_subscribe("_INBOX.>")
        stolen += await mallory.denied_subscribe(f"{subjects.owner_inbox_prefix(world.bob)}.>")
        # replies go only to the own inbox prefix
        await mallory.denied_subscribe("_INBOX.*.>")
        for _ in range(5):  # every request reaches the real service, which answers bob
            msg = await bob.nc.request(
                f"{api.API_PREFIX}.twin-get",
                json.dumps({"device_id": world.bob_device}).encode(),
                timeout=WAIT,
                headers=api.bearer(world.bus.token(world.bob)),
            )
            assert api.decode_reply(msg.data).ok
        await mallory.nc.flush()
        assert stolen == []


async def test_the_api_refuses_another_owners_device(world: World) -> None:
    async with TwinhubClient(world.bus.url, world.bus.token(world.mallory)) as mallory:
        with pytest.raises(ForbiddenError):
            await mallory.get_twin(world.bob_device)
        with pytest.raises(ForbiddenError):
            await mallory.update(world.bob_device, "/light/1", {"value": 0})


# -- what an application may do, all of it -----------------------------------------------------


async def test_everything_an_application_may_do(world: World) -> None:
    """Request the API, hear its own events, and run a consumer of its own events: create
    (filtered), pull, acknowledge, inspect, delete."""
    own = f"twinhub.ev.{world.bob}.>"
    async with app(world.bus, world.bob) as bob:
        reply = await bob.nc.request(
            f"{api.API_PREFIX}.session",
            b"{}",
            timeout=WAIT,
            headers=api.bearer(world.bus.token(world.bob)),
        )
        session = api.decode_reply(reply.data).result
        assert session["owner"] == world.bob and session["inbox_prefix"] == bob.inbox
        name = f"c{uuid.uuid4().hex[:10]}"
        cfg = {
            "stream_name": S,
            "config": {
                "name": name,
                "filter_subject": own,
                "ack_policy": "explicit",
                "deliver_policy": "all",
                "inactive_threshold": 60_000_000_000,
            },
        }
        created = await bob.request(
            f"{JS}.CONSUMER.CREATE.{S}.{name}.{own}", json.dumps(cfg).encode()
        )
        assert created["name"] == name, created
        inbox = f"{bob.inbox}.pull"
        pulled: asyncio.Queue[Msg] = asyncio.Queue()

        async def on(msg: Msg) -> None:
            pulled.put_nowait(msg)

        await bob.nc.subscribe(inbox, cb=on)
        await bob.nc.publish(
            f"{JS}.CONSUMER.MSG.NEXT.{S}.{name}", json.dumps({"batch": 1}).encode(), reply=inbox
        )
        async with asyncio.timeout(WAIT):
            msg = await pulled.get()
        assert msg.subject.startswith(f"twinhub.ev.{world.bob}."), msg.subject
        await msg.ack_sync(timeout=WAIT)
        info = await bob.request(f"{JS}.CONSUMER.INFO.{S}.{name}")
        assert info["ack_floor"]["stream_seq"] >= 1, info
        assert (await bob.request(f"{JS}.CONSUMER.DELETE.{S}.{name}"))["success"] is True


# -- the callout's health --------------------------------------------------------------------


async def _http(url: str) -> tuple[int, str]:
    import urllib.error
    import urllib.request

    def get() -> tuple[int, str]:
        try:
            with urllib.request.urlopen(url, timeout=WAIT) as r:
                return int(r.status), r.read().decode()
        except urllib.error.HTTPError as e:
            return int(e.code), e.read().decode()

    return await asyncio.to_thread(get)


async def _until_status(url: str, status: int) -> str:
    async with asyncio.timeout(WAIT):
        while True:
            code, body = await _http(url)
            if code == status:
                return body
            await asyncio.sleep(0.05)


async def test_the_callouts_readiness_and_metrics(bus: Bus) -> None:
    from twinhub_cli import config as cfgmod
    from twinhub_cli.observability import ObservabilityConfig
    from twinhub_cli.services import callout_observability

    config = cfgmod.load(None, env={}, overrides={"callout": {"metrics_listen": "127.0.0.1:0"}})
    obs = ObservabilityConfig(probe_interval=0.05, probe_timeout=1.0)
    async with callout_observability(config, bus.callout, obs) as ops:
        assert ops is not None
        await _until_status(f"{ops.url}/readyz", 200)
        await refused(bus.url, token="not-a-token")
        metrics = (await _http(f"{ops.url}/metrics"))[1]
        assert "twinhub_callout_ready 1.0" in metrics
        denied = [
            ln for ln in metrics.splitlines() if ln.startswith("twinhub_callout_denied_total")
        ]
        assert denied and float(denied[0].split()[-1]) >= 1
        await bus.callout.__aexit__(None, None, None)
        try:
            body = await _until_status(f"{ops.url}/readyz", 503)
            assert "callout" in body
            assert "twinhub_callout_ready 0.0" in (await _http(f"{ops.url}/metrics"))[1]
        finally:
            await bus.callout.__aenter__()
        await _until_status(f"{ops.url}/readyz", 200)

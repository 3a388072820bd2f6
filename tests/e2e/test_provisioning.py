"""Provisioning of simple devices end to end on real servers: the twin's command API served on
NATS with the token registry on JetStream (TWINHUB_DEVICE_TOKENS), the client, the projector
into MongoDB (FerretDB), and ``twinhub provision`` against a local stack.

The registry is read here as the gateway reads it (the gateway role, one direct get of the last
record on a token's hash subject): what the simple-device endpoint will accept.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from pymongo.asynchronous.database import AsyncDatabase

from auth.application import AppTokenValidator
from auth.tokens import TokenIssuer
from eventstore.adapters.jetstream import JetStreamEventStore
from proto import binding, subjects
from proto import events as ev
from proto.devtokens import TokenRecord, decode_record, token_hash, token_id, token_subject
from proto.events import AnyEvent
from twin.adapters.mongo import MongoTwinStore
from twin.adapters.nats_api import NatsApiServer
from twin.adapters.token_registry import LogTokenRegistry
from twin.api import ApiConfig, TwinApi
from twin.model import SIMPLE_PROFILE, Twin
from twin.service import ProjectorConfig, TwinProjector
from twinhub_cli.datadir import DataDir
from twinhub_cli.services import TOKEN_LAYOUT
from twinhub_client import ConflictError, ForbiddenError, NotFoundError, TwinhubClient

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
    store: JetStreamEventStore  # the twin service's
    gateway_tokens: JetStreamEventStore  # the registry as the gateway's role sees it
    twins: MongoTwinStore
    issuer: TokenIssuer

    def dev(self, name: str) -> str:
        return f"{self.owner}-{name}"

    def client(self, owner: str | None = None) -> TwinhubClient:
        token = self.issuer.issue(owner or self.owner, now=time.time(), ttl=600)
        return TwinhubClient(self.bus.url, token)

    async def record(self, token: str) -> TokenRecord | None:
        """The registry's record of ``token``, read with the gateway's credentials."""
        stored = await self.gateway_tokens.last_message(token_subject(token))
        return None if stored is None else decode_record(stored.message.data)

    async def events(self, device: str) -> list[AnyEvent]:
        return [
            binding.from_stored(m) async for m in self.store.read(subjects.device_scope(device))
        ]

    async def wait_twin(self, device: str, cond: Any) -> Twin:
        async with asyncio.timeout(WAIT):
            while True:
                t = await self.twins.get(device)
                if t is not None and cond(t):
                    return t
                await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def open_env(
    bus: Bus, db: AsyncDatabase[Any], *, issuer: TokenIssuer | None = None
) -> AsyncIterator[Env]:
    owner = "o" + uuid.uuid4().hex[:10]
    issuer = issuer or bus.issuer
    projector_name = f"p-{owner}"
    async with (
        JetStreamEventStore.from_url(bus.endpoint("twin")) as store,
        JetStreamEventStore.from_url(bus.endpoint("gateway")) as gateway_store,
    ):
        await store.provision()
        async with (
            JetStreamEventStore(store.connection, TOKEN_LAYOUT) as tokens,
            JetStreamEventStore(gateway_store.connection, TOKEN_LAYOUT) as gateway_tokens,
        ):
            await tokens.provision()  # the twin role provisions the registry
            twins = MongoTwinStore(db)
            await twins.ensure_indexes()
            cfg = ProjectorConfig(name=projector_name, filter_subject=subjects.event_filter(owner))
            twin_api = TwinApi(
                store,
                twins,
                AppTokenValidator(issuer.public_keys),
                ApiConfig(projector=projector_name, consumer_secret=os.urandom(32)),
                tokens=LogTokenRegistry(tokens),
            )
            async with (
                TwinProjector(twins, store, cfg),
                NatsApiServer(store.connection, twin_api),
            ):
                yield Env(owner, "x" + owner, bus, store, gateway_tokens, twins, issuer)


@pytest.fixture
async def env(bus: Bus, mongo_db: AsyncDatabase[Any]) -> AsyncIterator[Env]:
    async with open_env(bus, mongo_db) as e:
        yield e


async def test_provision_rotate_revoke(env: Env) -> None:
    device = env.dev("boiler")
    async with env.client() as c:
        got = await c.provision(device, "boiler")
        assert got.device_id == device and got.token_id == token_id(got.token)
        assert len(got.token) >= 32  # 192 random bits, URL-safe base64
        record = await env.record(got.token)
        assert record is not None
        assert (record.owner, record.device_id, record.state, record.profile) == (
            env.owner,
            device,
            "active",
            SIMPLE_PROFILE,
        )
        (provisioned,) = await env.events(device)
        assert provisioned.position == got.position
        assert provisioned.owner == env.owner
        assert isinstance(provisioned.data, ev.DeviceProvisioned)
        assert provisioned.data.token_hash == token_hash(got.token)
        assert got.token.encode() not in binding.to_nats(provisioned).data
        twin = await env.wait_twin(device, lambda t: t.position >= got.position)
        assert (twin.owner, twin.profile, twin.name, twin.token_hash) == (
            env.owner,
            SIMPLE_PROFILE,
            "boiler",
            token_hash(got.token),
        )
        view, _ = await c.get_twin(device)
        assert (view["profile"], view["name"], view["token_id"]) == (
            SIMPLE_PROFILE,
            "boiler",
            got.token_id,
        )

        with pytest.raises(ConflictError):
            await c.provision(device)

        rotated = await c.rotate_token(device)
        assert rotated.token != got.token
        old, new = await env.record(got.token), await env.record(rotated.token)
        assert old is not None and old.state == "revoked"
        assert new is not None and (new.state, new.device_id) == ("active", device)

        revoked = await c.revoke_token(device)
        assert revoked.token_id == rotated.token_id and revoked.position is not None
        gone = await env.record(rotated.token)
        assert gone is not None and gone.state == "revoked"
        changes = [e.data for e in await env.events(device)][1:]
        assert [
            (d.reason, d.token_hash) for d in changes if isinstance(d, ev.DeviceTokenChanged)
        ] == [
            ("rotated", token_hash(rotated.token)),
            ("revoked", ""),
        ]
        twin = await env.wait_twin(device, lambda t: t.position >= (revoked.position or 0))
        assert twin.token_hash == ""

        generated = await c.provision()
        uuid.UUID(generated.device_id)


async def test_another_owner_can_neither_revoke_nor_rotate(env: Env) -> None:
    device = env.dev("mine")
    async with env.client() as mine, env.client(env.other) as theirs:
        got = await mine.provision(device)
        with pytest.raises(ForbiddenError):
            await theirs.revoke_token(device)
        with pytest.raises(ForbiddenError):
            await theirs.rotate_token(device)
        with pytest.raises(ConflictError):
            await theirs.provision(device)  # nor take the id over
        with pytest.raises(NotFoundError):
            await theirs.revoke_token(env.dev("nobody"))
    record = await env.record(got.token)
    assert record is not None and (record.state, record.owner) == ("active", env.owner)
    assert [e.kind for e in await env.events(device)] == ["device-provisioned"]


async def test_racing_provisionings_of_one_id_make_one_device(env: Env) -> None:
    device = env.dev("raced")
    async with env.client() as c:
        results = await asyncio.gather(
            *(c.provision(device) for _ in range(4)), return_exceptions=True
        )
        won = [r for r in results if not isinstance(r, BaseException)]
        assert len(won) == 1, results
        assert all(isinstance(r, ConflictError) for r in results if r not in won)
    (provisioned,) = await env.events(device)
    assert isinstance(provisioned.data, ev.DeviceProvisioned)
    assert provisioned.data.token_hash == token_hash(won[0].token)


async def _twinhub(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "twinhub_cli.main",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=dict(os.environ),
    )
    out, err = await asyncio.wait_for(proc.communicate(), WAIT)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_cli_provision_against_a_local_stack(
    bus: Bus, mongo_db: AsyncDatabase[Any], mongo_server: Any, tmp_path: Path
) -> None:
    """``twinhub provision`` against a stack of ``twinhub up`` (its data dir's key signs the
    ``--owner`` development tokens, which its auth callout admits and its API accepts)."""
    data = DataDir(tmp_path / "data")
    data.write_stack(
        {"nats_url": bus.url, "mongo_url": mongo_server.url, "database": mongo_db.name}
    )
    async with (
        production_callout(bus, bus_config(bus), data),
        open_env(bus, mongo_db, issuer=data.issuer()) as env,
    ):
        dd = ("--data-dir", str(data.root), "--owner", env.owner)
        device = env.dev("cli")
        code, out, err = await _twinhub("provision", *dd, "--device", device, "--json")
        assert code == 0, err
        printed = json.loads(out)
        assert printed["device"] == device
        record = await env.record(printed["token"])
        assert record is not None and (record.device_id, record.state) == (device, "active")

        code, out, err = await _twinhub("provision", "--name", "n", *dd)
        assert code == 0, err
        token = out.splitlines()[-1]  # the last line is the access token
        record = await env.record(token)
        assert record is not None and record.owner == env.owner

        code, out, err = await _twinhub("provision", "rotate", device, *dd)
        assert code == 0, err
        rotated = out.splitlines()[-1]
        old, new = await env.record(printed["token"]), await env.record(rotated)
        assert old is not None and old.state == "revoked"
        assert new is not None and new.state == "active"

        code, out, err = await _twinhub("provision", "revoke", device, *dd)
        assert (code, out.strip()) == (0, f"revoked token {token_id(rotated)} of device {device}")
        new = await env.record(rotated)
        assert new is not None and new.state == "revoked"

        code, out, err = await _twinhub("provision", *dd, "--device", device)
        assert code == 1 and "conflict" in err

"""A 3-node nats-server cluster on loopback (``twinhub up --nats-cluster 3``): the event log is
replicated on every member, survives the SIGKILL of its leader without losing an acknowledged
event or storing one twice, and the cluster keeps the bus security of a single server (no
anonymous client, routes only with the route password).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import socket
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import nats
import pytest

from bus.permissions import ROLES
from eventstore.adapters.jetstream import JetStreamEventStore
from eventstore.errors import UnavailableError
from eventstore.layout import DEFAULT_STREAM, StreamLayout
from proto import subjects
from proto.devtokens import TOKEN_STREAM
from proto.leases import LEASE_STREAM
from proto.message import NatsMessage, StoredMessage
from tests.natsprobe import refused
from twinhub_cli import config as cfgmod
from twinhub_cli import services
from twinhub_cli.config import ConfigError
from twinhub_cli.datadir import DataDir
from twinhub_cli.devservices import NatsCluster, NatsServer
from twinhub_cli.main import build_parser

pytestmark = pytest.mark.servers

DEADLINE = 20.0  # seconds any awaited condition gets (a leader election takes a few)
_seq = itertools.count(1)


async def _until(
    what: str, check: Callable[[], Awaitable[bool]], timeout: float = DEADLINE
) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        if loop.time() > deadline:
            raise AssertionError(f"not within {timeout:g}s: {what}")
        await asyncio.sleep(0.05)


async def _stream_info(store: JetStreamEventStore, stream: str | None = None) -> dict[str, Any]:
    name = stream or store.layout.name
    reply = await store.request(f"$JS.API.STREAM.INFO.{name}", b"", timeout=2.0)
    info: dict[str, Any] = json.loads(reply.data)
    return info


def _peers(info: dict[str, Any]) -> dict[str, bool]:
    """Each member holding the stream -> whether it is current (the leader is)."""
    cluster = info.get("cluster") or {}
    peers = {r["name"]: bool(r.get("current")) for r in cluster.get("replicas") or ()}
    if cluster.get("leader"):
        peers[cluster["leader"]] = True
    return peers


def _event(device: str) -> NatsMessage:
    n = next(_seq)
    return NatsMessage(
        subject=subjects.event_subject("o1", device, "resource-changed", "/r"),
        msg_id=f"{uuid.uuid4()}",
        data=f'{{"n":{n}}}'.encode(),
    )


async def _append_until_acked(
    store: JetStreamEventStore, batch: list[NatsMessage], acked: dict[str, int]
) -> None:
    """Append ``batch`` until JetStream acknowledges it, the same messages (ids) each time,
    as the gateway does; record each message's acknowledged position."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE
    while True:
        try:
            result = await store.append(batch)
        except UnavailableError:
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.05)
            continue
        for m, pos in zip(batch, result.positions, strict=True):
            acked[m.msg_id] = pos
        return


async def test_the_replicated_log_survives_its_leader_killed(nats_cluster: NatsCluster) -> None:
    layout = StreamLayout(replicas=nats_cluster.replicas)
    by_name = {m.server_name: m for m in nats_cluster.members}
    assert len(by_name) == 3
    acked: dict[str, int] = {}  # msg id -> the position JetStream acknowledged
    async with (
        JetStreamEventStore.from_url(nats_cluster.endpoint("twin"), layout, timeout=2.0) as twin,
        JetStreamEventStore.from_url(
            nats_cluster.endpoint("gateway"), layout, timeout=2.0
        ) as gateway,
    ):
        await twin.provision()
        info = await _stream_info(twin)
        assert info["config"]["num_replicas"] == 3
        assert info["cluster"]["name"] == "twinhub"
        every_replica_current = _all_current(twin, set(by_name))
        await _until("3 current replicas", every_replica_current)
        leader = by_name[(await _stream_info(twin))["cluster"]["leader"]]

        for i in range(20):
            await _append_until_acked(gateway, [_event(f"d{i % 4}") for _ in range(10)], acked)

        # appends go on while the stream's leader dies, and after
        killed_at: list[int] = []

        async def writer() -> None:
            i = 0
            while not (killed_at and len(acked) >= killed_at[0] + 200):
                await _append_until_acked(gateway, [_event(f"d{i % 4}") for _ in range(10)], acked)
                i += 1

        task = asyncio.create_task(writer())
        before = len(acked)
        await _until("appends under way", lambda: _now(len(acked) >= before + 50))
        await leader.kill()
        killed_at.append(len(acked))
        await asyncio.wait_for(task, DEADLINE)

        async def new_leader() -> bool:
            try:
                current = ((await _stream_info(twin)).get("cluster") or {}).get("leader")
            except (nats.errors.Error, OSError):
                return False
            return current is not None and current != leader.server_name

        await _until("a new stream leader", new_leader)

        # a conditional append (how a device's events keep their order) still works
        scope = subjects.device_scope("d0")
        last = await gateway.last_position(scope)
        conditional = _event("d0")
        result = await gateway.append([conditional], expected_last=last, scope=scope)
        acked[conditional.msg_id] = result.last_position

        # every acknowledged event is in the log once, at its acknowledged position
        stored = await _read_through(twin, max(acked.values()))
        positions = [s.position for s in stored]
        assert positions == sorted(set(positions))
        ids = [s.message.msg_id for s in stored]
        assert len(ids) == len(set(ids)), "an event stored twice"
        at = {s.message.msg_id: s.position for s in stored}
        assert {m: at.get(m) for m in acked} == acked
        assert len(acked) > killed_at[0] + 200

        # the killed member comes back and catches up
        await leader.start()
        await _until("3 current replicas again", every_replica_current)


async def _read_through(store: JetStreamEventStore, last: int) -> list[StoredMessage]:
    """The whole log, once a read reaches position ``last``. Retried: while the cluster
    settles a read may fail (its consumer is created through the JetStream meta leader, which
    may have been on the killed member), and a read's direct gets may be answered by a
    replica that has not applied the newest acknowledged messages yet (reads on a cluster are
    not read-your-writes)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE
    while True:
        try:
            stored = [s async for s in store.read()]
        except UnavailableError:
            stored = []
        if stored and stored[-1].position >= last:
            return stored
        if loop.time() > deadline:
            end = stored[-1].position if stored else 0
            raise AssertionError(f"a read of the log ends at {end}, not at {last}")
        await asyncio.sleep(0.05)


async def _now(value: bool) -> bool:
    return value


def _all_current(store: JetStreamEventStore, names: set[str]) -> Callable[[], Awaitable[bool]]:
    """Whether the stream is on exactly ``names``, every replica current."""

    async def check() -> bool:
        try:
            peers = _peers(await _stream_info(store))
        except (nats.errors.Error, OSError):
            return False
        return set(peers) == names and all(peers.values())

    return check


async def test_the_cluster_has_the_bus_security_of_one_server(nats_cluster: NatsCluster) -> None:
    await asyncio.gather(*(refused(m.url, connect_timeout=5) for m in nats_cluster.members))
    for member in nats_cluster.members:
        conf = json.loads(member.config_path.read_text())
        assert "no_auth_user" not in conf and "users" not in conf.get("authorization", {})
        assert conf["authorization"]["auth_callout"]["auth_users"]
        assert conf["cluster"]["authorization"]["user"]
        assert member.config_path.stat().st_mode & 0o077 == 0  # holds the route password
    for role in ROLES:
        nc = await nats.connect(**nats_cluster.endpoint(role).connect_options())
        try:
            await nc.flush()
        finally:
            await nc.close()


async def _route_handshake(port: int, connect: dict[str, Any]) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        info = await asyncio.wait_for(reader.readline(), 5)
        assert info.startswith(b"INFO ")
        writer.write(b"CONNECT " + json.dumps(connect).encode() + b"\r\nPING\r\n")
        await writer.drain()
        return await asyncio.wait_for(reader.readline(), 5)
    finally:
        writer.close()
        await writer.wait_closed()


async def test_a_route_needs_the_route_password(nats_cluster: NatsCluster) -> None:
    member = nats_cluster.members[0]
    assert member.cluster is not None
    port = member.cluster.listen_port
    base = {"verbose": False, "pedantic": False, "tls_required": False, "name": "intruder"}
    for creds in ({}, {"user": "twinhub-route", "pass": "wrong-password-of-16+"}):
        answer = await _route_handshake(port, {**base, **creds})
        assert answer.startswith(b"-ERR 'Authorization Violation'"), answer


async def test_a_server_with_the_wrong_route_password_does_not_join(
    nats_cluster: NatsCluster, tmp_path: Path
) -> None:
    """A server configured with another route password is refused by the members."""
    first = nats_cluster.members[0]
    assert first.cluster is not None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = int(s.getsockname()[1])
    intruder = NatsServer(
        tmp_path / "intruder",
        credentials=nats_cluster.credentials,
        cluster=dataclasses.replace(
            first.cluster, listen_port=free, password="not-the-cluster-route-password"
        ),
        server_name="twinhub-intruder",
    )
    intruder.data_dir.mkdir(parents=True)
    # not intruder.start(): it is never ready (its JetStream finds no quorum)
    proc = await asyncio.create_subprocess_exec(
        str(intruder.binary),
        *("-c", str(intruder.write_config()), "-js", "-sd", str(intruder.data_dir)),
        *("-a", "127.0.0.1", "-p", "-1", "-l", str(intruder.log_path)),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:

        async def refused_by_every_member() -> bool:
            logs = [m.log_path.read_text(errors="replace") for m in nats_cluster.members]
            own = (
                intruder.log_path.read_text(errors="replace") if intruder.log_path.exists() else ""
            )
            return "Authorization Violation" in own and all(
                'authentication error - User "twinhub-route"' in t for t in logs
            )

        await _until("the intruder's routes refused by every member", refused_by_every_member)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


async def test_the_twin_service_replicates_its_streams_and_never_scales_one_down(
    nats_cluster: NatsCluster, tmp_path: Path
) -> None:
    """What ``twinhub up --nats-cluster 3`` configures (nats.url: every member, nats.replicas
    3): the twin service creates the log, the lease and the token streams with 3 replicas; a
    process configured for 1 replica (an admin command with the defaults) keeps them 3."""
    env = {
        "TWINHUB_NATS_URL": nats_cluster.url,
        "TWINHUB_NATS_CREDENTIALS": str(nats_cluster.credentials.directory),
    }
    data = DataDir(tmp_path)
    streams = (DEFAULT_STREAM, LEASE_STREAM, TOKEN_STREAM)
    replicated = cfgmod.load(env={**env, "TWINHUB_NATS_REPLICAS": str(nats_cluster.replicas)})
    async with services.event_store(replicated, data, "twin") as twin:
        for stream in streams:
            info = await _stream_info(twin, stream)
            assert info["config"]["num_replicas"] == 3, stream
    async with services.event_store(cfgmod.load(env=env), data, "admin") as admin:
        for stream in streams:
            assert (await _stream_info(admin, stream))["config"]["num_replicas"] == 3, stream
    with pytest.raises(ConfigError, match=r"nats\.replicas"):
        cfgmod.load(env={**env, "TWINHUB_NATS_REPLICAS": "2"})


@pytest.mark.parametrize("command", [["dev", "services"], ["up"]])
def test_nats_cluster_option(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    args = parser.parse_args([*command, "--nats-cluster", "3", "--nats-route-port", "0"])
    assert (args.nats_cluster, args.nats_route_port) == (3, 0)
    assert parser.parse_args(command).nats_cluster == 1  # one server stays the default
    for bad in ("2", "6", "x"):
        with pytest.raises(SystemExit):
            parser.parse_args([*command, "--nats-cluster", bad])
    assert "--nats-cluster" in capsys.readouterr().err

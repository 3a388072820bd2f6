"""The development servers: start, stop, restart on the same port with the same data."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import nats
import nats.errors
import pytest
from nats.aio.client import Client as NatsClient
from pymongo import AsyncMongoClient

from bus.credentials import BusCredentials
from bus.permissions import ROLES
from eventstore.adapters.endpoint import NatsEndpoint
from tests.natsprobe import refused
from twinhub_cli.devservices import (
    BinaryNotFoundError,
    MongoServer,
    NatsServer,
    ServiceStartError,
)

pytestmark = pytest.mark.servers


async def _publish(endpoint: NatsEndpoint, stream: str, subject: str, payload: bytes) -> int:
    nc = await nats.connect(**endpoint.connect_options())
    try:
        js = nc.jetstream()
        await js.add_stream(name=stream, subjects=[subject])
        ack = await js.publish(subject, payload)
        return ack.seq
    finally:
        await nc.close()


async def test_nats_restart_keeps_port_and_jetstream_data(tmp_path: Path) -> None:
    async with NatsServer(tmp_path) as server:
        url, port = server.url, server.port
        assert port > 0
        seq = await _publish(server.endpoint("admin"), "RESTART", "restart.x", b"kept")
        assert (server.store_dir / "TWINHUB" / "streams" / "RESTART").is_dir()
        await server.stop()
        assert not server.running
        await server.start()
        assert (server.url, server.port) == (url, port)
        nc = await nats.connect(**server.endpoint("admin").connect_options())
        try:
            msg = await nc.jetstream().get_msg("RESTART", seq)
            assert msg.data == b"kept"
        finally:
            await nc.close()
    assert not server.running
    assert "Server is ready" in server.log_path.read_text()


async def test_nats_refuses_anonymous_clients_and_admits_each_role(tmp_path: Path) -> None:
    async with NatsServer(tmp_path) as server:
        await refused(server.url, connect_timeout=5)
        for role in ROLES:
            nc = await nats.connect(**server.endpoint(role).connect_options())
            try:
                await nc.flush()
            finally:
                await nc.close()
    conf = json.loads(server.config_path.read_text())
    assert "no_auth_user" not in conf and "users" not in conf.get("authorization", {})


async def test_nats_start_failure_names_the_log(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = NatsServer(tmp_path, port=taken.getsockname()[1])
        with pytest.raises(ServiceStartError, match="exited with code") as info:
            await server.start()
    assert str(server.log_path) in str(info.value)
    assert not server.running


async def test_session_nats_server_can_be_stopped_by_a_test(nats_server: NatsServer) -> None:
    await nats_server.stop()  # left stopped on purpose: the next test needs it running again


async def test_next_test_gets_nats_running_again(nats_client: NatsClient) -> None:
    info = await nats_client.jetstream().account_info()
    assert info.limits is not None


async def test_mongo_restart_keeps_port_and_data(tmp_path: Path) -> None:
    async with MongoServer(tmp_path) as server:
        url = server.url
        assert url.endswith("/?directConnection=true")
        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(url)
        try:
            await client.keep.things.insert_one({"_id": "a", "v": 1})
        finally:
            await client.close()
        await server.restart()
        assert server.url == url
        client = AsyncMongoClient(url)
        try:
            assert await client.keep.things.find_one({"_id": "a"}) == {"_id": "a", "v": 1}
        finally:
            await client.close()


def test_missing_mongo_binary_says_how_to_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TWINHUB_MONGO_SERVER_BIN", str(tmp_path / "nope"))
    with pytest.raises(BinaryNotFoundError, match=r"\./scripts/setup"):
        MongoServer(tmp_path)


async def _dev_services(data_dir: Path) -> asyncio.subprocess.Process:
    """``twinhub dev services`` on free ports, its stdout and stderr piped."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "twinhub_cli.main",
        "dev",
        "services",
        "--data-dir",
        str(data_dir),
        "--nats-port",
        "0",
        "--mongo-port",
        "0",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


async def test_cli_dev_services_runs_until_sigterm(tmp_path: Path) -> None:
    proc = await _dev_services(tmp_path)
    try:
        assert proc.stdout is not None
        urls: dict[str, str] = {}
        async with asyncio.timeout(60):
            while len(urls) < 2:
                line = (await proc.stdout.readline()).decode()
                assert line, "twinhub dev services exited before printing its URLs"
                kind, _, url = line.partition(" ")
                if kind in ("NATS", "MongoDB"):
                    urls[kind] = url.strip()
        creds = BusCredentials(tmp_path / "bus")  # where `twinhub gateway --data-dir` looks
        endpoint = NatsEndpoint(urls["NATS"], seed_file=creds.seed_file("admin"))
        nc = await nats.connect(**endpoint.connect_options())
        try:
            await nc.jetstream().account_info()
        finally:
            await nc.close()
        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(urls["MongoDB"])
        try:
            await client.admin.command("ping")
        finally:
            await client.close()
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            _, stderr = await proc.communicate()
        assert proc.returncode == 0, stderr.decode()
        assert not list((tmp_path / "nats" / "ports").glob("*.ports"))  # nats-server exited
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_servers_stop_when_their_parent_is_killed(tmp_path: Path) -> None:
    """SIGKILL of ``twinhub dev services`` (no chance to clean up) still stops its servers:
    they get SIGTERM from the kernel (parent-death signal), so no orphan holds ports or data."""
    proc = await _dev_services(tmp_path)
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(60):
            seen = 0
            while seen < 2:
                line = (await proc.stdout.readline()).decode()
                assert line, "twinhub dev services exited before printing its URLs"
                seen += line.startswith(("NATS ", "MongoDB "))
        children = _children_of(proc.pid)
        assert len(children) == 2, children
    finally:
        proc.kill()
        await proc.wait()
    async with asyncio.timeout(20):
        while alive := [pid for pid in children if _alive(pid)]:
            await asyncio.sleep(0.05)
    assert not alive


def _children_of(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False

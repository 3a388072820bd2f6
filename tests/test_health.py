"""``twinhub health``: every check against the real servers (and a real gateway), healthy and not.

The command is run as ``twinhub_cli.main.main([...])`` in a worker thread (it runs its own event
loop, as in a container), with the configuration from ``TWINHUB_*`` variables; one test runs the
real entry point in a subprocess for the exit code Docker sees.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pytest

from eventstore.adapters.endpoint import NatsEndpoint
from eventstore.adapters.jetstream import JetStreamEventStore
from eventstore.layout import StreamLayout
from proto.message import NatsMessage
from twinhub_cli import config as cfgmod
from twinhub_cli import health, services
from twinhub_cli.datadir import DataDir
from twinhub_cli.devservices import NatsServer
from twinhub_cli.main import main
from twinhub_cli.observability import ObservabilityConfig

pytestmark = pytest.mark.servers

Capture = pytest.CaptureFixture[str]


class HasUrl(Protocol):  # the mongo_server fixture
    @property
    def url(self) -> str: ...


@dataclass(frozen=True)
class Outcome:
    code: int
    line: str  # the one line printed (stdout when healthy, stderr when not)


async def health_cmd(capsys: Capture, *argv: str) -> Outcome:
    capsys.readouterr()
    code = await asyncio.to_thread(main, ["health", *argv])
    out, err = capsys.readouterr()
    text = out if code == 0 else err
    lines = text.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got {text!r} (other stream: {out or err!r})"
    assert (code == 0) == (out != "") and (code == 0) == (err == ""), (out, err)
    return Outcome(code, lines[0])


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in cfgmod.env_names():  # only what a test sets
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture
def bus_env(env: pytest.MonkeyPatch, nats_server: NatsServer) -> pytest.MonkeyPatch:
    """The session's NATS and its service credentials, as a container gets them."""
    env.setenv("TWINHUB_NATS_URL", nats_server.url)
    env.setenv("TWINHUB_NATS_CREDENTIALS", str(nats_server.credentials.directory))
    return env


def bus_config(nats_server: NatsServer, **sections: dict[str, Any]) -> cfgmod.Config:
    nats = {"url": nats_server.url, "credentials": str(nats_server.credentials.directory)}
    return cfgmod.load(env={}, overrides={"nats": nats, **sections})


@contextlib.asynccontextmanager
async def gateway_store(config: cfgmod.Config, data: DataDir) -> AsyncIterator[JetStreamEventStore]:
    async with services.event_store(config, data, "twin"):
        pass  # the twin service provisions the stream; the gateway waits for it
    async with services.event_store(config, data, "gateway") as store:
        yield store


@contextlib.asynccontextmanager
async def isolated_stream(
    admin: NatsEndpoint,
) -> AsyncIterator[tuple[JetStreamEventStore, str]]:
    """A stream of its own (name and subjects), deleted afterwards (admin role: the services'
    permissions name the production stream only)."""
    hexid = uuid.uuid4().hex[:12]
    root = f"hc{hexid}"
    layout = StreamLayout(name=f"HEALTH_{hexid}", subjects=(f"{root}.>",))
    async with JetStreamEventStore.from_url(admin, layout) as store:
        await store.provision()
        try:
            yield store, root
        finally:
            await store.connection.request(f"$JS.API.STREAM.DELETE.{layout.name}", b"")


# -- nats ------------------------------------------------------------------------------------


async def test_nats_healthy_when_stream_exists(
    nats_admin: NatsEndpoint, bus_env: pytest.MonkeyPatch, capsys: Capture
) -> None:
    async with isolated_stream(nats_admin) as (store, _):
        bus_env.setenv("TWINHUB_NATS_STREAM", store.layout.name)
        got = await health_cmd(capsys, "nats", "--role", "admin")
    assert got.code == 0
    assert got.line.startswith("healthy: ")
    assert store.layout.name in got.line


async def test_nats_healthy_as_the_gateway_on_the_production_stream(
    bus_env: pytest.MonkeyPatch, capsys: Capture, nats_server: NatsServer, tmp_path: Path
) -> None:
    async with services.event_store(bus_config(nats_server), DataDir(tmp_path), "twin"):
        pass  # provisioned
    got = await health_cmd(capsys, "nats")  # the gateway's own NKey, the default role
    assert got.code == 0, got.line
    assert "TWINHUB_EVENTS" in got.line


async def test_nats_unhealthy_without_stream(
    nats_server: NatsServer, bus_env: pytest.MonkeyPatch, capsys: Capture
) -> None:
    bus_env.setenv("TWINHUB_NATS_STREAM", f"MISSING_{uuid.uuid4().hex[:8]}")
    got = await health_cmd(capsys, "nats", "--url", nats_server.url, "--role", "admin")
    assert got.code == 1
    assert "does not exist" in got.line


async def test_nats_unhealthy_without_credentials(
    nats_server: NatsServer, env: pytest.MonkeyPatch, capsys: Capture, tmp_path: Path
) -> None:
    env.setenv("TWINHUB_NATS_URL", nats_server.url)
    got = await health_cmd(capsys, "nats", "--data-dir", str(tmp_path))
    assert got.code == 1
    assert "NKey seed of gateway" in got.line and "twinhub init" in got.line


async def test_nats_unhealthy_when_unreachable(
    bus_env: pytest.MonkeyPatch, capsys: Capture
) -> None:
    url = f"nats://127.0.0.1:{closed_port()}"
    got = await health_cmd(capsys, "nats", "--url", url, "--timeout", "2")
    assert got.code == 1
    assert "cannot connect" in got.line


async def test_nats_url_with_credentials_is_refused_unprinted(
    bus_env: pytest.MonkeyPatch, capsys: Capture
) -> None:
    url = f"nats://user:secret@127.0.0.1:{closed_port()}"
    got = await health_cmd(capsys, "nats", "--url", url, "--timeout", "2")
    assert got.code == 1
    assert "credentials do not belong in the NATS URL" in got.line
    assert "secret" not in got.line  # credentials are not printed


# -- mongo -----------------------------------------------------------------------------------


async def test_mongo_healthy(
    mongo_server: HasUrl, env: pytest.MonkeyPatch, capsys: Capture
) -> None:
    env.setenv("TWINHUB_MONGO_URL", mongo_server.url)
    got = await health_cmd(capsys, "mongo")
    assert got.code == 0
    assert "ping ok" in got.line


async def test_mongo_unhealthy_within_timeout(env: pytest.MonkeyPatch, capsys: Capture) -> None:
    url = f"mongodb://127.0.0.1:{closed_port()}/?directConnection=true"
    loop = asyncio.get_running_loop()
    started = loop.time()
    got = await health_cmd(capsys, "mongo", "--url", url, "--timeout", "0.5")
    assert got.code == 1
    assert loop.time() - started < 5
    assert "MongoDB" in got.line


# -- gateway ---------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def running_gateway(
    nats_server: NatsServer, data_dir: Path
) -> AsyncIterator[tuple[int, int]]:
    config = bus_config(
        nats_server,
        gateway={
            "tcp": "127.0.0.1:0",
            "tls": "127.0.0.1:0",
            "udp": "127.0.0.1:0",
            "dtls": "127.0.0.1:0",
        },
    )
    data = DataDir(data_dir)
    async with (
        gateway_store(config, data) as store,
        services.run_gateway(config, data, store) as gw,
    ):
        assert gw.tcp_address is not None and gw.tls_address is not None
        yield gw.tcp_address[1], gw.tls_address[1]


async def test_gateway_tcp_and_tls(
    nats_server: NatsServer, tmp_path: Path, env: pytest.MonkeyPatch, capsys: Capture
) -> None:
    async with running_gateway(nats_server, tmp_path) as (tcp, tls):
        ca = str(tmp_path / "pki" / "ca.crt")
        # the configured listener, with a wildcard bind address probed on loopback
        env.setenv("TWINHUB_GATEWAY_TCP", f"0.0.0.0:{tcp}")
        got = await health_cmd(capsys, "gateway")
        assert got.code == 0, got.line
        assert f"coap+tcp://127.0.0.1:{tcp}: CSM received" in got.line

        got = await health_cmd(capsys, "gateway", "--tls", "--address", f"127.0.0.1:{tls}")
        assert got.code == 0, got.line
        got = await health_cmd(
            capsys, "gateway", "--tls", "--address", f"127.0.0.1:{tls}", "--ca", ca
        )
        assert got.code == 0, got.line

        # the certificate is not valid for that name
        got = await health_cmd(
            capsys,
            "gateway",
            "--tls",
            "--address",
            f"127.0.0.1:{tls}",
            "--ca",
            ca,
            "--server-name",
            "elsewhere.example",
        )
        assert got.code == 1
        assert "certificate not accepted" in got.line

        # TLS to the plain listener
        got = await health_cmd(
            capsys, "gateway", "--tls", "--address", f"127.0.0.1:{tcp}", "--timeout", "1"
        )
        assert got.code == 1


async def test_gateway_unhealthy_when_refused_or_disabled(
    env: pytest.MonkeyPatch, capsys: Capture
) -> None:
    got = await health_cmd(capsys, "gateway", "--address", f"127.0.0.1:{closed_port()}")
    assert got.code == 1
    assert "cannot connect" in got.line

    env.setenv("TWINHUB_GATEWAY_TLS", "")
    got = await health_cmd(capsys, "gateway", "--tls")
    assert got.code == 1  # a configuration problem is "unhealthy" too (never exit code 2)
    assert "disabled" in got.line


@pytest.mark.parametrize(
    ("greeting", "expected"),
    [(b"", "no answer within 0.5 s while waiting for the CSM"), (b"HTTP/1.1 400\r\n", "not a CSM")],
)
async def test_gateway_needs_a_csm(
    greeting: bytes, expected: str, env: pytest.MonkeyPatch, capsys: Capture
) -> None:
    """A listener that accepts but does not speak CoAP is not a healthy gateway."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(greeting)
        await writer.drain()
        with contextlib.suppress(ConnectionError):
            await reader.read()  # until the probe hangs up
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        got = await health_cmd(
            capsys, "gateway", "--address", f"127.0.0.1:{port}", "--timeout", "0.5"
        )
    assert got.code == 1
    assert expected in got.line


# -- twin ------------------------------------------------------------------------------------


async def test_twin_consumer_and_pending(
    nats_admin: NatsEndpoint, mongo_server: HasUrl, bus_env: pytest.MonkeyPatch, capsys: Capture
) -> None:
    env = bus_env
    consumer = f"health-{uuid.uuid4().hex[:8]}"
    async with isolated_stream(nats_admin) as (store, root):
        env.setenv("TWINHUB_NATS_STREAM", store.layout.name)
        env.setenv("TWINHUB_MONGO_URL", mongo_server.url)
        env.setenv("TWINHUB_TWIN_CONSUMER", consumer)

        got = await health_cmd(capsys, "twin", "--role", "admin")
        assert got.code == 1
        assert f"{consumer} does not exist" in got.line

        durable = await store.consumer(consumer, (f"{root}.>",))
        await durable.close()
        messages = [
            NatsMessage(subject=f"{root}.o.d{i}.k._", msg_id=uuid.uuid4().hex, data=b"{}")
            for i in range(3)
        ]
        for m in messages:
            await store.append([m])

        got = await health_cmd(capsys, "twin", "--role", "admin")
        assert got.code == 0, got.line
        assert "3 pending" in got.line
        assert "ping ok" in got.line

        got = await health_cmd(capsys, "twin", "--role", "admin", "--max-pending", "2")
        assert got.code == 1
        assert "more than --max-pending 2" in got.line

        # MongoDB down makes the twin unhealthy even with the consumer in place
        env.setenv("TWINHUB_MONGO_URL", f"mongodb://127.0.0.1:{closed_port()}/")
        got = await health_cmd(capsys, "twin", "--role", "admin", "--timeout", "0.5")
        assert got.code == 1
        assert "MongoDB" in got.line


# -- a process's operations endpoint ---------------------------------------------------------


async def test_endpoint_of_a_running_gateway(
    nats_server: NatsServer, tmp_path: Path, env: pytest.MonkeyPatch, capsys: Capture
) -> None:
    config = bus_config(
        nats_server,
        gateway={
            "tcp": "127.0.0.1:0",
            "tls": "",
            "udp": "127.0.0.1:0",
            "dtls": "127.0.0.1:0",
            "metrics_listen": "127.0.0.1:0",
        },
    )
    fast = ObservabilityConfig(heartbeat_interval=0.1, probe_interval=0.1)
    async with (
        gateway_store(config, DataDir(tmp_path)) as store,
        services.run_gateway(config, DataDir(tmp_path), store) as gw,
        services.gateway_observability(config, store, gw, fast) as ops,
    ):
        assert ops is not None
        port = ops.address[1]
        # the configured endpoint, with a wildcard bind address probed on loopback
        env.setenv("TWINHUB_GATEWAY_METRICS_LISTEN", f"0.0.0.0:{port}")
        got = await health_cmd(capsys, "endpoint", "gateway")
        assert got.code == 0, got.line
        assert f"http://127.0.0.1:{port}/healthz: 200" in got.line
        assert '"status": "ok"' in got.line
        async with asyncio.timeout(10):
            while (got := await health_cmd(capsys, "endpoint", "gateway", "--ready")).code:
                await asyncio.sleep(0.1)
        assert '"jetstream": "ok"' in got.line
    got = await health_cmd(capsys, "endpoint", "gateway")
    assert got.code == 1
    assert "cannot connect" in got.line

    got = await health_cmd(capsys, "endpoint", "twin")
    assert got.code == 1
    assert "twin.metrics_listen is not set" in got.line


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (b'HTTP/1.0 503 Service Unavailable\r\n\r\n{"status": "not ready"}', '503 {"status"'),
        (b"\xe1\x00", "not an HTTP answer"),
    ],
)
async def test_endpoint_unhealthy_answers(
    answer: bytes, expected: str, env: pytest.MonkeyPatch, capsys: Capture
) -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        got = await health_cmd(
            capsys, "endpoint", "twin", "--ready", "--address", f"127.0.0.1:{port}"
        )
    assert got.code == 1
    assert expected in got.line


# -- the installed entry point -----------------------------------------------------------------


async def test_entry_point_exit_codes(mongo_server: HasUrl) -> None:
    async def run(*argv: str) -> tuple[int, bytes]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "twinhub_cli.main",
            "health",
            *argv,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await proc.communicate()
        assert proc.returncode is not None
        return proc.returncode, out

    code, out = await run("mongo", "--url", mongo_server.url)
    assert code == 0, out
    code, out = await run(
        "mongo", "--url", f"mongodb://127.0.0.1:{closed_port()}/", "--timeout", "0.5"
    )
    assert code == 1, out
    # a bad configuration is unhealthy (1), not a usage error (2)
    code, out = await run("mongo", "--config", "/nonexistent/twinhub.toml")
    assert code == 1, out
    assert b"config file not found" in out


def test_redact() -> None:
    assert health.redact("nats://u:p@h:4222,nats://h2:4222") == "nats://***@h:4222,nats://h2:4222"
    assert health.redact("mongodb://h:27017/?x=1") == "mongodb://h:27017/?x=1"

"""A service command that cannot start ends with one line on stderr and an exit code of its
own (twinhub_cli.exitcodes), never a traceback; ``--log-level DEBUG`` adds the traceback
(issue 15, item 3).

Every command runs as a user runs it, a subprocess, against the session's real NATS server
(its bus security as in production) or a closed port."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from bus.credentials import ensure_credentials
from tests.conftest import Bus
from tests.integration.twinhub_cli.cli import free_port, twinhub
from twinhub_cli import config as cfgmod
from twinhub_cli import services
from twinhub_cli.datadir import DataDir
from twinhub_cli.exitcodes import PORT_IN_USE, UNREACHABLE, USAGE

pytestmark = pytest.mark.servers

ANY = "127.0.0.1:0"


@pytest.fixture
def busy_tcp() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.fixture
def busy_udp() -> Iterator[int]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


def bus_settings(bus: Bus, **more: str) -> dict[str, str]:
    """The session's bus as a container is given it, every listener on a free port, a
    gateway id of the test's own (its lease is on the shared server)."""
    return {
        "TWINHUB_NATS_URL": bus.url,
        "TWINHUB_NATS_CREDENTIALS": str(bus.server.credentials.directory),
        "TWINHUB_GATEWAY_ID": f"gw-cli-{uuid.uuid4().hex[:8]}",
        "TWINHUB_GATEWAY_TCP": ANY,
        "TWINHUB_GATEWAY_TLS": ANY,
        "TWINHUB_GATEWAY_UDP": ANY,
        "TWINHUB_GATEWAY_DTLS": ANY,
        **more,
    }


async def provisioned(settings: dict[str, str], data: DataDir) -> None:
    """The streams a gateway waits for, created as the twin service does."""
    config = cfgmod.load(None, env=settings)
    async with services.event_store(config, data, "twin"):
        pass


@pytest.mark.parametrize(
    ("setting", "kind"),
    [
        ("TWINHUB_GATEWAY_TCP", "tcp"),
        ("TWINHUB_GATEWAY_TLS", "tcp"),
        ("TWINHUB_GATEWAY_UDP", "udp"),
        ("TWINHUB_GATEWAY_DTLS", "udp"),
        ("TWINHUB_GATEWAY_METRICS_LISTEN", "tcp"),
    ],
)
async def test_the_gateway_on_a_busy_port_names_it_in_one_line(
    bus: Bus,
    tmp_path: Path,
    busy_tcp: int,
    busy_udp: int,
    setting: str,
    kind: str,
) -> None:
    port = busy_tcp if kind == "tcp" else busy_udp
    settings = bus_settings(bus, **{setting: f"127.0.0.1:{port}"})
    data = tmp_path / "data"
    await provisioned(settings, DataDir(data))
    ran = await twinhub("gateway", "--data-dir", str(data), settings=settings)
    name = setting.removeprefix("TWINHUB_").lower().replace("_", ".", 1)
    assert ran.code == PORT_IN_USE, ran.err
    assert ran.last_err == (
        f"twinhub gateway: {name} 127.0.0.1:{port} is in use (address already in use)"
    )
    assert "Traceback" not in ran.err


async def test_debug_logging_shows_the_traceback_too(
    bus: Bus, tmp_path: Path, busy_tcp: int
) -> None:
    settings = bus_settings(bus, TWINHUB_GATEWAY_TCP=f"127.0.0.1:{busy_tcp}")
    data = tmp_path / "data"
    await provisioned(settings, DataDir(data))
    args = ("--log-level", "DEBUG", "gateway", "--data-dir", str(data))
    ran = await twinhub(*args, settings=settings)
    assert ran.code == PORT_IN_USE
    assert ran.last_err == (
        f"twinhub gateway: gateway.tcp 127.0.0.1:{busy_tcp} is in use (address already in use)"
    )
    assert "Traceback (most recent call last)" in ran.err
    assert "address already in use" in ran.err.split("Traceback", 1)[1]


async def test_the_twin_service_without_mongodb_gives_up_after_its_budget(
    bus: Bus, tmp_path: Path
) -> None:
    closed = free_port()
    settings = bus_settings(
        bus,
        TWINHUB_MONGO_URL=f"mongodb://127.0.0.1:{closed}/?directConnection=true",
        TWINHUB_MONGO_STARTUP_TIMEOUT="1",
        TWINHUB_TWIN_CONSUMER=f"twin-cli-{uuid.uuid4().hex[:8]}",
    )
    ran = await twinhub("twin", "run", "--data-dir", str(tmp_path / "data"), settings=settings)
    assert ran.code == UNREACHABLE, ran.err
    assert ran.last_err == (
        f"twinhub twin run: MongoDB at mongodb://127.0.0.1:{closed}/?directConnection=true "
        "unreachable: no answer within 1 s (mongo.startup_timeout)"
    )
    assert "Traceback" not in ran.err


@pytest.mark.parametrize(
    ("command", "prog"),
    [(("gateway",), "gateway"), (("twin", "run"), "twin run"), (("callout",), "callout")],
)
async def test_a_service_without_nats_gives_up_after_its_budget(
    tmp_path: Path, command: tuple[str, ...], prog: str
) -> None:
    """nats-py retries a refused first connect forever: these waited silently until killed."""
    data = tmp_path / "data"
    ensure_credentials(data / "bus")
    closed = free_port()
    settings = {
        "TWINHUB_NATS_URL": f"nats://127.0.0.1:{closed}",
        "TWINHUB_NATS_STARTUP_TIMEOUT": "1",
    }
    ran = await twinhub(*command, "--data-dir", str(data), settings=settings, within=30)
    assert ran.code == UNREACHABLE, ran.err
    assert ran.last_err == (
        f"twinhub {prog}: NATS at nats://127.0.0.1:{closed} unreachable: no connection "
        "within 1 s (nats.startup_timeout)"
    )
    assert "Traceback" not in ran.err


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        ({"TWINHUB_GATEWAY_LEASE": "x"}, "TWINHUB_GATEWAY_LEASE: must be a number"),
        ({}, "nats.credentials: no NKey seed of gateway"),  # an empty data dir
    ],
)
async def test_a_configuration_error_is_one_line(
    tmp_path: Path, settings: dict[str, str], words: str
) -> None:
    ran = await twinhub("gateway", "--data-dir", str(tmp_path), settings=settings)
    assert ran.code == USAGE, ran.err
    assert ran.last_err.startswith(f"twinhub gateway: configuration error: {words}")
    assert "Traceback" not in ran.err


async def test_dev_services_on_a_busy_port_says_so_in_one_line(
    tmp_path: Path, busy_tcp: int
) -> None:
    args = ("dev", "services", "--data-dir", str(tmp_path), "--mongo-port", "0")
    ran = await twinhub(*args, "--nats-port", str(busy_tcp))
    assert ran.code == PORT_IN_USE, ran.err
    assert ran.last_err.startswith("twinhub dev services: nats-server (pid ")
    assert f"127.0.0.1:{busy_tcp}" in ran.last_err and "address already in use" in ran.last_err
    assert "Traceback" not in ran.err

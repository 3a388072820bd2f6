"""``twinhub up`` as a user runs it: a line on stderr per step while it starts its parts, then
one summary block on stdout (endpoints, the token); a busy port ends it with one line and its
exit code (issue 15, item 3)."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.twinhub_cli.cli import start, twinhub
from twinhub_cli.datadir import DataDir
from twinhub_cli.exitcodes import OK, PORT_IN_USE

pytestmark = pytest.mark.servers

WAIT = 60.0
FREE = ("--nats-port", "0", "--mongo-port", "0", "--tcp-port", "0", "--tls-port", "0")
CONSOLE = ("--console", "127.0.0.1:0", "--nats-ws-port", "0")
OPS = ("--gateway-metrics", "127.0.0.1:0", "--twin-metrics", "127.0.0.1:0")
SETTINGS = {"TWINHUB_GATEWAY_UDP": "127.0.0.1:0", "TWINHUB_GATEWAY_DTLS": "127.0.0.1:0"}
STEPS = [
    "NATS",
    "MongoDB",
    "auth callout",
    "twin service",
    "twin service",
    "twin service",
    "gateway",
    "operations",
    "ready",
]


@pytest.fixture
def busy_tcp() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


async def _line(stream: asyncio.StreamReader) -> str:
    raw = await stream.readline()
    assert raw, "the stream ended"
    return raw.decode().rstrip("\n")


async def test_up_shows_each_step_then_one_summary_block(tmp_path: Path) -> None:
    data = tmp_path / "data"
    args = (
        "up",
        "--data-dir",
        str(data),
        *FREE,
        *CONSOLE,
        *OPS,
        "--callout-metrics",
        "127.0.0.1:0",
    )
    # WARNING: the steps alone on stderr (the services' INFO lines come between them else)
    proc = await start("--log-level", "WARNING", *args, settings=SETTINGS)
    assert proc.stdout is not None and proc.stderr is not None
    try:
        async with asyncio.timeout(WAIT):
            progress = [await _line(proc.stderr) for _ in STEPS]
            summary = [await _line(proc.stdout)]
            while not summary[-1].startswith("eyJ"):  # the token ends the block
                summary.append(await _line(proc.stdout))
        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(WAIT):
            rest, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == OK, err.decode()
    assert all(line.startswith("twinhub up: ") for line in progress), progress
    parts = [line.removeprefix("twinhub up: ")[:13].rstrip() for line in progress]
    assert parts == STEPS
    assert "starting nats-server on a free port, waiting for JetStream" in progress[0]
    assert progress[-1].startswith("twinhub up: ready         in ")

    info = DataDir(data).stack_file
    assert not info.exists()  # removed on the way out
    text = "\n".join(summary)
    assert summary[0] == "twinhub is up"
    for label in (
        "devices (CoAP over TCP)  coap+tcp://127.0.0.1:",
        "devices (CoAP over TLS)  coaps+tcp://127.0.0.1:",
        "simple devices (UDP)     coap://127.0.0.1:",
        "simple devices (DTLS)    coaps://127.0.0.1:",
        "NATS (applications)      nats://127.0.0.1:",
        "MongoDB (twins)          mongodb://127.0.0.1:",
        "gateway operations       http://127.0.0.1:",
        "twin operations          http://127.0.0.1:",
        "callout operations       http://127.0.0.1:",
        f"data dir                 {data}",
        "web console              http://127.0.0.1:",
    ):
        assert f"\n  {label}" in text, label
    _, claims, _ = summary[-1].split(".")
    assert json.loads(_b64(claims))["sub"] == "dev"
    link, stopping = rest.decode().strip().rsplit("\n", 1)
    assert "sign in to the web console as 'dev'" in link
    assert f"/#token={summary[-1]}" in link  # in the fragment: never sent to a server
    assert stopping == "stopping"


def _b64(part: str) -> bytes:
    import base64

    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


async def test_up_on_a_busy_nats_port_says_so_in_one_line(tmp_path: Path, busy_tcp: int) -> None:
    args = ("up", "--data-dir", str(tmp_path / "data"), *FREE[2:], "--nats-port", str(busy_tcp))
    ran = await twinhub(*args, settings=SETTINGS)
    assert ran.code == PORT_IN_USE, ran.err
    assert "Traceback" not in ran.err
    assert ran.last_err.startswith("twinhub up: nats-server (pid ")
    assert f"127.0.0.1:{busy_tcp}" in ran.last_err and "address already in use" in ran.last_err
    steps = [line for line in ran.err.splitlines() if line.startswith("twinhub up: NATS ")]
    assert steps == [
        f"twinhub up: NATS          starting nats-server on port {busy_tcp}, waiting for JetStream"
    ]


async def test_up_on_a_busy_gateway_port_names_the_setting(tmp_path: Path, busy_tcp: int) -> None:
    args = ("up", "--data-dir", str(tmp_path / "data"), *FREE[:6], "--tls-port", str(busy_tcp))
    ran = await twinhub(*args, *OPS, "--callout-metrics", "127.0.0.1:0", settings=SETTINGS)
    assert ran.code == PORT_IN_USE, ran.err
    assert ran.last_err == (
        f"twinhub up: gateway.tls 127.0.0.1:{busy_tcp} is in use (address already in use)"
    )
    assert "Traceback" not in ran.err

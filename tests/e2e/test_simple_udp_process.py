"""The simple devices' UDP endpoint in the real ``twinhub gateway`` process (uvloop, as users
run it) keeps answering after ICMP errors.

The defect: aiocoap's udp6 transport asks the kernel for ICMP errors (IP_RECVERR) and reads
them in a ``loop.add_reader`` callback; under uvloop that reader is a libuv poll handle, which
libuv stops for good on POLLERR. The first "port unreachable" -- a device that sent a request
and was gone before the answer (``coap-client`` ending an observation, a timed-out client, a
closed DTLS relay socket, a spoofed source) -- left the endpoint deaf: every later request
unanswered. The test suite's own event loop is asyncio's, where this does not happen, so the
gateway runs here as its own process.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.integration.gateway.simple_peers import coap_client
from twinhub_cli import services as svc
from twinhub_cli.datadir import DataDir

from .stack import bus_config
from .test_gateway_lost import gateway_process

if TYPE_CHECKING:
    from tests.conftest import Bus

pytestmark = pytest.mark.servers

TOKEN = "no-such-token-0123456789"


def _gone_before_the_answer(port: int, n: int) -> None:
    """``n`` requests, each from a socket closed right after sending: its answer (4.01, after a
    registry lookup) finds the port closed, and the kernel answers it with ICMP."""
    for i in range(n):
        # a confirmable POST, as the wire has it (RFC 7252 section 3): version 1, CON, token
        # length 1, code 0.02, message id; Uri-Path options api / v1 / TOKEN / telemetry
        head = bytes([0x41, 0x02, 0x40, i, i + 1])
        opts = bytes([0xB3]) + b"api" + bytes([0x02]) + b"v1"
        opts += bytes([0x0D, len(TOKEN) - 13]) + TOKEN.encode() + bytes([0x09]) + b"telemetry"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(head + opts, ("127.0.0.1", port))


async def test_the_endpoint_answers_after_devices_vanished_before_their_answers(
    bus: Bus, tmp_path: Path
) -> None:
    config = bus_config(bus)
    data = tmp_path / "data"
    async with svc.event_store(config, DataDir(data), "twin"):
        pass  # the twin service provisions the streams the gateway waits for
    async with gateway_process(bus, data, "gw-icmp", 15.0, tmp_path / "gw.log") as gw:
        assert gw.udp_port is not None
        url = f"coap://127.0.0.1:{gw.udp_port}/api/v1/{TOKEN}/telemetry"
        before = await coap_client("-m", "post", "-t", "json", "-e", '{"a":1}', url)
        assert before.code == "4.01", before.stdout
        _gone_before_the_answer(gw.udp_port, 5)
        await asyncio.sleep(0.5)  # the answers and their ICMP errors happen meanwhile
        for _ in range(3):
            after = await coap_client("-m", "post", "-t", "json", "-e", '{"a":1}', url)
            assert after.code == "4.01", (after.stdout, gw.log.read_text()[-3000:])

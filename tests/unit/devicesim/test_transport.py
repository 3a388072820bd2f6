"""The aiocoap patch points devicesim relies on (aiocoap is pinned; these fail loudly if not)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from aiocoap import Message
from aiocoap.numbers.codes import CONTENT, CSM, GET
from aiocoap.transports.tcp import _decode_message

from devicesim.stats import DeviceStats
from devicesim.transport import SimClientTransport, SimConnection

log = logging.getLogger("test")


class RecordingTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.closing = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 40000), "peername": ("127.0.0.1", 5683)}.get(
            name, default
        )

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True


def connection(*, send_csm: bool, require_peer_csm: bool = True) -> SimConnection:
    loop = asyncio.get_running_loop()
    stats = DeviceStats()
    owner = SimClientTransport(
        None,
        log,
        loop,
        scheme="coap+tcp",
        ssl_context=None,
        server_hostname=None,
        send_csm=send_csm,
        require_peer_csm=require_peer_csm,
        stats=stats,
    )
    return SimConnection(
        owner, log, loop, send_csm=send_csm, require_peer_csm=require_peer_csm, stats=stats
    )


async def test_normal_connection_starts_with_csm() -> None:
    conn = connection(send_csm=True)
    t = RecordingTransport()
    conn.connection_made(t)
    assert len(t.written) == 1
    assert _decode_message(t.written[0]).code == CSM


async def test_reference_connection_sends_no_csm() -> None:
    conn = connection(send_csm=False, require_peer_csm=False)
    t = RecordingTransport()
    conn.connection_made(t)
    assert t.written == []
    assert conn._remote_settings == {}  # a request from a CSM-less peer is not aborted


@pytest.mark.parametrize(
    ("observe", "counter"), [(None, "responses_sent"), (3, "notifications_sent")]
)
async def test_sent_responses_are_counted(observe: int | None, counter: str) -> None:
    conn = connection(send_csm=False)
    conn.connection_made(RecordingTransport())
    msg = Message(code=CONTENT, payload=b"x")
    msg.opt.observe = observe
    conn._send_message(msg)
    assert getattr(conn._stats, counter) == 1


async def test_nothing_is_sent_or_counted_after_close() -> None:
    conn = connection(send_csm=False)
    t = RecordingTransport()
    conn.connection_made(t)
    conn.close()
    conn._send_message(Message(code=GET))
    assert t.written == []
    assert not conn.is_open

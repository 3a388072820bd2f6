from __future__ import annotations

import aiocoap
import pytest
from aiocoap.optiontypes import BlockOption

from eventstore.memory import InMemoryEventStore
from gateway.adapters.coap_udp import SimpleDeviceServer, UdpConfig, _probe_bind
from gateway.devtokens import InMemoryTokenDirectory
from gateway.simple import SimpleConfig


def server(limit: int) -> SimpleDeviceServer:
    return SimpleDeviceServer(
        InMemoryEventStore(),
        InMemoryTokenDirectory(),
        SimpleConfig("gw", max_payload=limit),
        UdpConfig(bind=("127.0.0.1", 0)),
    )


def block(number: int, more: bool, payload: bytes, size_exp: int = 6, size1: int | None = None):  # type: ignore[no-untyped-def]
    msg = aiocoap.Message(code=aiocoap.POST, payload=payload)
    msg.opt.block1 = BlockOption.BlockwiseTuple(number, more, size_exp)
    if size1 is not None:
        msg.opt.size1 = size1
    return msg


def test_declared_size_of_uploads_over_the_limit() -> None:
    s = server(limit=2048)
    # within the limit: assembled by aiocoap (None)
    assert s.declared_size(block(0, True, b"x" * 1024)) is None
    assert s.declared_size(block(1, False, b"x" * 1024)) is None
    # a Size1 over the limit, on the first block
    assert s.declared_size(block(0, True, b"x" * 1024, size1=3000)) == 3000
    # a block reaching past the limit, without Size1
    assert s.declared_size(block(2, True, b"x" * 1024)) == 3072
    # an assembled request (the last block's option, the whole payload) is not a block
    assert s.declared_size(block(1, False, b"x" * 1500)) is None
    # a single datagram: the core checks its length
    assert s.declared_size(aiocoap.Message(code=aiocoap.POST, payload=b"x" * 5000)) is None


def test_probe_bind_picks_a_port_and_refuses_one_in_use() -> None:
    import socket

    port = _probe_bind("127.0.0.1", 0)
    assert port > 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as held:
        held.bind(("127.0.0.1", 0))
        with pytest.raises(OSError, match="in use"):
            _probe_bind("127.0.0.1", held.getsockname()[1])


async def test_a_second_server_on_the_same_port_fails_to_start() -> None:
    async with server(1024) as first:
        _, port = first.address
        second = SimpleDeviceServer(
            InMemoryEventStore(),
            InMemoryTokenDirectory(),
            SimpleConfig("gw"),
            UdpConfig(bind=("127.0.0.1", port)),
        )
        with pytest.raises(OSError, match="in use"):
            await second.__aenter__()


def test_host_and_port_of_aiocoap_hostinfo() -> None:
    from gateway.adapters.coap_udp import _hostinfo, _hostport

    assert _hostport("127.0.0.1:5683") == ("127.0.0.1", 5683)
    assert _hostport("[::1]:5684") == ("::1", 5684)
    assert _hostport("nonsense") is None
    assert _hostinfo(("::1", 1)) == "[::1]:1"
    assert _hostinfo(("10.0.0.1", 2)) == "10.0.0.1:2"

"""One fuzz input through :class:`gateway.wire.connection.CoapTcpConnection`, and what must hold.

Shared by the hypothesis test (``test_wire_fuzz.py``) and the atheris harness
(``atheris_wire.py``). The connection starts with requests of ours in flight (two plain, one
observation) so responses and notifications reach their paths. Whatever the bytes and however
they are cut, nothing raises; every event is one of the connection's; a failure is the last
event, comes once, and is what our last written frame (an Abort) says; a closed connection
reports nothing more; and the chunking changes nothing.
"""

from __future__ import annotations

import typing

from gateway.adapters.coap_frames import Deframer, Frame
from gateway.wire import events as ev
from gateway.wire.connection import CoapTcpConnection, ConnectionConfig, State
from gateway.wire.signals import ABORT

EVENT_TYPES = typing.get_args(ev.Event)
CONFIG = ConnectionConfig(max_message_size=2048, opening_timeout=5.0, message_timeout=3.0)


def _written(data: bytes) -> list[Frame]:
    deframer = Deframer(1 << 20)
    deframer.feed(data)
    out: list[Frame] = []
    while (frame := deframer.next()) is not None:
        out.append(frame)
    return out


def run(stream: bytes, step: int) -> tuple[list[ev.Event], bytes, State]:
    conn = CoapTcpConnection(CONFIG, now=0.0)
    conn.send_request(Frame(1, b"", ((11, b"a"),)))
    conn.send_request(Frame(2, b"", ((11, b"b"),), b"x"))
    conn.observe(Frame(1, b"", ((11, b"o"),)))
    sent = bytearray(conn.data_to_send())
    events: list[ev.Event] = []
    now = 0.0
    for i in range(0, len(stream), step):
        conn.receive_data(stream[i : i + step], now=now)
        events += conn.events()
        sent += conn.data_to_send()
        if conn.buffered > CONFIG.max_message_size + 6:
            raise AssertionError(f"buffered {conn.buffered} bytes")
    conn.tick(1.0)
    events += conn.events()
    sent += conn.data_to_send()
    return events, bytes(sent), conn.state


def check(stream: bytes, step: int) -> None:
    events, sent, state = run(stream, max(step, 1))
    for event in events:
        if not isinstance(event, EVENT_TYPES):
            raise AssertionError(f"not an event: {event!r}")
    failures = [e for e in events if isinstance(e, ev.ConnectionFailed)]
    if failures:
        (failure,) = failures
        if events[-1] is not failure or state is not State.CLOSED:
            raise AssertionError(f"events after the failure: {events}")
        last = _written(sent)[-1]
        if last.code != ABORT or last.payload != failure.diagnostic.encode()[:512]:
            raise AssertionError(f"{failure} but wrote {last}")
    if any(isinstance(e, ev.AbortReceived) for e in events) and state is not State.CLOSED:
        raise AssertionError("an Abort received left the connection open")
    if (events, sent, state) != run(stream, len(stream) or 1):
        raise AssertionError("chunking changed the result")

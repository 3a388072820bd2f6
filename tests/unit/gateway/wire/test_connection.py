"""Scripted conversations with the sans-IO RFC 8323 connection, and properties over any split.

A playbook is a list of steps: an input (bytes from the peer, a tick, a call) and what must come
out of it (the events, and the frames written). The property tests feed whole conversations cut
at arbitrary points, with signals interleaved, and require the same events.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.adapters.coap_frames import Deframer, Frame, encode_frame
from gateway.wire import events as ev
from gateway.wire.connection import CoapTcpConnection, ConnectionConfig, StalePolicy, State
from gateway.wire.errors import ConnectionNotOpen, MessageTooLarge, UnknownHandle
from gateway.wire.options import encode_uint
from gateway.wire.signals import ABORT, CSM, PING, PONG, RELEASE

GET, POST = 1, 2
CONTENT, CHANGED, NOT_FOUND = 69, 68, 132
OBSERVE, URI_PATH, CONTENT_FORMAT = 6, 11, 12
FailureKind = ev.FailureKind


def csm(max_size: int | None = None, block_wise: bool = False) -> Frame:
    options: list[tuple[int, bytes]] = []
    if max_size is not None:
        options.append((2, encode_uint(max_size)))
    if block_wise:
        options.append((4, b""))
    return Frame(CSM, b"", tuple(options))


def get(path: str, token: bytes = b"", *extra: tuple[int, bytes]) -> Frame:
    options = tuple((URI_PATH, p.encode()) for p in path.strip("/").split("/"))
    return Frame(GET, token, tuple(sorted(options + extra, key=lambda o: o[0])))


def content(token: bytes, payload: bytes = b"x", observe: int | None = None) -> Frame:
    options: tuple[tuple[int, bytes], ...] = ((CONTENT_FORMAT, encode_uint(10000)),)
    if observe is not None:
        options = ((OBSERVE, encode_uint(observe)), *options)
    return Frame(CONTENT, token, options, payload)


def wire(*frames: Frame) -> bytes:
    return b"".join(encode_frame(f) for f in frames)


def frames_of(data: bytes) -> list[Frame]:
    deframer = Deframer(1 << 24)
    deframer.feed(data)
    out: list[Frame] = []
    while (frame := deframer.next()) is not None:
        out.append(frame)
    assert not deframer.buffered
    return out


Input = Callable[[CoapTcpConnection], object]


def data(*frames: Frame) -> Input:
    return lambda c: c.receive_data(wire(*frames))


def raw(chunk: bytes) -> Input:
    return lambda c: c.receive_data(chunk)


def tick(now: float) -> Input:
    return lambda c: c.tick(now)


@dataclass
class Play:
    """One connection (CSM already read off) and the steps run so far."""

    config: ConnectionConfig = field(default_factory=ConnectionConfig)
    conn: CoapTcpConnection = field(init=False)

    def __post_init__(self) -> None:
        self.conn = CoapTcpConnection(self.config, now=0.0)
        assert frames_of(self.conn.data_to_send()) == [csm(self.config.max_message_size)]

    def run(self, steps: Sequence[tuple[Input, Sequence[ev.Event], Sequence[Frame]]]) -> None:
        for action, events, sent in steps:
            self.step(action, events, sent)

    def step(
        self, action: Input, events: Sequence[ev.Event] = (), sent: Sequence[Frame] = ()
    ) -> object:
        result = action(self.conn)
        assert self.conn.events() == list(events)
        assert frames_of(self.conn.data_to_send()) == list(sent)
        return result


# --------------------------------------------------------------------------- a whole conversation


def test_a_device_conversation_as_a_playbook() -> None:
    """The shape of a signed-in OCF device's connection: CSMs, a request of the device, an
    observation of ours with notifications, a Ping, and a graceful Release."""
    sign_in = Frame(POST, b"d1", ((URI_PATH, b"oic"), (URI_PATH, b"sec"), (URI_PATH, b"session")))
    d = get("/oic/d")
    p = Play()
    p.run(
        [
            (data(csm(2048, block_wise=True)), [ev.CsmReceived(2048, True)], []),
            (data(sign_in), [ev.RequestReceived(ev.Incoming(b"d1", 1), sign_in)], []),
            (
                lambda c: c.send_response(ev.Incoming(b"d1", 1), Frame(CHANGED)),
                [],
                [Frame(CHANGED, b"d1")],
            ),
            (lambda c: c.observe(d), [], [get("/oic/d", b"\x01", (OBSERVE, b""))]),
            (
                data(content(b"\x01", b"a", observe=2), content(b"\x01", b"b", observe=3)),
                [
                    ev.ResponseReceived(
                        ev.Outgoing(b"\x01", True), content(b"\x01", b"a", 2), False, 2
                    ),
                    ev.NotificationReceived(
                        ev.Outgoing(b"\x01", True), content(b"\x01", b"b", 3), 3, True
                    ),
                ],
                [],
            ),
            (data(Frame(PING, b"k")), [ev.PingReceived(b"k", False)], [Frame(PONG, b"k")]),
            (lambda c: c.release(), [], [Frame(RELEASE)]),
            (lambda c: c.receive_eof(), [ev.ConnectionClosed("closed by the peer")], []),
        ]
    )
    assert p.conn.state is State.CLOSED


# --------------------------------------------------------------------------- CSM


def test_our_csm_goes_first_and_the_peers_is_reported() -> None:
    conn = CoapTcpConnection(ConnectionConfig(max_message_size=4096, block_wise=False))
    assert frames_of(conn.data_to_send()) == [csm(4096)]  # W19: no Block-wise-Transfer
    assert conn.peer_max_message_size == 1152
    conn.receive_data(wire(csm(2048, block_wise=True)))
    assert conn.events() == [ev.CsmReceived(2048, True)]
    assert (conn.csm_received, conn.peer_max_message_size, conn.peer_block_wise) == (
        True,
        2048,
        True,
    )
    conn.receive_data(wire(csm()))  # a later CSM without the option keeps the value
    assert conn.events() == [ev.CsmReceived(2048, True)]


def test_block_wise_is_advertised_only_when_configured() -> None:
    conn = CoapTcpConnection(ConnectionConfig(max_message_size=4096, block_wise=True))
    assert frames_of(conn.data_to_send()) == [csm(4096, block_wise=True)]


def test_a_peer_that_never_sends_a_csm_is_served() -> None:
    """W2: iotivity-lite sends a request first and never a CSM."""
    p = Play()
    request = get("/oic/res", b"t1")
    p.step(data(request), [ev.RequestReceived(ev.Incoming(b"t1", 1), request)])
    p.step(
        lambda c: c.send_response(ev.Incoming(b"t1", 1), content(b"ignored")),
        [],
        [content(b"t1")],
    )
    assert not p.conn.csm_received
    assert p.conn.peer_max_message_size == 1152


def test_an_unknown_critical_csm_option_aborts_with_bad_csm_option() -> None:
    p = Play()
    p.step(
        data(Frame(CSM, b"", ((9, b"x"),))),
        [ev.ConnectionFailed(FailureKind.BAD_SIGNAL, "unknown critical option 9 in a CSM")],
        [Frame(ABORT, b"", ((2, b"\x09"),), b"unknown critical option 9 in a CSM")],
    )
    assert p.conn.state is State.CLOSED


def test_an_unknown_elective_csm_option_is_ignored() -> None:
    p = Play()
    p.step(
        data(Frame(CSM, b"", ((2, encode_uint(3000)), (10, b"x")))), [ev.CsmReceived(3000, False)]
    )


# --------------------------------------------------------------------------- requests


def test_requests_and_responses_are_matched_by_token() -> None:
    p = Play()
    a = p.step(lambda c: c.send_request(get("/a")), [], [get("/a", b"\x01")])
    b = p.step(lambda c: c.send_request(get("/b", b"ignored")), [], [get("/b", b"\x02")])
    assert a == ev.Outgoing(b"\x01") and b == ev.Outgoing(b"\x02")
    assert p.conn.pending == 2
    p.step(
        data(content(b"\x02", b"B"), content(b"\x09"), content(b"\x01", b"A")),
        [
            ev.ResponseReceived(ev.Outgoing(b"\x02"), content(b"\x02", b"B"), True),
            ev.ResponseReceived(ev.Outgoing(b"\x01"), content(b"\x01", b"A"), True),
        ],
    )
    assert p.conn.ignored_responses == 1  # the unknown token
    assert p.conn.pending == 0


def test_tokens_are_never_reused_on_a_connection() -> None:
    p = Play()
    tokens = set()
    for _ in range(300):
        handle = p.conn.send_request(get("/a"))
        p.conn.receive_data(wire(content(handle.token)))
        tokens.add(handle.token)
    assert len(tokens) == 300
    assert max(len(t) for t in tokens) == 2


def test_a_request_times_out_by_tick_and_its_late_response_is_ignored() -> None:
    p = Play(ConnectionConfig(request_timeout=5.0))
    handle = p.step(lambda c: c.send_request(get("/a")), [], [get("/a", b"\x01")])
    assert isinstance(handle, ev.Outgoing)
    quick = p.step(lambda c: c.send_request(get("/b"), timeout=1.0), [], [get("/b", b"\x02")])
    assert p.conn.next_deadline() == 1.0
    p.step(tick(0.99))
    p.step(tick(1.0), [ev.RequestTimedOut(ev.Outgoing(b"\x02"))])
    assert quick == ev.Outgoing(b"\x02")
    p.step(tick(4.99))
    p.step(tick(5.0), [ev.RequestTimedOut(handle)])
    p.step(data(content(b"\x01")))
    assert p.conn.ignored_responses == 1
    assert p.conn.next_deadline() is None


def test_unknown_critical_options_are_refused_here() -> None:
    """W14: 4.02 Bad Option (5.05 for proxying), before the layer above sees the request."""
    p = Play()
    bad = get("/a", b"t", (9, b"x"))
    p.step(
        data(bad),
        [ev.RequestRefused(bad, 130, "unrecognised critical option 9")],
        [Frame(130, b"t", (), b"unrecognised critical option 9")],
    )
    proxy = get("/a", b"u", (35, b"coap://x"))
    p.step(
        data(proxy),
        [ev.RequestRefused(proxy, 165, "proxying not supported (option 35)")],
        [Frame(165, b"u", (), b"proxying not supported (option 35)")],
    )
    # a malformed elective option is dropped, the request served
    odd = get("/a", b"v", (CONTENT_FORMAT, b"\x01\x02\x03"))
    p.step(data(odd), [ev.RequestReceived(ev.Incoming(b"v", 1), get("/a", b"v"))])


def test_empty_messages_are_ignored_and_reserved_classes_abort() -> None:
    """W15."""
    p = Play()
    p.step(data(Frame(0), Frame(0)))
    diagnostic = "message format error: reserved code 1.01"
    p.step(
        data(Frame(33, b"t")),
        [ev.ConnectionFailed(FailureKind.FORMAT_ERROR, diagnostic)],
        [Frame(ABORT, b"", (), diagnostic.encode())],
    )


def test_a_response_to_an_unknown_handle_is_refused() -> None:
    p = Play()
    p.step(data(get("/a", b"t")), [ev.RequestReceived(ev.Incoming(b"t", 1), get("/a", b"t"))])
    p.step(lambda c: c.send_response(ev.Incoming(b"t", 1), content(b"")), [], [content(b"t")])
    with pytest.raises(UnknownHandle):
        p.conn.send_response(ev.Incoming(b"t", 1), content(b""))  # answered already
    p.step(data(get("/a", b"t")), [ev.RequestReceived(ev.Incoming(b"t", 2), get("/a", b"t"))])
    with pytest.raises(UnknownHandle):
        p.conn.send_response(ev.Incoming(b"t", 1), content(b""))  # an older request's handle


# --------------------------------------------------------------------------- sizes


def test_a_message_above_our_max_message_size_aborts() -> None:
    p = Play(ConnectionConfig(max_message_size=64))
    big = encode_frame(Frame(POST, b"t", (), b"x" * 100))
    diagnostic = "message too large: 105 bytes announced, limit 64"
    p.step(
        raw(big[:3]),  # the header is enough
        [ev.ConnectionFailed(FailureKind.TOO_LARGE, diagnostic)],
        [Frame(ABORT, b"", (), diagnostic.encode())],
    )
    p.step(raw(big[3:]))  # closed: ignored


def test_a_request_above_the_peers_max_message_size_is_not_sent() -> None:
    p = Play()
    big = Frame(POST, b"", ((URI_PATH, b"a"),), b"x" * 1200)
    with pytest.raises(MessageTooLarge) as caught:
        p.conn.send_request(big)
    assert (caught.value.limit, caught.value.code) == (1152, "4.13")
    p.step(lambda c: None)  # nothing was written
    p.step(data(csm(4096)), [ev.CsmReceived(4096, False)])
    p.step(lambda c: c.send_request(big), [], [Frame(POST, b"\x01", big.options, big.payload)])


def test_a_response_above_the_peers_max_message_size_is_not_sent() -> None:
    p = Play()
    p.step(
        data(csm(100), get("/a", b"t")),
        [ev.CsmReceived(100, False), ev.RequestReceived(ev.Incoming(b"t", 1), get("/a", b"t"))],
    )
    with pytest.raises(MessageTooLarge):
        p.conn.send_response(ev.Incoming(b"t", 1), content(b"", b"y" * 200))
    p.step(lambda c: c.send_response(ev.Incoming(b"t", 1), content(b"")), [], [content(b"t")])


def test_a_peer_without_csm_gets_a_large_answer_whole() -> None:
    """iotivity-lite sends no CSM, and the reply to its publication echoes its links: the base
    1,152 bytes bind our requests to it, not our answers."""
    p = Play()
    p.step(data(get("/a", b"t")), [ev.RequestReceived(ev.Incoming(b"t", 1), get("/a", b"t"))])
    big = content(b"", b"y" * 2000)
    p.step(
        lambda c: c.send_response(ev.Incoming(b"t", 1), big),
        [],
        [Frame(big.code, b"t", big.options, big.payload)],
    )


# --------------------------------------------------------------------------- observe


def test_an_observation_and_its_notifications_carry_the_sequence() -> None:
    p = Play()
    h = p.step(lambda c: c.observe(get("/oic/d")), [], [get("/oic/d", b"\x01", (OBSERVE, b""))])
    assert h == ev.Outgoing(b"\x01", observe=True)
    assert isinstance(h, ev.Outgoing)
    p.step(
        data(content(b"\x01", b"0", observe=5)),
        [ev.ResponseReceived(h, content(b"\x01", b"0", 5), False, 5)],
    )
    assert p.conn.next_deadline() is None  # established: no deadline
    p.step(tick(100.0))
    p.step(
        data(content(b"\x01", b"1", observe=6), content(b"\x01", b"2", observe=9)),
        [
            ev.NotificationReceived(h, content(b"\x01", b"1", 6), 6, True),
            ev.NotificationReceived(h, content(b"\x01", b"2", 9), 9, True),
        ],
    )
    end = Frame(NOT_FOUND, b"\x01")
    p.step(data(end), [ev.ResponseReceived(h, end, True)])
    assert p.conn.pending == 0


def test_a_resource_that_is_not_observable_answers_once() -> None:
    """No Observe in the first response (or an error): the registration failed, the exchange
    ended."""
    p = Play()
    h = p.step(lambda c: c.observe(get("/r")), [], [get("/r", b"\x01", (OBSERVE, b""))])
    assert isinstance(h, ev.Outgoing)
    p.step(data(content(b"\x01")), [ev.ResponseReceived(h, content(b"\x01"), True)])
    g = p.step(lambda c: c.observe(get("/r")), [], [get("/r", b"\x02", (OBSERVE, b""))])
    assert isinstance(g, ev.Outgoing)
    refused = Frame(NOT_FOUND, b"\x02", ((OBSERVE, b"\x05"),))
    p.step(data(refused), [ev.ResponseReceived(g, refused, True, 5)])
    assert p.conn.pending == 0
    with pytest.raises(ValueError, match="only GET and FETCH"):
        p.conn.observe(Frame(POST))


def test_a_stale_notification_is_flagged_and_delivered_by_default() -> None:
    """W3: over TCP the order is the stream's, so every notification is handed over; RFC 7641
    section 3.4 freshness is reported."""
    p = Play()
    h = p.step(lambda c: c.observe(get("/r")), [], [get("/r", b"\x01", (OBSERVE, b""))])
    assert isinstance(h, ev.Outgoing)
    p.step(
        data(content(b"\x01", observe=7)),
        [ev.ResponseReceived(h, content(b"\x01", observe=7), False, 7)],
    )
    p.step(
        data(content(b"\x01", b"old", observe=6)),
        [ev.NotificationReceived(h, content(b"\x01", b"old", 6), 6, False)],
    )
    p.step(
        data(content(b"\x01", b"same", observe=7)),
        [ev.NotificationReceived(h, content(b"\x01", b"same", 7), 7, False)],
    )
    p.step(
        data(content(b"\x01", b"new", observe=8)),
        [ev.NotificationReceived(h, content(b"\x01", b"new", 8), 8, True)],
    )


def test_a_stale_notification_is_dropped_when_configured() -> None:
    p = Play(ConnectionConfig(stale_notifications=StalePolicy.DROP))
    h = p.step(lambda c: c.observe(get("/r")), [], [get("/r", b"\x01", (OBSERVE, b""))])
    assert isinstance(h, ev.Outgoing)
    p.step(
        data(content(b"\x01", observe=7)),
        [ev.ResponseReceived(h, content(b"\x01", observe=7), False, 7)],
    )
    p.step(data(content(b"\x01", b"old", observe=6)))
    p.step(tick(200.0))  # 128 s later any number is fresh
    p.step(
        data(content(b"\x01", b"late", observe=3)),
        [ev.NotificationReceived(h, content(b"\x01", b"late", 3), 3, True)],
    )


def test_cancelling_an_observation_sends_get_observe_1_on_its_token() -> None:
    """W4: deregistration is explicit over TCP; the peer's answer ends the exchange."""
    p = Play()
    h = p.step(
        lambda c: c.observe(get("/r", b"", (17, encode_uint(10000)))),
        [],
        [get("/r", b"\x01", (OBSERVE, b""), (17, encode_uint(10000)))],
    )
    assert isinstance(h, ev.Outgoing)
    p.step(
        data(content(b"\x01", observe=1)),
        [ev.ResponseReceived(h, content(b"\x01", observe=1), False, 1)],
    )
    p.step(
        lambda c: c.cancel_observation(h),
        [],
        [get("/r", b"\x01", (OBSERVE, b"\x01"), (17, encode_uint(10000)))],
    )
    p.step(
        data(content(b"\x01", b"bye", observe=2)),
        [ev.ResponseReceived(h, content(b"\x01", b"bye", 2), True, 2)],
    )
    with pytest.raises(UnknownHandle):
        p.conn.cancel_observation(h)


def test_a_forgotten_observation_ignores_what_follows() -> None:
    p = Play()
    h = p.step(lambda c: c.observe(get("/r")), [], [get("/r", b"\x01", (OBSERVE, b""))])
    assert isinstance(h, ev.Outgoing)
    p.conn.forget(h)
    p.step(data(content(b"\x01", observe=1)))
    assert p.conn.ignored_responses == 1


def test_we_notify_an_observer_with_increasing_sequence_numbers() -> None:
    p = Play()
    reg = get("/s", b"o", (OBSERVE, b""))
    handle = ev.Incoming(b"o", 1, observe=True)
    p.step(data(reg), [ev.RequestReceived(handle, reg)])
    for seq in (1, 2, 3):
        p.step(
            lambda c: c.send_response(handle, content(b"", b"n", observe=99), keep_observing=True),
            [],
            [content(b"o", b"n", observe=seq)],
        )
    p.step(lambda c: c.send_response(handle, Frame(NOT_FOUND)), [], [Frame(NOT_FOUND, b"o")])
    with pytest.raises(UnknownHandle):
        p.conn.send_response(handle, content(b""), keep_observing=True)


def test_keep_observing_needs_an_observe_request() -> None:
    p = Play()
    p.step(data(get("/s", b"o")), [ev.RequestReceived(ev.Incoming(b"o", 1), get("/s", b"o"))])
    with pytest.raises(ValueError, match="did not ask to observe"):
        p.conn.send_response(ev.Incoming(b"o", 1), content(b""), keep_observing=True)


# --------------------------------------------------------------------------- Ping, Release, Abort


def test_a_ping_is_answered_with_a_pong_on_its_token() -> None:
    p = Play()
    p.step(data(Frame(PING, b"pt")), [ev.PingReceived(b"pt", False)], [Frame(PONG, b"pt")])
    p.step(
        data(Frame(PING, b"", ((2, b""),))),
        [ev.PingReceived(b"", True)],
        [Frame(PONG, b"", ((2, b""),))],
    )


def test_our_ping_answered_in_time_keeps_the_connection() -> None:
    p = Play(ConnectionConfig(ping_timeout=10.0))
    p.step(lambda c: c.ping(), [], [Frame(PING)])
    assert p.conn.next_deadline() == 10.0
    p.step(tick(5.0))
    p.step(data(Frame(PONG)), [ev.PongReceived(b"")])
    p.step(tick(20.0))
    assert p.conn.state is State.OPEN


def test_our_ping_unanswered_fails_the_connection() -> None:
    p = Play(ConnectionConfig(ping_timeout=10.0))
    p.step(lambda c: c.ping(), [], [Frame(PING)])
    p.step(data(get("/a", b"t")), [ev.RequestReceived(ev.Incoming(b"t", 1), get("/a", b"t"))])
    p.step(tick(9.9))
    diagnostic = "keepalive timeout: no Pong within 10.0s"
    p.step(
        tick(10.0),
        [ev.ConnectionFailed(FailureKind.PING_TIMEOUT, diagnostic)],
        [Frame(ABORT, b"", (), diagnostic.encode())],
    )
    assert p.conn.state is State.CLOSED
    with pytest.raises(ConnectionNotOpen):
        p.conn.send_response(ev.Incoming(b"t", 1), content(b""))


def test_keepalive_pings_an_idle_peer() -> None:
    """W8."""
    p = Play(ConnectionConfig(keepalive_interval=30.0, ping_timeout=5.0))
    p.step(tick(20.0))
    p.step(data(Frame(0)), [])  # input moves the idle clock
    p.conn.tick(25.0)
    p.step(raw(wire(Frame(0))))
    assert p.conn.next_deadline() == 55.0
    p.step(tick(55.0), [], [Frame(PING)])
    p.step(tick(59.0))
    p.step(data(Frame(PONG)), [ev.PongReceived(b"")])


def test_we_release_with_the_rfcs_options_and_send_no_new_request() -> None:
    p = Play()
    p.step(data(get("/a", b"t")), [ev.RequestReceived(ev.Incoming(b"t", 1), get("/a", b"t"))])
    pending = p.step(lambda c: c.send_request(get("/b")), [], [get("/b", b"\x01")])
    p.step(
        lambda c: c.release("coaps+tcp://gw2:5684", hold_off=3),
        [],
        [Frame(RELEASE, b"", ((2, b"coaps+tcp://gw2:5684"), (4, b"\x03")))],
    )
    assert p.conn.state is State.RELEASING
    with pytest.raises(ConnectionNotOpen):
        p.conn.send_request(get("/c"))
    # what was in flight completes
    p.step(lambda c: c.send_response(ev.Incoming(b"t", 1), content(b"")), [], [content(b"t")])
    assert isinstance(pending, ev.Outgoing)
    p.step(data(content(b"\x01")), [ev.ResponseReceived(pending, content(b"\x01"), True)])
    p.step(lambda c: c.close())
    assert p.conn.state is State.CLOSED


def test_a_release_received_is_reported_and_stops_our_requests() -> None:
    p = Play()
    release = Frame(RELEASE, b"", ((2, b"coap+tcp://a"), (2, b"coap+tcp://b"), (4, b"\x3c")))
    p.step(data(release), [ev.ReleaseReceived(("coap+tcp://a", "coap+tcp://b"), 60)])
    assert p.conn.state is State.RELEASING
    with pytest.raises(ConnectionNotOpen):
        p.conn.send_request(get("/c"))
    p.step(data(Frame(RELEASE)), [ev.ReleaseReceived((), None)])


def test_an_abort_received_closes() -> None:
    p = Play()
    h = p.step(lambda c: c.send_request(get("/a")), [], [get("/a", b"\x01")])
    p.step(data(Frame(ABORT, b"", ((2, b"\x02"),), b"bye")), [ev.AbortReceived("bye", 2)])
    assert p.conn.state is State.CLOSED and p.conn.pending == 0
    p.step(data(content(b"\x01")))  # closed: nothing more
    assert isinstance(h, ev.Outgoing)


def test_we_abort_with_a_diagnostic_and_bad_csm_option() -> None:
    p = Play()
    p.step(
        lambda c: c.abort("é" * 400, bad_csm_option=2),
        [],
        [Frame(ABORT, b"", ((2, b"\x02"),), ("é" * 256).encode())],
    )
    assert p.conn.state is State.CLOSED
    p.step(lambda c: c.abort("again"))  # once


def test_an_unknown_critical_option_in_a_signal_aborts() -> None:
    p = Play()
    diagnostic = "unknown critical option 3 in a signalling message"
    p.step(
        data(Frame(PING, b"", ((3, b""),))),
        [ev.ConnectionFailed(FailureKind.BAD_SIGNAL, diagnostic)],
        [Frame(ABORT, b"", (), diagnostic.encode())],
    )


def test_an_unknown_signal_code_aborts() -> None:
    p = Play()
    p.step(
        data(Frame(230)),
        [ev.ConnectionFailed(FailureKind.BAD_SIGNAL, "unknown signalling code 7.06")],
        [Frame(ABORT, b"", (), b"unknown signalling code 7.06")],
    )


# --------------------------------------------------------------------------- errors, EOF, timers


@pytest.mark.parametrize(
    ("chunk", "diagnostic"),
    [
        (b"\x09\x01" + b"t" * 9, "message format error: token length 9 (at most 8)"),
        (b"\x10\x01\xff", "message format error: payload marker without payload"),
        (b"\x10\x01\xf0", "message format error: option delta uses the reserved value 15"),
    ],
)
def test_a_format_error_aborts_with_its_diagnostic_then_closes(
    chunk: bytes, diagnostic: str
) -> None:
    p = Play()
    p.step(
        raw(chunk),
        [ev.ConnectionFailed(FailureKind.FORMAT_ERROR, diagnostic)],
        [Frame(ABORT, b"", (), diagnostic.encode())],
    )
    assert p.conn.state is State.CLOSED
    p.step(data(get("/a", b"t")))
    p.step(tick(1e9))


def test_the_peer_closing_between_messages_or_inside_one() -> None:
    p = Play()
    p.step(lambda c: c.receive_eof(), [ev.ConnectionClosed("closed by the peer")])
    q = Play()
    q.step(raw(wire(get("/a", b"t"))[:3]))
    q.step(
        lambda c: c.receive_eof(),
        [
            ev.ConnectionFailed(
                FailureKind.TRUNCATED,
                "closed by the peer in the middle of a message (3 bytes held)",
            )
        ],
    )


def test_opening_timeout_unless_a_csm_or_request_arrives() -> None:
    p = Play(ConnectionConfig(opening_timeout=5.0))
    diagnostic = "opening timeout: no CSM or request within 5.0s"
    p.step(
        tick(5.0),
        [ev.ConnectionFailed(FailureKind.OPENING_TIMEOUT, diagnostic)],
        [Frame(ABORT, b"", (), diagnostic.encode())],
    )
    q = Play(ConnectionConfig(opening_timeout=5.0))
    q.step(data(csm()), [ev.CsmReceived(1152, False)])
    q.step(tick(50.0))
    assert q.conn.state is State.OPEN


def test_a_message_trickled_too_slowly_fails() -> None:
    """W8: the deadline runs from a message's first byte, however it is trickled."""
    p = Play(ConnectionConfig(message_timeout=2.0))
    whole = wire(Frame(POST, b"t", ((URI_PATH, b"a"),), b"x" * 30))
    p.conn.receive_data(whole[:1], now=1.0)
    p.conn.receive_data(whole[1:5], now=2.5)
    assert p.conn.next_deadline() == 3.0
    diagnostic = "message timeout: a message not complete within 2.0s"
    p.step(
        tick(3.0),
        [ev.ConnectionFailed(FailureKind.MESSAGE_TIMEOUT, diagnostic)],
        [Frame(ABORT, b"", (), diagnostic.encode())],
    )


def test_the_message_deadline_restarts_with_each_message() -> None:
    p = Play(ConnectionConfig(message_timeout=2.0))
    one = wire(get("/a", b"1"))
    p.conn.receive_data(one[:2], now=1.0)
    p.conn.receive_data(one[2:] + one[:2], now=2.9)  # one completes, the next begins
    assert p.conn.next_deadline() == 4.9
    p.conn.receive_data(one[2:], now=3.0)
    assert p.conn.next_deadline() is None
    assert len(p.conn.events()) == 2


# --------------------------------------------------------------------------- properties


def _conversation_frames() -> st.SearchStrategy[list[Frame]]:
    """What a peer may send after we sent requests with tokens 1..4 (4 an observation)."""
    tokens = st.sampled_from([b"\x01", b"\x02", b"\x03", b"\x04", b"\x07"])
    path = st.lists(st.sampled_from(["a", "oic", "d", "x" * 20]), min_size=1, max_size=3)
    request = st.builds(
        lambda t, p, pl: Frame(POST, t, tuple((URI_PATH, s.encode()) for s in p), pl),
        st.binary(max_size=8),
        path,
        st.binary(max_size=40),
    )
    response = st.builds(
        lambda t, obs, pl: content(t, pl, observe=obs),
        tokens,
        st.one_of(st.none(), st.integers(0, (1 << 24) - 1)),
        st.binary(max_size=40),
    )
    return st.lists(st.one_of(request, response), max_size=12)


signals = st.sampled_from(
    [Frame(PING, b"p"), Frame(PONG), csm(2048), Frame(0), Frame(PING, b"", ((2, b""),))]
)


def _run(chunks: Sequence[bytes], observe: bool = True) -> tuple[list[ev.Event], bytes]:
    conn = CoapTcpConnection(ConnectionConfig(), now=0.0)
    for _ in range(3):
        conn.send_request(get("/r"))
    conn.observe(get("/o"))
    conn.data_to_send()
    out: list[ev.Event] = []
    sent = bytearray()
    for chunk in chunks:
        conn.receive_data(chunk)
        out += conn.events()
        sent += conn.data_to_send()
    return out, bytes(sent)


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


@settings(max_examples=200, deadline=None)
@given(_conversation_frames(), st.lists(st.integers(0, 10_000), max_size=20))
def test_any_split_of_a_conversation_gives_the_same_events(
    frames: list[Frame], cuts: list[int]
) -> None:
    whole = wire(*frames)
    expected = _run([whole])
    assert _run(_split(whole, cuts)) == expected
    assert _run([whole[i : i + 1] for i in range(len(whole))]) == expected


@settings(max_examples=200, deadline=None)
@given(
    _conversation_frames(),
    st.lists(st.tuples(st.integers(0, 20), signals), max_size=8),
    st.lists(st.integers(0, 10_000), max_size=10),
)
def test_interleaved_signals_change_nothing_for_the_requests(
    frames: list[Frame], inserts: list[tuple[int, Frame]], cuts: list[int]
) -> None:
    plain, _ = _run([wire(*frames)])
    mixed_frames = list(frames)
    for position, signal in sorted(inserts, key=lambda i: -i[0]):
        mixed_frames.insert(min(position, len(mixed_frames)), signal)
    mixed, sent = _run(_split(wire(*mixed_frames), cuts))
    signal_events = (ev.PingReceived, ev.PongReceived, ev.CsmReceived)
    assert [e for e in mixed if not isinstance(e, signal_events)] == plain
    pings = sum(1 for f in mixed_frames if f.code == PING)
    assert [f.code for f in frames_of(sent) if f.code == PONG] == [PONG] * pings


@pytest.mark.parametrize(
    ("address", "hold_off", "message"),
    [
        ("", None, "Alternative-Address"),
        ("x" * 256, None, "Alternative-Address"),
        (None, 1 << 24, "Hold-Off"),
    ],
)
def test_release_options_out_of_range_are_refused(
    address: str | None, hold_off: int | None, message: str
) -> None:
    p = Play()
    with pytest.raises(ValueError, match=message):
        p.conn.release(address, hold_off)
    assert p.conn.state is State.OPEN
    p.step(lambda c: None)  # nothing sent


def test_a_closed_connection_lets_go_of_unread_input() -> None:
    """Found by atheris: what followed a fatal message in the same read stayed buffered."""
    p = Play()
    p.step(
        raw(wire(Frame(230)) + b"\x10" * 5000),
        [ev.ConnectionFailed(FailureKind.BAD_SIGNAL, "unknown signalling code 7.06")],
        [Frame(ABORT, b"", (), b"unknown signalling code 7.06")],
    )
    assert p.conn.buffered == 0

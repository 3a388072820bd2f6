"""RFC 8323 section 5 signalling messages: encode, parse, and their option rules."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gateway.adapters.coap_frames import Frame, encode_frame, parse_frame
from gateway.wire import events as ev
from gateway.wire import signals as sig


def _wire(frame: Frame) -> Frame:
    return parse_frame(encode_frame(frame))


def test_csm_carries_max_message_size_and_block_wise_only_when_asked() -> None:
    assert encode_frame(sig.csm(1152, False)) == bytes([0x30, 0xE1, 0x22, 0x04, 0x80])
    assert sig.parse_csm(_wire(sig.csm(65536, True))) == (65536, True)
    assert sig.parse_csm(Frame(sig.CSM)) == (None, False)


def test_pong_echoes_the_token_and_custody() -> None:
    assert sig.pong(Frame(sig.PING, b"ab")) == Frame(sig.PONG, b"ab")
    assert sig.pong(_wire(sig.ping(True))) == Frame(sig.PONG, b"", ((sig.CUSTODY, b""),))


@given(
    st.one_of(st.none(), st.text(min_size=1, max_size=60)),
    st.one_of(st.none(), st.integers(0, (1 << 24) - 1)),
)
def test_release_round_trips(address: str | None, hold_off: int | None) -> None:
    frame = sig.release(address, hold_off)
    expected = () if address is None else (address,)
    assert sig.parse_release(_wire(frame)) == ev.ReleaseReceived(expected, hold_off)


@given(st.text(max_size=700), st.one_of(st.none(), st.integers(0, 0xFFFF)))
def test_abort_round_trips_with_the_diagnostic_cut_on_a_character(
    diagnostic: str, bad: int | None
) -> None:
    received = sig.parse_abort(_wire(sig.abort(diagnostic, bad)))
    assert diagnostic.startswith(received.diagnostic)
    assert len(received.diagnostic.encode()) <= sig.MAX_DIAGNOSTIC
    assert received.bad_csm_option == bad


def test_option_numbers_are_per_signal_code() -> None:
    assert sig.unknown_critical_option(Frame(sig.PING, b"", ((2, b""),))) is None
    assert sig.unknown_critical_option(Frame(sig.PING, b"", ((4, b""),))) is None  # elective
    assert sig.unknown_critical_option(Frame(sig.PING, b"", ((5, b""),))) == 5
    assert sig.unknown_critical_option(Frame(sig.CSM, b"", ((2, b""), (4, b"")))) is None
    assert sig.unknown_critical_option(Frame(sig.CSM, b"", ((3, b""),))) == 3
    assert sig.unknown_critical_option(Frame(sig.RELEASE, b"", ((2, b"a"), (4, b"")))) is None
    assert sig.unknown_critical_option(Frame(sig.ABORT, b"", ((7, b""),))) == 7

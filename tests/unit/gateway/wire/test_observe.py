"""RFC 7641 on a connection: registrations and the freshness of notifications."""

from __future__ import annotations

from gateway.adapters.coap_frames import Frame
from gateway.wire import observe as obs


def test_a_registration_is_a_get_or_fetch_with_observe_0() -> None:
    assert obs.is_registration(Frame(1, b"", ((6, b""), (11, b"a"))))
    assert obs.is_registration(Frame(5, b"", ((6, b"\x00"),)))
    assert not obs.is_registration(Frame(1, b"", ((6, b"\x01"),)))  # deregistration
    assert not obs.is_registration(Frame(2, b"", ((6, b""),)))  # POST
    assert not obs.is_registration(Frame(1, b"", ((11, b"a"),)))


def test_with_observe_replaces_the_option() -> None:
    frame = Frame(1, b"t", ((6, b""), (11, b"a")), b"p")
    assert obs.with_observe(frame, b"\x01") == Frame(1, b"t", ((6, b"\x01"), (11, b"a")), b"p")


def test_freshness_follows_section_3_4_with_wrap_around() -> None:
    assert obs.is_fresh(1, 2, 0.0, 0.0)
    assert not obs.is_fresh(2, 1, 0.0, 0.0)
    assert not obs.is_fresh(5, 5, 0.0, 0.0)
    assert obs.is_fresh((1 << 24) - 1, 0, 0.0, 0.0)  # wrapped
    assert not obs.is_fresh(0, (1 << 23) + 1, 0.0, 0.0)  # too far ahead: older, wrapped back
    assert obs.is_fresh(9, 1, 0.0, 128.5)  # 128 s later anything is fresh
    assert not obs.is_fresh(9, 1, 0.0, 128.0)

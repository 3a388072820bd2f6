"""Option values on parsed frames."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gateway.adapters.coap_frames import Frame
from gateway.wire.options import decode_uint, encode_uint, option_value, uint_option


@given(st.integers(0, 2**64))
def test_uints_are_shortest_big_endian(value: int) -> None:
    encoded = encode_uint(value)
    assert decode_uint(encoded) == value
    assert not encoded.startswith(b"\x00")


def test_the_first_value_of_an_option_in_wire_order() -> None:
    frame = Frame(69, b"", ((6, b"\x05"), (11, b"a"), (11, b"b"), (2053, b"\x08\x00")))
    assert option_value(frame, 11) == b"a"
    assert option_value(frame, 12) is None
    assert uint_option(frame, 2053) == 0x0800
    assert uint_option(frame, 4) is None

"""Option values as CoAP puts them on the wire (RFC 7252 section 3.2), on parsed frames."""

from __future__ import annotations

from gateway.adapters.coap_frames import Frame


def encode_uint(value: int) -> bytes:
    """The shortest big-endian form (0 is empty), as CoAP uint options are sent."""
    return value.to_bytes((value.bit_length() + 7) // 8, "big")


def decode_uint(value: bytes) -> int:
    return int.from_bytes(value, "big")


def option_value(frame: Frame, number: int) -> bytes | None:
    """The first value of option ``number`` in a parsed ``frame`` (wire order), else None."""
    for n, value in frame.options:
        if n == number:
            return value
        if n > number:  # wire order is ascending
            break
    return None


def uint_option(frame: Frame, number: int) -> int | None:
    value = option_value(frame, number)
    return None if value is None else decode_uint(value)

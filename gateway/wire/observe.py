"""RFC 7641 on a connection: what registers an observation, and which notification is fresh."""

from __future__ import annotations

from typing import Final

from gateway.adapters import coap_frames as frames
from gateway.adapters.coap_frames import Frame
from gateway.wire.options import decode_uint, option_value

OBSERVE: Final = frames.OBSERVE
REGISTER: Final = b""  # Observe=0
DEREGISTER: Final = b"\x01"  # Observe=1
SEQUENCE_LIMIT: Final = 1 << 24
WINDOW: Final = 1 << 23
MAX_AGE: Final = 128.0
"""Section 3.4: a notification this much later than the last is fresh whatever its number."""
_OBSERVABLE_METHODS: Final = frozenset({1, 5})  # GET, FETCH


def is_registration(frame: Frame) -> bool:
    """A GET / FETCH with Observe=0."""
    if frame.code not in _OBSERVABLE_METHODS:
        return False
    value = option_value(frame, OBSERVE)
    return value is not None and decode_uint(value) == 0


def with_observe(frame: Frame, value: bytes) -> Frame:
    """``frame`` with its Observe option set to ``value`` (any other removed)."""
    options = ((OBSERVE, value), *(o for o in frame.options if o[0] != OBSERVE))
    return Frame(frame.code, frame.token, options, frame.payload)


def is_fresh(v1: int, v2: int, t1: float, t2: float) -> bool:
    """Section 3.4: is the notification numbered ``v2`` received at ``t2`` newer than the one
    numbered ``v1`` received at ``t1``?"""
    return (v1 < v2 and v2 - v1 < WINDOW) or (v1 > v2 and v1 - v2 > WINDOW) or t2 > t1 + MAX_AGE

"""RFC 8323 section 5, the signalling messages (codes 7.xx), as pure encode / parse functions."""

from __future__ import annotations

from typing import Final

from gateway.adapters import coap_frames as frames
from gateway.adapters.coap_frames import Frame
from gateway.wire import events as ev
from gateway.wire.options import decode_uint, encode_uint, option_value

CSM: Final = 225  # 7.01
PING: Final = 226  # 7.02
PONG: Final = 227  # 7.03
RELEASE: Final = 228  # 7.04
ABORT: Final = 229  # 7.05

BASE_MAX_MESSAGE_SIZE: Final = 1152
"""Section 5.3.1: what a peer accepts until its CSM says otherwise."""
MAX_DIAGNOSTIC: Final = 512
"""Longest diagnostic payload we send (bytes)."""

CUSTODY: Final = 2  # Ping, Pong
ALTERNATIVE_ADDRESS: Final = 2  # Release
HOLD_OFF: Final = 4  # Release
BAD_CSM_OPTION: Final = 2  # Abort
KNOWN_OPTIONS: Final = {
    CSM: frozenset({frames.CSM_MAX_MESSAGE_SIZE, frames.CSM_BLOCK_WISE_TRANSFER}),
    PING: frozenset({CUSTODY}),
    PONG: frozenset({CUSTODY}),
    RELEASE: frozenset({ALTERNATIVE_ADDRESS, HOLD_OFF}),
    ABORT: frozenset({BAD_CSM_OPTION}),
}
"""Signalling option numbers are per code; an unknown critical one is a protocol error."""


def diagnostic_payload(text: str) -> bytes:
    """``text`` cut to :data:`MAX_DIAGNOSTIC` bytes, on a character boundary."""
    return text.encode()[:MAX_DIAGNOSTIC].decode(errors="ignore").encode()


def unknown_critical_option(frame: Frame) -> int | None:
    """The first critical option of signal ``frame`` its code does not define, else None."""
    known = KNOWN_OPTIONS.get(frame.code, frozenset())
    for number, _ in frame.options:
        if number & 1 and number not in known:
            return number
    return None


def csm(max_message_size: int, block_wise: bool) -> Frame:
    options = [(frames.CSM_MAX_MESSAGE_SIZE, encode_uint(max_message_size))]
    if block_wise:
        options.append((frames.CSM_BLOCK_WISE_TRANSFER, b""))
    return Frame(CSM, b"", tuple(options))


def parse_csm(frame: Frame) -> tuple[int | None, bool]:
    """(Max-Message-Size if given, Block-wise-Transfer) of a CSM without unknown critical
    options (check :func:`unknown_critical_option` first)."""
    size = option_value(frame, frames.CSM_MAX_MESSAGE_SIZE)
    block_wise = option_value(frame, frames.CSM_BLOCK_WISE_TRANSFER) is not None
    return (None if size is None else decode_uint(size)), block_wise


def ping(custody: bool) -> Frame:
    return Frame(PING, b"", ((CUSTODY, b""),) if custody else ())


def pong(to: Frame) -> Frame:
    """The answer to Ping ``to``: its token, and Custody when it asked for it."""
    custody = option_value(to, CUSTODY) is not None
    return Frame(PONG, to.token, ((CUSTODY, b""),) if custody else ())


def release(alternative_address: str | None, hold_off: int | None) -> Frame:
    options: list[tuple[int, bytes]] = []
    if alternative_address is not None:
        address = alternative_address.encode()
        if not 1 <= len(address) <= 255:
            raise ValueError("an Alternative-Address has 1 to 255 bytes")
        options.append((ALTERNATIVE_ADDRESS, address))
    if hold_off is not None:
        if not 0 <= hold_off < 1 << 24:  # a uint of 0 to 3 bytes
            raise ValueError(f"Hold-Off out of range: {hold_off}")
        options.append((HOLD_OFF, encode_uint(hold_off)))
    return Frame(RELEASE, b"", tuple(options))


def parse_release(frame: Frame) -> ev.ReleaseReceived:
    addresses = tuple(
        value.decode(errors="replace") for n, value in frame.options if n == ALTERNATIVE_ADDRESS
    )
    hold_off = option_value(frame, HOLD_OFF)
    return ev.ReleaseReceived(addresses, None if hold_off is None else decode_uint(hold_off))


def abort(diagnostic: str, bad_csm_option: int | None = None) -> Frame:
    options = () if bad_csm_option is None else ((BAD_CSM_OPTION, encode_uint(bad_csm_option)),)
    return Frame(ABORT, b"", options, diagnostic_payload(diagnostic))


def parse_abort(frame: Frame) -> ev.AbortReceived:
    bad = option_value(frame, BAD_CSM_OPTION)
    return ev.AbortReceived(
        frame.payload.decode(errors="replace"), None if bad is None else decode_uint(bad)
    )

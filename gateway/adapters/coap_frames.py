"""RFC 8323 framing as pure functions: what a CoAP-over-TCP byte stream holds (no aiocoap, no I/O).

:class:`Deframer` cuts a stream into messages. It reads the length header first and refuses a
message above the size limit before any of its body is kept, and it never holds more than one
message (plus the few bytes of the next header). :func:`parse_frame` checks one message strictly
(RFC 7252 section 3.1 with RFC 8323 section 3.2): token length 9-15, the reserved nibble 15 in an
option delta or length, truncated options, option numbers above 65535 and a payload marker without
payload are message format errors -- over TCP the connection is aborted (7.05 with a diagnostic).

:func:`request_option_problem` holds the option rules of requests (RFC 7252 section 5.4): which
critical options we recognise, their value lengths and whether they repeat.

Everything raises :class:`FrameError` (a ``ValueError``) and nothing else, whatever the input:
the fuzz tests in ``tests/fuzz/`` hold us to it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

from gateway.errors import GatewayError

MAX_TOKEN: Final = 8
MAX_OPTION_NUMBER: Final = 0xFFFF
PAYLOAD_MARKER: Final = 0xFF
_EXTENDED: Final = {13: (1, 13), 14: (2, 269), 15: (4, 65805)}  # nibble -> (bytes, offset)


class FrameError(GatewayError, ValueError):
    """A message format error (RFC 8323 section 3.2): the connection must be aborted."""

    code = "4.00"


class FrameTooLarge(FrameError):
    """A message announced larger than our Max-Message-Size."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"message too large: {size} bytes announced, limit {limit}")
        self.size = size
        self.limit = limit


@dataclass(frozen=True, slots=True)
class Header:
    """The length header of one message: ``size`` bytes in all, the token after ``offset``."""

    offset: int  # bytes before the token: first byte, extended length, code
    token_length: int
    body_length: int  # options and payload

    @property
    def size(self) -> int:
        return self.offset + self.token_length + self.body_length


@dataclass(frozen=True, slots=True)
class Frame:
    """One CoAP-over-TCP message; ``options`` in wire order as ``(number, value)``."""

    code: int
    token: bytes = b""
    options: tuple[tuple[int, bytes], ...] = ()
    payload: bytes = b""


def read_header(data: bytes | bytearray | memoryview, limit: int | None = None) -> Header | None:
    """The header at the front of ``data``; None while it is incomplete.

    Raises :class:`FrameError` for a token length above 8 and :class:`FrameTooLarge` for a
    message larger than ``limit`` -- both known before the body arrives.
    """
    if not data:
        return None
    first = data[0]
    length, tkl = first >> 4, first & 0x0F
    if tkl > MAX_TOKEN:
        raise FrameError(f"message format error: token length {tkl} (at most {MAX_TOKEN})")
    extra = 0
    if length >= 13:
        extra, base = _EXTENDED[length]
        if len(data) < 1 + extra:
            return None
        length = int.from_bytes(data[1 : 1 + extra], "big") + base
    header = Header(2 + extra, tkl, length)
    if limit is not None and header.size > limit:
        raise FrameTooLarge(header.size, limit)
    return header


def _extended(nibble: int, data: memoryview, pos: int, what: str) -> tuple[int, int]:
    if nibble < 13:
        return nibble, pos
    if nibble == 15:
        raise FrameError(f"message format error: option {what} uses the reserved value 15")
    size, base = _EXTENDED[nibble]
    if pos + size > len(data):
        raise FrameError(f"message format error: option {what} truncated")
    return int.from_bytes(data[pos : pos + size], "big") + base, pos + size


def parse_frame(data: bytes | bytearray | memoryview) -> Frame:
    """Exactly one message (``data`` is as long as its header says); strict."""
    view = memoryview(data)
    header = read_header(view)
    if header is None:
        raise FrameError("message format error: empty or truncated header")
    if header.size != len(view):
        raise FrameError(
            f"message format error: header says {header.size} bytes, the message has {len(view)}"
        )
    code = view[header.offset - 1]
    token_end = header.offset + header.token_length
    token = bytes(view[header.offset : token_end])
    options: list[tuple[int, bytes]] = []
    number, pos, end = 0, token_end, len(view)
    payload = b""
    while pos < end:
        first = view[pos]
        if first == PAYLOAD_MARKER:
            if pos + 1 == end:
                raise FrameError("message format error: payload marker without payload")
            payload = bytes(view[pos + 1 :])
            break
        delta, pos = _extended(first >> 4, view, pos + 1, "delta")
        length, pos = _extended(first & 0x0F, view, pos, "length")
        number += delta
        if number > MAX_OPTION_NUMBER:
            raise FrameError(f"message format error: option number {number} above 65535")
        if pos + length > end:
            raise FrameError(f"message format error: option {number} truncated")
        options.append((number, bytes(view[pos : pos + length])))
        pos += length
    return Frame(code, token, tuple(options), payload)


def _ext(value: int) -> tuple[int, bytes]:
    if value < 13:
        return value, b""
    if value < 269:
        return 13, (value - 13).to_bytes(1, "big")
    if value < 65805:
        return 14, (value - 269).to_bytes(2, "big")
    return 15, (value - 65805).to_bytes(4, "big")


def encode_frame(frame: Frame) -> bytes:
    """The wire form of ``frame``; options are sorted by number (stable for repeats)."""
    if len(frame.token) > MAX_TOKEN:
        raise ValueError(f"a token has at most {MAX_TOKEN} bytes")
    body = bytearray()
    last = 0
    for number, value in sorted(frame.options, key=lambda o: o[0]):
        if not 0 <= number <= MAX_OPTION_NUMBER or len(value) > 65804:
            raise ValueError(f"option {number} out of range")
        delta, delta_ext = _ext(number - last)
        length, length_ext = _ext(len(value))
        body += bytes([(delta << 4) | length]) + delta_ext + length_ext + value
        last = number
    if frame.payload:
        body += b"\xff" + frame.payload
    length, length_ext = _ext(len(body))
    return bytes([(length << 4) | len(frame.token), *length_ext, frame.code]) + frame.token + body


class Deframer:
    """Cuts a byte stream into :class:`Frame` values.

    :meth:`feed` bytes as they arrive, then :meth:`next` until it returns None. A message whose
    header announces more than ``limit`` bytes raises :class:`FrameTooLarge` as soon as the header
    is in, so its body is never kept; after any :class:`FrameError` the stream is unusable (abort
    the connection). Each byte is copied a bounded number of times, however it is chunked.
    """

    __slots__ = ("_buffer", "_failed", "_header", "_start", "limit")

    def __init__(self, limit: int) -> None:
        self.limit: Final = limit
        self._buffer = bytearray()
        self._start = 0  # consumed bytes at the front of _buffer
        self._header: Header | None = None
        self._failed = False

    @property
    def buffered(self) -> int:
        """Bytes held (an incomplete message)."""
        return len(self._buffer) - self._start

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._failed:
            return
        if self._start:
            del self._buffer[: self._start]
            self._start = 0
        self._buffer += data

    def next(self) -> Frame | None:
        """The next complete message, or None until more bytes arrive."""
        if self._failed:
            return None
        view = memoryview(self._buffer)
        try:
            rest = view[self._start :]
            header = self._header
            if header is None:
                try:
                    header = read_header(rest, self.limit)
                except FrameError:
                    self._failed = True
                    raise
                if header is None:
                    return None
                self._header = header
            if len(rest) < header.size:
                return None
            try:
                frame = parse_frame(rest[: header.size])
            except FrameError:
                self._failed = True
                raise
            self._start += header.size
            self._header = None
            return frame
        finally:
            view.release()


# --------------------------------------------------------------------------- request options

CSM_MAX_MESSAGE_SIZE: Final = 2  # options of a CSM (RFC 8323 section 5.3)
CSM_BLOCK_WISE_TRANSFER: Final = 4

IF_MATCH: Final = 1
URI_HOST: Final = 3
ETAG: Final = 4
IF_NONE_MATCH: Final = 5
OBSERVE: Final = 6
URI_PORT: Final = 7
URI_PATH: Final = 11
CONTENT_FORMAT: Final = 12
URI_QUERY: Final = 15
ACCEPT: Final = 17
BLOCK2: Final = 23
BLOCK1: Final = 27
PROXY_URI: Final = 35
PROXY_SCHEME: Final = 39
SIZE1: Final = 60
NO_RESPONSE: Final = 258
OCF_ACCEPT_CONTENT_FORMAT_VERSION: Final = 2049
OCF_CONTENT_FORMAT_VERSION: Final = 2053


@dataclass(frozen=True, slots=True)
class OptionRule:
    min_length: int
    max_length: int
    repeatable: bool = False


REQUEST_OPTIONS: Final[Mapping[int, OptionRule]] = MappingProxyType(
    {
        URI_HOST: OptionRule(1, 255),  # accepted and ignored: we are one host
        OBSERVE: OptionRule(0, 3),
        URI_PORT: OptionRule(0, 2),  # accepted and ignored
        URI_PATH: OptionRule(0, 255, repeatable=True),
        CONTENT_FORMAT: OptionRule(0, 2),
        # RFC 7252 caps a Uri-Query at 255 bytes, but OCF devices put whole JWTs in the
        # sign-off query (`accesstoken=...`): accept those, the message size still bounds it.
        URI_QUERY: OptionRule(0, 8192, repeatable=True),
        ACCEPT: OptionRule(0, 2),
        SIZE1: OptionRule(0, 4),
        NO_RESPONSE: OptionRule(0, 1),
        OCF_ACCEPT_CONTENT_FORMAT_VERSION: OptionRule(0, 2),
        OCF_CONTENT_FORMAT_VERSION: OptionRule(0, 2),
    }
)
"""The options a device request may carry that we act on (or knowingly ignore). Not here, so
unrecognised: If-Match, If-None-Match, Block1, Block2 (no block-wise transfer on this server),
the proxy options, and every unknown number."""

_UTF8_OPTIONS: Final = frozenset({URI_HOST, URI_PATH, URI_QUERY})


def is_critical(number: int) -> bool:
    return bool(number & 1)


@dataclass(frozen=True, slots=True)
class OptionProblem:
    """Why a request cannot be served: reply ``code`` (4.02 / 5.05) with ``diagnostic``."""

    code: str
    diagnostic: str


def request_option_problem(options: tuple[tuple[int, bytes], ...]) -> OptionProblem | None:
    """RFC 7252 section 5.4 for a request's options (section 5.4.1: an unrecognised critical
    option -> 4.02 Bad Option; 5.4.3: a value of the wrong length or format, and 5.4.5: a
    supernumerary occurrence, are unrecognised options; 5.7.2: proxy options -> 5.05)."""
    seen: set[int] = set()
    for number, value in options:
        rule = REQUEST_OPTIONS.get(number)
        if number in (PROXY_URI, PROXY_SCHEME):
            return OptionProblem("5.05", f"proxying not supported (option {number})")
        problem: str | None = None
        if rule is None:
            problem = f"unrecognised critical option {number}"
        elif not rule.min_length <= len(value) <= rule.max_length:
            low, high = rule.min_length, rule.max_length
            problem = f"option {number}: length {len(value)} not in {low}..{high}"
        elif number in seen and not rule.repeatable:
            problem = f"option {number} repeated"
        elif number in _UTF8_OPTIONS and not _utf8(value):
            problem = f"option {number}: not UTF-8"
        seen.add(number)
        if problem is not None and is_critical(number):
            return OptionProblem("4.02", problem)
    return None


def _utf8(value: bytes) -> bool:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def usable_request_options(
    options: tuple[tuple[int, bytes], ...],
) -> tuple[tuple[int, bytes], ...]:
    """The options of a request that passed :func:`request_option_problem`, minus the elective
    ones to be ignored (unknown, malformed, supernumerary)."""
    kept: list[tuple[int, bytes]] = []
    seen: set[int] = set()
    for number, value in options:
        rule = REQUEST_OPTIONS.get(number)
        if rule is None or not rule.min_length <= len(value) <= rule.max_length:
            continue
        if number in seen and not rule.repeatable:
            continue
        seen.add(number)
        kept.append((number, value))
    return tuple(kept)

"""RFC 8323 framing (``gateway.adapters.coap_frames``): examples, properties, aiocoap as oracle."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from gateway.adapters.coap_frames import (
    Deframer,
    Frame,
    FrameError,
    FrameTooLarge,
    OptionProblem,
    encode_frame,
    parse_frame,
    read_header,
    request_option_problem,
    usable_request_options,
)

LIMIT = 1152

# --------------------------------------------------------------------------- examples


def raw(body: bytes, code: int = 1) -> bytes:
    """A message with ``body`` (options and payload) as is, no token; body < 13 bytes."""
    return bytes([len(body) << 4, code]) + body


MALFORMED = {
    "token length 9": bytes([0x09, 0x01]) + b"123456789",
    "token length 15": bytes([0x0F, 0x01]) + b"x" * 15,
    "option delta 15": raw(bytes([0xF1, 0x00])),
    "option length 15": raw(bytes([0x1F, 0x00])),
    "delta extension truncated": raw(bytes([0xD0])),
    "length extension truncated": raw(bytes([0x1E, 0x00])),
    "option value truncated": raw(bytes([0xB5, 0x61])),
    "option number above 65535": raw(bytes([0xE0, 0xFF, 0x00, 0xE0, 0xFF, 0x00])),
    "payload marker without payload": raw(bytes([0xFF])),
}


@pytest.mark.parametrize("data", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_messages_are_format_errors(data: bytes) -> None:
    with pytest.raises(FrameError, match="message format error"):
        parse_frame(data)
    deframer = Deframer(LIMIT)
    deframer.feed(data)
    with pytest.raises(FrameError):
        deframer.next()
    deframer.feed(encode_frame(Frame(1)))  # the stream is dead after an error
    assert deframer.next() is None


def test_a_long_token_is_refused_from_the_first_byte() -> None:
    deframer = Deframer(LIMIT)
    deframer.feed(bytes([0x09]))
    with pytest.raises(FrameError, match="token length 9"):
        deframer.next()


@pytest.mark.parametrize(
    ("header", "size"),
    [
        (bytes([0xD0, 0xFF]), 3 + 255 + 13),
        (bytes([0xE0, 0xFF, 0xFF]), 4 + 65535 + 269),
        (bytes([0xF8, 0xFF, 0xFF, 0xFF, 0xFF]), 6 + 8 + 0xFFFFFFFF + 65805),
        (bytes([0xF0, *(100 * 1024 * 1024 - 65805).to_bytes(4, "big")]), 6 + 100 * 1024 * 1024),
    ],
)
def test_an_oversized_message_is_refused_from_its_header(header: bytes, size: int) -> None:
    deframer = Deframer(LIMIT if size > LIMIT else 270)
    deframer.feed(header)
    with pytest.raises(FrameTooLarge) as raised:
        deframer.next()
    assert raised.value.size == size
    assert str(raised.value).startswith(f"message too large: {size} bytes announced, limit ")
    assert deframer.buffered == len(header)


def test_header_in_pieces() -> None:
    assert read_header(b"") is None
    assert read_header(bytes([0xE0, 0x00])) is None  # needs two extension bytes
    header = read_header(bytes([0xE0, 0x00, 0x01, 0x45]))
    assert header is not None
    assert (header.offset, header.token_length, header.body_length) == (4, 0, 270)


def test_a_message_of_exactly_the_limit_passes() -> None:
    frame = Frame(2, b"t", ((11, b"a"),), b"x" * (LIMIT - 8))
    data = encode_frame(frame)
    assert len(data) == LIMIT
    deframer = Deframer(LIMIT)
    deframer.feed(data)
    assert deframer.next() == frame
    deframer.feed(encode_frame(Frame(2, b"t", (), b"x" * LIMIT)))
    with pytest.raises(FrameTooLarge):
        deframer.next()


def test_empty_and_signalling_messages() -> None:
    assert parse_frame(bytes([0x00, 0x00])) == Frame(0)
    assert parse_frame(bytes([0x01, 0xE2, 0x07])) == Frame(0xE2, b"\x07")


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        (((11, b"a"), (15, b"q=1"), (17, b"\x27\x10")), None),
        (((3, b"gw"), (7, b"\x16\x33"), (2049, b"\x08\x00"), (2053, b"\x08\x00")), None),
        (((9, b""),), OptionProblem("4.02", "unrecognised critical option 9")),
        (((2051, b"x"),), OptionProblem("4.02", "unrecognised critical option 2051")),
        (((1, b"etag"),), OptionProblem("4.02", "unrecognised critical option 1")),
        (((27, b"\x0e"),), OptionProblem("4.02", "unrecognised critical option 27")),
        (((11, b"\xff\xfe"),), OptionProblem("4.02", "option 11: not UTF-8")),
        (((11, b"x" * 256),), OptionProblem("4.02", "option 11: length 256 not in 0..255")),
        (((17, b"\x00\x00\x01"),), OptionProblem("4.02", "option 17: length 3 not in 0..2")),
        (((17, b""), (17, b"")), OptionProblem("4.02", "option 17 repeated")),
        (((35, b"coap://x"),), OptionProblem("5.05", "proxying not supported (option 35)")),
        (((6, b"\x00" * 4), (12, b""), (12, b""), (40, b"junk")), None),  # elective: ignored
    ],
)
def test_request_option_rules(
    options: tuple[tuple[int, bytes], ...], problem: OptionProblem | None
) -> None:
    assert request_option_problem(options) == problem


def test_ignored_elective_options_are_dropped() -> None:
    options = ((6, b"\x00" * 4), (11, b"a"), (12, b"\x00"), (12, b"\x01"), (40, b"j"), (11, b"b"))
    assert usable_request_options(options) == ((11, b"a"), (12, b"\x00"), (11, b"b"))


# --------------------------------------------------------------------------- properties

option_numbers = st.one_of(
    st.sampled_from([1, 3, 4, 6, 7, 11, 12, 14, 15, 17, 23, 27, 35, 60, 258, 2049, 2053]),
    st.integers(0, 0xFFFF),
)
frames = st.builds(
    Frame,
    code=st.integers(0, 255),
    token=st.binary(max_size=8),
    options=st.lists(st.tuples(option_numbers, st.binary(max_size=300)), max_size=6).map(
        lambda o: tuple(sorted(o, key=lambda x: x[0]))
    ),
    payload=st.binary(max_size=400),
)


@given(frames)
def test_encode_then_parse_is_identity(frame: Frame) -> None:
    data = encode_frame(frame)
    assert parse_frame(data) == frame
    header = read_header(data)
    assert header is not None
    assert header.size == len(data)


@settings(max_examples=300)
@given(st.binary(max_size=600), st.lists(st.integers(1, 64), max_size=40))
@example(bytes([0xD0, 0x00, 0x01]) * 3, [1, 1])
@example(bytes([0x60, 0x02, 0xE0, 0xFF, 0x00, 0xFF, 0x61]), [])
def test_any_bytes_in_any_chunks_give_frames_or_one_format_error(
    data: bytes, cuts: list[int]
) -> None:
    whole = _run(Deframer(512), [data])
    pieces, pos = [], 0
    for cut in cuts:
        pieces.append(data[pos : pos + cut])
        pos += cut
    pieces.append(data[pos:])
    assert _run(Deframer(512), pieces) == whole


def _run(deframer: Deframer, pieces: list[bytes]) -> tuple[list[Frame], str | None]:
    out: list[Frame] = []
    for piece in pieces:
        deframer.feed(piece)
        while True:
            try:
                frame = deframer.next()
            except FrameError as e:  # anything else fails the test
                return out, type(e).__name__
            if frame is None:
                break
            out.append(frame)
            assert encode_frame(frame) is not None
        assert deframer.buffered <= 512 + 6
    return out, None


@given(st.lists(frames, max_size=8), st.integers(1, 7))
def test_a_stream_of_frames_comes_out_whole_whatever_the_chunking(
    stream: list[Frame], step: int
) -> None:
    data = b"".join(encode_frame(f) for f in stream)
    deframer = Deframer(1 << 20)
    got: list[Frame] = []
    for i in range(0, len(data), step):
        deframer.feed(data[i : i + step])
        while (frame := deframer.next()) is not None:
            got.append(frame)
    assert got == stream
    assert deframer.buffered == 0

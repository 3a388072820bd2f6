"""Plain CoAP values to and from frames, pinned byte for byte.

The expected frames are what the aiocoap adapter this code replaced sent and read (derived by
running it, before it was deleted), so the switch changed no wire byte: options in option-number
order (repeats in the order given), unsigned values in their shortest form (0 as the empty
value), the OCF version options defaulted only for OCF CBOR (W12), never an Accept unless asked.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.adapters.coap_frames import Frame, encode_frame, parse_frame
from gateway.adapters.coap_messages import CoapRequest, CoapResponse
from gateway.wire.messages import (
    block_wise_problem,
    request_frame,
    request_value,
    response_frame,
    response_value,
)

segment = st.text(st.characters(codec="utf-8", exclude_characters="/"), max_size=8)
uint16 = st.one_of(st.none(), st.integers(0, 0xFFFF))

requests = st.builds(
    CoapRequest,
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE"]),
    path=st.lists(segment, max_size=4).map(lambda p: "/" + "/".join(p)),
    query=st.lists(st.text(max_size=12), max_size=3).map(tuple),
    payload=st.binary(max_size=20),
    content_format=st.one_of(uint16, st.just(10000)),
    accept=st.one_of(uint16, st.just(10000)),
    observe=st.one_of(st.none(), st.sampled_from([0, 1]), st.integers(0, (1 << 24) - 1)),
    ocf_version=uint16,
    ocf_accept_version=uint16,
)
responses = st.builds(
    CoapResponse,
    code=st.sampled_from(["2.01", "2.04", "2.05", "4.00", "4.04", "5.00"]),
    payload=st.binary(max_size=20),
    content_format=st.one_of(uint16, st.just(10000)),
    max_age=st.one_of(st.none(), st.integers(0, (1 << 32) - 1)),
    etag=st.one_of(st.none(), st.binary(min_size=1, max_size=8)),
    ocf_version=uint16,
)

LONG = "s" * 300  # an option value above 268 bytes: the two-byte extended length

# --------------------------------------------------------------------------- encoding, by example


@pytest.mark.parametrize(
    ("request_", "expected"),
    [
        (CoapRequest("GET", "/"), Frame(1)),
        (
            CoapRequest("GET", "/oic/res", ("rt=oic.wk.d", "if=oic.if.baseline")),
            Frame(
                1,
                b"",
                ((11, b"oic"), (11, b"res"), (15, b"rt=oic.wk.d"), (15, b"if=oic.if.baseline")),
            ),
        ),
        (
            CoapRequest("GET", "/a//b/", observe=0),
            Frame(1, b"", ((6, b""), (11, b"a"), (11, b""), (11, b"b"), (11, b""))),
        ),
        (
            CoapRequest("GET", "/light", observe=1, accept=50),
            Frame(1, b"", ((6, b"\x01"), (11, b"light"), (17, b"2"))),
        ),
        (
            CoapRequest("POST", "/light", ("q=", ""), b"\xbf\xff", content_format=60, accept=10000),
            Frame(
                2,
                b"",
                (
                    (11, b"light"),
                    (12, b"<"),
                    (15, b"q="),
                    (15, b""),
                    (17, b"\x27\x10"),
                    (2049, b"\x08\x00"),
                ),
                b"\xbf\xff",
            ),
        ),
        (
            CoapRequest(
                "PUT",
                "/ü/x",
                payload=b"p",
                content_format=0,
                accept=0,
                ocf_version=0,
                ocf_accept_version=0,
            ),
            Frame(
                3,
                b"",
                (
                    (11, b"\xc3\xbc"),
                    (11, b"x"),
                    (12, b""),
                    (17, b""),
                    (2049, b""),
                    (2053, b""),
                ),
                b"p",
            ),
        ),
        (
            CoapRequest(
                "DELETE", "/d", content_format=10000, ocf_version=0x0900, ocf_accept_version=0xFFFF
            ),
            Frame(
                4, b"", ((11, b"d"), (12, b"\x27\x10"), (2049, b"\xff\xff"), (2053, b"\x09\x00"))
            ),
        ),
        (
            CoapRequest(
                "POST",
                "/o",
                content_format=0xFFFF,
                accept=0x100,
                observe=(1 << 24) - 1,
                ocf_version=0x100,
            ),
            Frame(
                2,
                b"",
                (
                    (6, b"\xff\xff\xff"),
                    (11, b"o"),
                    (12, b"\xff\xff"),
                    (17, b"\x01\x00"),
                    (2053, b"\x01\x00"),
                ),
            ),
        ),
        (CoapRequest("GET", "/" + LONG), Frame(1, b"", ((11, LONG.encode()),))),
    ],
)
def test_a_request_is_encoded_as_pinned(request_: CoapRequest, expected: Frame) -> None:
    assert request_frame(request_) == expected


def test_ocf_version_options_default_with_content_format_10000() -> None:
    """W12."""
    frame = request_frame(CoapRequest("POST", "/oic/d", payload=b"x", content_format=10000))
    assert frame.options == (
        (11, b"oic"),
        (11, b"d"),
        (12, b"\x27\x10"),
        (2049, b"\x08\x00"),
        (2053, b"\x08\x00"),
    )
    assert request_frame(CoapRequest("GET", "/", accept=10000)).options == (
        (17, b"\x27\x10"),
        (2049, b"\x08\x00"),
    )
    assert request_frame(CoapRequest("GET", "/x")).options == ((11, b"x"),)  # no Accept added
    without = request_frame(CoapRequest("POST", "/", content_format=10000), ocf_defaults=False)
    assert without.options == ((12, b"\x27\x10"),)


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        (CoapResponse("2.05"), Frame(69)),
        (
            CoapResponse("2.05", b"\xa0", 10000),
            Frame(69, b"", ((12, b"\x27\x10"), (2053, b"\x08\x00")), b"\xa0"),
        ),
        (
            CoapResponse("2.01", b"x", 0, 0, b"\x00"),
            Frame(65, b"", ((4, b"\x00"), (12, b""), (14, b"")), b"x"),
        ),
        (
            CoapResponse("4.04", b"", 50, 60, b"12345678", ocf_version=0),
            Frame(132, b"", ((4, b"12345678"), (12, b"2"), (14, b"<"), (2053, b""))),
        ),
        (
            CoapResponse("5.00", b"e", 10000, (1 << 32) - 1, ocf_version=0x0900),
            Frame(
                160, b"", ((12, b"\x27\x10"), (14, b"\xff\xff\xff\xff"), (2053, b"\x09\x00")), b"e"
            ),
        ),
        (
            CoapResponse("2.04", max_age=256, content_format=0x100),
            Frame(68, b"", ((12, b"\x01\x00"), (14, b"\x01\x00"))),
        ),
    ],
)
def test_a_response_is_encoded_as_pinned(response: CoapResponse, expected: Frame) -> None:
    assert response_frame(response) == expected


def test_the_wire_bytes_are_pinned() -> None:
    post = CoapRequest("POST", "/light", ("q=", ""), b"\xbf\xff", content_format=60, accept=10000)
    assert encode_frame(request_frame(post)).hex() == (
        "d00a02b56c69676874113c32713d00222710e206e30800ffbfff"
    )
    assert encode_frame(request_frame(CoapRequest("GET", "/a//b/", observe=0))).hex() == (
        "700160516100016200"
    )
    not_found = CoapResponse("4.04", b"", 50, 60, b"12345678", ocf_version=0)
    assert encode_frame(response_frame(not_found)).hex() == "d003844831323334353637388132213ce006ea"


# --------------------------------------------------------------------------- encoding, in general


def _shortest(value: bytes) -> bool:
    return not value.startswith(b"\x00")


@settings(max_examples=300, deadline=None)
@given(requests)
def test_a_request_frame_has_sorted_options_and_shortest_uints(request: CoapRequest) -> None:
    frame = request_frame(request)
    numbers = [n for n, _ in frame.options]
    assert numbers == sorted(numbers)
    assert [v.decode() for n, v in frame.options if n == 15] == list(request.query)
    assert all(_shortest(v) for n, v in frame.options if n in (6, 12, 17, 2049, 2053))
    assert (frame.token, frame.payload) == (b"", request.payload)
    if request.accept is None:
        assert 17 not in numbers


@settings(max_examples=300, deadline=None)
@given(responses)
def test_a_response_frame_has_sorted_options_and_shortest_uints(response: CoapResponse) -> None:
    frame = response_frame(response)
    numbers = [n for n, _ in frame.options]
    assert numbers == sorted(numbers)
    assert 6 not in numbers  # never an Observe: notifications are sent otherwise
    assert all(_shortest(v) for n, v in frame.options if n in (12, 14, 2053))


# --------------------------------------------------------------------------- reading


@settings(max_examples=300, deadline=None)
@given(requests)
def test_a_request_survives_the_wire(request: CoapRequest) -> None:
    frame = parse_frame(encode_frame(request_frame(request, ocf_defaults=False)))
    assert request_value(frame) == request


@settings(max_examples=300, deadline=None)
@given(responses, st.one_of(st.none(), st.integers(0, (1 << 24) - 1)))
def test_a_response_survives_the_wire(response: CoapResponse, observe: int | None) -> None:
    frame = response_frame(response)
    if observe is not None:  # as a notification carries it: three bytes, not the shortest
        options = ((6, observe.to_bytes(3, "big")), *frame.options)
        frame = Frame(frame.code, b"", options, frame.payload)
    value = response_value(parse_frame(encode_frame(frame)))  # wire order, as received
    ocf_version = response.ocf_version
    if ocf_version is None and response.content_format == 10000:
        ocf_version = 0x0800
    assert value == CoapResponse(
        response.code,
        response.payload,
        response.content_format,
        response.max_age,
        response.etag,
        observe,
        ocf_version,
    )


@pytest.mark.parametrize(
    ("frame", "expected"),
    [
        (Frame(5, b"", ((11, b"x"),)), CoapRequest("FETCH", "/x")),
        (Frame(7), CoapRequest("iPATCH", "/")),
        (
            Frame(
                1,
                b"t",
                (
                    (3, b"host"),  # Uri-Host: ignored
                    (11, b"a"),
                    (12, b"\x00\x32"),  # not the shortest form: still 50
                    (15, b"k=\xc3\xa9"),
                    (17, b""),
                    (2049, b"\x08\x00"),
                    (2053, b"\x00\x00\x08\x00"),
                ),
            ),
            CoapRequest(
                "GET",
                "/a",
                ("k=é",),
                content_format=50,
                accept=0,
                ocf_version=0x0800,
                ocf_accept_version=0x0800,
            ),
        ),
    ],
)
def test_a_request_is_read_as_pinned(frame: Frame, expected: CoapRequest) -> None:
    assert request_value(frame) == expected


@pytest.mark.parametrize(
    ("frame", "expected"),
    [
        (
            Frame(69, b"", ((4, b"\x00"), (6, b"\x00\x00\x05"), (12, b""), (14, b"")), b"x"),
            CoapResponse("2.05", b"x", 0, 0, b"\x00", observe=5),
        ),
        (
            # the first of repeated ETags, unknown options ignored, an unknown success code kept
            Frame(
                95,
                b"",
                ((4, b"e"), (4, b"f"), (14, b"\x00\x00\x00<"), (60, b"\x01"), (2053, b"\t\x00")),
            ),
            CoapResponse("2.31", max_age=60, etag=b"e", ocf_version=0x0900),
        ),
        (Frame(128, b"", (), b"bad"), CoapResponse("4.00", b"bad")),
    ],
)
def test_a_response_is_read_as_pinned(frame: Frame, expected: CoapResponse) -> None:
    assert response_value(frame) == expected


# --------------------------------------------------------------------------- refusals, W19


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (CoapRequest("BREW", "/"), "unsupported method"),
        (CoapRequest("GET", "oic"), "must start with '/'"),
        (CoapRequest("GET", "/", observe=1 << 24), "observe out of range"),
    ],
)
def test_an_unsendable_request_is_refused(request_: CoapRequest, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        request_frame(request_)


@pytest.mark.parametrize(
    ("block2", "problem"),
    [
        (None, None),
        (b"\x06", None),  # block 0, no more, 1024 bytes: the whole content
        (b"\x0e", "the device answered block-wise (block 0, more: True)"),
        (b"\x16", "the device answered block-wise (block 1, more: False)"),
        (b"\x00\x00\x00\x00", "malformed Block2 option"),
    ],
)
def test_one_block_of_several_is_recognised(block2: bytes | None, problem: str | None) -> None:
    """W19."""
    options = ((12, b""),) if block2 is None else ((12, b""), (23, block2))
    assert block_wise_problem(Frame(69, b"t", options, b"x")) == problem

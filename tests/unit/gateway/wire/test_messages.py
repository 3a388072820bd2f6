"""Plain CoAP values to and from frames, pinned byte for byte against what the aiocoap adapter
(:mod:`gateway.adapters.coap_wire`) sends and reads today, so the switch changes no wire byte."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.adapters import coap_wire
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


def _aiocoap_options(message: object) -> tuple[tuple[int, bytes], ...]:
    return tuple((int(o.number), o.encode()) for o in message.opt.option_list())  # type: ignore[attr-defined]


@settings(max_examples=300, deadline=None)
@given(requests)
def test_a_request_is_encoded_as_the_aiocoap_adapter_encodes_it(request: CoapRequest) -> None:
    ours = request_frame(request)
    theirs = coap_wire.EncodedRequest(request).take()
    assert ours.code == int(theirs.code)
    assert ours.options == _aiocoap_options(theirs)
    assert ours.payload == theirs.payload


@settings(max_examples=300, deadline=None)
@given(responses)
def test_a_response_is_encoded_as_the_aiocoap_adapter_encodes_it(response: CoapResponse) -> None:
    ours = response_frame(response)
    theirs = coap_wire.response_message(response)
    assert ours.code == int(theirs.code)
    assert ours.options == _aiocoap_options(theirs)
    assert ours.payload == theirs.payload


@settings(max_examples=300, deadline=None)
@given(requests)
def test_a_request_is_read_as_the_aiocoap_adapter_reads_it(request: CoapRequest) -> None:
    frame = request_frame(request, ocf_defaults=False)
    message = coap_wire.incoming_message(frame, frame.options)
    assert request_value(frame) == coap_wire.request_value(message)


@settings(max_examples=300, deadline=None)
@given(responses, st.one_of(st.none(), st.integers(0, (1 << 24) - 1)))
def test_a_response_is_read_as_the_aiocoap_adapter_reads_it(
    response: CoapResponse, observe: int | None
) -> None:
    frame = response_frame(response)
    if observe is not None:
        options = ((6, observe.to_bytes(3, "big")), *frame.options)
        frame = Frame(frame.code, b"", options, frame.payload)
    frame = parse_frame(encode_frame(frame))  # wire order, as received
    message = coap_wire.incoming_message(frame, frame.options)
    assert response_value(frame) == coap_wire.response_value(message)


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

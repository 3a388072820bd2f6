"""The gateway's plain CoAP values (:mod:`gateway.adapters.coap_messages`) to and from frames.

Requests to a device get the OCF-(Accept-)Content-Format-Version options (W12: 0x0800 when the
content format or Accept is 10000; never an Accept unless asked), responses to a device carry no
Observe, and a response that is one block of several is recognised (W19: no block-wise
transfer here).
"""

from __future__ import annotations

from typing import Final

from gateway.adapters import coap_frames as frames
from gateway.adapters.coap_frames import Frame
from gateway.adapters.coap_messages import (
    METHOD_NAMES,
    OCF_CBOR,
    OCF_VERSION_1_0,
    OPTION_OCF_ACCEPT_VERSION,
    OPTION_OCF_VERSION,
    CoapRequest,
    CoapResponse,
    check_request,
    checked_uint,
    format_code,
    parse_code,
)
from gateway.wire.options import decode_uint, encode_uint, option_value, uint_option

MAX_AGE: Final = 14


def request_frame(request: CoapRequest, *, ocf_defaults: bool = True) -> Frame:
    """``request`` (to a device) as a frame without token; ``ValueError`` when it cannot be
    sent (unknown method, relative path, an option value out of range)."""
    checked = check_request(request, ocf_defaults=ocf_defaults)
    code, content_format, accept = checked.code, checked.content_format, checked.accept
    observe, ocf_version = checked.observe, checked.ocf_version
    ocf_accept = checked.ocf_accept_version
    options: list[tuple[int, bytes]] = []
    if observe is not None:
        options.append((frames.OBSERVE, encode_uint(observe)))
    if request.path != "/":
        options += [(frames.URI_PATH, p.encode()) for p in request.path[1:].split("/")]
    if content_format is not None:
        options.append((frames.CONTENT_FORMAT, encode_uint(content_format)))
    options += [(frames.URI_QUERY, q.encode()) for q in request.query]
    if accept is not None:
        options.append((frames.ACCEPT, encode_uint(accept)))
    if ocf_accept is not None:
        options.append((OPTION_OCF_ACCEPT_VERSION, encode_uint(ocf_accept)))
    if ocf_version is not None:
        options.append((OPTION_OCF_VERSION, encode_uint(ocf_version)))
    return Frame(code, b"", tuple(options), bytes(request.payload))


def response_frame(response: CoapResponse) -> Frame:
    """Our answer to a device request (no Observe: notifications go through
    ``send_response(..., keep_observing=True)``)."""
    content_format = checked_uint(response.content_format, "content_format", 1 << 16)
    max_age = checked_uint(response.max_age, "max_age", 1 << 32)
    options: list[tuple[int, bytes]] = []
    if response.etag is not None:
        if not 1 <= len(response.etag) <= 8:
            raise ValueError(f"an ETag has 1 to 8 bytes: {response.etag!r}")
        options.append((frames.ETAG, bytes(response.etag)))
    if content_format is not None:
        options.append((frames.CONTENT_FORMAT, encode_uint(content_format)))
    if max_age is not None:
        options.append((MAX_AGE, encode_uint(max_age)))
    ocf_version = checked_uint(response.ocf_version, "ocf_version", 1 << 16)
    if ocf_version is None and content_format == OCF_CBOR:
        ocf_version = OCF_VERSION_1_0
    if ocf_version is not None:
        options.append((OPTION_OCF_VERSION, encode_uint(ocf_version)))
    return Frame(parse_code(response.code), b"", tuple(options), bytes(response.payload))


def request_value(frame: Frame) -> CoapRequest:
    """A device's request (options checked by the connection: Uri-Path and Uri-Query are UTF-8)
    as a :class:`CoapRequest`."""
    path = [v.decode() for n, v in frame.options if n == frames.URI_PATH]
    return CoapRequest(
        method=METHOD_NAMES.get(frame.code) or format_code(frame.code),
        path="/" + "/".join(path),
        query=tuple(v.decode() for n, v in frame.options if n == frames.URI_QUERY),
        payload=frame.payload,
        content_format=uint_option(frame, frames.CONTENT_FORMAT),
        accept=uint_option(frame, frames.ACCEPT),
        observe=uint_option(frame, frames.OBSERVE),
        ocf_version=uint_option(frame, OPTION_OCF_VERSION),
        ocf_accept_version=uint_option(frame, OPTION_OCF_ACCEPT_VERSION),
    )


def response_value(frame: Frame) -> CoapResponse:
    """A device's response (classes 2 to 5) as a :class:`CoapResponse`."""
    return CoapResponse(
        code=format_code(frame.code),
        payload=frame.payload,
        content_format=uint_option(frame, frames.CONTENT_FORMAT),
        max_age=uint_option(frame, MAX_AGE),
        etag=option_value(frame, frames.ETAG),
        observe=uint_option(frame, frames.OBSERVE),
        ocf_version=uint_option(frame, OPTION_OCF_VERSION),
    )


def block_wise_problem(frame: Frame) -> str | None:
    """W19: why a response cannot be taken whole (one block of several), else None."""
    value = option_value(frame, frames.BLOCK2)
    if value is None or len(value) > 3:
        return None if value is None else "malformed Block2 option"
    block = decode_uint(value)
    number, more = block >> 4, bool(block & 0x08)
    if more or number:
        return f"the device answered block-wise (block {number}, more: {more})"
    return None

"""Plain values of the CoAP device adapter: requests, responses, codes, errors (no aiocoap here).

Re-exported by :mod:`gateway.adapters.coap`, which is where callers import them from.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

from gateway.errors import GatewayError

OCF_CBOR: Final = 10000
"""``application/vnd.ocf+cbor``."""
OCF_VERSION_1_0: Final = 0x0800
"""OCF 1.0 in the OCF-(Accept-)Content-Format-Version options."""
OPTION_OCF_ACCEPT_VERSION: Final = 2049
OPTION_OCF_VERSION: Final = 2053

METHODS: Final[Mapping[str, int]] = MappingProxyType(
    {"GET": 1, "POST": 2, "PUT": 3, "DELETE": 4, "FETCH": 5, "PATCH": 6, "iPATCH": 7}
)
METHOD_NAMES: Final[Mapping[int, str]] = MappingProxyType({v: k for k, v in METHODS.items()})


@functools.lru_cache(maxsize=256)
def format_code(number: int) -> str:
    """``69`` -> ``"2.05"`` (cached: every message of a device goes through it)."""
    if not 0 <= number <= 0xFF:
        raise ValueError(f"not a CoAP code: {number}")
    return f"{number >> 5}.{number & 0x1F:02d}"


@functools.lru_cache(maxsize=1024)
def parse_code(text: str) -> int:
    """``"2.05"`` -> ``69``; ``ValueError`` for anything else (a valid code is cached)."""
    head, dot, detail = text.partition(".")
    if (
        not dot
        or len(head) != 1
        or len(detail) != 2
        or not head.isdigit()
        or not detail.isdigit()
        or not head.isascii()
        or not detail.isascii()
    ):
        raise ValueError(f"not a CoAP code: {text!r}")
    cls, dd = int(head), int(detail)
    if cls > 7 or dd > 31:
        raise ValueError(f"not a CoAP code: {text!r}")
    return (cls << 5) | dd


@dataclass(frozen=True, slots=True)
class CoapRequest:
    """A CoAP request, in either direction.

    ``method`` is ``"GET"``, ``"POST"``, ``"PUT"`` or ``"DELETE"`` (``"FETCH"``, ``"PATCH"``,
    ``"iPATCH"`` pass too; an unknown request code from a device arrives dotted, e.g. ``"0.08"``).
    ``path`` starts with ``/``; ``query`` holds the Uri-Query options (``"di=..."``).
    ``ocf_version`` / ``ocf_accept_version`` are the OCF-Content-Format-Version (2053) and
    OCF-Accept-Content-Format-Version (2049) options as numbers. On requests *to* a device they
    default to :data:`OCF_VERSION_1_0` when ``content_format`` is :data:`OCF_CBOR` (both) or
    ``accept`` is (2049 only). No Accept option is ever added.
    """

    method: str
    path: str
    query: tuple[str, ...] = ()
    payload: bytes = b""
    content_format: int | None = None
    accept: int | None = None
    observe: int | None = None
    ocf_version: int | None = None
    ocf_accept_version: int | None = None


@dataclass(frozen=True, slots=True)
class CoapResponse:
    """A CoAP response; ``code`` dotted (``"2.05"``), class 2 to 5.

    ``observe`` is only set on responses from a device (it is never sent to a device).
    ``ocf_version`` defaults on the wire to :data:`OCF_VERSION_1_0` when ``content_format`` is
    :data:`OCF_CBOR`.
    """

    code: str
    payload: bytes = b""
    content_format: int | None = None
    max_age: int | None = None
    etag: bytes | None = None
    observe: int | None = None
    ocf_version: int | None = None

    def __post_init__(self) -> None:
        if not 2 <= parse_code(self.code) >> 5 <= 5:
            raise ValueError(f"not a response code: {self.code!r}")

    @property
    def successful(self) -> bool:
        return self.code.startswith("2.")


class CoapTransportError(GatewayError):
    """A device connection failed an exchange (root of this adapter's errors)."""

    code = "5.03"


class ConnectionClosed(CoapTransportError, ConnectionError):
    """The device connection is closed, or closed while the exchange was pending."""


class RequestTimeout(CoapTransportError, TimeoutError):
    """The device did not answer in time."""

    code = "5.04"


class RequestTooLarge(CoapTransportError, ValueError):
    """A request to the device is larger than the Max-Message-Size the device advertised in its
    CSM (RFC 8323 section 5.3.1; 1152 bytes until it sent one): it was not sent."""

    code = "4.13"

    def __init__(self, message: str, size: int, limit: int) -> None:
        super().__init__(message)
        self.size = size
        self.limit = limit


class UnsupportedResponse(CoapTransportError, ValueError):
    """The device answered in a way this gateway does not support: one block of a block-wise
    transfer (RFC 7959), which we neither advertise nor reassemble."""

    code = "5.02"


def checked_uint(value: int | None, name: str, limit: int) -> int | None:
    """``value`` if it is ``None`` or in ``0..limit-1``; ``ValueError`` otherwise."""
    if value is not None and not 0 <= value < limit:
        raise ValueError(f"{name} out of range: {value}")
    return value


@dataclass(frozen=True, slots=True)
class CheckedRequest:
    """A :class:`CoapRequest`'s code and option values, checked, OCF version defaults applied."""

    code: int
    content_format: int | None
    accept: int | None
    observe: int | None
    ocf_version: int | None
    ocf_accept_version: int | None


def check_request(request: CoapRequest, *, ocf_defaults: bool = True) -> CheckedRequest:
    """``ValueError`` when ``request`` cannot be sent (unknown method, relative path, an option
    value out of range). With ``ocf_defaults`` an OCF CBOR payload gets OCF-Content-Format-Version
    1.0 and an OCF CBOR payload or Accept gets OCF-Accept-Content-Format-Version 1.0."""
    code = METHODS.get(request.method)
    if code is None:
        raise ValueError(f"unsupported method: {request.method!r}")
    if not request.path.startswith("/"):
        raise ValueError(f"path must start with '/': {request.path!r}")
    content_format = checked_uint(request.content_format, "content_format", 1 << 16)
    accept = checked_uint(request.accept, "accept", 1 << 16)
    observe = checked_uint(request.observe, "observe", 1 << 24)
    ocf_version = checked_uint(request.ocf_version, "ocf_version", 1 << 16)
    ocf_accept = checked_uint(request.ocf_accept_version, "ocf_accept_version", 1 << 16)
    if ocf_defaults and content_format == OCF_CBOR and ocf_version is None:
        ocf_version = OCF_VERSION_1_0
    if ocf_defaults and OCF_CBOR in (content_format, accept) and ocf_accept is None:
        ocf_accept = OCF_VERSION_1_0
    return CheckedRequest(code, content_format, accept, observe, ocf_version, ocf_accept)

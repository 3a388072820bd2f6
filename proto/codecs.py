"""OCF payload codecs: CBOR (content formats 10000 and 60) and JSON (50).

``decode`` turns a CoAP payload into a Python value; ``encode`` does the reverse;
``to_json_value`` maps a decoded CBOR value onto JSON (what the twin stores) and
says whether that lost information (byte strings, tags, non-string keys, NaN),
in which case callers keep the original bytes too.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Mapping
from enum import IntEnum
from typing import Any, Final

import cbor2

from proto.errors import CodecError

MAX_DEPTH: Final = 64


class ContentFormat(IntEnum):
    """CoAP Content-Format numbers twinhub understands."""

    TEXT = 0
    JSON = 50
    CBOR = 60
    OCF_CBOR = 10000

    @property
    def media_type(self) -> str:
        return _MEDIA_TYPES[self]


_MEDIA_TYPES: Final = {
    ContentFormat.TEXT: "text/plain;charset=utf-8",
    ContentFormat.JSON: "application/json",
    ContentFormat.CBOR: "application/cbor",
    ContentFormat.OCF_CBOR: "application/vnd.ocf+cbor",
}
CBOR_FORMATS: Final = frozenset({ContentFormat.CBOR, ContentFormat.OCF_CBOR})


_SCALARS: Final = frozenset({str, int, float, bool, bytes, type(None)})


def _check_depth(value: Any) -> None:
    """Refuse a value with anything more than ``MAX_DEPTH`` containers (maps, arrays, tags)
    deep. Level by level and without recursion: this runs on every notification, and the
    decoders' own limits (the interpreter's recursion limit) are far higher."""
    level = [value]
    for _ in range(MAX_DEPTH + 1):
        inner: list[Any] = []
        for v in level:
            t = type(v)
            if t in _SCALARS:
                continue
            if t is dict:
                inner.extend(v.values())
            elif t is list or t is tuple:
                inner.extend(v)
            elif isinstance(v, Mapping):
                inner.extend(v.values())
            elif isinstance(v, list | tuple):
                inner.extend(v)
            elif isinstance(v, cbor2.CBORTag):
                inner.append(v.value)
        if not inner:
            return
        level = inner
    raise CodecError(f"payload nested deeper than {MAX_DEPTH} levels")


def decode(payload: bytes, content_format: int | None) -> Any:
    """Decode a CoAP payload. An empty payload is ``None`` whatever the format."""
    if not payload:
        return None
    if content_format in CBOR_FORMATS:
        try:
            value = cbor2.loads(payload)
        except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError, RecursionError) as e:
            raise CodecError(f"malformed CBOR: {e}") from e
    elif content_format == ContentFormat.JSON:
        try:
            value = json.loads(payload.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise CodecError(f"malformed JSON: {e}") from e
    elif content_format == ContentFormat.TEXT:
        try:
            return payload.decode("utf-8")
        except UnicodeDecodeError as e:
            raise CodecError(f"text payload is not UTF-8: {e}") from e
    else:
        raise CodecError(f"unsupported content format: {content_format}")
    if len(payload) > MAX_DEPTH:  # each level takes a byte at least: a shorter one is shallow
        _check_depth(value)
    return value


def encode(value: Any, content_format: int) -> bytes:
    """Encode a Python value for a CoAP payload in the given content format."""
    if content_format in CBOR_FORMATS:
        try:
            return cbor2.dumps(value)
        except (cbor2.CBOREncodeError, TypeError, ValueError) as e:
            raise CodecError(f"cannot encode as CBOR: {e}") from e
    if content_format == ContentFormat.JSON:
        try:
            return json.dumps(value, separators=(",", ":"), allow_nan=False).encode("utf-8")
        except (TypeError, ValueError) as e:
            raise CodecError(f"cannot encode as JSON: {e}") from e
    if content_format == ContentFormat.TEXT and isinstance(value, str):
        return value.encode("utf-8")
    raise CodecError(f"unsupported content format: {content_format}")


_JSON_SCALARS: Final = frozenset({str, int, bool, type(None)})


def _is_json(value: Any) -> bool:
    """Whether ``value`` is made of JSON's own types only (dicts with str keys, lists, str,
    int, bool, None, finite floats): then it maps onto itself. The common case, checked
    without recursion and without copying."""
    stack = [value]
    while stack:
        v = stack.pop()
        t = type(v)
        if t in _JSON_SCALARS:
            continue
        if t is float:
            if not math.isfinite(v):
                return False
        elif t is dict:
            for k in v:
                if type(k) is not str:
                    return False
            stack.extend(v.values())
        elif t is list:
            stack.extend(v)
        else:
            return False
    return True


def to_json_value(value: Any) -> tuple[Any, bool]:
    """Map a decoded payload onto JSON; the flag says whether that lost information.

    Byte strings become base64 text, tags their inner value, non-string keys
    their ``str()``, non-finite floats ``None``. A value that is JSON already is returned
    as it is (not copied).
    """
    if _is_json(value):
        return value, False
    lossy = False

    def conv(v: Any) -> Any:
        nonlocal lossy
        if v is None or isinstance(v, bool | int | str):
            return v
        if isinstance(v, float):
            if math.isfinite(v):
                return v
            lossy = True
            return None
        if isinstance(v, bytes | bytearray):
            lossy = True
            return base64.b64encode(bytes(v)).decode("ascii")
        if isinstance(v, Mapping):
            out: dict[str, Any] = {}
            for k, item in v.items():
                if not isinstance(k, str):
                    lossy = True
                    k = str(k)
                out[k] = conv(item)
            return out
        if isinstance(v, list | tuple):
            return [conv(item) for item in v]
        if isinstance(v, cbor2.CBORTag):
            lossy = True
            return conv(v.value)
        lossy = True
        return str(v)

    return conv(value), lossy


def parse_content_format(value: str | int | None) -> int | None:
    """Parse a content format given as a number or a media type."""
    if value is None or isinstance(value, int):
        return value
    for cf, mt in _MEDIA_TYPES.items():
        if value == mt or value == mt.split(";")[0]:
            return int(cf)
    try:
        return int(value)
    except ValueError:
        raise CodecError(f"unknown content format: {value!r}") from None


def json_equal(a: Any, b: Any) -> bool:
    """JSON equality: ``true`` is not ``1`` (as Python's ``==`` would have it), ``1`` is ``1.0``."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, dict):
        return (
            isinstance(b, dict)
            and a.keys() == b.keys()
            and all(json_equal(v, b[k]) for k, v in a.items())
        )
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(json_equal, a, b))
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    return type(a) is type(b) and a == b

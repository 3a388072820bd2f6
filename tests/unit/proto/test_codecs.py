from __future__ import annotations

import base64
import contextlib
import json
import math
from typing import Any

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from proto import codecs
from proto.codecs import ContentFormat
from proto.errors import CodecError

json_values: st.SearchStrategy[Any] = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=25,
)


@pytest.mark.parametrize("cf", [ContentFormat.OCF_CBOR, ContentFormat.CBOR, ContentFormat.JSON])
@given(value=json_values)
def test_round_trip(cf: ContentFormat, value: Any) -> None:
    payload = codecs.encode(value, cf)
    assert codecs.decode(payload, cf) == value
    converted, lossy = codecs.to_json_value(value)
    assert converted == value
    assert not lossy


@given(st.binary(max_size=200))
def test_decode_arbitrary_bytes_never_raises_anything_but_codec_error(data: bytes) -> None:
    for cf in (ContentFormat.OCF_CBOR, ContentFormat.JSON, ContentFormat.TEXT):
        with contextlib.suppress(CodecError):
            codecs.decode(data, cf)


def test_empty_payload_is_none() -> None:
    assert codecs.decode(b"", ContentFormat.OCF_CBOR) is None


@pytest.mark.parametrize(
    ("payload", "cf"),
    [(b"\xbf", 10000), (b"\x1c", 60), (b"{", 50), (b"\xff", 50), (b"\xff", 0), (b"x", 42)],
)
def test_malformed_payloads_raise_codec_error(payload: bytes, cf: int) -> None:
    with pytest.raises(CodecError):
        codecs.decode(payload, cf)


def test_deep_nesting_is_refused() -> None:
    deep: Any = 1
    for _ in range(200):
        deep = [deep]
    with pytest.raises(CodecError, match="nested"):
        codecs.decode(cbor2.dumps(deep), ContentFormat.OCF_CBOR)


def _nested(depth: int, wrap: Any, inner: Any = 1) -> Any:
    value = inner
    for _ in range(depth):
        value = wrap(value)
    return value


def _depth(value: Any) -> int:
    """The reference: how many containers deep the deepest value of ``value`` sits."""
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=-1)
    if isinstance(value, list | tuple):
        return 1 + max(map(_depth, value), default=-1)
    if isinstance(value, cbor2.CBORTag):
        return 1 + _depth(value.value)
    return 0


_ARRAY = lambda v: [v]  # noqa: E731
_MAP = lambda v: {"k": v}  # noqa: E731
_ALTERNATING = lambda v: [0, "x", v] if isinstance(v, dict) else {"a": None, "b": v}  # noqa: E731
_TAG = lambda v: cbor2.CBORTag(4000, v)  # noqa: E731


@pytest.mark.parametrize(
    ("wrap", "cf"),
    [
        *(
            pytest.param(wrap, cf, id=f"{name}-{cf.name}")
            for name, wrap in (("array", _ARRAY), ("map", _MAP), ("alternating", _ALTERNATING))
            for cf in (ContentFormat.OCF_CBOR, ContentFormat.JSON)
        ),
        pytest.param(_TAG, ContentFormat.OCF_CBOR, id="tag-OCF_CBOR"),  # JSON has no tags
    ],
)
def test_nesting_limit_is_exact(wrap: Any, cf: ContentFormat) -> None:
    for inner in (1, [], {}):
        at_limit = _nested(codecs.MAX_DEPTH, wrap, inner)
        assert _depth(codecs.decode(codecs.encode(at_limit, cf), cf)) == codecs.MAX_DEPTH
    for inner in (1, [], {}):
        over = _nested(codecs.MAX_DEPTH, wrap, [inner])
        with pytest.raises(CodecError, match="nested"):
            codecs.decode(codecs.encode(over, cf), cf)


def test_a_deep_value_beside_shallow_ones_is_refused() -> None:
    value = {"a": 1, "b": [2, 3], "c": _nested(codecs.MAX_DEPTH + 1, lambda v: [v])}
    with pytest.raises(CodecError, match="nested"):
        codecs.decode(cbor2.dumps(value), ContentFormat.OCF_CBOR)


@given(
    st.recursive(
        st.integers() | st.text(max_size=3) | st.none(),
        lambda children: (
            st.lists(children, max_size=3)
            | st.dictionaries(st.text(max_size=3), children, max_size=3)
            | children.map(lambda v: _nested(16, lambda x: [x], v))
        ),
        max_leaves=40,
    )
)
def test_nesting_check_agrees_with_the_reference(value: Any) -> None:
    payload = cbor2.dumps(value)
    if _depth(value) > codecs.MAX_DEPTH:
        with pytest.raises(CodecError, match="nested"):
            codecs.decode(payload, ContentFormat.OCF_CBOR)
    else:
        assert codecs.decode(payload, ContentFormat.OCF_CBOR) == value


def _to_json_reference(value: Any) -> tuple[Any, bool]:
    """The mapping by its definition: a converted copy of everything."""
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
        if isinstance(v, bytes):
            lossy = True
            return base64.b64encode(v).decode("ascii")
        if isinstance(v, dict):
            out = {}
            for k, item in v.items():
                if not isinstance(k, str):
                    lossy = True
                out[k if isinstance(k, str) else str(k)] = conv(item)
            return out
        if isinstance(v, list | tuple):
            return [conv(item) for item in v]
        if isinstance(v, cbor2.CBORTag):
            lossy = True
            return conv(v.value)
        lossy = True
        return str(v)

    return conv(value), lossy


cbor_values: st.SearchStrategy[Any] = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=5)
    | st.binary(max_size=5),
    lambda children: (
        st.lists(children, max_size=4)
        | st.lists(children, max_size=4).map(tuple)
        | st.dictionaries(st.text(max_size=4) | st.integers(), children, max_size=4)
        | children.map(lambda v: cbor2.CBORTag(4000, v))
    ),
    max_leaves=20,
)


@given(cbor_values)
def test_to_json_value_agrees_with_the_reference(value: Any) -> None:
    converted, lossy = codecs.to_json_value(value)
    expected, expected_lossy = _to_json_reference(value)
    assert lossy == expected_lossy
    assert json.dumps(converted, sort_keys=True) == json.dumps(expected, sort_keys=True)
    assert type(converted) is type(expected)


@given(json_values)
def test_a_json_value_maps_onto_itself(value: Any) -> None:
    converted, lossy = codecs.to_json_value(value)
    assert converted is value
    assert not lossy


def test_lossy_mapping_is_flagged() -> None:
    value = {"b": b"\x00\x01", 1: "int-key", "t": cbor2.CBORTag(99, "x"), "n": math.nan}
    converted, lossy = codecs.to_json_value(value)
    assert lossy
    assert converted == {"b": "AAE=", "1": "int-key", "t": "x", "n": None}


def test_encode_refuses_nan_in_json_and_unknown_formats() -> None:
    with pytest.raises(CodecError):
        codecs.encode(math.nan, ContentFormat.JSON)
    with pytest.raises(CodecError):
        codecs.encode({}, 1234)


def test_parse_content_format() -> None:
    assert codecs.parse_content_format("application/vnd.ocf+cbor") == 10000
    assert codecs.parse_content_format("50") == 50
    assert codecs.parse_content_format(None) is None
    with pytest.raises(CodecError):
        codecs.parse_content_format("application/xml")

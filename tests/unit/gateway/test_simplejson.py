from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.errors import BadRequest
from gateway.simplejson import MAX_DEPTH, LenientJsonError, loads

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
    max_leaves=30,
)


@given(JSON_VALUES, st.booleans(), st.sampled_from([None, 2]))
def test_whatever_json_dumps_writes_parses_to_the_same_value(
    value: Any, ascii_only: bool, indent: int | None
) -> None:
    text = json.dumps(value, ensure_ascii=ascii_only, indent=indent)
    assert loads(text) == json.loads(text)
    assert loads(text.encode()) == json.loads(text)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("{temperature:25}", {"temperature": 25}),  # seed 004's own example
        ("{'a': 'b'}", {"a": "b"}),
        ("{mode:eco, level:-1.5e2}", {"mode": "eco", "level": -150.0}),
        ("{a:true,b:false,c:null}", {"a": True, "b": False, "c": None}),
        ("[{ts:1, values:{x:1}}]", [{"ts": 1, "values": {"x": 1}}]),
        ("{'it\\'s': 'a \"q\"'}", {"it's": 'a "q"'}),
        ("// a comment\n{a:1 /* inline */} # end", {"a": 1}),
        ('"\\ud83d\\ude00"', "\U0001f600"),
        ("{a:1,a:2}", {"a": 2}),  # the last one wins, as in Gson and json.loads
    ],
)
def test_lenient_forms_thingsboard_accepts(text: str, value: Any) -> None:
    assert loads(text) == value


@pytest.mark.parametrize(
    "text",
    [
        "",
        "{a:1",
        "{a 1}",
        "{a:1}}",
        "[1,]",
        "[1 2]",
        '{"a":1} x',
        '"unterminated',
        '"bad \\x escape"',
        '"ctl \x01"',
        "{a:1 /* open",
        "-Infinity",
        "1e999",
        "{:1}",
        b"\xff\xfe",
    ],
)
def test_malformed_input_is_a_bad_request_with_a_diagnostic(text: str | bytes) -> None:
    with pytest.raises(LenientJsonError, match=r"malformed JSON|UTF-8") as info:
        loads(text)
    assert isinstance(info.value, BadRequest)
    assert str(info.value)


def test_depth_is_bounded_without_recursion() -> None:
    assert loads("[" * MAX_DEPTH + "]" * MAX_DEPTH) is not None
    with pytest.raises(LenientJsonError, match="nested deeper"):
        loads("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1))
    with pytest.raises(LenientJsonError, match="nested deeper"):
        loads("{a:" * 100_000)


def test_length_is_bounded() -> None:
    with pytest.raises(LenientJsonError, match="longer than"):
        loads(b" " * (1 << 20) + b"1")

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proto import api

from .strategies import json_values

requests: st.SearchStrategy[api.ApiRequest] = st.one_of(
    st.builds(
        api.UpdateResource,
        device_id=st.text(min_size=1),
        href=st.just("/a"),
        content=json_values,
        ttl=st.floats(1, 100),
        correlation_id=st.none() | st.text(),
    ),
    st.builds(api.RetrieveResource, device_id=st.text(min_size=1), href=st.just("/a")),
    st.builds(api.DeleteResource, device_id=st.text(min_size=1), href=st.just("/a")),
    st.builds(
        api.SetDesired,
        device_id=st.just("d"),
        href=st.just("/a"),
        content=st.dictionaries(st.text(max_size=5), json_values, max_size=3),
    ),
    st.builds(api.CancelCommands, device_id=st.just("d"), correlation_id=st.none() | st.text()),
    st.builds(api.ListPending, device_id=st.none() | st.just("d")),
    st.builds(api.GetTwin, device_id=st.just("d")),
    st.builds(api.ListDevices, online=st.none() | st.booleans()),
)


@given(requests)
def test_requests_round_trip(request: api.ApiRequest) -> None:
    body = api.encode_request(request)
    assert api.decode_request(request.OP, body) == request
    assert api.op_of_subject(api.api_subject(request.OP)) == request.OP


@pytest.mark.parametrize(
    ("op", "body"),
    [
        ("update", b'{"device_id": "d"}'),  # missing href
        ("update", b'{"device_id": "d", "href": "/a", "bogus": 1}'),  # unknown field
        ("update", b'{"device_id": 5, "href": "/a"}'),  # wrong type
        ("twin-get", b"not json"),
        ("nope", b"{}"),
    ],
)
def test_malformed_requests_raise_a_typed_error(op: str, body: bytes) -> None:
    with pytest.raises(api.ApiDecodeError):
        api.decode_request(op, body)


@pytest.mark.parametrize("op", sorted(api.REQUEST_TYPES))
@pytest.mark.parametrize(
    "body",
    [b"\xff", b'{"device_id": "\xff\xfe"}', b'{"device_id": "d", "href": "/\xed\xa0\x80"}'],
)
def test_a_body_that_is_not_utf8_is_a_typed_error(op: str, body: bytes) -> None:
    # msgspec raises UnicodeDecodeError (not a DecodeError) for a string that is not UTF-8
    with pytest.raises(api.ApiDecodeError, match=f"bad {op} request"):
        api.decode_request(op, body)
    with pytest.raises(api.ApiDecodeError, match="bad reply"):
        api.decode_reply(b'{"ok": false, "error": {"code": "x", "message": "\xff"}}')


def test_replies_and_tokens() -> None:
    reply = api.Reply(ok=False, error=api.ApiError(code="forbidden", message="not yours"))
    assert api.decode_reply(api.encode_reply(reply)) == reply
    ok: Any = api.decode_reply(api.encode_reply(api.Reply(ok=True, result={"x": 1})))
    assert ok.result == {"x": 1}
    assert api.token_of(api.bearer("abc")) == "abc"
    assert api.token_of({"Authorization": "Basic x"}) is None
    assert api.token_of(None) is None


def test_replies_encode_int_subclasses_as_ints() -> None:
    class Int64(int):  # what pymongo hands back for integers beyond 32 bits
        pass

    reply = api.Reply(ok=True, result={"ts": Int64(2**62)})
    assert api.decode_reply(api.encode_reply(reply)).result == {"ts": 2**62}


def test_deadline_header_round_trip_and_garbage() -> None:
    headers = api.bearer("abc", deadline=1_800_000_000.25)
    assert headers[api.DEADLINE_HEADER] == "1800000000250"
    assert api.deadline_of(headers) == 1_800_000_000.25
    assert api.token_of(headers) == "abc"
    assert api.deadline_of(api.bearer("abc")) is None
    assert api.deadline_of(None) is None
    for bad in ("", "-5", "1e9", "12.5", "٣", "9" * 16):
        assert api.deadline_of({api.DEADLINE_HEADER: bad}) is None, bad

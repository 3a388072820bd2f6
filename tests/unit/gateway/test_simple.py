from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import cbor2
import pytest

from gateway.simple import (
    Append,
    AttributeView,
    ReadAttributes,
    Reply,
    Route,
    SimpleConfig,
    SimpleCore,
    SimpleRequest,
    TokenBuckets,
    WatchAttributes,
    attributes_reply,
    fold_attributes,
    shared_reply,
    shared_update,
)
from proto.devtokens import TokenRecord, new_token
from proto.events import (
    AttributesReported,
    DesiredCleared,
    DesiredSet,
    Event,
    TelemetryReported,
)

TOKEN = new_token()
RECORD = TokenRecord(owner="alice", device_id="dev-1")
NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def core(**kw: Any) -> SimpleCore:
    return SimpleCore(SimpleConfig(gateway_id="gw-1", **kw))


def req(
    feature: str = "telemetry",
    payload: bytes | str = b"",
    *,
    method: str = "POST",
    token: str = TOKEN,
    **kw: Any,
) -> SimpleRequest:
    data = payload.encode() if isinstance(payload, str) else payload
    return SimpleRequest(method=method, path=("api", "v1", token, feature), payload=data, **kw)


def run(c: SimpleCore, r: SimpleRequest, record: TokenRecord | None = RECORD, now: float = 0.0):  # type: ignore[no-untyped-def]
    """The steps as the adapter drives them: the outcome of one request."""
    route = c.route(r)
    if isinstance(route, Reply):
        return route
    refused = c.authorize(route, record, now)
    if refused is not None:
        return refused
    assert record is not None
    return c.decide(route, record, r, NOW)


def samples(outcome: object) -> list[TelemetryReported]:
    assert isinstance(outcome, Append), outcome
    out = []
    for ev in outcome.events:
        envelope = (ev.owner, ev.device_id, ev.source, ev.time)
        assert envelope == ("alice", "dev-1", "/gateway/gw-1", NOW)
        assert isinstance(ev.data, TelemetryReported)
        out.append(ev.data)
    return out


# -- telemetry ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ("{temperature:25}", [(None, {"temperature": 25})]),  # seed 004, unquoted key
        ('{"temperature":42}', [(None, {"temperature": 42})]),
        ('[{"a":1},{"b":"x"}]', [(None, {"a": 1}), (None, {"b": "x"})]),
        ('{"ts":1700000000000,"values":{"a":1.5}}', [(1700000000000, {"a": 1.5})]),
        (
            '[{"ts":1,"values":{"a":1}},{"ts":"2","values":{"a":2}},{"c":true}]',
            [(1, {"a": 1}), (2, {"a": 2}), (None, {"c": True})],
        ),
        ('{"ts":5,"other":1}', [(None, {"ts": 5, "other": 1})]),  # ts without values: a value
        ('{"a":null,"b":{"nested":[1,2]}}', [(None, {"b": {"nested": [1, 2]}})]),  # nulls dropped
    ],
)
def test_telemetry_shapes_as_thingsboard_reads_them(
    payload: str, expected: list[tuple[int | None, dict[str, Any]]]
) -> None:
    got = samples(run(core(), req(payload=payload)))
    assert [(s.ts, s.values) for s in got] == expected


def test_telemetry_in_cbor() -> None:
    payload = cbor2.dumps([{"ts": 10, "values": {"t": 21.5}}, {"h": 40}])
    got = samples(run(core(), req(payload=payload, content_format=60)))
    assert [(s.ts, s.values) for s in got] == [(10, {"t": 21.5}), (None, {"h": 40})]


def test_telemetry_of_only_nulls_appends_nothing_and_is_still_created() -> None:
    outcome = run(core(), req(payload='{"a":null}'))
    assert outcome == Append(())
    assert SimpleCore.appended(True) == Reply("2.01")


@pytest.mark.parametrize(
    "payload",
    [
        "{a:",
        "25",
        '"text"',
        "[1,2]",
        '{"ts":"soon","values":{"a":1}}',
        '{"ts":1,"values":[1]}',
        '{"big":123456789012345678901234567890}',
        '{"ts":-1,"values":{"a":1}}',
    ],
)
def test_malformed_telemetry_is_400_with_a_diagnostic(payload: str) -> None:
    outcome = run(core(), req(payload=payload))
    assert isinstance(outcome, Reply)
    assert outcome.code == "4.00"
    assert outcome.payload  # a diagnostic, after the token was validated
    assert outcome.content_format == 0


def test_unsupported_content_format_and_bad_cbor_are_400() -> None:
    for fmt, payload in ((40, b"{}"), (60, b"\xff\xff"), (60, cbor2.dumps({"b": b"bytes"}))):
        outcome = run(core(), req(payload=payload, content_format=fmt))
        assert isinstance(outcome, Reply)
        assert outcome.code == "4.00", (fmt, payload)


# -- attributes -----------------------------------------------------------------------------


def test_attributes_post_is_one_event() -> None:
    outcome = run(core(), req("attributes", "{fw:'1.2', 'on': true, gone: null}"))
    assert isinstance(outcome, Append)
    (ev,) = outcome.events
    assert ev.data == AttributesReported(values={"fw": "1.2", "on": True})


def test_attributes_must_be_an_object() -> None:
    outcome = run(core(), req("attributes", "[{a:1}]"))
    assert isinstance(outcome, Reply)
    assert outcome.code == "4.00"


def test_attributes_get_asks_for_the_keys_of_each_scope() -> None:
    r = req("attributes", method="GET", query=("clientKeys=a,b", "sharedKeys=c"))
    assert run(core(), r) == ReadAttributes("alice", "dev-1", ("a", "b"), ("c",), 50)
    r = req("attributes", method="GET", accept=60)
    assert run(core(), r) == ReadAttributes("alice", "dev-1", None, None, 60)


def test_attributes_get_with_observe_watches_the_shared_ones() -> None:
    r = req("attributes", method="GET", observe=True, query=("sharedKeys=c,d", "clientKeys=a"))
    assert run(core(), r) == WatchAttributes("alice", "dev-1", ("c", "d"), 50)
    r = req("attributes", method="GET", observe=True, accept=60)
    assert run(core(), r) == WatchAttributes("alice", "dev-1", None, 60)


def _body(reply: Reply | None) -> Any:
    assert reply is not None and reply.code == "2.05"
    return json.loads(reply.payload) if reply.content_format == 50 else cbor2.loads(reply.payload)


def test_shared_reply_is_the_current_shared_attributes_flat() -> None:
    v = AttributeView(client={"a": 1}, shared={"c": 25, "d": "eco"})
    assert _body(shared_reply(v, WatchAttributes("alice", "dev-1", None, 50))) == {
        "c": 25,
        "d": "eco",
    }
    assert _body(shared_reply(v, WatchAttributes("alice", "dev-1", ("d", "x"), 60))) == {"d": "eco"}


def test_shared_update_is_thingsboards_attribute_update() -> None:
    everything = WatchAttributes("alice", "dev-1", None, 50)
    before = {"a": 1, "b": True, "c": {"x": [1]}}
    assert shared_update(before, dict(before), everything) is None
    assert shared_update(before, {**before, "a": 1.0}, everything) is None  # same JSON number
    after = {"a": 2, "b": 1, "c": {"x": [1]}, "n": "new"}
    assert _body(shared_update(before, after, everything)) == {"a": 2, "b": 1, "n": "new"}
    assert _body(shared_update(before, {"c": {"x": [1]}}, everything)) == {"deleted": ["a", "b"]}
    only_b = WatchAttributes("alice", "dev-1", ("b",), 60)
    assert shared_update(before, {**before, "a": 5}, only_b) is None
    assert _body(shared_update(before, {"a": 1}, only_b)) == {"deleted": ["b"]}


def _ev(data: Any, position: int) -> Any:
    return Event(owner="alice", device_id="dev-1", data=data, source="/t", position=position)


def view() -> AttributeView:
    v = AttributeView()
    for i, data in enumerate(
        [
            AttributesReported(values={"a": 1, "b": 2}),
            AttributesReported(values={"a": 3}),
            DesiredSet(href="/shared/c", content={"x": 1}, version=1),
            DesiredSet(href="/shared/d", content={"y": 2}, version=1),
            DesiredSet(href="/oic/other", content={"z": 3}, version=1),  # not an attribute
            DesiredCleared(href="/shared/d", version=2),
        ],
        start=1,
    ):
        v = fold_attributes(v, _ev(data, i))
    return v


def test_fold_merges_client_attributes_and_follows_shared_desired_state() -> None:
    v = view()
    assert dict(v.client) == {"a": 3, "b": 2}
    assert dict(v.shared) == {"c": {"x": 1}}
    # an older event of a key read late (another filter) changes nothing
    assert fold_attributes(v, _ev(DesiredSet(href="/shared/d", content={}, version=1), 4)) == v


def _reply(read: ReadAttributes) -> Any:
    r = attributes_reply(view(), read)
    assert r.code == "2.05"
    return json.loads(r.payload) if r.content_format == 50 else cbor2.loads(r.payload)


def test_attributes_reply_has_thingsboard_shape() -> None:
    def read(client: tuple[str, ...] | None, shared: tuple[str, ...] | None) -> ReadAttributes:
        return ReadAttributes("alice", "dev-1", client, shared, 50)

    assert _reply(read(None, None)) == {"client": {"a": 3, "b": 2}, "shared": {"c": {"x": 1}}}
    assert _reply(read(("a", "nope"), None)) == {"client": {"a": 3}}
    assert _reply(read(None, ("c",))) == {"shared": {"c": {"x": 1}}}
    assert _reply(read(("b",), ("c", "d"))) == {"client": {"b": 2}, "shared": {"c": {"x": 1}}}
    assert _reply(read(("nope",), None)) == {}  # a scope without attributes is left out
    cbor = ReadAttributes("alice", "dev-1", ("a",), None, 60)
    assert attributes_reply(view(), cbor).content_format == 60
    assert _reply(cbor) == {"client": {"a": 3}}


# -- errors before and after the token ------------------------------------------------------


@pytest.mark.parametrize(
    ("r", "code"),
    [
        (SimpleRequest("POST", ("api", "v1", TOKEN)), "4.04"),
        (SimpleRequest("POST", ("api", "v2", TOKEN, "telemetry")), "4.04"),
        (SimpleRequest("POST", ("api", "v1", TOKEN, "telemetry", "x")), "4.04"),
        (req("firmware"), "4.04"),
        (req("telemetry", method="GET"), "4.05"),
        (req("attributes", method="PUT"), "4.05"),
        (req(token="not a token!"), "4.01"),
        (req(token="x" * 129), "4.01"),
    ],
)
def test_refusals_before_the_token_is_validated(r: SimpleRequest, code: str) -> None:
    assert core().route(r) == Reply(code)  # no payload: never larger than the request


def test_unknown_or_revoked_token_is_401_without_payload() -> None:
    c = core()
    assert run(c, req(payload="{a:1}"), record=None) == Reply("4.01")
    revoked = TokenRecord(owner="alice", device_id="dev-1", state="revoked")
    assert run(c, req(payload="{a:1}"), record=revoked) == Reply("4.01")


def test_oversized_payload_is_413_with_size1_before_the_token() -> None:
    c = core(max_payload=100)
    assert c.route(req(payload=b"x" * 101)) == Reply("4.13", size1=100)
    assert c.route(req(payload=b"x", declared_size=5000)) == Reply("4.13", size1=100)
    assert isinstance(c.route(req(payload=b"x" * 100)), Route)


def test_no_reply_before_validation_is_larger_than_its_request() -> None:
    c = core()
    for r in (
        req(token="?", payload=b"{"),
        req("nope", method="GET"),
        req(method="DELETE"),
        req(payload=b"x" * 70_000),
    ):
        route = c.route(r)
        assert isinstance(route, Reply)
        assert route.payload == b""
    route = c.route(req(payload=b"{a:1}"))
    assert isinstance(route, Route)
    assert c.authorize(route, None, 0.0) == Reply("4.01")


def test_append_failure_is_503() -> None:
    assert SimpleCore.appended(False) == Reply("5.03")
    assert SimpleCore.unavailable() == Reply("5.03")


# -- rate limit -----------------------------------------------------------------------------


def test_rate_limit_per_token_with_max_age() -> None:
    c = core(request_rate=0.5, request_burst=2)
    other = new_token()
    assert isinstance(run(c, req(payload="{a:1}"), now=100.0), Append)
    assert isinstance(run(c, req(payload="{a:1}"), now=100.0), Append)
    refused = run(c, req(payload="{a:1}"), now=100.5)
    assert refused == Reply("4.29", max_age=2)  # 1.5 s to the next token, rounded up
    # another token has its own bucket
    assert isinstance(run(c, req(payload="{a:1}", token=other), now=100.5), Append)
    assert isinstance(run(c, req(payload="{a:1}"), now=102.0), Append)
    assert run(c, req(payload="{a:1}"), now=102.0) == Reply("4.29", max_age=2)


def test_token_buckets_refill_up_to_the_burst_and_stay_bounded() -> None:
    b = TokenBuckets(rate=10.0, burst=3, max_keys=2)
    assert [b.take("k", 0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert b.take("k", 0.0) == pytest.approx(0.1)
    assert b.take("k", 1000.0) == 0.0  # refilled, but not beyond the burst
    assert [b.take("k", 1000.0) for _ in range(3)][-1] == pytest.approx(0.1)
    assert b.take("k", 999.0) > 0  # a clock going back gives nothing
    b.take("x", 0.0)
    b.take("y", 0.0)
    assert len(b) == 2


def test_config_is_validated() -> None:
    for kw in ({"max_payload": 0}, {"request_rate": 0}, {"request_burst": 0}, {"max_buckets": 0}):
        with pytest.raises(ValueError, match="must be"):
            SimpleConfig(gateway_id="g", **kw)

"""Client-side RPC of simple devices, sans-IO (issue 10 item 3): ``POST /api/v1/{token}/rpc``
through the core (route, parse: 4.00 with a diagnostic), the ``rpc-requested`` event, the
answer read back from the log, the reply's encoding, and the bound on concurrent waits."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import cbor2
import pytest

from gateway.errors import BadRequest
from gateway.simple import Reply, SimpleConfig, SimpleCore, SimpleRequest
from gateway.simpleclientrpc import (
    ANSWERED,
    BUSY,
    MAX_METHOD,
    TIMED_OUT,
    CallServer,
    WaitSlots,
    answer_filter,
    answer_in,
    answer_payload,
    parse_call,
    requested,
)
from proto import binding
from proto.devtokens import TokenRecord, new_token
from proto.events import Event, RpcAnswered, RpcRequested, TelemetryReported

TOKEN = new_token()
RECORD = TokenRecord(owner="alice", device_id="dev-1")
NOW = datetime(2026, 1, 2, tzinfo=UTC)


def decide(payload: bytes, **kw: Any) -> Any:
    core = SimpleCore(SimpleConfig(gateway_id="gw-1"))
    r = SimpleRequest(method="POST", path=("api", "v1", TOKEN, "rpc"), payload=payload, **kw)
    route = core.route(r)
    if isinstance(route, Reply):
        return route
    assert core.authorize(route, RECORD, 0.0) is None
    return core.decide(route, RECORD, r, NOW)


def test_a_post_to_rpc_is_a_call_of_the_device() -> None:
    got = decide(b'{"method": "getCurrentTime", "params": {"tz": "UTC"}}')
    assert got == CallServer("alice", "dev-1", "getCurrentTime", {"tz": "UTC"}, 50)
    # lenient JSON as ThingsBoard's, params optional, other keys ignored
    assert decide(b"{method:reboot, extra:1}") == CallServer("alice", "dev-1", "reboot", None, 50)
    # CBOR in, CBOR asked for back
    cbor = decide(cbor2.dumps({"method": "m", "params": [1, 2]}), content_format=60, accept=60)
    assert cbor == CallServer("alice", "dev-1", "m", [1, 2], 60)
    # any other Accept: JSON
    assert decide(b'{"method":"m"}', accept=0).accept == 50


@pytest.mark.parametrize(
    ("payload", "diagnostic"),
    [
        (b"", "JSON"),
        (b"{method:", "JSON"),
        (b'["getTime"]', "object"),
        (b'"getTime"', "object"),
        (b"{}", "method"),
        (b'{"method": ""}', "method"),
        (b'{"method": 5}', "method"),
        (b'{"method": null}', "method"),
        (json.dumps({"method": "m" * (MAX_METHOD + 1)}).encode(), "longer"),
        (b'{"method": "a\\u0000b"}', "printable"),
    ],
)
def test_a_malformed_call_is_400_with_a_diagnostic(payload: bytes, diagnostic: str) -> None:
    got = decide(payload)
    assert isinstance(got, Reply) and got.code == "4.00", got
    assert diagnostic in got.payload.decode()


def test_the_longest_method_passes() -> None:
    assert parse_call({"method": "m" * MAX_METHOD}, "o", "d", None).method == "m" * MAX_METHOD
    with pytest.raises(BadRequest):
        parse_call({"method": "m" * (MAX_METHOD + 1)}, "o", "d", None)


def test_get_of_an_rpc_id_is_still_not_allowed() -> None:
    core = SimpleCore(SimpleConfig(gateway_id="gw-1"))
    r = SimpleRequest(method="GET", path=("api", "v1", TOKEN, "rpc", "3"))
    assert core.route(r) == Reply("4.05")


CALL = CallServer("alice", "dev-1", "getTime", {"tz": "UTC"}, 50)


def test_the_request_event_carries_the_call_and_the_wait() -> None:
    e = requested(CALL, "rid-1", 30_000, "/gateway/gw-1", NOW)
    assert isinstance(e.data, RpcRequested)
    assert (e.owner, e.device_id, e.source, e.time) == ("alice", "dev-1", "/gateway/gw-1", NOW)
    assert (e.id, e.correlation_id) == ("rid-1", "rid-1")
    assert (e.data.request_id, e.data.method, e.data.params, e.data.timeout_ms) == (
        "rid-1",
        "getTime",
        {"tz": "UTC"},
        30_000,
    )
    # the request id is the subject's resource token: one request, one subject
    msg = binding.to_nats(e)
    assert msg.subject == "twinhub.ev.alice.dev-1.rpc-requested.rid-1"
    assert binding.from_nats(msg, 7) == e.at(7)
    assert answer_filter(CALL, "rid-1") == "twinhub.ev.alice.dev-1.rpc-answered.rid-1"


def answered(rid: str, result: Any) -> Event[Any]:
    return Event(
        owner="alice",
        device_id="dev-1",
        data=RpcAnswered(request_id=rid, result=result),
        source="/t",
    )


def test_the_first_answer_to_the_request_is_the_one() -> None:
    other = Event(
        owner="alice", device_id="dev-1", data=TelemetryReported(values={"a": 1}), source="/t"
    )
    events = [other, answered("rid-0", 0), answered("rid-1", 1), answered("rid-1", 2)]
    got = answer_in(events, "rid-1")
    assert got is not None and got.result == 1
    assert answer_in(events[:2], "rid-1") is None


def test_the_answer_is_json_or_cbor_as_the_device_asked() -> None:
    ans = RpcAnswered(request_id="r", result={"time": 1700000000000})
    assert answer_payload(CALL, ans) == (b'{"time":1700000000000}', 50)
    cbor_call = CallServer("alice", "dev-1", "getTime", None, 60)
    body, fmt = answer_payload(cbor_call, ans)
    assert (cbor2.loads(body), fmt) == ({"time": 1700000000000}, 60)
    assert answer_payload(CALL, RpcAnswered(request_id="r")) == (b"null", 50)
    assert (ANSWERED, TIMED_OUT, BUSY) == ("2.05", "5.04", "5.03")


def test_wait_slots_bound_the_waits() -> None:
    slots = WaitSlots(2)
    assert [slots.take(), slots.take(), slots.take()] == [True, True, False]
    slots.release()
    assert slots.take() and not slots.take()
    slots.release()
    slots.release()
    slots.release()  # never below zero
    assert slots.taken == 0
    with pytest.raises(ValueError, match="limit"):
        WaitSlots(0)

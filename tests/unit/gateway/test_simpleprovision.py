"""Self-provisioning's gateway core (gateway.simpleprovision): parsing, rate limits, replies,
and the anti-reflection rule (nothing larger than the request before the key and secret are
found right by the twin service)."""

from __future__ import annotations

import json
from typing import Any

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.simple import CBOR, JSON, PROVISION_PATH, Reply, SimpleRequest
from gateway.simpleprovision import ProvisionConfig, ProvisionCore, source_of
from proto.selfprovision import ProvisionReply, ProvisionRequest

BODY = {"deviceName": "boiler-7", "provisionDeviceKey": "k-1", "provisionDeviceSecret": "s-1"}


def req(
    payload: bytes | str | dict[str, Any] = BODY,
    *,
    method: str = "POST",
    remote: str = "192.0.2.1:40000",
    **kw: Any,
) -> SimpleRequest:
    if isinstance(payload, dict):
        payload = json.dumps(payload)
    data = payload.encode() if isinstance(payload, str) else payload
    return SimpleRequest(method=method, path=PROVISION_PATH, payload=data, remote=remote, **kw)


def core(**kw: Any) -> ProvisionCore:
    return ProvisionCore("gw-1", ProvisionConfig(**kw))


def test_a_request_is_relayed_with_its_fields() -> None:
    got = core().accept(req(), 0.0)
    assert got == ProvisionRequest(
        device_name="boiler-7",
        key="k-1",
        secret="s-1",
        remote="192.0.2.1:40000",
        gateway="gw-1",
    )


def test_lenient_json_and_cbor_as_every_simple_payload() -> None:
    lenient = core().accept(
        req("{deviceName:b, provisionDeviceKey:'k', provisionDeviceSecret:s}"), 0.0
    )
    assert isinstance(lenient, ProvisionRequest)
    assert (lenient.device_name, lenient.key, lenient.secret) == ("b", "k", "s")
    cbor = core().accept(req(cbor2.dumps(BODY), content_format=CBOR), 0.0)
    assert isinstance(cbor, ProvisionRequest) and cbor.secret == "s-1"


def test_credentials_the_device_brings_are_passed_on_to_be_refused_after_validation() -> None:
    got = core().accept(
        req({**BODY, "credentialsType": "X509_CERTIFICATE", "hash": "MIIB..."}), 0.0
    )
    assert isinstance(got, ProvisionRequest)
    assert (got.credentials_type, got.supplied) == ("X509_CERTIFICATE", ("hash",))
    token = core().accept(req({**BODY, "credentialsType": "ACCESS_TOKEN", "token": "t"}), 0.0)
    assert isinstance(token, ProvisionRequest) and token.supplied == ("token",)


@pytest.mark.parametrize(
    "payload",
    [
        b"{deviceName:",  # malformed
        b"[1,2]",  # not an object
        json.dumps({"deviceName": "b", "provisionDeviceKey": "k"}).encode(),  # no secret
        json.dumps({**BODY, "provisionDeviceKey": 5}).encode(),  # not a string
        json.dumps({**BODY, "provisionDeviceSecret": ""}).encode(),
        json.dumps({**BODY, "deviceName": "x" * 300}).encode(),  # too long
        b"\xff\xfe",
    ],
)
def test_malformed_requests_get_an_empty_400(payload: bytes) -> None:
    assert core().accept(req(payload), 0.0) == Reply("4.00")


def test_other_methods_and_oversized_payloads_are_refused_empty() -> None:
    assert core().accept(req(method="GET"), 0.0) == Reply("4.05")
    assert core().accept(req(b"x" * 3000), 0.0) == Reply("4.13", size1=2048)
    assert core().accept(req(b"x", declared_size=10_000), 0.0) == Reply("4.13", size1=2048)


def test_rate_limited_per_source_whatever_the_port() -> None:
    c = core(rate=1.0, burst=2)
    assert isinstance(c.accept(req(remote="192.0.2.1:1"), 0.0), ProvisionRequest)
    assert isinstance(c.accept(req(remote="192.0.2.1:2", payload="{"), 0.0), Reply)  # counted
    limited = c.accept(req(remote="192.0.2.1:3"), 0.0)
    assert limited == Reply("4.29", max_age=1)
    assert isinstance(c.accept(req(remote="192.0.2.2:3"), 0.0), ProvisionRequest)  # another one
    assert isinstance(c.accept(req(remote="192.0.2.1:3"), 1.0), ProvisionRequest)  # refilled


def test_rate_limited_per_key_across_sources() -> None:
    c = core(rate=0.5, burst=2)
    assert isinstance(c.accept(req(remote="192.0.2.1:1"), 0.0), ProvisionRequest)
    assert isinstance(c.accept(req(remote="192.0.2.2:1"), 0.0), ProvisionRequest)
    assert c.accept(req(remote="192.0.2.3:1"), 0.0) == Reply("4.29", max_age=2)
    other = {**BODY, "provisionDeviceKey": "k-2"}
    assert isinstance(c.accept(req(other, remote="192.0.2.4:1"), 0.0), ProvisionRequest)


def test_source_of() -> None:
    assert source_of("192.0.2.1:5683") == "192.0.2.1"
    assert source_of("[2001:db8::1]:5683") == "[2001:db8::1]"
    assert source_of("?") == "?"


def test_success_is_thingsboards_answer() -> None:
    r = ProvisionCore.reply(req(), ProvisionReply(status="SUCCESS", credentials_value="tok"))
    assert (r.code, r.content_format) == ("2.01", JSON)  # ThingsBoard's since 3.4
    assert json.loads(r.payload) == {
        "status": "SUCCESS",
        "credentialsType": "ACCESS_TOKEN",
        "credentialsValue": "tok",
    }


def test_failure_says_why() -> None:
    r = ProvisionCore.reply(req(), ProvisionReply(status="FAILURE", error_msg="nope"))
    assert r.code == "4.00"
    assert json.loads(r.payload) == {"status": "FAILURE", "errorMsg": "nope"}


def test_the_answer_is_in_the_requests_format() -> None:
    answer = ProvisionReply(status="SUCCESS", credentials_value="tok")
    cbor = ProvisionCore.reply(req(cbor2.dumps(BODY), content_format=CBOR), answer)
    assert cbor.content_format == CBOR and cbor2.loads(cbor.payload)["credentialsValue"] == "tok"
    asked = ProvisionCore.reply(req(cbor2.dumps(BODY), content_format=CBOR, accept=JSON), answer)
    assert asked.content_format == JSON


def test_not_found_is_never_larger_than_the_request() -> None:
    answer = ProvisionReply(status="NOT_FOUND")
    r = ProvisionCore.reply(req(), answer)
    assert r.code == "4.00" and json.loads(r.payload) == {"status": "NOT_FOUND"}
    assert len(r.payload) <= len(req().payload)
    tiny = req(b"{provisionDeviceKey:k,provisionDeviceSecret:s}")  # 46 bytes: still fits
    assert len(ProvisionCore.reply(tiny, answer).payload) <= len(tiny.payload)
    smaller = req(b"{a:1}")  # the body would not fit: an empty 4.00
    assert ProvisionCore.reply(smaller, answer) == Reply("4.00")


@pytest.mark.parametrize(
    "answer", [None, ProvisionReply(status="UNAVAILABLE", error_msg="log down")]
)
def test_no_answer_from_the_twin_is_503(answer: ProvisionReply | None) -> None:
    assert ProvisionCore.reply(req(), answer) == Reply("5.03")


def test_no_reply_before_validation_is_larger_than_its_request() -> None:
    c = core(rate=1.0, burst=1)
    for r in (req(b"{"), req(method="PUT"), req(b"x" * 5000), req(), req()):
        got = c.accept(r, 0.0)
        if isinstance(got, Reply):
            assert got.payload == b""
    assert got == Reply("4.29", max_age=1)


def test_config_is_checked() -> None:
    with pytest.raises(ValueError, match="rate"):
        ProvisionConfig(rate=0)
    with pytest.raises(ValueError, match="burst"):
        ProvisionConfig(burst=0)


@given(
    payload=st.one_of(
        st.binary(max_size=300),
        st.dictionaries(
            st.sampled_from([*BODY, "credentialsType", "token", "x"]),
            st.one_of(st.text(max_size=40), st.integers(), st.none()),
        ).map(lambda d: json.dumps(d).encode()),
    ),
    fmt=st.sampled_from([None, JSON, CBOR, 0]),
)
def test_property_nothing_before_validation_is_larger_than_the_request(
    payload: bytes, fmt: int | None
) -> None:
    r = req(payload, content_format=fmt)
    got = core(rate=1e9, burst=10**6).accept(r, 0.0)
    if isinstance(got, Reply):
        assert got.payload == b""
        return
    assert got.key and got.secret  # relayed only with both
    not_found = ProvisionCore.reply(r, ProvisionReply(status="NOT_FOUND"))
    assert len(not_found.payload) <= len(r.payload)

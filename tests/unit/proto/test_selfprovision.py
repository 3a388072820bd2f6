"""The self-provisioning contract between gateway and twin (proto.selfprovision)."""

from __future__ import annotations

import pytest

from proto.selfprovision import (
    ProvisionReply,
    ProvisionRequest,
    decode_reply,
    decode_request,
    encode,
)


def test_round_trips() -> None:
    req = ProvisionRequest(
        device_name="b", key="k", secret="s", credentials_type="X", supplied=("hash",), remote="r"
    )
    assert decode_request(encode(req)) == req
    reply = ProvisionReply(status="SUCCESS", credentials_value="t", device_id="d")
    assert decode_reply(encode(reply)) == reply
    assert encode(ProvisionReply(status="NOT_FOUND")) == b'{"status":"NOT_FOUND"}'


def test_the_secret_is_never_in_a_repr() -> None:
    req = ProvisionRequest(device_name="b", key="k", secret="hunter2")
    assert "hunter2" not in repr(req) and "hunter2" not in str(req)


@pytest.mark.parametrize(
    "data", [b"{", b'{"key": "k"}', b'{"device_name": 1, "key": "k", "secret": "s"}']
)
def test_malformed_requests_are_value_errors(data: bytes) -> None:
    with pytest.raises(ValueError, match=r"."):
        decode_request(data)
    with pytest.raises(ValueError, match=r"status"):
        decode_reply(b'{"status": "MAYBE"}')

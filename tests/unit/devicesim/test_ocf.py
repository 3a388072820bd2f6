from __future__ import annotations

from typing import Any

import pytest

from devicesim import ocf
from devicesim.errors import SimProtocolError

SIGN_UP_REPLY = {
    "accesstoken": "at",
    "refreshtoken": "rt",
    "uid": "alice",
    "expiresin": 3600,
    "redirecturi": "",
}


def test_request_bodies() -> None:
    assert ocf.sign_up_body("d", "code", "twinhub") == {
        "di": "d",
        "accesstoken": "code",
        "authprovider": "twinhub",
    }
    assert ocf.session_body("d", "u", "at", login=False) == {
        "di": "d",
        "uid": "u",
        "accesstoken": "at",
        "login": False,
    }
    assert ocf.refresh_body("d", "u", "rt") == {"di": "d", "uid": "u", "refreshtoken": "rt"}
    assert ocf.publish_body("d", [{"href": "/a"}]) == {
        "di": "d",
        "links": [{"href": "/a"}],
        "ttl": 0,
    }


def test_parse_sign_up_and_refresh_schedule() -> None:
    reg = ocf.parse_sign_up(SIGN_UP_REPLY, now=100.0)
    assert (reg.uid, reg.access_token, reg.refresh_token, reg.expires_in) == (
        "alice",
        "at",
        "rt",
        3600,
    )
    assert reg.refresh_at(0.75) == 100.0 + 2700
    never = ocf.parse_sign_up({**SIGN_UP_REPLY, "expiresin": -1}, now=0.0)
    assert never.refresh_at(0.75) is None
    newer = reg.refreshed(ocf.Tokens("at2", "", 60), now=200.0)
    assert (newer.access_token, newer.refresh_token, newer.obtained_at) == ("at2", "rt", 200.0)


@pytest.mark.parametrize(
    "reply",
    [
        None,
        [],
        {k: v for k, v in SIGN_UP_REPLY.items() if k != "uid"},
        {**SIGN_UP_REPLY, "accesstoken": ""},
        {**SIGN_UP_REPLY, "expiresin": "soon"},
        {**SIGN_UP_REPLY, "expiresin": True},
        {**SIGN_UP_REPLY, "refreshtoken": 5},
    ],
)
def test_parse_sign_up_rejects(reply: Any) -> None:
    with pytest.raises(SimProtocolError) as info:
        ocf.parse_sign_up(reply, now=0.0)
    assert info.value.operation == "sign-up"


def test_parse_sign_in_and_refresh() -> None:
    assert ocf.parse_sign_in({"expiresin": 60}) == 60
    with pytest.raises(SimProtocolError):
        ocf.parse_sign_in({})
    tokens = ocf.parse_refresh({"accesstoken": "a", "refreshtoken": "r", "expiresin": 5})
    assert tokens == ocf.Tokens("a", "r", 5)
    with pytest.raises(SimProtocolError):
        ocf.parse_refresh({"refreshtoken": "r", "expiresin": 5})


def test_parse_publish_reply() -> None:
    assert ocf.parse_publish(None) == []
    assert ocf.parse_publish({"di": "d", "links": [{"href": "/a"}]}) == [{"href": "/a"}]
    assert ocf.parse_publish([{"href": "/a"}]) == [{"href": "/a"}]
    with pytest.raises(SimProtocolError):
        ocf.parse_publish({"links": "no"})


def test_paths_and_queries() -> None:
    assert ocf.uri_path("/oic/sec/account") == ("oic", "sec", "account")
    assert ocf.query_params(["if=oic.if.b", "rt=a", "rt=b", "flag"]) == {
        "if": ["oic.if.b"],
        "rt": ["a", "b"],
        "flag": [""],
    }

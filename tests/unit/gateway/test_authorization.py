"""Authorization in the session core: device-ID resolution, owners, expiry, sign-off.

The rules (README "Device security"): the device ID comes from the OCF identity certificate
(``ocf-identity``), else from the configured device-ID claim (required when configured), else
from the request's ``di``; certificate and claim must agree and ``di`` must name the resolved
device. A device registered to another owner can neither sign up nor sign in; sign-in needs a
registration; sign-off frees the device.
"""

from __future__ import annotations

from typing import Any

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import session as s
from proto import events

from .playbook import NOW, Play, appended, of, one

D, X = "d-cert", "d-other"
CLAIM = "https://twinhub.test/deviceId"


def sign_up_body(di: str, token: str) -> dict[str, Any]:
    return {"di": di, "accesstoken": token, "authprovider": "test"}


def sign_in_body(di: str, token: str, uid: str = "alice") -> dict[str, Any]:
    return {"di": di, "uid": uid, "accesstoken": token, "login": True}


def token(play: Play, device: str | None, owner: str = "alice") -> str:
    extra = {CLAIM: device} if device is not None and play.device_claim else None
    bound = device if not play.device_claim else None
    return play.issuer.issue(owner, now=play.now, ttl=600, device_id=bound, extra=extra)


def outcome(effects: list[s.Effect], play: Play) -> str:
    """The answer to the device, after acknowledging what had to be recorded."""
    replies = of(effects, s.Respond) or of(play.ack(effects), s.Respond)
    code = one(replies, s.Respond).code
    if code == "4.01":
        one(effects, s.Close)
        assert not of(effects, s.Append), "nothing is recorded for a refused device"
    return code


# cert: the certificate's device ID (ocf-identity mode) · claim: a device-ID claim is configured
# · in token: the device the token names (None: none) · di: the request's di
RESOLUTION = [
    # cert  claim  in token  di   -> code
    (None, False, None, D, "2.04"),  # from di
    (None, False, X, D, "4.01"),  # the gateway's own device binding still holds
    (None, True, None, D, "4.01"),  # claim configured but missing
    (None, True, D, D, "2.04"),  # from the claim
    (None, True, X, D, "4.01"),  # di is not the claim's device
    (D, False, None, D, "2.04"),  # from the certificate
    (D, False, None, X, "4.01"),  # di is not the certificate's device (plgd ignores it)
    (D, True, D, D, "2.04"),  # claim and certificate agree
    (D, True, X, D, "4.01"),  # claim and certificate differ
    (D, True, X, X, "4.01"),  # ... whatever di says
    (D, True, None, D, "4.01"),  # claim configured but missing
]


@pytest.mark.parametrize(("cert", "claim", "in_token", "di", "code"), RESOLUTION)
def test_device_id_resolution_at_sign_up_and_sign_in(
    cert: str | None, claim: bool, in_token: str | None, di: str, code: str
) -> None:
    up = Play(cert_device_id=cert, device_claim=CLAIM if claim else None)
    tok = token(up, in_token)
    effects = up.request("POST", "/oic/sec/account", sign_up_body(di, tok))
    assert outcome(effects, up) == code
    if code == "2.04":
        ev = appended(effects)[0]
        assert isinstance(ev.data, events.DeviceRegistered)
        assert ev.device_id == di

    inn = Play(cert_device_id=cert, device_claim=CLAIM if claim else None, owners={di: "alice"})
    tok = token(inn, in_token)
    assert outcome(inn.request("POST", "/oic/sec/session", sign_in_body(di, tok)), inn) == code


def test_refresh_resolves_the_device_too() -> None:
    play = Play(cert_device_id=D)
    tokens = play.sign_up(D)
    body = {"di": X, "uid": "alice", "refreshtoken": tokens["refreshtoken"]}
    effects = play.request("POST", "/oic/sec/tokenrefresh", body)
    assert one(effects, s.Respond).code == "4.01"
    one(effects, s.Close)


def test_gateway_tokens_carry_the_configured_claim_so_the_device_can_use_them() -> None:
    play = Play(device_claim=CLAIM)
    tokens = play.request("POST", "/oic/sec/account", sign_up_body(D, token(play, D)))
    body = cbor2.loads(one(play.ack(tokens), s.Respond).payload)
    effects = play.ack(
        play.request("POST", "/oic/sec/session", sign_in_body(D, body["accesstoken"]))
    )
    assert one(effects, s.Respond).code == "2.04"
    one(effects, s.SignedIn)
    again = {"di": D, "uid": "alice", "refreshtoken": body["refreshtoken"]}
    refreshed = play.request("POST", "/oic/sec/tokenrefresh", again)
    assert one(refreshed, s.Respond).code == "2.04"


# --------------------------------------------------------------------------- owners


def test_the_owner_is_read_from_the_log_before_anything_is_recorded() -> None:
    play = Play(auto_owner=False)
    effects = play.request("POST", "/oic/sec/account", sign_up_body(D, play.token()))
    load = one(effects, s.LoadOwner)
    assert load.device_id == D
    assert not of(effects, s.Append)
    assert not of(effects, s.Respond)
    effects = play.feed(s.OwnerLoaded(load.ref, None))
    assert isinstance(appended(effects)[0].data, events.DeviceRegistered)


def test_a_device_of_another_owner_cannot_sign_up_or_sign_in() -> None:
    up = Play(owners={D: "bob"})
    effects = up.request("POST", "/oic/sec/account", sign_up_body(D, up.token()))
    assert outcome(effects, up) == "4.01"
    assert b"another owner" in one(effects, s.Respond).payload

    inn = Play(owners={D: "bob"})
    effects = inn.request("POST", "/oic/sec/session", sign_in_body(D, inn.token()))
    assert outcome(effects, inn) == "4.01"
    assert inn.session.phase is s.Phase.CLOSED


def test_the_same_owner_may_sign_up_again() -> None:
    play = Play(owners={D: "alice"})
    effects = play.request("POST", "/oic/sec/account", sign_up_body(D, play.token()))
    assert outcome(effects, play) == "2.04"


def test_sign_in_needs_a_registration() -> None:
    play = Play()
    effects = play.request("POST", "/oic/sec/session", sign_in_body(D, play.token()))
    assert outcome(effects, play) == "4.01"
    assert b"sign up first" in one(effects, s.Respond).payload


def test_sign_off_unregisters_and_frees_the_device() -> None:
    play = Play()
    play.sign_in(D)
    query = ("di=" + D, "accesstoken=" + play.token(), "uid=alice")
    effects = play.request("DELETE", "/oic/sec/account", query=query)
    evs = [type(e.data) for e in appended(effects)]
    assert evs == [events.DeviceOffline, events.DeviceUnregistered]
    after = play.ack(effects)
    assert one(after, s.Respond).code == "2.02"
    assert one(after, s.Close).reason == "signed off"
    assert D not in play.owners
    # another owner may now take it
    bob = Play(issuer=play.issuer, owners=play.owners)
    effects = bob.request("POST", "/oic/sec/account", sign_up_body(D, bob.token("bob")))
    assert outcome(effects, bob) == "2.04"
    assert play.owners[D] == "bob"


def test_sign_off_by_another_owner_is_refused() -> None:
    play = Play(owners={D: "alice"})
    query = ("di=" + D, "accesstoken=" + play.token("bob"))
    effects = play.request("DELETE", "/oic/sec/account", query=query)
    assert outcome(effects, play) == "4.01"
    assert play.owners == {D: "alice"}


def test_sign_off_with_a_uid_that_is_not_the_owner_is_refused() -> None:
    play = Play(owners={D: "alice"})
    query = ("di=" + D, "accesstoken=" + play.token(), "uid=bob")
    assert outcome(play.request("DELETE", "/oic/sec/account", query=query), play) == "4.01"


def test_sign_off_of_an_unregistered_device_records_nothing() -> None:
    play = Play()
    query = ("di=" + D, "accesstoken=" + play.token())
    effects = play.request("DELETE", "/oic/sec/account", query=query)
    assert one(effects, s.Respond).code == "2.02"
    one(effects, s.Close)
    assert not of(effects, s.Append)


def test_sign_off_of_another_device_leaves_the_signed_in_one_online() -> None:
    play = Play()
    play.sign_in(D)
    play.owners[X] = "alice"
    query = ("di=" + X, "accesstoken=" + play.token())
    effects = play.request("DELETE", "/oic/sec/account", query=query)
    assert [(type(e.data), e.device_id) for e in appended(effects)] == [
        (events.DeviceUnregistered, X)
    ]
    assert play.session.online


def test_log_unavailable_while_reading_the_owner_is_503_and_the_device_may_retry() -> None:
    play = Play(auto_owner=False, owners={D: "alice"})
    tok = play.token()
    effects = play.request("POST", "/oic/sec/session", sign_in_body(D, tok))
    load = one(effects, s.LoadOwner)
    effects = play.feed(s.OwnerLoaded(load.ref, None, "nats down"))
    assert one(effects, s.Respond).code == "5.03"
    assert not of(effects, s.Close)
    assert play.session.phase is s.Phase.CONNECTED
    load = one(play.request("POST", "/oic/sec/session", sign_in_body(D, tok)), s.LoadOwner)
    effects = play.ack(play.feed(s.OwnerLoaded(load.ref, "alice")))
    assert one(effects, s.Respond).code == "2.04"


def test_a_resumed_sign_in_must_be_the_same_owners() -> None:
    play = Play()
    play.sign_in(D)
    effects = play.request("POST", "/oic/sec/session", sign_in_body(D, play.token("bob"), "bob"))
    assert one(effects, s.Respond).code == "4.01"
    one(effects, s.Close)


# --------------------------------------------------------------------------- expiry


def test_refresh_extends_the_session_past_the_first_tokens_expiry() -> None:
    play = Play(access_ttl=1000)
    tokens = play.sign_up(D)
    short = play.issuer.issue("alice", now=play.now, ttl=100, device_id=D)
    play.ack(play.request("POST", "/oic/sec/session", sign_in_body(D, short)))
    assert play.session.expires_at == int(NOW + 100)
    play.now += 50
    body = {"di": D, "uid": "alice", "refreshtoken": tokens["refreshtoken"]}
    assert one(play.request("POST", "/oic/sec/tokenrefresh", body), s.Respond).code == "2.04"
    play.now += 100
    assert play.feed(s.Tick()) == []
    play.now += 1000
    effects = play.feed(s.Tick())
    assert one(effects, s.Close).reason == "token expired"
    assert isinstance(appended(effects)[0].data, events.DeviceOffline)


def test_the_session_ends_when_the_client_certificate_expires() -> None:
    play = Play(cert_device_id=D, cert_expires_at=NOW + 10)
    play.sign_in(D)
    play.now += 5
    assert play.feed(s.Tick()) == []
    play.now += 6
    effects = play.feed(s.Tick())
    ev = one(appended(effects), events.Event)  # type: ignore[arg-type]
    assert isinstance(ev.data, events.DeviceOffline)
    assert ev.data.reason == "client certificate expired"
    assert one(effects, s.Close).reason == "client certificate expired"
    assert play.feed(s.Tick()) == []


def test_an_expired_certificate_closes_a_connection_that_never_signed_in() -> None:
    play = Play(cert_expires_at=NOW + 1)
    play.now += 2
    assert play.feed(s.Tick()) == [s.Close("client certificate expired")]


# --------------------------------------------------------------------------- robustness

security_inputs = st.one_of(
    st.builds(
        s.DeviceRequest,
        rid=st.integers(0, 5),
        method=st.sampled_from(["POST", "DELETE"]),
        path=st.sampled_from(["/oic/sec/account", "/oic/sec/session", "/oic/sec/tokenrefresh"]),
        query=st.sampled_from([(), ("di=" + D,), ("di=" + X, "uid=alice")]),
        payload=st.sampled_from([b"", b"\xa0", cbor2.dumps({"di": D, "login": True})]),
        content_format=st.just(10000),
    ),
    st.builds(
        s.OwnerLoaded,
        ref=st.integers(0, 12),
        owner=st.sampled_from([None, "alice", "bob"]),
        error=st.sampled_from(["", "down"]),
    ),
    st.builds(s.AppendResult, ref=st.integers(0, 12), ok=st.booleans()),
    st.just(s.Tick()),
    st.builds(s.ConnectionLost, reason=st.just("reset")),
)


@settings(max_examples=200)
@given(st.lists(security_inputs, max_size=25), st.booleans(), st.booleans())
def test_owner_answers_in_any_order_never_crash_the_session(
    seq: list[s.Input], cert: bool, claim: bool
) -> None:
    play = Play(
        auto_owner=False, cert_device_id=D if cert else None, device_claim=CLAIM if claim else None
    )
    for inp in seq:
        play.feed(inp)

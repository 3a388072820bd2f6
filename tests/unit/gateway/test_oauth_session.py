"""Scripted conversations: OAuth2 sign-up (ExchangeCode / CodeExchanged) and key refresh
(RefreshKeys / KeysRefreshed)."""

from __future__ import annotations

import dataclasses

import cbor2
from cryptography.hazmat.primitives.asymmetric import ec

from auth.tokens import Claims, JwtValidator, KeySet, TokenIssuer
from gateway import session as s

from .playbook import NOW, Play, of, one

ACCOUNT = "/oic/sec/account"


def oauth_play() -> Play:
    play = Play()
    play.session.config = dataclasses.replace(
        play.session.config, oauth_providers=("acme",), refreshable_keys=True
    )
    return play


def code_sign_up(play: Play, code: str = "c-1", provider: str = "acme") -> list[s.Effect]:
    return play.request(
        "POST", ACCOUNT, {"di": "d1", "accesstoken": code, "authprovider": provider}
    )


ALICE = Claims(owner="alice", device_id=None, expires_at=NOW + 600)


def test_a_code_is_exchanged_then_the_device_signed_up_and_a_retry_gets_the_same_answer() -> None:
    play = oauth_play()
    effects = code_sign_up(play)
    ex = one(effects, s.ExchangeCode)
    assert (ex.provider, ex.code) == ("acme", "c-1")
    assert not of(effects, s.Respond)
    answer = one(play.ack(play.feed(s.CodeExchanged(ex.ref, ALICE))), s.Respond)
    assert answer.code == "2.04"
    assert cbor2.loads(answer.payload)["uid"] == "alice"
    again = code_sign_up(play)
    assert not of(again, s.ExchangeCode), "a code is single-use: never exchanged twice"
    assert [(r.code, r.payload) for r in of(again, s.Respond)] == [("2.04", answer.payload)]


def test_a_retry_while_the_exchange_is_in_flight_waits_for_it() -> None:
    play = oauth_play()
    ex = one(code_sign_up(play), s.ExchangeCode)
    assert code_sign_up(play) == [], "the retry waits for the one exchange"
    replies = of(play.ack(play.feed(s.CodeExchanged(ex.ref, ALICE))), s.Respond)
    assert [r.code for r in replies] == ["2.04", "2.04"]


def test_a_log_failure_after_the_exchange_reuses_its_claims() -> None:
    play = oauth_play()
    ex = one(code_sign_up(play), s.ExchangeCode)
    after = play.feed(s.CodeExchanged(ex.ref, ALICE))
    failed = play.feed(s.AppendResult(one(after, s.Append).ref, False, "down"))
    assert one(failed, s.Respond).code == "5.03"
    retry = code_sign_up(play)
    assert not of(retry, s.ExchangeCode)
    assert one(play.ack(retry), s.Respond).code == "2.04"


def test_a_refused_code_is_401_and_closes() -> None:
    play = oauth_play()
    ex = one(code_sign_up(play), s.ExchangeCode)
    out = play.feed(s.CodeExchanged(ex.ref, None, "invalid_grant"))
    r = one(out, s.Respond)
    assert r.code == "4.01"
    assert b"invalid_grant" in r.payload
    one(out, s.Close)


def test_an_unreachable_provider_is_503_and_the_code_can_be_retried() -> None:
    play = oauth_play()
    ex = one(code_sign_up(play), s.ExchangeCode)
    out = play.feed(s.CodeExchanged(ex.ref, None, "connection refused", unavailable=True))
    r = one(out, s.Respond)
    assert r.code == "5.03"
    assert b"acme" in r.payload
    assert not of(out, s.Close)
    one(code_sign_up(play), s.ExchangeCode)


def test_an_unknown_provider_with_a_code_is_401() -> None:
    play = oauth_play()
    out = code_sign_up(play, provider="nope")
    assert one(out, s.Respond).code == "4.01"
    assert b"unknown auth provider" in one(out, s.Respond).payload
    one(out, s.Close)


def test_a_provider_token_for_another_device_owner_is_refused() -> None:
    play = oauth_play()
    play.owners["d1"] = "bob"
    ex = one(code_sign_up(play), s.ExchangeCode)
    out = play.feed(s.CodeExchanged(ex.ref, ALICE))
    assert one(out, s.Respond).code == "4.01"


def test_an_unknown_kid_asks_for_a_refresh_once_then_retries() -> None:
    play = oauth_play()
    rotated = TokenIssuer(ec.generate_private_key(ec.SECP256R1()), kid="k2")
    token = rotated.issue("alice", now=NOW, ttl=600)
    body = {"di": "d1", "accesstoken": token, "authprovider": "twinhub"}
    refresh = one(play.request("POST", ACCOUNT, body), s.RefreshKeys)
    assert refresh.kid == "k2"
    validator = play.session.validator
    assert isinstance(validator, JwtValidator)
    validator.keys = KeySet({**play.issuer.public_keys.keys, **rotated.public_keys.keys})
    assert one(play.ack(play.feed(s.KeysRefreshed(refresh.ref))), s.Respond).code == "2.04"
    # still unknown after the refresh: refused, no second refresh
    stranger = TokenIssuer(ec.generate_private_key(ec.SECP256R1()), kid="k3")
    body["accesstoken"] = stranger.issue("alice", now=NOW, ttl=600)
    again = one(play.request("POST", ACCOUNT, body), s.RefreshKeys)
    out = play.feed(s.KeysRefreshed(again.ref))
    assert one(out, s.Respond).code == "4.01"
    assert not of(out, s.RefreshKeys)


def test_without_a_refreshable_source_an_unknown_kid_is_401_at_once() -> None:
    play = Play()
    stranger = TokenIssuer(ec.generate_private_key(ec.SECP256R1()), kid="k9")
    body = {"di": "d1", "accesstoken": stranger.issue("alice", now=NOW, ttl=600)}
    out = play.request("POST", ACCOUNT, body)
    assert one(out, s.Respond).code == "4.01"
    assert not of(out, s.RefreshKeys)

"""What the client reads of its token (token_owner) and how it names durable consumers
(consumer_name)."""

from __future__ import annotations

import base64
import json
import re

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from auth.tokens import TokenIssuer
from proto import subjects
from twinhub_client.client import consumer_name, token_owner

ISSUER = TokenIssuer(ec.generate_private_key(ec.SECP256R1()), kid="k")
NOW = 1_700_000_000.0


def unsigned(claims: object) -> str:
    def part(obj: object) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'ES256', 'typ': 'JWT'})}.{part(claims)}.c2ln"


def test_the_owner_is_the_sub_claim() -> None:
    assert token_owner(ISSUER.issue("alice", now=NOW, ttl=600)) == "alice"


def test_another_owner_claim() -> None:
    token = ISSUER.issue("alice", now=NOW, ttl=600, extra={"tenant": "acme"})
    assert token_owner(token, "tenant") == "acme"
    assert token_owner(token) == "alice"


def test_the_token_is_read_not_verified() -> None:
    """The server verifies it; an expired or foreign token still names its owner."""
    expired = ISSUER.issue("alice", now=NOW - 10_000, ttl=1)
    assert token_owner(expired) == "alice"
    assert token_owner(unsigned({"sub": "bob", "aud": "elsewhere"})) == "bob"


def test_odd_owners_are_read_verbatim() -> None:
    for owner in ("a.b c", "ünï", "*", ">"):
        token = ISSUER.issue(owner, now=NOW, ttl=600)
        assert token_owner(token) == owner
        prefix = subjects.owner_inbox_prefix(token_owner(token))
        assert prefix.count(".") == 1  # the inbox is one escaped token under _INBOX
        assert subjects.is_valid_subject(prefix + ".x")


@pytest.mark.parametrize(
    "token",
    [
        "",
        "garbage",
        "a.b.c",
        "a.b",
        "\x00\xff",
        unsigned([1, 2, 3]),
        unsigned("alice"),
        base64.urlsafe_b64encode(b"{not json").decode() + ".e30.x",
    ],
)
def test_garbage_is_a_value_error(token: str) -> None:
    with pytest.raises(ValueError, match="JWT"):
        token_owner(token)


@pytest.mark.parametrize(
    "claims",
    [{}, {"sub": ""}, {"sub": 7}, {"sub": None}, {"sub": ["alice"]}, {"owner": "alice"}],
)
def test_a_missing_or_unusable_claim_is_a_value_error(claims: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="'sub'"):
        token_owner(unsigned(claims))


def test_a_missing_other_claim_is_a_value_error() -> None:
    token = ISSUER.issue("alice", now=NOW, ttl=600)
    with pytest.raises(ValueError, match="'tenant'"):
        token_owner(token, "tenant")


def test_no_jwt_error_leaks() -> None:
    with pytest.raises(ValueError, match="not a JWT") as info:
        token_owner("garbage")
    assert not isinstance(info.value, jwt.PyJWTError)
    assert info.value.__cause__ is None


KEY_A = bytes(range(32))
KEY_B = bytes(range(1, 33))


def test_consumer_name_is_stable() -> None:
    assert consumer_name(KEY_A, "orders") == consumer_name(bytes(KEY_A), "orders")


def test_consumer_name_is_a_valid_distinct_consumer_name() -> None:
    name = consumer_name(KEY_A, "orders")
    assert re.fullmatch(r"app_[0-9a-f]{40}", name)
    assert subjects.is_valid_subject(f"x.{name}.y")  # one subject token


def test_consumer_names_differ_per_key_and_per_durable() -> None:
    names = {
        consumer_name(key, durable)
        for key in (KEY_A, KEY_B, b"", b"k")
        for durable in ("orders", "orders2", "", "a.b", "ünï")
    }
    assert len(names) == 20


def test_consumer_name_hides_the_durable_name() -> None:
    assert "orders" not in consumer_name(KEY_A, "orders")
    assert consumer_name(KEY_A, "twin-projector") != "twin-projector"

"""The auth callout's sans-IO core (bus.callout) and its message handler
(bus.adapters.nats_callout), on authorization requests in nats-server's own format.

A request is built as nats-server builds one: an ``ed25519-nkey`` JWT signed by the server's
NKey, audience ``nats-authorization-request``, the client's connect options (its token) and
the one-time user NKey. Responses are checked by verifying their Ed25519 signatures against
the issuer's public key, decoded here from its NKey form (base32, prefix byte, CRC16)."""

from __future__ import annotations

import base64
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nkeys
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from auth.application import AppTokenValidator
from auth.errors import TokenError
from auth.tokens import Claims, TokenIssuer
from bus.adapters.nats_callout import CalloutService
from bus.callout import (
    MAX_REQUEST,
    AuthRequest,
    CalloutError,
    decode_request,
    deny,
    encode_jwt,
    grant,
)
from bus.credentials import ensure_credentials
from bus.permissions import ACCOUNT_APPS, Permissions, application_permissions
from eventstore.adapters.endpoint import NatsEndpoint
from proto import subjects

from .matching import may_publish, may_subscribe

NOW = 1_700_000_000.0
STREAM = "TWINHUB_EVENTS"
RESERVED = ("twin-projector",)


# -- NKeys and JWTs, independently of the code under test -----------------------------------------


def keypair(prefix: int) -> Any:
    return nkeys.from_seed(bytearray(nkeys.encode_seed(os.urandom(32), prefix)))


def public(kp: Any) -> str:
    return bytes(kp.public_key).decode()


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def ed25519_of(nkey: str) -> Ed25519PublicKey:
    """The Ed25519 key an NKey public key (U.../A.../N...) encodes; its checksum checked."""
    raw = base64.b32decode(nkey)
    assert len(raw) == 35
    body, crc = raw[:-2], raw[-2:]
    assert nkeys.crc16(bytearray(body)) == int.from_bytes(crc, "little"), "bad NKey checksum"
    return Ed25519PublicKey.from_public_bytes(body[1:])


def verified(token: str | bytes, signer_public: str) -> dict[str, Any]:
    """The claims of a NATS JWT whose signature ``signer_public`` made (else an error)."""
    text = token.decode() if isinstance(token, bytes) else token
    head, body, sig = text.split(".")
    assert json.loads(unb64(head)) == {"typ": "JWT", "alg": "ed25519-nkey"}
    ed25519_of(signer_public).verify(unb64(sig), f"{head}.{body}".encode())
    claims = json.loads(unb64(body))
    assert isinstance(claims, dict)
    return claims


def sign_jwt(claims: dict[str, Any], kp: Any, header: dict[str, Any] | None = None) -> bytes:
    h = b64(json.dumps(header or {"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    b = b64(json.dumps(claims).encode())
    return f"{h}.{b}.{b64(kp.sign(f'{h}.{b}'.encode()))}".encode()


SERVER = keypair(nkeys.PREFIX_BYTE_SERVER)
ISSUER = keypair(nkeys.PREFIX_BYTE_ACCOUNT)
OTHER = keypair(nkeys.PREFIX_BYTE_ACCOUNT)


def request_claims(
    token: str | None = "the-app-token", user_nkey: str | None = None, **nats: Any
) -> dict[str, Any]:
    """Claims as nats-server 2.10+ writes an authorization request."""
    user = user_nkey or public(keypair(nkeys.PREFIX_BYTE_USER))
    opts: dict[str, Any] = {"lang": "python3", "version": "2.10.0", "protocol": 1}
    if token is not None:
        opts["auth_token"] = token
    body: dict[str, Any] = {
        "server_id": {
            "name": "twinhub",
            "host": "127.0.0.1",
            "id": public(SERVER),
            "version": "2.12.8",
        },
        "user_nkey": user,
        "client_info": {
            "host": "127.0.0.1",
            "id": 42,
            "user": "",
            "name": "twinhub-client",
            "kind": "Client",
            "type": "nats",
        },
        "connect_opts": opts,
        "type": "authorization_request",
        "version": 2,
    }
    body.update(nats)
    return {
        "jti": "JTI",
        "iat": int(NOW),
        "iss": public(SERVER),
        "sub": user,
        "aud": "nats-authorization-request",
        "nats": body,
    }


def request_jwt(**kw: Any) -> bytes:
    return sign_jwt(request_claims(**kw), SERVER)


def a_request(token: str | None = "the-app-token") -> AuthRequest:
    return decode_request(request_jwt(token=token))


@dataclass(frozen=True)
class Caller:
    owner: str
    expires_at: float | None


def granted(
    owner: str = "alice",
    expires_at: float | None = NOW + 600,
    *,
    max_lifetime: float = 3600.0,
    request: AuthRequest | None = None,
) -> tuple[dict[str, Any], dict[str, Any], int]:
    """(outer claims, user claims, exp) of a grant, both signatures verified."""
    req = request or a_request()
    body, exp = grant(
        req,
        Caller(owner, expires_at),
        ISSUER,
        NOW,
        stream=STREAM,
        reserved=RESERVED,
        max_lifetime=max_lifetime,
    )
    outer = verified(body, public(ISSUER))
    user = verified(outer["nats"]["jwt"], public(ISSUER))
    return outer, user, exp


def perms_of(user: dict[str, Any]) -> Permissions:
    nats = user["nats"]
    return Permissions(
        pub_allow=tuple(nats["pub"].get("allow", ())),
        pub_deny=tuple(nats["pub"].get("deny", ())),
        sub_allow=tuple(nats["sub"].get("allow", ())),
        sub_deny=tuple(nats["sub"].get("deny", ())),
    )


# -- the test helpers can tell a bad signature -------------------------------------------------


def test_signature_checks_can_fail() -> None:
    token = encode_jwt({"sub": "x"}, ISSUER)
    assert verified(token, public(ISSUER))["sub"] == "x"
    with pytest.raises(InvalidSignature):
        verified(token, public(OTHER))
    head, _, sig = token.split(".")
    forged = f"{head}.{b64(json.dumps({'sub': 'y'}).encode())}.{sig}"
    with pytest.raises(InvalidSignature):
        verified(forged, public(ISSUER))


# -- reading requests ----------------------------------------------------------------------------


def test_decode_a_real_format_request() -> None:
    user = public(keypair(nkeys.PREFIX_BYTE_USER))
    req = decode_request(request_jwt(token="tok.en.value", user_nkey=user))
    assert req == AuthRequest(
        user_nkey=user,
        server_id=public(SERVER),
        token="tok.en.value",
        client_host="127.0.0.1",
        client_name="twinhub-client",
        client_id=42,
    )


def test_decode_tolerates_surrounding_white_space() -> None:
    assert decode_request(b"\n " + request_jwt() + b"\r\n").token == "the-app-token"


@pytest.mark.parametrize("token", [None, ""])
def test_decode_a_request_without_a_token(token: str | None) -> None:
    assert decode_request(request_jwt(token=token)).token is None


def test_decode_without_client_info_or_connect_options() -> None:
    claims = request_claims()
    del claims["nats"]["client_info"]
    del claims["nats"]["connect_opts"]
    req = decode_request(sign_jwt(claims, SERVER))
    assert (req.token, req.client_host, req.client_name, req.client_id) == (None, "", "", 0)


@pytest.mark.parametrize("client_id", ["x", None, 1.5, True, [1]])
def test_an_odd_client_id_is_no_client_id(client_id: object) -> None:
    claims = request_claims()
    claims["nats"]["client_info"]["id"] = client_id
    assert decode_request(sign_jwt(claims, SERVER)).client_id == 0


def test_a_non_string_token_is_no_token() -> None:
    claims = request_claims()
    claims["nats"]["connect_opts"]["auth_token"] = {"owner": "bob"}
    assert decode_request(sign_jwt(claims, SERVER)).token is None


NKEY_HEADER = b64(b'{"alg":"ed25519-nkey"}')


def _mutated(change: Any) -> bytes:
    claims = request_claims()
    change(claims)
    return sign_jwt(claims, SERVER)


MALFORMED: dict[str, bytes] = {
    "empty": b"",
    "text": b"hello",
    "two parts": b"eyJhIjoxfQ.eyJhIjoxfQ",
    "four parts": request_jwt() + b".x",
    "not base64 json": b"!!!.???.sig",
    "binary": b"\xff\xfe.\x00\x01.\x02",
    "non-ascii": "é.é.é".encode(),
    "header not an object": f"{b64(b'[1]')}.{b64(b'{}')}.x".encode(),
    "claims not an object": f"{NKEY_HEADER}.{b64(b'[1,2]')}.x".encode(),
    "claims not json": f"{NKEY_HEADER}.{b64(b'{')}.x".encode(),
    "alg none": sign_jwt(request_claims(), SERVER, {"typ": "JWT", "alg": "none"}),
    "alg HS256": sign_jwt(request_claims(), SERVER, {"typ": "JWT", "alg": "HS256"}),
    "wrong audience": _mutated(lambda c: c.update(aud="APPS")),
    "no audience": _mutated(lambda c: c.pop("aud")),
    "no nats": _mutated(lambda c: c.pop("nats")),
    "nats not an object": _mutated(lambda c: c.update(nats="x")),
    "wrong type": _mutated(lambda c: c["nats"].update(type="authorization_response")),
    "no user nkey": _mutated(lambda c: c["nats"].pop("user_nkey")),
    "user nkey not a user": _mutated(lambda c: c["nats"].update(user_nkey=public(ISSUER))),
    "user nkey not a string": _mutated(lambda c: c["nats"].update(user_nkey=7)),
    "no server id": _mutated(lambda c: c["nats"].pop("server_id")),
    "server id not an object": _mutated(lambda c: c["nats"].update(server_id="N")),
    "server id without id": _mutated(lambda c: c["nats"]["server_id"].pop("id")),
    "deeply nested": f"{NKEY_HEADER}.{b64(b'[' * 20000 + b']' * 20000)}.x".encode(),
}


@pytest.mark.parametrize("data", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_requests_are_callout_errors(data: bytes) -> None:
    assert len(data) <= MAX_REQUEST  # each is refused for what it is, not for its size
    with pytest.raises(CalloutError):
        decode_request(data)


def test_an_oversized_request_is_refused_unread() -> None:
    claims = request_claims()
    claims["nats"]["connect_opts"]["auth_token"] = "x" * MAX_REQUEST
    data = sign_jwt(claims, SERVER)
    assert len(data) > MAX_REQUEST
    with pytest.raises(CalloutError, match="too large"):
        decode_request(data)
    claims["nats"]["connect_opts"]["auth_token"] = "x" * (MAX_REQUEST // 2)
    assert decode_request(sign_jwt(claims, SERVER)).token  # a big one below the limit is read


# -- granting ------------------------------------------------------------------------------------


def test_grant_is_signed_by_the_issuer_and_pinned_to_the_connection() -> None:
    req = a_request()
    outer, user, _ = granted(request=req)
    assert outer["iss"] == public(ISSUER)
    assert outer["sub"] == req.user_nkey
    assert outer["aud"] == req.server_id == public(SERVER)
    assert outer["nats"]["type"] == "authorization_response"
    assert outer["nats"]["version"] == 2
    assert "error" not in outer["nats"]
    assert outer["iat"] == int(NOW)
    assert outer["jti"]
    assert user["iss"] == public(ISSUER)
    assert user["sub"] == req.user_nkey
    assert user["aud"] == ACCOUNT_APPS == "APPS"
    assert user["name"] == "alice"
    assert user["nats"]["type"] == "user"
    assert user["nats"]["version"] == 2
    assert user["jti"]


def test_a_grant_signed_by_another_key_does_not_verify() -> None:
    body, _ = grant(
        a_request(),
        Caller("alice", None),
        OTHER,
        NOW,
        stream=STREAM,
        reserved=RESERVED,
        max_lifetime=60,
    )
    with pytest.raises(InvalidSignature):
        verified(body, public(ISSUER))


@pytest.mark.parametrize(
    ("expires_at", "max_lifetime", "want"),
    [
        (NOW + 600, 3600.0, NOW + 600),  # the token's, sooner
        (NOW + 7200, 3600.0, NOW + 3600),  # never more than max_lifetime
        (None, 3600.0, NOW + 3600),  # a token without exp: max_lifetime
        (NOW + 600.9, 3600.0, NOW + 600),  # whole seconds, never later than the token
        (NOW + 0.2, 3600.0, NOW + 1),  # always in the future
    ],
)
def test_the_user_jwt_expires_with_the_token(
    expires_at: float | None, max_lifetime: float, want: float
) -> None:
    _, user, exp = granted(expires_at=expires_at, max_lifetime=max_lifetime)
    assert exp == user["exp"] == int(want)
    assert user["exp"] > user["iat"]


@pytest.mark.parametrize("owner", ["alice", "a.b c", "ünï", "alice.>", "*", ">", "x~2Ey"])
def test_the_user_gets_exactly_the_owners_application_permissions(owner: str) -> None:
    _, user, _ = granted(owner)
    want = application_permissions(owner, STREAM, RESERVED)
    assert perms_of(user) == Permissions(
        pub_allow=want.pub_allow,
        pub_deny=want.pub_deny,
        sub_allow=want.sub_allow,
        sub_deny=want.sub_deny,
    )
    assert user["name"] == owner


@pytest.mark.parametrize(
    ("owner", "escaped"),
    [("a.b c", "a~2Eb~20c"), ("ünï", "~C3~BCn~C3~AF"), ("alice.>", "alice~2E~3E"), ("*", "~2A")],
)
def test_odd_owners_get_escaped_tokens(owner: str, escaped: str) -> None:
    _, user, _ = granted(owner)
    subs = user["nats"]["sub"]["allow"]
    assert sorted(subs) == sorted([f"twinhub.ev.{escaped}.>", f"_INBOX.{escaped}.>"])
    pubs = user["nats"]["pub"]["allow"]
    assert f"twinhub.js.API.CONSUMER.CREATE.{STREAM}.*.twinhub.ev.{escaped}.>" in pubs


@pytest.mark.parametrize("owner", ["a.b c", "ünï", "alice.>", "alice.*", "*", ">", "bob "])
@pytest.mark.parametrize("victim", ["alice", "bob", "a", "b c"])
def test_an_owner_cannot_reach_another_owners_subjects(owner: str, victim: str) -> None:
    assert subjects.escape_token(owner) != subjects.escape_token(victim)  # two owners
    _, user, _ = granted(owner)
    p = perms_of(user)
    for subject in (
        subjects.event_subject(victim, "d1", "resource-changed", "/a"),
        subjects.event_subject(victim, "d1", "command-pending", "/light"),
        f"{subjects.owner_inbox_prefix(victim)}.reply",
        "twinhub.ev.>",
        "_INBOX.>",
    ):
        assert not may_subscribe(p, subject), subject
    victim_filter = subjects.event_filter(victim)
    assert not may_publish(p, f"twinhub.js.API.CONSUMER.CREATE.{STREAM}.c.{victim_filter}")
    assert not may_publish(p, subjects.event_subject(owner, "d1", "resource-changed", "/a"))
    # its own, escaped, work
    assert may_subscribe(p, subjects.event_subject(owner, "d1", "resource-changed", "/a"))
    own_filter = subjects.event_filter(owner)
    assert may_publish(p, f"twinhub.js.API.CONSUMER.CREATE.{STREAM}.c.{own_filter}")
    for pattern in (*p.pub_allow, *p.sub_allow):
        assert subjects.is_valid_subject(pattern, wildcards=True), pattern


# -- denying -------------------------------------------------------------------------------------


def test_deny_carries_the_reason_and_no_user() -> None:
    req = a_request()
    outer = verified(deny(req, ISSUER, NOW, "token refused: expired"), public(ISSUER))
    assert outer["nats"]["error"] == "token refused: expired"
    assert "jwt" not in outer["nats"]
    assert outer["sub"] == req.user_nkey
    assert outer["aud"] == req.server_id
    assert outer["iss"] == public(ISSUER)
    assert outer["nats"]["type"] == "authorization_response"


def test_a_long_reason_is_cut() -> None:
    outer = verified(deny(a_request(), ISSUER, NOW, "x" * 1000), public(ISSUER))
    assert outer["nats"]["error"] == "x" * 200


# -- the handler: decisions on messages ----------------------------------------------------------


class FakeMsg:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.answers: list[bytes] = []

    async def respond(self, data: bytes) -> None:
        self.answers.append(data)


class Tokens:
    """Tokens "owner:<name>" are valid; anything else is refused with the validator's error."""

    def validate(self, token: str, now: float) -> Claims:
        assert now == NOW
        if not token.startswith("owner:"):
            raise TokenError("bad signature")
        return Claims(owner=token.removeprefix("owner:"), device_id=None, expires_at=NOW + 60)


@pytest.fixture
def service(tmp_path: Path) -> CalloutService:
    creds = ensure_credentials(tmp_path / "bus")
    return CalloutService(
        NatsEndpoint("nats://127.0.0.1:1", seed_file=creds.seed_file("callout")),
        creds.issuer_file,
        Tokens(),
        stream=STREAM,
        reserved=RESERVED,
        clock=lambda: NOW,
    )


async def answer(service: CalloutService, data: bytes) -> dict[str, Any] | None:
    msg = FakeMsg(data)
    await service._on_request(msg)  # type: ignore[arg-type]
    if not msg.answers:
        return None
    (body,) = msg.answers
    return verified(body, service.issuer)


async def test_the_handler_grants_a_valid_token(service: CalloutService) -> None:
    outer = await answer(service, request_jwt(token="owner:alice"))
    assert outer is not None
    user = verified(outer["nats"]["jwt"], service.issuer)
    assert user["name"] == "alice"
    assert user["exp"] == int(NOW + 60)
    assert (service.stats.requests, service.stats.granted, service.stats.denied) == (1, 1, 0)


@pytest.mark.parametrize(("token", "reason"), [(None, "required"), ("forged", "bad signature")])
async def test_the_handler_denies(service: CalloutService, token: str | None, reason: str) -> None:
    outer = await answer(service, request_jwt(token=token))
    assert outer is not None
    assert reason in outer["nats"]["error"]
    assert "jwt" not in outer["nats"]
    assert (service.stats.granted, service.stats.denied) == (0, 1)


@pytest.mark.parametrize("data", MALFORMED.values(), ids=MALFORMED.keys())
async def test_the_handler_ignores_unreadable_requests(
    service: CalloutService, data: bytes
) -> None:
    assert await answer(service, data) is None  # the server times out: the client is refused
    assert (service.stats.malformed, service.stats.granted) == (1, 0)


async def test_the_handler_with_the_real_token_rules(tmp_path: Path) -> None:
    """With auth's application-token validator: an app token in, a device token out."""
    creds = ensure_credentials(tmp_path / "bus")
    issuer = TokenIssuer(ec.generate_private_key(ec.SECP256R1()), kid="k")
    now = time.time()
    svc = CalloutService(
        NatsEndpoint("nats://127.0.0.1:1", seed_file=creds.seed_file("callout")),
        creds.issuer_file,
        AppTokenValidator(issuer.public_keys),
        stream=STREAM,
        reserved=RESERVED,
        max_lifetime=300,
        clock=lambda: now,
    )
    app = await answer(svc, request_jwt(token=issuer.issue("carol", now=now, ttl=600)))
    assert app is not None
    user = verified(app["nats"]["jwt"], svc.issuer)
    assert user["exp"] == int(now + 300)
    assert "twinhub.ev.carol.>" in user["nats"]["sub"]["allow"]
    device = issuer.issue("carol", now=now, ttl=600, device_id="d1")
    refused = await answer(svc, request_jwt(token=device))
    assert refused is not None
    assert "jwt" not in refused["nats"]
    assert refused["nats"]["error"].startswith("token refused")

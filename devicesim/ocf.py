"""The device side of the OCF cloud protocol as pure values: request bodies and reply parsers.

Parsers take the decoded reply payload (see :mod:`proto.codecs`) and return frozen values or raise
:class:`~devicesim.errors.SimProtocolError` naming the missing or malformed field.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from devicesim.errors import SimProtocolError

ACCOUNT: Final = "/oic/sec/account"
SESSION: Final = "/oic/sec/session"
TOKEN_REFRESH: Final = "/oic/sec/tokenrefresh"
RD: Final = "/oic/rd"
RD_PUBLISH_QUERY: Final = "rt=oic.wk.rdpub"
RES: Final = "/oic/res"
DEVICE: Final = "/oic/d"
PLATFORM: Final = "/oic/p"
INTROSPECTION: Final = "/oc/wk/introspection"

IF_BASELINE: Final = "oic.if.baseline"
IF_LL: Final = "oic.if.ll"
IF_BATCH: Final = "oic.if.b"
IF_R: Final = "oic.if.r"
IF_RW: Final = "oic.if.rw"

BM_DISCOVERABLE: Final = 1
BM_OBSERVABLE: Final = 2

# OCF 1.0+ content-format-version options (critical, odd numbers) and the 2.0 value iotivity-lite
# puts on every request.
OPT_OCF_ACCEPT_CONTENT_FORMAT_VERSION: Final = 2049
OPT_OCF_CONTENT_FORMAT_VERSION: Final = 2053
OCF_VERSION_2_0: Final = 0x0800


def uri_path(path: str) -> tuple[str, ...]:
    """``/oic/sec/account`` → ``("oic", "sec", "account")``."""
    return tuple(p for p in path.split("/") if p)


@dataclass(frozen=True, slots=True)
class Registration:
    """What sign-up (and later token refresh) gave the device.

    ``expires_in`` is seconds from ``obtained_at`` (a monotonic reading); ``<= 0`` never expires.
    """

    uid: str
    access_token: str
    refresh_token: str
    expires_in: int
    redirect_uri: str
    obtained_at: float

    def refresh_at(self, fraction: float) -> float | None:
        """When to refresh, on the clock of ``obtained_at``; ``None``: the token never expires."""
        if self.expires_in <= 0:
            return None
        return self.obtained_at + self.expires_in * fraction

    def refreshed(self, tokens: Tokens, now: float) -> Registration:
        return Registration(
            uid=self.uid,
            access_token=tokens.access_token,
            refresh_token=tokens.refresh_token or self.refresh_token,
            expires_in=tokens.expires_in,
            redirect_uri=self.redirect_uri,
            obtained_at=now,
        )


@dataclass(frozen=True, slots=True)
class Tokens:
    access_token: str
    refresh_token: str
    expires_in: int


def _obj(operation: str, payload: Any) -> Mapping[str, Any]:
    if not isinstance(payload, Mapping):
        raise SimProtocolError(operation, f"reply must be a map, got {type(payload).__name__}")
    return payload


def _str(operation: str, o: Mapping[str, Any], key: str, *, required: bool = True) -> str:
    v = o.get(key)
    if v is None:
        if required:
            raise SimProtocolError(operation, f"reply lacks {key!r}")
        return ""
    if not isinstance(v, str):
        raise SimProtocolError(operation, f"reply field {key!r} must be a string")
    if required and not v:
        raise SimProtocolError(operation, f"reply field {key!r} is empty")
    return v


def _int(operation: str, o: Mapping[str, Any], key: str) -> int:
    v = o.get(key)
    if not isinstance(v, int) or isinstance(v, bool):
        raise SimProtocolError(operation, f"reply field {key!r} must be an integer")
    return v


def sign_up_body(device_id: str, token: str, auth_provider: str) -> dict[str, Any]:
    return {"di": device_id, "accesstoken": token, "authprovider": auth_provider}


def parse_sign_up(payload: Any, now: float) -> Registration:
    o = _obj("sign-up", payload)
    return Registration(
        uid=_str("sign-up", o, "uid"),
        access_token=_str("sign-up", o, "accesstoken"),
        refresh_token=_str("sign-up", o, "refreshtoken", required=False),
        expires_in=_int("sign-up", o, "expiresin"),
        redirect_uri=_str("sign-up", o, "redirecturi", required=False),
        obtained_at=now,
    )


def session_body(device_id: str, uid: str, access_token: str, *, login: bool) -> dict[str, Any]:
    return {"di": device_id, "uid": uid, "accesstoken": access_token, "login": login}


def parse_sign_in(payload: Any) -> int:
    """The session's ``expiresin`` (seconds; ``<= 0`` never)."""
    return _int("sign-in", _obj("sign-in", payload), "expiresin")


def refresh_body(device_id: str, uid: str, refresh_token: str) -> dict[str, Any]:
    return {"di": device_id, "uid": uid, "refreshtoken": refresh_token}


def parse_refresh(payload: Any) -> Tokens:
    o = _obj("token refresh", payload)
    return Tokens(
        access_token=_str("token refresh", o, "accesstoken"),
        refresh_token=_str("token refresh", o, "refreshtoken", required=False),
        expires_in=_int("token refresh", o, "expiresin"),
    )


def publish_body(
    device_id: str, links: Sequence[Mapping[str, Any]], ttl: int = 0
) -> dict[str, Any]:
    return {"di": device_id, "links": [dict(link) for link in links], "ttl": ttl}


def parse_publish(payload: Any) -> list[Mapping[str, Any]]:
    """The links the gateway echoed (``{"di", "links", "ttl"}`` or a bare list); may be empty."""
    if payload is None:
        return []
    links = payload.get("links") if isinstance(payload, Mapping) else payload
    if not isinstance(links, list) or not all(isinstance(x, Mapping) for x in links):
        raise SimProtocolError("publish", "reply links must be a list of maps")
    return list(links)


def query_params(query: Sequence[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for q in query:
        k, _, v = q.partition("=")
        out.setdefault(k, []).append(v)
    return out

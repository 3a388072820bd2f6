"""OCF cloud payloads: parsing device requests into typed values, building replies.

Every parser takes the decoded payload (a Python value from
:mod:`proto.codecs`) and returns a frozen value or raises :class:`BadRequest`
with a diagnostic naming the offending field.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import unquote

from gateway.errors import BadRequest
from proto.events import ResourceLink

ACCOUNT: Final = "/oic/sec/account"
SESSION: Final = "/oic/sec/session"
TOKEN_REFRESH: Final = "/oic/sec/tokenrefresh"
RD: Final = "/oic/rd"
RES: Final = "/oic/res"
SECURITY_PATHS: Final = frozenset({ACCOUNT, SESSION, TOKEN_REFRESH})
# Resources the gateway never observes: the device's security and cloud-config machinery.
EXCLUDED_PREFIXES: Final = ("/oic/sec/", "/oic/rd", "/oic/res", "/CoapCloudConfResURI")
DEVICE: Final = "/oic/d"
PLATFORM: Final = "/oic/p"
DEVICE_INFO: Final = frozenset({DEVICE, PLATFORM})
"""Synchronised when discovered, published or not: every OCF device serves them, and they say
what the device is (its name, model, platform)."""
BATCH_INTERFACE: Final = "oic.if.b"
OBSERVABLE_BIT: Final = 2


def _obj(payload: Any) -> Mapping[str, Any]:
    if not isinstance(payload, Mapping):
        raise BadRequest("payload must be a map")
    return payload


def _str(obj: Mapping[str, Any], key: str, *, required: bool = True) -> str:
    v = obj.get(key)
    if v is None or v == "":
        if required:
            raise BadRequest(f"missing field {key!r}")
        return ""
    if not isinstance(v, str):
        raise BadRequest(f"field {key!r} must be a string")
    if len(v) > 8192:
        raise BadRequest(f"field {key!r} too long")
    return v


def query_params(query: Sequence[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for q in query:
        k, _, v = q.partition("=")
        out.setdefault(unquote(k), []).append(unquote(v))
    return out


@dataclass(frozen=True, slots=True)
class SignUp:
    device_id: str
    access_token: str
    auth_provider: str


@dataclass(frozen=True, slots=True)
class SignIn:
    device_id: str
    user_id: str
    access_token: str
    login: bool


@dataclass(frozen=True, slots=True)
class SignOff:
    device_id: str
    access_token: str
    user_id: str


@dataclass(frozen=True, slots=True)
class Refresh:
    device_id: str
    user_id: str
    refresh_token: str


@dataclass(frozen=True, slots=True)
class Publish:
    device_id: str
    links: tuple[ResourceLink, ...]
    ttl: int


@dataclass(frozen=True, slots=True)
class Unpublish:
    device_id: str
    instance_ids: tuple[int, ...]


def parse_sign_up(payload: Any) -> SignUp:
    o = _obj(payload)
    return SignUp(
        device_id=_str(o, "di"),
        access_token=_str(o, "accesstoken"),
        auth_provider=_str(o, "authprovider", required=False),
    )


def parse_session(payload: Any) -> SignIn:
    o = _obj(payload)
    login = o.get("login")
    if not isinstance(login, bool):
        raise BadRequest("field 'login' must be a boolean")
    return SignIn(
        device_id=_str(o, "di"),
        user_id=_str(o, "uid", required=login),
        access_token=_str(o, "accesstoken", required=login),
        login=login,
    )


def parse_refresh(payload: Any) -> Refresh:
    o = _obj(payload)
    return Refresh(
        device_id=_str(o, "di"),
        user_id=_str(o, "uid", required=False),
        refresh_token=_str(o, "refreshtoken"),
    )


def parse_sign_off(query: Sequence[str], payload: Any) -> SignOff:
    params = query_params(query)
    o: Mapping[str, Any] = payload if isinstance(payload, Mapping) else {}

    def pick(key: str) -> str:
        if key in params and params[key][0]:
            return params[key][0]
        v = o.get(key)
        return v if isinstance(v, str) else ""

    di = pick("di")
    if not di:
        raise BadRequest("missing query parameter 'di'")
    return SignOff(device_id=di, access_token=pick("accesstoken"), user_id=pick("uid"))


def _str_list(v: Any, what: str) -> tuple[str, ...]:
    if v is None:
        return ()
    if isinstance(v, str):
        return (v,)
    if isinstance(v, list | tuple) and all(isinstance(x, str) for x in v):
        return tuple(v)
    raise BadRequest(f"{what} must be a string or a list of strings")


def normalise_href(href: str, device_id: str | None = None) -> str:
    """``ocf://<di>/path`` (batch responses, published links) → ``/path``."""
    if href.startswith("ocf://"):
        rest = href[len("ocf://") :]
        _, slash, path = rest.partition("/")
        return "/" + path if slash else "/"
    return href


def parse_link(v: Any, device_id: str | None = None) -> ResourceLink:
    o = _obj(v)
    href = _str(o, "href")
    href = normalise_href(href, device_id)
    if not href.startswith("/"):
        raise BadRequest(f"link href must be a path: {href!r}")
    p = o.get("p")
    bm = p.get("bm", 0) if isinstance(p, Mapping) else 0
    if not isinstance(bm, int):
        raise BadRequest("link p.bm must be an integer")
    ins = o.get("ins")
    if ins is not None and (not isinstance(ins, int) or isinstance(ins, bool)):
        raise BadRequest("link ins must be an integer")
    title = o.get("title")
    anchor = o.get("anchor")
    return ResourceLink(
        href=href,
        rt=_str_list(o.get("rt"), "link rt"),
        interfaces=_str_list(o.get("if"), "link if"),
        ins=ins,
        observable=bool(bm & OBSERVABLE_BIT),
        discoverable=bool(bm & 1) or not bm,
        anchor=anchor if isinstance(anchor, str) else None,
        title=title if isinstance(title, str) else None,
        type=_str_list(o.get("type"), "link type"),
    )


def parse_publish(payload: Any) -> Publish:
    o = _obj(payload)
    di = _str(o, "di")
    raw_links = o.get("links")
    if not isinstance(raw_links, list):
        raise BadRequest("field 'links' must be a list")
    if len(raw_links) > 1000:
        raise BadRequest("too many links")
    ttl = o.get("ttl", 0)
    if not isinstance(ttl, int) or isinstance(ttl, bool):
        raise BadRequest("field 'ttl' must be an integer")
    return Publish(device_id=di, links=tuple(parse_link(x, di) for x in raw_links), ttl=ttl)


def parse_unpublish(query: Sequence[str]) -> Unpublish:
    params = query_params(query)
    di = (params.get("di") or [""])[0]
    if not di:
        raise BadRequest("missing query parameter 'di'")
    ins: list[int] = []
    for v in params.get("ins", []):
        try:
            ins.append(int(v))
        except ValueError:
            raise BadRequest(f"query parameter 'ins' must be an integer: {v!r}") from None
    return Unpublish(device_id=di, instance_ids=tuple(ins))


def link_reply(link: ResourceLink, device_id: str) -> dict[str, Any]:
    out: dict[str, Any] = {
        "di": device_id,
        "href": link.href,
        "rt": list(link.rt),
        "if": list(link.interfaces),
        "p": {"bm": (OBSERVABLE_BIT if link.observable else 0) | (1 if link.discoverable else 0)},
    }
    if link.ins is not None:
        out["ins"] = link.ins
    return out


def parse_discovery(payload: Any, device_id: str) -> tuple[ResourceLink, ...]:
    """A device's ``/oic/res`` reply: a list of links, or ``[{"di", "links": [...]}]`` (OCF 1.0)."""
    if payload is None:
        return ()
    if not isinstance(payload, list):
        raise BadRequest("/oic/res reply must be a list")
    out: list[ResourceLink] = []
    for item in payload:
        if isinstance(item, Mapping) and isinstance(item.get("links"), list):
            out.extend(parse_link(x, device_id) for x in item["links"])
        else:
            out.append(parse_link(item, device_id))
    return tuple(out)


def parse_batch(payload: Any, device_id: str) -> list[tuple[str, Any]]:
    """A batch (``oic.if.b``) representation: ``[{"href": ..., "rep": {...}}]`` → (href, rep)."""
    if payload is None:
        return []
    if not isinstance(payload, list):
        raise BadRequest("batch representation must be a list")
    out: list[tuple[str, Any]] = []
    for item in payload:
        o = _obj(item)
        out.append((normalise_href(_str(o, "href"), device_id), o.get("rep")))
    return out


def is_syncable(href: str) -> bool:
    return not any(href == p.rstrip("/") or href.startswith(p) for p in EXCLUDED_PREFIXES)


def is_synced(href: str, *, published: bool) -> bool:
    """Whether the twin synchronisation reads (and observes) ``href``: what the device published
    (in this connection or before, per the log), plus the device and platform information
    (:data:`DEVICE_INFO`) when discovered, never the security and cloud machinery. A resource
    that is only discovered (``/oc/wk/introspection``, ``/oic/con``…) is left alone: the twin holds
    what the device chose to publish."""
    return is_syncable(href) and (published or href in DEVICE_INFO)


BASELINE_ONLY: Final = ("rt", "if")


def strip_baseline(rep: Any) -> Any:
    """A batch (``oic.if.b``) item carries the baseline representation; the twin keeps the
    resource's state, so the link metadata ``rt`` and ``if`` (kept in the links) is dropped."""
    if isinstance(rep, Mapping) and any(k in rep for k in BASELINE_ONLY):
        return {k: v for k, v in rep.items() if k not in BASELINE_ONLY}
    return rep

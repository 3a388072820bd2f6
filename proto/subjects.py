"""The NATS subject grammar of twinhub's event log.

Every event is published on::

    twinhub.ev.<owner>.<device>.<kind>.<resource>

* ``owner`` — the tenant (the JWT owner claim). It comes second so that NATS
  permissions can isolate tenants with ``twinhub.ev.<owner>.>`` and a per-owner
  subscription is a server-side filter, never a scan of other owners' events.
* ``device`` — the device ID.
* ``kind`` — the event kind, e.g. ``resource-changed`` (see :mod:`proto.events`).
* ``resource`` — the escaped href for resource events, ``_`` for device-level
  events (an href that is literally ``_`` is written ``~5F``).

All six positions are always present, so wildcards compose: ``*`` matches one
token, ``>`` the rest. Examples::

    twinhub.ev.alice.>                              all of alice's events
    twinhub.ev.*.d1.>                               everything of device d1
    twinhub.ev.alice.*.resource-changed.>           alice's resource changes
    twinhub.ev.alice.d1.resource-changed./oic/d     one resource

Escaping. NATS forbids ``.``, ``*``, ``>`` and white space in tokens (and an empty
token). Device IDs are usually UUIDs, but hrefs contain dots and query strings,
and owners are whatever the identity provider says. A token is escaped
byte-wise: bytes outside ``[A-Za-z0-9-_/:=@+,]`` (the *safe set*) become ``~XX``
(upper-case hex of the UTF-8 byte), ``~`` included. Escaping is injective and
:func:`unescape_token` inverts it; the empty string escapes to ``~``.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Final

from proto.errors import SubjectError

PREFIX: Final = "twinhub.ev"
ALL_EVENTS: Final = PREFIX + ".>"
NO_RESOURCE: Final = "_"
WILDCARD: Final = "*"

_SAFE: Final = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_/:=@+,")
_SAFE_TEXT: Final = re.compile(r"[A-Za-z0-9\-_/:=@+,]+")  # _SAFE as a str pattern (ASCII only)
_ESCAPED_TOKEN: Final = re.compile(r"(?:[A-Za-z0-9\-_/:=@+,]|~[0-9A-F]{2})+|~")
_KIND: Final = re.compile(r"[a-z][a-z0-9-]*")
MAX_TOKEN_LEN: Final = 1024


def escape_token(value: str) -> str:
    """Escape any string into one valid NATS subject token (see module doc)."""
    if _SAFE_TEXT.fullmatch(value):  # the common case, once per event: no bytes, no loop
        return value
    if value == "":
        return "~"
    raw = value.encode("utf-8")
    return "".join(chr(b) if b in _SAFE else f"~{b:02X}" for b in raw)


def unescape_token(token: str) -> str:
    """Invert :func:`escape_token`; raises :class:`SubjectError` for a malformed token."""
    if token == "~":
        return ""
    if not _ESCAPED_TOKEN.fullmatch(token):
        raise SubjectError(f"not an escaped subject token: {token!r}")
    if "~" not in token:
        return token
    out = bytearray()
    i = 0
    while i < len(token):
        ch = token[i]
        if ch == "~":
            out.append(int(token[i + 1 : i + 3], 16))
            i += 3
        else:
            out.append(ord(ch))
            i += 1
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SubjectError(f"escaped token is not UTF-8: {token!r}") from exc


def _checked(value: str, what: str) -> str:
    if not value:
        raise SubjectError(f"{what} must not be empty")
    token = escape_token(value)
    if len(token) > MAX_TOKEN_LEN:
        raise SubjectError(f"{what} too long ({len(token)} > {MAX_TOKEN_LEN} after escaping)")
    return token


def _resource_token(href: str) -> str:
    token = _checked(href, "resource href")
    return "~5F" if token == NO_RESOURCE else token  # never the "no resource" marker


def _kind_token(kind: str) -> str:
    if not _KIND.fullmatch(kind):
        raise SubjectError(f"invalid event kind: {kind!r}")
    return kind


@dataclass(frozen=True, slots=True)
class EventSubject:
    """The parsed form of an event subject. ``resource`` is ``None`` for device-level events."""

    owner: str
    device: str
    kind: str
    resource: str | None = None

    def __str__(self) -> str:
        return event_subject(self.owner, self.device, self.kind, self.resource)


@functools.lru_cache(maxsize=16384)
def event_subject(owner: str, device: str, kind: str, resource: str | None = None) -> str:
    """Build the subject of one event (cached: a device's events go to the same few subjects,
    and checking and escaping the tokens is most of the cost of an event's encoding)."""
    res = NO_RESOURCE if resource is None else _resource_token(resource)
    return ".".join(
        (PREFIX, _checked(owner, "owner"), _checked(device, "device ID"), _kind_token(kind), res)
    )


def parse_event_subject(subject: str) -> EventSubject:
    """Parse an event subject built by :func:`event_subject`."""
    parts = subject.split(".")
    if len(parts) != 6 or ".".join(parts[:2]) != PREFIX:
        raise SubjectError(f"not a twinhub event subject: {subject!r}")
    _, _, owner, device, kind, res = parts
    _kind_token(kind)
    return EventSubject(
        owner=unescape_token(owner),
        device=unescape_token(device),
        kind=kind,
        resource=None if res == NO_RESOURCE else unescape_token(res),
    )


def event_filter(
    owner: str | None = None,
    device: str | None = None,
    kind: str | None = None,
    resource: str | None = None,
) -> str:
    """A subject filter; ``None`` means "any" for that position.

    ``event_filter(owner="alice")`` is ``twinhub.ev.alice.>``, the tenant's scope.
    """
    tokens = [
        WILDCARD if owner is None else _checked(owner, "owner"),
        WILDCARD if device is None else _checked(device, "device ID"),
        WILDCARD if kind is None else _kind_token(kind),
        WILDCARD if resource is None else _resource_token(resource),
    ]
    while tokens and tokens[-1] == WILDCARD:
        tokens.pop()
    if len(tokens) < 4:
        return ".".join((PREFIX, *tokens, ">"))
    return ".".join((PREFIX, *tokens))


def owner_inbox_prefix(owner: str) -> str:
    """The reply-subject prefix of an application of ``owner`` (its NATS ``inbox_prefix``):
    the only replies the bus delivers to it come there."""
    return f"_INBOX.{_checked(owner, 'owner')}"


def device_scope(device: str) -> str:
    """All events of one device, whoever owns it: the optimistic-concurrency scope."""
    return event_filter(device=device)


def is_valid_subject(subject: str, *, wildcards: bool = False) -> bool:
    """Whether ``subject`` is a syntactically valid NATS subject (or filter)."""
    if not subject or len(subject) > 4096:
        return False
    tokens = subject.split(".")
    for i, tok in enumerate(tokens):
        if not tok or any(c.isspace() for c in tok):
            return False
        if tok in ("*", ">"):
            if not wildcards or (tok == ">" and i != len(tokens) - 1):
                return False
        elif "*" in tok or ">" in tok:
            return False
    return True

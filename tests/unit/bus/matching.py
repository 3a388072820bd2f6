"""NATS permission semantics for the bus tests, written independently of the product code.

A pattern's ``*`` matches exactly one token, a final ``>`` one or more tokens; everything
else matches the identical token. A subject asked about may itself hold wildcards (a
subscription): it is covered by a pattern only when every subject it can match is matched by
the pattern (its ``*`` only under a ``*`` or ``>``, its ``>`` only under a ``>``). Permission
lists work as nats-server's: no allow list means "everything", a deny wins over an allow.
"""

from __future__ import annotations

from collections.abc import Sequence

from bus.permissions import Permissions


def covers(pattern: str, subject: str) -> bool:
    """Whether every subject matched by ``subject`` is matched by ``pattern``."""
    p = pattern.split(".")
    s = subject.split(".")
    for i, tok in enumerate(p):
        if tok == ">":
            return len(s) > i  # one token at least
        if i >= len(s):
            return False
        if s[i] == ">":
            return False  # the subject reaches further than this pattern can
        if tok == "*":
            continue
        if s[i] != tok:
            return False  # including a subject "*" under a literal pattern token
    return len(s) == len(p)


def permitted(allow: Sequence[str], deny: Sequence[str], subject: str) -> bool:
    if allow and not any(covers(a, subject) for a in allow):
        return False
    return not any(covers(d, subject) for d in deny)


def may_publish(p: Permissions, subject: str) -> bool:
    if p.unrestricted:
        return True
    if not p.pub_allow and not p.pub_deny:
        return False  # rendered as publish deny ">" (responders answer via allow_responses)
    return permitted(p.pub_allow, p.pub_deny, subject)


def may_subscribe(p: Permissions, subject: str) -> bool:
    if p.unrestricted:
        return True
    if not p.sub_allow and not p.sub_deny:
        return False  # rendered as subscribe deny ">"
    return permitted(p.sub_allow, p.sub_deny, subject)

"""Whether a reported content is newer than the one a twin holds (pure; used by the fold).

A device numbers the notifications of an observation (RFC 7641 Observe, 24 bits, wrapping); the
gateway records the number as ``ResourceChanged.observe_seq`` and the connection it came on as
``connection_id``. The log should already hold a resource's reports in the order the device
made them (the gateway's session sees to it); this is the defence in depth that keeps a twin
from ever going back to older content if it does not:

* no content yet, or no connection to judge by (``connection_id`` empty in the report, or no
  connection known to the twin): the report is taken, in log order;
* a report of another connection than the twin's current one (the connection of the last
  ``device-online`` folded): a late report of a connection the device already replaced. It is
  ignored -- the newer connection reports the device's state, or found it unchanged -- unless
  the twin holds nothing of the resource;
* the first report of the current connection replaces whatever an older connection reported;
* within one connection, two observed reports are ordered by RFC 7641 section 3.4
  (:func:`observe_fresh`, with the events' times as the arrival times);
* a report without an observe number (a one-shot read, an error status, an answer that did
  not start an observation) carries no order of its own: it is taken in log order, and the
  observed report after it is taken too.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Final

from proto.events import ResourceChanged
from twin.model import ResourceState

__all__ = ["FRESHNESS_WINDOW", "OBSERVE_MODULUS", "content_replaces", "observe_fresh"]

OBSERVE_MODULUS: Final = 1 << 24
"""Observe values are 24-bit unsigned integers (RFC 7641 section 3.4)."""
_HALF: Final = 1 << 23
FRESHNESS_WINDOW: Final = timedelta(seconds=128)
"""After this long, any notification is newer than the previous one, whatever its number."""


def observe_fresh(v1: int, t1: datetime, v2: int, t2: datetime) -> bool:
    """RFC 7641 section 3.4: is the notification numbered ``v2`` that arrived at ``t2`` newer
    than the one numbered ``v1`` that arrived at ``t1``? Numbers are taken modulo 2**24."""
    v1 %= OBSERVE_MODULUS
    v2 %= OBSERVE_MODULUS
    return (
        (v1 < v2 and v2 - v1 < _HALF) or (v1 > v2 and v1 - v2 > _HALF) or t2 > t1 + FRESHNESS_WINDOW
    )


def content_replaces(
    stored: ResourceState | None, report: ResourceChanged, at: datetime, current_connection: str
) -> bool:
    """Whether ``report`` (an event of time ``at``) replaces ``stored`` in a twin whose current
    connection is ``current_connection`` (see the module docstring)."""
    connection = report.connection_id
    if stored is None or not connection or not current_connection:
        return True
    if connection != current_connection:
        return False
    if stored.connection_id != connection:
        return True
    if report.observe_seq is None or stored.observe_seq is None:
        return True
    return observe_fresh(stored.observe_seq, stored.updated_at, report.observe_seq, at)

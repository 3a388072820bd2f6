"""Server-side RPC to a simple device (ThingsBoard's device API), sans-IO; time is an input.

The device observes ``GET /api/v1/{token}/rpc``; each RPC comes as a notification
``{"id": N, "method": ..., "params": ...}`` and the device answers with
``POST /api/v1/{token}/rpc/{N}`` (its body: the result, JSON or CBOR). An RPC is a command of
op ``rpc`` (:data:`proto.events.RPC_HREF`, ``content`` ``{"method", "params"}``) issued through
the command API; the adapter (:mod:`gateway.adapters.coap_udp`) reads the device's commands
from the log (:class:`gateway.devicestate.CommandLog`) and drives one :class:`RpcChannel` per
device:

* :meth:`RpcChannel.opened` / :meth:`RpcChannel.closed`: what the log says is open or ended;
* :meth:`RpcChannel.observe`: an observation began: every open RPC is due to it, in issue
  order (the pending ones replayed when the device observes again, a sent but unanswered one
  again, while attempts remain);
* :meth:`RpcChannel.next_delivery`: the next RPC to notify with the ``command-sent`` to
  append first (the notification goes out only once the log acknowledged it);
  :meth:`RpcChannel.delivery_failed` puts it back when the append failed;
  :meth:`RpcChannel.exhausted`: ``command-failed`` for the ones notified ``max_attempts``
  times (one per observation) and never answered;
* :meth:`RpcChannel.answer`: the device's answer as ``command-succeeded`` (``content``: the
  result), or None for an id this gateway never gave (4.04).

Ids are per device, counted from 1 in this gateway's memory; an RPC keeps its id when it is
delivered again. Event ids are derived from (device, correlation id, issue position, step),
so a retried append, or a retransmitted answer, is recorded once.
"""

from __future__ import annotations

import itertools
import json
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from gateway.commands import Command
from proto.events import (
    RPC_HREF,
    AnyEvent,
    CommandFailed,
    CommandSent,
    CommandSucceeded,
    Event,
    EventData,
)

__all__ = ["ANSWERED_STATUS", "RpcChannel", "RpcDelivery", "notification", "parse_rpc_id"]

_NS: Final = uuid.UUID("2d0f7a52-6c1e-4a8e-9b47-5f3c8e1d2a60")
ANSWERED_STATUS: Final = "2.01"
"""The ``status`` of an RPC's ``command-succeeded``: the code the device's answer gets."""
MAX_RPC_ID: Final = 2**31 - 1  # ThingsBoard's ids are Java ints


def parse_rpc_id(text: str) -> int | None:
    """The id in ``/rpc/{id}`` (a positive decimal integer), or None."""
    if not text.isascii() or not text.isdigit() or len(text) > 10:
        return None
    value = int(text)
    return value if 0 < value <= MAX_RPC_ID else None


def notification(rpc_id: int, command: Command) -> bytes:
    """The JSON body of the notification that carries ``command`` to the device."""
    content = command.content if isinstance(command.content, dict) else {}
    body = {"id": rpc_id, "method": content.get("method"), "params": content.get("params")}
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


@dataclass(frozen=True, slots=True)
class RpcDelivery:
    """Append ``sent``; once the log acknowledged it, notify ``payload`` (JSON)."""

    rpc_id: int
    correlation_id: str
    attempt: int
    sent: AnyEvent
    payload: bytes


@dataclass
class RpcChannel:
    """One simple device's server-side RPCs as this gateway knows them."""

    owner: str
    device_id: str
    gateway_id: str
    open: dict[str, Command] = field(default_factory=dict)  # correlation id -> command
    due: list[str] = field(default_factory=list)  # to notify to the current observation
    _ids: dict[str, int] = field(default_factory=dict)
    _by_id: dict[int, str] = field(default_factory=dict)
    _next_id: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    observing: int = 0

    # -- what the log says ------------------------------------------------------------------

    def opened(self, commands: list[Command]) -> None:
        """Commands that became open (issue order); other ops than ``rpc`` are ignored."""
        for c in commands:
            if c.op != "rpc" or c.correlation_id in self.open:
                continue
            self.open[c.correlation_id] = c
            if self.observing:
                self.due.append(c.correlation_id)
        self._order()

    def closed(self, correlation_ids: list[str]) -> None:
        """Commands that ended (answered, failed, expired, canceled): never notified again,
        and an answer to their id is a 4.04."""
        for cid in correlation_ids:
            self.open.pop(cid, None)
            rpc_id = self._ids.pop(cid, None)
            if rpc_id is not None:
                self._by_id.pop(rpc_id, None)
        self.due = [cid for cid in self.due if cid in self.open]

    # -- observations -----------------------------------------------------------------------

    def observe(self) -> None:
        """An observation began: every open RPC is due, in issue order."""
        self.observing += 1
        self.due = list(self.open)
        self._order()

    def unobserve(self) -> None:
        self.observing = max(0, self.observing - 1)
        if not self.observing:
            self.due = []

    def _order(self) -> None:
        self.due.sort(key=lambda cid: self.open[cid].position)

    @property
    def awaiting_answer(self) -> bool:
        """Whether an RPC this gateway notified is open (its id must be kept for the answer)."""
        return bool(self._ids)

    def exhausted(self, now: float) -> list[AnyEvent]:
        """``command-failed`` for the due RPCs that were notified ``max_attempts`` times and
        never answered (the device observed again instead): append them, then
        :meth:`closed`. They are not due any more."""
        out: list[AnyEvent] = []
        for cid in list(self.due):
            c = self.open[cid]
            if c.attempts >= c.max_attempts:
                self.due.remove(cid)
                data = CommandFailed(
                    href=RPC_HREF,
                    reason=f"no answer after {c.attempts} attempt(s)",
                    attempts=c.attempts,
                )
                out.append(self._event(c, data, "failed", now))
        return out

    def next_delivery(self, now: float, connection_id: str) -> RpcDelivery | None:
        """The next RPC to notify (the oldest due one that is live and has attempts left), or
        None. Expired ones are skipped (the twin's sweeper ends them), as are ones that used
        their attempts (:meth:`exhausted` ends them)."""
        while self.due:
            cid = self.due.pop(0)
            c = self.open.get(cid)
            if c is None:
                continue
            if c.expires_at is not None and c.expires_at <= now:
                continue
            if c.attempts >= c.max_attempts:
                continue
            c.attempts += 1
            rpc_id = self._ids.get(cid)
            if rpc_id is None:
                rpc_id = next(self._next_id)
                self._ids[cid] = rpc_id
                self._by_id[rpc_id] = cid
            sent = CommandSent(
                href=RPC_HREF,
                gateway=self.gateway_id,
                connection_id=connection_id,
                attempt=c.attempts,
            )
            return RpcDelivery(
                rpc_id=rpc_id,
                correlation_id=cid,
                attempt=c.attempts,
                sent=self._event(c, sent, f"sent/{c.attempts}", now),
                payload=notification(rpc_id, c),
            )
        return None

    def delivery_failed(self, delivery: RpcDelivery) -> None:
        """The ``command-sent`` of ``delivery`` was not written: it is due again (first)."""
        c = self.open.get(delivery.correlation_id)
        if c is None:
            return
        c.attempts = min(c.attempts, delivery.attempt - 1)
        if self.observing and delivery.correlation_id not in self.due:
            self.due.insert(0, delivery.correlation_id)

    # -- answers ----------------------------------------------------------------------------

    def answer(self, rpc_id: int, result: Any, now: float) -> AnyEvent | None:
        """The ``command-succeeded`` that records the device's answer to ``rpc_id``, or None
        when no open RPC of the device has that id here."""
        cid = self._by_id.get(rpc_id)
        c = None if cid is None else self.open.get(cid)
        if c is None:
            return None
        data = CommandSucceeded(href=RPC_HREF, status=ANSWERED_STATUS, content=result)
        return self._event(c, data, "answered", now)

    def _event(self, c: Command, data: EventData, step: str, now: float) -> AnyEvent:
        key = f"{self.device_id}/{c.correlation_id}/{c.position}/rpc/{step}"
        return Event(
            owner=c.owner or self.owner,
            device_id=self.device_id,
            data=data,
            source=f"/gateway/{self.gateway_id}",
            id=str(uuid.uuid5(_NS, key)),
            time=datetime.fromtimestamp(now, UTC),
            correlation_id=c.correlation_id,
        )

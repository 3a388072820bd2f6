"""The fault suite's checks as pure functions: what the devices sent, what the log holds, what
the twins show, in; violations out. No I/O, no clock (times come in as epoch nanoseconds), so
each check can be fed a made-up history and shown to catch what it claims to catch
(``tests/test_faults.py``). :mod:`faults` gathers the inputs from real processes.

Definitions (the JSON of a run repeats them):

* A device **sent** a value ``(device, href, seq)`` when it rendered it into a response or an
  Observe notification on one of its connections (``seq`` counts the resource's changes on the
  device, so it is also the order in which the device produced its values).
* CoAP over TCP has no acknowledgement of a notification, so a sent value is **acknowledged**
  when the gateway demonstrably had it and a working log long enough to append it: the
  connection it went out on stayed up at least ``ack_window`` after the write and the event
  log was not down (nor recovering, ``ack_window`` more) in that interval; or the connection
  is still up at the check, which runs once the log has been quiet for ``ack_window`` (the
  gateway buffers across a log outage and must append what it buffered). A value written
  shortly before its connection died (a gateway ``kill -9``, a buffer overflow closing the
  connection during an outage) is *in flight*: not acknowledged; the re-sync after the
  reconnect makes up for it through the device's **final value**, which must be in the log
  (and in the twin) for every resource of every device online at the check.
* **Lost**: an acknowledged value (or a final value) whose ``seq`` no event of that resource
  in the log carries.
* **Duplicate applied**: an event whose CloudEvent id an earlier event of the log has, or that
  repeats an earlier event's notification (same device, connection, resource, Observe
  sequence number and device ``seq``); a twin whose ``version`` (events applied) differs from
  the fold of its log. A value appended again by a later re-sync (same ``seq``, new event) is
  reported as ``same_value_appended_again``, not as a violation.
* **Order violation**: an event of a resource whose ``seq`` is lower than one an earlier event
  of the same resource carried (per-resource log order against the device's own order).
* **Converged**: the stored twin equals the fold (``twin.fold``) of the device's events in the
  log, and shows the device's final value of every resource.
* **Offline marking**: for every connection a killed gateway held, within ``bound`` of the
  kill the log no longer shows the device online on it: a ``device-offline`` of that
  connection, or the device back on a newer one (then nothing claims the dead connection; the
  restarted gateway need not, and does not, close it too). While the gateway stays down (no
  device can come back) the twin must also stop showing the device online in time.
* **Live subscription**: a subscription to the owner's events read the way ``twinhub
  watch`` reads it (``next(timeout)`` in a loop, from before the first experiment), reopened
  after its last position if it ever raises, hands out every event of the log once, in order.
* **Commands**: every correlation id the log holds (or that was accepted) ends with exactly
  one terminal event (succeeded, failed, expired, canceled); a succeeded update was applied by
  the device; an accepted command is in the log.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from proto.events import (
    AnyEvent,
    CommandCanceled,
    CommandExpired,
    CommandFailed,
    CommandPending,
    CommandSucceeded,
    DeviceOffline,
    DeviceOnline,
    ResourceChanged,
)
from twin.fold import fold
from twin.model import Twin

EXAMPLES = 5  # violations listed per check (the count is always complete)

TERMINAL: dict[type[Any], str] = {
    CommandSucceeded: "succeeded",
    CommandFailed: "failed",
    CommandExpired: "expired",
    CommandCanceled: "canceled",
}

# -- what the devices recorded ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Conn:
    """One connection of a device: its number (1, 2, ... per device), when it went up and
    when it ended (``None``: still up when the record was taken)."""

    number: int
    start_ns: int
    end_ns: int | None


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    """A device's own record: per resource, per ``seq``, the (connection, time) of every write
    of that value (first write per connection); its connections; the connection it was online
    on when the record was taken; its final value of each resource."""

    device: str
    sent: Mapping[str, Mapping[int, Sequence[tuple[int, int]]]]
    conns: Mapping[int, Conn]
    online_conn: int | None
    final: Mapping[str, int]  # href -> seq

    @classmethod
    def from_json(cls, device: str, doc: Mapping[str, Any]) -> DeviceRecord:
        return cls(
            device=device,
            sent={
                href: {int(seq): [(int(c), int(t)) for c, t in writes] for seq, writes in v.items()}
                for href, v in doc["sent"].items()
            },
            conns={
                int(n): Conn(int(n), int(s), None if e is None else int(e))
                for n, s, e in doc["conns"]
            },
            online_conn=doc["online"],
            final={href: int(seq) for href, seq in doc["final"].items()},
        )


@dataclass(frozen=True, slots=True)
class Outage:
    """The event log was unavailable (nats-server down) from ``start_ns`` to ``end_ns``."""

    start_ns: int
    end_ns: int


def acknowledged_at(
    rec: DeviceRecord,
    writes: Sequence[tuple[int, int]],
    *,
    ack_window_ns: int,
    outages: Sequence[Outage],
    recorded_ns: int,
) -> int | None:
    """When the earliest write of a value that counts as acknowledged (see the module
    docstring) was made; ``None`` when none does (in flight)."""
    best: int | None = None
    for conn_no, t in writes:
        conn = rec.conns.get(conn_no)
        if conn is None:
            continue
        if conn.end_ns is None:
            ok = rec.online_conn == conn_no and recorded_ns - t >= ack_window_ns
        else:
            end = conn.end_ns
            ok = end - t >= ack_window_ns and not any(
                o.start_ns <= end and t <= o.end_ns + ack_window_ns for o in outages
            )
        if ok and (best is None or t < best):
            best = t
    return best


# -- what the log holds ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LoggedValue:
    position: int
    seq: int | None
    connection_id: str
    observe_seq: int | None


@dataclass
class CommandLog:
    device: str
    pending: list[int] = field(default_factory=list)  # positions
    terminal: list[tuple[int, str]] = field(default_factory=list)  # (position, state)

    @property
    def open(self) -> bool:
        """A pending event after the last terminal one: the command (or a second one with the
        same id) has not ended yet."""
        last_end = max((p for p, _ in self.terminal), default=0)
        return any(p > last_end for p in self.pending)


def _content_seq(content: Any) -> int | None:
    seq = content.get("seq") if isinstance(content, dict) else None
    return seq if isinstance(seq, int) and not isinstance(seq, bool) else None


class LogView:
    """What the checks need of the log, built event by event in log order (:meth:`add`):
    per-resource values, duplicates, connections, commands, and the fold of every device."""

    def __init__(self, hrefs: Iterable[str]) -> None:
        self.hrefs = frozenset(hrefs)  # the resources whose values are checked
        self.position = 0
        self.positions: list[int] = []  # of every event read
        self.values: dict[tuple[str, str], list[LoggedValue]] = {}
        self.folded: dict[str, Twin] = {}
        self.time_ns: dict[int, int] = {}  # position -> the log's receive time (some kinds)
        self._ids: dict[str, int] = {}
        self._notifications: dict[tuple[str, str, str, int, int], int] = {}
        self.duplicate_ids: list[tuple[int, str]] = []  # (position, event id)
        self.duplicate_notifications: list[tuple[int, str, str]] = []  # (position, device, href)
        self.online: dict[str, tuple[str, str]] = {}  # device -> (connection id, gateway)
        self.offline_ns: dict[tuple[str, str], int] = {}  # (device, connection) -> first offline
        # (device, connection) -> when a device-online of another connection replaced it
        self.replaced_ns: dict[tuple[str, str], int] = {}
        self.commands: dict[str, CommandLog] = {}

    def add(self, event: AnyEvent, time_ns: int) -> None:
        position = event.position
        assert position is not None
        if position <= self.position:
            return  # read twice
        self.position = position
        self.positions.append(position)
        device = event.device_id
        first = self._ids.setdefault(event.id, position)
        if first != position:
            self.duplicate_ids.append((position, event.id))
        twin = fold(self.folded.get(device), event)
        if twin is not None:
            self.folded[device] = twin
        data = event.data
        if isinstance(data, ResourceChanged) and data.href in self.hrefs:
            seq = _content_seq(data.content)
            self.values.setdefault((device, data.href), []).append(
                LoggedValue(position, seq, data.connection_id, data.observe_seq)
            )
            if data.observe_seq is not None and seq is not None:
                key = (device, data.connection_id, data.href, data.observe_seq, seq)
                if self._notifications.setdefault(key, position) != position:
                    self.duplicate_notifications.append((position, device, data.href))
        elif isinstance(data, DeviceOnline):
            before = self.online.get(device)
            if before is not None and before[0] != data.connection_id:
                self.replaced_ns.setdefault((device, before[0]), time_ns)
            self.online[device] = (data.connection_id, data.gateway)
        elif isinstance(data, DeviceOffline):
            self.offline_ns.setdefault((device, data.connection_id), time_ns)
            if self.online.get(device, ("", ""))[0] == data.connection_id:
                del self.online[device]
        elif event.correlation_id is not None:
            cid = event.correlation_id
            if isinstance(data, CommandPending):
                self.commands.setdefault(cid, CommandLog(device)).pending.append(position)
            elif (state := TERMINAL.get(type(data))) is not None:
                self.commands.setdefault(cid, CommandLog(device)).terminal.append((position, state))

    def seqs(self, device: str, href: str) -> set[int]:
        return {v.seq for v in self.values.get((device, href), ()) if v.seq is not None}

    def closed_ns(self, device: str, connection: str) -> tuple[int, str] | None:
        """When the log stopped showing ``device`` online on ``connection``, and how: its
        ``device-offline``, or a ``device-online`` of a newer connection (the device came back
        through a gateway: nothing claims the dead connection any more)."""
        ends = [
            (t, how)
            for t, how in (
                (self.offline_ns.get((device, connection)), "offline"),
                (self.replaced_ns.get((device, connection)), "replaced"),
            )
            if t is not None
        ]
        return min(ends) if ends else None

    def connections_of(self, gateway: str) -> dict[str, str]:
        """device -> connection id, for the connections ``gateway`` holds as the log sees it."""
        return {d: c for d, (c, g) in self.online.items() if g == gateway}


# -- checks ---------------------------------------------------------------------------------------


def check(violations: int, **details: Any) -> dict[str, Any]:
    return {"ok": violations == 0, "violations": violations, **details}


def lost_values(
    records: Iterable[DeviceRecord],
    log: LogView,
    *,
    window: tuple[int, int],
    ack_window_ns: int,
    outages: Sequence[Outage],
    recorded_ns: int,
) -> dict[str, Any]:
    """Acknowledged values written in ``window`` (epoch ns) missing from the log, and final
    values (devices online at the record) missing from the log."""
    lo, hi = window
    sent = acked = in_flight = in_flight_missing = 0
    lost: list[dict[str, Any]] = []
    final_missing: list[dict[str, Any]] = []
    finals = 0
    for rec in records:
        for href, by_seq in rec.sent.items():
            logged = log.seqs(rec.device, href)
            for seq, writes in by_seq.items():
                first = min(t for _, t in writes)
                if not lo <= first < hi:
                    continue
                sent += 1
                at = acknowledged_at(
                    rec,
                    writes,
                    ack_window_ns=ack_window_ns,
                    outages=outages,
                    recorded_ns=recorded_ns,
                )
                if at is None:
                    in_flight += 1
                    in_flight_missing += seq not in logged
                    continue
                acked += 1
                if seq not in logged:
                    lost.append({"device": rec.device, "href": href, "seq": seq, "sent_ns": at})
        if rec.online_conn is None:
            continue
        for href, seq in rec.final.items():
            finals += 1
            if seq not in log.seqs(rec.device, href):
                final_missing.append({"device": rec.device, "href": href, "seq": seq})
    return check(
        len(lost) + len(final_missing),
        values_sent=sent,
        acknowledged=acked,
        acknowledged_lost=len(lost),
        in_flight=in_flight,
        in_flight_not_in_log=in_flight_missing,
        final_values=finals,
        final_values_lost=len(final_missing),
        examples=(lost + final_missing)[:EXAMPLES],
    )


def duplicates(
    log: LogView, positions: tuple[int, int], twins: Mapping[str, Twin]
) -> dict[str, Any]:
    """Events in ``positions`` (after, upto] that repeat an earlier one; twins that applied
    more (or fewer) events than their log has; values appended again (reported only)."""
    lo, hi = positions
    ids = [p for p, _ in log.duplicate_ids if lo < p <= hi]
    notes = [(p, d, h) for p, d, h in log.duplicate_notifications if lo < p <= hi]
    versions = [
        {"device": d, "stored_version": t.version, "fold_version": log.folded[d].version}
        for d, t in twins.items()
        if d in log.folded
        and t.position == log.folded[d].position
        and t.version != log.folded[d].version
    ]
    again = 0
    for values in log.values.values():
        seen: set[int] = set()
        for v in values:
            if v.seq is None:
                continue
            if v.seq in seen and lo < v.position <= hi:
                again += 1
            seen.add(v.seq)
    return check(
        len(ids) + len(notes) + len(versions),
        same_event_id_twice=len(ids),
        same_notification_twice=len(notes),
        twins_with_wrong_version=len(versions),
        same_value_appended_again=again,
        examples=(
            [{"position": p, "duplicate": "event id"} for p in ids]
            + [
                {"position": p, "device": d, "href": h, "duplicate": "notification"}
                for p, d, h in notes
            ]
            + versions
        )[:EXAMPLES],
    )


def order_violations(log: LogView, positions: tuple[int, int]) -> dict[str, Any]:
    """Events in ``positions`` whose ``seq`` is below one an earlier event of the resource had."""
    lo, hi = positions
    bad: list[dict[str, Any]] = []
    resources = 0
    for (device, href), values in log.values.items():
        resources += 1
        top: LoggedValue | None = None
        for v in values:
            if v.seq is None:
                continue
            if top is not None and top.seq is not None and v.seq < top.seq:
                if lo < v.position <= hi:
                    bad.append(
                        {
                            "device": device,
                            "href": href,
                            "seq": v.seq,
                            "position": v.position,
                            "after_seq": top.seq,
                            "at_position": top.position,
                        }
                    )
                continue
            if top is None or top.seq is None or v.seq > top.seq:
                top = v  # the first event of the highest seq so far
    return check(len(bad), resources=resources, examples=bad[:EXAMPLES])


def live_subscription(
    delivered: Sequence[int], log: LogView, positions: tuple[int, int], errors: Sequence[str]
) -> dict[str, Any]:
    """A live subscription (``delivered``: the positions it handed out, in order) against the
    log: every event in ``positions`` (after, upto] handed out, once, in log order."""
    lo, hi = positions
    seen: set[int] = set()
    repeated = 0
    last = 0
    for p in delivered:
        if p <= last:
            repeated += lo < p <= hi
        else:
            last = p
        seen.add(p)
    expected = [p for p in log.positions if lo < p <= hi]
    missing = [p for p in expected if p not in seen]
    return check(
        len(missing) + repeated,
        events=len(expected),
        missing=len(missing),
        repeated_or_out_of_order=repeated,
        reopened_after_errors=len(errors),
        examples=[{"position": p} for p in missing[:EXAMPLES]] + [{"error": e} for e in errors[:2]],
    )


def _diff(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


def convergence(
    log: LogView, twins: Mapping[str, Twin], records: Iterable[DeviceRecord]
) -> dict[str, Any]:
    """Stored twins against the fold of the log, and against the devices' final values."""
    differ: list[dict[str, Any]] = []
    behind: list[dict[str, Any]] = []
    devices = 0
    for rec in records:
        devices += 1
        folded = log.folded.get(rec.device)
        stored = twins.get(rec.device)
        if folded is None or stored is None or stored != folded:
            a = {} if stored is None else stored.to_document()
            b = {} if folded is None else folded.to_document()
            differ.append(
                {
                    "device": rec.device,
                    "stored_position": None if stored is None else stored.position,
                    "fold_position": None if folded is None else folded.position,
                    "fields": _diff(a, b),
                }
            )
        if rec.online_conn is None:
            continue
        for href, seq in rec.final.items():
            state = None if stored is None else stored.resource(href)
            shown = None if state is None else _content_seq(state.content)
            if shown != seq:
                behind.append(
                    {"device": rec.device, "href": href, "device_seq": seq, "twin_seq": shown}
                )
    return check(
        len(differ) + len(behind),
        devices=devices,
        twins_not_the_fold_of_the_log=len(differ),
        twins_not_showing_the_device_value=len(behind),
        examples=(differ + behind)[:EXAMPLES],
    )


def offline_marking(
    held: Mapping[str, str],
    killed_ns: int,
    log: LogView,
    twin_offline_ns: Mapping[str, int],
    *,
    bound_s: float,
    twin_required: bool,
) -> dict[str, Any]:
    """Connections ``held`` (device -> connection id) by a gateway killed at ``killed_ns``:
    within ``bound_s`` the log must stop showing each device online on it (its
    ``device-offline``, or the device back on a newer connection); with ``twin_required`` (the
    gateway stayed down, so no device could come back) the twin must also have stopped showing
    it online on that connection in time."""
    log_s: list[float] = []
    twin_s: list[float] = []
    how: dict[str, int] = {}
    late: list[dict[str, Any]] = []
    for device, conn in sorted(held.items()):
        closed = log.closed_ns(device, conn)
        s = None if closed is None else round((closed[0] - killed_ns) / 1e9, 3)
        if closed is not None:
            log_s.append(round((closed[0] - killed_ns) / 1e9, 3))
            how[closed[1]] = how.get(closed[1], 0) + 1
        t = twin_offline_ns.get(device)
        ts = None if t is None else round((t - killed_ns) / 1e9, 3)
        if ts is not None:
            twin_s.append(ts)
        if s is None or s > bound_s or (twin_required and (ts is None or ts > bound_s)):
            late.append({"device": device, "connection_id": conn, "log_s": s, "twin_s": ts})
    return check(
        len(late),
        connections=len(held),
        bound_s=bound_s,
        closed_in_log_by=how,
        log_closed_after_kill_s=_spread(log_s, len(held)),
        twin_not_online_on_it_after_kill_s=_spread(twin_s, len(held)),
        examples=late[:EXAMPLES],
    )


def _spread(values: list[float], of: int) -> dict[str, Any]:
    v = sorted(values)
    if not v:
        return {"count": 0, "of": of, "p50": None, "max": None}
    return {"count": len(v), "of": of, "min": v[0], "p50": v[len(v) // 2], "max": v[-1]}


@dataclass(frozen=True, slots=True)
class IssuedCommand:
    """A command the suite issued: its device and unique ``power``, whether (and at which
    position) the API accepted it, and how a deliberate late retry was answered."""

    cid: str
    device: str
    power: int
    accepted_position: int | None
    attempts: int
    retry: str = ""  # "": not retried; else "same-position", "new-position", "conflict", ...


def commands(
    issued: Iterable[IssuedCommand], log: LogView, applied: Mapping[int, int]
) -> dict[str, Any]:
    """Every command issued: exactly one terminal event; accepted means in the log; a
    succeeded update applied by the device (``applied``: power -> times the device applied
    it)."""
    states: dict[str, int] = {}
    retries: dict[str, int] = {}
    bad: list[dict[str, Any]] = []
    n = accepted = not_recorded = more_than_once = 0
    for c in issued:
        n += 1
        accepted += c.accepted_position is not None
        if c.retry:
            retries[c.retry] = retries.get(c.retry, 0) + 1
        entry = log.commands.get(c.cid)
        if entry is None:
            if c.accepted_position is not None:
                bad.append({"cid": c.cid, "problem": "accepted but not in the log"})
            else:
                not_recorded += 1
            continue
        ends = [s for _, s in entry.terminal]
        for s in ends:
            states[s] = states.get(s, 0) + 1
        if len(ends) != 1 or entry.open:
            bad.append(
                {
                    "cid": c.cid,
                    "problem": f"{len(ends)} terminal events",
                    "terminal": ends,
                    "pending_events": len(entry.pending),
                    "open": entry.open,
                }
            )
            continue
        times = applied.get(c.power, 0)
        more_than_once += times > 1
        if ends[0] == "succeeded" and times == 0:
            bad.append({"cid": c.cid, "problem": "succeeded, never applied by the device"})
    return check(
        len(bad),
        issued=n,
        accepted=accepted,
        never_recorded=not_recorded,
        terminal_states=states,
        late_retries=retries,
        applied_more_than_once=more_than_once,
        examples=bad[:EXAMPLES],
    )


def replace_retry(c: IssuedCommand, retry: str) -> IssuedCommand:
    return dataclasses.replace(c, retry=retry)

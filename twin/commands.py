"""The command API as a sans-IO core: (request, caller, latest twin, now) -> a decision.

No awaiting, no clock, no randomness of its own: the driver (:mod:`twin.api`) reads the caller's
owner from the token, loads the device's *latest* twin (the stored twin plus the device's log
tail folded onto it) and the current last position of the request's :func:`scope_for`, and calls
:func:`decide`. The decision is either an :class:`Answer` (a reply, nothing to record) or a
:class:`Record`: events to append — conditionally on ``expected_last`` in ``scope`` when
the check that led to them must still hold when they land — and how to reply once the log
acknowledged them.

Why a conditional append (optimistic concurrency on the log) rather than trusting the twin:
the twin in the store lags the log, and several twin instances may serve the API. Reading the
tail closes the lag; the condition closes the race between two instances (or two requests) that
read the same state. Scopes are as narrow as the check: a command's is the device's
``command-pending`` subjects (a duplicate correlation id can only come from another
``command-pending``), desired state's the resource's subjects (``*.<href>``: its versions).
Device reports on other resources never make a command request retry.

Idempotent commands. A correlation id names one command per device (and owner) for as long as
the twin remembers it: while the command is open, and for the store's ``command_memory`` after
it ended (:data:`~twin.model.COMMAND_MEMORY`, 24 h by default). A request that repeats a known
id is never recorded again: if it is the **same request** (:func:`differences` finds nothing)
it is answered with the original acceptance (position, deadline), flagged ``repeated``, with the
command's state and, once it ended, its outcome; otherwise it is ``conflict``. The same request
means: the same device, operation and href; the same content (the same JSON value: same types,
so ``1`` is not ``1.0`` nor ``true``; key order aside), or the same bytes of ``content_b64`` in
the same ``content_format``; the same ``interface``; the same ``max_attempts`` (absent is 3);
the same ``ttl`` in milliseconds; for an ``rpc``, the same ``method`` and ``params`` (compared as
content is). The owner comes from the token: a command of another owner
under that id (a device that changed owners) is never shown; while it is open the id is a
``conflict`` without details, once it ended it is not remembered for the new owner. After the
window a known id names a new command (the gateway tells the two apart by their positions).
Ids on different devices are independent.

Message ids are derived, never random: a command's from (owner, device, correlation id, what
it asks for, the expected last position: each owner's scope has its own positions), so a
retried append of the same decision is deduplicated by the log,
two instances recording the same request at once record it once (and answer the same
position), and a different request racing under the same id cannot be taken for it. Cancel
and expiry ids come from (device, correlation id, the command's position): two instances
canceling or expiring the same command write it once (within the log's duplicate window;
beyond it the fold ignores an end of a command that already ended).

Also here, pure as well: :func:`expiry_events` (what the sweeper appends), and what the
projector appends: :func:`reached_events` (a resource's delta became empty),
:func:`desired_update_events` (a delta to carry to an online device) and
:func:`signoff_cancel_events` (a device signed off: its open commands end as canceled).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import math
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final, get_args

import msgspec

from proto import api, subjects
from proto.errors import SubjectError
from proto.events import (
    SHARED_PREFIX,
    AnyEvent,
    CommandCanceled,
    CommandExpired,
    CommandPending,
    CommandState,
    DesiredCleared,
    DesiredReached,
    DesiredSet,
    Event,
)
from twin.model import EndedCommand, Twin, TwinCommand, utc_ms

__all__ = [
    "API_SOURCE",
    "MAX_CORRELATION_ID",
    "SIGNED_OFF_REASON",
    "TWIN_SOURCE",
    "Answer",
    "Decision",
    "Record",
    "accepted",
    "decide",
    "device_list",
    "differences",
    "error",
    "expiry_events",
    "pending_list",
    "reached_events",
    "rpc_content",
    "scope_for",
    "signoff_cancel_events",
    "validate",
]

API_SOURCE: Final = "/twinhub/twin/api"
TWIN_SOURCE: Final = "/twinhub/twin"
MAX_CORRELATION_ID: Final = 256
MAX_LIMIT: Final = 10_000
_IDS: Final = uuid.UUID("6f1c6c3e-9a53-4a39-8d0e-4c1b7d0b9e21")  # namespace of derived ids

DeviceRequest = (
    api.UpdateResource
    | api.CreateResource
    | api.RetrieveResource
    | api.DeleteResource
    | api.CallRpc
    | api.SetDesired
    | api.ClearDesired
    | api.CancelCommands
    | api.GetTwin
)
CommandRequest = (
    api.UpdateResource
    | api.CreateResource
    | api.RetrieveResource
    | api.DeleteResource
    | api.CallRpc
)


@dataclass(frozen=True, slots=True)
class Answer:
    """Reply at once; nothing to record."""

    reply: api.Reply


@dataclass(frozen=True, slots=True)
class Record:
    """Append ``events`` (in order, one device), then reply with ``reply(positions)``.

    With ``scope`` set, the append is conditional: the last position in ``scope`` must still be
    ``expected_last``; otherwise the driver decides again on fresh state.
    """

    events: tuple[AnyEvent, ...]
    reply: Callable[[Sequence[int]], api.Reply]
    scope: str | None = None
    expected_last: int | None = None


Decision = Answer | Record


def error(code: api.ErrorCode, message: str) -> api.Reply:
    return api.Reply(ok=False, error=api.ApiError(code=code, message=message))


def ok(result: Any) -> api.Reply:
    return api.Reply(ok=True, result=result)


def _derived_id(*parts: object) -> str:
    return str(uuid.uuid5(_IDS, "\n".join(map(str, parts))))


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# -- validation ---------------------------------------------------------------------------


def _check_token(value: str, what: str) -> str | None:
    try:
        if what == "device_id":
            subjects.event_filter(device=value)
        else:
            subjects.event_filter(resource=value)
    except SubjectError as e:
        return f"{what}: {e}"
    return None


def validate(request: api.ApiRequest) -> str | None:
    """What is wrong with a decoded request (``None``: nothing). Decoding checked the types;
    this checks the values."""
    problems: list[str] = []
    device = getattr(request, "device_id", None)
    if device is not None:
        if not device:
            problems.append("device_id must not be empty")
        elif (p := _check_token(device, "device_id")) is not None:
            problems.append(p)
    href = getattr(request, "href", None)
    if href is not None:
        if not href.startswith("/"):
            problems.append(f"href must start with '/': {href!r}")
        elif (p := _check_token(href, "href")) is not None:
            problems.append(p)
    match request:
        case (
            api.UpdateResource()
            | api.CreateResource()
            | api.RetrieveResource()
            | api.DeleteResource()
            | api.CallRpc()
        ):
            problems.extend(_command_problems(request))
        case api.CancelCommands():
            if request.correlation_id is not None and not _good_id(request.correlation_id):
                problems.append("bad correlation_id")
            if request.href is not None and not request.href.startswith("/"):
                problems.append(f"href must start with '/': {request.href!r}")
        case api.SetDesired():
            if request.href.startswith(SHARED_PREFIX):
                if request.href == SHARED_PREFIX:
                    problems.append(f"a shared attribute's href is {SHARED_PREFIX}<key>")
                if request.content is None:
                    problems.append("a shared attribute's value must not be null")
            elif not isinstance(request.content, dict):
                problems.append(
                    "desired content must be a JSON object "
                    f"(any JSON value on {SHARED_PREFIX}<key>)"
                )
        case api.ListPending() | api.ListDevices():
            if not 1 <= request.limit <= MAX_LIMIT:
                problems.append(f"limit must be 1..{MAX_LIMIT}")
    return "; ".join(problems) or None


def _good_id(cid: str) -> bool:
    return 0 < len(cid) <= MAX_CORRELATION_ID and cid.isprintable() and cid == cid.strip()


def _command_problems(request: CommandRequest) -> list[str]:
    problems: list[str] = []
    if not 0 < request.ttl <= api.MAX_TTL:
        problems.append(f"ttl must be > 0 and <= {api.MAX_TTL:g} seconds")
    if request.correlation_id is not None and not _good_id(request.correlation_id):
        problems.append(
            f"correlation_id must be 1..{MAX_CORRELATION_ID} printable characters, "
            "no surrounding spaces"
        )
    if request.max_attempts is not None and not 1 <= request.max_attempts <= 100:
        problems.append("max_attempts must be 1..100")
    if isinstance(request, api.CallRpc):
        if not 0 < len(request.method) <= api.MAX_RPC_METHOD or not request.method.isprintable():
            problems.append(f"method must be 1..{api.MAX_RPC_METHOD} printable characters")
        return problems
    if request.interface is not None and not request.interface.startswith("oic.if."):
        problems.append(f"interface must be an OCF interface (oic.if.*): {request.interface!r}")
    if isinstance(request, api.UpdateResource):  # CreateResource too
        if request.content_b64 is not None:
            if request.content is not None:
                problems.append("give content or content_b64, not both")
            if request.content_format is None:
                problems.append("content_b64 needs content_format")
            try:
                base64.b64decode(request.content_b64, validate=True)
            except (binascii.Error, ValueError):
                problems.append("content_b64 is not base64")
        elif request.content is None:
            problems.append(f"{request.OP} needs content (or content_b64)")
        elif request.content_format is not None:
            problems.append("content_format goes with content_b64 (JSON content is sent as CBOR)")
    return problems


# -- decisions ------------------------------------------------------------------------------


def scope_for(request: api.ApiRequest, owner: str) -> str | None:
    """The subjects whose last position must not move between the check and the append."""
    match request:
        case (
            api.UpdateResource()
            | api.CreateResource()
            | api.RetrieveResource()
            | api.DeleteResource()
            | api.CallRpc()
        ):
            return subjects.event_filter(owner, request.device_id, CommandPending.KIND)
        case api.SetDesired() | api.ClearDesired():
            return subjects.event_filter(owner, request.device_id, None, request.href)
    return None


def _authorize(twin: Twin | None, owner: str, device_id: str, *, live: bool) -> api.Reply | None:
    if twin is None or (live and twin.deleted and twin.owner == owner):
        return error("not_found", f"no device {device_id!r}")
    if twin.owner != owner:
        return error("forbidden", f"device {device_id!r} belongs to another owner")
    return None


def decide(
    request: DeviceRequest,
    owner: str,
    twin: Twin | None,
    now: datetime,
    *,
    caller: str = "",
    expected_last: int | None = None,
    new_id: Callable[[], str] = lambda: str(uuid.uuid4()),
    ended: EndedCommand | None = None,
) -> Decision:
    """Decide a request about one device (``twin``: its latest state, ``None``: unknown).

    ``caller`` names the token's subject in the events (``issued_by``); ``expected_last`` is
    the last position in :func:`scope_for` read *before* ``twin`` was loaded. For a command
    request with a correlation id, ``ended`` is the newest command of that id that ended on the
    device, as the store remembers it with the log tail after the twin applied (``None``:
    none known).
    """
    problem = validate(request)
    if problem is not None:
        return Answer(error("bad_request", problem))
    denied = _authorize(twin, owner, request.device_id, live=not isinstance(request, api.GetTwin))
    if denied is not None:
        return Answer(denied)
    assert twin is not None
    match request:
        case api.GetTwin():
            return Answer(ok(api.TwinResult(twin=twin.to_json(), position=twin.position)))
        case (
            api.UpdateResource()
            | api.CreateResource()
            | api.RetrieveResource()
            | api.DeleteResource()
            | api.CallRpc()
        ):
            return _command(request, owner, twin, now, caller, expected_last, new_id, ended)
        case api.CancelCommands():
            return _cancel(request, owner, twin, now)
        case api.SetDesired() | api.ClearDesired():
            return _desired(request, owner, twin, now, expected_last)


def _command(
    request: CommandRequest,
    owner: str,
    twin: Twin,
    now: datetime,
    caller: str,
    expected_last: int | None,
    new_id: Callable[[], str],
    ended: EndedCommand | None,
) -> Decision:
    # ThingsBoard's device API has RPC and no resources; OCF has resources and no RPC.
    if isinstance(request, api.CallRpc) and not twin.simple:
        return Answer(
            error("bad_request", f"device {twin.device_id!r} is an OCF device: rpc is for simple")
        )
    if not isinstance(request, api.CallRpc) and twin.simple:
        return Answer(
            error(
                "bad_request",
                f"device {twin.device_id!r} is a simple device: {request.OP} is for OCF devices"
                " (send it an rpc)",
            )
        )
    cid = request.correlation_id or new_id()
    known = twin.command(cid)
    if known is not None:  # open: newer than any that ended
        return Answer(_repeated(request, owner, twin.device_id, known, None))
    if (
        ended is not None
        and ended.command.correlation_id == cid
        and ended.command.owner == owner  # another owner's: not shown, not in the way
        and not ended.forgotten(now)
    ):
        return Answer(_repeated(request, owner, twin.device_id, ended.command, ended))
    # Milliseconds, as the twin keeps times: the recorded ttl is then exactly the request's.
    now = utc_ms(now)
    expires_at = now + timedelta(milliseconds=_ttl_ms(request.ttl))
    content: Any = None
    content_b64 = None
    content_format = None
    interface = None
    if isinstance(request, api.UpdateResource):
        content, content_b64 = request.content, request.content_b64
        content_format = request.content_format
    if isinstance(request, api.CallRpc):
        content = rpc_content(request.method, request.params)
    else:
        interface = request.interface
    data = CommandPending(
        href=request.href,
        op=api.COMMAND_REQUESTS[request.OP],
        content=content,
        content_b64=content_b64,
        content_format=content_format,
        interface=interface,
        expires_at=expires_at,
        max_attempts=request.max_attempts or 3,
        issued_by=caller or owner,
    )
    event: AnyEvent = Event(
        owner=owner,
        device_id=twin.device_id,
        data=data,
        source=API_SOURCE,
        id=_derived_id("command", owner, twin.device_id, cid, _fingerprint(request), expected_last),
        time=now,
        correlation_id=cid,
    )

    def reply(positions: Sequence[int]) -> api.Reply:
        return ok(
            api.CommandAccepted(
                correlation_id=cid,
                device_id=twin.device_id,
                href=request.href,
                position=positions[0],
                expires_at=_iso(expires_at),
            )
        )

    scope = subjects.event_filter(owner, twin.device_id, CommandPending.KIND)
    return Record((event,), reply, scope=scope, expected_last=expected_last)


_FINAL_STATES: Final[dict[str, api.FinalState]] = {s: s for s in get_args(api.FinalState)}


def _ttl_ms(ttl: float) -> int:
    return max(1, round(ttl * 1000))


def rpc_content(method: str, params: Any) -> dict[str, Any]:
    """The ``content`` of an rpc's ``command-pending``: what the device is sent (its ``id``
    aside)."""
    return {"method": method, "params": params}


def _asked(request: CommandRequest) -> dict[str, Any]:
    """What a command request asks for, as :func:`differences` compares it."""
    if isinstance(request, api.CallRpc):
        return {
            "op": "rpc",
            "href": request.href,
            "method": request.method,
            "params": request.params,
            "max_attempts": request.max_attempts or 3,
            "ttl": _ttl_ms(request.ttl),
        }
    content = content_b64 = content_format = None
    if isinstance(request, api.UpdateResource):
        content, content_b64 = request.content, request.content_b64
        content_format = request.content_format
    return {
        "op": api.COMMAND_REQUESTS[request.OP],
        "href": request.href,
        "content": content,
        "content_b64": content_b64,
        "content_format": content_format,
        "interface": request.interface,
        "max_attempts": request.max_attempts or 3,
        "ttl": _ttl_ms(request.ttl),
    }


def _fingerprint(request: CommandRequest) -> str:
    """A digest of :func:`_asked`: the same for the same request, whatever its key order."""
    asked = _asked(request)
    if asked.get("content_b64") is not None:
        asked["content_b64"] = base64.b64decode(asked["content_b64"]).hex()
    body = msgspec.json.encode(asked, order="sorted")
    return hashlib.sha256(body).hexdigest()


def _identical(a: Any, b: Any) -> bool:
    """The same JSON value, types included (``1`` is neither ``1.0`` nor ``true``: the device
    gets them as different CBOR); dict key order does not matter."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, int) or isinstance(b, int):  # a store's Int64 is an int
        return isinstance(a, int) and isinstance(b, int) and a == b
    if isinstance(a, dict):
        return (
            isinstance(b, dict)
            and a.keys() == b.keys()
            and all(_identical(v, b[k]) for k, v in a.items())
        )
    if isinstance(a, list | tuple):
        return isinstance(b, list | tuple) and len(a) == len(b) and all(map(_identical, a, b))
    if isinstance(a, float) and isinstance(b, float):  # -0.0 is not 0.0 either
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
    return type(a) is type(b) and a == b


def _same_bytes(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return a is b
    try:
        return base64.b64decode(a) == base64.b64decode(b)
    except (binascii.Error, ValueError):
        return a == b


def differences(request: CommandRequest, command: TwinCommand) -> tuple[str, ...]:
    """What ``request`` asks for that the recorded ``command`` does not (nothing: the same
    request; see the module docstring). The device and owner are the caller's to check."""
    asked = _asked(request)
    recorded_ttl = (
        None
        if command.expires_at is None
        else round((command.expires_at - command.issued_at) / timedelta(milliseconds=1))
    )
    rpc = command.content if isinstance(command.content, dict) else {}
    recorded = {
        "op": command.op,
        "href": command.href,
        "method": rpc.get("method"),
        "params": rpc.get("params"),
        "content": command.content,
        "content_b64": command.content_b64,
        "content_format": command.content_format,
        "interface": command.interface,
        "max_attempts": command.max_attempts,
        "ttl": recorded_ttl,
    }
    out: list[str] = []
    for name, value in asked.items():
        if name == "content_b64":
            same = _same_bytes(value, recorded[name])
        else:
            same = _identical(value, recorded[name])
        if not same:
            out.append(name)
    return tuple(out)


def _repeated(
    request: CommandRequest,
    owner: str,
    device_id: str,
    command: TwinCommand,
    ended: EndedCommand | None,
) -> api.Reply:
    """The answer to a request naming a known command: the original acceptance, or conflict."""
    cid = command.correlation_id
    if command.owner != owner:
        return error("conflict", f"correlation id {cid!r} is in use on device {device_id!r}")
    differ = differences(request, command)
    if differ:
        return error(
            "conflict",
            f"correlation id {cid!r} names another command on device {device_id!r}"
            f" (it differs in {', '.join(differ)})",
        )
    return ok(accepted(device_id, command, ended))


def accepted(
    device_id: str, command: TwinCommand, ended: EndedCommand | None = None
) -> api.CommandAccepted:
    """The acceptance of a recorded command, as a repeated request gets it: where it was
    recorded, its deadline, its state and, once it ended, how."""
    state: CommandState = command.state
    summary = None
    outcome = None if ended is None else ended.outcome
    final = None if outcome is None else _FINAL_STATES.get(outcome.state)
    if outcome is not None and final is not None:
        state = final
        summary = api.OutcomeSummary(
            state=final,
            position=outcome.position,
            at=_iso(outcome.at),
            status=outcome.status,
            attempts=outcome.attempts,
            reason=outcome.reason,
        )
    return api.CommandAccepted(
        correlation_id=command.correlation_id,
        device_id=device_id,
        href=command.href,
        position=command.position,
        expires_at="" if command.expires_at is None else _iso(command.expires_at),
        repeated=True,
        state=state,
        outcome=summary,
    )


def _cancel_events(
    twin: Twin,
    commands: Iterable[TwinCommand],
    now: datetime,
    reason: str,
    source: str = API_SOURCE,
) -> tuple[AnyEvent, ...]:
    return tuple(
        Event(
            owner=c.owner,
            device_id=twin.device_id,
            data=CommandCanceled(href=c.href, reason=reason),
            source=source,
            id=_derived_id("canceled", twin.device_id, c.correlation_id, c.position),
            time=now,
            correlation_id=c.correlation_id,
        )
        for c in commands
    )


def _cancel(request: api.CancelCommands, owner: str, twin: Twin, now: datetime) -> Decision:
    matching = [
        c
        for c in twin.pending
        if c.owner == owner
        and (request.correlation_id is None or c.correlation_id == request.correlation_id)
        and (request.href is None or c.href == request.href)
    ]
    if not matching:
        if request.correlation_id is not None:
            return Answer(error("not_found", f"no pending command {request.correlation_id!r}"))
        return Answer(ok(api.CancelResult(device_id=twin.device_id, canceled=[])))
    events = _cancel_events(twin, matching, now, "canceled")
    ids = [c.correlation_id for c in matching]

    def reply(positions: Sequence[int]) -> api.Reply:
        return ok(api.CancelResult(device_id=twin.device_id, canceled=ids, position=positions[-1]))

    return Record(events, reply)


def _desired(
    request: api.SetDesired | api.ClearDesired,
    owner: str,
    twin: Twin,
    now: datetime,
    expected_last: int | None,
) -> Decision:
    if (
        isinstance(request, api.SetDesired)
        and not twin.simple
        and not isinstance(request.content, dict)
    ):
        return Answer(
            error(
                "bad_request",
                "desired content must be a JSON object (shared attributes, "
                f"{SHARED_PREFIX}<key>, are a simple device's)",
            )
        )
    entry = twin.desired_for(request.href)
    if isinstance(request, api.ClearDesired) and (entry is None or entry.cleared):
        version = 0 if entry is None else entry.version
        return Answer(
            ok(api.DesiredResult(device_id=twin.device_id, href=request.href, version=version))
        )
    version = (0 if entry is None else entry.version) + 1
    # Latest wins: an update still pending for older desired content would undo the new one.
    superseded = [
        c
        for c in twin.pending
        if c.op == "update" and c.href == request.href and c.reason == "desired"
    ]
    data: DesiredSet | DesiredCleared
    if isinstance(request, api.SetDesired):
        data = DesiredSet(href=request.href, content=request.content, version=version)
    else:
        data = DesiredCleared(href=request.href, version=version)
    events = (
        *_cancel_events(twin, superseded, now, "superseded"),
        Event(
            owner=owner,
            device_id=twin.device_id,
            data=data,
            source=API_SOURCE,
            id=_derived_id(data.KIND, twin.device_id, request.href, version, expected_last),
            time=now,
        ),
    )
    ids = [c.correlation_id for c in superseded]

    def reply(positions: Sequence[int]) -> api.Reply:
        return ok(
            api.DesiredResult(
                device_id=twin.device_id,
                href=request.href,
                version=version,
                position=positions[-1],
                superseded=ids,
            )
        )

    scope = subjects.event_filter(owner, twin.device_id, None, request.href)
    return Record(events, reply, scope=scope, expected_last=expected_last)


# -- queries ----------------------------------------------------------------------------------


def _pending_entry(twin: Twin, c: TwinCommand) -> api.PendingCommand:
    return api.PendingCommand(
        correlation_id=c.correlation_id,
        device_id=twin.device_id,
        href=c.href,
        op=c.op,
        state=c.state,
        issued_at=_iso(c.issued_at),
        expires_at=None if c.expires_at is None else _iso(c.expires_at),
        attempts=c.attempts,
        reason=c.reason,
        position=c.position,
        content=c.content,
        content_b64=c.content_b64,
        content_format=c.content_format,
        interface=c.interface,
        max_attempts=c.max_attempts,
    )


def pending_list(request: api.ListPending, owner: str, twins: Iterable[Twin]) -> api.Reply:
    """The open commands of ``owner`` among ``twins``, per device in issue order."""
    out: list[api.PendingCommand] = []
    for twin in twins:
        for c in twin.pending:
            if (
                c.owner == owner
                and (request.href is None or c.href == request.href)
                and (request.state is None or c.state == request.state)
            ):
                out.append(_pending_entry(twin, c))
                if len(out) >= request.limit:
                    return ok(api.PendingList(commands=out))
    return ok(api.PendingList(commands=out))


def device_list(twins: Sequence[Twin], position: int, limit: int) -> api.Reply:
    next_after = twins[-1].device_id if len(twins) >= limit else None
    return ok(
        api.DeviceList(
            devices=[t.to_json() for t in twins], position=position, next_after_id=next_after
        )
    )


# -- what the twin service appends on its own -------------------------------------------------


def expiry_events(twin: Twin, now: datetime) -> tuple[AnyEvent, ...]:
    """``command-expired`` for each open command of ``twin`` whose deadline passed."""
    return tuple(
        Event(
            owner=c.owner,
            device_id=twin.device_id,
            data=CommandExpired(href=c.href, attempts=c.attempts),
            source=TWIN_SOURCE,
            id=_derived_id("expired", twin.device_id, c.correlation_id, c.position),
            time=now,
            correlation_id=c.correlation_id,
        )
        for c in twin.expired(now)
    )


SIGNED_OFF_REASON: Final = "device signed off"


def signoff_cancel_events(
    twin: Twin, now: datetime, signed_off_at: int = 0
) -> tuple[AnyEvent, ...]:
    """``command-canceled`` for the open commands of a device that signed off.

    All of them while the twin is deleted; otherwise (the device registered again after a
    sign-off folded in the same batch, at position ``signed_off_at``) those issued before the
    sign-off. Ids are a client's cancel's (device, correlation id, the command's position): a
    replayed batch, a second projector pass or a client canceling the same command at the
    same time write it once."""
    if twin.deleted:
        ended: Iterable[TwinCommand] = twin.pending
    else:
        ended = [c for c in twin.pending if c.position < signed_off_at]
    return _cancel_events(twin, ended, now, SIGNED_OFF_REASON, TWIN_SOURCE)


def reached_events(twin: Twin, now: datetime) -> tuple[AnyEvent, ...]:
    """``desired-reached`` for each resource whose desired content is met and not yet marked
    reached. The id names the report that met it, so re-folding the same events (a replay, a
    redelivery) writes it once."""
    if twin.deleted:
        return ()
    out: list[AnyEvent] = []
    for d in twin.desired:
        if d.content is None or d.reached or twin.delta_for(d.href):
            continue
        r = twin.resource(d.href)
        out.append(
            Event(
                owner=twin.owner,
                device_id=twin.device_id,
                data=DesiredReached(href=d.href, version=d.version),
                source=TWIN_SOURCE,
                id=_derived_id(
                    "reached", twin.device_id, d.href, d.version, 0 if r is None else r.position
                ),
                time=now,
            )
        )
    return tuple(out)


DESIRED_REASON: Final = "desired"
DESIRED_UPDATE_TTL: Final = timedelta(seconds=60)


def desired_update_events(twin: Twin, now: datetime) -> tuple[AnyEvent, ...]:
    """``command-pending`` updates that carry each resource's delta to an online device.

    One per (resource, desired version) at most: the correlation id and the event id are
    derived from them, so folding the same state again (a replay, the next batch) issues
    nothing new. Setting desired again supersedes a pending one (see :func:`decide`).

    None for a simple device: its desired state is its shared attributes (``/shared/<key>``),
    which the gateway reads from the log's ``desired-set`` events itself; it has no resource
    to update."""
    if twin.deleted or not twin.online or twin.simple:
        return ()
    busy = {c.href for c in twin.pending if c.reason == DESIRED_REASON}
    out: list[AnyEvent] = []
    for d in twin.desired:
        if d.content is None or d.href in busy:
            continue
        delta = twin.delta_for(d.href)
        if not delta:
            continue
        correlation_id = "desired-" + _derived_id("desired", twin.device_id, d.href, d.version)
        out.append(
            Event(
                owner=twin.owner,
                device_id=twin.device_id,
                data=CommandPending(
                    href=d.href,
                    op="update",
                    content=delta,
                    expires_at=now + DESIRED_UPDATE_TTL,
                    issued_by="twinhub",
                    reason=DESIRED_REASON,
                ),
                source=TWIN_SOURCE,
                id=_derived_id("desired-update", twin.device_id, d.href, d.version),
                time=now,
                correlation_id=correlation_id,
            )
        )
    return tuple(out)

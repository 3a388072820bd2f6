"""Answers to simple devices' client-side RPCs (API op ``answer-rpc``), sans-IO.

A simple device posts ``{"method", "params"}`` to ``/api/v1/{token}/rpc`` (ThingsBoard's
client-side RPC); the gateway records it as ``rpc-requested`` (a fresh ``request_id``, how long
it waits: ``timeout_ms``) and waits for ``rpc-answered`` of that request on its subject. An
application answers through the command API; :func:`decide` says what to do, given what the
log holds for that request (the driver, :mod:`twin.api`, reads both events by subject: each
request's events are on subjects of their own, their resource token being the request id):

* a request the caller's owner's device never made is ``not_found`` (another owner's request
  is on another owner's subjects: never found, never shown);
* one whose wait is over (``timeout_ms`` after the request's time: the device got 5.04) is
  ``not_found`` too, saying so;
* the first answer is recorded, conditionally on the request's ``rpc-answered`` subject being
  still empty (``expected_last`` 0), with an id derived from (device, request id): of two
  answers racing, one lands; the other is decided again and is a repeat or a conflict;
* an answer when one is recorded: the same result (a retry of a lost reply) is answered as that
  one (``repeated``), another is ``conflict``.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Final

from proto import api, subjects
from proto.codecs import json_equal
from proto.errors import SubjectError
from proto.events import AnyEvent, Event, RpcAnswered, RpcRequested
from twin.commands import API_SOURCE, Answer, Decision, Record, error, ok, validate

__all__ = ["MAX_REQUEST_ID", "answered_scope", "decide", "problem", "requested_scope"]

MAX_REQUEST_ID: Final = 64
_NS: Final = uuid.UUID("0b6c5f0e-3d7a-4f51-a8c2-91e4d2b7c6a3")


def problem(request: api.AnswerClientRpc) -> str | None:
    """What is wrong with the request's values (None: nothing)."""
    problems = [p for p in (validate(request),) if p]
    rid = request.request_id
    if not 0 < len(rid) <= MAX_REQUEST_ID or not rid.isprintable() or rid != rid.strip():
        problems.append(f"request_id must be 1..{MAX_REQUEST_ID} printable characters")
    else:
        try:
            subjects.event_filter(resource=rid)
        except SubjectError as e:
            problems.append(f"request_id: {e}")
    return "; ".join(problems) or None


def requested_scope(owner: str, request: api.AnswerClientRpc) -> str:
    """The subject of the request's ``rpc-requested`` (the caller's owner's only)."""
    return subjects.event_filter(owner, request.device_id, RpcRequested.KIND, request.request_id)


def answered_scope(owner: str, request: api.AnswerClientRpc) -> str:
    """The subject of the request's ``rpc-answered``: empty until the first answer."""
    return subjects.event_filter(owner, request.device_id, RpcAnswered.KIND, request.request_id)


def answer_id(device_id: str, request_id: str) -> str:
    """The event id of the answer to a request: one per request, whoever answers."""
    return str(uuid.uuid5(_NS, f"{device_id}\n{request_id}"))


def decide(
    request: api.AnswerClientRpc,
    owner: str,
    requested: AnyEvent | None,
    answered: AnyEvent | None,
    now: datetime,
    *,
    expected_last: int,
) -> Decision:
    """Decide an answer; ``requested`` / ``answered``: the last event on
    :func:`requested_scope` / :func:`answered_scope` (None: none), ``expected_last`` the last
    position on :func:`answered_scope`, read before ``answered``."""
    bad = problem(request)
    if bad is not None:
        return Answer(error("bad_request", bad))
    rid, device = request.request_id, request.device_id
    asked = None if requested is None else requested.data
    if (
        requested is None
        or not isinstance(asked, RpcRequested)
        or requested.owner != owner
        or requested.device_id != device
        or asked.request_id != rid
    ):
        return Answer(error("not_found", f"device {device!r} made no rpc request {rid!r}"))
    if isinstance(answered, Event) and isinstance(answered.data, RpcAnswered):
        position = answered.position or 0
        if json_equal(answered.data.result, request.result):
            return Answer(ok(_recorded(request, position, repeated=True)))
        return Answer(
            error("conflict", f"rpc request {rid!r} of device {device!r} is answered already")
        )
    until = requested.time + timedelta(milliseconds=asked.timeout_ms)
    if now > until:
        return Answer(
            error(
                "not_found",
                f"rpc request {rid!r} of device {device!r} expired: the device stopped "
                f"waiting at {until.isoformat(timespec='milliseconds')}",
            )
        )
    event: AnyEvent = Event(
        owner=owner,
        device_id=device,
        data=RpcAnswered(request_id=rid, result=request.result),
        source=API_SOURCE,
        id=answer_id(device, rid),
        time=now,
        correlation_id=rid,
    )

    def reply(positions: Sequence[int]) -> api.Reply:
        return ok(_recorded(request, positions[-1]))

    return Record(
        (event,), reply, scope=answered_scope(owner, request), expected_last=expected_last
    )


def _recorded(
    request: api.AnswerClientRpc, position: int, *, repeated: bool = False
) -> api.RpcAnswerRecorded:
    return api.RpcAnswerRecorded(
        device_id=request.device_id,
        request_id=request.request_id,
        position=position,
        repeated=repeated,
    )

"""Client-side RPC of simple devices (ThingsBoard's device API), sans-IO; time is an input.

A device posts ``{"method": ..., "params": ...}`` to ``/api/v1/{token}/rpc`` (JSON, lenient
like the other endpoints, or CBOR) and waits for an application's answer as the CoAP
response. :meth:`gateway.simple.SimpleCore.decide` parses the body with :func:`parse_call`
(not an object, no non-empty string ``method`` of at most :data:`MAX_METHOD` characters: 4.00
with a diagnostic) into a :class:`CallServer`; the adapter
(:mod:`gateway.adapters.simple_clientrpc`) then

1. takes one of the gateway's :class:`WaitSlots` (none free: :data:`BUSY`, 5.03);
2. subscribes to the answer's subject (:func:`answer_filter`) *before* it appends the request,
   so no answer can slip in between;
3. appends :func:`requested` (``rpc-requested``, a fresh ``request_id`` that is also the event
   id, and ``timeout_ms``: how long it waits); a log that refuses it: 5.03;
4. waits for ``rpc-answered`` of that request (the command API's ``answer-rpc``: the first
   answer wins), reading it from the log (:func:`answer_in`), and answers 2.05 with its result
   (:func:`answer_payload`: JSON, or CBOR when the device's Accept asks for it); no answer in
   time: :data:`TIMED_OUT`, 5.04.

Both events carry the request id as their correlation id and as their subject's resource
token, so an application subscribes to its owner's ``rpc-requested`` events and the gateway
to one request's answer.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from gateway.errors import BadRequest
from proto import codecs, subjects
from proto.events import AnyEvent, Event, RpcAnswered, RpcRequested

__all__ = [
    "ANSWERED",
    "BUSY",
    "MAX_METHOD",
    "TIMED_OUT",
    "CallServer",
    "WaitSlots",
    "answer_filter",
    "answer_in",
    "answer_payload",
    "parse_call",
    "requested",
]

MAX_METHOD: Final = 256
ANSWERED: Final = "2.05"
TIMED_OUT: Final = "5.04"
BUSY: Final = "5.03"
_JSON: Final = int(codecs.ContentFormat.JSON)
_CBOR: Final = int(codecs.ContentFormat.CBOR)


@dataclass(frozen=True, slots=True)
class CallServer:
    """``POST /api/v1/{token}/rpc``: the device calls ``method`` with ``params`` and waits for
    the answer, to be encoded as ``accept`` (60: CBOR; otherwise JSON)."""

    owner: str
    device_id: str
    method: str
    params: Any
    accept: int


def parse_call(value: Any, owner: str, device_id: str, accept: int | None) -> CallServer:
    """A decoded body to the call; :class:`BadRequest` (4.00, its text the diagnostic) when it
    is not ``{"method": "<1..256 printable characters>", "params": <any, optional>}``."""
    if not isinstance(value, dict):
        raise BadRequest('an rpc request must be an object {"method": ..., "params": ...}')
    method = value.get("method")
    if not isinstance(method, str) or not method:
        raise BadRequest("an rpc request needs a 'method': a non-empty string")
    if len(method) > MAX_METHOD:
        raise BadRequest(f"'method' is longer than {MAX_METHOD} characters")
    if not method.isprintable():
        raise BadRequest("'method' must be printable characters")
    fmt = _CBOR if accept == _CBOR else _JSON
    return CallServer(owner, device_id, method, value.get("params"), fmt)


def requested(
    call: CallServer, request_id: str, timeout_ms: int, source: str, now: datetime
) -> AnyEvent:
    """The ``rpc-requested`` event of a call (``request_id``: a fresh UUID, also its id)."""
    return Event(
        owner=call.owner,
        device_id=call.device_id,
        data=RpcRequested(
            request_id=request_id,
            method=call.method,
            params=call.params,
            timeout_ms=timeout_ms,
        ),
        source=source,
        id=request_id,
        time=now,
        correlation_id=request_id,
    )


def answer_filter(call: CallServer, request_id: str) -> str:
    """The subject of the answer to one request."""
    return subjects.event_filter(call.owner, call.device_id, RpcAnswered.KIND, request_id)


def answer_in(events: Iterable[AnyEvent], request_id: str) -> RpcAnswered | None:
    """The first answer to ``request_id`` among ``events`` (log order), or None."""
    for e in events:
        if isinstance(e.data, RpcAnswered) and e.data.request_id == request_id:
            return e.data
    return None


def answer_payload(call: CallServer, answer: RpcAnswered) -> tuple[bytes, int]:
    """The body of the 2.05 (:data:`ANSWERED`) that carries the answer, and its content
    format: the result as JSON, or CBOR when the device asked for it (Accept: 60)."""
    return codecs.encode(answer.result, call.accept), call.accept


class WaitSlots:
    """How many devices may wait for an answer at once in one gateway (each holds a
    subscription and a pending CoAP exchange); past that, a call is :data:`BUSY`."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("limit must be >= 1")
        self.limit = limit
        self.taken = 0

    def take(self) -> bool:
        """Take a slot (True), or none is free (False)."""
        if self.taken >= self.limit:
            return False
        self.taken += 1
        return True

    def release(self) -> None:
        self.taken = max(0, self.taken - 1)

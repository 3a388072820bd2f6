"""What the layers of one device session share (:mod:`gateway.session`): who the connection is
signed in as, the phase, the refs, and the appends waiting for the log.

Each layer keeps its own state; this is the little they all read. An append's follow-up is
held here (:class:`Pending`) because its answer (``AppendResult``) comes back to the session,
which hands it to the layer the step names.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from auth.tokens import Claims, TokenIssuer, TokenValidator
from gateway import ocf
from gateway.errors import GatewayError, Unauthorized, coap_code
from gateway.session_io import (
    OCF_CBOR,
    REPLY_FORMATS,
    Append,
    Close,
    DeviceRequest,
    Effect,
    Phase,
    Respond,
    SessionConfig,
    Step,
)
from proto import codecs
from proto.events import AnyEvent, Event, EventData


@dataclass(frozen=True, slots=True)
class OwnerCheck:
    """A sign-up / sign-in / sign-off waiting for the device's owner from the log."""

    step: Step  # SIGN_UP, SIGN_IN or SIGN_OFF
    req: DeviceRequest
    claims: Claims
    device_id: str
    sign_up: ocf.SignUp | None = None
    attempt: int = 1  # a sign-up whose registration lost a race checks again, a few times


@dataclass(slots=True)
class Pending:
    """What to do when an append is acknowledged."""

    on_ok: list[Effect]
    on_fail: list[Effect]
    then: Step = Step.NONE  # the follow-up step
    cache: tuple[str, Respond] | None = None  # sign-up answer to remember once recorded
    on_conflict: OwnerCheck | None = None  # a registration raced: check the owner again


class SessionCore:
    """The shared state and helpers of a session's layers."""

    def __init__(
        self, config: SessionConfig, validator: TokenValidator, issuer: TokenIssuer
    ) -> None:
        self.config = config
        self.validator = validator
        self.issuer = issuer
        self.phase = Phase.CONNECTED
        self.device_id: str | None = None
        self.owner: str | None = None
        self._refs = itertools.count(1)
        self.pending: dict[int, Pending] = {}

    def ref(self) -> int:
        return next(self._refs)

    def event(
        self, data: EventData, device_id: str | None = None, owner: str | None = None
    ) -> AnyEvent:
        dev = device_id or self.device_id
        own = owner or self.owner
        assert dev is not None
        assert own is not None
        return Event(owner=own, device_id=dev, data=data, source=self.config.source)

    def reply(self, req: DeviceRequest, code: str, value: Any = None) -> Respond:
        cf = REPLY_FORMATS.get(req.content_format or req.accept or OCF_CBOR, OCF_CBOR)
        if req.accept in REPLY_FORMATS:
            cf = req.accept
        if value is None:
            return Respond(req.rid, code)
        return Respond(req.rid, code, codecs.encode(value, cf), cf)

    def error(self, req: DeviceRequest, err: GatewayError, *, close: bool = False) -> list[Effect]:
        code = coap_code(err)
        out: list[Effect] = [Respond(req.rid, code, str(err).encode("utf-8")[:512], 0)]
        if close or isinstance(err, Unauthorized):
            out.append(Close(f"{code} {err}"))
            self.phase = Phase.CLOSED
        return out

    def append(
        self,
        events: list[AnyEvent],
        on_ok: list[Effect],
        on_fail: list[Effect],
        then: Step = Step.NONE,
        critical: bool = True,
        cache: tuple[str, Respond] | None = None,
    ) -> Append:
        ref = self.ref()
        self.pending[ref] = Pending(on_ok, on_fail, then, cache)
        return Append(ref, tuple(events), critical)


def expires_in(expires_at: float | None, now: float) -> int:
    return -1 if expires_at is None else max(0, int(expires_at - now))


UNAVAILABLE: bytes = b"event log unavailable"

"""Provisioning of simple devices as a sans-IO core: (request, caller, latest twin, the current
token record, a fresh token, now) -> a decision.

Simple devices (ThingsBoard's device API, PRODUCT.md 4.2) authenticate with an access token in
the URL. The command API creates them (``provision-device``), revokes their token
(``revoke-device-token``) and gives them a new one (``rotate-device-token``), for the caller's
owner only. No awaiting, no clock, no randomness here: the driver (:mod:`twin.api`) generates
the token and the device id, reads the device's latest twin, the last position of
:func:`scope_for` (before the twin) and the registry record of the twin's current token, and
calls :func:`decide`. The decision is an :class:`~twin.commands.Answer` or a :class:`TokenPlan`:
registry records to write (:class:`RegistryWrite`, each conditional on the record it replaces),
then one event to append conditionally, then the reply.

**Order: the registry first, then the event.** The token works (the gateway accepts it) as soon
as its active record exists, and it is handed out only in the reply, after the event is in the
log. So whatever a crash cuts short, no caller holds a token the log does not know of:

* a crash after the record and before the event leaves an active record of a token nobody ever
  got (192 random bits, never logged): harmless, and the device id stays free. The driver revokes
  such a record itself when the event cannot be appended (a racing provisioning of the same id
  won, or the log stayed unavailable); only a crash leaves one behind. The gateway need not know
  of the twin to refuse it: nobody can present the token.
* for a rotation, a crash after the new record leaves the old token working and the device's
  twin unchanged (the new token is never shown); a crash after the old one's revocation leaves
  the device without a working token until the rotation is asked again, which then revokes
  nothing more and records the event.
* for a revocation, the token stops working at the record; a crash before the event leaves the
  twin showing the hash of a revoked token until the revocation is asked again (it writes no
  record then, only the event).

Writing the event first would be the other way round: a twin (and a reply) for a token the
gateway refuses, or a revoked token the gateway still accepts. The registry decides what the
gateway accepts, so it goes first for revocations, and a token is shown only once both are
written.

Concurrency. ``provision-device`` appends conditionally on every event of the device id, for any
owner (:func:`proto.subjects.device_scope`, expected: what the check saw): of two racing
provisionings of one id one is recorded, the other is decided again and answered ``conflict``
(and its record revoked by the driver). A token's records are written conditionally on the
record they replace, and ``revoke``/``rotate`` append conditionally on the device's
``device-token-changed`` events: two racing rotations end with the last one's token and every
other revoked. Event ids are derived from what the decision saw, so a retried append is
deduplicated.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final, Literal

import msgspec

from proto import api, subjects
from proto.devtokens import TokenRecord, token_hash, token_id
from proto.events import AnyEvent, DeviceProvisioned, DeviceTokenChanged, Event
from twin.commands import API_SOURCE, Answer, Record, error, ok, validate
from twin.model import SIMPLE_PROFILE, Twin
from twin.ports import TokenEntry

__all__ = [
    "MAX_NAME",
    "RegistryWrite",
    "TokenPlan",
    "TokenRequest",
    "decide",
    "orphan_revocation",
    "scope_for",
    "validate_request",
]

MAX_NAME: Final = 256
_IDS: Final = uuid.UUID("0b5f3f5e-62a4-4c57-9d8b-6a0f2d6c1e43")  # namespace of derived ids
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)

TokenRequest = api.ProvisionDevice | api.RevokeDeviceToken | api.RotateDeviceToken


@dataclass(frozen=True, slots=True)
class RegistryWrite:
    """Write ``record`` as the token ``hashed``'s, if its current one is at ``expected_last``
    (0: it has none)."""

    hashed: str
    record: TokenRecord
    expected_last: int


@dataclass(frozen=True, slots=True)
class TokenPlan:
    """Write ``writes`` in order, then ``record`` (its event, its reply). ``issued``: the hash
    of the token the reply hands out ("" for a revocation): if the event cannot be recorded,
    its active record is revoked again (:func:`orphan_revocation`)."""

    writes: tuple[RegistryWrite, ...]
    record: Record
    issued: str = ""


def _ms(t: datetime) -> int:
    return (t - _EPOCH) // timedelta(milliseconds=1)


def _derived_id(*parts: object) -> str:
    return str(uuid.uuid5(_IDS, "\n".join(map(str, parts))))


def validate_request(request: TokenRequest) -> str | None:
    """What is wrong with a decoded request (``None``: nothing)."""
    problems: list[str] = []
    if (p := validate(request)) is not None:  # the device id, as every operation checks it
        problems.append(p)
    if isinstance(request, api.ProvisionDevice):
        if len(request.name) > MAX_NAME:
            problems.append(f"name must be at most {MAX_NAME} characters")
        elif not request.name.isprintable():
            problems.append("name must be printable")
    return "; ".join(problems) or None


def scope_for(request: TokenRequest, owner: str, device_id: str) -> str:
    """The subjects whose last position must not move between the check and the append."""
    if isinstance(request, api.ProvisionDevice):
        return subjects.device_scope(device_id)
    return subjects.event_filter(owner, device_id, DeviceTokenChanged.KIND)


def orphan_revocation(
    hashed: str, record: TokenRecord, position: int, now: datetime
) -> RegistryWrite:
    """The write that revokes a token's record written at ``position`` whose event was never
    recorded (so the token was never handed out)."""
    return RegistryWrite(
        hashed=hashed,
        record=msgspec.structs.replace(record, state="revoked", issued_at_ms=_ms(now)),
        expected_last=position,
    )


def decide(
    request: TokenRequest,
    owner: str,
    twin: Twin | None,
    now: datetime,
    *,
    device_id: str,
    token: str | None,
    current: TokenEntry | None = None,
    caller: str = "",
    expected_last: int = 0,
) -> Answer | TokenPlan:
    """Decide a provisioning request for ``device_id`` (the request's, or the one the driver
    made up). ``token``: the fresh token to hand out (``provision``, ``rotate``); ``current``:
    the registry entry of ``twin.token_hash``, if it has one; ``expected_last``: the last
    position in :func:`scope_for`, read before ``twin``."""
    problem = validate_request(request)
    if problem is not None:
        return Answer(error("bad_request", problem))
    if isinstance(request, api.ProvisionDevice):
        assert token is not None
        return _provision(request, owner, twin, now, device_id, token, caller, expected_last)
    if twin is None or (twin.deleted and twin.owner == owner):
        return Answer(error("not_found", f"no device {device_id!r}"))
    if twin.owner != owner:
        return Answer(error("forbidden", f"device {device_id!r} belongs to another owner"))
    if not twin.simple:
        return Answer(error("bad_request", f"device {device_id!r} has no access token (OCF)"))
    if isinstance(request, api.RevokeDeviceToken):
        return _revoke(twin, now, current, caller, expected_last)
    assert token is not None
    return _rotate(twin, now, token, current, caller, expected_last)


def _record(owner: str, twin_or_id: Twin | str, now: datetime, profile: str) -> TokenRecord:
    device_id = twin_or_id if isinstance(twin_or_id, str) else twin_or_id.device_id
    return TokenRecord(owner=owner, device_id=device_id, profile=profile, issued_at_ms=_ms(now))


def _provision(
    request: api.ProvisionDevice,
    owner: str,
    twin: Twin | None,
    now: datetime,
    device_id: str,
    token: str,
    caller: str,
    expected_last: int,
) -> Answer | TokenPlan:
    if twin is not None:
        if twin.owner == owner and twin.simple and not twin.deleted:
            return Answer(
                error(
                    "conflict",
                    f"device {device_id!r} exists; rotate its token for a new one "
                    "(rotate-device-token)",
                )
            )
        return Answer(error("conflict", f"device id {device_id!r} is in use"))
    hashed = token_hash(token)
    event: AnyEvent = Event(
        owner=owner,
        device_id=device_id,
        data=DeviceProvisioned(
            profile=SIMPLE_PROFILE,
            name=request.name,
            token_hash=hashed,
            provisioned_by=caller or owner,
        ),
        source=API_SOURCE,
        id=_derived_id("provisioned", owner, device_id, hashed, expected_last),
        time=now,
    )

    def reply(positions: Sequence[int]) -> api.Reply:
        return ok(
            api.DeviceTokenIssued(
                device_id=device_id, token=token, token_id=token_id(token), position=positions[0]
            )
        )

    write = RegistryWrite(hashed, _record(owner, device_id, now, SIMPLE_PROFILE), 0)
    scope = subjects.device_scope(device_id)
    return TokenPlan(
        (write,), Record((event,), reply, scope=scope, expected_last=expected_last), hashed
    )


def _revocation(twin: Twin, now: datetime, current: TokenEntry | None) -> tuple[RegistryWrite, ...]:
    """The write that revokes the twin's current token (none if its record says so already)."""
    if not twin.token_hash:
        return ()
    if current is None:  # no record (the registry lost it): write a revoked one all the same
        record = msgspec.structs.replace(
            _record(twin.owner, twin, now, twin.profile), state="revoked"
        )
        return (RegistryWrite(twin.token_hash, record, 0),)
    if current.record.state == "revoked":
        return ()
    revoked = msgspec.structs.replace(current.record, state="revoked", issued_at_ms=_ms(now))
    return (RegistryWrite(twin.token_hash, revoked, current.position),)


def _token_changed(
    twin: Twin, now: datetime, new_hash: str, caller: str, expected_last: int
) -> AnyEvent:
    reason: Literal["rotated", "revoked"] = "rotated" if new_hash else "revoked"
    return Event(
        owner=twin.owner,
        device_id=twin.device_id,
        data=DeviceTokenChanged(
            token_hash=new_hash,
            previous_token_hash=twin.token_hash,
            reason=reason,
            changed_by=caller or twin.owner,
        ),
        source=API_SOURCE,
        id=_derived_id("token-changed", twin.device_id, new_hash, twin.token_hash, expected_last),
        time=now,
    )


def _revoke(
    twin: Twin, now: datetime, current: TokenEntry | None, caller: str, expected_last: int
) -> Answer | TokenPlan:
    if not twin.token_hash:  # revoked already: nothing to do
        return Answer(ok(api.DeviceTokenRevoked(device_id=twin.device_id)))
    revoked = twin.token_hash

    def reply(positions: Sequence[int]) -> api.Reply:
        return ok(
            api.DeviceTokenRevoked(
                device_id=twin.device_id,
                token_id=token_id(revoked, hashed=True),
                position=positions[0],
            )
        )

    event = _token_changed(twin, now, "", caller, expected_last)
    scope = subjects.event_filter(twin.owner, twin.device_id, DeviceTokenChanged.KIND)
    return TokenPlan(
        _revocation(twin, now, current),
        Record((event,), reply, scope=scope, expected_last=expected_last),
    )


def _rotate(
    twin: Twin,
    now: datetime,
    token: str,
    current: TokenEntry | None,
    caller: str,
    expected_last: int,
) -> TokenPlan:
    hashed = token_hash(token)

    def reply(positions: Sequence[int]) -> api.Reply:
        return ok(
            api.DeviceTokenIssued(
                device_id=twin.device_id,
                token=token,
                token_id=token_id(token),
                position=positions[0],
            )
        )

    new = RegistryWrite(hashed, _record(twin.owner, twin, now, twin.profile), 0)
    event = _token_changed(twin, now, hashed, caller, expected_last)
    scope = subjects.event_filter(twin.owner, twin.device_id, DeviceTokenChanged.KIND)
    return TokenPlan(
        (new, *_revocation(twin, now, current)),
        Record((event,), reply, scope=scope, expected_last=expected_last),
        hashed,
    )

"""The command API's driver: decode, authenticate, load the latest state, decide, record, reply.

:class:`TwinApi` does the I/O around the sans-IO core :mod:`twin.commands` through the ports
only (:class:`~eventstore.ports.EventStore`, :class:`~twin.ports.TwinStore`) and an injected
token validator, so it runs the same over the in-memory adapters in unit tests and over
JetStream + MongoDB in production. The transport (NATS request/reply) is
:mod:`twin.adapters.nats_api`.

Every request gets a reply: a typed error for anything that goes wrong (``unavailable`` while
the log or the store cannot be reached, ``internal`` for a bug, logged), never an exception.

The injected :class:`~auth.tokens.TokenValidator` decides which tokens may call: in production
the application-token rules of :mod:`auth.application` (no device token, no refresh token, an
``exp`` required, a bounded lifetime), which the NATS auth callout applies too. A refusal
(:class:`~auth.errors.AuthError`) is ``unauthorized``. Tokens signed by a key the validator
does not know yet (a key rotated at a JWKS URL) are not refused at once: the injected
:class:`KeyRefresh` refreshes the keys (at the key source's bounded rate) and the token is
validated once more, as the gateway does for devices.

The latest twin of a device (:func:`latest_twin`) is the stored twin with the device's log tail
folded onto it: the store lags the log by the projector's batch, and a duplicate correlation
id or a cancel must see the command accepted a moment ago. The tail read is one
``last_position`` on the device's subjects when the store is up to date.

A command request reads what the device knows of its correlation id
(:func:`latest_command`): the stored twin with at most that open command, the ended command of
that id the store remembers, and the log tail folded onto both, so a command recorded a moment
ago (the twin that recorded it may have died before it replied), or ended a moment ago, is
found; :func:`twin.commands.decide` then answers a repeat with the original acceptance. An
append that the log reports as a
duplicate of an append this driver did not retry itself was another request's (the same
request, racing): it is decided again, and answered as that command's repeat.

The provisioning operations of simple devices (``provision-device``, ``revoke-device-token``,
``rotate-device-token``) are decided by :mod:`twin.provisioning` and write the injected
:class:`~twin.ports.TokenRegistry` before the log (why, and what a crash leaves: that module's
docstring). Without a registry they answer ``unavailable``. The token is generated here (the
injected ``new_token``), handed out in the reply only, and never logged.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final, Protocol

from auth.errors import AuthError
from auth.tokens import Claims, TokenValidator
from eventstore.errors import (
    ConcurrencyError,
    EventStoreError,
    InvalidAppendError,
    UnavailableError,
)
from eventstore.ports import AppendResult, EventStore
from proto import api, binding, devtokens, subjects
from proto.errors import BindingError
from proto.events import AnyEvent
from twin import clientrpc, commands, provisioning
from twin.commands import Answer, Record, error
from twin.errors import StoreUnavailableError, TwinStoreError
from twin.fold import fold
from twin.model import EndedCommand, Twin
from twin.ports import TokenRegistry, TwinStore

__all__ = ["ApiConfig", "KeyRefresh", "TwinApi", "latest_command", "latest_twin"]

log = logging.getLogger(__name__)

MAX_DECISIONS: Final = 8  # conditional appends refused this often: give up with "unavailable"


class KeyRefresh(Protocol):
    """Called with the error of a refused token; refreshes the validator's keys (a JWKS) when
    the error says its signing key is unknown and returns True, so the token is validated once
    more; False for any other error. Injected by the composition root, which knows the
    validator's key source; the source bounds how often it fetches."""

    async def __call__(self, error: Exception) -> bool: ...


@dataclass(frozen=True, slots=True)
class ApiConfig:
    """``projector`` names the checkpoint that ``devices-list`` reports as its position.
    ``append_timeout``: how long an append is retried (same ids) while the log is unavailable."""

    projector: str = "twin-projector"
    append_timeout: float = 5.0
    retry_initial: float = 0.05
    # the secret each owner's consumer-name key is derived from (``session``); None: the
    # operation answers ``unavailable``
    consumer_secret: bytes | None = None


def owner_consumer_key(secret: bytes, owner: str) -> bytes:
    """The key that names ``owner``'s durable consumers: a keyed hash of the owner, so every
    token of that owner gets the same key and no other owner can compute it."""
    return hmac.new(secret, b"twinhub consumer names\0" + owner.encode(), hashlib.sha256).digest()


async def latest_twin(twins: TwinStore, events: EventStore, device_id: str) -> Twin | None:
    """The stored twin of ``device_id`` with its newer events of the log folded onto it (the
    twin this process wrote last, when it remembers one: no read)."""
    twin = twins.recently_written(device_id) or await twins.get(device_id)
    async for event in _tail(events, device_id, 0 if twin is None else twin.position):
        twin = fold(twin, event)
    return twin


async def latest_command(
    twins: TwinStore, events: EventStore, device_id: str, correlation_id: str
) -> tuple[Twin | None, EndedCommand | None]:
    """What a command request needs, whatever the device's queue holds: the latest twin with
    at most the open command ``correlation_id`` (``""``: none), and the newest command of that
    id that ended, if the store remembers one or the log tail ended it."""
    twin = twins.recently_written(device_id)  # this process wrote it: no read
    if twin is not None:
        ended = await twins.ended_command(device_id, correlation_id) if correlation_id else None
    elif correlation_id:
        twin, ended = await asyncio.gather(
            twins.get_for_command(device_id, correlation_id),
            twins.ended_command(device_id, correlation_id),
        )
    else:
        twin, ended = await twins.get_for_command(device_id, correlation_id), None
    async for event in _tail(events, device_id, 0 if twin is None else twin.position):
        before, twin = twin, fold(twin, event)
        if event.correlation_id == correlation_id:
            ended = EndedCommand.between(before, twin, correlation_id) or ended
    return twin, ended


async def _tail(events: EventStore, device_id: str, after: int) -> AsyncIterator[AnyEvent]:
    async for stored in events.read(subjects.device_scope(device_id), after=after):
        try:
            yield binding.from_stored(stored)
        except BindingError as e:
            log.warning("skipping undecodable event at %d: %s", stored.position, e)


class TwinApi:
    """Answers API requests (see the module docstring). Safe to call concurrently."""

    def __init__(
        self,
        events: EventStore,
        twins: TwinStore,
        validator: TokenValidator,
        config: ApiConfig | None = None,
        *,
        clock: Callable[[], float] = time.time,
        refresh_keys: KeyRefresh | None = None,
        tokens: TokenRegistry | None = None,
        new_token: Callable[[], str] = devtokens.new_token,
        new_device_id: Callable[[], str] = lambda: str(uuid.uuid4()),
    ) -> None:
        self._events = events
        self._twins = twins
        self._validator = validator
        self.config = config or ApiConfig()
        self._clock = clock
        self._refresh_keys = refresh_keys
        self._tokens = tokens
        self._new_token = new_token
        self._new_device_id = new_device_id

    async def handle(self, op: str, body: bytes, token: str | None) -> api.Reply:
        """The reply to one request of operation ``op`` (the subject's last token)."""
        return await self._guarded(op, self._answer(op, body, token))

    async def provision_as(self, owner: str, by: str, request: api.ProvisionDevice) -> api.Reply:
        """``provision-device`` for ``owner`` without a caller's token, recorded as done by
        ``by``: self-provisioning (:mod:`twin.selfprovision`), whose profile checked the
        device's secret. Errors are replies, as :meth:`handle`'s."""
        caller = Claims(owner=owner, device_id=None, expires_at=None, raw={"sub": by})
        now = datetime.fromtimestamp(self._clock(), UTC)
        return await self._guarded(request.OP, self._provisioning(request, caller, now))

    async def _guarded(self, op: str, answer: Awaitable[api.Reply]) -> api.Reply:
        try:
            return await answer
        except (UnavailableError, StoreUnavailableError) as e:
            log.warning("%s: unavailable: %s", op, e)
            return error("unavailable", str(e))
        except (EventStoreError, TwinStoreError) as e:
            log.error("%s: %s", op, e)
            return error("unavailable", str(e))
        except Exception:
            log.exception("%s: failed", op)
            return error("internal", "internal error (logged)")

    async def _answer(self, op: str, body: bytes, token: str | None) -> api.Reply:
        try:
            request = api.decode_request(op, body)
        except api.ApiDecodeError as e:
            return error("bad_request", str(e))
        if token is None:
            return error("unauthorized", "missing bearer token (Authorization header)")
        now = self._clock()
        try:
            caller = await self._caller(token, now)
        except AuthError as e:
            return error("unauthorized", f"invalid token: {e}")
        return await self._handle(request, caller, now)

    async def _session(self, caller: Claims) -> api.Reply:
        secret = self.config.consumer_secret
        if secret is None:
            return error("unavailable", "this twin service has no consumer key configured")
        owner = caller.owner
        events = subjects.event_filter(owner)
        return commands.ok(
            api.SessionInfo(
                owner=owner,
                events=events,
                inbox_prefix=subjects.owner_inbox_prefix(owner),
                consumer_key=owner_consumer_key(secret, owner).hex(),
                position=await self._events.last_position(events),
                expires_at=caller.expires_at,
            )
        )

    async def _caller(self, token: str, now: float) -> Claims:
        try:
            return self._validator.validate(token, now)
        except AuthError as e:
            if self._refresh_keys is None:
                raise
            try:
                refreshed = await self._refresh_keys(e)
            except Exception as refresh_error:  # the retry fails with the first error
                log.warning("refreshing the token keys failed: %s", refresh_error)
                refreshed = True
            if not refreshed:
                raise
        return self._validator.validate(token, now)  # once: the gateway does the same

    async def _handle(self, request: api.ApiRequest, caller: Claims, now_s: float) -> api.Reply:
        now = datetime.fromtimestamp(now_s, UTC)
        owner = caller.owner
        match request:
            case api.GetSession():
                return await self._session(caller)
            case api.ProvisionDevice() | api.RevokeDeviceToken() | api.RotateDeviceToken():
                return await self._provisioning(request, caller, now)
            case api.AnswerClientRpc():
                return await self._answer_rpc(request, owner, now)
            case api.ListDevices():
                return await self._list_devices(request, owner)
            case api.ListPending() if request.device_id is None:
                return await self._list_pending(request, owner)
            case api.ListPending():
                problem = commands.validate(request)
                if problem is not None:
                    return error("bad_request", problem)
                assert request.device_id is not None
                twin = await latest_twin(self._twins, self._events, request.device_id)
                if twin is None:
                    return error("not_found", f"no device {request.device_id!r}")
                if twin.owner != owner:
                    return error("forbidden", "device belongs to another owner")
                return commands.pending_list(request, owner, [twin])
        problem = commands.validate(request)
        if problem is not None:
            return error("bad_request", problem)
        scope = commands.scope_for(request, owner)
        for _ in range(MAX_DECISIONS):
            expected = None if scope is None else await self._events.last_position(scope)
            ended: EndedCommand | None = None
            if isinstance(request, commands.CommandRequest):
                twin, ended = await latest_command(
                    self._twins, self._events, request.device_id, request.correlation_id or ""
                )
            else:
                twin = await latest_twin(self._twins, self._events, request.device_id)
            decision = commands.decide(
                request, owner, twin, now, caller=owner, expected_last=expected, ended=ended
            )
            if isinstance(decision, Answer):
                return decision.reply
            try:
                result, retried = await self._append(decision)
            except ConcurrencyError:
                log.debug("%s on %s: state moved, deciding again", request.OP, request.device_id)
                continue
            if result.all_duplicates and not retried:
                # Another request recorded these very events first (the same request, sent
                # again while this one was under way): answer as its repeat.
                log.debug("%s on %s: recorded by another request", request.OP, request.device_id)
                continue
            return decision.reply(result.positions)
        return error("unavailable", "too many concurrent changes to this device; retry")

    async def _answer_rpc(
        self, request: api.AnswerClientRpc, owner: str, now: datetime
    ) -> api.Reply:
        """``answer-rpc`` (:mod:`twin.clientrpc`): the request's events read by subject, the
        answer appended only while its subject is still empty."""
        problem = clientrpc.problem(request)
        if problem is not None:
            return error("bad_request", problem)
        answered_scope = clientrpc.answered_scope(owner, request)
        for _ in range(MAX_DECISIONS):
            expected = await self._events.last_position(answered_scope)
            requested = await self._last_event(clientrpc.requested_scope(owner, request))
            answered = await self._last_event(answered_scope) if expected else None
            decision = clientrpc.decide(
                request, owner, requested, answered, now, expected_last=expected
            )
            if isinstance(decision, Answer):
                return decision.reply
            try:
                result, retried = await self._append(decision)
            except ConcurrencyError:
                log.debug("answer-rpc %s: answered meanwhile, deciding again", request.request_id)
                continue
            if result.all_duplicates and not retried:
                continue  # another request recorded this very answer first: decide again
            return decision.reply(result.positions)
        return error("unavailable", "too many concurrent answers to this request; retry")

    async def _last_event(self, scope: str) -> AnyEvent | None:
        stored = await self._events.last_message(scope)
        if stored is None:
            return None
        try:
            return binding.from_stored(stored)
        except BindingError as e:
            log.warning("undecodable event at %d: %s", stored.position, e)
            return None

    async def _provisioning(
        self, request: provisioning.TokenRequest, caller: Claims, now: datetime
    ) -> api.Reply:
        registry = self._tokens
        if registry is None:
            return error("unavailable", "this twin service has no device-token registry")
        problem = provisioning.validate_request(request)
        if problem is not None:
            return error("bad_request", problem)
        owner = caller.owner
        by = caller.raw.get("sub")
        device_id = request.device_id or self._new_device_id()
        token = None if isinstance(request, api.RevokeDeviceToken) else self._new_token()
        # the active record of the token to hand out, once written, until its event is
        # recorded: revoked again if it never is (a racing provisioning won, the log failed)
        orphan: tuple[provisioning.RegistryWrite, int] | None = None
        try:
            for _ in range(MAX_DECISIONS):
                scope = provisioning.scope_for(request, owner, device_id)
                expected = await self._events.last_position(scope)
                twin = await latest_twin(self._twins, self._events, device_id)
                current = None
                if twin is not None and twin.token_hash and twin.owner == owner:
                    current = await registry.get(twin.token_hash)
                decision = provisioning.decide(
                    request,
                    owner,
                    twin,
                    now,
                    device_id=device_id,
                    token=token,
                    current=current,
                    caller=by if isinstance(by, str) and by else owner,
                    expected_last=expected,
                )
                if isinstance(decision, Answer):
                    return decision.reply
                try:
                    for write in decision.writes:
                        position = await registry.put(
                            write.hashed, write.record, expected_last=write.expected_last
                        )
                        if write.hashed == decision.issued:
                            orphan = (write, position)
                    result, _ = await self._append(decision.record)
                except ConcurrencyError:
                    log.debug("%s on %s: state moved, deciding again", request.OP, device_id)
                    continue
                orphan = None  # recorded: the token is the device's now
                return decision.record.reply(result.positions)
            return error("unavailable", "too many concurrent changes to this device; retry")
        finally:
            if orphan is not None:
                await self._revoke_orphan(registry, *orphan, now)

    async def _revoke_orphan(
        self,
        registry: TokenRegistry,
        write: provisioning.RegistryWrite,
        position: int,
        now: datetime,
    ) -> None:
        undo = provisioning.orphan_revocation(write.hashed, write.record, position, now)
        name = devtokens.token_id(write.hashed, hashed=True)
        try:
            await registry.put(undo.hashed, undo.record, expected_last=undo.expected_last)
        except Exception as e:  # best effort: nobody ever got this token
            log.warning("could not revoke unused token %s: %s", name, e)
        else:
            log.info("revoked unused token %s of device %s", name, write.record.device_id)

    async def _append(self, record: Record) -> tuple[AppendResult, bool]:
        """Append, retrying with the same ids (deduplicated) while the log is unavailable;
        whether it retried (a duplicate may then be its own first attempt)."""
        messages = [binding.to_nats(e) for e in record.events]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.append_timeout
        delay = self.config.retry_initial
        retried = False
        while True:
            try:
                if record.scope is None:
                    return await self._events.append(messages), retried
                result = await self._events.append(
                    messages, expected_last=record.expected_last or 0, scope=record.scope
                )
                return result, retried
            except UnavailableError:
                if loop.time() + delay > deadline:
                    raise
                retried = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
            except InvalidAppendError as e:
                raise EventStoreError(f"append refused: {e}") from e

    async def _list_devices(self, request: api.ListDevices, owner: str) -> api.Reply:
        problem = commands.validate(request)
        if problem is not None:
            return error("bad_request", problem)
        # The checkpoint first: every event up to it is in every twin read afterwards.
        position = await self._twins.checkpoint(self.config.projector)
        found = await self._twins.find(
            owner=owner,
            online=request.online,
            resource_type=request.resource_type,
            limit=request.limit,
            after_id=request.after_id,
        )
        return commands.device_list(found, position, request.limit)

    async def _list_pending(self, request: api.ListPending, owner: str) -> api.Reply:
        problem = commands.validate(request)
        if problem is not None:
            return error("bad_request", problem)
        found = await self._twins.find(
            owner=owner, has_pending=True, include_deleted=True, limit=request.limit
        )
        return commands.pending_list(request, owner, found)

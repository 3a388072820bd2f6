"""The Python client of twinhub: commands, desired state and queries over the command API
(NATS request/reply), and gap-free event subscriptions (JetStream).

::

    async with TwinhubClient("nats://127.0.0.1:4222", token) as th:
        accepted = await th.update(device, "/light/1", {"value": True}, ttl=30)
        outcome = await th.update(device, "/light/1", {"value": False}, wait=True)
        twin, position = await th.get_twin(device)
        async with th.subscribe(owner, device, from_position=position) as events:
            async for event in events:
                ...

The token is also the NATS connection token: the bus's auth callout admits the connection as
an application of the token's owner (docs/architecture.md, "The bus"). Such a connection
receives replies only under ``_INBOX.<owner>``, so the client reads the owner from the token
(claim ``owner_claim``, unverified: the server verifies it) to name its inbox, and asks the
command API (``session``) for the rest: the owner's consumer-name key and the log position
subscriptions "from now" start after. It reaches JetStream only under
:data:`proto.api.APP_JS_PREFIX`, for consumers of its owner's events.

Commands are safe to send again: each carries a correlation id (the caller's, else one the
client makes up), and the service answers a request repeating one with the original
acceptance, never a second command (:mod:`proto.api`). So a command that gets no answer in
``timeout`` (a lost reply, a twin instance that died after recording it), finds no service, or
is answered ``unavailable`` is sent again, unchanged, up to ``retries`` more times, after
``retry_delay`` seconds doubling each time (at most 2 s); then the error is raised. A command
is thus answered within ``(retries + 1) * timeout`` plus the delays (about 31 s by default).
Queries, desired state and the provisioning of simple devices are sent once.

Every API call carries the token (``Authorization: Bearer``); errors come back as the typed
exceptions of :mod:`twinhub_client.errors`. See :mod:`twinhub_client.subscription` for what a
subscription guarantees.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal, Self, TypeVar, overload

import jwt
import msgspec
import nats
import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.protocol.parser import AUTHORIZATION_VIOLATION

from eventstore.adapters.endpoint import ConnectionLog, NatsEndpoint
from eventstore.adapters.jetstream import JetStreamEventStore
from eventstore.errors import UnavailableError
from eventstore.layout import DEFAULT_STREAM, StreamLayout
from proto import api, subjects
from proto.api import (
    CancelResult,
    CommandAccepted,
    DesiredResult,
    DeviceList,
    DeviceTokenIssued,
    DeviceTokenRevoked,
    PendingCommand,
    PendingList,
    RpcAnswerRecorded,
    SessionInfo,
    TwinResult,
)
from proto.events import (
    EVENT_TYPES,
    KINDS,
    AnyEvent,
    CommandCanceled,
    CommandExpired,
    CommandFailed,
    CommandOp,
    CommandSucceeded,
    EventData,
    RpcRequested,
)
from twinhub_client.errors import (
    ForbiddenError,
    OutcomeTimeoutError,
    ServiceUnavailableError,
    TwinhubError,
    api_error,
)
from twinhub_client.subscription import EventSubscription

__all__ = ["OUTCOME_KINDS", "TwinhubClient", "consumer_name", "event_filters", "token_owner"]

log = logging.getLogger("twinhub_client")

OUTCOME_KINDS: Final = tuple(
    cls.KIND for cls in (CommandSucceeded, CommandFailed, CommandExpired, CommandCanceled)
)
_CONSUMER_NOT_FOUND: Final = 10014
_OUTCOME_MARGIN: Final = 35.0  # past the ttl: the sweeper's interval and the grace of a sent one

R = TypeVar("R")
EventKind = str | type[EventData]


def _kind(t: EventKind) -> str:
    if isinstance(t, type):
        return t.KIND
    if t in KINDS:
        return t
    cls = EVENT_TYPES.get(t)
    if cls is None:
        raise ValueError(f"unknown event type or kind {t!r}")
    return cls.KIND


def event_filters(
    owner: str | None,
    device: str | None = None,
    types: Iterable[EventKind] | None = None,
    href: str | None = None,
) -> tuple[str, ...]:
    """The subject filters of events: one per event kind (none: every kind)."""
    if types is None:
        return (subjects.event_filter(owner, device, None, href),)
    kinds = event_kinds(types)
    return tuple(subjects.event_filter(owner, device, k, href) for k in kinds)


def event_kinds(types: Iterable[EventKind]) -> tuple[str, ...]:
    """The kinds ``types`` names (classes, kinds or CloudEvents types), without repeats."""
    kinds = tuple(dict.fromkeys(_kind(t) for t in types))
    if not kinds:
        raise ValueError("types must name at least one event kind")
    return kinds


def _claims(token: str) -> dict[str, Any]:
    """A token's claims, read without verifying it (the server does that); ``ValueError`` for
    something that is not a JWT."""
    try:
        claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError as e:
        raise ValueError(f"not a JWT: {e}") from None
    return claims


def token_owner(token: str, owner_claim: str = "sub") -> str:
    """The owner a token names (``owner_claim``), read without verifying it: the server does
    that. Raises ``ValueError`` for something that is not a JWT with that claim."""
    owner = _claims(token).get(owner_claim)
    if not isinstance(owner, str) or not owner:
        raise ValueError(f"the token has no {owner_claim!r} claim")
    return owner


def _token_expiry(token: str) -> float | None:
    """The token's ``exp`` (unverified), None when it has none or is no JWT."""
    try:
        exp = _claims(token).get("exp")
    except ValueError:
        return None
    return float(exp) if isinstance(exp, int | float) else None


class _AppConnection(NatsClient):
    """nats-py's client, but an authorization refused on a connection that was admitted
    before is a reason to reconnect while the token is still valid, not to close for good.

    After a NATS restart the client may reconnect before the auth callout is back: the
    server then holds the CONNECT until its authorization timeout, pings meanwhile, and
    nats-py takes that ping for the end of the handshake; the refusal then arrives on a
    "connected" connection, which nats-py closes (no more reconnects). A valid token gets
    in as soon as a callout answers again; an expired one is refused as before."""

    def __init__(self, token: str) -> None:
        super().__init__()
        self._token_expiry = _token_expiry(token)
        self.refusals = 0  # refusals of the token after it had been admitted (each reconnected)

    async def _process_err(self, err_msg: str) -> None:
        refused = AUTHORIZATION_VIOLATION in err_msg.lower()
        valid = self._token_expiry is None or time.time() < self._token_expiry
        if refused and valid and self.is_connected:
            self.refusals += 1
            log.warning("NATS refused the token after a reconnect (no auth callout yet?): again")
            await self._process_op_err(nats.errors.AuthorizationError())
            return
        await super()._process_err(err_msg)


def consumer_name(key: bytes, durable: str) -> str:
    """The JetStream consumer name of durable subscription ``durable``: a keyed hash under the
    owner's consumer key (``session``), so other owners cannot guess it, and the same for
    every process of the owner, at every start."""
    digest = hmac.new(key, durable.encode(), hashlib.sha256).hexdigest()
    return f"app_{digest[:40]}"


class TwinhubClient:
    """A connection to twinhub for one caller (its token). An async context manager.

    ``nats_conn``: a URL (``nats://`` or ``tls://``, several comma-separated; the client
    connects with the token, reconnecting forever, and closes on exit), or a connected
    ``nats.aio.client.Client`` the caller owns (connected with ``token=`` and
    ``inbox_prefix=`` :func:`proto.subjects.owner_inbox_prefix` of the owner). ``ca_file``:
    the CA that verifies the server's TLS certificate. ``api_prefix``, ``js_prefix`` and
    ``stream`` name the command API, JetStream and the event stream (defaults: production);
    ``owner_claim`` the token's owner claim (the service's ``auth.owner_claim``). ``retries``
    and ``retry_delay``: how often and when a command without an answer is sent again (see the
    module docstring).
    """

    def __init__(
        self,
        nats_conn: str | NatsClient,
        token: str,
        *,
        ca_file: str | Path | None = None,
        api_prefix: str = api.API_PREFIX,
        js_prefix: str = api.APP_JS_PREFIX,
        stream: str = DEFAULT_STREAM,
        timeout: float = 10.0,
        owner_claim: str = "sub",
        retries: int = 2,
        retry_delay: float = 0.25,
    ) -> None:
        if retries < 0 or not retry_delay >= 0:
            raise ValueError("retries and retry_delay must be >= 0")
        self._endpoint: NatsEndpoint | None = None
        if isinstance(nats_conn, str):
            self._endpoint = NatsEndpoint(
                nats_conn,
                token=token,
                ca_file=None if ca_file is None else Path(ca_file),
                inbox_prefix=subjects.owner_inbox_prefix(token_owner(token, owner_claim)),
            )
        self._nc: NatsClient | None = None if isinstance(nats_conn, str) else nats_conn
        self._conn_log: ConnectionLog | None = None
        self.token = token
        self.owner_claim = owner_claim
        self.api_prefix = api_prefix
        self.js_prefix = js_prefix
        self._layout = StreamLayout(name=stream)
        self.timeout = timeout
        self.retries = retries
        self.retry_delay = retry_delay
        self._store: JetStreamEventStore | None = None
        self._session: SessionInfo | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._endpoint is not None:
            nc = _AppConnection(self.token)
            self._conn_log = ConnectionLog(nc, log, "client", str(self._endpoint))
            try:
                opts: dict[str, Any] = (
                    self._endpoint.connect_options()
                    | self._conn_log.callbacks()
                    | {
                        "name": "twinhub-client",
                        "max_reconnect_attempts": -1,
                        "reconnect_time_wait": 0.25,
                        "connect_timeout": self.timeout,
                        "allow_reconnect": True,
                    }
                )
                # nats-py retries a refused first connect forever with reconnects on: bounded
                # here (a refused token would hang the caller), reconnects stay unbounded
                async with asyncio.timeout(self.timeout):
                    await nc.connect(**opts)
                if not nc.is_connected:  # dropped in the handshake (no authorization answer)
                    raise nats.errors.NoServersError
                self._conn_log.connected()
                self._nc = nc
            except (OSError, nats.errors.Error) as e:
                self._conn_log.closing()
                with contextlib.suppress(nats.errors.Error, OSError):
                    await nc.close()  # a refused connect leaves its socket open otherwise
                # nats-py reports a refused authorization as a closed connection / timeout
                raise ServiceUnavailableError(
                    f"cannot connect to NATS at {self._endpoint} (is the token valid?): {e!r}"
                ) from e
        assert self._nc is not None
        store = JetStreamEventStore(
            self._nc, self._layout, timeout=self.timeout, api_prefix=self.js_prefix
        )
        try:
            await store.__aenter__()
        except UnavailableError as e:
            await self._close_nc()
            raise ServiceUnavailableError(str(e)) from e
        self._store = store
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        store, self._store = self._store, None
        if store is not None:
            await store.aclose()
        await self._close_nc()

    async def _close_nc(self) -> None:
        if self._endpoint is not None and self._nc is not None:
            nc, self._nc = self._nc, None
            if self._conn_log is not None:
                self._conn_log.closing()
            try:
                await nc.close()
            except (nats.errors.Error, OSError) as e:
                # e.g. flushing to a server that went away (ConnectionResetError)
                log.debug("closing NATS: %r", e)

    @property
    def nc(self) -> NatsClient:
        if self._nc is None:
            raise TwinhubError("TwinhubClient is not open: use `async with`")
        return self._nc

    @property
    def store(self) -> JetStreamEventStore:
        if self._store is None:
            raise TwinhubError("TwinhubClient is not open: use `async with`")
        return self._store

    # -- the API --------------------------------------------------------------------------------

    async def call(self, request: api.ApiRequest) -> Any:
        """Send one request; its result (builtins), or the typed error it was answered with."""
        subject = f"{self.api_prefix}.{request.OP}"
        try:
            msg = await self.nc.request(
                subject,
                api.encode_request(request),
                timeout=self.timeout,
                headers=api.bearer(self.token, deadline=time.time() + self.timeout),
            )
        except nats.errors.NoRespondersError as e:
            raise ServiceUnavailableError(f"no twin service answers on {subject}") from e
        except nats.errors.TimeoutError as e:
            raise ServiceUnavailableError(f"no answer on {subject} in {self.timeout:g}s") from e
        except (nats.errors.Error, OSError) as e:
            raise ServiceUnavailableError(f"request on {subject} failed: {e!r}") from e
        try:
            reply = api.decode_reply(msg.data)
        except api.ApiDecodeError as e:
            raise ServiceUnavailableError(f"unreadable reply on {subject}: {e}") from e
        if not reply.ok:
            err = reply.error
            if err is None:
                raise api_error("internal", "error reply without an error")
            raise api_error(err.code, err.message)
        return reply.result

    async def session(self) -> SessionInfo:
        """What the token is on the bus (owner, inbox, consumer key) and, fresh each call, the
        position of the owner's newest event."""
        info = await self._typed(api.GetSession(), SessionInfo)
        self._session = info
        return info

    async def owner(self) -> str:
        """The owner of the token (asked once)."""
        return (self._session or await self.session()).owner

    async def _log_head(self) -> int:
        try:
            return (await self.session()).position
        except ServiceUnavailableError as e:
            raise UnavailableError(str(e)) from e  # retried by the subscription

    async def _typed(self, request: api.ApiRequest, cls: type[R]) -> R:
        result = await self.call(request)
        try:
            return msgspec.convert(result, cls)
        except msgspec.ValidationError as e:
            raise ServiceUnavailableError(f"unexpected {request.OP} result: {e}") from e

    async def command(
        self,
        op: CommandOp,
        device: str,
        href: str,
        content: Any = None,
        *,
        ttl: float = api.DEFAULT_TTL,
        correlation_id: str | None = None,
        interface: str | None = None,
        max_attempts: int | None = None,
        content_b64: str | None = None,
        content_format: int | None = None,
        wait: bool = False,
        wait_timeout: float | None = None,
    ) -> CommandAccepted | AnyEvent:
        """Issue a command. Returns once it is recorded as pending (:class:`CommandAccepted`,
        with the log position); with ``wait=True`` returns its outcome event instead
        (succeeded / failed / expired / canceled), waiting up to ``wait_timeout`` seconds
        (default: the ttl plus a margin for the sweeper). :meth:`update`, :meth:`retrieve`,
        :meth:`create` and :meth:`delete` are typed shorthands.

        Without an answer it is sent again with the same ``correlation_id`` (generated when
        not given), so it is recorded once (see the module docstring). An id the device
        already knows gets that command's acceptance (``repeated``, with its ``state`` and
        ``outcome``; ``wait=True`` returns its outcome event) when the request is the same,
        :class:`~twinhub_client.errors.ConflictError` when it is not."""
        if correlation_id is None:
            correlation_id = str(uuid.uuid4())  # the same on every attempt: recorded once
        common: dict[str, Any] = {
            "device_id": device,
            "href": href,
            "ttl": ttl,
            "correlation_id": correlation_id,
            "interface": interface,
            "max_attempts": max_attempts,
        }
        request: api.ApiRequest
        if op in ("update", "create"):
            cls = api.UpdateResource if op == "update" else api.CreateResource
            request = cls(
                **common,
                content=content,
                content_b64=content_b64,
                content_format=content_format,
            )
        elif content is not None or content_b64 is not None:
            raise ValueError(f"{op} takes no content")
        elif op == "retrieve":
            request = api.RetrieveResource(**common)
        elif op == "delete":
            request = api.DeleteResource(**common)
        elif op == "rpc":
            raise ValueError("an rpc takes a method and params: call rpc()")
        else:
            raise ValueError(f"unknown command op {op!r}")
        accepted = await self._sent_until_answered(request)
        if not wait:
            return accepted
        return await self.wait_outcome(
            accepted, ttl + _OUTCOME_MARGIN if wait_timeout is None else wait_timeout
        )

    async def _sent_until_answered(self, request: api.ApiRequest) -> CommandAccepted:
        """The command's acceptance, sending the same request again while there is none."""
        delay = self.retry_delay
        for attempt in range(self.retries + 1):
            try:
                return await self._typed(request, CommandAccepted)
            except ServiceUnavailableError as e:
                if attempt == self.retries:
                    raise
                log.info(
                    "%s: %s; sending it again (%d of %d)", request.OP, e, attempt + 1, self.retries
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
        raise AssertionError("unreachable")  # pragma: no cover

    async def wait_outcome(self, accepted: CommandAccepted, timeout: float) -> AnyEvent:  # noqa: ASYNC109
        """The event that ended an accepted command (read from the log after its position)."""
        owner = await self.owner()
        filters = event_filters(owner, accepted.device_id, None, accepted.href)
        async with EventSubscription(
            self.store, filters, kinds=OUTCOME_KINDS, from_position=accepted.position, batch=16
        ) as sub:
            try:
                async with asyncio.timeout(timeout):
                    async for event in sub:
                        if event.correlation_id == accepted.correlation_id:
                            return event
            except TimeoutError as e:
                raise OutcomeTimeoutError(
                    f"no outcome of command {accepted.correlation_id} in {timeout:g}s"
                ) from e
        raise OutcomeTimeoutError("subscription ended")  # pragma: no cover

    @overload
    async def update(
        self, device: str, href: str, content: Any, *, wait: Literal[False] = ..., **kw: Any
    ) -> CommandAccepted: ...

    @overload
    async def update(
        self, device: str, href: str, content: Any, *, wait: Literal[True], **kw: Any
    ) -> AnyEvent: ...

    async def update(
        self, device: str, href: str, content: Any, *, wait: bool = False, **kw: Any
    ) -> CommandAccepted | AnyEvent:
        """Update a resource (CoAP POST). Keywords as :meth:`command`."""
        return await self.command("update", device, href, content, wait=wait, **kw)

    @overload
    async def create(
        self, device: str, href: str, content: Any, *, wait: Literal[False] = ..., **kw: Any
    ) -> CommandAccepted: ...

    @overload
    async def create(
        self, device: str, href: str, content: Any, *, wait: Literal[True], **kw: Any
    ) -> AnyEvent: ...

    async def create(
        self, device: str, href: str, content: Any, *, wait: bool = False, **kw: Any
    ) -> CommandAccepted | AnyEvent:
        """Create a resource in a collection (POST, ``if=oic.if.create``); see :meth:`command`."""
        return await self.command("create", device, href, content, wait=wait, **kw)

    @overload
    async def retrieve(
        self, device: str, href: str, *, wait: Literal[False] = ..., **kw: Any
    ) -> CommandAccepted: ...

    @overload
    async def retrieve(
        self, device: str, href: str, *, wait: Literal[True], **kw: Any
    ) -> AnyEvent: ...

    async def retrieve(
        self, device: str, href: str, *, wait: bool = False, **kw: Any
    ) -> CommandAccepted | AnyEvent:
        """Read a resource from the device (GET; its content comes in the outcome event)."""
        return await self.command("retrieve", device, href, wait=wait, **kw)

    @overload
    async def delete(
        self, device: str, href: str, *, wait: Literal[False] = ..., **kw: Any
    ) -> CommandAccepted: ...

    @overload
    async def delete(
        self, device: str, href: str, *, wait: Literal[True], **kw: Any
    ) -> AnyEvent: ...

    async def delete(
        self, device: str, href: str, *, wait: bool = False, **kw: Any
    ) -> CommandAccepted | AnyEvent:
        """Delete a resource (CoAP DELETE). Keywords as :meth:`command`."""
        return await self.command("delete", device, href, wait=wait, **kw)

    @overload
    async def rpc(
        self,
        device: str,
        method: str,
        params: Any = ...,
        *,
        ttl: float = ...,
        correlation_id: str | None = ...,
        max_attempts: int | None = ...,
        wait: Literal[False] = ...,
        wait_timeout: float | None = ...,
    ) -> CommandAccepted: ...

    @overload
    async def rpc(
        self,
        device: str,
        method: str,
        params: Any = ...,
        *,
        ttl: float = ...,
        correlation_id: str | None = ...,
        max_attempts: int | None = ...,
        wait: Literal[True],
        wait_timeout: float | None = ...,
    ) -> AnyEvent: ...

    async def rpc(
        self,
        device: str,
        method: str,
        params: Any = None,
        *,
        ttl: float = api.DEFAULT_TTL,
        correlation_id: str | None = None,
        max_attempts: int | None = None,
        wait: bool = False,
        wait_timeout: float | None = None,
    ) -> CommandAccepted | AnyEvent:
        """A server-side RPC to a simple device (ThingsBoard's device API): the device gets
        ``{"id": N, "method": method, "params": params}`` while it observes its ``rpc``
        resource, now or when it next does (in issue order); its answer is the ``content`` of
        the outcome (``command-succeeded``). The href of its events is
        :data:`proto.events.RPC_HREF`. Returns, retries and waits as :meth:`command`."""
        if correlation_id is None:
            correlation_id = str(uuid.uuid4())  # the same on every attempt: recorded once
        request = api.CallRpc(
            device_id=device,
            method=method,
            params=params,
            ttl=ttl,
            correlation_id=correlation_id,
            max_attempts=max_attempts,
        )
        accepted = await self._sent_until_answered(request)
        if not wait:
            return accepted
        return await self.wait_outcome(
            accepted, ttl + _OUTCOME_MARGIN if wait_timeout is None else wait_timeout
        )

    async def set_desired(self, device: str, href: str, content: Any) -> DesiredResult:
        """Set the desired content of a resource (supersedes pending desired updates): a JSON
        object; on a simple device's shared attribute (``/shared/<key>``), the attribute's value,
        any JSON value but null."""
        return await self._typed(
            api.SetDesired(device_id=device, href=href, content=content), DesiredResult
        )

    async def clear_desired(self, device: str, href: str) -> DesiredResult:
        return await self._typed(api.ClearDesired(device_id=device, href=href), DesiredResult)

    # -- simple devices (ThingsBoard's device API) ------------------------------------------

    async def provision(self, device_id: str | None = None, name: str = "") -> DeviceTokenIssued:
        """Create a simple device for the caller's owner (``device_id``: the service makes one
        up when absent). Its access ``token`` is in the result, and only there: keep it.
        :class:`~twinhub_client.errors.ConflictError` when the device id exists (rotate its
        token instead). Sent once (a lost reply leaves the device provisioned: rotate its token
        to get one)."""
        return await self._typed(
            api.ProvisionDevice(device_id=device_id, name=name), DeviceTokenIssued
        )

    async def revoke_token(self, device: str) -> DeviceTokenRevoked:
        """Revoke a simple device's access token (the gateway refuses it from then on)."""
        return await self._typed(api.RevokeDeviceToken(device_id=device), DeviceTokenRevoked)

    async def rotate_token(self, device: str) -> DeviceTokenIssued:
        """Give a simple device a new access token (in the result) and revoke its current one."""
        return await self._typed(api.RotateDeviceToken(device_id=device), DeviceTokenIssued)

    async def answer_rpc(
        self, device: str, request_id: str, result: Any = None
    ) -> RpcAnswerRecorded:
        """Answer a simple device's client-side RPC (its ``rpc-requested`` event's
        ``request_id``; :meth:`rpc_requests` delivers them) with ``result``, any JSON value: the
        device gets it as its CoAP response (2.05). The first answer wins:
        :class:`~twinhub_client.errors.ConflictError` for another answer once one is recorded
        (the same answer again is answered as it, ``repeated``: safe to retry);
        :class:`~twinhub_client.errors.NotFoundError` for a request the device never made (or
        another owner's) and for one whose wait is over (the device got 5.04). Sent once."""
        return await self._typed(
            api.AnswerClientRpc(device_id=device, request_id=request_id, result=result),
            RpcAnswerRecorded,
        )

    def rpc_requests(
        self,
        device: str | None = None,
        *,
        from_position: int | None = None,
        durable: str | None = None,
        batch: int = 64,
    ) -> EventSubscription:
        """The client-side RPCs of the token owner's simple devices (``rpc-requested`` events:
        ``data.request_id``, ``data.method``, ``data.params``, ``data.timeout_ms`` from the
        event's ``time``), optionally of one device; answer each with :meth:`answer_rpc`. A
        subscription as :meth:`subscribe` makes (default: from now on)::

            async with client.rpc_requests() as requests:
                async for e in requests:
                    await client.answer_rpc(e.device_id, e.data.request_id, {"ok": True})
        """
        return self.subscribe(
            token_owner(self.token, self.owner_claim),
            device,
            (RpcRequested,),
            from_position=from_position,
            durable=durable,
            batch=batch,
        )

    async def cancel(
        self, device: str, *, correlation_id: str | None = None, href: str | None = None
    ) -> CancelResult:
        """Cancel pending commands of a device: one, a resource's, or all."""
        return await self._typed(
            api.CancelCommands(device_id=device, correlation_id=correlation_id, href=href),
            CancelResult,
        )

    async def list_pending(
        self,
        device: str | None = None,
        *,
        href: str | None = None,
        state: Literal["pending", "sent"] | None = None,
        limit: int = 1000,
    ) -> list[PendingCommand]:
        """Open commands (per device in issue order). With ``device`` the list is current;
        without, it comes from the twins and lags the log by the projection."""
        result = await self._typed(
            api.ListPending(device_id=device, href=href, state=state, limit=limit), PendingList
        )
        return result.commands

    async def get_twin(self, device: str) -> tuple[dict[str, Any], int]:
        """The device's twin (JSON) and the log position it reflects: subscribe after it."""
        result = await self._typed(api.GetTwin(device_id=device), TwinResult)
        return result.twin, result.position

    async def list_devices(
        self,
        *,
        online: bool | None = None,
        resource_type: str | None = None,
        limit: int = 100,
        after_id: str | None = None,
    ) -> DeviceList:
        """The caller's devices (one page; ``next_after_id`` pages on)."""
        return await self._typed(
            api.ListDevices(
                online=online, resource_type=resource_type, limit=limit, after_id=after_id
            ),
            DeviceList,
        )

    # -- subscriptions --------------------------------------------------------------------------

    def subscribe(
        self,
        owner: str,
        device: str | None = None,
        types: Iterable[EventKind] | None = None,
        from_position: int | None = None,
        durable: str | None = None,
        *,
        href: str | None = None,
        batch: int = 64,
    ) -> EventSubscription:
        """Events of ``owner`` (optionally one device, some kinds, one resource) after
        ``from_position`` (default: from now on), once, in log order; ``durable`` names a
        subscription that resumes after its last acknowledged event. Use it as
        ``async with client.subscribe(...) as events: async for event in events: ...``.

        ``owner`` must be the token's (the bus delivers no other owner's events); a
        :class:`~twinhub_client.errors.ForbiddenError` says so when the subscription opens.
        The consumer selects the owner's device / resource on the server; ``types`` are
        filtered here (one consumer, one filter subject: what the bus lets an application
        create)."""
        kinds = None if types is None else event_kinds(types)
        (scope,) = event_filters(owner, device, None, href)
        return _OwnedSubscription(
            self,
            owner,
            durable,
            self.store,
            (scope,),
            kinds=kinds,
            from_position=from_position,
            cursor=self.ack_floor,
            head=self._log_head,
            batch=batch,
        )

    async def consumer_name(self, durable: str) -> str:
        """The consumer name of the caller's durable subscription ``durable``."""
        info = self._session or await self.session()
        return consumer_name(bytes.fromhex(info.consumer_key), durable)

    async def ack_floor(self, name: str) -> int | None:
        """The last position acknowledged by consumer ``name`` (``None``: none such)."""
        # Through the store: nc.request can lose a cancellation (see JetStreamEventStore.request).
        subject = f"{self.js_prefix}.CONSUMER.INFO.{self._layout.name}.{name}"
        try:
            msg = await self.store.request(subject, b"", self.timeout)
        except (nats.errors.Error, OSError) as e:
            raise UnavailableError(f"consumer info of {name}: {e!r}") from e
        return _ack_floor_of(name, msg)


class _OwnedSubscription(EventSubscription):
    """A subscription of the client's owner: checks the owner and names a durable consumer
    (:func:`consumer_name`) when it opens, as both need the command API."""

    def __init__(
        self, client: TwinhubClient, owner: str, durable: str | None, *args: Any, **kw: Any
    ) -> None:
        super().__init__(*args, durable=durable, **kw)
        self._client = client
        self._owner = owner
        self.durable_name = durable

    async def open(self) -> None:
        if not self._opened:
            mine = await self._client.owner()
            if self._owner != mine:
                raise ForbiddenError(
                    f"the token is owner {mine!r}'s: it cannot subscribe to {self._owner!r}"
                )
            if self.durable_name is not None:
                self.name = await self._client.consumer_name(self.durable_name)
        await super().open()


def _ack_floor_of(name: str, msg: Msg) -> int | None:
    resp: dict[str, Any] = json.loads(msg.data) if msg.data else {}
    err = resp.get("error")
    if err is not None:
        if int(err.get("err_code", 0)) == _CONSUMER_NOT_FOUND:
            return None
        raise UnavailableError(f"consumer info of {name}: {err}")
    return int(resp["ack_floor"]["stream_seq"])

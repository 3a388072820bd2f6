"""Self-provisioning requests on the bus: the twin service's side of ``POST /api/v1/provision``.

Subscribes to :data:`proto.selfprovision.SUBJECT` in a queue group (several twin instances
share the requests), decides each with :mod:`twin.selfprovision` against the configured
profiles and provisions through the command API's path
(:meth:`twin.api.TwinApi.provision_as`); the answer goes to the request's reply subject. Only
the gateway role may publish on the subject (bus/permissions.py).

The bus connection is a small structural port (:class:`Bus`): what this module uses of a
nats-py ``Client``, which the composition root passes in (nats-py itself is confined to the
adapters tests/test_layering.py names). One log line per request, with the profile, the device
name and the gateway's view of the device's address; never the secret.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Protocol, Self

from proto import api
from proto.selfprovision import (
    QUEUE,
    SUBJECT,
    ProvisionReply,
    decode_request,
    encode,
)
from twin.selfprovision import Create, Profiles, answer, decide

__all__ = ["Bus", "ProvisionApi", "SelfProvisionServer"]

log = logging.getLogger(__name__)


class BusMsg(Protocol):
    @property
    def subject(self) -> str: ...
    @property
    def reply(self) -> str: ...
    @property
    def data(self) -> bytes: ...


class BusSubscription(Protocol):
    async def unsubscribe(self, limit: int = 0) -> None: ...


class Bus(Protocol):
    """What this adapter uses of a NATS connection (nats-py's ``Client`` has it)."""

    async def subscribe(
        self,
        subject: str,
        queue: str = "",
        cb: Callable[[BusMsg], Awaitable[None]] | None = None,
    ) -> BusSubscription: ...

    async def publish(self, subject: str, payload: bytes = b"") -> None: ...

    async def flush(self) -> None: ...


class ProvisionApi(Protocol):
    async def provision_as(
        self, owner: str, by: str, request: api.ProvisionDevice
    ) -> api.Reply: ...


class SelfProvisionServer:
    """Answers self-provisioning requests while open (an async context manager)."""

    def __init__(
        self,
        bus: Bus,
        twin_api: ProvisionApi,
        profiles: Profiles,
        *,
        subject: str = SUBJECT,
        queue: str = QUEUE,
        max_concurrency: int = 64,
        request_timeout: float = 15.0,
    ) -> None:
        self._bus = bus
        self._api = twin_api
        self.profiles = profiles
        self.subject = subject
        self._queue = queue
        self._slots = asyncio.Semaphore(max_concurrency)
        self._timeout = request_timeout
        self._sub: BusSubscription | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.handled = 0

    async def __aenter__(self) -> Self:
        self._sub = await self._bus.subscribe(self.subject, queue=self._queue, cb=self._on_msg)
        await self._bus.flush()  # a request sent right after this finds a responder
        log.info(
            "self-provisioning on %s (queue %s), %d profile(s)",
            self.subject,
            self._queue,
            len(self.profiles),
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(Exception):  # the connection may be closing already
                await sub.unsubscribe()
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=self._timeout)
            for task in pending:
                task.cancel()

    async def _on_msg(self, msg: BusMsg) -> None:
        if not msg.reply:
            log.warning("self-provisioning request without a reply subject: dropped")
            return
        await self._slots.acquire()  # back-pressure: the subscription's callbacks wait here
        task = asyncio.create_task(self._serve(msg.reply, msg.data), name="self-provision")
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slots.release()

    async def _serve(self, reply_to: str, data: bytes) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                reply = await self.decide(data)
        except TimeoutError:
            reply = ProvisionReply(status="UNAVAILABLE", error_msg="no answer in time")
        except Exception:  # a bug; the gateway still gets an answer
            log.exception("self-provisioning failed")
            reply = ProvisionReply(status="UNAVAILABLE", error_msg="internal error (logged)")
        self.handled += 1
        try:
            await self._bus.publish(reply_to, encode(reply))
        except Exception as e:  # the connection is gone: the gateway times out (5.03)
            log.warning("self-provisioning: reply not sent: %r", e)

    async def decide(self, data: bytes) -> ProvisionReply:
        """The answer to one request (its bytes as the bus carried them)."""
        try:
            request = decode_request(data)
        except ValueError as e:
            log.warning("self-provisioning: malformed request: %s", e)
            return ProvisionReply(status="NOT_FOUND")
        decision = decide(request, self.profiles)
        if isinstance(decision, Create):
            owner = decision.profile.owner
            reply = answer(await self._api.provision_as(owner, decision.by, decision.request))
            profile = decision.profile.name
        else:
            reply, profile = decision, ""
        _log_outcome(request.key, profile, request.device_name, request.remote, reply)
        return reply


def _log_outcome(key: str, profile: str, name: str, remote: str, reply: ProvisionReply) -> None:
    where = remote or "?"
    key = key[:64]
    if reply.status == "SUCCESS":
        log.info(
            "self-provisioned %s (%r) with profile %s from %s",
            reply.device_id,
            name,
            profile,
            where,
        )
    elif reply.status == "NOT_FOUND":
        log.info("self-provisioning from %s: no profile with key %r and that secret", where, key)
    else:
        log.info(
            "self-provisioning of %r (profile %s) from %s: %s %s",
            name,
            profile or "?",
            where,
            reply.status,
            reply.error_msg,
        )

"""The command API on NATS request/reply: the transport of :class:`twin.api.TwinApi`.

Subscribes to ``<prefix>.>`` (``twinhub.api.v1.>``) in a queue group, so several twin instances
share the requests, each request handled by one. Every request is answered on its reply subject
(a request without one is dropped, logged): the op is the subject's last token, the token comes
from the ``Authorization: Bearer`` header. Requests run concurrently up to ``max_concurrency``;
one that takes longer than ``request_timeout`` is answered ``unavailable``. A request picked up
after the caller's deadline (``Twinhub-Deadline``, see :mod:`proto.api`) is dropped unanswered
and counted in ``shed``: under overload the service works on what callers still wait for.

Why NATS here and not behind the event-log port: the log port is about the stream (append,
read, consumers); request/reply is a different conversation with clients, and the twin owns its
API. Confined to this module like ``eventstore/adapters/`` (see ``tests/test_layering.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from types import TracebackType
from typing import Self

import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from proto import api
from twin.api import TwinApi
from twin.commands import error

__all__ = ["DEFAULT_QUEUE", "NatsApiServer"]

log = logging.getLogger(__name__)

DEFAULT_QUEUE = "twinhub-twin-api"


class NatsApiServer:
    """Serves a :class:`TwinApi` on NATS while open (an async context manager)."""

    def __init__(
        self,
        nc: NatsClient,
        twin_api: TwinApi,
        *,
        prefix: str = api.API_PREFIX,
        queue: str = DEFAULT_QUEUE,
        max_concurrency: int = 256,
        request_timeout: float = 15.0,
    ) -> None:
        self._nc = nc
        self._api = twin_api
        self.prefix = prefix
        self._queue = queue
        self._slots = asyncio.Semaphore(max_concurrency)
        self._timeout = request_timeout
        self._sub: Subscription | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.handled = 0
        self.shed = 0  # requests dropped: picked up after their caller's deadline

    async def __aenter__(self) -> Self:
        self._sub = await self._nc.subscribe(f"{self.prefix}.>", queue=self._queue, cb=self._on_msg)
        # serving once the server has the subscription: a request another connection sends
        # right after this returns must find a responder (else it gets "no responders")
        await self._nc.flush()
        log.info("command API on %s.> (queue %s)", self.prefix, self._queue)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
        if self._tasks:  # let requests in flight finish and reply
            _, pending = await asyncio.wait(self._tasks, timeout=self._timeout)
            for task in pending:
                task.cancel()

    async def _on_msg(self, msg: Msg) -> None:
        if not msg.reply:
            log.warning("API request on %s without a reply subject: dropped", msg.subject)
            return
        deadline = api.deadline_of(dict(msg.headers) if msg.headers else None)
        if self._late(msg, deadline):
            return
        await self._slots.acquire()  # back-pressure: the subscription's callbacks wait here
        if self._late(msg, deadline):
            self._slots.release()
            return
        task = asyncio.create_task(self._serve(msg), name=f"api:{msg.subject}")
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _late(self, msg: Msg, deadline: float | None) -> bool:
        if deadline is None or time.time() <= deadline:
            return False
        self.shed += 1
        log.debug("API request on %s past its caller's deadline: dropped", msg.subject)
        return True

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slots.release()

    async def _serve(self, msg: Msg) -> None:
        op = msg.subject[len(self.prefix) + 1 :]
        headers = dict(msg.headers) if msg.headers else None
        try:
            async with asyncio.timeout(self._timeout):
                reply = await self._api.handle(op, msg.data, api.token_of(headers))
        except TimeoutError:
            reply = error("unavailable", f"no answer within {self._timeout:g}s")
        except Exception:  # handle() answers errors itself; this is a bug, still reply
            log.exception("API %s failed", op)
            reply = error("internal", "internal error (logged)")
        self.handled += 1
        try:
            body = api.encode_reply(reply)
        except (TypeError, ValueError):  # a bug; the caller still gets an answer, not silence
            log.exception("API %s: reply not encodable", op)
            reply = error("internal", "internal error (logged)")
            body = api.encode_reply(reply)
        try:
            await self._nc.publish(msg.reply, body)
        except (nats.errors.Error, OSError) as e:
            log.warning("API %s: reply not sent: %r", op, e)
        if reply.error is not None:
            log.info("API %s: %s (%s)", op, reply.error.code, reply.error.message)

"""Client-side RPC of simple devices: the effects of :mod:`gateway.simpleclientrpc`.

:class:`ClientRpc` serves one :class:`~gateway.simpleclientrpc.CallServer` (``POST
/api/v1/{token}/rpc``) of :class:`gateway.adapters.coap_udp.SimpleDeviceServer`: it holds a
wait slot, subscribes to the answer's subject (a notifier of the event log) before it appends
``rpc-requested``, then reads the log on each wake-up (and a few times shortly after one: a
wake-up may come before a read sees the message, see :class:`eventstore.ports.Notifier`)
until ``rpc-answered`` of the request is there or the timeout passed. aiocoap acknowledges a
confirmable request with an empty ACK while the render waits, and sends the answer as a
separate response (over DTLS too: the terminator relays to this endpoint).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Final

from eventstore.errors import EventStoreError
from eventstore.ports import EventStore, Notifier
from gateway.simple import Append, Reply
from gateway.simpleclientrpc import (
    ANSWERED,
    BUSY,
    TIMED_OUT,
    CallServer,
    WaitSlots,
    answer_filter,
    answer_in,
    answer_payload,
    requested,
)
from proto import binding
from proto.errors import BindingError
from proto.events import AnyEvent, RpcAnswered

__all__ = ["ClientRpc"]

log = logging.getLogger(__name__)

_RECHECKS: Final = (0.005, 0.02, 0.1, 0.5)
"""Delays of the re-reads after a wake-up that found no answer yet."""
_RETRY: Final = 1.0  # seconds before reading again after a failed read


class ClientRpc:
    """Client-side RPCs of one gateway's simple devices.

    ``append`` writes events as the server does (its reply: 2.01 once the log acknowledged
    them, else the error to give the device); ``timeout`` is how long a device waits for the
    answer (seconds), ``max_waits`` how many may wait at once (more: 5.03)."""

    def __init__(
        self,
        store: EventStore,
        append: Callable[[Append], Awaitable[Reply]],
        *,
        source: str,
        timeout: float = 30.0,
        max_waits: int = 1000,
        read_timeout: float = 5.0,
        clock: Callable[[], float] = time.time,
        new_id: Callable[[], str] = lambda: str(uuid.uuid4()),
    ) -> None:
        if not timeout > 0:
            raise ValueError("timeout must be > 0")
        self.store = store
        self.append = append
        self.source = source
        self.timeout = timeout
        self.read_timeout = read_timeout
        self.clock = clock
        self.new_id = new_id
        self.slots = WaitSlots(max_waits)
        self.answered = 0
        self.timed_out = 0

    @property
    def waiting(self) -> int:
        """Devices waiting for an answer now."""
        return self.slots.taken

    async def call(
        self,
        call: CallServer,
        before: Sequence[AnyEvent] = (),
        on_written: Callable[[bool], None] | None = None,
    ) -> Reply:
        """The device's reply to ``call``; ``before`` (its ``device-online``) is appended with
        the request, and ``on_written`` told whether they were written."""
        if not self.slots.take():
            log.warning("simple devices: %d rpc calls wait already: 5.03", self.slots.taken)
            if on_written is not None:
                on_written(False)
            return Reply(BUSY)
        try:
            return await self._call(call, before, on_written)
        finally:
            self.slots.release()

    async def _call(
        self,
        call: CallServer,
        before: Sequence[AnyEvent],
        on_written: Callable[[bool], None] | None,
    ) -> Reply:
        request_id = self.new_id()
        flt = answer_filter(call, request_id)
        try:
            async with asyncio.timeout(self.read_timeout):
                notifier = await self.store.notifier([flt])
        except (EventStoreError, TimeoutError) as e:
            log.warning("simple devices: cannot wait for %s's rpc answer: %s", call.device_id, e)
            if on_written is not None:
                on_written(False)
            return Reply(BUSY)
        try:
            timeout_ms = max(1, round(self.timeout * 1000))
            now = datetime.fromtimestamp(self.clock(), UTC)
            event = requested(call, request_id, timeout_ms, self.source, now)
            written = await self.append(Append((*before, event)))
            if on_written is not None:
                on_written(written.code == "2.01")
            if written.code != "2.01":
                return written
            log.info(
                "simple devices: %s calls %r (rpc request %s)",
                call.device_id,
                call.method,
                request_id,
            )
            answer = await self._wait(notifier, flt, request_id)
        finally:
            await notifier.close()
        if answer is None:
            self.timed_out += 1
            log.info("simple devices: rpc request %s of %s: no answer", request_id, call.device_id)
            return Reply(TIMED_OUT)
        self.answered += 1
        payload, fmt = answer_payload(call, answer)
        return Reply(ANSWERED, payload, fmt)

    async def _wait(self, notifier: Notifier, flt: str, request_id: str) -> RpcAnswered | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        rechecks: list[float] = []
        while True:
            delay: float | None = None
            try:
                async with asyncio.timeout(self.read_timeout):
                    answer = await self._read(flt, request_id)
            except (EventStoreError, TimeoutError) as e:
                log.warning("simple devices: cannot read rpc answer %s: %s", request_id, e)
                answer, delay = None, _RETRY
            if answer is not None:
                return answer
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            if delay is None:
                delay = rechecks.pop(0) if rechecks else remaining
            if await notifier.wait(min(delay, remaining)):
                rechecks = list(_RECHECKS)

    async def _read(self, flt: str, request_id: str) -> RpcAnswered | None:
        events: list[AnyEvent] = []
        async for stored in self.store.read(flt, limit=1):
            try:
                events.append(binding.from_stored(stored))
            except BindingError as e:
                log.warning("simple devices: undecodable rpc answer: %s", e)
        return answer_in(events, request_id)

"""Writing a device's events to the log: in order, pipelined, bounded, retried.

One :class:`DeviceWriter` per device connection. The session's ``Append`` effects
are queued and written by one task in submission order; everything queued at that
moment goes out as one multi-message append, so a flood of notifications is
pipelined (publish all, then await the acks together) without reordering.

While the log is unavailable the writer keeps what it was given — at most
``max_buffered`` events — and retries with back-off. Events keep their ids, so a
retry that reaches the log twice is deduplicated (``Nats-Msg-Id``). When a submit
would exceed the bound, :meth:`DeviceWriter.submit` returns ``False``: the caller
closes the device connection (the device reconnects and resynchronises).

A *critical* append (one a device reply waits for) that cannot be written within
``critical_timeout`` is reported as failed so the device gets 5.03 and retries;
notifications are retried until written or until :meth:`close` gives up at its
``drain_timeout``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from eventstore.errors import EventStoreError, UnavailableError
from eventstore.ports import EventStore
from proto import binding
from proto.events import AnyEvent

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class WriterConfig:
    max_buffered: int = 10_000  # events per device connection
    max_batch: int = 500  # events per append call
    critical_timeout: float = 5.0
    drain_timeout: float = 30.0
    retry_initial: float = 0.05
    retry_max: float = 2.0


@dataclass(slots=True)
class _Item:
    ref: int
    events: tuple[AnyEvent, ...]
    critical: bool
    submitted: float


Done = Callable[[int, bool, str, tuple[int, ...]], None]
"""Called once per submitted append: (ref, ok, error, positions)."""


class DeviceWriter:
    """Ordered, bounded, retrying writer of one device connection's events."""

    def __init__(self, store: EventStore, on_done: Done, config: WriterConfig, name: str) -> None:
        self.store = store
        self.on_done = on_done
        self.config = config
        self.name = name
        self._queue: deque[_Item] = deque()
        self._buffered = 0
        self._wakeup = asyncio.Event()
        self._closing = False
        self._task = asyncio.create_task(self._run(), name=f"writer:{name}")
        self.written = 0
        self.retries = 0

    @property
    def buffered(self) -> int:
        return self._buffered

    def submit(self, ref: int, events: tuple[AnyEvent, ...], critical: bool) -> bool:
        """Queue an append; ``False`` when the buffer would overflow (nothing was queued)."""
        if self._closing:
            return False
        if self._buffered + len(events) > self.config.max_buffered:
            return False
        self._queue.append(_Item(ref, events, critical, time.monotonic()))
        self._buffered += len(events)
        self._wakeup.set()
        return True

    async def close(self) -> None:
        """Write what is queued (up to ``drain_timeout``), then stop."""
        self._closing = True
        self._wakeup.set()
        try:
            await asyncio.wait_for(asyncio.shield(self._task), self.config.drain_timeout)
        except TimeoutError:
            self._task.cancel()
            lost = self._buffered
            for item in self._queue:
                self.on_done(item.ref, False, "writer closed", ())
            self._queue.clear()
            log.error("writer %s: gave up with %d unwritten events", self.name, lost)
        except asyncio.CancelledError:
            self._task.cancel()
            raise

    def _take_batch(self) -> list[_Item]:
        batch: list[_Item] = []
        n = 0
        while self._queue and (
            not batch or n + len(self._queue[0].events) <= self.config.max_batch
        ):
            item = self._queue.popleft()
            batch.append(item)
            n += len(item.events)
        return batch

    async def _run(self) -> None:
        delay = self.config.retry_initial
        batch: list[_Item] = []
        while True:
            if not batch:
                if not self._queue:
                    if self._closing:
                        return
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                batch = self._take_batch()
            messages = [binding.to_nats(ev) for item in batch for ev in item.events]
            try:
                result = await self.store.append(messages)
            except UnavailableError as e:
                self.retries += 1
                batch = self._expire_critical(batch, str(e))
                log.warning(
                    "writer %s: log unavailable (%s), retrying in %.2fs", self.name, e, delay
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.config.retry_max)
                continue
            except EventStoreError as e:  # not retryable: report and drop this batch
                log.error("writer %s: append refused: %s", self.name, e)
                for item in batch:
                    self._buffered -= len(item.events)
                    self.on_done(item.ref, False, str(e), ())
                batch = []
                continue
            delay = self.config.retry_initial
            i = 0
            for item in batch:
                n = len(item.events)
                positions = result.positions[i : i + n]
                i += n
                self._buffered -= n
                self.written += n
                self.on_done(item.ref, True, "", positions)
            batch = []

    def _expire_critical(self, batch: list[_Item], error: str) -> list[_Item]:
        """Fail critical appends that waited too long; keep the rest, in order."""
        now = time.monotonic()
        keep: list[_Item] = []
        for item in batch:
            if item.critical and now - item.submitted > self.config.critical_timeout:
                self._buffered -= len(item.events)
                self.on_done(item.ref, False, error, ())
            else:
                keep.append(item)
        return keep

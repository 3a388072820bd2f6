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

A *conditional* append (``expected_last`` over ``scope``: a device's registration) is written
alone, in its place in the order, and never retried after the log refused its condition: the
caller learns of the conflict and decides.

A device's events go to the log in order across its connections too: the writer of a newer
connection follows the older one's (:meth:`DeviceWriter.follow`) and writes nothing before the
older writer settled what it held at that moment (say, notifications it buffered while the log
was down). Otherwise the new connection's sign-in and fresh values could reach the log first and
the old, stale values after them, where they would win in the twin.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from eventstore.errors import ConcurrencyError, EventStoreError, UnavailableError
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
    expected_last: int | None = None
    scope: str | None = None


Done = Callable[[int, bool, str, tuple[int, ...], bool], None]
"""Called once per submitted append: (ref, ok, error, positions, conflict) -- ``conflict``: a
conditional append whose condition did not hold (nothing was written)."""


class DeviceWriter:
    """Ordered, bounded, retrying writer of one device connection's events."""

    def __init__(self, store: EventStore, on_done: Done, config: WriterConfig, name: str) -> None:
        self.store = store
        self.on_done = on_done
        self.config = config
        self.name = name
        self._queue: deque[_Item] = deque()
        self._buffered = 0
        self._closing = False
        self._stopped = False  # closed, or gave up: nothing more is written
        self._submitted = 0  # appends ever queued
        self._settled = 0  # appends written or failed
        self._marks: list[tuple[int, asyncio.Future[None]]] = []
        self._after: asyncio.Future[None] | None = None
        # Started when there is something to write and ended when nothing is left: an idle
        # device connection holds no task (memory per device, issue 13).
        self._task: asyncio.Task[None] | None = None
        self.written = 0
        self.retries = 0

    @property
    def buffered(self) -> int:
        return self._buffered

    def submit(
        self,
        ref: int,
        events: tuple[AnyEvent, ...],
        critical: bool,
        *,
        force: bool = False,
        expected_last: int | None = None,
        scope: str | None = None,
    ) -> bool:
        """Queue an append; ``False`` when the buffer would overflow (nothing was queued).

        ``force`` queues it beyond ``max_buffered``: for the few last events of a connection
        that is gone (its offline event), which must not be lost to an overflow that its own
        notifications caused. ``expected_last`` / ``scope``: a conditional append (see
        :meth:`eventstore.ports.EventStore.append`), written alone.
        """
        if self._closing:
            return False
        if not force and self._buffered + len(events) > self.config.max_buffered:
            return False
        item = _Item(ref, events, critical, time.monotonic(), expected_last, scope)
        self._queue.append(item)
        self._buffered += len(events)
        self._submitted += 1
        self._ensure_running()
        return True

    def _ensure_running(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name=f"writer:{self.name}")
            self._task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        if self._task is task:
            self._task = None  # an idle writer holds no finished task either
        if task.cancelled() or task.exception() is not None:
            self._stopped = True
            self._release_marks()

    def follow(self, older: DeviceWriter) -> None:
        """Write nothing before ``older`` (the writer of an older connection of the same device)
        settled every append it was given so far."""
        self._after = older.settled()

    def settled(self) -> asyncio.Future[None]:
        """Resolved once every append submitted so far is written or failed (or the writer
        stopped)."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._settled >= self._submitted or self._stopped:
            fut.set_result(None)
        else:
            self._marks.append((self._submitted, fut))
        return fut

    def _done(
        self,
        item: _Item,
        ok: bool,
        error: str,
        positions: tuple[int, ...],
        conflict: bool = False,
    ) -> None:
        self.on_done(item.ref, ok, error, positions, conflict)
        self._settled += 1
        if self._marks and self._marks[0][0] <= self._settled:
            for _, fut in [m for m in self._marks if m[0] <= self._settled]:
                if not fut.done():
                    fut.set_result(None)
            self._marks = [m for m in self._marks if m[0] > self._settled]

    def _release_marks(self) -> None:
        for _, fut in self._marks:
            if not fut.done():
                fut.set_result(None)
        self._marks = []

    async def close(self) -> None:
        """Write what is queued (up to ``drain_timeout``), then stop."""
        self._closing = True
        task = self._task
        if task is None or task.done():
            self._stopped = True
            self._release_marks()
            return
        try:
            await asyncio.wait_for(asyncio.shield(task), self.config.drain_timeout)
        except TimeoutError:
            task.cancel()
            lost = self._buffered
            for item in self._queue:
                self._done(item, False, "writer closed", ())
            self._queue.clear()
            log.error("writer %s: gave up with %d unwritten events", self.name, lost)
        except asyncio.CancelledError:
            task.cancel()
            raise
        finally:
            self._stopped = True
            self._release_marks()

    def _take_batch(self) -> list[_Item]:
        batch: list[_Item] = []
        n = 0
        while self._queue and (
            not batch or n + len(self._queue[0].events) <= self.config.max_batch
        ):
            conditional = self._queue[0].expected_last is not None
            if batch and (conditional or batch[0].expected_last is not None):
                break  # a conditional append goes alone
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
                    return  # idle: the next submit starts a new task
                batch = self._take_batch()
            if self._after is not None:
                if not self._after.done():
                    # An older connection of this device holds events still: they go first.
                    critical = any(item.critical for item in batch)
                    wait = self.config.critical_timeout if critical else None
                    await asyncio.wait([self._after], timeout=wait)
                    batch = self._expire_critical(batch, "older events of the device pending")
                    continue
                self._after = None
            messages = [binding.to_nats(ev) for item in batch for ev in item.events]
            first = batch[0]
            try:
                if first.expected_last is not None:
                    result = await self.store.append(
                        messages, expected_last=first.expected_last, scope=first.scope
                    )
                else:
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
            except ConcurrencyError as e:  # the condition did not hold: the caller decides
                log.info("writer %s: conditional append refused: %s", self.name, e)
                for item in batch:
                    self._buffered -= len(item.events)
                    self._done(item, False, str(e), (), conflict=True)
                batch = []
                continue
            except EventStoreError as e:  # not retryable: report and drop this batch
                log.error("writer %s: append refused: %s", self.name, e)
                for item in batch:
                    self._buffered -= len(item.events)
                    self._done(item, False, str(e), ())
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
                self._done(item, True, "", positions)
            batch = []

    def _expire_critical(self, batch: list[_Item], error: str) -> list[_Item]:
        """Fail critical appends that waited too long; keep the rest, in order."""
        now = time.monotonic()
        keep: list[_Item] = []
        for item in batch:
            if item.critical and now - item.submitted > self.config.critical_timeout:
                self._buffered -= len(item.events)
                self._done(item, False, error, ())
            else:
                keep.append(item)
        return keep

"""Gap-free event subscriptions: every matching event after a position, once, in log order.

An :class:`EventSubscription` reads the event log through a JetStream pull consumer whose
filter subjects select the events on the server (``twinhub.ev.<owner>.…``: another owner's events
are never scanned). It is an async iterator of typed events (:class:`proto.events.Event`, each
with its log ``position``) and an async context manager.

How "once, in order, no gap" is kept:

* **Order and no gap.** The subscription remembers the position of the last event it handed
  out. Whenever the consumer is (re)opened — at start, and after any error of the log or the
  connection (a NATS restart included) — it is deleted and created again to start right after
  that position. JetStream would otherwise redeliver what was in flight only after ``ack_wait``,
  *behind* newer events. Deliveries at or below the last position are dropped (acknowledged).
* **Cancellation loses nothing.** A timeout (``next(timeout)``, ``asyncio.timeout`` around the
  iteration) or a cancelled task may cut the subscription short at any await: deliveries it
  had fetched stay buffered (here, or in the consumer's inbox) for the next call, and the
  position moves only when an event is handed out. (A delivery dropped there would come
  again only after ``ack_wait``, behind the position, and be skipped: a gap.)
* **Acknowledgement** of an event happens when the caller asks for the next one (it got the
  event and is done with it), or when it leaves the ``async with`` block without an exception.
* **Durable, by name.** With ``durable="name"`` the consumer survives the subscriber: a
  subscription opened again under that name resumes right after the last event acknowledged
  (the consumer's ack floor; ``from_position`` only applies the first time). An event being
  processed when the subscriber died (handed out, not acknowledged) comes again: deduplicate by
  ``position`` if processing is not idempotent. One subscriber per durable name at a time.
* Without a name the consumer is temporary, deleted on close. Should that fail (the log is
  unreachable), the log deletes it itself once nobody fetched from it for
  ``inactive_threshold`` seconds; a subscription that finds its consumer gone that way (left
  unread that long) creates it again after the last position handed out.
* **Closing is bounded.** Leaving the ``async with`` block, cancelling the task that iterates,
  or a timeout around the iteration ends the subscription in at most ``close_timeout`` seconds
  whatever the log does (milliseconds when it answers): what is cut short is an
  acknowledgement (the event comes again to a durable subscription) or a deletion (see above).

Without ``from_position`` a new subscription starts at the end of the log (new events only):
after ``head()`` when given (an application asks the command API, ``session``), else after the
log's last position.

The consumer has one filter subject: the bus lets an application create consumers only on the
filtered create subject, which carries a single filter (its owner's subjects). ``kinds``
narrows what is handed out on the client: events of other kinds are acknowledged and skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Sequence
from types import TracebackType
from typing import Self, TypeVar

from eventstore.errors import EventStoreError
from eventstore.ports import ALL_EVENTS, Consumer, Delivery, EventStore
from proto import binding, subjects
from proto.errors import BindingError, SubjectError
from proto.events import AnyEvent

__all__ = ["Cursor", "EventSubscription", "Head"]

log = logging.getLogger("twinhub_client.subscription")

Cursor = Callable[[str], Awaitable[int | None]]
"""The ack floor of a durable consumer by name; ``None`` when there is no such consumer."""
Head = Callable[[], Awaitable[int]]
"""The position a subscription "from now" starts after."""

T = TypeVar("T")

_NEXT_SLACK = 0.25
"""Seconds :meth:`EventSubscription.next` gives a fetch past its deadline to end by itself (the
log's answer that the pull request expired) before cutting it short."""


class EventSubscription:
    """See the module docstring. Use from one task."""

    def __init__(
        self,
        store: EventStore,
        filters: Sequence[str] = (ALL_EVENTS,),
        *,
        durable: str | None = None,
        from_position: int | None = None,
        cursor: Cursor | None = None,
        head: Head | None = None,
        kinds: Collection[str] | None = None,
        batch: int = 64,
        ack_wait: float = 300.0,
        fetch_timeout: float = 1.0,
        retry_max: float = 2.0,
        close_timeout: float = 1.0,
        inactive_threshold: float = 60.0,
    ) -> None:
        if from_position is not None and from_position < 0:
            raise ValueError("from_position must be >= 0")
        if not filters:
            raise ValueError("at least one filter subject")
        self._store = store
        self.filters = tuple(dict.fromkeys(filters))
        self.durable = durable is not None
        self.name = durable if durable is not None else f"sub-{uuid.uuid4().hex[:20]}"
        self._from = from_position
        self._cursor = cursor
        self._head = head
        self.kinds = None if kinds is None else frozenset(kinds)
        self._batch = batch
        self._ack_wait = ack_wait
        self._fetch_timeout = fetch_timeout
        self._retry_max = retry_max
        self._close_timeout = close_timeout
        self._inactive_threshold = None if self.durable else inactive_threshold
        self._consumer: Consumer | None = None
        self._buffer: deque[Delivery] = deque()
        self._current: Delivery | None = None
        self._current_done = False  # the caller asked for the next one: ack it whatever happens
        self._start: int | None = None
        self._resumed = False
        self._last = 0
        self._opened = False
        self._closed = False
        self._broken = False
        self.reconnects = 0

    @property
    def position(self) -> int:
        """The position of the last event handed out (or where the subscription started)."""
        return self._last

    # -- lifecycle ------------------------------------------------------------------------------

    async def open(self) -> None:
        """Create (or resume) the consumer; retries while the log is unavailable. An open cut
        short (cancelled, timed out) starts again where it was: at the start position found
        the first time, so "from now" means from the first attempt."""
        if self._opened:
            return
        if self._start is None:
            start = self._from
            resume = False
            if self.durable and self._cursor is not None:
                floor = await self._retrying(lambda: self._cursor_of())
                if floor is not None:
                    start, resume = floor, True
            if start is None:
                head = self._head or (lambda: self._store.last_position(ALL_EVENTS))
                start = await self._retrying(head)
            self._start, self._resumed, self._last = start, resume, start
        start, resume = self._start, self._resumed
        if self.durable and self._cursor is None:
            # No way to read the ack floor (in-memory log): reopen the consumer as it is.
            self._consumer = await self._retrying(self._open_consumer)
        else:
            await self._retrying(self._recreate)
        self._opened = True
        log.info(
            "subscription %s %s after position %d on %s",
            self.name,
            "resumed" if resume else "started",
            start,
            ", ".join(self.filters),
        )

    async def _cursor_of(self) -> int | None:
        assert self._cursor is not None
        return await self._cursor(self.name)

    async def close(self, *, ack: bool = True) -> None:
        """Stop; acknowledge the event handed out last unless ``ack`` is false. A durable
        consumer stays (resume by its name); a temporary one is deleted. Returns within
        ``close_timeout`` seconds even when the log does not answer."""
        if self._closed:
            return
        self._closed = True
        current, self._current = self._current, None
        if current is not None and self._current_done:
            ack = True  # the caller was done with it (asked for the next one)
        consumer, self._consumer = self._consumer, None
        self._buffer.clear()
        step = "closing"
        try:
            async with asyncio.timeout(self._close_timeout):
                if consumer is not None:
                    # First: its local part (the inbox, its task) is done before the first
                    # wait on the server, so nothing is left behind when the rest is cut short.
                    with contextlib.suppress(EventStoreError):
                        await consumer.close()
                if self.durable:
                    if ack and current is not None:
                        step = "acknowledging the last event"
                        with contextlib.suppress(EventStoreError):
                            await current.ack()
                else:  # deleted, so an acknowledgement would be a wasted round trip
                    step = "deleting the consumer"
                    with contextlib.suppress(EventStoreError):
                        await self._store.delete_consumer(self.name)
        except TimeoutError:
            log.warning(
                "subscription %s: %s took over %gs; left to the log",
                self.name,
                step,
                self._close_timeout,
            )

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close(ack=exc_type is None)

    # -- iteration ------------------------------------------------------------------------------

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> AnyEvent:
        if self._closed:
            raise StopAsyncIteration
        if not self._opened:
            await self.open()
        await self._settle_current()
        event = await self._next_event(None)
        assert event is not None  # no deadline: it waits for one
        return event

    async def _next_event(self, deadline: float | None) -> AnyEvent | None:
        """The next event to hand out; ``None`` once the loop-time ``deadline`` passed.

        Cancellation-safe, like everything on the way to the log: between two awaits, every
        delivery taken from the consumer is in ``_buffer`` (or handed out, its position in
        ``_last``), never only in a local variable, so a cancellation or a timeout at any
        await loses nothing: the next call goes on with what is buffered."""
        while True:
            if not self._buffer:
                if not await self._fill(deadline):
                    return None
                continue
            d = self._buffer.popleft()
            if d.position <= self._last:
                with contextlib.suppress(EventStoreError):
                    await d.ack()
                continue
            self._last = d.position
            self._current, self._current_done = d, False
            if self.kinds is not None and not self._wanted(d):
                await self._settle_current()
                continue
            try:
                return binding.from_stored(d.stored)
            except BindingError as e:
                log.error("subscription %s: undecodable event at %d: %s", self.name, d.position, e)
                await self._settle_current()

    async def next(self, timeout: float) -> AnyEvent | None:  # noqa: ASYNC109
        """The next event, or ``None`` if none came within ``timeout`` seconds (the event handed
        out before is acknowledged either way).

        The deadline goes down to the fetch, which ends by itself when it passes (the log ends
        the pull request then). A timeout ``_NEXT_SLACK`` seconds later bounds what does not
        (a log that does not answer, reopening the consumer while it is away). Either way
        nothing fetched is lost: it comes with the next call."""
        if self._closed:
            raise StopAsyncIteration
        if not self._opened:
            await self.open()
        await self._settle_current()
        deadline = asyncio.get_running_loop().time() + timeout
        try:
            async with asyncio.timeout_at(deadline + _NEXT_SLACK):
                event = await self._next_event(deadline)
        except TimeoutError:
            return None
        if event is None:
            # A fetch may find nothing without ever suspending (the in-memory log, next(0)):
            # a caller polling in a loop must still let the loop run (the appends it waits for).
            await asyncio.sleep(0)
        return event

    def _wanted(self, d: Delivery) -> bool:
        assert self.kinds is not None
        try:
            return subjects.parse_event_subject(d.stored.message.subject).kind in self.kinds
        except SubjectError:
            return True  # not an event subject: decoding says what it is

    async def _settle_current(self) -> None:
        """Acknowledge the event handed out last. It stays current until the log confirmed
        the ack, so an ack cut short (cancelled) is made again by the next call or by close."""
        d = self._current
        if d is None:
            return
        self._current_done = True
        try:
            await d.ack()
        except EventStoreError as e:
            # The consumer starts again after this event: that acknowledges it as well.
            log.warning("subscription %s: ack failed (%s); reopening", self.name, e)
            self._current = None
            self._drop_consumer()
            return
        if self._current is d:
            self._current = None

    async def _fill(self, deadline: float | None) -> bool:
        """Fetch into ``_buffer``: True once something came, False once ``deadline`` passed."""
        loop = asyncio.get_running_loop()
        delay = 0.05
        first = True  # a deadline already passed (next(0)) still asks the log once
        while True:
            if self._closed:  # by another task: never open a consumer again
                raise StopAsyncIteration
            wait = self._fetch_timeout
            if deadline is not None:
                wait = min(wait, deadline - loop.time())
                if wait <= 0 and not first:
                    return False
                wait = max(wait, 0.0)
            first = False
            try:
                if self._broken or self._consumer is None:
                    await self._recreate()
                    self.reconnects += 1
                assert self._consumer is not None
                got = await self._consumer.fetch(self._batch, wait)
            except EventStoreError as e:
                log.warning("subscription %s: %s; retrying in %.2fs", self.name, e, delay)
                self._drop_consumer()
                await asyncio.sleep(delay if deadline is None else min(delay, wait))
                delay = min(delay * 2, self._retry_max)
                continue
            if got:
                # No await between the fetch's return and this: see _next_event.
                self._buffer.extend(sorted(got, key=lambda d: d.position))
                return True

    def _drop_consumer(self) -> None:
        """Forget what the consumer delivered: the next fetch recreates it after the last
        position handed out."""
        self._broken = True
        self._buffer.clear()

    async def _open_consumer(self) -> Consumer:
        return await self._store.consumer(
            self.name,
            self.filters,
            start_after=self._last,
            ack_wait=self._ack_wait,
            max_ack_pending=max(4 * self._batch, 256),
            inactive_threshold=self._inactive_threshold,
        )

    async def _recreate(self) -> None:
        """Delete the consumer and create it again right after the last position handed out.
        Broken until it is done: cut short at any await, the next fetch starts it over."""
        self._drop_consumer()  # the new consumer delivers what was buffered again
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            with contextlib.suppress(EventStoreError, OSError):
                await consumer.close()
        await self._store.delete_consumer(self.name)
        self._consumer = await self._open_consumer()
        self._broken = False

    async def _retrying(self, op: Callable[[], Awaitable[T]]) -> T:
        delay = 0.05
        while True:
            try:
                return await op()
            except EventStoreError as e:
                log.warning("subscription %s: %s; retrying in %.2fs", self.name, e, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._retry_max)

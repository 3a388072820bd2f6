"""An in-memory event store with the JetStream adapter's semantics, for unit tests.

Time comes from an injectable ``clock`` (nanoseconds since the epoch): it stamps messages
and drives the duplicate window, ``ack_wait`` redeliveries, ``nak`` delays and ``max_age``.
Waiting in :meth:`InMemoryConsumer.fetch` uses the event loop's time, bounded by how far the
clock says the next redelivery is.

Limits: ``max_age`` and ``max_msgs_per_subject`` are honoured (oldest first, like JetStream's
``discard: old``); ``max_bytes`` is not (JetStream's byte accounting is not reproduced).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import time
from collections.abc import AsyncGenerator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

from eventstore.errors import (
    ConcurrencyError,
    ConsumerGoneError,
    EventStoreError,
    InvalidAppendError,
    NotProvisionedError,
)
from eventstore.layout import StreamLayout
from eventstore.ports import (
    ALL_EVENTS,
    AppendResult,
    ConsumerSpec,
    Delivery,
    check_append,
    is_filter_subject,
    subject_matches,
)
from proto.message import NatsMessage, StoredMessage

__all__ = ["Clock", "InMemoryConsumer", "InMemoryEventStore", "subject_matches"]

Clock = Callable[[], int]
_NS = 1_000_000_000


@dataclass(slots=True)
class _Pending:
    num_delivered: int
    due_ns: int  # redeliverable from then on (ack_wait expiry or nak delay)


@dataclass(slots=True)
class _ConsumerState:
    spec: ConsumerSpec
    delivered_upto: int  # highest position handed out for the first time
    pending: dict[int, _Pending] = field(default_factory=dict)
    deleted: bool = False


class InMemoryEventStore:
    """:class:`eventstore.ports.EventStore` in memory. Every operation is atomic (no awaits while
    the log changes), so concurrent appends interleave only between calls."""

    def __init__(self, layout: StreamLayout | None = None, *, clock: Clock = time.time_ns) -> None:
        self.layout = layout or StreamLayout()
        self._clock = clock
        self._positions: list[int] = []  # ascending; parallel to _messages
        self._messages: dict[int, StoredMessage] = {}
        self._last_seq = 0
        self._per_subject: dict[str, list[int]] = {}
        self._dedup: dict[str, tuple[int, int]] = {}  # msg_id -> (position, appended at ns)
        self._consumers: dict[str, _ConsumerState] = {}
        self._changed = asyncio.Event()
        self._provisioned = False
        self._notifiers: set[InMemoryNotifier] = set()

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None

    async def provision(self, consumers: Sequence[ConsumerSpec] = ()) -> None:
        self._provisioned = True
        for spec in consumers:
            self._ensure_consumer(spec)

    # -- append ------------------------------------------------------------------------------

    async def append(
        self,
        messages: Sequence[NatsMessage],
        *,
        expected_last: int | None = None,
        scope: str | None = None,
    ) -> AppendResult:
        effective_scope = check_append(messages, expected_last, scope, self.layout.subjects)
        self._check_provisioned()
        now = self._clock()
        self._expire(now)
        known = [self._known(m.msg_id, now) for m in messages]
        if effective_scope is not None:
            assert expected_last is not None
            if all(p is not None for p in known):
                return AppendResult(
                    positions=tuple(p for p in known if p is not None),
                    duplicates=(True,) * len(messages),
                )
            if any(p is not None for p in known):
                raise InvalidAppendError(
                    "some messages of this conditional append were appended before, others not"
                )
            actual = self._last_in(effective_scope)
            if actual != expected_last:
                raise ConcurrencyError(effective_scope, expected_last, actual)
        positions: list[int] = []
        duplicates: list[bool] = []
        for m, pos in zip(messages, known, strict=True):
            if pos is not None:
                positions.append(pos)
                duplicates.append(True)
                continue
            positions.append(self._store(m, now))
            duplicates.append(False)
        self._notify()
        return AppendResult(positions=tuple(positions), duplicates=tuple(duplicates))

    def _known(self, msg_id: str, now: int) -> int | None:
        hit = self._dedup.get(msg_id)
        if hit is None or now - hit[1] >= self._window_ns:
            return None
        return hit[0]

    @property
    def _window_ns(self) -> int:
        return round(self.layout.duplicate_window * _NS)

    def _store(self, message: NatsMessage, now: int) -> int:
        self._last_seq += 1
        seq = self._last_seq
        self._positions.append(seq)
        self._messages[seq] = StoredMessage(position=seq, message=message, time_ns=now)
        self._dedup.pop(message.msg_id, None)  # re-inserted last: keeps the dict oldest-first
        self._dedup[message.msg_id] = (seq, now)
        per = self._per_subject.setdefault(message.subject, [])
        per.append(seq)
        for n in self._notifiers:
            if any(subject_matches(f, message.subject) for f in n.filters):
                n.event.set()
        limit = self.layout.max_msgs_per_subject
        if limit is not None:
            while len(per) > limit:
                self._remove(per[0])
        return seq

    def _remove(self, seq: int) -> None:
        stored = self._messages.pop(seq)
        i = bisect.bisect_left(self._positions, seq)
        del self._positions[i]
        per = self._per_subject[stored.message.subject]
        per.remove(seq)
        if not per:
            del self._per_subject[stored.message.subject]

    def _expire(self, now: int) -> None:
        window = self._window_ns
        # _dedup is in insertion order, i.e. oldest first (the clock does not go back).
        stale: list[str] = []
        for k, (_, at) in self._dedup.items():
            if now - at < window:
                break
            stale.append(k)
        for k in stale:
            del self._dedup[k]
        if self.layout.max_age is not None:
            cutoff = now - round(self.layout.max_age * _NS)
            while self._positions and self._messages[self._positions[0]].time_ns <= cutoff:
                self._remove(self._positions[0])

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _check_provisioned(self) -> None:
        if not self._provisioned:
            raise NotProvisionedError(f"stream {self.layout.name!r} does not exist")

    # -- queries -----------------------------------------------------------------------------

    def _last_in(self, scope: str) -> int:
        last = 0
        for subject, seqs in self._per_subject.items():
            if seqs[-1] > last and subject_matches(scope, subject):
                last = seqs[-1]
        return last

    async def last_position(self, scope: str = ALL_EVENTS) -> int:
        if not is_filter_subject(scope):
            raise ValueError(f"not a subject filter: {scope!r}")
        self._check_provisioned()
        self._expire(self._clock())
        return self._last_in(scope)

    async def notifier(self, filters: Sequence[str]) -> InMemoryNotifier:
        if not filters or not all(map(is_filter_subject, filters)):
            raise ValueError(f"bad filter subjects: {filters!r}")
        n = InMemoryNotifier(self, tuple(filters))
        self._notifiers.add(n)
        return n

    async def last_message(self, scope: str) -> StoredMessage | None:
        last = await self.last_position(scope)
        return self._messages.get(last) if last else None

    def _next_matching(self, after: int, filters: Sequence[str], upto: int) -> StoredMessage | None:
        i = bisect.bisect_right(self._positions, after)
        while i < len(self._positions) and self._positions[i] <= upto:
            stored = self._messages[self._positions[i]]
            if any(subject_matches(f, stored.message.subject) for f in filters):
                return stored
            i += 1
        return None

    async def read(
        self,
        filter_subject: str = ALL_EVENTS,
        *,
        after: int = 0,
        limit: int | None = None,
    ) -> AsyncGenerator[StoredMessage, None]:
        if not is_filter_subject(filter_subject):
            raise ValueError(f"not a subject filter: {filter_subject!r}")
        if limit is not None and limit < 0:
            raise ValueError("limit must be >= 0")
        self._check_provisioned()
        self._expire(self._clock())
        end = self._last_seq
        count = 0
        cursor = after
        while limit is None or count < limit:
            stored = self._next_matching(cursor, (filter_subject,), end)
            if stored is None:
                return
            cursor = stored.position
            count += 1
            yield stored

    # -- durable consumers ------------------------------------------------------------------

    def _ensure_consumer(self, spec: ConsumerSpec) -> _ConsumerState:
        state = self._consumers.get(spec.name)
        if state is None:
            state = _ConsumerState(spec=spec, delivered_upto=spec.start_after)
            self._consumers[spec.name] = state
        else:
            # Mutable settings follow the latest opening; the position never moves.
            state.spec = ConsumerSpec(
                name=spec.name,
                filter_subjects=spec.filter_subjects,
                start_after=state.spec.start_after,
                ack_wait=spec.ack_wait,
                max_ack_pending=spec.max_ack_pending,
                inactive_threshold=spec.inactive_threshold,
            )
        return state

    async def consumer(
        self,
        name: str,
        filter_subjects: Sequence[str] = (ALL_EVENTS,),
        *,
        start_after: int = 0,
        ack_wait: float = 30.0,
        max_ack_pending: int = 1000,
        inactive_threshold: float | None = None,
    ) -> InMemoryConsumer:
        # inactive_threshold is kept but never acted on: nothing here outlives its owner.
        spec = ConsumerSpec(
            name=name,
            filter_subjects=tuple(filter_subjects),
            start_after=start_after,
            ack_wait=ack_wait,
            max_ack_pending=max_ack_pending,
            inactive_threshold=inactive_threshold,
        )
        self._check_provisioned()
        return InMemoryConsumer(self, self._ensure_consumer(spec))

    async def delete_consumer(self, name: str) -> bool:
        state = self._consumers.pop(name, None)
        if state is None:
            return False
        state.deleted = True
        self._notify()
        return True

    def _collect(
        self, state: _ConsumerState, max_messages: int, settler: InMemoryConsumer
    ) -> list[Delivery]:
        now = self._clock()
        self._expire(now)
        spec = state.spec
        ack_wait_ns = round(spec.ack_wait * _NS)
        out: list[Delivery] = []
        for seq in sorted(s for s, p in state.pending.items() if p.due_ns <= now):
            if len(out) >= max_messages:
                return out
            stored = self._messages.get(seq)
            if stored is None:  # removed by a limit: nothing left to redeliver
                del state.pending[seq]
                continue
            p = state.pending[seq]
            p.num_delivered += 1
            p.due_ns = now + ack_wait_ns
            out.append(Delivery(stored, p.num_delivered, settler, seq))
        while len(out) < max_messages and len(state.pending) < spec.max_ack_pending:
            stored = self._next_matching(state.delivered_upto, spec.filter_subjects, self._last_seq)
            if stored is None:
                break
            state.delivered_upto = stored.position
            state.pending[stored.position] = _Pending(num_delivered=1, due_ns=now + ack_wait_ns)
            out.append(Delivery(stored, 1, settler, stored.position))
        return out

    def _next_due_in(self, state: _ConsumerState) -> float | None:
        if not state.pending:
            return None
        due = min(p.due_ns for p in state.pending.values())
        return max(0.0, (due - self._clock()) / _NS)


class InMemoryNotifier:
    def __init__(self, store: InMemoryEventStore, filters: tuple[str, ...]) -> None:
        self.store = store
        self.filters = filters
        self.event = asyncio.Event()

    async def wait(self, timeout: float) -> bool:  # noqa: ASYNC109
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancellation that
        # arrives as the event is set (the gateway cancels a device's command loop this way).
        try:
            async with asyncio.timeout(timeout):
                await self.event.wait()
        except TimeoutError:
            return False
        self.event.clear()
        return True

    async def close(self) -> None:
        self.store._notifiers.discard(self)


class InMemoryConsumer:
    """An open handle on an in-memory durable consumer."""

    def __init__(self, store: InMemoryEventStore, state: _ConsumerState) -> None:
        self._store = store
        self._state = state
        self._closed = False

    @property
    def spec(self) -> ConsumerSpec:
        return self._state.spec

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        self._closed = True

    def _check(self) -> None:
        if self._state.deleted:
            raise ConsumerGoneError(f"consumer {self._state.spec.name!r} was deleted")

    async def fetch(self, max_messages: int, timeout: float) -> list[Delivery]:  # noqa: ASYNC109
        if max_messages < 1:
            raise ValueError("max_messages must be >= 1")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout)
        while True:
            if self._closed:
                raise EventStoreError(f"consumer {self._state.spec.name!r} is closed")
            self._check()
            out = self._store._collect(self._state, max_messages, self)
            if out:
                return out
            remaining = deadline - loop.time()
            if remaining <= 0:
                return []
            due_in = self._store._next_due_in(self._state)
            wait = remaining if due_in is None else min(remaining, due_in)
            changed = self._store._changed
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancellation
            # that arrives as the event is set. Nothing is held across this wait: what
            # _collect hands out is returned with no await in between, so a cancelled fetch
            # loses no delivery (as the JetStream adapter's).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(wait, 0.001)):
                    await changed.wait()

    async def ack_many(self, deliveries: Iterable[Delivery]) -> None:
        for d in deliveries:
            await d.ack()

    async def settle_ack(self, token: object) -> None:
        assert isinstance(token, int)
        self._check()
        self._state.pending.pop(token, None)
        self._store._notify()  # may unblock a consumer held back by max_ack_pending

    async def settle_nak(self, token: object, delay: float | None) -> None:
        assert isinstance(token, int)
        self._check()
        p = self._state.pending.get(token)
        if p is not None:
            p.due_ns = self._store._clock() + round((delay or 0.0) * _NS)
            self._store._notify()

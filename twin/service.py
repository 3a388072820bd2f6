"""The twin projector: the event log, folded into the twin store, durably.

:class:`TwinProjector` reads every event through a durable consumer in batches, folds each
batch onto the devices' twins (from a bounded LRU cache, misses loaded with one ``get_many``),
writes the changed twins with one guarded ``write_many`` and only then acknowledges the batch.
A store failure naks the batch (redelivered at once, ahead of newer events) and backs off.

Why a checkpoint as well as the consumer. The consumer redelivers what was delivered but not
acknowledged, but only after ``ack_wait``: a projector restarted before that would be handed
*newer* events of a device first, write them, and the guarded write would then skip the older
ones when they finally came back — they would be lost from the twin. So the store keeps a
checkpoint per projector (a position up to which every event is written) and the projector
starts by replaying the log from it (``read``) up to the
current end, before it opens the consumer. Whatever the consumer then redelivers from before
is already in the twins and is skipped by position; whatever is new comes in log order. The
same catch-up runs after any failure of the log or the store, so nothing depends on what the
consumer still holds.

The checkpoint is saved after a batch's write at most every ``checkpoint_interval`` seconds,
when the projector finds nothing new to read, and when it stops: an older checkpoint only means
a longer replay on a restart, which the guarded writes make harmless, and a busy projector does
not pay a store write per batch for it (on FerretDB each write costs ~2 ms whatever it writes).
Readers of the checkpoint (the API's device list position, the reaper) see it at most
``checkpoint_interval`` (or ``fetch_timeout``, when idle) behind the twins.

Derived events. The projector appends events that follow from a batch *before* it writes the
batch: ``desired-reached`` when a resource's desired content is met (empty delta) and not yet
marked reached (:func:`twin.commands.reached_events`), ``command-pending`` updates carrying a
delta to an online device (:func:`twin.commands.desired_update_events`) and ``command-canceled``
("device signed off") for the open commands of a device that signed off
(:func:`twin.commands.signoff_cancel_events`). Their ids are derived (from the report that met
the desired state, the desired version, the canceled command), so a replayed or redelivered batch
writes each once. If that append fails nothing is written and the batch comes again, so no
derived event is lost; the fold applies them when they come back.

One projector per twins collection at a time (the consumer hands batches out in log order
only to a single reader; FerretDB's conditional updates are not atomic across writers).
:func:`rebuild` drops the twins and folds the whole log again, writing each twin once
(:mod:`twin.rebuild`); run it with the projector stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Final, Self

from eventstore.errors import EventStoreError
from eventstore.ports import ALL_EVENTS, Consumer, Delivery, EventStore, is_filter_subject
from proto.binding import from_stored, to_nats
from proto.errors import BindingError
from proto.events import AnyEvent, DeviceUnregistered
from proto.message import StoredMessage
from twin.commands import desired_update_events, reached_events, signoff_cancel_events
from twin.errors import (
    ProjectionTimeoutError,
    ProjectorStoppedError,
    TwinStoreError,
)
from twin.fold import fold_batch
from twin.model import Twin
from twin.ports import TwinStore, WriteResult
from twin.rebuild import rebuild_twins

__all__ = [
    "DEFAULT_NAME",
    "ProjectorConfig",
    "ProjectorHooks",
    "ProjectorStats",
    "TwinProjector",
    "rebuild",
]

log = logging.getLogger(__name__)

DEFAULT_NAME: Final = "twin-projector"

Hook = Callable[[Sequence[int]], Awaitable[None]]
Emit = Callable[[Sequence[AnyEvent]], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class ProjectorConfig:
    """How the projector reads and writes. Times in seconds."""

    name: str = DEFAULT_NAME  # the durable consumer's name and the checkpoint's
    filter_subject: str = ALL_EVENTS  # which events of the log to project
    batch_size: int = 500
    fetch_timeout: float = 1.0
    cache_size: int = 10_000  # twins kept in memory between batches
    ack_wait: float = 30.0
    max_ack_pending: int = 1000
    retry_initial: float = 0.05
    retry_max: float = 5.0
    emit_derived_events: bool = True  # append derived events (see the module docstring)
    checkpoint_interval: float = 1.0  # seconds between checkpoint saves under load (0: each batch)
    generation_check_interval: float = 1.0  # seconds between looks for a rebuilt generation
    max_linger: float = 0.05
    """How long a batch may wait to fill (seconds; 0: never), scaled by how busy the store is:
    the share of the last second the projector spent folding and writing, over
    ``busy_for_full_linger`` (a store busy half the time waits the whole ``max_linger``; an idle
    one writes at once). Events a few milliseconds apart (a command's pending, sent and outcome)
    then cost one write, not one each. Past what the store keeps up with, batches fill during
    each write anyway."""
    busy_for_full_linger: float = 0.5

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if not is_filter_subject(self.filter_subject):
            raise ValueError(f"not a subject filter: {self.filter_subject!r}")
        if self.max_ack_pending < self.batch_size:
            raise ValueError("max_ack_pending must be >= batch_size")
        if self.cache_size < 0:
            raise ValueError("cache_size must be >= 0")
        if not (self.fetch_timeout > 0 and self.ack_wait > 0):
            raise ValueError("fetch_timeout and ack_wait must be > 0")
        if not 0 < self.retry_initial <= self.retry_max:
            raise ValueError("need 0 < retry_initial <= retry_max")
        if self.checkpoint_interval < 0:
            raise ValueError("checkpoint_interval must be >= 0")
        if not self.generation_check_interval > 0:
            raise ValueError("generation_check_interval must be > 0")
        if self.max_linger < 0:
            raise ValueError("max_linger must be >= 0")
        if not 0 < self.busy_for_full_linger <= 1:
            raise ValueError("busy_for_full_linger must be in (0, 1]")


@dataclass(frozen=True, slots=True)
class ProjectorHooks:
    """Test seams: awaited with the batch's log positions around the write.

    ``after_write`` runs once the twins are written (and the checkpoint, when it is due) and
    before the batch is acknowledged: an exception there is a crash at the worst moment.
    """

    before_write: Hook | None = None
    after_write: Hook | None = None


@dataclass(frozen=True, slots=True)
class ProjectorStats:
    """Counters since the projector (or rebuild) started.

    ``events_applied``: events that moved a twin forward and were written.
    ``duplicates_skipped``: events a twin already reflected (redeliveries, replays), or whose
    write the store refused as stale. ``position``: the highest log position processed.
    ``commands_ended``: commands whose end (succeeded, failed, expired, canceled) was folded.
    """

    events_applied: int = 0
    duplicates_skipped: int = 0
    unknown_events: int = 0
    undecodable_events: int = 0
    batches: int = 0
    store_failures: int = 0
    log_failures: int = 0
    position: int = 0
    commands_ended: int = 0


class _LruTwins:
    """The last ``size`` twins written, by device id."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._twins: OrderedDict[str, Twin] = OrderedDict()

    def get(self, device_id: str) -> Twin | None:
        twin = self._twins.get(device_id)
        if twin is not None:
            self._twins.move_to_end(device_id)
        return twin

    def put(self, twin: Twin) -> None:
        if self._size == 0:
            return
        self._twins[twin.device_id] = twin
        self._twins.move_to_end(twin.device_id)
        while len(self._twins) > self._size:
            self._twins.popitem(last=False)

    def discard(self, device_id: str) -> None:
        self._twins.pop(device_id, None)


@dataclass(slots=True)
class _Counters:
    events_applied: int = 0
    duplicates_skipped: int = 0
    unknown_events: int = 0
    undecodable_events: int = 0
    batches: int = 0
    store_failures: int = 0
    log_failures: int = 0
    position: int = 0
    commands_ended: int = 0

    def snapshot(self) -> ProjectorStats:
        return ProjectorStats(
            events_applied=self.events_applied,
            duplicates_skipped=self.duplicates_skipped,
            unknown_events=self.unknown_events,
            undecodable_events=self.undecodable_events,
            batches=self.batches,
            store_failures=self.store_failures,
            log_failures=self.log_failures,
            position=self.position,
            commands_ended=self.commands_ended,
        )


@dataclass(slots=True)
class _Projection:
    """Applies batches of log messages to the store: decode, load, fold, write, checkpoint."""

    store: TwinStore
    name: str
    cache: _LruTwins
    hooks: ProjectorHooks = field(default_factory=ProjectorHooks)
    counters: _Counters = field(default_factory=_Counters)
    emit: Emit | None = None
    unsaved: int = 0  # the highest position written that the checkpoint does not cover yet
    checkpoint_writes: int = 0

    async def save_checkpoint(self) -> None:
        """Save the checkpoint up to what is written, if it is behind."""
        if self.unsaved:
            await self.store.save_checkpoint(self.name, self.unsaved)
            self.unsaved = 0
            self.checkpoint_writes += 1

    async def apply(self, messages: Sequence[StoredMessage], *, checkpoint: bool = True) -> None:
        """Fold and write one batch; raises :class:`TwinStoreError` with nothing acknowledged.

        On return every message is reflected in the store (or was undecodable); the checkpoint
        covers the batch if ``checkpoint`` (else :meth:`save_checkpoint` saves it later).
        """
        positions = [m.position for m in messages]
        events = [e for e in map(self._decode, messages) if e is not None]
        devices = {e.device_id for e in events}
        try:
            current: dict[str, Twin | None] = {}
            missing: list[str] = []
            for device_id in devices:
                cached = self.cache.get(device_id)
                if cached is None:
                    missing.append(device_id)
                else:
                    current[device_id] = cached
            if missing:
                current.update(await self.store.get_many(missing))
            folded = fold_batch(current, events)
            if self.emit is not None:
                now = datetime.now(UTC)
                signed_off: dict[str, int] = {}
                for e in events:
                    if isinstance(e.data, DeviceUnregistered) and e.position is not None:
                        signed_off[e.device_id] = max(e.position, signed_off.get(e.device_id, 0))
                derived = [
                    e
                    for t in folded.twins.values()
                    for e in (
                        *signoff_cancel_events(t, now, signed_off.get(t.device_id, 0)),
                        *reached_events(t, now),
                        *desired_update_events(t, now),
                    )
                ]
                if derived:
                    await self.emit(derived)
            if self.hooks.before_write is not None:
                await self.hooks.before_write(positions)
            result = (
                await self.store.write_many(
                    folded.twins.values(), previous=current, ended=folded.ended
                )
                if folded.twins
                else WriteResult()
            )
            self.unsaved = max(self.unsaved, *positions)
            if checkpoint:
                await self.save_checkpoint()
        except BaseException:
            # The store may hold part of the batch now: read those twins again next time.
            for device_id in devices:
                self.cache.discard(device_id)
            raise
        for device_id in result.written:
            self.cache.put(folded.twins[device_id])
        refused = 0
        for device_id in set(result.skipped):
            # Someone wrote this twin further than we folded it: our cached copy is behind.
            self.cache.discard(device_id)
            refused += folded.applied.get(device_id, 0)
        c = self.counters
        c.events_applied += folded.applied_total - refused
        c.duplicates_skipped += folded.stale + refused
        c.unknown_events += folded.unknown
        c.commands_ended += sum(len(done) for done in folded.ended.values())
        c.batches += 1
        log.debug(
            "%s: batch %d..%d, %d events, %d twins written, %d duplicates",
            self.name,
            min(positions),
            max(positions),
            len(events),
            len(result.written),
            folded.stale + refused,
        )
        if self.hooks.after_write is not None:
            await self.hooks.after_write(positions)

    def _decode(self, message: StoredMessage) -> AnyEvent | None:
        try:
            return from_stored(message)
        except BindingError as e:
            # It can never be folded; holding it back would block every device behind it.
            self.counters.undecodable_events += 1
            log.error(
                "%s: skipping undecodable event at position %d on %s: %s",
                self.name,
                message.position,
                message.message.subject,
                e,
            )
            return None


class _GenerationSwitched(Exception):
    """The store bound to another generation (a rebuild finished): fold again from its
    checkpoint."""


class _Backoff:
    def __init__(self, initial: float, maximum: float) -> None:
        self._initial = initial
        self._max = maximum
        self._next = initial

    def next(self) -> float:
        delay = self._next
        self._next = min(self._max, self._next * 2)
        return delay

    def reset(self) -> None:
        self._next = self._initial


class TwinProjector:
    """Keeps the twin store up to date with the log. An async context manager::

        async with TwinProjector(store, events) as projector:
            ...  # runs in a background task until the block exits

    or run :meth:`run` in a task group yourself.
    """

    def __init__(
        self,
        store: TwinStore,
        events: EventStore,
        config: ProjectorConfig | None = None,
        *,
        hooks: ProjectorHooks | None = None,
    ) -> None:
        self._store = store
        self._events = events
        self.config = config or ProjectorConfig()
        self._projection = _Projection(
            store=store,
            name=self.config.name,
            cache=_LruTwins(self.config.cache_size),
            hooks=hooks or ProjectorHooks(),
            emit=self._emit if self.config.emit_derived_events else None,
        )
        self._task: asyncio.Task[None] | None = None
        self._failure_seen = False  # the loop's failure was raised to a caller already
        self._wakeup = asyncio.Event()
        self._saved_at = float("-inf")  # loop time of the last checkpoint save
        self._generation_checked_at = float("-inf")
        self._busy = 0.0  # seconds spent applying batches, decaying with a 1 s time constant
        self._busy_at = 0.0  # loop time of that figure

    async def _check_generation(self) -> None:
        """Between batches, now and then: a rebuild made another generation active."""
        now = asyncio.get_running_loop().time()
        if now - self._generation_checked_at < self.config.generation_check_interval:
            return
        self._generation_checked_at = now
        if await self._store.resolve_generation():
            raise _GenerationSwitched

    def _checkpoint_due(self) -> bool:
        return asyncio.get_running_loop().time() - self._saved_at >= self.config.checkpoint_interval

    async def _apply(self, messages: Sequence[StoredMessage]) -> None:
        loop = asyncio.get_running_loop()
        due = self._checkpoint_due()
        started = loop.time()
        await self._projection.apply(messages, checkpoint=due)
        now = loop.time()
        self._busy = self._busy_share(now) + (now - started)
        self._busy_at = now
        if due:
            self._saved_at = now

    def _busy_share(self, now: float) -> float:
        """The share of the recent past (a 1 s exponential window) spent applying batches."""
        return self._busy * math.exp(-max(0.0, now - self._busy_at))

    async def _linger(self, consumer: Consumer, deliveries: list[Delivery]) -> list[Delivery]:
        """More events for a batch that is not full, the longer the busier the store is (see
        ``max_linger``)."""
        cfg = self.config
        loop = asyncio.get_running_loop()
        now = loop.time()
        busy = min(1.0, self._busy_share(now) / cfg.busy_for_full_linger)
        linger = cfg.max_linger * busy
        if linger < 0.001 or len(deliveries) >= cfg.batch_size:
            return deliveries
        deadline = now + linger
        while len(deliveries) < cfg.batch_size:
            left = deadline - loop.time()
            if left < 0.001:  # the log's pull requests count in milliseconds
                break
            more = await consumer.fetch(cfg.batch_size - len(deliveries), left)
            if not more:
                break
            deliveries.extend(more)
        return deliveries

    async def _save_checkpoint(self) -> None:
        await self._projection.save_checkpoint()
        self._saved_at = asyncio.get_running_loop().time()

    async def _emit(self, events: Sequence[AnyEvent]) -> None:
        by_device: dict[str, list[AnyEvent]] = {}
        for e in events:
            by_device.setdefault(e.device_id, []).append(e)
        for device_events in by_device.values():
            await self._events.append([to_nats(e) for e in device_events])
        log.info("%s: %d derived event(s) appended", self.config.name, len(events))

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._task is not None:
            raise RuntimeError("projector already started")
        self._task = asyncio.create_task(self.run(), name=f"twin-projector:{self.config.name}")
        self._task.add_done_callback(lambda _: self._notify())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        task = self._task
        if task is None:
            return
        if not task.done():
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait([task])
        if (
            exc is None
            and not self._failure_seen
            and not task.cancelled()
            and task.exception() is not None
        ):
            raise ProjectorStoppedError(f"projector {self.config.name!r} failed") from (
                task.exception()
            )

    async def join(self) -> None:
        """Wait for the background loop to end; re-raise what ended it."""
        if self._task is None:
            raise ProjectorStoppedError("projector not started")
        try:
            await asyncio.shield(self._task)
        except Exception:
            self._failure_seen = True
            raise

    # -- observation ---------------------------------------------------------------------------

    @property
    def stats(self) -> ProjectorStats:
        return self._projection.counters.snapshot()

    @property
    def running(self) -> bool:
        """Whether the background loop runs (started, not ended by cancellation or failure)."""
        return self._task is not None and not self._task.done()

    @property
    def position(self) -> int:
        """The highest log position whose batch is written (and, past catch-up, acknowledged)."""
        return self._projection.counters.position

    async def wait_for_position(self, position: int, timeout: float) -> None:  # noqa: ASYNC109
        """Return once every event up to ``position`` is in the twin store.

        :class:`ProjectionTimeoutError` after ``timeout`` seconds, :class:`ProjectorStoppedError`
        if the projector stops first.
        """
        try:
            async with asyncio.timeout(timeout):
                while self.position < position:
                    if self._task is None or self._task.done():
                        cause = None
                        if self._task is not None and not self._task.cancelled():
                            cause = self._task.exception()
                            self._failure_seen = True
                        raise ProjectorStoppedError(
                            f"projector {self.config.name!r} stopped at position {self.position}"
                        ) from cause
                    await self._wakeup.wait()
        except TimeoutError as e:
            raise ProjectionTimeoutError(
                f"position {position} not reached in {timeout}s (at {self.position})"
            ) from e

    def _notify(self) -> None:
        self._wakeup.set()
        self._wakeup = asyncio.Event()

    def _advance(self, position: int) -> None:
        c = self._projection.counters
        if position > c.position:
            c.position = position
        self._notify()

    # -- the loop ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Project until cancelled; failures of the log or the store are retried forever."""
        cfg = self.config
        backoff = _Backoff(cfg.retry_initial, cfg.retry_max)
        log.info("twin projector %s starting", cfg.name)
        try:
            while True:
                try:
                    head = await self._catch_up()
                    consumer = await self._events.consumer(
                        cfg.name,
                        (cfg.filter_subject,),
                        start_after=head,
                        ack_wait=cfg.ack_wait,
                        max_ack_pending=cfg.max_ack_pending,
                    )
                    async with consumer:
                        log.info("twin projector %s caught up to %d, consuming", cfg.name, head)
                        await self._consume(consumer, backoff)
                except _GenerationSwitched:
                    await self._switched()
                except TwinStoreError as e:
                    self._projection.counters.store_failures += 1
                    delay = backoff.next()
                    log.warning("twin projector %s: store: %s; retry in %.2fs", cfg.name, e, delay)
                    await asyncio.sleep(delay)
                except EventStoreError as e:
                    self._projection.counters.log_failures += 1
                    delay = backoff.next()
                    log.warning("twin projector %s: log: %s; retry in %.2fs", cfg.name, e, delay)
                    await asyncio.sleep(delay)
        finally:
            if self._projection.unsaved:
                try:  # a stop saves what is written (a crash leaves a longer replay, harmless)
                    async with asyncio.timeout(cfg.fetch_timeout + 1.0):
                        await self._projection.save_checkpoint()
                except (asyncio.CancelledError, Exception) as e:
                    log.warning("twin projector %s: checkpoint not saved on stop: %r", cfg.name, e)
            log.info("twin projector %s stopped at %d", cfg.name, self.position)

    async def _switched(self) -> None:
        """Forget what was folded into the old generation: its twins in the cache, its unsaved
        checkpoint; the position goes back to the new generation's checkpoint (readers waiting
        for a position wait for the catch-up into the new twins)."""
        projection = self._projection
        projection.cache = _LruTwins(self.config.cache_size)
        projection.unsaved = 0
        position = await self._store.checkpoint(self.config.name)
        log.info(
            "twin projector %s: another generation of twins is active; folding from %d",
            self.config.name,
            position,
        )
        projection.counters.position = position
        self._notify()

    async def _catch_up(self) -> int:
        """Replay the log from the checkpoint to its current end; returns the end position."""
        cfg = self.config
        head = await self._store.checkpoint(cfg.name)
        batch: list[StoredMessage] = []
        async for stored in self._events.read(cfg.filter_subject, after=head):
            batch.append(stored)
            if len(batch) >= cfg.batch_size:
                await self._apply(batch)
                head = batch[-1].position
                self._advance(head)
                batch = []
        if batch:
            await self._apply(batch)
            head = batch[-1].position
        await self._save_checkpoint()
        self._advance(head)
        return head

    async def _consume(self, consumer: Consumer, backoff: _Backoff) -> None:
        cfg = self.config
        while True:
            await self._check_generation()
            deliveries = await consumer.fetch(cfg.batch_size, cfg.fetch_timeout)
            if not deliveries:
                if self._projection.unsaved:  # idle: the checkpoint catches up with the twins
                    await self._save_checkpoint()
                continue
            deliveries = await self._linger(consumer, list(deliveries))
            try:
                await self._apply([d.stored for d in deliveries])
            except TwinStoreError as e:
                self._projection.counters.store_failures += 1
                delay = backoff.next()
                log.warning(
                    "twin projector %s: store: %s; %d events back to the log, retry in %.2fs",
                    cfg.name,
                    e,
                    len(deliveries),
                    delay,
                )
                await _nak_in_order(deliveries)
                await asyncio.sleep(delay)
                continue
            await consumer.ack_many(deliveries)
            backoff.reset()
            self._advance(max(d.position for d in deliveries))


async def _nak_in_order(deliveries: Sequence[Delivery]) -> None:
    # One at a time, oldest first: redeliveries then come back in log order.
    for d in sorted(deliveries, key=lambda d: d.position):
        await d.nak()


async def rebuild(
    store: TwinStore,
    events: EventStore,
    *,
    name: str = DEFAULT_NAME,
    filter_subject: str = ALL_EVENTS,
    batch_size: int = 1000,
    max_twins: int = 50_000,
) -> int:
    """Drop every twin and fold the whole log again, writing each twin once
    (:func:`twin.rebuild.rebuild_twins`); returns the number of events applied.

    Leaves projector ``name``'s checkpoint at the end of the log, so a projector started
    afterwards continues from there. Run it with the projector stopped.
    """
    stats = await rebuild_twins(
        store,
        events,
        name=name,
        filter_subject=filter_subject,
        batch_size=batch_size,
        max_twins=max_twins,
    )
    return stats.events_applied

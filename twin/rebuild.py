"""Rebuilding the twins from the log, writing each twin once.

:func:`rebuild` drops the twins and reads the whole log once, in log order, folding every event
into twins held in memory (:func:`twin.fold.fold_batch` per chunk of ``batch_size`` events). It
writes them only when the log is read to its end, or when more than ``max_twins`` devices are
held: then all of them are written (one guarded ``write_many``) and forgotten, and a device met
again later is read back from the store first. So with at most ``max_twins`` devices every twin
is written exactly once; with more, a device is written once per flush it was part of. The
store's writes (each ~2 ms on FerretDB, whatever the document) were the rebuild's cost when it
wrote the changed twins after each batch, as the projector does.

Ended commands are remembered as the projector remembers them (``ended`` of each fold, written
with the twins), so a command request repeating an old correlation id is answered as before the
rebuild. The projector's checkpoint ``name`` is left at the end of what was read, so a projector
started afterwards goes on from there.

:func:`rebuild_twins` drops the twins of the store it is given: run it with the projector
stopped, or give it a generation nobody reads. :func:`rebuild_beside` does the latter while the
twin service runs: it rebuilds into the next generation of the store's twins
(:class:`twin.ports.GenerationalTwinStore`), makes it active in one step, and drops the old one
after a grace period. The live projector goes on writing the old generation meanwhile (readers
see it, a little behind the log at worst), then, within its ``generation_check_interval``, binds
to the new one and folds what came after the rebuild's checkpoint; a twin service started later
binds to the active generation when it opens the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Final

from eventstore.ports import ALL_EVENTS, EventStore
from proto.binding import from_stored
from proto.errors import BindingError
from proto.events import AnyEvent
from proto.message import StoredMessage
from twin.fold import fold_batch
from twin.model import EndedCommand, Twin
from twin.ports import GenerationalTwinStore, TwinStore

__all__ = ["RebuildStats", "rebuild_beside", "rebuild_twins"]

log = logging.getLogger(__name__)

READ_AHEAD: Final = 4  # batches read ahead of the fold


@dataclass(frozen=True, slots=True)
class RebuildStats:
    """What a rebuild did: events read and applied, twins written, flushes (writes of every
    twin held), and the log position it ended at."""

    events_read: int = 0
    events_applied: int = 0
    unknown_events: int = 0
    undecodable_events: int = 0
    twins_written: int = 0
    flushes: int = 0
    position: int = 0


class _Rebuild:
    def __init__(self, store: TwinStore, max_twins: int) -> None:
        self.store = store
        self.max_twins = max_twins
        self.held: dict[str, Twin | None] = {}  # device -> twin folded so far (None: none yet)
        self.before: dict[str, Twin | None] = {}  # device -> twin as stored when first held
        self.ended: dict[str, list[EndedCommand]] = {}
        self.written: set[str] = set()  # devices a flush wrote (to read back when met again)
        self.read = self.applied = self.unknown = self.undecodable = 0
        self.twins_written = self.flushes = 0
        self.position = 0

    async def apply(self, messages: list[StoredMessage]) -> None:
        events: list[AnyEvent] = []
        for m in messages:
            try:
                events.append(from_stored(m))
            except BindingError as e:
                self.undecodable += 1
                log.error("rebuild: skipping undecodable event at position %d: %s", m.position, e)
        self.read += len(messages)
        self.position = max(self.position, messages[-1].position)
        new = {e.device_id for e in events if e.device_id not in self.held}
        back = [d for d in new if d in self.written]
        stored = await self.store.get_many(back) if back else {}
        for device_id in new:
            twin = stored.get(device_id)
            self.held[device_id] = twin
            self.before[device_id] = twin
        folded = fold_batch(self.held, events)
        self.held.update(folded.twins)
        for device_id, done in folded.ended.items():
            self.ended.setdefault(device_id, []).extend(done)
        self.applied += folded.applied_total
        self.unknown += folded.unknown
        if len(self.held) > self.max_twins:
            await self.flush()

    async def flush(self) -> None:
        twins = [t for t in self.held.values() if t is not None]
        if twins:
            result = await self.store.write_many(twins, previous=self.before, ended=self.ended)
            self.twins_written += len(result.written)
            self.written.update(result.written)
        self.flushes += 1
        self.held.clear()
        self.before.clear()
        self.ended.clear()

    def stats(self) -> RebuildStats:
        return RebuildStats(
            events_read=self.read,
            events_applied=self.applied,
            unknown_events=self.unknown,
            undecodable_events=self.undecodable,
            twins_written=self.twins_written,
            flushes=self.flushes,
            position=self.position,
        )


async def rebuild_twins(
    store: TwinStore,
    events: EventStore,
    *,
    name: str,
    filter_subject: str = ALL_EVENTS,
    batch_size: int = 1000,
    max_twins: int = 50_000,
) -> RebuildStats:
    """Drop every twin and fold the whole log again, each twin written once (see the module
    docstring). Raises the store's and the log's errors (the twins are then incomplete: run
    it again)."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    if max_twins < 1:
        raise ValueError("max_twins must be >= 1")
    await store.drop()
    await store.ensure_indexes()
    run = _Rebuild(store, max_twins)
    # The log is read ahead by a task of its own while the batches are folded: the reads'
    # round trips overlap the folding (a few batches ahead at most).
    batches: asyncio.Queue[list[StoredMessage] | Exception | None] = asyncio.Queue(READ_AHEAD)

    async def read() -> None:
        try:
            batch: list[StoredMessage] = []
            async for stored in events.read(filter_subject, after=0):
                batch.append(stored)
                if len(batch) >= batch_size:
                    await batches.put(batch)
                    batch = []
            if batch:
                await batches.put(batch)
            await batches.put(None)  # the end
        except Exception as e:  # to the fold's side, which raises it
            await batches.put(e)

    reader = asyncio.create_task(read(), name="rebuild-reader")
    try:
        while (item := await batches.get()) is not None:
            if isinstance(item, Exception):
                raise item
            await run.apply(item)
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
    await run.flush()
    if run.position:
        await store.save_checkpoint(name, run.position)
    stats = run.stats()
    log.info(
        "rebuilt twins from the log: %d events applied, %d twins written in %d flush(es) "
        "(%d unknown, %d undecodable)",
        stats.events_applied,
        stats.twins_written,
        stats.flushes,
        stats.unknown_events,
        stats.undecodable_events,
    )
    return stats


async def rebuild_beside(
    store: GenerationalTwinStore,
    events: EventStore,
    *,
    name: str,
    filter_subject: str = ALL_EVENTS,
    batch_size: int = 1000,
    max_twins: int = 50_000,
    grace: float = 10.0,
) -> tuple[int, RebuildStats]:
    """Rebuild into the generation after the active one, activate it, wait ``grace`` seconds
    (readers of other processes bind to it: the projector looks every
    ``generation_check_interval``), then drop every other generation. Returns the new
    generation and what the rebuild did. A failure before the activation leaves the active
    generation as it was (the half-built one is dropped by the next rebuild)."""
    if grace < 0:
        raise ValueError("grace must be >= 0")
    active = await store.active_generation()
    # leftovers: an older generation written to after its grace, a half-built one
    await store.at_generation(active).drop_other_generations()
    target = store.at_generation(active + 1)
    stats = await rebuild_twins(
        target,
        events,
        name=name,
        filter_subject=filter_subject,
        batch_size=batch_size,
        max_twins=max_twins,
    )
    await store.activate(target.generation)
    log.info("rebuilt twins: generation %d is active", target.generation)
    if grace:
        await asyncio.sleep(grace)
    await target.drop_other_generations()
    return target.generation, stats

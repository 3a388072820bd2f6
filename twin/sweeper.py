"""The expiry sweeper: nothing stays pending forever, even for a device that never returns.

Every ``interval`` seconds it asks the twin store for twins with an open command whose
deadline passed (:meth:`~twin.ports.TwinStore.due`: an indexed range on ``next_expiry``),
brings each up to date with its log tail (:func:`twin.api.latest_twin`: the command may have
ended a moment ago) and appends ``command-expired`` for what is still open and past its
deadline (:func:`twin.commands.expiry_events`). A command already *sent* gets
:data:`~twin.model.SENT_GRACE` more for the device's answer.

Several sweepers (one per twin instance) may run: the events' ids are derived from the command,
so the log writes each expiry once within its duplicate window, and the fold ignores a second
end of a command anyway. The twin in the store reflects an expiry once the projector folded it;
until then the sweeper finds the twin again and its tail read shows the command ended.

Every ``forget_interval`` seconds a sweep also deletes the ended commands the store no longer
needs to remember (:meth:`~twin.ports.TwinStore.forget_ended`: past the store's
``command_memory``; the command API ignores them from then on anyway).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Self

from eventstore.errors import EventStoreError
from eventstore.ports import EventStore
from proto import binding
from twin.api import latest_twin
from twin.commands import expiry_events
from twin.errors import TwinStoreError
from twin.ports import TwinStore

__all__ = ["ExpirySweeper", "SweeperConfig"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SweeperConfig:
    interval: float = 1.0  # seconds between sweeps
    batch: int = 200  # twins looked at per query
    forget_interval: float = 60.0  # seconds between deletions of ended commands past memory

    def __post_init__(self) -> None:
        if not self.interval > 0:
            raise ValueError("interval must be > 0")
        if self.batch < 1:
            raise ValueError("batch must be >= 1")
        if not self.forget_interval > 0:
            raise ValueError("forget_interval must be > 0")


class ExpirySweeper:
    """Runs :meth:`sweep` periodically as an async context manager (or call it yourself)."""

    def __init__(
        self,
        twins: TwinStore,
        events: EventStore,
        config: SweeperConfig | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._twins = twins
        self._events = events
        self.config = config or SweeperConfig()
        self._clock = clock
        self._task: asyncio.Task[None] | None = None
        self.expired_total = 0
        self.forgotten_total = 0
        self._forget_at = 0.0  # when the next sweep deletes ended commands (clock seconds)

    async def sweep(self) -> int:
        """One pass over the due twins; returns how many commands it expired."""
        now = datetime.fromtimestamp(self._clock(), UTC)
        expired = 0
        for stale in await self._twins.due(now, self.config.batch):
            twin = await latest_twin(self._twins, self._events, stale.device_id)
            if twin is None:
                continue
            events = expiry_events(twin, now)
            if not events:
                continue
            result = await self._events.append([binding.to_nats(e) for e in events])
            fresh = sum(not d for d in result.duplicates)
            expired += fresh
            log.info(
                "expired %d command(s) of device %s (%d already expired)",
                fresh,
                twin.device_id,
                len(events) - fresh,
            )
        self.expired_total += expired
        if self._clock() >= self._forget_at:
            self._forget_at = self._clock() + self.config.forget_interval
            forgotten = await self._twins.forget_ended(now)
            self.forgotten_total += forgotten
            if forgotten:
                log.info("forgot %d ended command(s) past the store's memory", forgotten)
        return expired

    async def run(self) -> None:
        """Sweep every ``interval`` until cancelled; failures are logged and retried."""
        while True:
            try:
                await self.sweep()
            except (EventStoreError, TwinStoreError) as e:
                log.warning("expiry sweep failed: %s; retrying", e)
            except Exception:  # a bug must not stop expiry for good
                log.exception("expiry sweep failed; retrying")
            await asyncio.sleep(self.config.interval)

    async def __aenter__(self) -> Self:
        self._task = asyncio.create_task(self.run(), name="twin-expiry-sweeper")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

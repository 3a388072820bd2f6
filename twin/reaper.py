"""The gateway reaper: the devices of a dead gateway instance go offline.

:class:`GatewayReaper` polls the lease stream every ``poll_interval`` (a read of the last
record of every instance: one message per subject), feeds :class:`twin.gateways.LeaseTable`
and carries out its claims:

1. write the claim (``reaping``, conditional on the entry it saw; lost to another writer:
   nothing more to do);
2. wait until the projector's checkpoint reaches the log's end as it was then, so the twin
   store shows every connection the instance opened (its gateway is gone or fenced: it adds
   none);
3. for every device the store shows online on a connection of the instance
   (:class:`twin.gateways.HeldConnections`), read its last ``device-online`` and
   ``device-offline`` and append what :func:`twin.gateways.offline_event` decides (conditional
   on the device's ``device-online`` subjects, derived ids), ``concurrency`` devices at a time;
4. write ``reaped``.

A failure in 2-4 is retried a few times; after that the claim stays ``reaping`` and is taken
over after ``takeover_after`` (by any reaper, this one included). Several twin instances may
each run a reaper: claims are conditional, the offline events' ids derived and their appends
conditional, so whatever runs twice writes nothing twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Final, Self

from eventstore.errors import ConcurrencyError, EventStoreError
from eventstore.ports import ALL_EVENTS, EventStore
from proto import binding, subjects
from proto.errors import BindingError, LeaseError
from proto.events import AnyEvent, DeviceOffline
from proto.leases import ALL_LEASES, LeaseEntry, LeaseState, decode_entry, new_instance_id
from proto.message import NatsMessage
from twin.errors import TwinStoreError
from twin.gateways import (
    Claim,
    HeldConnection,
    HeldConnections,
    LeaseTable,
    claim_record,
    offline_event,
    offline_scope,
)
from twin.ports import TwinStore
from twin.service import DEFAULT_NAME

__all__ = ["GatewayReaper", "ReaperConfig", "ReaperStats", "StoreConnections"]

log = logging.getLogger(__name__)

REAP_ATTEMPTS: Final = 4
CONFLICT_ATTEMPTS: Final = 3


@dataclass(frozen=True, slots=True)
class ReaperConfig:
    """Times in seconds. ``filters``: which lease subjects to follow. ``projector``,
    ``projector_filter``: the projector whose checkpoint a reap waits for (at most
    ``catch_up_timeout``)."""

    poll_interval: float = 1.0
    takeover_after: float = 60.0
    concurrency: int = 32
    filters: tuple[str, ...] = (ALL_LEASES,)
    projector: str = DEFAULT_NAME
    projector_filter: str = ALL_EVENTS
    catch_up_timeout: float = 30.0
    retry_initial: float = 0.5

    def __post_init__(self) -> None:
        object.__setattr__(self, "filters", tuple(self.filters))
        if not self.poll_interval > 0:
            raise ValueError("poll_interval must be > 0")
        if not self.takeover_after > 0:
            raise ValueError("takeover_after must be > 0")
        if self.concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if not self.filters:
            raise ValueError("filters must not be empty")
        if not self.catch_up_timeout > 0 or not self.retry_initial > 0:
            raise ValueError("catch_up_timeout and retry_initial must be > 0")


@dataclass(frozen=True, slots=True)
class ReaperStats:
    """``instances``: per lease state, the instances the last poll saw. ``lost_total``:
    claims this reaper won; ``devices_offline_total``: the offline events it appended."""

    instances: dict[LeaseState, int] = field(default_factory=dict)
    lost_total: int = 0
    reaped_total: int = 0
    devices_offline_total: int = 0
    poll_failures_total: int = 0
    reap_failures_total: int = 0


class StoreConnections:
    """:class:`twin.gateways.HeldConnections` over any twin store, by paging through its
    online twins (for the in-memory store; the Mongo adapter has an indexed query)."""

    def __init__(self, twins: TwinStore, page: int = 500) -> None:
        self._twins = twins
        self._page = page

    async def held_by(self, gateway: str, instance: str) -> AsyncIterator[HeldConnection]:
        prefix = f"{instance}."
        after: str | None = None
        while True:
            page = await self._twins.find(online=True, limit=self._page, after_id=after)
            for t in page:
                c = t.connection
                if c.online and c.gateway == gateway and c.connection_id.startswith(prefix):
                    yield HeldConnection(t.device_id, t.owner, c.connection_id)
            if len(page) < self._page:
                return
            after = page[-1].device_id


class GatewayReaper:
    """Runs the reaper as an async context manager (or call :meth:`poll` / :meth:`reap`)."""

    def __init__(
        self,
        leases: EventStore,
        events: EventStore,
        twins: TwinStore,
        held: HeldConnections,
        config: ReaperConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._leases = leases
        self._events = events
        self._twins = twins
        self._held = held
        self.config = config or ReaperConfig()
        self._clock = clock
        self._wall = wall
        self.reaper_id = f"twin-{new_instance_id()}"
        self.table = LeaseTable(takeover_after=self.config.takeover_after)
        self._task: asyncio.Task[None] | None = None
        self._reaps: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._bad: set[int] = set()  # positions of undecodable lease messages, logged once
        self._lost = self._reaped = self._offline = 0
        self._poll_failures = self._reap_failures = 0

    @property
    def stats(self) -> ReaperStats:
        return ReaperStats(
            instances=self.table.counts(),
            lost_total=self._lost,
            reaped_total=self._reaped,
            devices_offline_total=self._offline,
            poll_failures_total=self._poll_failures,
            reap_failures_total=self._reap_failures,
        )

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        self._task = asyncio.create_task(self.run(), name="twin-gateway-reaper")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        tasks = [t for t in (self._task, *self._reaps.values()) if t is not None]
        self._task = None
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t

    async def run(self) -> None:
        """Poll and reap until cancelled; failures are logged and retried."""
        log.info("gateway reaper %s following %s", self.reaper_id, ", ".join(self.config.filters))
        while True:
            try:
                claims = await self.poll()
            except EventStoreError as e:
                self._poll_failures += 1
                log.warning("gateway reaper: cannot read the leases: %s", e)
                claims = []
            for claim in claims:
                task = asyncio.create_task(
                    self.reap(claim), name=f"reap:{claim.gateway}:{claim.instance}"
                )
                self._reaps[claim.key] = task
                task.add_done_callback(self._reap_done)
            await asyncio.sleep(self.config.poll_interval)

    def _reap_done(self, task: asyncio.Task[None]) -> None:
        for key, t in list(self._reaps.items()):
            if t is task:
                del self._reaps[key]

    # -- one poll ----------------------------------------------------------------------------

    async def poll(self) -> list[Claim]:
        """Read the lease stream; the claims it calls for (each busy until reaped)."""
        entries: list[LeaseEntry] = []
        try:
            for f in self.config.filters:
                async for stored in self._leases.read(f):
                    try:
                        entries.append(decode_entry(stored))
                    except LeaseError as e:
                        if stored.position not in self._bad:
                            self._bad.add(stored.position)
                            log.warning(
                                "lease stream: ignoring position %d: %s", stored.position, e
                            )
        except EventStoreError:
            self.table.unavailable()
            raise
        return self.table.observe(entries, self._clock())

    # -- one claim ---------------------------------------------------------------------------

    async def reap(self, claim: Claim) -> None:
        """Claim a lost instance and mark its devices offline (see the module docstring)."""
        try:
            position = await self._write_claim(claim, claim.expected_last, LeaseState.REAPING)
            if position is None:
                return
            self._lost += 1
            log.warning(
                "gateway %s instance %s lost (%s): marking its devices offline",
                claim.gateway,
                claim.instance,
                claim.cause.value,
            )
            count = await self._reap_devices(claim)
            if count is None:
                self._reap_failures += 1
                return  # stays "reaping": taken over after takeover_after
            self._reaped += 1
            log.info(
                "gateway %s instance %s: %d device(s) marked offline",
                claim.gateway,
                claim.instance,
                count,
            )
            await self._write_claim(claim, position, LeaseState.REAPED, count)
        except EventStoreError as e:
            log.warning(
                "gateway %s instance %s: claim failed: %s", claim.gateway, claim.instance, e
            )
        finally:
            self.table.done(claim.key)

    async def _write_claim(
        self, claim: Claim, expected_last: int, state: LeaseState, devices: int = 0
    ) -> int | None:
        subject, scope, record = claim_record(claim, state, self.reaper_id, self._wall(), devices)
        message = NatsMessage(
            subject=subject,
            msg_id=f"{self.reaper_id}-{claim.instance}-{state.value}-{expected_last}",
            data=record.encode(),
        )
        try:
            result = await self._leases.append([message], expected_last=expected_last, scope=scope)
        except ConcurrencyError:
            log.debug(
                "gateway %s instance %s: %s: lost the race", claim.gateway, claim.instance, state
            )
            return None
        return result.last_position

    async def _reap_devices(self, claim: Claim) -> int | None:
        delay = self.config.retry_initial
        for attempt in range(REAP_ATTEMPTS):
            try:
                await self._caught_up()
                return await self._offline_all(claim)
            except (EventStoreError, TwinStoreError) as e:
                log.warning(
                    "gateway %s instance %s: marking devices offline failed (attempt %d): %s",
                    claim.gateway,
                    claim.instance,
                    attempt + 1,
                    e,
                )
                await asyncio.sleep(delay)
                delay *= 2
        return None

    async def _caught_up(self) -> None:
        cfg = self.config
        head = await self._events.last_position(cfg.projector_filter)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + cfg.catch_up_timeout
        while await self._twins.checkpoint(cfg.projector) < head:
            if loop.time() >= deadline:
                log.warning(
                    "projector %s did not reach position %d in %gs: reaping what the twins show",
                    cfg.projector,
                    head,
                    cfg.catch_up_timeout,
                )
                return
            await asyncio.sleep(0.05)

    async def _offline_all(self, claim: Claim) -> int:
        slots = asyncio.Semaphore(self.config.concurrency)
        count = 0
        errors: list[EventStoreError | TwinStoreError] = []
        tasks: set[asyncio.Task[None]] = set()

        async def one(held: HeldConnection) -> None:
            nonlocal count
            try:
                if await self._offline_one(claim, held):
                    count += 1
            except (EventStoreError, TwinStoreError) as e:
                errors.append(e)
            finally:
                slots.release()

        try:
            async for held in self._held.held_by(claim.gateway, claim.instance):
                await slots.acquire()
                if errors:
                    slots.release()
                    break
                task = asyncio.create_task(one(held), name=f"offline:{held.device_id}")
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        except BaseException:
            for task in tasks:
                task.cancel()
            raise
        finally:
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            self._offline += count
        if errors:
            raise errors[0]
        return count

    async def _offline_one(self, claim: Claim, held: HeldConnection) -> bool:
        """Append the device's gateway-lost offline if it is still due; whether one was
        appended (not a duplicate)."""
        scope = offline_scope(held.device_id)
        for _ in range(CONFLICT_ATTEMPTS):
            last_online = await self._last(scope)
            last_offline = await self._last(
                subjects.event_filter(device=held.device_id, kind=DeviceOffline.KIND)
            )
            decision = offline_event(
                held,
                claim.gateway,
                claim.instance,
                last_online,
                last_offline,
                self._wall(),
                f"/twin/{self.reaper_id}",
            )
            if decision.event is None:
                log.debug("device %s: no offline (%s)", held.device_id, decision.reason)
                return False
            try:
                result = await self._events.append(
                    [binding.to_nats(decision.event)],
                    expected_last=decision.expected_last,
                    scope=scope,
                )
            except ConcurrencyError:
                continue  # a newer connection (or a write we must look at): decide again
            return not result.all_duplicates
        return False

    async def _last(self, scope: str) -> AnyEvent | None:
        stored = await self._events.last_message(scope)
        if stored is None:
            return None
        try:
            return binding.from_stored(stored)
        except BindingError:
            return None

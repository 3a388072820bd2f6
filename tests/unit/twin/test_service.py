"""The projector and rebuild on the in-memory event store and twin store."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest

from eventstore.errors import UnavailableError
from eventstore.memory import InMemoryEventStore
from proto import binding
from proto import events as ev
from proto.events import AnyEvent, EventData, UnknownData
from proto.message import NatsMessage, StoredMessage
from twin.errors import (
    ProjectionTimeoutError,
    ProjectorStoppedError,
    StoreUnavailableError,
)
from twin.fold import fold_all
from twin.memory import InMemoryTwinStore
from twin.model import Twin
from twin.ports import Ended, WriteResult
from twin.rebuild import rebuild_beside, rebuild_twins
from twin.service import ProjectorConfig, ProjectorHooks, TwinProjector, rebuild

from .factory import T0, changed, link, offline, online, unknown

WAIT = 10.0
FAST = ProjectorConfig(batch_size=4, fetch_timeout=0.05, retry_initial=0.001, retry_max=0.01)


class FakeClock:
    """The in-memory log's clock: ack_wait only expires when a test says so."""

    def __init__(self) -> None:
        self.ns = 1_700_000_000 * 10**9

    def __call__(self) -> int:
        return self.ns

    def advance(self, seconds: float) -> None:
        self.ns += round(seconds * 10**9)


class SimulatedCrash(Exception):
    pass


class FlakyStore(InMemoryTwinStore):
    """Fails the next ``failures`` writes, as a store that is down would."""

    def __init__(self, failures: int = 0) -> None:
        super().__init__()
        self.failures = failures
        self.writes = 0

    async def write_many(
        self,
        twins: Iterable[Twin],
        *,
        previous: Mapping[str, Twin | None] | None = None,
        ended: Ended | None = None,
    ) -> WriteResult:
        if self.failures > 0:
            self.failures -= 1
            raise StoreUnavailableError("store down (simulated)")
        self.writes += 1
        return await super().write_many(twins, previous=previous, ended=ended)


def make(data: EventData | UnknownData, device: str = "d1", i: int = 0) -> AnyEvent:
    return ev.Event(
        owner="alice",
        device_id=device,
        data=data,
        source="/gateway/test",
        time=T0 + timedelta(seconds=i),
    )


def script(devices: Sequence[str] = ("d1", "d2", "d3"), rounds: int = 3) -> list[AnyEvent]:
    """A plausible life of a few devices, interleaved."""
    out: list[AnyEvent] = []
    i = 0
    for d in devices:
        out.append(make(ev.DeviceRegistered(), d, i))
        out.append(make(online(f"{d}-c1"), d, i))
        out.append(make(ev.ResourceLinksPublished(links=(link("/sw.1", "oic.r.switch"),)), d, i))
    for r in range(rounds):
        for d in devices:
            i += 1
            out.append(make(changed("/sw.1", {"value": r % 2 == 0, "r": r}), d, i))
            out.append(make(changed(f"/sensor/{r % 2}", r), d, i))
    out.append(make(unknown(), devices[0], i))
    out.append(make(offline(f"{devices[-1]}-c1"), devices[-1], i + 1))
    return out


async def append(log: InMemoryEventStore, events: Iterable[AnyEvent]) -> list[AnyEvent]:
    """Append each event; returns them as logged (with positions)."""
    logged: list[AnyEvent] = []
    for e in events:
        result = await log.append([binding.to_nats(e)])
        logged.append(e.at(result.last_position))
    return logged


def expected_twins(logged: Sequence[AnyEvent]) -> dict[str, Twin]:
    out: dict[str, Twin] = {}
    for device in dict.fromkeys(e.device_id for e in logged):
        twin = fold_all(None, [e for e in logged if e.device_id == device])
        if twin is not None:
            out[device] = twin
    return out


async def stored_twins(store: InMemoryTwinStore) -> dict[str, Twin]:
    return {t.device_id: t for t in await store.find(include_deleted=True, limit=1000)}


@pytest.fixture
async def log() -> InMemoryEventStore:
    store = InMemoryEventStore(clock=FakeClock())
    await store.provision()
    return store


async def test_projects_the_log_into_the_store(log: InMemoryEventStore) -> None:
    store = InMemoryTwinStore()
    logged = await append(log, script())
    async with TwinProjector(store, log, FAST) as projector:
        more = await append(log, [make(changed("/sw.1", "late"), "d2", 99)])
        await projector.wait_for_position(more[-1].position or 0, WAIT)
        stats = projector.stats
    assert await stored_twins(store) == expected_twins(logged + more)
    known = [e for e in logged + more if not isinstance(e.data, UnknownData)]
    assert stats.events_applied == len(known)
    assert stats.unknown_events == 1
    assert stats.duplicates_skipped == 0
    assert stats.position == more[-1].position
    assert await store.checkpoint("twin-projector") == more[-1].position


class CheckpointCounting(InMemoryTwinStore):
    def __init__(self) -> None:
        super().__init__()
        self.saves: list[int] = []

    async def save_checkpoint(self, name: str, position: int) -> None:
        self.saves.append(position)
        await super().save_checkpoint(name, position)


@pytest.mark.parametrize("interval", [0.0, 3600.0])
async def test_the_checkpoint_is_saved_per_interval_when_idle_and_on_stop(
    log: InMemoryEventStore, interval: float
) -> None:
    """Under load a checkpoint per ``checkpoint_interval``, not per batch; once idle it
    catches up with the twins (within a fetch timeout); a stop saves it."""
    store = CheckpointCounting()
    config = replace(FAST, checkpoint_interval=interval, batch_size=2)
    async with TwinProjector(store, log, config) as projector:
        await projector.wait_for_position(0, WAIT)
        logged = await append(log, script(devices=[f"d{i}" for i in range(4)], rounds=4))
        await projector.wait_for_position(logged[-1].position or 0, WAIT)
        batches = projector.stats.batches
        for _ in range(200):  # idle now: the checkpoint follows within a fetch timeout
            if await store.checkpoint("twin-projector") == logged[-1].position:
                break
            await asyncio.sleep(0.02)
        assert await store.checkpoint("twin-projector") == logged[-1].position
        more = await append(log, [make(changed("/sw.1", "late"), "d1", 99)])
        await projector.wait_for_position(more[-1].position or 0, WAIT)
    assert await store.checkpoint("twin-projector") == more[-1].position  # saved on stop
    assert await stored_twins(store) == expected_twins(logged + more)
    assert batches > 10
    if interval:
        assert len(store.saves) <= 4  # catch-up, idle, stop (and perhaps one more idle)
    else:
        assert len(store.saves) >= batches


class SlowStore(InMemoryTwinStore):
    """A store whose every write takes ``delay`` seconds."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay

    async def write_many(
        self,
        twins: Iterable[Twin],
        *,
        previous: Mapping[str, Twin | None] | None = None,
        ended: Ended | None = None,
    ) -> WriteResult:
        await asyncio.sleep(self.delay)
        return await super().write_many(twins, previous=previous, ended=ended)


async def _batches_for_a_stream(log: InMemoryEventStore, max_linger: float, device: str) -> int:
    """Batches a projector needs for 30 events 12 ms apart into a store taking 10 ms a write."""
    store = SlowStore(0.01)
    config = replace(FAST, batch_size=100, max_linger=max_linger, name=f"p-{device}")
    async with TwinProjector(
        store, log, replace(config, filter_subject=f"twinhub.ev.*.{device}.>")
    ) as projector:
        first = await append(log, [make(ev.DeviceRegistered(), device, 0)])
        await projector.wait_for_position(first[-1].position or 0, WAIT)
        before = projector.stats.batches
        more: list[AnyEvent] = []
        for i in range(30):
            more += await append(log, [make(changed("/sw.1", i), device, i + 1)])
            await asyncio.sleep(0.012)
        await projector.wait_for_position(more[-1].position or 0, WAIT)
        return projector.stats.batches - before


async def test_a_busy_store_gets_bigger_batches(log: InMemoryEventStore) -> None:
    """A store busy most of the time (10 ms writes, an event every 12 ms): batches linger for
    more, far fewer than one per event; with max_linger 0, about one per event."""
    lingering = await _batches_for_a_stream(log, 0.2, "d1")
    at_once = await _batches_for_a_stream(log, 0.0, "d2")
    assert lingering < 0.7 * at_once, (lingering, at_once)


async def test_undecodable_messages_are_skipped(log: InMemoryEventStore) -> None:
    store = InMemoryTwinStore()
    good = make(changed("/a", 1))
    bad = binding.to_nats(make(changed("/a", 2)))
    bad = NatsMessage(subject=bad.subject, msg_id="bad-1", data=b"{not json", headers=bad.headers)
    await log.append([bad])
    logged = await append(log, [good])
    async with TwinProjector(store, log, FAST) as projector:
        await projector.wait_for_position(logged[-1].position or 0, WAIT)
        assert projector.stats.undecodable_events == 1
    assert await stored_twins(store) == expected_twins(logged)


async def test_store_failures_nak_and_retry_without_losing_or_doubling(
    log: InMemoryEventStore,
) -> None:
    store = FlakyStore()
    async with TwinProjector(store, log, FAST) as projector:
        first = await append(log, script(rounds=1))
        await projector.wait_for_position(first[-1].position or 0, WAIT)
        store.failures = 3  # the next three writes fail
        second = await append(log, script(rounds=2)[9:])
        await projector.wait_for_position(second[-1].position or 0, WAIT)
        stats = projector.stats
    assert stats.store_failures == 3
    assert await stored_twins(store) == expected_twins(first + second)
    assert stats.events_applied == sum(t.version for t in (await stored_twins(store)).values())


async def test_crash_after_write_before_ack(log: InMemoryEventStore) -> None:
    """The batch is in the store but not acknowledged: it comes back and is skipped."""
    clock = log._clock
    assert isinstance(clock, FakeClock)
    store = InMemoryTwinStore()
    logged = await append(log, script())
    seen: list[Sequence[int]] = []

    async def crash_on_third(positions: Sequence[int]) -> None:
        seen.append(positions)
        if len(seen) == 3:
            raise SimulatedCrash

    config = ProjectorConfig(batch_size=4, fetch_timeout=0.05, ack_wait=5.0)
    projector = TwinProjector(store, log, config, hooks=ProjectorHooks(after_write=crash_on_third))
    async with projector:
        with pytest.raises(SimulatedCrash):
            await projector.join()
    assert await store.checkpoint("twin-projector") == max(seen[-1])

    async with TwinProjector(store, log, config) as again:
        await again.wait_for_position(logged[-1].position or 0, WAIT)
        clock.advance(10)  # ack_wait expires: the unacknowledged batch is redelivered
        more = await append(log, [make(changed("/sw.1", "after"), "d1", 50)])
        await again.wait_for_position(more[-1].position or 0, WAIT)
    assert await stored_twins(store) == expected_twins(logged + more)


async def test_crash_before_write_then_restart_before_ack_wait(log: InMemoryEventStore) -> None:
    """The worst case for a consumer alone: the unwritten batch is still pending (ack_wait has
    not expired) when the new projector starts, so the consumer would hand out newer events of
    the same devices first. The catch-up from the checkpoint keeps them in order."""
    store = InMemoryTwinStore()
    batches = 0

    async def crash_on_third(positions: Sequence[int]) -> None:
        nonlocal batches
        batches += 1
        if batches == 3:
            raise SimulatedCrash

    config = ProjectorConfig(batch_size=4, fetch_timeout=0.05, ack_wait=3600)
    first = TwinProjector(store, log, config, hooks=ProjectorHooks(before_write=crash_on_third))
    async with first:
        # batch 1 is the catch-up; what is appended once it is done goes through the consumer
        logged = await append(log, [make(ev.DeviceRegistered(), "d0")])
        await first.wait_for_position(logged[-1].position or 0, WAIT)
        logged += await append(log, script())
        with pytest.raises(SimulatedCrash):
            await first.join()
    assert batches == 3
    more = await append(log, [make(changed("/sw.1", f"new-{d}"), d, 60) for d in ("d1", "d2")])
    async with TwinProjector(store, log, config) as again:
        await again.wait_for_position(more[-1].position or 0, WAIT)
    twins = await stored_twins(store)
    assert twins == expected_twins(logged + more)
    assert {d: t.version for d, t in twins.items()} == {
        d: sum(1 for e in logged + more if e.device_id == d and not isinstance(e.data, UnknownData))
        for d in twins
    }


async def test_a_twin_written_further_elsewhere_is_reloaded(log: InMemoryEventStore) -> None:
    store = InMemoryTwinStore()
    async with TwinProjector(store, log, FAST) as projector:
        first = await append(log, [make(ev.DeviceRegistered()), make(changed("/a", 1))])
        await projector.wait_for_position(first[-1].position or 0, WAIT)
        # another writer (a rebuild run by mistake, say) moves d1 past what comes next
        twin = await store.get("d1")
        assert twin is not None
        await store.write_many([replace(twin, position=10_000, version=99)])
        second = await append(log, [make(changed("/a", 2))])
        await projector.wait_for_position(second[-1].position or 0, WAIT)
        assert projector.stats.duplicates_skipped == 1
        third = await append(log, [make(changed("/a", 3))])
        await projector.wait_for_position(third[-1].position or 0, WAIT)
    stored = await store.get("d1")
    assert stored is not None
    assert stored.position == 10_000  # the cache was dropped: the store's twin was reloaded


async def test_tiny_cache_gives_the_same_twins(log: InMemoryEventStore) -> None:
    store = InMemoryTwinStore()
    logged = await append(log, script(devices=[f"d{i}" for i in range(6)]))
    config = ProjectorConfig(batch_size=3, fetch_timeout=0.05, cache_size=1)
    async with TwinProjector(store, log, config) as projector:
        await projector.wait_for_position(logged[-1].position or 0, WAIT)
    assert await stored_twins(store) == expected_twins(logged)


async def test_rebuild_matches_the_live_projection(log: InMemoryEventStore) -> None:
    live = InMemoryTwinStore()
    logged = await append(log, script())
    async with TwinProjector(live, log, FAST) as projector:
        await projector.wait_for_position(logged[-1].position or 0, WAIT)
    rebuilt = InMemoryTwinStore()
    await rebuilt.write_many(
        [Twin(device_id="stale", owner="x", position=1, version=1, created_at=T0, updated_at=T0)]
    )
    count = await rebuild(rebuilt, log, batch_size=5)
    assert count == sum(1 for e in logged if not isinstance(e.data, UnknownData))
    assert await stored_twins(rebuilt) == await stored_twins(live)
    assert await rebuilt.checkpoint("twin-projector") == logged[-1].position


class CountingStore(InMemoryTwinStore):
    """Counts the twins written, per device."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: dict[str, int] = {}

    async def write_many(
        self,
        twins: Iterable[Twin],
        *,
        previous: Mapping[str, Twin | None] | None = None,
        ended: Ended | None = None,
    ) -> WriteResult:
        twins = list(twins)
        for t in twins:
            self.writes[t.device_id] = self.writes.get(t.device_id, 0) + 1
        return await super().write_many(twins, previous=previous, ended=ended)


@pytest.mark.parametrize("max_twins", [50_000, 2])
async def test_rebuild_writes_each_twin_once_while_it_holds_every_device(
    log: InMemoryEventStore, max_twins: int
) -> None:
    """With at most ``max_twins`` devices every twin is written once, whatever the number of
    events; with more, a device is written once per flush it was in, and read back between
    (the twins are the same)."""
    live = InMemoryTwinStore()
    logged = await append(log, script(devices=[f"d{i}" for i in range(6)]))
    async with TwinProjector(live, log, FAST) as projector:
        await projector.wait_for_position(logged[-1].position or 0, WAIT)
    rebuilt = CountingStore()
    stats = await rebuild_twins(rebuilt, log, name="p", batch_size=3, max_twins=max_twins)
    assert await stored_twins(rebuilt) == await stored_twins(live)
    assert stats.events_applied == sum(1 for e in logged if not isinstance(e.data, UnknownData))
    assert sorted(rebuilt.writes) == [f"d{i}" for i in range(6)]
    if max_twins > 6:
        assert stats.flushes == 1 and stats.twins_written == 6
        assert set(rebuilt.writes.values()) == {1}
    else:
        assert stats.flushes > 1 and stats.twins_written > 6
        assert max(rebuilt.writes.values()) <= stats.flushes
    assert stats.position == logged[-1].position == await rebuilt.checkpoint("p")


async def test_a_log_failure_during_a_rebuild_is_raised(log: InMemoryEventStore) -> None:
    await append(log, script())

    class Failing(InMemoryEventStore):
        async def read(self, *args: Any, **kwargs: Any) -> AsyncIterator[StoredMessage]:
            n = 0
            async for m in log.read(*args, **kwargs):
                yield m
                n += 1
                if n == 5:
                    raise UnavailableError("the log went away")

    with pytest.raises(UnavailableError):
        await rebuild_twins(InMemoryTwinStore(), Failing(), name="p", batch_size=2)


async def test_rebuild_beside_the_live_projector_switches_it_to_the_new_generation(
    log: InMemoryEventStore,
) -> None:
    """The rebuild writes generation 1 while the projector keeps generation 0 current; once
    generation 1 is active the projector binds to it and folds what came after the rebuild,
    and generation 0 is dropped."""
    live = InMemoryTwinStore()
    config = replace(FAST, generation_check_interval=0.01)
    first = await append(log, script(devices=["d1", "d2"]))
    async with TwinProjector(live, log, config) as projector:
        await projector.wait_for_position(first[-1].position or 0, WAIT)
        tool = live.at_generation(0)  # the rebuild's own store, as the CLI opens one
        rebuilding = asyncio.create_task(
            rebuild_beside(tool, log, name="twin-projector", batch_size=3, grace=0)
        )
        second = await append(log, script(devices=["d2", "d3"], rounds=2))
        generation, stats = await rebuilding
        assert generation == 1 and stats.events_read >= len(first)
        third = await append(log, [make(changed("/sw.1", "after"), "d1", 77)])
        for _ in range(500):
            if live.generation == 1 and projector.position >= (third[-1].position or 0):
                break
            await asyncio.sleep(0.01)
        assert live.generation == 1
        await projector.wait_for_position(third[-1].position or 0, WAIT)
    assert await stored_twins(live) == expected_twins(first + second + third)
    assert await live.active_generation() == 1
    assert await live.at_generation(0).get("d1") is None  # the old generation is gone


async def test_wait_for_position_times_out_and_reports_a_stopped_projector(
    log: InMemoryEventStore,
) -> None:
    store = InMemoryTwinStore()
    async with TwinProjector(store, log, FAST) as projector:
        with pytest.raises(ProjectionTimeoutError):
            await projector.wait_for_position(1, 0.05)

    async def boom(positions: Sequence[int]) -> None:
        raise SimulatedCrash

    await append(log, [make(online())])
    failing = TwinProjector(store, log, FAST, hooks=ProjectorHooks(before_write=boom))
    with pytest.raises(ProjectorStoppedError) as info:
        async with failing:
            await failing.wait_for_position(1, WAIT)
    assert isinstance(info.value.__cause__, SimulatedCrash)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"batch_size": 0},
        {"batch_size": 10, "max_ack_pending": 5},
        {"cache_size": -1},
        {"fetch_timeout": 0},
        {"retry_initial": 2, "retry_max": 1},
    ],
)
def test_config_is_validated(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011
        ProjectorConfig(**kwargs)  # type: ignore[arg-type]

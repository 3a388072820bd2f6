"""Random cancellations and timeouts against a live subscription: every event once, in order.

A :class:`Plan` (drawn by hypothesis, :func:`plans`) says what a producer appends, with what
pauses, and how a consumer reads meanwhile: ``next(timeout)`` with small timeouts, a task
reading the next event that is cancelled after a small delay, an ``async for`` cut short by
``asyncio.timeout``. :func:`run_plan` plays it against any event store and checks that the
subscription handed out exactly the appended events of the kinds it asked for, in log order,
none twice and none after. Shared by the in-memory (unit) and JetStream (integration) tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import uuid
from dataclasses import dataclass
from typing import Literal

from hypothesis import strategies as st

from eventstore.ports import EventStore
from proto import binding, subjects
from proto import events as ev
from proto.events import AnyEvent, EventData
from twinhub_client.subscription import EventSubscription

StepKind = Literal["next", "cancel", "iterate"]


@dataclass(frozen=True)
class Step:
    kind: StepKind
    seconds: float  # next: its timeout; cancel: the delay before it; iterate: the timeout


@dataclass(frozen=True)
class Plan:
    appends: tuple[tuple[int, float], ...]  # (events in one append, pause after it in seconds)
    steps: tuple[Step, ...]  # what the consumer does, round and round until it has them all
    batch: int  # the subscription's fetch batch
    skip_every: int  # 0: every event is wanted; n: every n-th is of a kind it filters out


def plans(*, max_appends: int = 25, max_pause: float = 0.004) -> st.SearchStrategy[Plan]:
    seconds = st.floats(min_value=0.0, max_value=0.02, allow_nan=False)
    step = st.builds(Step, st.sampled_from(["next", "cancel", "iterate"]), seconds)
    return st.builds(
        Plan,
        appends=st.lists(
            st.tuples(
                st.integers(min_value=1, max_value=4),
                st.floats(min_value=0.0, max_value=max_pause, allow_nan=False),
            ),
            min_size=1,
            max_size=max_appends,
        ).map(tuple),
        steps=st.lists(step, min_size=1, max_size=8).map(tuple),
        batch=st.sampled_from([1, 3, 16, 64]),
        skip_every=st.sampled_from([0, 0, 3]),
    )


WANTED_KIND = ev.ResourceChanged.KIND


def _data(n: int, skip_every: int) -> EventData:
    if skip_every and n % skip_every == 0:
        return ev.CommandSucceeded(href="/x", status="2.04")
    return ev.ResourceChanged(href="/n", content={"n": n})


async def run_plan(store: EventStore, plan: Plan, *, stall: float = 5.0) -> None:
    """Play ``plan``; fail if the subscription hands out anything but every wanted event
    appended, once, in order (``stall``: seconds without progress once the producer is done)."""
    owner = "o" + uuid.uuid4().hex[:12]
    start = await store.last_position()
    sub = EventSubscription(
        store,
        (subjects.event_filter(owner=owner),),
        from_position=start,
        kinds={WANTED_KIND} if plan.skip_every else None,
        batch=plan.batch,
    )
    expected: list[int] = []
    got: list[int] = []

    def take(e: AnyEvent | None) -> None:
        if e is not None:
            assert e.position is not None
            got.append(e.position)

    async def produce() -> None:
        n = 0
        for size, pause in plan.appends:
            datas = []
            for _ in range(size):
                n += 1
                datas.append(_data(n, plan.skip_every))
            msgs = [
                binding.to_nats(ev.Event(owner=owner, device_id="d1", data=d, source="/gaps"))
                for d in datas
            ]
            result = await store.append(msgs)
            expected.extend(
                p for p, d in zip(result.positions, datas, strict=True) if d.KIND == WANTED_KIND
            )
            await asyncio.sleep(pause)

    async def step(s: Step) -> None:
        if s.kind == "next":
            take(await sub.next(s.seconds))
        elif s.kind == "cancel":
            reader = asyncio.create_task(
                sub.next(5.0) if len(got) % 2 else anext(sub), name="reader"
            )
            await asyncio.sleep(s.seconds)
            reader.cancel()
            await asyncio.wait([reader])
            if not reader.cancelled():
                take(reader.result())
        else:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(s.seconds):
                    async for e in sub:
                        take(e)

    loop = asyncio.get_running_loop()
    async with sub:
        producer = asyncio.create_task(produce(), name="producer")
        try:
            progress = (0, loop.time())
            for i in itertools.count():
                if producer.done() and len(got) >= len(expected):
                    break
                if i % len(plan.steps) == 0 and i and len(got) == progress[0]:
                    # A reader cut short at its first await every time cannot get anywhere
                    # (an ack is a round trip): a patient read once a round brought nothing.
                    # It cannot bring back what was lost, so a gap still shows.
                    take(await sub.next(1.0))
                await step(plan.steps[i % len(plan.steps)])
                if len(got) != progress[0]:
                    progress = (len(got), loop.time())
                elif producer.done() and loop.time() - progress[1] > stall:
                    missing = sorted(set(expected) - set(got))
                    raise AssertionError(
                        f"stalled: {len(got)} of {len(expected)} handed out, missing {missing}"
                    )
            producer.result()
            assert await sub.next(0.05) is None  # nothing more: no duplicate
        finally:
            producer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await producer
    assert got == expected, f"handed out {got}, appended {expected}"

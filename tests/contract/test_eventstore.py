"""The event-store contract: one suite, run against the in-memory store and real JetStream.

A behaviour belongs here when every adapter must show it; the few tests that only make sense
for JetStream (a server restart, the server's cap on open atomic batches) say so in their name.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest

from eventstore.adapters.endpoint import NatsEndpoint
from eventstore.adapters.jetstream import JetStreamEventStore
from eventstore.errors import (
    ConcurrencyError,
    ConsumerGoneError,
    EventStoreError,
    InvalidAppendError,
    NotProvisionedError,
    UnavailableError,
)
from eventstore.layout import StreamLayout
from eventstore.memory import InMemoryEventStore
from eventstore.ports import MAX_ATOMIC_APPEND, Delivery, EventStore
from proto.message import NatsMessage
from twinhub_cli.devservices import NatsServer

from .eventstore_harness import Harness, collect, eventually, ids, unique_layout

pytestmark = pytest.mark.servers


@pytest.fixture(params=["memory", "jetstream"])
def backend(request: pytest.FixtureRequest) -> tuple[str, str | None]:
    if request.param == "jetstream":
        return "jetstream", request.getfixturevalue("nats_admin")
    return "memory", None


async def _delete_stream(store: JetStreamEventStore, name: str) -> None:
    await store.connection.request(f"$JS.API.STREAM.DELETE.{name}", b"", timeout=5)


async def _open(
    backend: tuple[str, str | None], layout: StreamLayout, root: str, *, provision: bool = True
) -> AsyncIterator[Harness]:
    kind, url = backend
    if url is None:
        async with InMemoryEventStore(layout) as mem:
            if provision:
                await mem.provision()
            yield Harness(kind, mem, layout, root)
        return
    async with JetStreamEventStore.from_url(url, layout, timeout=5.0) as js:
        if provision:
            await js.provision()
        try:
            yield Harness(kind, js, layout, root, lambda: int(js.connection.stats["in_msgs"]))
        finally:
            if provision:
                await _delete_stream(js, layout.name)


@pytest.fixture
async def h(backend: tuple[str, str | None]) -> AsyncIterator[Harness]:
    layout, root = unique_layout()
    async for harness in _open(backend, layout, root):
        yield harness


# -- append -----------------------------------------------------------------------------------


async def test_append_assigns_increasing_positions_and_reads_back_verbatim(h: Harness) -> None:
    msgs = [
        h.msg("d1", "r1", headers={"ce-type": "x", "Content-Type": "application/json"}),
        h.msg("d1", "r2", data=b""),
        h.msg("d2", "r1", data=bytes(range(256))),
    ]
    result = await h.store.append(msgs)
    assert result.positions == (1, 2, 3)
    assert result.duplicates == (False, False, False)
    assert result.last_position == 3
    stored = await h.read_all()
    assert [s.position for s in stored] == [1, 2, 3]
    assert [s.message for s in stored] == msgs
    assert all(s.time_ns > 1_600_000_000 * 10**9 for s in stored)
    assert await h.store.last_position(h.everything) == 3


async def test_retried_append_returns_original_positions_as_duplicates(h: Harness) -> None:
    a, b, c = h.msg("d1"), h.msg("d1"), h.msg("d1")
    first = await h.store.append([a, b])
    again = await h.store.append([a, b])
    assert again.positions == first.positions
    assert again.duplicates == (True, True)
    assert again.all_duplicates
    mixed = await h.store.append([b, c])
    assert mixed.positions == (first.positions[1], first.positions[1] + 1)
    assert mixed.duplicates == (True, False)
    assert ids(await h.read_all()) == [a.msg_id, b.msg_id, c.msg_id]


async def test_conditional_append_succeeds_then_conflicts(h: Harness) -> None:
    scope = h.device_scope("d1")
    ok = await h.store.append([h.msg("d1")], expected_last=0, scope=scope)
    with pytest.raises(ConcurrencyError) as err:
        await h.store.append([h.msg("d1", "r2")], expected_last=0, scope=scope)
    assert isinstance(err.value, EventStoreError)
    assert isinstance(err.value, ValueError)
    assert (err.value.scope, err.value.expected, err.value.actual) == (scope, 0, ok.last_position)
    assert await h.store.last_position(scope) == ok.last_position
    nxt = await h.store.append([h.msg("d1", "r2")], expected_last=ok.last_position, scope=scope)
    assert nxt.last_position > ok.last_position


async def test_conditional_append_defaults_scope_to_the_common_subject(h: Harness) -> None:
    first = await h.store.append([h.msg("d1", "r1")], expected_last=0)
    await h.store.append([h.msg("d1", "r2")], expected_last=0)  # another subject: own scope
    with pytest.raises(ConcurrencyError):
        await h.store.append([h.msg("d1", "r1")], expected_last=0)
    await h.store.append([h.msg("d1", "r1")], expected_last=first.last_position)


async def test_retried_conditional_append_is_a_duplicate_not_a_conflict(h: Harness) -> None:
    scope = h.device_scope("d1")
    one = h.msg("d1")
    first = await h.store.append([one], expected_last=0, scope=scope)
    again = await h.store.append([one], expected_last=0, scope=scope)
    assert again.positions == first.positions
    assert again.duplicates == (True,)

    batch = [h.msg("d1", "r1"), h.msg("d1", "r2"), h.msg("d1", "r3")]
    done = await h.store.append(batch, expected_last=first.last_position, scope=scope)
    retry = await h.store.append(batch, expected_last=first.last_position, scope=scope)
    assert retry.positions == done.positions
    assert retry.all_duplicates
    assert len(await h.read_all(scope)) == 4


async def test_conditional_append_half_duplicate_is_refused(h: Harness) -> None:
    scope = h.device_scope("d1")
    a, b = h.msg("d1"), h.msg("d1")
    first = await h.store.append([a], expected_last=0, scope=scope)
    with pytest.raises(InvalidAppendError):
        await h.store.append([a, b], expected_last=first.last_position, scope=scope)
    assert ids(await h.read_all()) == [a.msg_id]


async def test_wildcard_scopes_keep_devices_independent(h: Harness) -> None:
    r1 = await h.store.append([h.msg("d1")], expected_last=0, scope=h.device_scope("d1"))
    r2 = await h.store.append([h.msg("d2")], expected_last=0, scope=h.device_scope("d2"))
    assert r2.last_position > r1.last_position
    # d2's event does not move d1's scope.
    await h.store.append(
        [h.msg("d1", "r9")], expected_last=r1.last_position, scope=h.device_scope("d1")
    )
    # A scope of one kind of event of a device, across resources.
    changed = f"{h.root}.*.d2.resource-changed.*"
    await h.store.append(
        [h.msg("d2", "r5", kind="device-online")], expected_last=0, scope=f"{h.root}.*.d2.*._"
    )
    assert await h.store.last_position(changed) == r2.last_position


async def test_atomic_conditional_append_writes_nothing_on_conflict(h: Harness) -> None:
    scope = h.device_scope("d1")
    base = await h.store.append([h.msg("d1")], expected_last=0, scope=scope)
    batch = [h.msg("d1", f"r{i}") for i in range(5)]
    with pytest.raises(ConcurrencyError) as err:
        await h.store.append(batch, expected_last=0, scope=scope)
    assert err.value.actual == base.last_position
    assert await h.store.last_position(h.everything) == base.last_position
    assert len(await h.read_all()) == 1

    ok = await h.store.append(batch, expected_last=base.last_position, scope=scope)
    assert ok.positions == tuple(range(base.last_position + 1, base.last_position + 6))
    assert ids(await h.read_all(scope, after=base.last_position)) == [m.msg_id for m in batch]


async def test_concurrent_conditional_appends_to_one_device_admit_exactly_one(h: Harness) -> None:
    scope = h.device_scope("d1")

    async def attempt(i: int) -> bool:
        try:
            await h.store.append(
                [h.msg("d1", f"r{i}"), h.msg("d1", f"s{i}")], expected_last=0, scope=scope
            )
        except ConcurrencyError:
            return False
        return True

    outcomes = await asyncio.gather(*(attempt(i) for i in range(10)))
    assert sum(outcomes) == 1
    assert len(await h.read_all()) == 2


async def test_many_concurrent_appends_of_different_devices_all_land(h: Harness) -> None:
    async def device(i: int) -> tuple[int, ...]:
        dev = f"dev{i}"
        first = await h.store.append([h.msg(dev)], expected_last=0, scope=h.device_scope(dev))
        batch = [h.msg(dev, "a"), h.msg(dev, "b")]
        second = await h.store.append(
            batch, expected_last=first.last_position, scope=h.device_scope(dev)
        )
        third = await h.store.append([h.msg(dev, "c"), h.msg(dev, "d")])
        return first.positions + second.positions + third.positions

    results = await asyncio.gather(*(device(i) for i in range(120)))
    positions = [p for r in results for p in r]
    assert len(set(positions)) == len(positions) == 120 * 5
    assert all(list(r) == sorted(r) for r in results)
    assert len(await h.read_all()) == 600
    assert len(await h.read_all(h.device_scope("dev7"))) == 5


@pytest.mark.parametrize(
    ("kwargs", "why"),
    [
        ({"messages": []}, "empty"),
        ({"scope": "x.>"}, "scope without expected_last"),
        ({"expected_last": -1}, "negative expected_last"),
        ({"expected_last": 0, "mixed": True}, "mixed subjects without scope"),
        ({"expected_last": 0, "scope": "a..b"}, "bad scope"),
        ({"headers": {"Nats-Msg-Id": "x"}}, "reserved header"),
        ({"headers": {"bad name": "x"}}, "bad header name"),
        ({"headers": {"x": " padded"}}, "padded header value"),
        ({"subject": "a.*.b"}, "wildcard subject"),
        ({"subject": "elsewhere.ev.o.d.k.r"}, "outside the stream"),
        ({"msg_id": ""}, "empty msg_id"),
        ({"same_id": True}, "same msg_id twice"),
    ],
)
async def test_malformed_appends_are_refused(
    h: Harness, kwargs: dict[str, object], why: str
) -> None:
    base = h.msg("d1")
    headers = kwargs.get("headers")
    one = NatsMessage(
        subject=str(kwargs.get("subject", base.subject)),
        msg_id=str(kwargs.get("msg_id", base.msg_id)),
        data=b"x",
        headers=headers if isinstance(headers, dict) else {},
    )
    messages: list[NatsMessage] = [one]
    if kwargs.get("mixed"):
        messages.append(h.msg("d1", "other"))
    if kwargs.get("same_id"):
        messages.append(one)
    if "messages" in kwargs:
        messages = []
    expected = kwargs.get("expected_last")
    scope = kwargs.get("scope")
    with pytest.raises(InvalidAppendError):
        await h.store.append(
            messages,
            expected_last=expected if isinstance(expected, int) else None,
            scope=scope if isinstance(scope, str) else None,
        )
    assert await h.store.last_position(h.everything) == 0, why


async def test_conditional_append_larger_than_an_atomic_batch_is_refused(h: Harness) -> None:
    batch = [h.msg("d1") for _ in range(MAX_ATOMIC_APPEND + 1)]
    with pytest.raises(InvalidAppendError):
        await h.store.append(batch, expected_last=0)
    big = await h.store.append(batch[:MAX_ATOMIC_APPEND], expected_last=0)
    assert big.positions == tuple(range(1, MAX_ATOMIC_APPEND + 1))


# -- reads ------------------------------------------------------------------------------------


async def test_read_after_position_with_filter_and_limit(h: Harness) -> None:
    for i in range(6):
        await h.store.append([h.msg("d1", f"r{i}"), h.msg("d2", f"r{i}")])
    d1 = await h.read_all(h.device_scope("d1"))
    assert [s.position for s in d1] == [1, 3, 5, 7, 9, 11]
    assert [s.position for s in await h.read_all(h.device_scope("d1"), after=5)] == [7, 9, 11]
    assert [s.position for s in await h.read_all(h.device_scope("d1"), after=4, limit=2)] == [5, 7]
    assert [s.position for s in await h.read_all(after=10)] == [11, 12]
    assert await h.read_all(after=12) == []
    assert await h.read_all(h.device_scope("nobody")) == []
    assert await h.read_all(limit=0) == []
    assert [s.position for s in await h.read_all(f"{h.root}.*.*.*.r2")] == [5, 6]


async def test_read_stops_at_the_end_of_the_log_when_it_started(h: Harness) -> None:
    await h.store.append([h.msg("d1") for _ in range(5)])
    seen = []
    async for stored in h.store.read(h.everything):
        seen.append(stored.position)
        if stored.position == 1:
            await h.store.append([h.msg("d1") for _ in range(5)])
    assert seen == [1, 2, 3, 4, 5]
    assert len(await h.read_all()) == 10


async def test_read_of_several_pages_stops_at_the_end_of_the_log_when_it_started(
    h: Harness,
) -> None:
    # More than the JetStream adapter's batched direct get (256): the rest comes via a consumer.
    await h.store.append([h.msg("d1", f"r{i % 3}") for i in range(600)])
    await h.store.append([h.msg("d2")])
    seen = []
    async for stored in h.store.read(h.device_scope("d1")):
        seen.append(stored.position)
        if stored.position in (1, 300):  # in the first page, then in a later one
            await h.store.append([h.msg("d1") for _ in range(5)])
    assert seen == list(range(1, 601))
    assert len(await h.read_all(h.device_scope("d1"))) == 610
    assert [s.position for s in await h.read_all(after=250, limit=300)] == list(range(251, 551))
    r1 = [s.position for s in await h.read_all(f"{h.root}.*.d1.*.r1", after=10)]
    assert r1 == [*range(11, 601, 3), *range(602, 612)]
    assert [s.position for s in await h.read_all(h.device_scope("d2"))] == [601]


async def test_last_position_per_scope(h: Harness) -> None:
    assert await h.store.last_position(h.everything) == 0
    await h.store.append([h.msg("d1", "r1"), h.msg("d2", "r1"), h.msg("d1", "r2")])
    assert await h.store.last_position(h.device_scope("d1")) == 3
    assert await h.store.last_position(h.device_scope("d2")) == 2
    assert await h.store.last_position(h.subject("d1", "r1")) == 1
    assert await h.store.last_position(h.device_scope("d3")) == 0
    assert await h.store.last_position(h.everything) == 3


async def test_last_message_per_scope(h: Harness) -> None:
    assert await h.store.last_message(h.everything) is None
    sent = [h.msg("d1", "r1"), h.msg("d2", "r1"), h.msg("d1", "r2"), h.msg("d1", "r1")]
    await h.store.append(sent[:2])
    await h.store.append(sent[2:])
    last = await h.store.last_message(h.subject("d1", "r1"))
    assert last is not None
    assert (last.position, last.message) == (4, sent[3])
    assert last.time_ns > 0
    last_d2 = await h.store.last_message(h.device_scope("d2"))
    assert last_d2 is not None
    assert last_d2.message == sent[1]
    assert await h.store.last_message(h.device_scope("d3")) is None


async def test_notifier_wakes_on_matching_appends_only(h: Harness) -> None:
    n = await h.store.notifier([h.device_scope("d1")])
    try:
        assert not await n.wait(0.05)
        await h.store.append([h.msg("d2", "r1")])
        assert not await n.wait(0.1), "another device's message must not wake it"
        await h.store.append([h.msg("d1", "r1"), h.msg("d1", "r2")])
        assert await n.wait(5.0)
    finally:
        await n.close()


async def test_device_replay_is_filtered_by_the_server(h: Harness) -> None:
    await h.store.append([h.msg("noisy", f"r{i % 10}") for i in range(1000)])
    mine = [h.msg("quiet", "r1"), h.msg("quiet", "r2"), h.msg("quiet", "r3")]
    await h.store.append(mine)
    await h.store.append([h.msg("noisy", f"r{i % 10}") for i in range(1000)])
    before = h.wire_messages() if h.wire_messages else 0
    replay = await h.read_all(h.device_scope("quiet"))
    assert [s.message for s in replay] == mine
    if h.wire_messages is not None:
        # 3 deliveries plus a handful of API answers, not 2003 messages filtered client-side.
        assert h.wire_messages() - before < 20


async def test_limits_keep_the_last_events_per_subject(backend: tuple[str, str | None]) -> None:
    layout, root = unique_layout(max_msgs_per_subject=2)
    async for h in _open(backend, layout, root):
        for i in range(5):
            await h.store.append([h.msg("d1", "r1", data=b"%d" % i), h.msg("d1", "r2")])
        kept = await h.read_all()
        assert [s.position for s in kept] == [7, 8, 9, 10]
        assert [s.message.data for s in kept if s.message.subject == h.subject("d1", "r1")] == [
            b"3",
            b"4",
        ]
        assert await h.store.last_position(h.device_scope("d1")) == 10


# -- durable consumers ------------------------------------------------------------------------


async def test_durable_consumer_resumes_after_reopen(h: Harness) -> None:
    await h.store.append([h.msg("d1", f"r{i}") for i in range(5)])
    async with await h.store.consumer("twin", [h.everything]) as c:
        got = await c.fetch(3, timeout=2)
        assert [d.position for d in got] == [1, 2, 3]
        assert not any(d.redelivered for d in got)
        await c.ack_many(got)
    async with await h.store.consumer("twin", [h.everything], start_after=4) as c:
        rest = await c.fetch(10, timeout=2)
        assert [d.position for d in rest] == [4, 5]  # start_after only applies on creation
        assert rest[0].stored.message.msg_id == (await h.read_all(after=3))[0].message.msg_id
        for d in rest:
            await d.ack()
        assert await c.fetch(10, timeout=0.2) == []


async def test_new_consumer_starts_after_the_given_position(h: Harness) -> None:
    await h.store.append([h.msg("d1") for _ in range(4)])
    async with await h.store.consumer("late", [h.everything], start_after=2) as c:
        assert [d.position for d in await c.fetch(10, timeout=2)] == [3, 4]


async def test_nak_redelivers_first_and_counts_deliveries(h: Harness) -> None:
    await h.store.append([h.msg("d1"), h.msg("d1")])
    async with await h.store.consumer("n", [h.everything]) as c:
        (first,) = await c.fetch(1, timeout=2)
        await first.nak()
        again = await c.fetch(2, timeout=2)
        assert again[0].position == first.position
        assert again[0].redelivered
        assert again[0].num_delivered == 2
        await c.ack_many(again)
        rest = await c.fetch(5, timeout=0.3)
        if rest:  # the second message, if fetch(2) only got the redelivery
            assert [d.position for d in rest] == [2]
            await c.ack_many(rest)
        assert await c.fetch(5, timeout=0.2) == []


async def test_nak_with_delay_holds_the_message_back(h: Harness) -> None:
    await h.store.append([h.msg("d1")])
    async with await h.store.consumer("nd", [h.everything]) as c:
        (d,) = await c.fetch(1, timeout=2)
        await d.nak(delay=1.0)
        assert await c.fetch(1, timeout=0.1) == []
        (again,) = await c.fetch(1, timeout=5)
        assert again.position == d.position
        assert again.num_delivered == 2
        await again.ack()


async def test_unacked_messages_come_back_after_ack_wait(h: Harness) -> None:
    await h.store.append([h.msg("d1")])
    async with await h.store.consumer("aw", [h.everything], ack_wait=1.0) as c:
        (d,) = await c.fetch(1, timeout=2)
        redelivered = []

        async def came_back() -> bool:
            redelivered.extend(await c.fetch(1, timeout=0.5))
            return bool(redelivered)

        await eventually(came_back, within=10, what="redelivery after ack_wait")
        assert redelivered[0].position == d.position
        assert redelivered[0].num_delivered == 2
        await redelivered[0].ack()


async def test_consumer_filters_and_max_ack_pending(h: Harness) -> None:
    await h.store.append([h.msg("d1", "r1"), h.msg("d2", "r1"), h.msg("d3", "r1")])
    await h.store.append([h.msg("d1", "r2"), h.msg("d3", "r2")])
    filters = [h.device_scope("d1"), h.device_scope("d3")]
    async with await h.store.consumer("f", filters, max_ack_pending=2) as c:
        first = await c.fetch(10, timeout=2)
        assert [d.position for d in first] == [1, 3]
        assert await c.fetch(10, timeout=0.3) == []  # held back by max_ack_pending
        await first[0].ack()
        nxt = await c.fetch(10, timeout=2)
        assert [d.position for d in nxt] == [4]
        await c.ack_many([first[1], *nxt])
        assert [d.position for d in await c.fetch(10, timeout=2)] == [5]


async def test_fetch_returns_as_soon_as_something_is_appended(h: Harness) -> None:
    async with await h.store.consumer("w", [h.everything]) as c:
        waiter = asyncio.create_task(c.fetch(10, timeout=10), name="fetch")
        await asyncio.sleep(0.05)  # let the fetch start waiting (not a synchronisation point)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await h.store.append([h.msg("d1")])
        got = await asyncio.wait_for(waiter, 5)
        assert [d.position for d in got] == [1]
        assert loop.time() - started < 3
        await c.ack_many(got)


async def test_deleted_consumer_starts_over(h: Harness) -> None:
    await h.store.append([h.msg("d1"), h.msg("d1")])
    async with await h.store.consumer("x", [h.everything]) as c:
        await c.ack_many(await c.fetch(10, timeout=2))
    assert await h.store.delete_consumer("x") is True
    assert await h.store.delete_consumer("x") is False
    async with await h.store.consumer("x", [h.everything]) as c:
        assert [d.position for d in await c.fetch(10, timeout=2)] == [1, 2]


async def test_acking_for_a_deleted_consumer_fails(h: Harness) -> None:
    await h.store.append([h.msg("d1")])
    c = await h.store.consumer("gone", [h.everything])
    (d,) = await c.fetch(1, timeout=2)
    await h.store.delete_consumer("gone")
    with pytest.raises(ConsumerGoneError):
        await d.ack()
    with pytest.raises(ConsumerGoneError):
        await c.fetch(1, timeout=0.2)
    await c.close()


async def test_provision_is_idempotent_and_creates_consumers(h: Harness) -> None:
    from eventstore.ports import ConsumerSpec

    await h.store.append([h.msg("d1")])
    spec = ConsumerSpec(name="pre", filter_subjects=(h.everything,))
    await h.store.provision([spec])
    await h.store.provision([spec])
    assert await h.store.last_position(h.everything) == 1
    assert await h.store.delete_consumer("pre") is True


async def test_unprovisioned_store_says_so(backend: tuple[str, str | None]) -> None:
    layout, root = unique_layout()
    async for h in _open(backend, layout, root, provision=False):
        with pytest.raises(NotProvisionedError):
            await h.store.append([h.msg("d1")])
        with pytest.raises(NotProvisionedError):
            await h.store.last_position(h.everything)
        with pytest.raises(NotProvisionedError):
            await h.read_all()


# -- JetStream only ---------------------------------------------------------------------------


async def test_jetstream_open_batch_cap_is_absorbed(nats_admin: NatsEndpoint) -> None:
    """Two adapters with 40 open batches each exceed the server's 50 per stream."""
    layout, root = unique_layout()
    async with (
        JetStreamEventStore.from_url(nats_admin, layout, max_atomic_inflight=40) as a,
        JetStreamEventStore.from_url(nats_admin, layout, max_atomic_inflight=40) as b,
    ):
        await a.provision()
        try:
            ha, hb = Harness("jetstream", a, layout, root), Harness("jetstream", b, layout, root)

            async def device(h: Harness, i: int) -> None:
                dev = f"d{i}"
                batch = [h.msg(dev, f"r{j}") for j in range(4)]
                await h.store.append(batch, expected_last=0, scope=h.device_scope(dev))

            await asyncio.gather(
                *(device(ha, i) for i in range(100)), *(device(hb, i) for i in range(100, 200))
            )
            assert len(await ha.read_all()) == 800
        finally:
            await _delete_stream(a, layout.name)


async def test_jetstream_restart_keeps_acked_appends_and_reconnects(
    nats_server: NatsServer, nats_admin: NatsEndpoint
) -> None:
    layout, root = unique_layout()
    store = JetStreamEventStore.from_url(nats_admin, layout, timeout=1.0)
    async with store:
        await store.provision()
        h = Harness("jetstream", store, layout, root)
        acked: list[str] = []
        for i in range(20):
            batch = [h.msg(f"d{i % 4}", f"r{j}") for j in range(5)]
            await store.append(batch)
            acked.extend(m.msg_id for m in batch)
        c = await store.consumer("twin", [h.everything], ack_wait=30)
        await c.ack_many(await c.fetch(30, timeout=2))
        held = await c.fetch(10, timeout=2)  # delivered, acked only after the restart
        assert [d.position for d in held] == list(range(31, 41))

        await nats_server.stop()
        try:
            down = h.msg("d0", "while-down")
            with pytest.raises(UnavailableError):
                await store.append([down])
            with pytest.raises(UnavailableError):
                await store.last_position(h.everything)
            with pytest.raises(UnavailableError):
                await h.read_all()
            with pytest.raises(UnavailableError):
                await c.fetch(10, timeout=0.5)
        finally:
            await nats_server.start()

        async def append_works() -> bool:
            try:
                await store.append([down])  # retried with the same id: stored once
            except UnavailableError:
                return False
            return True

        await eventually(append_works, within=30, what="append after restart")
        stored = await h.read_all()
        assert ids(stored)[: len(acked)] == acked
        assert ids(stored)[len(acked) :] == [down.msg_id]

        # The same consumer handle carries on: acks of earlier deliveries land, the rest follows.
        await c.ack_many(held)
        resumed: list[Delivery] = []

        async def drained() -> bool:
            resumed.extend(await c.fetch(200, timeout=0.5))
            return len(resumed) >= len(stored) - 40

        await eventually(drained, within=10, what="consumer catching up")
        assert [d.position for d in resumed] == [s.position for s in stored[40:]]
        await c.ack_many(resumed)
        await c.close()
        await _delete_stream(store, layout.name)


async def test_jetstream_stream_config_is_what_layout_says(nats_admin: NatsEndpoint) -> None:
    layout, root = unique_layout(max_age=3600.0, max_msgs_per_subject=5)
    async with JetStreamEventStore.from_url(nats_admin, layout) as store:
        await store.provision()
        try:
            msg = await store.connection.request(f"$JS.API.STREAM.INFO.{layout.name}", b"")
            cfg = json.loads(msg.data)["config"]
            assert cfg["allow_atomic"] is True
            assert cfg["storage"] == "file"
            assert cfg["duplicate_window"] == 120 * 10**9
            assert cfg["max_age"] == 3600 * 10**9
            assert cfg["max_msgs_per_subject"] == 5
            assert cfg["subjects"] == [f"{root}.>"]
            # A changed layout updates the stream in place.
            store.layout = StreamLayout(
                name=layout.name, subjects=layout.subjects, max_msgs_per_subject=10
            )
            await store.provision()
            msg = await store.connection.request(f"$JS.API.STREAM.INFO.{layout.name}", b"")
            assert json.loads(msg.data)["config"]["max_msgs_per_subject"] == 10
        finally:
            await _delete_stream(store, layout.name)


async def test_jetstream_read_returns_what_a_consumer_delivers(nats_admin: NatsEndpoint) -> None:
    """Reads are batched direct gets, durable consumers deliver: the same stored messages."""
    layout, root = unique_layout()
    async for h in _open(("jetstream", nats_admin), layout, root):
        await h.store.append(
            [
                h.msg("d1", headers={"ce-type": "t", "X-Colon": "a: b", "ce-time": "2026"}),
                h.msg("d1", data=b"", headers={}),
                h.msg("d2", "r2", data=bytes(range(256)) * 4, headers={"Content-Type": "x/y"}),
            ]
        )
        await h.store.append(
            [h.msg("d1", "r3"), h.msg("d1", "r4")], expected_last=2, scope=h.device_scope("d1")
        )
        read = await h.read_all()
        async with await h.store.consumer("same", [h.everything]) as c:
            delivered = [d.stored for d in await c.fetch(10, timeout=2)]
        assert len(read) == 5
        for r, d in zip(read, delivered, strict=True):
            assert r.position == d.position
            assert r.time_ns == d.time_ns
            assert r.message.subject == d.message.subject
            assert r.message.msg_id == d.message.msg_id
            assert r.message.data == d.message.data
            assert dict(r.message.headers) == dict(d.message.headers)
            assert r == d


async def test_jetstream_read_of_a_stream_without_direct_get_says_so(
    nats_admin: NatsEndpoint,
) -> None:
    """A stream made without ``allow_direct`` is refused clearly, and provision() turns it on."""
    layout, root = unique_layout()
    async with JetStreamEventStore.from_url(nats_admin, layout) as store:
        cfg = {"name": layout.name, "subjects": list(layout.subjects), "allow_direct": False}
        await store.connection.request(
            f"$JS.API.STREAM.CREATE.{layout.name}", json.dumps(cfg).encode(), timeout=5
        )
        try:
            h = Harness("jetstream", store, layout, root)
            await store.append([h.msg("d1")])
            with pytest.raises(NotProvisionedError, match="direct"):
                await h.read_all()
            await store.provision()  # an existing stream is updated in place
            assert [s.position for s in await h.read_all()] == [1]
        finally:
            await _delete_stream(store, layout.name)


async def test_jetstream_read_while_limits_remove_unread_messages_ends(
    nats_admin: NatsEndpoint,
) -> None:
    """Limits that remove unread messages meanwhile do not make a long read chase the log: it
    ends, in order, by the end of the log after its first batch."""
    layout, root = unique_layout(max_msgs_per_subject=300)
    async for h in _open(("jetstream", nats_admin), layout, root):
        await h.store.append([h.msg("d1") for _ in range(300)])
        seen = []
        async for stored in h.store.read(h.everything):
            seen.append(stored.position)
            if stored.position == 1:  # removes 1-280, among them the unread 257-280
                await h.store.append([h.msg("d1") for _ in range(280)])
        assert seen[:256] == list(range(1, 257))
        assert seen == sorted(set(seen))
        assert all(not 257 <= p <= 280 for p in seen)
        assert len(seen) <= 300
        assert seen[-1] <= 580


async def test_jetstream_small_read_is_one_request(nats_admin: NatsEndpoint) -> None:
    layout, root = unique_layout()
    async for h in _open(("jetstream", nats_admin), layout, root):
        await h.store.append([h.msg("d1") for _ in range(20)])
        assert h.wire_messages is not None
        for after, want in ((20, 0), (19, 1), (10, 10)):
            before = h.wire_messages()
            assert len(await h.read_all(after=after)) == want
            # The messages and one end-of-batch status (or a 404 alone): no other round trip.
            assert h.wire_messages() - before == max(want, 0) + 1


def test_both_adapters_satisfy_the_port() -> None:
    # The real check is mypy's: both must be assignable to the Protocol.
    stores: list[EventStore] = [InMemoryEventStore(), JetStreamEventStore(None)]
    assert len(stores) == 2


async def test_collect_helper_is_finite(h: Harness) -> None:
    assert await collect(h.store.read(h.everything)) == []

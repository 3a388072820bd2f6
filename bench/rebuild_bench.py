"""``twinhub twin rebuild``'s speed beside its feed (issue 14 item 3).

    .venv/bin/python bench/rebuild_bench.py [--devices 100] [--events-per-device 600]
        [--quick] [--output FILE]

Everything on loopback in a temporary directory: ``nats-server`` (JetStream, authenticated as
users run it) and the MongoDB-wire server (FerretDB, SQLite), both from
:mod:`twinhub_cli.devservices`. The log is filled (admin role) with the lives of ``--devices``
OCF devices: sign-up, sign-in, links, sync, then resource changes with a command (pending,
sent, succeeded) every tenth event. Then, in one run, each timed from the first read to the
last write:

* ``raw_replay``: the stream read with bare nats-py (an ordered push consumer, no decoding):
  the feed's ceiling;
* ``eventstore_read``: :meth:`EventStore.read` over the whole log (decoded to StoredMessage);
* ``projector_replay``: a :class:`twin.service.TwinProjector` catching up from position 0 into
  an empty collection (batches of 500, the changed twins written after each batch): how
  ``rebuild`` worked before it wrote each twin once;
* ``rebuild``: :func:`twin.rebuild.rebuild_twins` (each twin written once).

Prints one JSON document: events/s of each, the twins written, and the ratios rebuild /
raw_replay, rebuild / eventstore_read and rebuild / projector_replay.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import benchutil
from pymongo import AsyncMongoClient

from eventstore.adapters.endpoint import NatsEndpoint
from eventstore.adapters.jetstream import JetStreamEventStore
from eventstore.layout import StreamLayout
from proto import binding
from proto import events as ev
from proto.events import AnyEvent
from twin.adapters.mongo import MongoTwinStore
from twin.rebuild import rebuild_twins
from twin.service import ProjectorConfig, TwinProjector
from twinhub_cli.devservices import MongoServer, NatsServer

FULL = {"devices": 100, "events_per_device": 600}
QUICK = {"devices": 10, "events_per_device": 50}
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def device_life(device: str, n: int) -> list[AnyEvent]:
    t = T0

    def e(data: ev.EventData, cid: str | None = None) -> AnyEvent:
        nonlocal t
        t += timedelta(milliseconds=250)
        return ev.Event(
            owner="bench", device_id=device, data=data, source="/gw", time=t, correlation_id=cid
        )

    conn = f"{device}-c1"
    out = [
        e(ev.DeviceRegistered()),
        e(ev.DeviceOnline(gateway="gw-1", connection_id=conn, remote_address="127.0.0.1:1")),
        e(
            ev.ResourceLinksPublished(
                links=tuple(
                    ev.ResourceLink(href=f"/light/{k}", rt=("oic.r.switch.binary",))
                    for k in range(8)
                )
            )
        ),
        e(ev.TwinSyncStateChanged(state="in_sync", connection_id=conn)),
    ]
    i = 0
    while len(out) < n:
        i += 1
        href = f"/light/{i % 8}"
        if i % 10 == 0:
            cid = f"{device}-{i}"
            pending = ev.CommandPending(
                href=href, op="update", content={"value": True}, expires_at=t + timedelta(days=1)
            )
            sent = ev.CommandSent(href=href, gateway="gw-1", connection_id=conn, attempt=1)
            out += [
                e(pending, cid),
                e(sent, cid),
                e(ev.CommandSucceeded(href=href, status="2.04"), cid),
            ]
        else:
            content = {"value": i % 2 == 0, "power": i, "name": f"light {i % 8}"}
            out.append(e(ev.ResourceChanged(href=href, content=content, content_format=10000)))
    return out[:n]


async def fill(store: JetStreamEventStore, devices: int, per_device: int) -> int:
    lives = [device_life(f"dev-{d:04d}", per_device) for d in range(devices)]
    sem = asyncio.Semaphore(16)

    async def one(life: list[AnyEvent]) -> None:
        for start in range(0, len(life), 100):  # one device's chunks in order
            async with sem:
                await store.append([binding.to_nats(e) for e in life[start : start + 100]])

    await asyncio.gather(*(one(life) for life in lives))
    return sum(map(len, lives))


async def raw_replay(endpoint: NatsEndpoint, total: int) -> float:
    import nats  # the bench compares with the bare client; library code keeps nats in the adapter

    nc = await nats.connect(**endpoint.connect_options())
    try:
        js = nc.jetstream()
        done = asyncio.Event()
        seen = 0

        async def on(_msg: Any) -> None:
            nonlocal seen
            seen += 1
            if seen >= total:
                done.set()

        start = time.perf_counter()
        layout = StreamLayout()
        sub = await js.subscribe(
            layout.subjects[0], ordered_consumer=True, cb=on, stream=layout.name
        )
        await asyncio.wait_for(done.wait(), 600)
        elapsed = time.perf_counter() - start
        await sub.unsubscribe()
        return elapsed
    finally:
        await nc.close()


async def timed_read(store: JetStreamEventStore) -> tuple[int, float]:
    start = time.perf_counter()
    n = 0
    async for _ in store.read():
        n += 1
    return n, time.perf_counter() - start


async def projector_replay(twins: MongoTwinStore, store: JetStreamEventStore, head: int) -> float:
    config = ProjectorConfig(name="bench-replay", batch_size=500, emit_derived_events=False)
    start = time.perf_counter()
    async with TwinProjector(twins, store, config) as projector:
        await projector.wait_for_position(head, 3600)
    return time.perf_counter() - start


def rate(events: int, seconds: float) -> float:
    return round(events / seconds) if seconds > 0 else 0.0


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"benchmark": "twin.rebuild", "args": vars(args)}
    with tempfile.TemporaryDirectory(prefix="twinhub-bench-") as tmp:
        async with (
            NatsServer(Path(tmp) / "nats") as nats_server,
            MongoServer(Path(tmp) / "mongo") as mongo_server,
        ):
            out["machine"] = benchutil.machine(
                {"nats_server": benchutil.binary_version(nats_server.binary, "--version")}
            )
            admin = nats_server.endpoint("admin")
            async with JetStreamEventStore.from_url(admin, timeout=60.0) as store:
                await store.provision()
                print("filling the log ...", file=sys.stderr)
                total = await fill(store, args.devices, args.events_per_device)
                head = [m.position async for m in store.read()][-1]
                print(f"{total} events; raw replay ...", file=sys.stderr)
                raw_s = await raw_replay(admin, total)
                read_n, read_s = await timed_read(store)
                assert read_n == total, (read_n, total)
                client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongo_server.url)
                try:
                    db = client["bench"]
                    print("projector replay ...", file=sys.stderr)
                    replay_s = await projector_replay(MongoTwinStore(db, "replayed"), store, head)
                    print("rebuild ...", file=sys.stderr)
                    start = time.perf_counter()
                    stats = await rebuild_twins(MongoTwinStore(db, "rebuilt"), store, name="b")
                    rebuild_s = time.perf_counter() - start
                    assert stats.events_read == total
                    same = await db.rebuilt.find().sort("_id").to_list() == (
                        await db.replayed.find().sort("_id").to_list()
                    )
                finally:
                    await client.close()
    runs = {
        "raw_replay": {"seconds": round(raw_s, 3), "events_per_s": rate(total, raw_s)},
        "eventstore_read": {"seconds": round(read_s, 3), "events_per_s": rate(total, read_s)},
        "projector_replay": {"seconds": round(replay_s, 3), "events_per_s": rate(total, replay_s)},
        "rebuild": {
            "seconds": round(rebuild_s, 3),
            "events_per_s": rate(total, rebuild_s),
            "twins_written": stats.twins_written,
            "flushes": stats.flushes,
        },
    }
    out.update(
        events=total,
        devices=args.devices,
        runs=runs,
        same_twins_as_the_projector=same,
        ratios={
            "rebuild_vs_raw_replay": round(raw_s / rebuild_s, 3),
            "rebuild_vs_eventstore_read": round(read_s / rebuild_s, 3),
            "rebuild_vs_projector_replay": round(replay_s / rebuild_s, 2),
        },
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--devices", type=int)
    parser.add_argument("--events-per-device", type=int)
    parser.add_argument("--quick", action="store_true", help="smoke test: a tiny log")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    result = asyncio.run(main_async(args))
    text = json.dumps(result, indent=2, default=str)
    if args.output is not None:
        args.output.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()

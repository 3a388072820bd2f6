"""A subscription to some event kinds: one consumer filtered by the client, or one per kind?

The bus lets an application create single-filter consumers only (issue 9: the filtered create
subject is what the server can check against the owner's permissions), so a subscription to
several kinds either

* ``client``: one consumer on the device's (or owner's) subjects, the client dropping the
  other kinds (what ``twinhub_client`` does), or
* ``per-kind``: one consumer per kind, their deliveries merged by position on the client (to
  keep "once, in log order" the merge may hand out an event only once every consumer has
  said it has nothing earlier: this bench drains each consumer to the end, which is a lower
  bound of that cost), and, for reference,
* ``multi`` (before issue 9, no longer possible for applications): one consumer with one filter
  per kind, filtered by the server.

It fills the stream with one owner's events of several devices in a realistic mix (mostly
``resource-changed``, a few command and connection events), then reads every wanted event from
position 0 with each strategy, for a common case (resource changes: ~90% of the events) and a
rare one (command outcomes: ~4%). Reported: wall time, events transferred and handed out, and
the ratio to ``multi`` measured in the same run. Each strategy runs ``--repeat`` times,
alternating; medians.

    .venv/bin/python bench/kinds_bench.py [--events 20000] [--repeat 3] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import benchutil

from eventstore.adapters.jetstream import JetStreamEventStore
from proto import binding, subjects
from proto import events as ev
from twinhub_cli.devservices import NatsServer
from twinhub_client.subscription import EventSubscription

OWNER = "bench"
COMMON = ("resource-changed",)
RARE = ("command-succeeded", "command-failed")


def _event(device: str, i: int) -> Any:
    r = i % 100
    data: Any
    if r < 90:
        data = ev.ResourceChanged(href="/light/1", content={"value": i}, status="2.05")
    elif r < 93:
        data = ev.CommandSent(href="/light/1", gateway="gw", connection_id="c")
    elif r < 96:
        data = ev.CommandSucceeded(href="/light/1", status="2.04")
    elif r < 97:
        data = ev.CommandFailed(href="/light/1", status="4.00", reason="bench")
    else:
        data = ev.DeviceOnline(gateway="gw", connection_id="c", remote_address="127.0.0.1")
    return ev.Event(
        owner=OWNER,
        device_id=device,
        data=data,
        source="/bench",
        correlation_id=f"c{i}" if 90 <= r < 97 else None,
    )


async def _fill(store: JetStreamEventStore, count: int, devices: int) -> int:
    batch: list[Any] = []
    last = 0
    for i in range(count):
        batch.append(binding.to_nats(_event(f"d{i % devices}", i)))
        if len(batch) == 200:
            last = (await store.append(batch)).last_position
            batch.clear()
    if batch:
        last = (await store.append(batch)).last_position
    return last


async def _drain(sub: EventSubscription, end: int) -> int:
    handed = 0
    async with sub:
        while sub.position < end:
            e = await sub.next(timeout=0.5)
            if e is None:
                break  # nothing more of these kinds
            handed += 1
    return handed


async def _run(
    store: JetStreamEventStore, strategy: str, kinds: Sequence[str], end: int
) -> dict[str, Any]:
    scope = subjects.event_filter(OWNER)
    # the last wanted event: each strategy stops there (none waits for more)
    end = max([await store.last_position(subjects.event_filter(OWNER, None, k)) for k in kinds])
    t0 = time.perf_counter()
    if strategy == "client":
        handed = await _drain(
            EventSubscription(store, (scope,), kinds=kinds, from_position=0, batch=256), end
        )
        transferred = end  # every event up to the last wanted one
    elif strategy == "multi":
        filters = [subjects.event_filter(OWNER, None, k) for k in kinds]
        handed = await _drain(EventSubscription(store, filters, from_position=0, batch=256), end)
        transferred = handed
    else:

        async def one(kind: str) -> int:
            f = subjects.event_filter(OWNER, None, kind)
            last = await store.last_position(f)
            return await _drain(EventSubscription(store, (f,), from_position=0, batch=256), last)

        counts = await asyncio.gather(*(one(k) for k in kinds))
        handed = sum(counts)
        transferred = handed
    return {"seconds": time.perf_counter() - t0, "handed_out": handed, "transferred": transferred}


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        async with (
            NatsServer(Path(tmp) / "nats") as server,
            JetStreamEventStore.from_url(server.endpoint("admin"), timeout=30.0) as store,
        ):
            await store.provision()
            end = await _fill(store, args.events, args.devices)
            cases: dict[str, Any] = {}
            for case, kinds in (("common", COMMON), ("rare", RARE)):
                runs: dict[str, list[dict[str, Any]]] = {
                    "multi": [],
                    "client": [],
                    "per-kind": [],
                }
                for _ in range(args.repeat):
                    for strategy in runs:
                        runs[strategy].append(await _run(store, strategy, kinds, end))
                out: dict[str, Any] = {"kinds": list(kinds)}
                base = statistics.median(r["seconds"] for r in runs["multi"])
                for strategy, rs in runs.items():
                    med = statistics.median(r["seconds"] for r in rs)
                    out[strategy] = {
                        "seconds_median": round(med, 4),
                        "ratio_to_multi": round(med / base, 3),
                        "handed_out": rs[0]["handed_out"],
                        "transferred": rs[0]["transferred"],
                    }
                if out["multi"]["handed_out"] != out["client"]["handed_out"]:
                    raise SystemExit(f"{case}: strategies disagree: {out}")
                cases[case] = out
    return {
        "bench": "kinds",
        "machine": benchutil.machine(),
        "events": args.events,
        "devices": args.devices,
        "repeat": args.repeat,
        "cases": cases,
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--events", type=int, default=20_000)
    p.add_argument("--devices", type=int, default=10)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="small and once (CI)")
    args = p.parse_args(argv)
    if args.quick:
        args.events, args.repeat = 1000, 1
    result = asyncio.run(main_async(args))
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())

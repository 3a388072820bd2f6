"""Twin store writes per command lifecycle and per event, with and without the projector's
linger (issue 14 item 2).

    .venv/bin/python bench/writes_bench.py [--rate 100] [--seconds 3] [--devices 10]
        [--lingers 0,0.05] [--quick] [--output FILE]

The projector (:class:`twin.service.TwinProjector`) on an in-memory log (so that only the
projector and the store are measured) into the MongoDB-wire server (FerretDB, from
:mod:`twinhub_cli.devservices`, the store's real documents and indexes). Commands arrive at
``--rate`` per second, round-robin over ``--devices``: ``command-pending``, 4 ms later
``command-sent``, 6 ms later ``command-succeeded`` (a device's round trip on loopback). Then,
for the same projector settings, ``resource-changed`` events at ``--rate`` per second. For each
``max_linger`` in ``--lingers`` (0: every batch written at once, the baseline) the store's write
commands by collection (:meth:`MongoTwinStore.write_counts`), per command ended and per event,
and the server's CPU per command. Prints one JSON document.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import benchutil
from pymongo import AsyncMongoClient

from eventstore.memory import InMemoryEventStore
from proto import binding
from proto import events as ev
from twin.adapters.mongo import MongoTwinStore
from twin.service import ProjectorConfig, TwinProjector
from twinhub_cli.devservices import MongoServer

FULL = {"rate": 100.0, "seconds": 3.0, "devices": 10}
QUICK = {"rate": 50.0, "seconds": 0.5, "devices": 3}


def _event(device: str, data: ev.EventData, cid: str | None = None) -> ev.AnyEvent:
    return ev.Event(owner="bench", device_id=device, data=data, source="/gw", correlation_id=cid)


async def _append(log: InMemoryEventStore, e: ev.AnyEvent) -> int:
    return (await log.append([binding.to_nats(e)])).last_position


async def _commands(log: InMemoryEventStore, devices: list[str], n: int, rate: float) -> int:
    async def one(i: int) -> int:
        device, cid = devices[i % len(devices)], f"c{i}"
        expires = datetime.now(UTC) + timedelta(minutes=5)
        pending = ev.CommandPending(href="/l", op="update", content={"v": i}, expires_at=expires)
        await _append(log, _event(device, pending, cid))
        await asyncio.sleep(0.004)
        sent = ev.CommandSent(href="/l", gateway="gw", connection_id="c", attempt=1)
        await _append(log, _event(device, sent, cid))
        await asyncio.sleep(0.006)
        return await _append(
            log, _event(device, ev.CommandSucceeded(href="/l", status="2.04"), cid)
        )

    tasks = []
    for i in range(n):
        tasks.append(asyncio.create_task(one(i)))
        await asyncio.sleep(1 / rate)
    return max(await asyncio.gather(*tasks))


async def _changes(log: InMemoryEventStore, devices: list[str], n: int, rate: float) -> int:
    last = 0
    for i in range(n):
        data = ev.ResourceChanged(href="/l", content={"v": i}, content_format=10000)
        last = await _append(log, _event(devices[i % len(devices)], data))
        await asyncio.sleep(1 / rate)
    return last


async def _settled(projector: TwinProjector, position: int) -> None:
    await projector.wait_for_position(position, 120)
    await asyncio.sleep(1.2)  # the idle checkpoint


async def one_run(url: str, args: argparse.Namespace, linger: float, pid: int) -> dict[str, Any]:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(url)
    try:
        store = MongoTwinStore(client[f"w{int(linger * 1000)}"])
        await store.ensure_indexes()
        log = InMemoryEventStore()
        await log.provision()
        config = ProjectorConfig(fetch_timeout=0.05, max_linger=linger, emit_derived_events=False)
        devices = [f"d{i}" for i in range(args.devices)]
        n = max(1, int(args.rate * args.seconds))
        async with TwinProjector(store, log, config) as projector:
            last = 0
            for d in devices:
                last = await _append(log, _event(d, ev.DeviceRegistered()))
            await _settled(projector, last)
            w0, ended0 = dict(store.write_counts()), projector.stats.commands_ended
            cpu0 = benchutil.cpu_seconds(pid) or 0.0
            await _settled(projector, await _commands(log, devices, n, args.rate))
            cpu1 = benchutil.cpu_seconds(pid) or 0.0
            w1, ended = dict(store.write_counts()), projector.stats.commands_ended - ended0
            applied0 = projector.stats.events_applied
            await _settled(projector, await _changes(log, devices, n, args.rate))
            w2 = dict(store.write_counts())
            applied = projector.stats.events_applied - applied0
    finally:
        await client.close()
    cmd = {k: w1.get(k, 0) - w0.get(k, 0) for k in set(w1) | set(w0)}
    chg = {k: w2.get(k, 0) - w1.get(k, 0) for k in set(w2) | set(w1)}
    return {
        "max_linger_s": linger,
        "commands": ended,
        "store_writes_for_commands": cmd,
        "store_writes_per_command": round(sum(cmd.values()) / max(1, ended), 2),
        "mongo_cpu_ms_per_command": round((cpu1 - cpu0) * 1000 / max(1, ended), 3),
        "changes": applied,
        "store_writes_for_changes": chg,
        "store_writes_per_change": round(sum(chg.values()) / max(1, applied), 2),
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"benchmark": "twin.store_writes", "args": vars(args)}
    with tempfile.TemporaryDirectory(prefix="twinhub-bench-") as tmp:
        async with MongoServer(Path(tmp)) as server:
            assert server.pid is not None
            out["machine"] = benchutil.machine()
            runs = []
            for linger in args.lingers:
                print(f"max_linger {linger} s ...", file=sys.stderr)
                runs.append(await one_run(server.url, args, linger, server.pid))
            out["runs"] = runs
    base = out["runs"][0]
    out["ratios"] = {
        f"writes_per_command_linger_{r['max_linger_s']}_over_{base['max_linger_s']}": round(
            r["store_writes_per_command"] / max(0.01, base["store_writes_per_command"]), 3
        )
        for r in out["runs"][1:]
    }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rate", type=float)
    parser.add_argument("--seconds", type=float)
    parser.add_argument("--devices", type=int)
    parser.add_argument(
        "--lingers", type=lambda s: [float(x) for x in s.split(",")], default=[0.0, 0.05]
    )
    parser.add_argument("--quick", action="store_true", help="smoke test: a few commands")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    text = json.dumps(asyncio.run(main_async(args)), indent=2, default=str)
    if args.output is not None:
        args.output.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()

"""Cost of small reads of the JetStream event store, against a local nats-server (file storage).

    .venv/bin/python bench/read_bench.py [--reads 10000] [--messages 100000] [--subjects 1000]
        [--quick]

Fills a fresh stream with ``--messages`` events spread round-robin over ``--subjects`` subjects
(``twinhub.ev.o.d<n>.resource-changed.r<m>``, ten per device), then times ``--reads`` sequential
``read(subject, after=...)`` calls that return 0, 1 and 10 messages (the shapes of the command
API's tail read and the gateway's command re-reads), a device-filter read (wildcard) returning 10,
and one full replay of the stream. Prints one JSON document: per case the client's wall time per
read and the nats-server's CPU time per read (from ``/proc/<pid>/stat``), in microseconds.
``--quick``: a smoke test (200 reads, 5,000 messages over 100 subjects).

The server runs authenticated (:class:`twinhub_cli.devservices.NatsServer`); the store reads a
stream of its own (``READS``) as the bus's admin role (NKey), the only role allowed on a stream
other than the product's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import benchutil

from eventstore.adapters.jetstream import JetStreamEventStore
from eventstore.layout import StreamLayout
from proto.message import NatsMessage
from twinhub_cli.devservices import NatsServer

HEADERS = {
    "ce-specversion": "1.0",
    "ce-type": "io.twinhub.resource.changed.v1",
    "ce-source": "bench",
    "Content-Type": "application/json",
}
PAYLOAD = b'{"href":"/light/1","content":{"state":true,"power":42},"status":"2.05"}'
_TICK = os.sysconf("SC_CLK_TCK")
FULL = {"reads": 10_000, "messages": 100_000, "subjects": 1_000}
QUICK = {"reads": 200, "messages": 5_000, "subjects": 100}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime + stime


def subject(i: int, subjects: int) -> str:
    n = i % subjects
    return f"twinhub.ev.o.d{n // 10}.resource-changed.r{n % 10}"


async def fill(store: JetStreamEventStore, messages: int, subjects: int) -> None:
    sem = asyncio.Semaphore(32)

    async def chunk(start: int) -> None:
        async with sem:
            await store.append(
                [
                    NatsMessage(subject(i, subjects), f"m{i}", PAYLOAD, HEADERS)
                    for i in range(start, min(start + 500, messages))
                ]
            )

    await asyncio.gather(*(chunk(s) for s in range(0, messages, 500)))


async def case(
    store: JetStreamEventStore, pid: int, name: str, reads: int, filt: str, after: int, want: int
) -> dict[str, Any]:
    got = [m async for m in store.read(filt, after=after)]
    assert len(got) == want, (name, len(got), want)
    cpu0, t0 = cpu_seconds(pid), time.perf_counter()
    for _ in range(reads):
        async for _m in store.read(filt, after=after):
            pass
    wall, cpu = time.perf_counter() - t0, cpu_seconds(pid) - cpu0
    return {
        "case": name,
        "reads": reads,
        "messages_per_read": want,
        "client_us_per_read": round(wall / reads * 1e6, 1),
        "server_cpu_us_per_read": round(cpu / reads * 1e6, 1),
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"benchmark": "eventstore.read", "machine": {}, "args": vars(args)}
    with tempfile.TemporaryDirectory(prefix="twinhub-bench-") as tmp:
        async with NatsServer(Path(tmp)) as server:
            assert server.pid is not None
            out["machine"] = benchutil.machine(
                {"nats_server": benchutil.binary_version(server.binary, "--version")}
            )
            layout = StreamLayout(name="READS")
            admin = server.endpoint("admin")
            async with JetStreamEventStore.from_url(admin, layout, timeout=60.0) as store:
                await store.provision()
                await fill(store, args.messages, args.subjects)
                subj = subject(0, args.subjects)
                positions = [m.position async for m in store.read(subj)]
                device = subj.rsplit(".", 2)[0] + ".>"
                dev_positions = [m.position async for m in store.read(device)]
                runs = [
                    await case(store, server.pid, "0", args.reads, subj, positions[-1], 0),
                    await case(store, server.pid, "1", args.reads, subj, positions[-2], 1),
                    await case(store, server.pid, "10", args.reads, subj, positions[-11], 10),
                    await case(
                        store, server.pid, "device_10", args.reads, device, dev_positions[-11], 10
                    ),
                ]
                cpu0, t0 = cpu_seconds(server.pid), time.perf_counter()
                count = sum([1 async for _ in store.read()])
                runs.append(
                    {
                        "case": "full_replay",
                        "messages": count,
                        "client_s": round(time.perf_counter() - t0, 3),
                        "server_cpu_s": round(cpu_seconds(server.pid) - cpu0, 3),
                    }
                )
                out["runs"] = runs
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--reads", type=int)
    parser.add_argument("--messages", type=int)
    parser.add_argument("--subjects", type=int)
    parser.add_argument("--quick", action="store_true", help="smoke test: small stream, few reads")
    args = parser.parse_args()
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.messages < 11 * args.subjects:
        parser.error("--messages must be at least 11 x --subjects (reads of 10 messages)")
    print(json.dumps(asyncio.run(main_async(args)), indent=2))


if __name__ == "__main__":
    main()

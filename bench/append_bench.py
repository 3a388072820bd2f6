"""Append throughput of the JetStream event store, against a local nats-server (file storage).

    .venv/bin/python bench/append_bench.py [--scale 1.0 | --quick] [--uvloop] [--subject-memory N]

Prints one JSON document: the machine, then per scenario the messages and appends per second
and append-call latency percentiles. Scenarios:

* ``sequential``             one message per append, each awaited before the next
* ``sequential_conditional`` the same with expected_last (one device, scope = the device)
* ``concurrent``             many devices (tasks) appending one message at a time: acks pipeline
* ``concurrent_conditional`` the same with expected_last per device
* ``batch10``                many devices appending 10 messages per call (unconditional)
* ``atomic10``               many devices appending 10 messages per call with expected_last
                             (atomic batches)

For scale, two baselines use nats-py directly with the same payload and headers (``raw_publish``:
``js.publish`` awaited one by one; ``raw_publish_async``: ``js.publish_async`` then all acks).

``--subject-memory N`` also measures the server's resident memory after storing N messages on N
distinct subjects, on one subject with N distinct msg ids (duplicate window), and on one subject
without ids -- the numbers behind the sizing notes in ``eventstore/layout.py``. ``--quick``: a
smoke test (``--scale 0.02``).

The server runs as users run it, authenticated (:class:`twinhub_cli.devservices.NatsServer`).
Every scenario appends to a throw-away stream of its own (``BENCH_<hex>``, deleted afterwards),
which only the bus's admin role may use, so the store connects as admin (NKey); the gateway's
own role on the product stream is measured by ``bus_bench.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from eventstore.adapters.endpoint import NatsEndpoint
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
QUICK_SCALE = 0.02


def machine() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "nats_py": importlib.metadata.version("nats-py"),
    }


def server_version(binary: Path) -> str:
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, check=False)
    return out.stdout.strip() or out.stderr.strip()


class Run:
    def __init__(self, store: JetStreamEventStore, root: str) -> None:
        self.store = store
        self.root = root
        self.latencies: list[float] = []
        self.messages = 0
        self.appends = 0
        self._n = 0

    def msgs(self, device: str, count: int) -> list[NatsMessage]:
        out = []
        for i in range(count):
            self._n += 1
            out.append(
                NatsMessage(
                    subject=f"{self.root}.owner.{device}.resource-changed.r{i % 10}",
                    msg_id=f"{device}-{self._n}",
                    data=PAYLOAD,
                    headers=HEADERS,
                )
            )
        return out

    def scope(self, device: str) -> str:
        return f"{self.root}.*.{device}.>"

    async def append(
        self, messages: Sequence[NatsMessage], expected: int | None = None, scope: str | None = None
    ) -> int:
        t = time.perf_counter()
        r = await self.store.append(messages, expected_last=expected, scope=scope)
        self.latencies.append(time.perf_counter() - t)
        self.messages += len(messages)
        self.appends += 1
        return r.last_position


async def device_loop(run: Run, device: str, appends: int, size: int, conditional: bool) -> None:
    last = 0
    for _ in range(appends):
        batch = run.msgs(device, size)
        if conditional:
            last = await run.append(batch, last, run.scope(device))
        else:
            await run.append(batch)


def scenarios(scale: float) -> dict[str, tuple[int, int, int, bool]]:
    """name -> (devices, appends per device, messages per append, conditional)."""

    def n(x: int) -> int:
        return max(1, round(x * scale))

    return {
        "sequential": (1, n(5000), 1, False),
        "sequential_conditional": (1, n(3000), 1, True),
        "concurrent": (500, n(40), 1, False),
        "concurrent_conditional": (500, n(20), 1, True),
        "batch10": (500, n(10), 10, False),
        "atomic10": (200, n(5), 10, True),
    }


async def measure(
    endpoint: NatsEndpoint, name: str, devices: int, per_device: int, size: int, conditional: bool
) -> dict[str, Any]:
    hexid = uuid.uuid4().hex[:10]
    root = f"bench{hexid}.ev"
    layout = StreamLayout(name=f"BENCH_{hexid}", subjects=(f"{root}.>",))
    async with JetStreamEventStore.from_url(endpoint, layout, timeout=30.0) as store:
        await store.provision()
        run = Run(store, root)
        start = time.perf_counter()
        await asyncio.gather(
            *(device_loop(run, f"dev{d}", per_device, size, conditional) for d in range(devices))
        )
        elapsed = time.perf_counter() - start
        stored = await store.last_position(f"{root}.>")
        await store.connection.request(f"$JS.API.STREAM.DELETE.{layout.name}", b"", timeout=10)
    lat = sorted(run.latencies)
    return {
        "scenario": name,
        "devices": devices,
        "appends": run.appends,
        "messages_per_append": size,
        "conditional": conditional,
        "messages": run.messages,
        "stored": stored,
        "seconds": round(elapsed, 3),
        "messages_per_s": round(run.messages / elapsed),
        "appends_per_s": round(run.appends / elapsed),
        "latency_ms_p50": round(statistics.median(lat) * 1000, 3),
        "latency_ms_p99": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000, 3),
    }


async def raw_baselines(
    endpoint: NatsEndpoint, sequential: int, pipelined: int
) -> list[dict[str, Any]]:
    import nats  # the bench compares with the bare client; library code keeps nats in the adapter

    nc = await nats.connect(**endpoint.connect_options())
    js = nc.jetstream()
    name = f"RAW_{uuid.uuid4().hex[:10]}"
    await js.add_stream(name=name, subjects=[f"{name}.>"])
    out = []
    try:
        start = time.perf_counter()
        for i in range(sequential):
            headers = {**HEADERS, "Nats-Msg-Id": f"s{i}"}
            await js.publish(f"{name}.o.d.k.r{i % 10}", PAYLOAD, headers=headers)
        elapsed = time.perf_counter() - start
        out.append(
            {
                "scenario": "raw_publish",
                "messages": sequential,
                "seconds": round(elapsed, 3),
                "messages_per_s": round(sequential / elapsed),
            }
        )
        start = time.perf_counter()
        futures = []
        for i in range(pipelined):
            headers = {**HEADERS, "Nats-Msg-Id": f"p{i}"}
            futures.append(
                await js.publish_async(f"{name}.o.d.k.r{i % 10}", PAYLOAD, headers=headers)
            )
        await asyncio.gather(*futures)
        elapsed = time.perf_counter() - start
        out.append(
            {
                "scenario": "raw_publish_async",
                "messages": pipelined,
                "seconds": round(elapsed, 3),
                "messages_per_s": round(pipelined / elapsed),
            }
        )
    finally:
        await js.delete_stream(name)
        await nc.close()
    return out


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


async def _fill(
    endpoint: NatsEndpoint, count: int, make: Callable[[int], NatsMessage], duplicate_window: float
) -> None:
    layout = StreamLayout(name="MEM", subjects=("mem.>",), duplicate_window=duplicate_window)
    async with JetStreamEventStore.from_url(endpoint, layout, timeout=60.0) as store:
        await store.provision()
        chunk = 1000
        sem = asyncio.Semaphore(64)

        async def one(start: int) -> None:
            async with sem:
                await store.append([make(i) for i in range(start, min(start + chunk, count))])

        await asyncio.gather(*(one(s) for s in range(0, count, chunk)))


async def subject_memory(count: int) -> dict[str, Any]:
    """Server RSS after ``count`` messages, three ways, each on a fresh server."""

    def distinct_subjects(i: int) -> NatsMessage:
        return NatsMessage(f"mem.o.d{i // 10}.resource-changed.r{i % 10}", f"x{i}", b"{}")

    def one_subject_ids(i: int) -> NatsMessage:
        return NatsMessage("mem.o.d.resource-changed.r", f"id-{uuid.uuid4().hex}", b"{}")

    # (message factory, duplicate window): a 1 s window has forgotten the ids when we measure.
    cases: dict[str, tuple[Callable[[int], NatsMessage], float]] = {
        "distinct_subjects_ids_in_window": (distinct_subjects, 120.0),
        "one_subject_ids_in_window": (one_subject_ids, 120.0),
        "one_subject_ids_expired": (one_subject_ids, 1.0),
    }
    out: dict[str, Any] = {"messages": count}
    for name, (make, window) in cases.items():
        with tempfile.TemporaryDirectory(prefix="twinhub-bench-") as tmp:
            async with NatsServer(Path(tmp)) as server:
                assert server.pid is not None
                before = rss_bytes(server.pid)
                await _fill(server.endpoint("admin"), count, make, window)
                await asyncio.sleep(5)  # let the server settle (not a synchronisation point)
                after = rss_bytes(server.pid)
        out[name] = {
            "rss_before_mb": round(before / 2**20, 1),
            "rss_after_mb": round(after / 2**20, 1),
            "bytes_per_message": round((after - before) / count),
        }
    per = {k: v["bytes_per_message"] for k, v in out.items() if isinstance(v, dict)}
    out["estimates"] = {
        "per_subject_bytes": per["distinct_subjects_ids_in_window"]
        - per["one_subject_ids_in_window"],
        "per_dedup_id_bytes": per["one_subject_ids_in_window"] - per["one_subject_ids_expired"],
    }
    return out


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {"benchmark": "eventstore.append", "machine": machine()}
    with tempfile.TemporaryDirectory(prefix="twinhub-bench-") as tmp:
        async with NatsServer(Path(tmp)) as server:
            result["machine"]["nats_server"] = server_version(server.binary)
            result["event_loop"] = "uvloop" if args.uvloop else "asyncio"
            result["scale"] = args.scale
            admin = server.endpoint("admin")
            result["nats_role"] = "admin"
            runs = []
            for name, (devices, per, size, cond) in scenarios(args.scale).items():
                runs.append(await measure(admin, name, devices, per, size, cond))
            result["scenarios"] = runs
            result["baselines"] = await raw_baselines(
                admin, max(1, round(5000 * args.scale)), max(1, round(20000 * args.scale))
            )
    if args.subject_memory:
        result["server_memory"] = await subject_memory(args.subject_memory)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--scale", type=float, default=None, help="multiply the append counts")
    parser.add_argument("--quick", action="store_true", help="smoke test: --scale 0.02")
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop")
    parser.add_argument("--subject-memory", type=int, default=0, metavar="N")
    args = parser.parse_args()
    if args.scale is None:
        args.scale = QUICK_SCALE if args.quick else 1.0
    if args.uvloop:
        import uvloop

        result = uvloop.run(main_async(args))
    else:
        result = asyncio.run(main_async(args))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

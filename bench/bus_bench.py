"""What the authenticated bus costs (PRODUCT issue 9 item 9): connecting, and ingest.

    .venv/bin/python bench/bus_bench.py [--quick] [--connects 500] [--runs 7]
        [--devices 500] [--events-per-device 40] [--output FILE]

Everything runs on this machine, on loopback, in a temporary directory removed on exit. Prints
one JSON document on stdout (the machine first; progress on stderr).

* ``connect``: connection set-up through the auth callout. ``--connects`` times, one after
  another: ``nats.connect(url, token=<application token>, inbox_prefix=_INBOX.<owner>)`` then a
  first ``flush()`` (the connection is admitted and answers), timed from the call to the
  flush's return; the connection is closed outside the timing. The callout runs in this process
  (:func:`twinhub_cli.services.run_callout`: the command API's application-token rules, the
  data dir's signing key), as ``twinhub up`` runs it. The baseline, measured in the same run in
  alternating blocks: the same for a service user by NKey (the gateway role's seed, no callout
  involved). Reported: p50 / p99 / mean of each and the ratios callout / NKey.
* ``ingest``: device events into the log, "before and after" the bus was authenticated.
  *before* is a bare ``nats-server -js`` without any configuration (the setup before issue 9,
  only as the baseline); *after* the authenticated :class:`twinhub_cli.devservices.NatsServer`,
  the stream provisioned by the twin role, the events appended with the gateway role's NKey.
  The path is the gateway's: one :class:`gateway.writer.DeviceWriter` per device over one
  :class:`eventstore.adapters.jetstream.JetStreamEventStore`, ``--devices`` devices each
  writing ``--events-per-device`` ``resource-changed`` events one after another (the next once
  the previous is acknowledged: the acknowledgements of all devices pipeline, as in the
  ``concurrent`` scenario of ``append_bench.py``). Runs alternate between the two servers
  (ABBA order, the stream purged before each run, one unmeasured warm-up run each), ``--runs``
  each; reported: events/s, nats-server CPU and this process's CPU per event, per run and as
  medians, and the ratio after / before.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import signal
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import benchutil
import nats
import nats.errors

from eventstore.adapters.endpoint import NatsEndpoint
from eventstore.adapters.jetstream import JetStreamEventStore
from eventstore.layout import DEFAULT_STREAM, StreamLayout
from gateway.writer import DeviceWriter, WriterConfig
from proto import events as ev
from proto import subjects
from twinhub_cli.devservices import NatsServer, find_nats_server_binary

OWNER = "bench"
HREF = "/light/1"
START_TIMEOUT = 30.0

FULL: dict[str, Any] = {"connects": 500, "runs": 7, "devices": 500, "events_per_device": 40}
QUICK: dict[str, Any] = {"connects": 50, "runs": 1, "devices": 100, "events_per_device": 10}
CONNECT_BLOCK = 50  # connects of one kind before switching to the other
CONNECT_WARMUP = 10  # connects of each kind before measuring


def say(text: str) -> None:
    sys.stderr.write(f"[bus {time.strftime('%H:%M:%S')}] {text}\n")
    sys.stderr.flush()


# -- the bare server (the baseline: no configuration, no authentication) -------------------------


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it when this process dies (PR_SET_PDEATHSIG)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass(frozen=True, slots=True)
class BareServer:
    pid: int
    url: str


async def _jetstream_answers(url: str) -> bool:
    async def quiet(exc: Exception) -> None:
        pass

    try:
        nc = await nats.connect(
            url, connect_timeout=1, allow_reconnect=False, max_reconnect_attempts=0, error_cb=quiet
        )
    except (OSError, TimeoutError, nats.errors.Error):
        return False
    try:
        reply = await nc.request("$JS.API.INFO", b"", timeout=1)
        info = json.loads(reply.data)
        return isinstance(info, dict) and "error" not in info
    except (OSError, TimeoutError, nats.errors.Error, ValueError):
        return False
    finally:
        await nc.close()


@contextlib.asynccontextmanager
async def bare_nats_server(directory: Path) -> AsyncIterator[BareServer]:
    """``nats-server -js -sd DIR -p PORT -a 127.0.0.1``: how twinhub ran NATS before issue 9
    (``directory`` exists)."""
    port = _free_port()
    argv = [str(find_nats_server_binary()), "-js", "-sd", str(directory)]
    argv += ["-p", str(port), "-a", "127.0.0.1", "-l", str(directory / "nats-server.log")]
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=_die_with_parent,
    )
    url = f"nats://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not await _jetstream_answers(url):
            if proc.returncode is not None:
                raise RuntimeError(f"bare nats-server exited with code {proc.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"bare nats-server not ready in {START_TIMEOUT:.0f} s")
            await asyncio.sleep(0.05)
        yield BareServer(proc.pid, url)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()


# -- connection set-up -------------------------------------------------------------------------


async def _quiet(exc: Exception) -> None:
    pass


async def timed_connect(options: dict[str, Any]) -> int:
    """Nanoseconds from ``nats.connect`` to the first flush's return (closed afterwards)."""
    t0 = time.perf_counter_ns()
    nc = await nats.connect(
        **options,
        connect_timeout=5,
        allow_reconnect=False,
        max_reconnect_attempts=0,
        error_cb=_quiet,
    )
    await nc.flush(timeout=5)
    took = time.perf_counter_ns() - t0
    await nc.close()
    return took


def _stats_ms(values_ns: Sequence[int]) -> dict[str, Any]:
    v = sorted(values_ns)
    return {
        "count": len(v),
        "p50_ms": round(benchutil.percentile(v, 50) / 1e6, 3),
        "p99_ms": round(benchutil.percentile(v, 99) / 1e6, 3),
        "mean_ms": round(statistics.fmean(v) / 1e6, 3),
        "max_ms": round(v[-1] / 1e6, 3),
    }


async def connect_phase(server: NatsServer, token: str, connects: int) -> dict[str, Any]:
    """Connects through the callout against connects by NKey, in alternating blocks."""
    app = NatsEndpoint(
        server.url, token=token, inbox_prefix=subjects.owner_inbox_prefix(OWNER)
    ).connect_options()
    nkey = server.endpoint("gateway").connect_options()
    kinds = {"callout_token": app, "nkey_service": nkey}
    for options in kinds.values():  # warm-up: first connections, imports, caches
        for _ in range(CONNECT_WARMUP):
            await timed_connect(options)
    times: dict[str, list[int]] = {k: [] for k in kinds}
    assert server.pid is not None
    meter = benchutil.CpuMeter({"nats": [server.pid], "bench_and_callout": [os.getpid()]})
    cpu0 = meter.sample()
    while any(len(t) < connects for t in times.values()):
        for kind, options in kinds.items():
            for _ in range(min(CONNECT_BLOCK, connects - len(times[kind]))):
                times[kind].append(await timed_connect(options))
    out: dict[str, Any] = {k: _stats_ms(v) for k, v in times.items()}
    out["cpu_pct_of_one_core"] = meter.usage(cpu0, meter.sample())
    a, b = out["callout_token"], out["nkey_service"]
    out["ratio_callout_over_nkey"] = {
        key: round(a[key] / b[key], 2) for key in ("p50_ms", "p99_ms", "mean_ms")
    }
    say(
        f"connect: callout p50 {a['p50_ms']} ms p99 {a['p99_ms']} ms mean {a['mean_ms']} ms; "
        f"NKey p50 {b['p50_ms']} ms p99 {b['p99_ms']} ms mean {b['mean_ms']} ms"
    )
    return out


# -- ingest -----------------------------------------------------------------------------------


def device_events(run: int, devices: int, per_device: int) -> list[list[ev.AnyEvent]]:
    """The ``resource-changed`` events of each device, as the gateway's session makes them."""
    out: list[list[ev.AnyEvent]] = []
    for d in range(devices):
        device = f"r{run}-d{d}"
        out.append(
            [
                ev.Event(
                    owner=OWNER,
                    device_id=device,
                    data=ev.ResourceChanged(
                        href=HREF,
                        content={"state": True, "power": i, "ts": time.time_ns()},
                        content_format=50,
                        observe_seq=i + 2,
                        connection_id=f"c-{device}",
                    ),
                    source="/gateway/bench",
                )
                for i in range(per_device)
            ]
        )
    return out


async def write_device(store: JetStreamEventStore, events: Sequence[ev.AnyEvent]) -> int:
    """One device's writer: each event submitted once the previous one is written."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[tuple[bool, str]] = loop.create_future()

    def on_done(ref: int, ok: bool, error: str, positions: tuple[int, ...], c: bool) -> None:
        if not done.done():
            done.set_result((ok, error))

    writer = DeviceWriter(store, on_done, WriterConfig(), events[0].device_id if events else "-")
    written = 0
    try:
        for i, event in enumerate(events):
            done = loop.create_future()
            if not writer.submit(i, (event,), critical=False):
                raise RuntimeError("writer buffer full")
            ok, error = await done
            if not ok:
                raise RuntimeError(f"append failed: {error}")
            written += 1
    finally:
        await writer.close()
    return written


@dataclass(frozen=True, slots=True)
class Target:
    """One server of the comparison: how the gateway connects, how the stream is set up."""

    name: str
    pid: int
    writer: NatsEndpoint  # the gateway's connection
    admin: NatsEndpoint  # provisioning and purging (the twin role / admin on the secured bus)
    provisioner: NatsEndpoint


async def _stream_request(store: JetStreamEventStore, op: str) -> dict[str, Any]:
    reply = await store.connection.request(f"$JS.API.STREAM.{op}.{DEFAULT_STREAM}", b"", timeout=30)
    answer: dict[str, Any] = json.loads(reply.data)
    if "error" in answer:
        raise RuntimeError(f"STREAM.{op}: {answer['error']}")
    return answer


async def ingest_run(target: Target, run: int, devices: int, per_device: int) -> dict[str, Any]:
    layout = StreamLayout(name=DEFAULT_STREAM)
    batches = device_events(run, devices, per_device)
    async with (
        JetStreamEventStore.from_url(target.admin, layout, timeout=30.0) as admin,
        JetStreamEventStore.from_url(target.writer, layout, timeout=30.0) as store,
    ):
        await _stream_request(admin, "PURGE")  # every run starts from an empty stream
        await store.wait_provisioned(30)
        meter = benchutil.CpuMeter({"nats": [target.pid], "bench": [os.getpid()]})
        a = meter.sample()
        t0 = time.perf_counter()
        written = await asyncio.gather(*(write_device(store, b) for b in batches))
        elapsed = time.perf_counter() - t0
        b = meter.sample()
        stored = (await _stream_request(admin, "INFO"))["state"]["messages"]
    total = sum(written)
    if stored != total:
        raise RuntimeError(f"{target.name}: {total} events written, {stored} in the stream")
    cpu_s = {
        name: (b.per_pid[pid] or 0.0) - (a.per_pid[pid] or 0.0)
        for name, pid in (("nats", target.pid), ("bench", os.getpid()))
    }
    usage = meter.usage(a, b)
    return {
        "server": target.name,
        "run": run,
        "events": total,
        "seconds": round(elapsed, 3),
        "events_per_s": round(total / elapsed),
        "server_cpu_us_per_event": round(cpu_s["nats"] / total * 1e6, 1),
        "bench_cpu_us_per_event": round(cpu_s["bench"] / total * 1e6, 1),
        "cpu_pct_of_one_core": usage,
    }


async def provision(endpoint: NatsEndpoint) -> None:
    async with JetStreamEventStore.from_url(endpoint, StreamLayout(name=DEFAULT_STREAM)) as store:
        await store.provision()


def _median_of(rows: Sequence[dict[str, Any]], key: str) -> float:
    return float(statistics.median(r[key] for r in rows))


async def ingest_phase(
    before: Target, after: Target, runs: int, devices: int, per_device: int
) -> dict[str, Any]:
    for t in (before, after):
        await provision(t.provisioner)
    say(f"ingest: warm-up, then {runs} run(s) each of {devices} devices x {per_device} events")
    for t in (before, after):
        await ingest_run(t, 0, devices, per_device)
    rows: list[dict[str, Any]] = []
    for i in range(runs):
        order = (before, after) if i % 2 == 0 else (after, before)  # ABBA: linear drift cancels
        for t in order:
            row = await ingest_run(t, len(rows) + 1, devices, per_device)
            rows.append(row)
            say(
                f"  {row['server']:6} {row['events_per_s']:>7} events/s, CPU per event: server "
                f"{row['server_cpu_us_per_event']} us, bench {row['bench_cpu_us_per_event']} us; "
                f"others {row['cpu_pct_of_one_core']['others_pct_of_one_core']}% of a core"
            )
    out: dict[str, Any] = {"devices": devices, "events_per_device": per_device, "runs": rows}
    others = [r["cpu_pct_of_one_core"]["others_pct_of_one_core"] for r in rows]
    out["others_pct_of_one_core"] = {
        "median": round(statistics.median(others), 1),
        "max": max(others),
    }
    for t in (before, after):
        mine = [r for r in rows if r["server"] == t.name]
        out[t.name] = {
            key: _median_of(mine, key)
            for key in ("events_per_s", "server_cpu_us_per_event", "bench_cpu_us_per_event")
        }
    b, a = out["before"], out["after"]
    out["ratio_after_over_before"] = {
        key: round(a[key] / b[key], 3) if b[key] else None for key in b
    }
    say(
        f"ingest: before {b['events_per_s']:g} events/s, after {a['events_per_s']:g} events/s "
        f"(x{out['ratio_after_over_before']['events_per_s']})"
    )
    return out


# -- the run ----------------------------------------------------------------------------------


async def run_bench(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from bus.credentials import ensure_credentials
    from twinhub_cli import config as cfgmod
    from twinhub_cli import services
    from twinhub_cli.datadir import DataDir

    result: dict[str, Any] = {
        "benchmark": "bus",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": benchutil.machine(
            {"nats_server": benchutil.binary_version(find_nats_server_binary())}
        ),
        "settings": {
            "quick": args.quick,
            "connects": args.connects,
            "runs": args.runs,
            "devices": args.devices,
            "events_per_device": args.events_per_device,
            "connect_block": CONNECT_BLOCK,
            "connect_warmup": CONNECT_WARMUP,
        },
    }
    data = DataDir(work / "data")  # keys and bus credentials laid out as `twinhub init` does
    (work / "bare").mkdir()
    async with (
        NatsServer(work / "nats", credentials=ensure_credentials(data.bus)) as server,
        bare_nats_server(work / "bare") as bare,
    ):
        assert server.pid is not None
        config = cfgmod.load(None, env={}, overrides={"nats": {"url": server.url}})
        token = services.issuer_for(config, data).issue(OWNER, now=time.time(), ttl=3600)
        if "connect" in args.phases:
            async with services.run_callout(config, data) as callout:
                result["connect"] = await connect_phase(server, token, args.connects)
                result["connect"]["callout_stats"] = {
                    "requests": callout.stats.requests,
                    "granted": callout.stats.granted,
                    "denied": callout.stats.denied,
                }
            if callout.stats.denied or callout.stats.granted < args.connects:
                raise RuntimeError(f"the callout did not admit every connect: {callout.stats}")
        if "ingest" in args.phases:
            anonymous = NatsEndpoint(bare.url)
            before = Target("before", bare.pid, anonymous, anonymous, anonymous)
            after = Target(
                "after",
                server.pid,
                server.endpoint("gateway"),
                server.endpoint("admin"),
                server.endpoint("twin"),
            )
            result["ingest"] = await ingest_phase(
                before, after, args.runs, args.devices, args.events_per_device
            )
    return result


PHASES = ("connect", "ingest")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bus_bench.py",
        description=(__doc__ or "").splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="smoke test (CI): see QUICK")
    p.add_argument("--connects", type=int, help="connects of each kind (500; quick 50)")
    p.add_argument("--runs", type=int, help="ingest runs per server (7; quick 1)")
    p.add_argument("--devices", type=int, help="concurrent devices per ingest run (500)")
    p.add_argument("--events-per-device", type=int, help="events per device per run (40)")
    p.add_argument(
        "--phases",
        type=lambda t: [x for x in t.split(",") if x],
        default=list(PHASES),
        help="connect,ingest (both by default)",
    )
    p.add_argument("--output", type=Path, metavar="FILE", help="also write the JSON to FILE")
    p.add_argument("--keep-work-dir", action="store_true", help="keep the temp dir (logs)")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if min(args.connects, args.runs, args.devices, args.events_per_device) < 1:
        p.error("--connects, --runs, --devices and --events-per-device must be >= 1")
    unknown = set(args.phases) - set(PHASES)
    if unknown:
        p.error(f"unknown phases {sorted(unknown)} (known: {', '.join(PHASES)})")
    return args


def main() -> int:
    import shutil

    import uvloop

    args = parse_args(sys.argv[1:])
    work = Path(tempfile.mkdtemp(prefix="twinhub-bus-"))
    say(f"work dir {work}")
    try:
        result = uvloop.run(run_bench(args, work))  # the loop twinhub's services run on
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    finally:
        if args.keep_work_dir:
            say(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(result, indent=2)
    print(text, flush=True)
    if args.output is not None:
        args.output.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Command benchmark: client → twin command API → log → gateway → device → outcome → client.

    .venv/bin/python bench/command_bench.py [--devices 100] [--rates 100,1000] [--duration 10]
        [--pending 1000] [--phases roundtrip,pending,cost] [--quick] [--profile-twin FILE]
        [--output FILE] [--keep-work-dir]

Everything runs on this machine, on loopback, in a temporary directory removed on exit, the way
:mod:`e2e_bench` runs it (whose process helpers this script reuses): ``nats-server`` and the
MongoDB-wire server (FerretDB) from :mod:`twinhub_cli.devservices`, ``twinhub gateway`` (TLS) and
``twinhub twin run`` (projector, command API, expiry sweeper) as processes of their own, the
simulated devices in ``sim-worker`` processes (this script), and the client
(:class:`twinhub_client.TwinhubClient`) in this process.

The bus is authenticated as users run it: the gateway and the twin service connect with the
NKeys of their roles (``TWINHUB_NATS_CREDENTIALS``: the server's credentials directory), the
auth callout runs in this process (:func:`twinhub_cli.services.run_callout`, the command API's
application-token rules over the data dir's signing key) and the client connects with an
application token of the benchmark's owner (no device binding, 24 h), which the callout admits
to the APPS account; the benchmark's own reads of the log use the admin role.

* ``roundtrip``: ``--devices`` online simulated devices (one light each). At each offered rate
  (commands/s, all devices together, round-robin, open loop: a request is sent when it is due
  whether or not earlier ones were answered) for ``--duration`` seconds, ``update`` commands
  whose ``power`` is unique per command. Per command: ``accepted`` (the API replied: the command
  is in the log), ``device`` (the simulator applied it: its own wall-clock stamp, reported
  afterwards) and ``outcome`` (the client saw the outcome event on one subscription to the
  owner's outcome events), each from the moment the client sent the request. ``achieved_per_s``
  counts the commands accepted per second of the window.
* ``pending``: one device registers, goes offline; ``--pending`` updates are queued to it one
  after another (the API's latency per request is reported by how many were pending then),
  then it starts again: the time from its start (and from its ``device-online`` event in the
  log) to the last command applied by the device and to the last ``command-succeeded`` seen.
* ``cost``: what one twin costs the store with 0, 100 and ``--pending`` open commands embedded
  (a twin document carries its open commands): document size, ``to_document`` /
  ``from_document``, folding one more command event, a store ``get`` and ``write_many`` of the
  twin (FerretDB), medians of repeated runs.

``--quick``: a smoke test (10 devices, 20 commands/s for 3 s, 20 pending, 3 cost repetitions).

All timestamps are this host's wall clock. CPU per process (% of one core) is reported per
phase; ``others_pct_of_one_core`` is what the rest of the machine used meanwhile.
Prints one JSON document on stdout (progress on stderr).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import statistics
import sys
import time
import traceback
from collections.abc import AsyncIterator, Coroutine, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import benchutil
import e2e_bench as e2e

SCRIPT = Path(__file__).resolve()
OWNER = "bench"
HREF = "/light/1"
PENDING_TTL = 3600.0  # queueing 1,000 takes minutes: none may expire before the device is back
APP_TOKEN_TTL = 24 * 3600.0  # the client's application token (at most 7 days are accepted)


def say(text: str) -> None:
    sys.stderr.write(f"[cmd {time.strftime('%H:%M:%S')}] {text}\n")
    sys.stderr.flush()


# -- the sim-worker (runs in the simulator process) ------------------------------------------


async def sim_worker(args: argparse.Namespace) -> int:
    """Simulated devices that record when they apply an update (``power`` → wall-clock ns)."""
    import logging

    from devicesim.config import TlsOptions
    from devicesim.fleet import run_fleet
    from devicesim.resources import DeviceModel
    from devicesim.stats import FleetSnapshot

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    logging.getLogger("devicesim.coap").setLevel(logging.ERROR)
    received: dict[int, int] = {}  # power -> first time applied
    original = DeviceModel.apply_update

    def recording(self: DeviceModel, href: str, payload: Any, now_ns: int) -> dict[str, Any]:
        power = payload.get("power") if isinstance(payload, dict) else None
        if isinstance(power, int):
            received.setdefault(power, time.time_ns())
        return original(self, href, payload, now_ns)

    DeviceModel.apply_update = recording  # type: ignore[method-assign]
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    fleet: list[Any] = []

    def started(devices: Sequence[Any]) -> None:
        fleet.extend(devices)
        e2e._emit({"type": "ready", "devices": len(devices)})

    fleet_task = asyncio.create_task(
        run_fleet(
            args.gateway,
            devices=args.devices,
            resources=1,
            rate=0.0,
            tls=TlsOptions(ca_file=args.ca, server_name=e2e.GATEWAY_HOST),
            token=args.token,
            device_prefix=args.prefix,
            connect_concurrency=64,
            stop=stop,
            handle_signals=True,
            on_started=started,
        )
    )
    reader = asyncio.StreamReader(limit=2**20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        while not fleet_task.done():
            read = asyncio.create_task(reader.readline())
            await asyncio.wait({read, fleet_task}, return_when=asyncio.FIRST_COMPLETED)
            if not read.done():
                read.cancel()
                break
            line = read.result()
            if not line:
                break
            match json.loads(line).get("cmd"):
                case "stats":
                    snap = FleetSnapshot.of(d.stats for d in fleet)
                    e2e._emit(
                        {
                            "type": "stats",
                            "signed_in": snap.signed_in,
                            "received": len(received),
                            "errors": snap.totals.get("errors", 0),
                        }
                    )
                case "received":
                    e2e._emit({"type": "received", "received": received})
                case "stop":
                    break
                case other:
                    e2e._emit({"type": "error", "error": f"unknown command {other!r}"})
    finally:
        stop.set()
    summary = await asyncio.wait_for(fleet_task, 80)
    e2e._emit({"type": "summary", **summary.to_dict()})
    return 0


@contextlib.asynccontextmanager
async def sim_process(
    work: Path, gw: e2e.GatewayProc, ca: Path, token: str, devices: int, prefix: str
) -> AsyncIterator[e2e.SimProc]:
    argv = [sys.executable, str(SCRIPT), "sim-worker", "--gateway", gw.uri, "--ca", str(ca)]
    argv += ["--token", token, "--devices", str(devices), "--prefix", prefix]
    name = f"sim-{prefix}"
    child = await e2e.Child.spawn(
        name, argv, work / f"{name}.log", env=e2e._clean_env(), stdin=True
    )
    proc = e2e.SimProc(child, devices)
    try:
        await proc.wait_ready(60)
        yield proc
    finally:
        await proc.stop()


async def wait_signed_in(sim: e2e.SimProc, timeout: float) -> float:
    started = time.monotonic()
    while True:
        st = await sim.call({"cmd": "stats"})
        if st["signed_in"] >= sim.devices:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"{st['signed_in']}/{sim.devices} signed in after {timeout:.0f} s")
        await asyncio.sleep(0.2)


async def receipts(sim: e2e.SimProc) -> dict[int, int]:
    reply = await sim.call({"cmd": "received"}, timeout=60)
    return {int(k): int(v) for k, v in reply["received"].items()}


# -- the twin service process ----------------------------------------------------------------


@contextlib.asynccontextmanager
async def twin_process(
    work: Path, data_dir: Path, config: Any, profile_to: Path | None
) -> AsyncIterator[e2e.Child]:
    """``twinhub twin run`` (projector, command API, sweeper), the twin role's NKey."""
    env = e2e._clean_env() | e2e.bus_env(config) | {"TWINHUB_MONGO_URL": config.mongo.url}
    argv = [e2e._venv_bin("twinhub"), "--log-level", "WARNING", "twin", "run"]
    argv += ["--data-dir", str(data_dir)]
    if profile_to is not None:
        argv = [e2e._venv_bin("pyinstrument"), "-r", "text", "-o", str(profile_to), *argv]
    child = await e2e.Child.spawn("twin", argv, work / "twin.log", env=env)
    try:
        deadline = time.monotonic() + 60
        while b"command API on" not in (line := await child.readline(60)):
            if not line or time.monotonic() > deadline:
                raise child.failure("did not start")
        say(f"twin service pid {child.pid}")
        yield child
    finally:
        await child.stop(grace=60.0 if profile_to is not None else 20.0)


# -- measurements -------------------------------------------------------------------------------


@dataclass
class Sent:
    device: str
    power: int
    t_req: int
    t_acc: int | None = None
    t_out: int | None = None
    outcome: str = ""
    error: str = ""


class Outcomes:
    """One subscription to the owner's outcome events: correlation id → (time seen, kind)."""

    def __init__(self, client: Any, from_position: int) -> None:
        self.client = client
        self.from_position = from_position
        self.seen: dict[str, tuple[int, str]] = {}
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        from twinhub_client import OUTCOME_KINDS

        async with self.client.subscribe(
            OWNER, types=OUTCOME_KINDS, from_position=self.from_position, batch=256
        ) as events:
            async for event in events:
                if event.correlation_id is not None:
                    self.seen.setdefault(event.correlation_id, (time.time_ns(), event.kind))
                    self._changed.set()

    async def __aenter__(self) -> Outcomes:
        self._task = asyncio.create_task(self._run(), name="outcomes")
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        t0 = time.monotonic()
        done, _ = await asyncio.wait([self._task], timeout=10)
        if not done:
            say("outcomes: the subscription did not close within 10 s; left behind")
        elif time.monotonic() - t0 > 1:
            say(f"outcomes: closing the subscription took {time.monotonic() - t0:.1f} s")

    async def wait_for(self, cids: set[str], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not cids <= self.seen.keys():
            if self._task is not None and self._task.done():
                self._task.result()
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(left, 1.0))
        return True


def _ms(ns: Sequence[int]) -> dict[str, Any]:
    return benchutil.summarize_ms(ns)


async def send_one(
    client: Any, sent: dict[str, Sent], cid: str, device: str, power: int, ttl: float = 120
) -> None:
    s = Sent(device, power, time.time_ns())
    sent[cid] = s
    try:
        await client.update(device, HREF, {"power": power}, ttl=ttl, correlation_id=cid)
        s.t_acc = time.time_ns()
    except Exception as e:
        s.error = type(e).__name__


@dataclass
class Rig:
    args: argparse.Namespace
    work: Path
    client: Any
    store: Any
    meter: benchutil.CpuMeter
    gw: e2e.GatewayProc
    ca: Path
    token: str
    power: int = 1  # next unique power value


async def roundtrip_phase(rig: Rig) -> dict[str, Any]:
    from devicesim.config import device_id_for

    args = rig.args
    n = args.devices
    async with (
        sim_process(rig.work, rig.gw, rig.ca, rig.token, n, "rt") as sim,
        Outcomes(rig.client, await rig.store.last_position()) as outcomes,
    ):
        say(f"roundtrip: {n} devices signing in")
        sign_in_s = await wait_signed_in(sim, 300)
        devices = [device_id_for("rt", i) for i in range(n)]
        steps: list[dict[str, Any]] = []
        # warm-up: one command per device, so each has published its light and is in sync
        warm: dict[str, Sent] = {}
        await asyncio.gather(
            *(send_one(rig.client, warm, f"w-{d}", d, _next(rig)) for d in devices)
        )
        ok = await outcomes.wait_for({c for c, s in warm.items() if not s.error}, 120)
        say(f"roundtrip: warm-up {'done' if ok else 'incomplete'}")
        await settle(rig)
        meter = rig.meter
        for rate in args.rates:
            sent: dict[str, Sent] = {}
            say(f"roundtrip: {rate:g} commands/s for {args.duration:g} s")
            cpu0 = meter.sample()
            tasks: set[asyncio.Task[None]] = set()
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            k = 0
            while (now := loop.time()) - t0 < args.duration:
                due = int((now - t0) * rate) - k
                for _ in range(due):
                    cid = f"r{rate:g}-{k}"
                    t = asyncio.create_task(
                        send_one(rig.client, sent, cid, devices[k % n], _next(rig))
                    )
                    tasks.add(t)
                    t.add_done_callback(tasks.discard)
                    k += 1
                await asyncio.sleep(0.002)
            window = loop.time() - t0
            cpu_window = meter.usage(cpu0, meter.sample())
            if tasks:
                await asyncio.wait(tasks, timeout=60)
            accepted = {c for c, s in sent.items() if s.t_acc is not None}
            complete = await outcomes.wait_for(accepted, args.drain_timeout)
            for cid, (seen_ns, kind) in outcomes.seen.items():
                if cid in sent:
                    sent[cid].t_out, sent[cid].outcome = seen_ns, kind
            got = await receipts(sim)
            steps.append(_roundtrip_step(rate, window, sent, got, complete, cpu_window))
            say(f"  {json.dumps(steps[-1]['summary'])}")
            steps[-1]["settle_after_s"] = round(await settle(rig), 1)
    return {"devices": n, "sign_in_s": round(sign_in_s, 2), "steps": steps}


async def settle(rig: Rig, timeout: float = 900.0) -> float:
    """Wait until the API answers at once and the projector has written the whole log (an
    overloaded step leaves a queue of requests and a projection backlog behind it)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        t0 = time.monotonic()
        try:
            page = await rig.client.list_devices(limit=1)
        except Exception as e:
            say(f"settle: {type(e).__name__}: {e}")
            continue
        answered = time.monotonic() - t0
        head = await rig.store.last_position()
        if answered < 0.5 and page.position >= head:
            return time.monotonic() - started
        await asyncio.sleep(1.0)
    say(f"settle: not settled after {timeout:.0f} s")
    return time.monotonic() - started


def _next(rig: Rig) -> int:
    rig.power += 1
    return rig.power


def _roundtrip_step(
    rate: float,
    window: float,
    sent: dict[str, Sent],
    got: dict[int, int],
    complete: bool,
    cpu: dict[str, Any],
) -> dict[str, Any]:
    accepted = [s for s in sent.values() if s.t_acc is not None]
    in_window = [s for s in accepted if s.t_acc is not None]
    errors: dict[str, int] = {}
    for s in sent.values():
        if s.error:
            errors[s.error] = errors.get(s.error, 0) + 1
    outcomes: dict[str, int] = {}
    for s in accepted:
        outcomes[s.outcome or "none seen"] = outcomes.get(s.outcome or "none seen", 0) + 1
    acc = [s.t_acc - s.t_req for s in accepted if s.t_acc is not None]
    dev = [got[s.power] - s.t_req for s in accepted if s.power in got]
    out = [s.t_out - s.t_req for s in accepted if s.t_out is not None]
    last_out = max((s.t_out for s in accepted if s.t_out is not None), default=None)
    first_req = min((s.t_req for s in sent.values()), default=None)
    return {
        "offered_per_s": rate,
        "window_s": round(window, 2),
        "sent": len(sent),
        "accepted": len(accepted),
        "achieved_per_s": round(len(in_window) / window, 1),
        "completed_per_s": (
            round(len(out) / ((last_out - first_req) / 1e9), 1)
            if last_out is not None and first_req is not None
            else None
        ),
        "errors": errors,
        "outcomes": outcomes,
        "all_outcomes_seen": complete,
        "latency": {
            "request_to_accepted": _ms(acc),
            "request_to_device": _ms(dev),
            "request_to_outcome_seen": _ms(out),
        },
        "cpu_pct_of_one_core": cpu,
        "summary": {
            "rate": rate,
            "achieved": round(len(in_window) / window, 1),
            "outcome_p50_ms": _ms(out).get("p50_ms"),
            "outcome_p99_ms": _ms(out).get("p99_ms"),
            "errors": sum(errors.values()),
        },
    }


async def pending_phase(rig: Rig) -> dict[str, Any]:
    from devicesim.config import device_id_for
    from proto import subjects

    n = rig.args.pending
    device = device_id_for("off", 0)
    async with sim_process(rig.work, rig.gw, rig.ca, rig.token, 1, "off") as sim:
        await wait_signed_in(sim, 60)
        async with Outcomes(rig.client, await rig.store.last_position()) as outcomes:
            warm: dict[str, Sent] = {}
            await send_one(rig.client, warm, "off-warm", device, _next(rig))
            await outcomes.wait_for({"off-warm"}, 60)
    say(f"pending: device {device} offline; queueing {n} commands one after another")
    api_ns: list[int] = []
    sent: dict[str, Sent] = {}
    cpu0 = rig.meter.sample()
    t0 = time.monotonic()
    first_power = rig.power + 1
    for i in range(n):
        await send_one(rig.client, sent, f"p{i:05d}", device, _next(rig), ttl=PENDING_TTL)
        s = sent[f"p{i:05d}"]
        if s.t_acc is None:
            raise RuntimeError(f"command {i} refused: {s.error}")
        api_ns.append(s.t_acc - s.t_req)
        if (i + 1) % 100 == 0:
            say(f"  {i + 1} queued ({(time.monotonic() - t0):.1f} s)")
    queue_s = time.monotonic() - t0
    cpu_queue = rig.meter.usage(cpu0, rig.meter.sample())
    by_pending = {
        f"{lo}-{hi - 1}": _ms(api_ns[lo:hi])
        for lo, hi in ((0, 10), (95, 105), (n // 2 - 5, n // 2 + 5), (n - 10, n))
        if 0 <= lo < hi <= n
    }
    powers = set(range(first_power, first_power + n))
    start_pos = await rig.store.last_position()
    say("pending: starting the device")
    async with Outcomes(rig.client, start_pos) as outcomes:
        cpu0 = rig.meter.sample()
        t_start = time.time_ns()
        async with sim_process(rig.work, rig.gw, rig.ca, rig.token, 1, "off") as sim:
            deadline = time.monotonic() + rig.args.drain_timeout
            while (st := await sim.call({"cmd": "stats"}))["received"] < n:
                if time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.1)
            delivered = await receipts(sim)
            complete = await outcomes.wait_for(set(sent), max(1.0, deadline - time.monotonic()))
        cpu_deliver = rig.meter.usage(cpu0, rig.meter.sample())
    online_ns = None
    f = subjects.event_filter(owner=OWNER, device=device, kind="device-online")
    async for m in rig.store.read(f, after=start_pos):
        online_ns = online_ns or m.time_ns
    got = [delivered[p] for p in powers if p in delivered]
    seen = [outcomes.seen[c] for c in sent if c in outcomes.seen]
    last_dev = max(got, default=None)
    last_out = max((t for t, _ in seen), default=None)
    kinds: dict[str, int] = {}
    for _, k in seen:
        kinds[k] = kinds.get(k, 0) + 1
    order = [p for p, _ in sorted(delivered.items(), key=lambda x: x[1]) if p in powers]

    def secs(a: int | None, b: int | None) -> float | None:
        return None if a is None or b is None else round((b - a) / 1e9, 3)

    return {
        "commands": n,
        "queue_s": round(queue_s, 2),
        "api_request_ms_by_pending_before": by_pending,
        "cpu_while_queueing_pct_of_one_core": cpu_queue,
        "delivered_to_device": len(got),
        "delivered_in_issue_order": order == sorted(order),
        "outcomes_seen": kinds,
        "all_outcomes_seen": complete,
        "start_to_online_event_s": secs(t_start, online_ns),
        "start_to_last_delivered_s": secs(t_start, last_dev),
        "online_event_to_last_delivered_s": secs(online_ns, last_dev),
        "start_to_last_outcome_seen_s": secs(t_start, last_out),
        "online_event_to_last_outcome_seen_s": secs(online_ns, last_out),
        "cpu_while_delivering_pct_of_one_core": cpu_deliver,
        "last_stats": st,
    }


async def cost_phase(args: argparse.Namespace, mongo_url: str) -> dict[str, Any]:
    """One twin with N open commands: what a store round trip and the pure parts cost."""
    import bson
    from pymongo import AsyncMongoClient

    from proto import events as ev
    from twin.adapters.mongo import MongoTwinStore
    from twin.fold import fold, fold_all
    from twin.model import Twin

    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    reps = args.cost_reps
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongo_url, tz_aware=True)
    out: dict[str, Any] = {"reps": reps, "by_pending": {}}
    try:
        db = client["bench_cost"]
        store = MongoTwinStore(db)
        await store.ensure_indexes()
        # other twins in the collection, as in a deployment (FerretDB costs grow with them)
        for i in range(args.cost_twins):
            other = Twin(
                device_id=f"other-{i}",
                owner=OWNER,
                position=1,
                version=1,
                created_at=t0,
                updated_at=t0,
            )
            await store.write_many([other])
        for count in sorted({0, 100, args.pending}):
            device = f"cost-{count}"
            events: list[Any] = [
                ev.Event(
                    owner=OWNER,
                    device_id=device,
                    data=ev.DeviceRegistered(),
                    source="/bench",
                    position=1,
                    time=t0,
                )
            ]
            for i in range(count):
                data = ev.CommandPending(
                    href=HREF, op="update", content={"power": i}, expires_at=t0 + timedelta(1)
                )
                events.append(
                    ev.Event(
                        owner=OWNER,
                        device_id=device,
                        data=data,
                        source="/bench",
                        position=i + 2,
                        time=t0,
                        correlation_id=f"c{i:05d}",
                    )
                )
            twin = fold_all(None, events)
            assert twin is not None
            doc = twin.to_document()
            sent = ev.Event(
                owner=OWNER,
                device_id=device,
                data=ev.CommandSent(href=HREF, gateway="g", connection_id="c", attempt=1),
                source="/bench",
                position=count + 2,
                time=t0,
                correlation_id="c00000" if count else "none",
            )
            timings: dict[str, list[int]] = {
                "to_document": [],
                "from_document": [],
                "fold_one_event": [],
                "store_write": [],  # as the projector writes: previous = the twin it read
                "store_get": [],  # the twin with all its open commands
                "store_get_for_command": [],  # what a command request reads
            }
            await store.write_many([twin])
            stored = twin
            for _ in range(reps):
                a = time.perf_counter_ns()
                twin.to_document()
                b = time.perf_counter_ns()
                Twin.from_document(doc)
                c = time.perf_counter_ns()
                folded = fold(stored, dataclasses.replace(sent, position=stored.position + 1))
                d = time.perf_counter_ns()
                assert folded is not None
                await store.write_many([folded], previous={device: stored})
                stored = folded
                e = time.perf_counter_ns()
                await store.get(twin.device_id)
                f = time.perf_counter_ns()
                await store.get_for_command(twin.device_id, "c00000")
                g = time.perf_counter_ns()
                spans = (b - a, c - b, d - c, e - d, f - e, g - f)
                for key, ns in zip(timings, spans, strict=True):
                    timings[key].append(ns)
            out["by_pending"][str(count)] = {
                "document_bytes": len(bson.encode(doc)),
                **{k: round(statistics.median(v) / 1e6, 3) for k, v in timings.items()},
            }
            say(f"cost: {count} pending: {out['by_pending'][str(count)]}")
        out["unit"] = "ms, median"
        await client.drop_database("bench_cost")
    finally:
        await client.close()
    return out


# -- the run ----------------------------------------------------------------------------------


async def run_bench(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from twinhub_cli import services
    from twinhub_cli.datadir import DataDir
    from twinhub_cli.devservices import MongoServer, NatsServer
    from twinhub_client import TwinhubClient

    e2e.cancel_on_signals()
    nofile = benchutil.raise_nofile_limit()
    background = await benchutil.machine_busy_pct(2.0)
    result: dict[str, Any] = benchutil.result_header("command")
    async with contextlib.AsyncExitStack() as stack:
        nats = await stack.enter_async_context(NatsServer(work / "nats"))
        mongo = await stack.enter_async_context(MongoServer(work / "mongo"))
        assert nats.pid is not None and mongo.pid is not None
        for pid, name in ((nats.pid, "nats-server"), (mongo.pid, "mongo-server")):
            e2e._CHILDREN[pid] = name
            stack.callback(e2e._CHILDREN.pop, pid, None)
        result["machine"] = benchutil.machine(
            {
                "nats_server": benchutil.binary_version(nats.binary),
                "mongo_server": e2e._ferretdb_version(),
                "nofile_limit": list(nofile),
                "busy_pct_before_start": round(background, 1),
            }
        )
        result["code"] = e2e.code_info()
        result["settings"] = {
            "phases": args.phases,
            "devices": args.devices,
            "rates": args.rates,
            "duration_s": args.duration,
            "pending": args.pending,
            "transport": "coaps+tcp",
            "command": f"update {HREF} {{power: <unique>}}, ttl 120 s ({PENDING_TTL:g} s queued)",
            "twin_profiled": args.profile_twin is not None,
            "bus": "authenticated NATS: gateway and twin service by NKey, the client by its "
            "application token through the auth callout (in the benchmark process)",
        }
        data_dir = await e2e.twinhub_init(work)
        config = e2e.bench_config(nats, mongo.url)
        data = DataDir(data_dir)
        token = services.first_device_token(config, data, OWNER)  # the devices' sign-up token
        app_token = services.issuer_for(config, data).issue(
            OWNER, now=time.time(), ttl=APP_TOKEN_TTL
        )
        store = await stack.enter_async_context(services.event_store(config, data, "admin"))
        if "cost" in args.phases:
            result["cost"] = await cost_phase(args, mongo.url)
        if not {"roundtrip", "pending"} & set(args.phases):
            return result
        gw = await stack.enter_async_context(e2e.gateway_process(work, "gw-cmd", data_dir, config))
        twin = await stack.enter_async_context(
            twin_process(work, data_dir, config, args.profile_twin)
        )
        callout = await stack.enter_async_context(services.run_callout(config, data))
        client = await stack.enter_async_context(TwinhubClient(nats.url, app_token, timeout=30.0))
        meter = benchutil.CpuMeter(
            {
                "gateway": [gw.pid],
                "twin_service": [twin.pid],
                "nats": [nats.pid],
                "mongo": [mongo.pid],
                "bench_client": [os.getpid()],
            }
        )
        rig = Rig(args, work, client, store, meter, gw, data_dir / "pki" / "ca.crt", token)
        await settle(rig)
        if "roundtrip" in args.phases:
            result["roundtrip"] = await _phase(roundtrip_phase(rig))
        if "pending" in args.phases:
            result["pending"] = await _phase(pending_phase(rig))
        result["callout"] = dataclasses.asdict(callout.stats)
    return result


async def _phase(run: Any) -> dict[str, Any]:
    """A phase's result, or what failed (the other phases still run)."""
    try:
        result: dict[str, Any] = await run
        return result
    except Exception as e:
        traceback.print_exc()
        return {"failed": f"{type(e).__name__}: {e}"}


FULL: dict[str, Any] = {
    "devices": 100,
    "rates": [100.0, 1000.0],
    "duration": 10.0,
    "pending": 1000,
    "cost_reps": 20,
    "cost_twins": 100,
}
QUICK: dict[str, Any] = {
    "devices": 10,
    "rates": [20.0],
    "duration": 3.0,
    "pending": 20,
    "cost_reps": 3,
    "cost_twins": 10,
}


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="command_bench.py", description=__doc__.split("\n")[0])
    p.add_argument("--devices", type=int, help="online devices (roundtrip; 100)")
    p.add_argument(
        "--rates",
        type=lambda t: [float(x) for x in t.split(",") if x],
        help="offered commands/s, comma-separated (100,1000)",
    )
    p.add_argument("--duration", type=float, help="seconds per offered rate (10)")
    p.add_argument("--pending", type=int, help="commands queued (pending; 1000)")
    p.add_argument("--drain-timeout", type=float, default=600.0)
    p.add_argument("--cost-reps", type=int, help="repetitions of each cost (20)")
    p.add_argument("--cost-twins", type=int, help="other twins in the collection (100)")
    p.add_argument("--quick", action="store_true", help="smoke test: see QUICK")
    p.add_argument(
        "--phases",
        type=lambda t: [x for x in t.split(",") if x],
        default=["roundtrip", "pending", "cost"],
    )
    p.add_argument("--profile-twin", type=Path, help="run the twin service under pyinstrument")
    p.add_argument("--output", type=Path)
    p.add_argument("--keep-work-dir", action="store_true")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if not args.rates:
        p.error("--rates: at least one rate")
    unknown = set(args.phases) - {"roundtrip", "pending", "cost"}
    if unknown:
        p.error(f"unknown phases {sorted(unknown)}")
    return args


def parse_worker_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="command_bench.py sim-worker")
    p.add_argument("--gateway", required=True)
    p.add_argument("--ca", type=Path, required=True)
    p.add_argument("--token", required=True)
    p.add_argument("--devices", type=int, required=True)
    p.add_argument("--prefix", required=True)
    return p.parse_args(argv)


def _worker(argv: list[str]) -> Coroutine[Any, Any, int]:
    return sim_worker(parse_worker_args(argv))


def main() -> int:
    return e2e.run_main("twinhub-cmd-", parse_args, run_bench, say, _worker)


if __name__ == "__main__":
    sys.exit(main())

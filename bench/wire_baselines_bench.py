"""The gateway beside two (three) baselines, in one run: CPU per TLS notification and memory per
idle signed-in TLS device (issue 13, item 7).

    .venv/bin/python bench/wire_baselines_bench.py [--devices 300] [--rates 1000,2000]
        [--duration 10] [--warmup 3] [--targets gateway,aiocoap,lean,wire] [--quick]
        [--output FILE]

Everything runs on this machine, on loopback, in a temporary directory removed on exit:
``nats-server`` (JetStream, authenticated as users run it), a data dir made by ``twinhub init``
(its CA and server certificate serve every target), and for each target in turn a fresh server
process and the same simulated fleet (``e2e_bench.py sim-worker`` processes:
:func:`devicesim.fleet.run_fleet` at rate 0, one light per device, batch observe of
``/oic/res``; the benchmark steers the value changes round-robin at the offered total rate):

* ``gateway`` -- ``twinhub gateway`` as in ``e2e_bench.py`` (TLS listener only, the gateway
  role's NKey): sign-up with token check, sign-in, publish, sync, observe, one acknowledged
  JetStream append per notification;
* ``aiocoap`` -- the minimal aiocoap observer server of ``baseline_servers.py``: aiocoap's TLS
  server, 2.04 to the three POSTs, one observation per device (``Context.request``), a counter;
* ``lean`` -- the same behaviour on an ``asyncio.Protocol`` over uvloop's TLS with
  :mod:`gateway.adapters.coap_frames` (``Deframer``, ``encode_frame``) and nothing else;
* ``wire`` -- the same on :class:`gateway.wire.protocol.CoapTcpProtocol` (our RFC 8323
  connection), between the two.

Per target: the server's VmRSS idle, then with ``--devices`` signed-in, observed, idle devices
(``kb_per_idle_device``: the difference over the devices, once the gateway's log is quiet or
every baseline observation is established); then for each offered rate of ``--rates`` a warm-up
and a window of ``--duration`` s: the server's CPU (``/proc/<pid>/task/*/schedstat``, ns) over
the notifications it received in the window (``cpu_us_per_notification``; for the gateway the
events appended to the log, for a baseline its own counter), the same less the CPU the idle
fleet costs (``idle_cpu_pct_of_one_core``, read during the RSS samples: pings, timers), and for
lean and wire the notifications per ``data_received`` (one per read at these rates: each costs a
wake-up, a ``recv`` and a TLS record). ``ratios`` divide the gateway's figures by each
baseline's. ``others_pct_of_one_core`` is what the rest of the machine used meanwhile: check it
before trusting a number. Prints one JSON document on stdout (progress on stderr).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import benchutil
from e2e_bench import (
    _CHILDREN,
    GATEWAY_HOST,
    Child,
    GatewayProc,
    SimFleet,
    _clean_env,
    _rss_median,
    cancel_on_signals,
    code_info,
    gateway_process,
    run_main,
    sim_fleet,
    twinhub_init,
    wait_log_quiet,
    wait_quiet_machine,
)

SCRIPT = Path(__file__).resolve()
SERVERS = SCRIPT.parent / "baseline_servers.py"
OWNER = "bench"
BASELINES = ("aiocoap", "lean", "wire")
TARGETS = ("gateway", *BASELINES)
SUSTAINED = 0.97  # received >= this share of offered in the window


def say(text: str) -> None:
    sys.stderr.write(f"[baselines {time.strftime('%H:%M:%S')}] {text}\n")
    sys.stderr.flush()


# -- the servers ------------------------------------------------------------------------------


class Server:
    """A target under measurement: its process, its address, how many notifications it got."""

    def __init__(self, name: str, proc: GatewayProc) -> None:
        self.name = name
        self.proc = proc

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def received(self) -> int:
        raise NotImplementedError

    async def reads(self) -> int | None:
        """``data_received`` calls so far, where the server counts them."""
        return None

    async def settled(self, devices: int, timeout: float) -> dict[str, Any]:
        """Wait until the signed-in fleet is idle on the server (observed, nothing in flight)."""
        raise NotImplementedError


class GatewayServer(Server):
    def __init__(self, proc: GatewayProc, store: Any) -> None:
        super().__init__("gateway", proc)
        self.store = store

    async def received(self) -> int:
        # each notification is one event appended to the log (and acknowledged)
        end: int = await self.store.last_position()
        return end

    async def settled(self, devices: int, timeout: float) -> dict[str, Any]:
        end = await wait_log_quiet(self.store, stable=2.0, timeout=timeout)
        return {"log_end": end}


class BaselineServer(Server):
    def __init__(self, name: str, proc: GatewayProc) -> None:
        super().__init__(name, proc)
        self._lock = asyncio.Lock()
        self._reads: int | None = None  # as of the last received()

    async def stats(self, timeout: float = 30.0) -> dict[str, Any]:
        async with self._lock:
            child = self.proc.child
            stdin = child.proc.stdin
            assert stdin is not None
            stdin.write(b"stats\n")
            await stdin.drain()
            return await _read_json(child, timeout)

    async def received(self) -> int:
        st = await self.stats()
        self._reads = int(st.get("reads", 0)) if self.name != "aiocoap" else None
        return int(st["notifications"])

    async def reads(self) -> int | None:
        return self._reads

    async def settled(self, devices: int, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            st = await self.stats()
            if st["observing"] >= devices:
                return st
            if time.monotonic() > deadline:
                raise self.proc.child.failure(
                    f"only {st['observing']}/{devices} observations after {timeout:.0f} s"
                )
            await asyncio.sleep(0.2)


async def _read_json(child: Child, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise child.failure(f"no answer within {timeout:.0f} s")
        line = await child.readline(left)
        if not line:
            raise child.failure(f"exited (code {child.proc.returncode})")
        with contextlib.suppress(ValueError):
            msg = json.loads(line)
            if isinstance(msg, dict):
                return msg


@contextlib.asynccontextmanager
async def baseline_process(env: Env, kind: str) -> AsyncIterator[BaselineServer]:
    pki = env.data_dir / "pki"
    argv = [sys.executable, str(SERVERS), "--kind", kind, "--host", GATEWAY_HOST]
    argv += ["--cert", str(pki / "server.crt"), "--key", str(pki / "server.key")]
    child = await Child.spawn(
        f"baseline-{kind}", argv, env.work / f"baseline-{kind}.log", env=_clean_env(), stdin=True
    )
    try:
        msg = await _read_json(child, 60)
        if msg.get("type") != "ready":
            raise child.failure(f"unexpected first message {msg!r}")
        proc = GatewayProc(child, GATEWAY_HOST, int(msg["port"]))
        say(f"{kind} baseline pid {child.pid} listening on {proc.uri}")
        yield BaselineServer(kind, proc)
    finally:
        await child.stop(grace=10.0)


@contextlib.asynccontextmanager
async def server_process(env: Env, name: str) -> AsyncIterator[Server]:
    if name == "gateway":
        async with gateway_process(env.work, "gw-baselines", env.data_dir, env.config) as gw:
            yield GatewayServer(gw, env.store)
    else:
        async with baseline_process(env, name) as server:
            yield server


# -- measurement ------------------------------------------------------------------------------


def cpu_ns(pid: int) -> int:
    """CPU time a process's live threads have run, in ns (``/proc/<pid>/task/*/schedstat``):
    ``/proc/<pid>/stat`` counts in clock ticks (10 ms), too coarse for a baseline that spends
    ~10 us per notification in a window of a few seconds."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += int((task / "schedstat").read_text().split()[0])
    return total


@dataclass
class Env:
    args: argparse.Namespace
    work: Path
    data_dir: Path
    ca_file: Path
    token: str
    config: Any
    store: Any
    nats_pid: int


async def measure_rate(
    env: Env,
    server: Server,
    fleet: SimFleet,
    meter: benchutil.CpuMeter,
    rate: float,
    idle_pct: float,
) -> dict[str, Any]:
    args = env.args
    before = await wait_quiet_machine(meter, limit=args.max_others_pct, max_wait=args.quiet_wait)
    await fleet.set_rate(rate)
    await asyncio.sleep(args.warmup)
    a_fleet = await fleet.stats()
    # the server's CPU, then its count, at both ends: the same lag on both sides
    a_cpu, a_ns, a_mono = meter.sample(), cpu_ns(server.pid), time.monotonic()
    a_count, a_reads = await server.received(), await server.reads()
    await asyncio.sleep(args.duration)
    b_cpu, b_ns, b_mono = meter.sample(), cpu_ns(server.pid), time.monotonic()
    b_count, b_reads = await server.received(), await server.reads()
    b_fleet = await fleet.stats()
    el = b_mono - a_mono
    await fleet.set_rate(0)
    cpu = meter.usage(a_cpu, b_cpu)
    received = b_count - a_count
    sent = b_fleet.totals.get("notifications_sent", 0) - a_fleet.totals.get("notifications_sent", 0)
    us = round((b_ns - a_ns) / 1000 / received, 2) if received > 0 else None
    busy_ns = b_ns - a_ns - idle_pct * 1e7 * el  # less what the idle fleet costs
    us_above_idle = round(busy_ns / 1000 / received, 2) if received > 0 else None
    received_per_s = round(received / el, 1)
    sustained = received_per_s >= SUSTAINED * rate and sent / el >= SUSTAINED * rate
    if isinstance(server, GatewayServer):
        await wait_log_quiet(env.store, stable=1.0, timeout=30)
    step = {
        "offered_per_s": rate,
        "seconds": round(el, 2),
        "device_notifications_per_s": round(sent / el, 1),
        "received_per_s": received_per_s,
        "cpu_us_per_notification": us,
        "cpu_us_per_notification_above_idle": us_above_idle,
        "notifications_per_read": round(received / (b_reads - a_reads), 2)
        if a_reads is not None and b_reads is not None and b_reads > a_reads
        else None,
        "cpu_pct_of_one_core": cpu,
        "others_pct_before": before,
        "sustained": sustained,
        "sim_errors": b_fleet.totals.get("errors", 0) - a_fleet.totals.get("errors", 0),
    }
    say(
        f"  [{server.name}] {rate:g}/s: received {received_per_s:g}/s, {us} us CPU/notification "
        f"({'sustained' if sustained else 'NOT sustained'}), cpu {cpu}"
    )
    return step


async def run_target(env: Env, name: str) -> dict[str, Any]:
    args = env.args
    n = args.devices
    async with contextlib.AsyncExitStack() as stack:
        server = await stack.enter_async_context(server_process(env, name))
        await asyncio.sleep(args.settle)
        idle = await _rss_median(server.pid, 3, 0.5)
        say(f"[{name}] RSS idle {idle} MB; connecting {n} TLS devices")
        fleet = await stack.enter_async_context(
            sim_fleet(
                env.work,
                server.proc,
                ca_file=env.ca_file,
                token=env.token,
                devices=n,
                per_proc=args.devices_per_sim,
                prefix=f"{name[:3]}x",
                connect_concurrency=args.connect_concurrency,
            )
        )
        signed_in_s = await fleet.wait_signed_in(timeout=max(120.0, n / 10))
        await server.settled(n, timeout=max(120.0, n / 10))
        await asyncio.sleep(args.settle)
        idle_ns, idle_mono = cpu_ns(server.pid), time.monotonic()
        rss = await _rss_median(server.pid, 5, 1.0)
        idle_pct = (cpu_ns(server.pid) - idle_ns) / 1e7 / (time.monotonic() - idle_mono)
        hwm = benchutil.status_kb(server.pid, "VmHWM")
        st = await fleet.stats()
        memory = {
            "rss_idle_mb": idle,
            "rss_mb": rss,
            "hwm_mb": round(hwm / 1024, 1) if hwm else None,
            "kb_per_idle_device": round((rss - idle) * 1024 / n, 1),
            "signed_in": st.signed_in,
            "open_fds": len(os.listdir(f"/proc/{server.pid}/fd")),
            # pings, timers, the stats calls: the CPU the idle fleet costs
            "idle_cpu_pct_of_one_core": round(idle_pct, 2),
        }
        say(f"[{name}] RSS with {n} devices {rss} MB: {memory['kb_per_idle_device']} kB/device")
        meter = benchutil.CpuMeter(
            {"server": [server.pid], "sim": fleet.pids, "nats": [env.nats_pid]}
        )
        steps = [
            await measure_rate(env, server, fleet, meter, rate, idle_pct) for rate in args.rates
        ]
    return {
        "connect": {
            "devices": n,
            "all_signed_in_s": round(signed_in_s, 1),
            "sim_processes": len(fleet.procs),
        },
        "memory": memory,
        "ingest": steps,
    }


def summarize(targets: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per target the figures the issue asks for, and the gateway's over each baseline's."""
    cpu: dict[str, dict[str, float | None]] = {}
    kb: dict[str, float] = {}
    for name, t in targets.items():
        if "failed" in t:
            continue
        cpu[name] = {f"{s['offered_per_s']:g}": s["cpu_us_per_notification"] for s in t["ingest"]}
        kb[name] = t["memory"]["kb_per_idle_device"]
    ratios: dict[str, Any] = {}
    gw_cpu, gw_kb = cpu.get("gateway"), kb.get("gateway")
    for name in cpu:
        if name == "gateway" or gw_cpu is None or gw_kb is None:
            continue
        per_rate: dict[str, float | None] = {}
        for rate, x in gw_cpu.items():
            y = cpu[name].get(rate)
            per_rate[rate] = round(x / y, 2) if x and y else None
        ratios[f"gateway_over_{name}"] = {
            "cpu_per_notification": per_rate,
            "kb_per_idle_device": round(gw_kb / kb[name], 2) if kb[name] > 0 else None,
        }
    return {"cpu_us_per_notification": cpu, "kb_per_idle_device": kb, "ratios": ratios}


async def run_bench(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from twinhub_cli import services
    from twinhub_cli.datadir import DataDir
    from twinhub_cli.devservices import NatsServer

    cancel_on_signals()
    nofile = benchutil.raise_nofile_limit()
    background = await benchutil.machine_busy_pct(1.0)
    result: dict[str, Any] = {
        **benchutil.result_header("wire_baselines"),
        "quick": args.quick,
    }
    async with contextlib.AsyncExitStack() as stack:
        nats = await stack.enter_async_context(NatsServer(work / "nats"))
        assert nats.pid is not None
        stack.callback(_CHILDREN.pop, nats.pid, None)
        _CHILDREN[nats.pid] = "nats-server"
        result["machine"] = benchutil.machine(
            {
                "nats_server": benchutil.binary_version(nats.binary),
                "nofile_limit": list(nofile),
                "busy_pct_before_start": round(background, 1),
            }
        )
        result["code"] = code_info()
        data_dir = await twinhub_init(work)
        config = benchutil.nats_config(nats)
        data = DataDir(data_dir)
        token = services.first_device_token(config, data, OWNER)
        # the twin role provisions the streams, as `twinhub twin` does
        async with services.event_store(config, data, "twin"):
            pass
        store = await stack.enter_async_context(services.event_store(config, data, "admin"))
        env = Env(args, work, data_dir, data_dir / "pki" / "ca.crt", token, config, store, nats.pid)
        result["settings"] = {
            "devices": args.devices,
            "rates": args.rates,
            "warmup_s": args.warmup,
            "duration_s": args.duration,
            "targets": args.targets,
            "transport": "coaps+tcp (TLS, server certificate from `twinhub init`), uvloop",
            "device_mode": "batch observe of /oic/res, one light per device",
            "devices_per_sim_process": args.devices_per_sim,
            "connect_concurrency_per_sim_process": args.connect_concurrency,
            "gateway_count": "events appended to the log (acknowledged by JetStream)",
            "baseline_count": "notifications the server counted",
            "sustained": f"received and sent >= {SUSTAINED:.0%} of offered",
        }
        targets: dict[str, dict[str, Any]] = {}
        for name in args.targets:
            say(f"target {name}")
            try:
                targets[name] = await run_target(env, name)
            except (RuntimeError, TimeoutError, OSError) as e:
                say(f"[{name}] failed: {e}")
                targets[name] = {"failed": f"{type(e).__name__}: {e}"}
        result["targets"] = targets
        result["summary"] = summarize(targets)
        say(f"summary: {json.dumps(result['summary'])}")
        failed = [name for name, t in targets.items() if "failed" in t]
        if failed:
            result["failures"] = {"failed": failed}  # run_main: exit code 1
    return result


# -- command line -------------------------------------------------------------------------------

FULL: dict[str, Any] = {
    "devices": 300,
    "rates": [1000.0, 2000.0],
    "duration": 10.0,
    "warmup": 3.0,
    "settle": 3.0,
    "quiet_wait": 30.0,
}
QUICK: dict[str, Any] = {
    "devices": 10,
    "rates": [50.0],
    "duration": 2.0,
    "warmup": 1.0,
    "settle": 0.5,
    "quiet_wait": 0.0,
}


def _targets(text: str) -> list[str]:
    out = [x.strip() for x in text.split(",") if x.strip()]
    for x in out:
        if x not in TARGETS:
            raise argparse.ArgumentTypeError(f"unknown target {x!r} (known: {', '.join(TARGETS)})")
    return [t for t in TARGETS if t in out]  # the gateway first, the baselines in their order


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--devices", type=int, help="TLS devices per target (300)")
    p.add_argument(
        "--rates",
        type=lambda s: [float(x) for x in s.split(",") if x.strip()],
        help="offered total notifications/s, comma-separated (1000,2000)",
    )
    p.add_argument("--duration", type=float, help="measured seconds per rate and target (10)")
    p.add_argument("--warmup", type=float, help="seconds at each rate before measuring (3)")
    p.add_argument("--settle", type=float, help="seconds before RSS readings (3)")
    p.add_argument(
        "--targets",
        type=_targets,
        default=list(TARGETS),
        help=f"servers to measure, comma-separated ({','.join(TARGETS)}); ratios need gateway",
    )
    p.add_argument("--quick", action="store_true", help="smoke test: 10 devices, 2 s windows")
    p.add_argument(
        "--devices-per-sim", type=int, default=2500, help="devices per simulator process (2500)"
    )
    p.add_argument(
        "--connect-concurrency",
        type=int,
        default=64,
        help="devices connecting at once, per simulator process (64)",
    )
    p.add_argument(
        "--max-others-pct",
        type=float,
        default=30.0,
        help="CPU (%% of one core) other processes may use before a window (30)",
    )
    p.add_argument(
        "--quiet-wait",
        type=float,
        help="seconds to wait before a window for other processes to calm down (30)",
    )
    p.add_argument("--output", type=Path, metavar="FILE", help="also write the JSON to FILE")
    p.add_argument("--keep-work-dir", action="store_true", help="keep the temp dir (logs)")
    args = p.parse_args(argv)
    base = QUICK if args.quick else FULL
    for key, value in base.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.devices < 1 or args.duration <= 0 or args.warmup < 0:
        p.error("--devices must be >= 1, --duration > 0, --warmup >= 0")
    if not args.rates or any(r <= 0 or math.isnan(r) for r in args.rates):
        p.error("rates must be > 0")
    return args


def main() -> int:
    return run_main("twinhub-baselines-", parse_args, run_bench, say)


if __name__ == "__main__":
    sys.exit(main())

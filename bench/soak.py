"""Soak: the whole system under steady load for a long time; do processes grow? (issue 11)

    .venv/bin/python bench/soak.py [--devices 1000] [--rate 1] [--seconds 3600]
        [--warmup 600] [--sample-every 30] [--quick] [--output FILE] [--keep-work-dir]

Everything runs as users run it, each in a process of its own, on loopback, in a temporary
directory removed on exit: ``nats-server`` (authenticated) and the MongoDB-wire server
(FerretDB) from :mod:`twinhub_cli.devservices`, ``twinhub gateway`` (TLS), ``twinhub twin run``
(projector, command API, sweeper, gateway reaper), ``twinhub callout`` (the auth callout) and
an application, ``twinhub watch --device D`` (one device's live events, through the callout
with an application token), the simulated devices in ``sim-worker`` processes (the load,
:mod:`e2e_bench`'s, which keep no record of what they send).

``--devices`` devices sign in, then change one light each at ``--rate`` changes/s (the fleet
offers ``devices * rate`` events/s) for ``--seconds``. Every ``--sample-every`` seconds it
samples each process: resident memory (``VmRSS``), open files (``/proc/<pid>/fd``), CPU time;
and the log's last position. The figures after warm-up (``--warmup`` seconds) are the point:

* ``growth_pct``: median of the last three samples over the median of the first three after
  warm-up, minus one, in percent; the goal (issue 11 item 8) is under 5 % for every process of
  the product (``load`` processes are reported beside them).
* ``slope_per_h``: least-squares slope over the samples after warm-up, per hour, as a percent of
  the first value (growth that a short run's noise might hide).

Also: the log rate over the run (offered vs logged events/s) and the watch's count of events
against the log's for its device (a long-lived subscription must miss nothing).
``--quick`` (CI, ``tests/test_benches.py``): 20 devices, 20 s, 5 s warm-up, a sample every 2 s;
it checks that the run works and the figures are there, not the 5 % goal.

Prints one JSON document; exits 1 when the run failed (``soak.failed``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import benchutil
import e2e_bench as e2e
import faults

OWNER = "soak"
GATEWAY_ID = "gw-soak"
APP_TOKEN_TTL = 6 * 3600
PRODUCT = ("nats-server", "mongo-server", "gateway", "twin", "callout", "watch")

DEFAULTS: dict[str, Any] = {
    "devices": 1000,
    "rate": 1.0,
    "seconds": 3600.0,
    "warmup": 600.0,
    "sample_every": 30.0,
}
QUICK: dict[str, Any] = {
    "devices": 20,
    "rate": 1.0,
    "seconds": 20.0,
    "warmup": 5.0,
    "sample_every": 2.0,
}


def say(text: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def open_files(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def sample(pids: dict[str, int]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name, pid in pids.items():
        cpu = benchutil.cpu_seconds(pid)
        out[name] = {
            "rss_kb": benchutil.status_kb(pid),
            "open_files": open_files(pid),
            "cpu_s": None if cpu is None else round(cpu, 2),
        }
    return out


def growth(values: Sequence[float]) -> dict[str, Any]:
    """First vs last (medians of three) and the least-squares slope per sample, as percents."""
    if len(values) < 2:
        return {"first": None, "last": None, "growth_pct": None, "slope_pct_per_sample": None}
    head = statistics.median(values[:3])
    tail = statistics.median(values[-3:])
    n = len(values)
    mean_x = (n - 1) / 2
    mean_y = statistics.fmean(values)
    var = sum((i - mean_x) ** 2 for i in range(n))
    slope = sum((i - mean_x) * (v - mean_y) for i, v in enumerate(values)) / var
    return {
        "first": head,
        "last": tail,
        "growth_pct": None if head == 0 else round(100 * (tail - head) / head, 2),
        "slope_pct_per_sample": None if head == 0 else 100 * slope / head,
    }


def summarize(
    samples: list[dict[str, Any]], warmup: float, every: float, names: Sequence[str]
) -> dict[str, Any]:
    after = [s for s in samples if s["t_s"] >= warmup]
    out: dict[str, Any] = {}
    for name in names:
        proc: dict[str, Any] = {}
        for metric in ("rss_kb", "open_files"):
            values = [s["procs"][name][metric] for s in after if name in s["procs"]]
            values = [v for v in values if v is not None]
            g = growth(values)
            slope = g.pop("slope_pct_per_sample")
            g["slope_pct_per_h"] = None if slope is None else round(slope * 3600 / every, 2)
            g["samples"] = len(values)
            proc[metric] = g
        out[name] = proc
    return out


class WatchCount:
    """Reads ``twinhub watch``'s stdout (a CloudEvent JSON line per event) and counts them."""

    def __init__(self, child: e2e.Child) -> None:
        self.child = child
        self.lines = 0
        self.bad = 0
        self.last_position = 0
        self.out_of_order = 0
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        stdout = self.child.proc.stdout
        assert stdout is not None
        while line := await stdout.readline():
            try:
                event = json.loads(line)
            except ValueError:
                self.bad += 1
                continue
            self.lines += 1
            position = int(event.get("sequence") or 0)  # the log position (proto.binding)
            if position:
                if position <= self.last_position:
                    self.out_of_order += 1
                self.last_position = position

    async def stop(self) -> None:
        await self.child.stop()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(self._task, 10)


@contextlib.asynccontextmanager
async def callout_process(work: Path, data_dir: Path, config: Any) -> AsyncIterator[e2e.Child]:
    """``twinhub callout`` as the callout role; ready when it logs that it serves."""
    env = e2e._clean_env() | e2e.bus_env(config)
    argv = [e2e._venv_bin("twinhub"), "--log-level", "INFO", "callout"]
    argv += ["--data-dir", str(data_dir)]
    log_path = work / "callout.log"
    child = await e2e.Child.spawn("callout", argv, log_path, env=env)
    try:
        deadline = time.monotonic() + 60
        while b"auth callout serving" not in log_path.read_bytes():
            if child.proc.returncode is not None or time.monotonic() > deadline:
                raise child.failure("did not start")
            await asyncio.sleep(0.1)
        yield child
    finally:
        await child.stop()


async def device_events(store: Any, owner: str, device: str) -> int:
    from proto import subjects

    n = 0
    async for _ in store.read(subjects.event_filter(owner, device)):
        n += 1
    return n


async def run_soak(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from twinhub_cli import services
    from twinhub_cli.datadir import DataDir
    from twinhub_cli.devservices import MongoServer, NatsServer

    e2e.cancel_on_signals()
    nofile = benchutil.raise_nofile_limit()
    result: dict[str, Any] = {
        "benchmark": "soak",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    async with contextlib.AsyncExitStack() as stack:
        nats = await stack.enter_async_context(NatsServer(work / "nats"))
        mongo = await stack.enter_async_context(MongoServer(work / "mongo"))
        assert nats.pid is not None and mongo.pid is not None
        result["machine"] = benchutil.machine(
            {
                "nats_server": benchutil.binary_version(nats.binary),
                "mongo_server": e2e._ferretdb_version(),
                "nofile_limit": list(nofile),
            }
        )
        result["code"] = e2e.code_info()
        result["settings"] = {
            "devices": args.devices,
            "changes_per_s_per_device": args.rate,
            "offered_events_per_s": args.devices * args.rate,
            "seconds": args.seconds,
            "warmup_s": args.warmup,
            "sample_every_s": args.sample_every,
            "transport": "coaps+tcp (TLS), batch observe of /oic/res, one light per device",
            "bus": "authenticated NATS: services by NKey, the watch by application token "
            "through the callout process",
        }
        data_dir = await e2e.twinhub_init(work)
        config = e2e.bench_config(nats, mongo.url)
        data = DataDir(data_dir)
        token = services.first_device_token(config, data, OWNER)
        app_token = services.issuer_for(config, data).issue(
            OWNER, now=time.time(), ttl=APP_TOKEN_TTL
        )
        store = await stack.enter_async_context(services.event_store(config, data, "admin"))
        twin = await stack.enter_async_context(faults.twin_process(work, data_dir, config, {}))
        callout = await stack.enter_async_context(callout_process(work, data_dir, config))
        gw = await stack.enter_async_context(
            e2e.gateway_process(work, GATEWAY_ID, data_dir, config)
        )
        say(f"connecting {args.devices} TLS devices")
        fleet = await stack.enter_async_context(
            e2e.sim_fleet(
                work,
                gw,
                ca_file=data_dir / "pki" / "ca.crt",
                token=token,
                devices=args.devices,
                per_proc=args.devices_per_sim,
                prefix="soak",
                connect_concurrency=64,
            )
        )
        signed_in_s = await fleet.wait_signed_in(timeout=max(120.0, args.devices / 10))
        say(f"all {args.devices} signed in after {signed_in_s:.1f} s")
        await e2e.wait_log_quiet(store, stable=2.0, timeout=120)
        watched = await first_device(store, OWNER)
        watch_env = e2e._clean_env() | {"TWINHUB_NATS_URL": config.nats.url}
        watch_child = await e2e.Child.spawn(
            "watch",
            [e2e._venv_bin("twinhub"), "watch", "--token", app_token, "--device", watched],
            work / "watch.log",
            env=watch_env,
        )
        watch = WatchCount(watch_child)
        stack.push_async_callback(watch.stop)
        await asyncio.sleep(2.0)  # the watch subscribes (from now on) before the load starts
        watch_from = await store.last_position()
        before_watch = await device_events(store, OWNER, watched)

        pids = {
            "nats-server": nats.pid,
            "mongo-server": mongo.pid,
            "gateway": gw.pid,
            "twin": twin.pid,
            "callout": callout.pid,
            "watch": watch_child.pid,
        } | {f"load:{p.child.name}": p.pid for p in fleet.procs}
        pids["load:bench"] = os.getpid()
        samples: list[dict[str, Any]] = []
        start_position = await store.last_position()
        await fleet.set_rate(args.devices * args.rate)
        t0 = time.monotonic()
        say(f"load on: {args.devices * args.rate:g} events/s for {args.seconds:g} s")
        next_at = t0
        while True:
            now = time.monotonic()
            if now - t0 > args.seconds:
                break
            position = await store.last_position()
            samples.append(
                {"t_s": round(now - t0, 1), "log_position": position, "procs": sample(pids)}
            )
            last = samples[-1]["procs"]
            if len(samples) % max(1, int(300 / args.sample_every)) == 1:
                say(
                    f"t={now - t0:.0f}s position {position} "
                    + " ".join(
                        f"{n}={(v['rss_kb'] or 0) / 1024:.0f}MB/{v['open_files']}"
                        for n, v in last.items()
                        if not n.startswith("load:sim")
                    )
                )
            next_at += args.sample_every
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        elapsed = time.monotonic() - t0
        await fleet.set_rate(0)
        end_position = await store.last_position()
        stats = await fleet.stats()
        await e2e.wait_log_quiet(store, stable=3.0, timeout=120)
        logged_for_watched = await device_events(store, OWNER, watched) - before_watch
        async with asyncio.timeout(60):
            while watch.lines < logged_for_watched:
                await asyncio.sleep(0.2)
        await asyncio.sleep(1.0)

        names = [n for n in pids if not n.startswith("load:sim")] + [
            n for n in pids if n.startswith("load:sim")
        ]
        summary = summarize(samples, args.warmup, args.sample_every, names)
        logged = end_position - start_position
        product_growth = {
            n: {m: summary[n][m]["growth_pct"] for m in ("rss_kb", "open_files")} for n in PRODUCT
        }
        worst_rss = max((abs(v["rss_kb"] or 0) for v in product_growth.values()), default=0)
        worst_fds = max((abs(v["open_files"] or 0) for v in product_growth.values()), default=0)
        result["soak"] = {
            "elapsed_s": round(elapsed, 1),
            "signed_in_s": round(signed_in_s, 1),
            "offered_events_per_s": args.devices * args.rate,
            "logged_events_per_s": round(logged / elapsed, 1),
            "device_errors": stats.totals.get("errors", 0),
            "watch": {
                "device": watched,
                "from_position": watch_from,
                "printed": watch.lines,
                "logged": logged_for_watched,
                "unreadable_lines": watch.bad,
                "out_of_order": watch.out_of_order,
            },
            "growth_after_warmup": summary,
            "product_growth_pct": product_growth,
            "worst_product_rss_growth_pct": worst_rss,
            "worst_product_open_files_growth_pct": worst_fds,
            "goal": "growth under 5 % after warm-up for every product process",
            "goal_met": worst_rss < 5 and worst_fds < 5,
        }
        problems = []
        if watch.lines != logged_for_watched or watch.out_of_order or watch.bad:
            problems.append("the watch did not print exactly its device's events in order")
        if logged < 0.5 * args.devices * args.rate * elapsed:  # the rate is reported; a
            # machine busy with other work may slow the simulators, but not to half
            problems.append("the log took less than half of the offered events")
        if len(samples) < 4:
            problems.append("too few samples")
        if problems:
            result["soak"]["failed"] = problems
        result["samples"] = samples
    return result


async def first_device(store: Any, owner: str) -> str:
    """A device of the fleet (the first that registered)."""
    from proto import binding, subjects

    async for message in store.read(subjects.event_filter(owner, kind="device-registered")):
        return binding.from_stored(message).device_id
    raise RuntimeError("no device registered")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--devices", type=int, help="simulated devices (1000)")
    p.add_argument("--rate", type=float, help="changes per second per device (1)")
    p.add_argument("--seconds", type=float, help="seconds under load (3600)")
    p.add_argument("--warmup", type=float, help="seconds before growth counts (600)")
    p.add_argument("--sample-every", type=float, help="seconds between samples (30)")
    p.add_argument("--devices-per-sim", type=int, default=500)
    p.add_argument("--quick", action="store_true", help="CI: see QUICK")
    p.add_argument("--output", type=Path, metavar="FILE", help="also write the JSON to FILE")
    p.add_argument("--keep-work-dir", action="store_true", help="keep the temp dir (logs)")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main() -> int:
    return e2e.run_main("twinhub-soak-", parse_args, run_soak, log=say)


if __name__ == "__main__":
    sys.exit(main())

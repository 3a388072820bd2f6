"""End-to-end benchmark: simulated devices → gateway → JetStream → twin projector → MongoDB.

    .venv/bin/python bench/e2e_bench.py [--devices 1000] [--rates 500,1000,2000,4000]
        [--duration 20] [--warmup 5] [--rss-devices 0,1000,5000] [--phases e2e,ingest,rss]
        [--quick] [--profile-gateway FILE] [--output FILE]

Everything runs on this machine, on loopback, in a temporary directory removed on exit:

* ``nats-server`` (JetStream) and the MongoDB-wire server (FerretDB), from
  :mod:`twinhub_cli.devservices`; NATS authenticated as users run it (services by NKey, the
  credentials in the server's ``bus/`` directory);
* the gateway as its own process: ``twinhub gateway`` configured through ``TWINHUB_*``
  variables (NATS URL and ``TWINHUB_NATS_CREDENTIALS``: it connects with the gateway role's
  NKey; TLS listener only, the server certificate of a data dir made with ``twinhub init``);
* the simulator as its own process(es): this script in ``sim-worker`` mode, which runs
  :func:`devicesim.fleet.run_fleet` with ``rate=0`` (devices sign up, sign in, publish and are
  observed over ``coaps+tcp``) and drives the value changes itself, so the offered rate can be
  stepped without reconnecting the fleet: a 10 ms ticker calls ``SimDevice.change()`` round-robin
  over the signed-in devices at the total rate asked for. ``change()`` is what a device's own
  change loop does: it stamps ``ts`` (epoch ns) and notifies;
* the twin projector in this process (:class:`twin.service.TwinProjector`, Mongo twin store),
  connected as the twin service's role; the benchmark's own reads of the log use the admin role.

The throughput phases connect ``--devices`` TLS devices (one light each) once, then step the
offered total rate: warm-up, a measured window of ``--duration`` seconds, rate 0, drain.

* ``e2e``: with the projector running (``--e2e-rates``, by default 10,...,200 and ``--rates``;
  the sweep ends at the first rate the twin leg does not sustain, as every later step would
  start behind). Per window: device changes and notifications/s, events appended/s (stream
  sequence), twin events written/s (projector stats), the backlog (log end minus projector
  position), latency percentiles, CPU of every process.
* ``ingest``: the projector stopped, the same numbers for device → gateway → JetStream only
  (``--rates``), so the gateway's own ceiling is not hidden behind the twin store's.

Latency. In ``e2e`` the projector's ``ProjectorHooks.after_write`` stamps ``time.time_ns()`` on
every log position of a batch once its twins and checkpoint are written; after the window the
events at the positions written in it are read back from the log for the device's ``ts`` (in the
content) and JetStream's receive time (``StoredMessage.time_ns``): ``device_to_twin`` = twin
written minus device change, split at the log into ``device_to_log`` and ``log_to_twin``. In
``ingest`` the window's appended events are read back the same way (``device_to_log``). All
clocks are this host's wall clock (the simulator's ``EpochClock`` is wall-clock based).

``rss``: for each ``--rss-devices`` N a fresh gateway process; its VmRSS idle, then with N
signed-in, observed, idle (rate 0) TLS devices once the log is quiet.

CPU is read from ``/proc/<pid>/stat`` in % of one core; ``others_pct_of_one_core`` is what the
rest of the machine used meanwhile (other users' processes): check it before trusting a number.
Prints one JSON document on stdout (progress on stderr).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import itertools
import json
import math
import os
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import benchutil
import msgspec

from eventstore.ports import (
    ALL_EVENTS,
    EventStore,
)
from proto.events import ResourceChanged
from proto.message import NatsMessage

SCRIPT = Path(__file__).resolve()
REPO = SCRIPT.parent.parent
OWNER = "bench"
GATEWAY_HOST = "127.0.0.1"

# -- progress & child processes --------------------------------------------------------------------


def say(text: str) -> None:
    sys.stderr.write(f"[e2e {time.strftime('%H:%M:%S')}] {text}\n")
    sys.stderr.flush()


# Every process this benchmark started and has not reaped yet: pid -> name. The last line of
# defence (SIGKILL) when the orderly teardown did not run to its end.
_CHILDREN: dict[int, str] = {}


def _kill_leftovers() -> None:
    for pid, name in list(_CHILDREN.items()):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
            say(f"killed leftover {name} (pid {pid})")
        _CHILDREN.pop(pid, None)


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it when the benchmark process dies (PR_SET_PDEATHSIG)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)


def _log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class Child:
    """A process we started: stdout piped to us, stderr to a log file."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process, log_path: Path) -> None:
        self.name = name
        self.proc = proc
        self.log_path = log_path

    @property
    def pid(self) -> int:
        return self.proc.pid

    @classmethod
    async def spawn(
        cls,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        *,
        env: dict[str, str] | None = None,
        stdin: bool = False,
    ) -> Child:
        with log_path.open("ab") as log_file:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE if stdin else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=log_file,
                env=env,
                start_new_session=True,  # Ctrl-C reaches only us; we stop children in order
                preexec_fn=_die_with_parent,
                limit=2**20,
            )
        _CHILDREN[proc.pid] = name
        return cls(name, proc, log_path)

    async def stop(self, grace: float = 20.0) -> None:
        """SIGTERM, wait up to ``grace`` s, then SIGKILL."""
        proc = self.proc
        try:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(proc.wait(), grace)
                except TimeoutError:
                    say(f"{self.name} ignored SIGTERM for {grace:.0f}s: killing")
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    await proc.wait()
        finally:
            _CHILDREN.pop(proc.pid, None)

    async def readline(self, timeout: float) -> bytes:
        assert self.proc.stdout is not None
        return await asyncio.wait_for(self.proc.stdout.readline(), timeout)

    def failure(self, what: str) -> RuntimeError:
        return RuntimeError(
            f"{self.name} (pid {self.pid}) {what}; log {self.log_path}:\n{_log_tail(self.log_path)}"
        )


def _venv_bin(name: str) -> str:
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} not found next to {sys.executable} nor on PATH")
    return found


def _clean_env() -> dict[str, str]:
    """Our environment without TWINHUB_* (children get exactly the configuration we give)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("TWINHUB_")}


def bus_env(config: Any) -> dict[str, str]:
    """How a child service reaches the authenticated bus (``TWINHUB_NATS_*``): the URL and the
    directory of the bus credentials (``<role>.nk``; it reads only its own role's seed)."""
    env = {"TWINHUB_NATS_URL": config.nats.url}
    if config.nats.credentials:
        env["TWINHUB_NATS_CREDENTIALS"] = config.nats.credentials
    if config.nats.ca_file:
        env["TWINHUB_NATS_CA_FILE"] = config.nats.ca_file
    return env


# -- the gateway process ---------------------------------------------------------------------


@dataclass
class GatewayProc:
    child: Child
    host: str
    port: int

    @property
    def pid(self) -> int:
        return self.child.pid

    @property
    def uri(self) -> str:
        return f"coaps+tcp://{self.host}:{self.port}"


_TLS_LINE = re.compile(r"tls=\('([^']+)', (\d+)\)")


@contextlib.asynccontextmanager
async def gateway_process(
    work: Path,
    name: str,
    data_dir: Path,
    config: Any,
    *,
    profile_to: Path | None = None,
    port: int = 0,
    extra_env: dict[str, str] | None = None,
) -> AsyncIterator[GatewayProc]:
    """``twinhub gateway`` on TLS port ``port`` (0: a free one; TCP listener off), stopped with
    SIGTERM; it connects to NATS as ``config`` says (:func:`bus_env`: the gateway role's NKey).
    ``extra_env``: more ``TWINHUB_*`` settings."""
    pki = data_dir / "pki"
    env = (
        _clean_env()
        | bus_env(config)
        | {
            "TWINHUB_GATEWAY_ID": name,
            "TWINHUB_GATEWAY_TCP": "",
            "TWINHUB_GATEWAY_TLS": f"{GATEWAY_HOST}:{port}",
            "TWINHUB_GATEWAY_UDP": "",  # no simple devices here
            "TWINHUB_GATEWAY_DTLS": "",
            "TWINHUB_GATEWAY_TLS_CERT": str(pki / "server.crt"),
            "TWINHUB_GATEWAY_TLS_KEY": str(pki / "server.key"),
            # every simulated device connects from 127.0.0.1: no per-address connection limit
            "TWINHUB_GATEWAY_MAX_CONNECTIONS_PER_IP": "0",
        }
        | (extra_env or {})
    )
    argv = [_venv_bin("twinhub"), "--log-level", "WARNING", "gateway", "--data-dir", str(data_dir)]
    if profile_to is not None:
        argv = [_venv_bin("pyinstrument"), "-r", "text", "-o", str(profile_to), *argv]
    child = await Child.spawn(name, argv, work / f"{name}.log", env=env)
    try:
        deadline = time.monotonic() + 60
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise child.failure("printed no listening line in 60 s")
            line = (await child.readline(left)).decode(errors="replace")
            if not line:
                await child.proc.wait()
                raise child.failure(f"exited with code {child.proc.returncode} during start")
            m = _TLS_LINE.search(line)
            if m:
                break
        gw = GatewayProc(child, m.group(1), int(m.group(2)))
        say(f"{name} pid {gw.pid} listening on {gw.uri}")
        yield gw
    finally:
        await child.stop(grace=60.0 if profile_to is not None else 20.0)


# -- simulator processes -------------------------------------------------------------------


class SimProc:
    """One ``sim-worker`` process: JSON lines in on stdin, JSON lines out on stdout."""

    def __init__(self, child: Child, devices: int) -> None:
        self.child = child
        self.devices = devices
        self._lock = asyncio.Lock()

    @property
    def pid(self) -> int:
        return self.child.pid

    async def _read(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise self.child.failure(f"no answer within {timeout:.0f} s")
            line = await self.child.readline(left)
            if not line:
                raise self.child.failure(f"exited (code {self.child.proc.returncode})")
            try:
                msg = json.loads(line)
            except ValueError:
                continue  # not ours (a library printing to stdout)
            if isinstance(msg, dict):
                return msg

    async def wait_ready(self, timeout: float) -> None:
        msg = await self._read(timeout)
        if msg.get("type") != "ready":
            raise self.child.failure(f"unexpected first message {msg!r}")

    async def call(self, cmd: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
        async with self._lock:
            stdin = self.child.proc.stdin
            assert stdin is not None
            stdin.write((json.dumps(cmd) + "\n").encode())
            await stdin.drain()
            return await self._read(timeout)

    async def stop(self, timeout: float = 90.0) -> dict[str, Any] | None:
        """Ask the fleet to sign out and exit; returns its summary (None if it had to be killed)."""
        summary: dict[str, Any] | None = None
        try:
            if self.child.proc.returncode is None:
                summary = await self.call({"cmd": "stop"}, timeout)
                await asyncio.wait_for(self.child.proc.wait(), 10)
        except (RuntimeError, TimeoutError, OSError) as e:
            say(f"{self.child.name}: no orderly stop ({type(e).__name__}), terminating")
        finally:
            await self.child.stop(grace=10.0)
        return summary


@dataclass
class FleetStats:
    devices: int
    connected: int
    signed_in: int
    totals: dict[str, int]
    driver: dict[str, int]
    lag_p99_ms: float
    lag_max_ms: float
    error_kinds: dict[str, int]


class SimFleet:
    """The simulator processes of one phase, seen as one fleet."""

    def __init__(self, procs: list[SimProc]) -> None:
        self.procs = procs

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    @property
    def devices(self) -> int:
        return sum(p.devices for p in self.procs)

    async def stats(self) -> FleetStats:
        replies = await asyncio.gather(*(p.call({"cmd": "stats"}) for p in self.procs))
        totals: dict[str, int] = {}
        driver: dict[str, int] = {}
        kinds: dict[str, int] = {}
        for r in replies:
            for k, v in r["totals"].items():
                totals[k] = totals.get(k, 0) + v
            for k, v in r["driver"].items():
                driver[k] = driver.get(k, 0) + v
            for k, v in r["error_kinds"].items():
                kinds[k] = kinds.get(k, 0) + v
        return FleetStats(
            devices=sum(r["devices"] for r in replies),
            connected=sum(r["connected"] for r in replies),
            signed_in=sum(r["signed_in"] for r in replies),
            totals=totals,
            driver=driver,
            lag_p99_ms=max(r["lag_ms"]["p99"] for r in replies),
            lag_max_ms=max(r["lag_ms"]["max"] for r in replies),
            error_kinds=kinds,
        )

    async def set_rate(self, total: float) -> None:
        """Spread ``total`` changes/s over the processes in proportion to their devices."""
        n = max(self.devices, 1)
        await asyncio.gather(
            *(p.call({"cmd": "rate", "rate": total * p.devices / n}) for p in self.procs)
        )

    async def wait_signed_in(self, timeout: float) -> float:
        """Poll until every device is signed in; returns the seconds it took."""
        started = time.monotonic()
        last_report = started
        while True:
            st = await self.stats()
            now = time.monotonic()
            if st.signed_in >= self.devices:
                return now - started
            if now - started > timeout:
                raise RuntimeError(
                    f"only {st.signed_in}/{self.devices} devices signed in after {timeout:.0f} s; "
                    f"errors: {st.error_kinds}"
                )
            if now - last_report >= 10:
                say(f"  signed in {st.signed_in}/{self.devices} (errors {st.totals['errors']})")
                last_report = now
            await asyncio.sleep(1.0)


def _split(total: int, per_proc: int) -> list[int]:
    n = max(1, math.ceil(total / max(per_proc, 1)))
    return [total // n + (1 if i < total % n else 0) for i in range(n)]


@contextlib.asynccontextmanager
async def sim_fleet(
    work: Path,
    gw: GatewayProc,
    *,
    ca_file: Path,
    token: str,
    devices: int,
    per_proc: int,
    prefix: str,
    connect_concurrency: int,
    script: Path = SCRIPT,
    worker_args: Sequence[str] = (),
) -> AsyncIterator[SimFleet]:
    """Start the ``sim-worker`` processes (``devices`` in all) and stop them on the way out;
    ``script`` is the benchmark whose ``sim-worker`` mode they run (our arguments, then
    ``worker_args``)."""
    procs: list[SimProc] = []
    try:
        for i, n in enumerate(_split(devices, per_proc)):
            name = f"sim-{prefix}-{i}"
            argv = [
                sys.executable,
                str(script),
                "sim-worker",
                "--gateway",
                gw.uri,
                "--ca",
                str(ca_file),
                "--token",
                token,
                "--devices",
                str(n),
                "--prefix",
                f"{prefix}{i}",
                "--connect-concurrency",
                str(connect_concurrency),
                *worker_args,
            ]
            child = await Child.spawn(
                name, argv, work / f"{name}.log", env=_clean_env(), stdin=True
            )
            procs.append(SimProc(child, n))
        await asyncio.gather(*(p.wait_ready(60) for p in procs))
        say(f"simulator: {devices} devices in {len(procs)} process(es) {[p.pid for p in procs]}")
        yield SimFleet(procs)
    finally:
        summaries = await asyncio.gather(*(p.stop() for p in procs), return_exceptions=True)
        for p, s in zip(procs, summaries, strict=True):
            if isinstance(s, dict):
                t = s.get("totals", {})
                say(
                    f"{p.child.name} stopped: sign-ins {t.get('sign_ins')}, "
                    f"sign-outs {t.get('sign_outs')}, errors {t.get('errors')}"
                )


# -- the sim-worker (runs in the simulator process) ------------------------------------------


class _Driver:
    """Calls ``change()`` on signed-in devices, round-robin, at a total rate (changes/s)."""

    TICK = 0.01

    def __init__(self) -> None:
        self.fleet: list[Any] = []
        self.rate = 0.0
        self._t0 = 0.0
        self._done = 0
        self._next = 0
        self.counters = {"changes": 0, "skipped_offline": 0, "dropped_behind": 0}
        self.lags: list[float] = []

    def set_rate(self, rate: float, now: float) -> None:
        self.rate = max(0.0, rate)
        self._t0 = now
        self._done = 0

    def lag_summary(self) -> dict[str, float]:
        lags = sorted(self.lags)
        self.lags = []
        if not lags:
            return {"p50": 0.0, "p99": 0.0, "max": 0.0}
        return {
            "p50": round(benchutil.percentile(lags, 50) * 1000, 2),
            "p99": round(benchutil.percentile(lags, 99) * 1000, 2),
            "max": round(lags[-1] * 1000, 2),
        }

    async def run(self) -> None:
        from devicesim.device import DeviceState

        loop = asyncio.get_running_loop()
        next_t = loop.time()
        while True:
            next_t += self.TICK
            await asyncio.sleep(max(0.0, next_t - loop.time()))
            now = loop.time()
            if len(self.lags) < 200_000:
                self.lags.append(max(0.0, now - next_t))
            if now - next_t > 1.0:
                next_t = now  # more than a second late: do not try to catch up the ticks
            if self.rate <= 0 or not self.fleet:
                continue
            due = int((now - self._t0) * self.rate) - self._done
            cap = max(1, int(self.rate))  # at most one second's worth at once
            if due > cap:
                self.counters["dropped_behind"] += due - cap
                self._done += due - cap
                due = cap
            n = len(self.fleet)
            for _ in range(due):
                d = self.fleet[self._next % n]
                self._next += 1
                self._done += 1
                if d.state is DeviceState.ONLINE:
                    d.change()
                    self.counters["changes"] += 1
                else:
                    self.counters["skipped_offline"] += 1


def _emit(msg: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(msg) + "\n")
    sys.stdout.flush()


async def serve_worker_commands(
    fleet_task: asyncio.Task[Any],
    driver: _Driver,
    extra: Mapping[str, Callable[[dict[str, Any]], None]] | None = None,
) -> None:
    """A sim worker's command loop: JSON lines on stdin (``stats``, ``rate``, ``stop`` and the
    ``extra`` commands by name), answers on stdout; returns on ``stop``, at the end of stdin
    (the benchmark went away) or when the fleet ends (a signal)."""
    from devicesim.stats import FleetSnapshot

    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=2**20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while not fleet_task.done():
        read = asyncio.create_task(reader.readline())
        await asyncio.wait({read, fleet_task}, return_when=asyncio.FIRST_COMPLETED)
        if not read.done():
            read.cancel()
            return
        line = read.result()
        if not line:
            return
        cmd = json.loads(line)
        name = cmd.get("cmd")
        if name == "stop":
            return
        if name == "stats":
            snap = FleetSnapshot.of(d.stats for d in driver.fleet)
            _emit(
                {
                    "type": "stats",
                    "devices": snap.devices,
                    "connected": snap.connected,
                    "signed_in": snap.signed_in,
                    "totals": snap.totals,
                    "error_kinds": snap.error_kinds,
                    "driver": dict(driver.counters),
                    "lag_ms": driver.lag_summary(),
                }
            )
        elif name == "rate":
            driver.set_rate(float(cmd["rate"]), loop.time())
            _emit({"type": "ok"})
        elif extra is not None and name in extra:
            extra[name](cmd)
        else:
            _emit({"type": "error", "error": f"unknown command {name!r}"})


async def sim_worker(args: argparse.Namespace) -> int:
    import logging

    from devicesim.config import TlsOptions
    from devicesim.fleet import run_fleet

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    logging.getLogger("devicesim.coap").setLevel(logging.ERROR)
    driver = _Driver()
    stop = asyncio.Event()

    def started(fleet: Sequence[Any]) -> None:
        driver.fleet = list(fleet)
        _emit({"type": "ready", "devices": len(fleet)})

    fleet_task = asyncio.create_task(
        run_fleet(
            args.gateway,
            devices=args.devices,
            resources=1,
            rate=0.0,
            tls=TlsOptions(ca_file=args.ca, server_name=GATEWAY_HOST),
            token=args.token,
            device_prefix=args.prefix,
            connect_concurrency=args.connect_concurrency,
            stop=stop,
            handle_signals=True,
            on_started=started,
        )
    )
    driver_task = asyncio.create_task(driver.run())
    try:
        await serve_worker_commands(fleet_task, driver)
    finally:
        driver_task.cancel()
        stop.set()
    summary = await asyncio.wait_for(fleet_task, 80)
    _emit({"type": "summary", **summary.to_dict()})
    return 0


# -- timestamps: device change, log, twin write -------------------------------------------


class _Body(msgspec.Struct):
    content: Any = None


_BODY = msgspec.json.Decoder(_Body)


def device_ts(message: NatsMessage) -> int | None:
    """The device's change time (``ts``, epoch ns) in a resource-changed event's content."""
    if message.headers.get("ce-type") != ResourceChanged.TYPE:
        return None
    try:
        content = _BODY.decode(message.data).content
    except msgspec.DecodeError:
        return None
    ts = content.get("ts") if isinstance(content, dict) else None
    return ts if isinstance(ts, int) else None


class WriteTimes:
    """The projector's ``after_write`` hook: when each log position's batch was written (its
    twins and checkpoint stored), in epoch ns."""

    def __init__(self) -> None:
        self.written: dict[int, int] = {}

    async def after_write(self, positions: Sequence[int]) -> None:
        now = time.time_ns()
        for p in positions:
            self.written[p] = now

    def take(self) -> dict[int, int]:
        out, self.written = self.written, {}
        return out


async def read_device_times(
    store: EventStore,
    after: int,
    upto: int,
    *,
    limit: int,
    timeout: float,
) -> list[tuple[int, int, int]]:
    """(position, device ``ts``, JetStream receive time) of the resource-changed events in
    (``after``, ``upto``], read back from the log; at most ``limit`` events are read."""
    out: list[tuple[int, int, int]] = []
    try:
        async with (
            asyncio.timeout(timeout),
            contextlib.aclosing(store.read(ALL_EVENTS, after=after, limit=limit)) as stored,
        ):
            async for m in stored:
                if m.position > upto:
                    break
                ts = device_ts(m.message)
                if ts is not None:
                    out.append((m.position, ts, m.time_ns))
    except TimeoutError:
        say(f"  reading the window's events took over {timeout:.0f} s: partial sample")
    return out


class LoopLag:
    """How late a 10 ms ticker wakes up in this process (event-loop saturation)."""

    def __init__(self) -> None:
        self._lags: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            t = loop.time() + 0.01
            await asyncio.sleep(0.01)
            if len(self._lags) < 200_000:
                self._lags.append(max(0.0, loop.time() - t))

    def reset(self) -> None:
        self._lags = []

    def summary(self) -> dict[str, float]:
        lags = sorted(self._lags)
        if not lags:
            return {}
        return {
            "p50_ms": round(benchutil.percentile(lags, 50) * 1000, 2),
            "p99_ms": round(benchutil.percentile(lags, 99) * 1000, 2),
            "max_ms": round(lags[-1] * 1000, 2),
        }

    async def __aenter__(self) -> Self:
        self._task = asyncio.create_task(self._run(), name="loop-lag")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


# -- phases -----------------------------------------------------------------------------------


@dataclass
class Env:
    """What both phases share: the work dir, servers, configuration, token, the bench's store."""

    args: argparse.Namespace
    work: Path
    data_dir: Path
    ca_file: Path
    token: str
    config: Any  # twinhub_cli.config.Config
    store: EventStore
    servers: dict[str, int] = field(default_factory=dict)  # name -> pid (nats, mongo)


async def wait_log_quiet(store: EventStore, *, stable: float, timeout: float) -> int:
    """Wait until the log's end stays put for ``stable`` seconds (bounded); returns it."""
    deadline = time.monotonic() + timeout
    last = await store.last_position()
    since = time.monotonic()
    while time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        now_last = await store.last_position()
        if now_last != last:
            last, since = now_last, time.monotonic()
        elif time.monotonic() - since >= stable:
            return last
    say(f"  log still moving after {timeout:.0f} s (at {last})")
    return last


async def wait_projected(
    store: EventStore,
    projector: Any,
    *,
    timeout: float,
) -> tuple[bool, float]:
    """Wait until the projector has written up to the log's end and the end stays put 0.5 s."""
    from twin.errors import ProjectionTimeoutError

    started = time.monotonic()
    deadline = started + timeout
    while True:
        head = await store.last_position()
        left = deadline - time.monotonic()
        if left <= 0:
            return False, time.monotonic() - started
        try:
            await projector.wait_for_position(head, left)
        except ProjectionTimeoutError:
            return False, time.monotonic() - started
        await asyncio.sleep(0.5)
        if await store.last_position() == head:
            return True, time.monotonic() - started


def _rss_mb(pid: int) -> float | None:
    kb = benchutil.status_kb(pid)
    return round(kb / 1024, 1) if kb is not None else None


@dataclass
class Snapshot:
    mono: float
    cpu: benchutil.CpuSample
    fleet: FleetStats
    log_end: int
    applied: int
    batches: int
    position: int


async def _snapshot(
    meter: benchutil.CpuMeter, fleet: SimFleet, store: EventStore, projector: Any | None
) -> Snapshot:
    mono = time.monotonic()
    cpu = meter.sample()
    log_end = await store.last_position()
    applied = batches = 0
    position = log_end
    if projector is not None:
        st = projector.stats
        applied, batches, position = st.events_applied, st.batches, projector.position
    fstats = await fleet.stats()
    return Snapshot(mono, cpu, fstats, log_end, applied, batches, position)


def _slope(values: Sequence[int]) -> float:
    """Least-squares slope of values sampled once a second (0 for fewer than 3)."""
    if len(values) < 3:
        return 0.0
    return statistics.linear_regression(range(len(values)), values).slope


@dataclass
class Rig:
    """What a rate step runs against."""

    fleet: SimFleet
    meter: benchutil.CpuMeter
    lag: LoopLag
    pids: dict[str, list[int]]
    projector: Any | None = None  # TwinProjector when the twin leg is measured
    clock: WriteTimes | None = None


async def measure_rate(env: Env, rig: Rig, rate: float) -> dict[str, Any]:
    """One offered rate: warm-up, measured window, rate 0, drain; the step's numbers."""
    args = env.args
    store = env.store
    projector = rig.projector
    e2e = projector is not None
    mode = "e2e" if e2e else "ingest"
    say(f"[{mode}] rate {rate:g}/s: warm-up {args.warmup:g} s, then {args.duration:g} s measured")
    await rig.fleet.set_rate(rate)
    await asyncio.sleep(args.warmup)
    a = await _snapshot(rig.meter, rig.fleet, store, projector)
    if rig.clock is not None:
        rig.clock.take()
    rig.lag.reset()
    backlog: list[int] = []
    end = a.mono + args.duration
    while (left := end - time.monotonic()) > 0:
        await asyncio.sleep(min(1.0, left))
        if projector is not None:
            backlog.append(await store.last_position() - projector.position)
    b = await _snapshot(rig.meter, rig.fleet, store, projector)
    written_at = rig.clock.take() if rig.clock is not None else {}
    bench_lag = rig.lag.summary()
    rss = {name: [_rss_mb(p) for p in ps] for name, ps in rig.pids.items()}
    await rig.fleet.set_rate(0)

    el = b.mono - a.mono

    def per_s(x: float) -> float:
        return round(x / el, 1)

    def delta(key: str) -> int:
        return b.fleet.totals.get(key, 0) - a.fleet.totals.get(key, 0)

    def driver(key: str) -> int:
        return b.fleet.driver.get(key, 0) - a.fleet.driver.get(key, 0)

    notifs = per_s(delta("notifications_sent"))
    appended = per_s(b.log_end - a.log_end)
    cpu = rig.meter.usage(a.cpu, b.cpu)
    result: dict[str, Any] = {
        "offered_per_s": rate,
        "seconds": round(el, 2),
        "device_changes_per_s": per_s(delta("changes")),
        "device_notifications_per_s": notifs,
        "events_appended_per_s": appended,
    }
    if projector is not None:
        drained, drain_s = await wait_projected(store, projector, timeout=args.drain_timeout)
        say(f"  drained in {drain_s:.1f} s" if drained else f"  NOT drained after {drain_s:.0f} s")
        written = per_s(b.applied - a.applied)
        batches = b.batches - a.batches
        slope = _slope(backlog)
        records: list[tuple[int, int, int]] = []  # (device ts, log time, twin written) ns
        if written_at:
            rows = await read_device_times(
                store,
                min(written_at) - 1,
                max(written_at),
                limit=args.latency_sample_limit,
                timeout=120,
            )
            records = [(ts, t, written_at[p]) for p, ts, t in rows if p in written_at]
        lat = {
            "device_to_twin": benchutil.summarize_ms(w - ts for ts, _, w in records),
            "device_to_log": benchutil.summarize_ms(s - ts for ts, s, _ in records),
            "log_to_twin": benchutil.summarize_ms(w - s for _, s, w in records),
        }
        sustained = rate > 0 and notifs >= 0.97 * rate and slope <= 0.05 * rate and drained
        result |= {
            "twin_events_written_per_s": written,
            "twin_batches_per_s": per_s(batches),
            "events_per_twin_batch": round((b.applied - a.applied) / batches, 1) if batches else 0,
            "backlog_events": {
                "start": a.log_end - a.position,
                "end": b.log_end - b.position,
                "max": max(backlog, default=0),
                # per-second samples' trend: the projector writes in batches, so the two end
                # points alone are noisy
                "trend_per_s": round(slope, 1),
                "per_second": backlog,
            },
            "drained": drained,
            "drain_s": round(drain_s, 1),
        }
    else:
        await wait_log_quiet(store, stable=1.0, timeout=30)
        rows = await read_device_times(
            store, a.log_end, b.log_end, limit=args.latency_sample_limit, timeout=120
        )
        lat = {"device_to_log": benchutil.summarize_ms(t - ts for _, ts, t in rows)}
        p99 = lat["device_to_log"].get("p99_ms", math.inf)
        sustained = rate > 0 and notifs >= 0.97 * rate and appended >= 0.97 * rate and p99 <= 1000
    result |= {
        "latency": lat,
        "cpu_pct_of_one_core": cpu,
        "rss_mb": rss,
        "loop_lag": {
            "bench": bench_lag,
            "sim_p99_ms": b.fleet.lag_p99_ms,
            "sim_max_ms": b.fleet.lag_max_ms,
        },
        "sim": {
            "dropped_behind": driver("dropped_behind"),
            "skipped_offline": driver("skipped_offline"),
            "errors": delta("errors"),
            "reconnects": delta("reconnects"),
            "signed_in_at_end": b.fleet.signed_in,
        },
        "sustained": sustained,
    }
    main_lat = lat.get("device_to_twin", lat["device_to_log"])
    say(
        f"  notifications {notifs:g}/s, appended {appended:g}/s"
        + (f", twin {result['twin_events_written_per_s']:g}/s" if e2e else "")
        + f", p50 {main_lat.get('p50_ms')} ms p99 {main_lat.get('p99_ms')} ms"
        + f" ({'sustained' if sustained else 'NOT sustained'}), cpu {cpu}"
    )
    return result


async def wait_quiet_machine(meter: benchutil.CpuMeter, *, limit: float, max_wait: float) -> float:
    """Wait (at most ``max_wait`` s) until other processes use at most ``limit`` % of a core
    over 2 s; returns the last reading."""
    deadline = time.monotonic() + max_wait
    announced = False
    while True:
        a = meter.sample()
        await asyncio.sleep(2.0)
        others = float(meter.usage(a, meter.sample())["others_pct_of_one_core"])
        if others <= limit or time.monotonic() >= deadline:
            return others
        if not announced:
            say(f"  other processes use {others:g}% of a core: waiting up to {max_wait:g} s")
            announced = True


async def run_step(env: Env, rig: Rig, rate: float) -> dict[str, Any]:
    """:func:`measure_rate` on a quiet machine if possible: waits for the other processes to calm
    down, measures again (``--noisy-retries``) when they did not, keeps the least disturbed try."""
    args = env.args
    best: dict[str, Any] | None = None
    best_others = math.inf
    for attempt in range(1, args.noisy_retries + 2):
        before = await wait_quiet_machine(
            rig.meter, limit=args.max_others_pct, max_wait=args.quiet_wait
        )
        step = await measure_rate(env, rig, rate)
        others = float(step["cpu_pct_of_one_core"]["others_pct_of_one_core"])
        step["attempt"] = attempt
        step["others_pct_before"] = before
        if others < best_others:
            best, best_others = step, others
        if others <= args.max_others_pct or not step.get("drained", True):
            break
        if attempt <= args.noisy_retries:
            say(f"  other processes used {others:g}% of a core meanwhile: measuring again")
    assert best is not None
    best["disturbed"] = best_others > args.max_others_pct
    return best


def saturation(steps: list[dict[str, Any]], sim_procs: int) -> dict[str, Any]:
    """The CPU picture of the first step that was not sustained (or of the last step)."""
    if not steps:
        return {}
    first_bad = next((s for s in steps if not s["sustained"]), None)
    step = first_bad or steps[-1]
    cpu = step["cpu_pct_of_one_core"]
    # A Python process runs on one core: ~100 % is its ceiling (the simulator: per process).
    ceilings = {"gateway": 100.0, "bench_projector": 100.0, "sim": 100.0 * sim_procs}
    near = {n: cpu[n] for n, c in ceilings.items() if n in cpu and cpu[n] >= 0.9 * c}
    procs = {
        k: v for k, v in cpu.items() if k not in ("machine_busy_pct", "others_pct_of_one_core")
    }
    sustained = [s["offered_per_s"] for s in steps if s["sustained"]]
    return {
        "max_sustained_offered_per_s": max(sustained, default=None),
        "first_unsustained_offered_per_s": first_bad["offered_per_s"] if first_bad else None,
        "examined_offered_per_s": step["offered_per_s"],
        "busiest_processes": sorted(procs, key=lambda k: procs[k], reverse=True),
        "python_processes_at_ceiling": near,
        "machine_busy_pct": cpu.get("machine_busy_pct"),
    }


async def throughput_phase(env: Env) -> dict[str, Any]:
    from twin.service import ProjectorConfig, ProjectorHooks, TwinProjector
    from twinhub_cli import services
    from twinhub_cli.datadir import DataDir

    args = env.args
    config = env.config
    result: dict[str, Any] = {}
    with_twin = "e2e" in args.phases
    async with contextlib.AsyncExitStack() as stack:
        gw = await stack.enter_async_context(
            gateway_process(
                env.work, "gw-e2e", env.data_dir, config, profile_to=args.profile_gateway
            )
        )
        lag = await stack.enter_async_context(LoopLag())
        projector_stack = await stack.enter_async_context(contextlib.AsyncExitStack())
        projector: Any | None = None
        clock: WriteTimes | None = None
        if with_twin:
            twins = await projector_stack.enter_async_context(services.twin_store(config))
            # the projector is the twin service's: its role (it owns the projector consumer)
            projector_store = await projector_stack.enter_async_context(
                services.event_store(config, DataDir(env.data_dir), "twin")
            )
            clock = WriteTimes()
            projector = await projector_stack.enter_async_context(
                TwinProjector(
                    twins,
                    projector_store,
                    ProjectorConfig(
                        name=config.twin.consumer,
                        batch_size=args.twin_batch,
                        max_ack_pending=max(1000, args.twin_batch),
                    ),
                    hooks=ProjectorHooks(after_write=clock.after_write),
                )
            )
        say(f"connecting {args.devices} TLS devices")
        fleet = await stack.enter_async_context(
            sim_fleet(
                env.work,
                gw,
                ca_file=env.ca_file,
                token=env.token,
                devices=args.devices,
                per_proc=args.devices_per_sim,
                prefix="tp",
                connect_concurrency=args.connect_concurrency,
            )
        )
        signed_in_s = await fleet.wait_signed_in(timeout=max(120.0, args.devices / 10))
        say(f"all {args.devices} signed in after {signed_in_s:.1f} s; waiting for the sync")
        await wait_log_quiet(env.store, stable=2.0, timeout=120)
        synced_s = None
        if projector is not None:
            ok, took = await wait_projected(env.store, projector, timeout=args.sync_timeout)
            synced_s = round(took, 1) if ok else None
            say(
                f"twins projected after {took:.0f} s"
                if ok
                else f"twins NOT projected after {took:.0f} s"
            )
        result["connect"] = {
            "devices": args.devices,
            "sim_processes": len(fleet.procs),
            "all_signed_in_s": round(signed_in_s, 1),
            "sign_ins_per_s": round(args.devices / max(signed_in_s, 1e-9), 1),
            "events_after_sync": await env.store.last_position(),
            "twins_projected_after_s": synced_s,
        }
        pids = {
            "gateway": [gw.pid],
            "sim": fleet.pids,
            "nats": [env.servers["nats"]],
            "mongo": [env.servers["mongo"]],
            "bench_projector": [os.getpid()],
        }
        meter = benchutil.CpuMeter(pids)
        idle_a = meter.sample()
        await asyncio.sleep(min(5.0, args.duration))
        result["idle_cpu_pct_of_one_core"] = meter.usage(idle_a, meter.sample())
        if projector is not None:
            rig = Rig(fleet, meter, lag, pids, projector, clock)
            steps = []
            for rate in args.e2e_rates:
                steps.append(await run_step(env, rig, rate))
                if not steps[-1]["sustained"] and args.e2e_stop_unsustained:
                    say("  not sustained: the twin sweep stops here (a backlog only grows)")
                    break
            result["e2e"] = {
                "steps": steps,
                "saturation": saturation(steps, len(fleet.procs)),
                "projector_stats": {
                    k: getattr(projector.stats, k)
                    for k in ("events_applied", "duplicates_skipped", "batches", "store_failures")
                },
            }
        await projector_stack.aclose()  # the ingest sweep runs without the twin leg
        if "ingest" in args.phases:
            rig = Rig(fleet, meter, lag, pids)
            steps = [await run_step(env, rig, rate) for rate in args.rates]
            result["ingest"] = {
                "steps": steps,
                "saturation": saturation(steps, len(fleet.procs)),
            }
    if args.profile_gateway is not None:
        result["gateway_profile"] = str(args.profile_gateway)
    return result


async def _rss_median(pid: int, samples: int, interval: float) -> float:
    values: list[float] = []
    for i in range(samples):
        if i:
            await asyncio.sleep(interval)
        kb = benchutil.status_kb(pid)
        if kb is None:
            raise RuntimeError(f"process {pid} is gone")
        values.append(kb / 1024)
    return round(statistics.median(values), 1)


async def rss_phase(env: Env) -> dict[str, Any]:
    args = env.args
    rows: list[dict[str, Any]] = []
    for n in sorted(set(args.rss_devices)):
        async with contextlib.AsyncExitStack() as stack:
            name = f"gw-rss{n}"
            gw = await stack.enter_async_context(
                gateway_process(env.work, name, env.data_dir, env.config)
            )
            await asyncio.sleep(args.settle)
            idle = await _rss_median(gw.pid, 3, 0.5)
            row: dict[str, Any] = {"devices": n, "gateway_rss_idle_mb": idle}
            if n == 0:
                row["gateway_rss_mb"] = idle
                say(f"gateway RSS with 0 devices: {idle} MB")
            else:
                say(f"gateway RSS: connecting {n} idle TLS devices")
                fleet = await stack.enter_async_context(
                    sim_fleet(
                        env.work,
                        gw,
                        ca_file=env.ca_file,
                        token=env.token,
                        devices=n,
                        per_proc=args.devices_per_sim,
                        prefix=f"rss{n}x",
                        connect_concurrency=args.connect_concurrency,
                    )
                )
                took = await fleet.wait_signed_in(timeout=max(180.0, n / 10))
                await wait_log_quiet(env.store, stable=3.0, timeout=180)
                await asyncio.sleep(args.settle)
                rss = await _rss_median(gw.pid, 5, 1.0)
                st = await fleet.stats()
                hwm = benchutil.status_kb(gw.pid, "VmHWM")
                row.update(
                    {
                        "gateway_rss_mb": rss,
                        "gateway_hwm_mb": round(hwm / 1024, 1) if hwm else None,
                        "per_device_kb": round((rss - idle) * 1024 / n, 1),
                        "signed_in": st.signed_in,
                        "all_signed_in_s": round(took, 1),
                        "sim_processes": len(fleet.procs),
                        "sim_rss_mb": [_rss_mb(p) for p in fleet.pids],
                        "nats_rss_mb": _rss_mb(env.servers["nats"]),
                        "gateway_open_fds": len(os.listdir(f"/proc/{gw.pid}/fd")),
                    }
                )
                say(
                    f"gateway RSS with {n} devices: {rss} MB (idle {idle} MB, "
                    f"{row['per_device_kb']} kB/device)"
                )
            rows.append(row)
    # The increment between consecutive sizes excludes one-off costs of the first connections.
    for prev, cur in itertools.pairwise(rows):
        dn = cur["devices"] - prev["devices"]
        if dn > 0:
            cur["incremental_kb_per_device_from_prev"] = round(
                (cur["gateway_rss_mb"] - prev["gateway_rss_mb"]) * 1024 / dn, 1
            )
    return {"rows": rows}


def code_info() -> dict[str, Any]:
    """Which twinhub source the processes run: its directory, git commit and local changes."""
    import subprocess

    import twinhub_cli

    root = Path(twinhub_cli.__file__).resolve().parent.parent

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {
        "source": str(root),
        "git_commit": git("rev-parse", "HEAD"),
        "modified_files": status.splitlines() if status else [],
    }


def _ferretdb_version() -> str:
    with contextlib.suppress(OSError):
        m = re.search(
            r"FerretDB/FerretDB (v[\w.\-]+)", (REPO / "tools/mongo-server/go.mod").read_text()
        )
        if m:
            return f"FerretDB {m.group(1)} (SQLite backend)"
    return "FerretDB (unknown version)"


def bench_config(nats: Any, mongo_url: str) -> Any:
    """The configuration of the benchmark's services: the started servers, and the bus
    credentials of the NATS server (``nats.credentials``: its ``<role>.nk`` seeds, the callout's
    issuer key, the consumer key), which the child processes get through :func:`bus_env`."""
    from twinhub_cli import config as cfgmod

    nats_settings = {"url": nats.url, "credentials": str(nats.credentials.directory)}
    return cfgmod.load(None, env={}, overrides={"nats": nats_settings, "mongo": {"url": mongo_url}})


def cancel_on_signals() -> None:
    """SIGINT and SIGTERM cancel the running task (the benchmark's main), even when the process
    was started with SIGINT ignored; its clean-up then stops every child in order."""
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    assert main_task is not None
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, main_task.cancel)


async def twinhub_init(work: Path) -> Path:
    """``twinhub init`` into ``work/data`` (keys, certificates, bus credentials); its path."""
    data_dir = work / "data"
    init = await Child.spawn(
        "twinhub-init",
        [_venv_bin("twinhub"), "init", "--data-dir", str(data_dir)],
        work / "init.log",
        env=_clean_env(),
    )
    if await asyncio.wait_for(init.proc.wait(), 60) != 0:
        raise init.failure("failed")
    _CHILDREN.pop(init.pid, None)
    return data_dir


async def run_bench(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from twinhub_cli import services
    from twinhub_cli.datadir import DataDir
    from twinhub_cli.devservices import MongoServer, NatsServer

    cancel_on_signals()
    nofile = benchutil.raise_nofile_limit()
    background = await benchutil.machine_busy_pct(2.0)
    result: dict[str, Any] = benchutil.result_header("e2e")
    async with contextlib.AsyncExitStack() as stack:
        nats = await stack.enter_async_context(NatsServer(work / "nats"))
        assert nats.pid is not None
        stack.callback(_CHILDREN.pop, nats.pid, None)
        _CHILDREN[nats.pid] = "nats-server"
        mongo = await stack.enter_async_context(MongoServer(work / "mongo"))
        assert mongo.pid is not None
        stack.callback(_CHILDREN.pop, mongo.pid, None)
        _CHILDREN[mongo.pid] = "mongo-server"
        result["machine"] = benchutil.machine(
            {
                "nats_server": benchutil.binary_version(nats.binary),
                "mongo_server": _ferretdb_version(),
                "nofile_limit": list(nofile),
                "busy_pct_before_start": round(background, 1),
            }
        )
        result["code"] = code_info()
        data_dir = await twinhub_init(work)
        config = bench_config(nats, mongo.url)
        token = services.first_device_token(config, DataDir(data_dir), OWNER)
        # the benchmark's own reads of the log (measurements, waits): the admin role
        store = await stack.enter_async_context(
            services.event_store(config, DataDir(data_dir), "admin")
        )
        env = Env(
            args=args,
            work=work,
            data_dir=data_dir,
            ca_file=data_dir / "pki" / "ca.crt",
            token=token,
            config=config,
            store=store,
            servers={"nats": nats.pid, "mongo": mongo.pid},
        )
        result["settings"] = {
            "phases": args.phases,
            "devices": args.devices,
            "e2e_rates": args.e2e_rates,
            "ingest_rates": args.rates,
            "warmup_s": args.warmup,
            "duration_s": args.duration,
            "rss_devices": args.rss_devices,
            "transport": "coaps+tcp (TLS 1.2+, server certificate from `twinhub init`)",
            "bus": "authenticated NATS: gateway and projector by the NKeys of their roles",
            "resources_per_device": 1,
            "device_mode": "batch observe of /oic/res (the simulator's default)",
            "devices_per_sim_process": args.devices_per_sim,
            "connect_concurrency_per_sim_process": args.connect_concurrency,
            "projector_batch": args.twin_batch,
            "gateway_profiled": args.profile_gateway is not None,
        }
        if ("e2e" in args.phases and args.e2e_rates) or ("ingest" in args.phases and args.rates):
            result["throughput"] = await throughput_phase(env)
        if "rss" in args.phases and args.rss_devices:
            result["gateway_rss"] = await rss_phase(env)
    return result


# -- command line -------------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _float_list(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


PHASES = ("e2e", "ingest", "rss")
FULL: dict[str, Any] = {
    "devices": 1000,
    "rates": [500.0, 1000.0, 2000.0, 4000.0],
    "duration": 20.0,
    "warmup": 5.0,
    "rss_devices": [0, 1000, 5000],
}
QUICK: dict[str, Any] = {
    "devices": 50,
    "rates": [50.0, 200.0],
    "duration": 5.0,
    "warmup": 2.0,
    "rss_devices": [0, 50],
}
# The twin sweep starts lower: the development twin store (FerretDB/SQLite) scans the whole
# collection for every update, so with 1000 twins it writes only some 10-20 twins/s.
E2E_LOW_RATES = [10.0, 25.0, 50.0, 100.0, 200.0]
# The projector's batch: what `twinhub twin run` uses (config `twin.batch`).
TWIN_BATCH = 2000


def _phases(text: str) -> list[str]:
    out = [x.strip() for x in text.split(",") if x.strip()]
    for x in out:
        if x not in PHASES:
            raise argparse.ArgumentTypeError(f"unknown phase {x!r} (known: {', '.join(PHASES)})")
    return out


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--phases",
        type=_phases,
        default=list(PHASES),
        help="what to run, comma-separated: e2e (twin leg included), ingest (device -> log "
        "only), rss (gateway memory); default all",
    )
    p.add_argument("--devices", type=int, help="devices of the throughput phases (1000)")
    p.add_argument(
        "--rates",
        type=_float_list,
        help="offered total change/notification rates per second, comma-separated "
        "(500,1000,2000,4000): the ingest sweep, and the top of the e2e sweep",
    )
    p.add_argument(
        "--e2e-rates",
        type=_float_list,
        help="rates of the e2e sweep (default 10,25,50,100,200 then --rates)",
    )
    p.add_argument(
        "--e2e-stop-unsustained",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="end the e2e sweep at the first rate the twin leg does not sustain (default on)",
    )
    p.add_argument("--duration", type=float, help="measured seconds per rate (20)")
    p.add_argument("--warmup", type=float, help="seconds at each rate before measuring (5)")
    p.add_argument(
        "--rss-devices",
        type=_int_list,
        help="device counts of the gateway memory phase (0,1000,5000)",
    )
    p.add_argument("--quick", action="store_true", help="smoke test: 50 devices, 5 s windows")
    p.add_argument(
        "--twin-batch",
        type=int,
        default=TWIN_BATCH,
        help=f"projector batch size ({TWIN_BATCH}, as config twin.batch)",
    )
    p.add_argument(
        "--devices-per-sim", type=int, default=2500, help="devices per simulator process (2500)"
    )
    p.add_argument(
        "--connect-concurrency",
        type=int,
        default=64,
        help="devices connecting at once, per simulator process (64)",
    )
    p.add_argument("--drain-timeout", type=float, default=120.0, help="seconds (120)")
    p.add_argument(
        "--sync-timeout",
        type=float,
        default=600.0,
        help="seconds for the twins of the connected fleet to be written before the e2e sweep",
    )
    p.add_argument(
        "--max-others-pct",
        type=float,
        default=30.0,
        help="CPU (%% of one core) other processes may use during a window (30)",
    )
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=60.0,
        help="seconds to wait before a step for other processes to calm down (60)",
    )
    p.add_argument(
        "--noisy-retries",
        type=int,
        default=2,
        help="measure a disturbed step again up to N times, keep the least disturbed (2)",
    )
    p.add_argument("--settle", type=float, default=3.0, help="seconds before RSS readings (3)")
    p.add_argument(
        "--latency-sample-limit",
        type=int,
        default=200_000,
        help="events read back per ingest step for its latency (200000)",
    )
    p.add_argument(
        "--profile-gateway",
        type=Path,
        metavar="FILE",
        help="run the throughput phases' gateway under pyinstrument, text report to FILE",
    )
    p.add_argument("--output", type=Path, metavar="FILE", help="also write the JSON to FILE")
    p.add_argument("--keep-work-dir", action="store_true", help="keep the temp dir (logs)")
    args = p.parse_args(argv)
    base = QUICK if args.quick else FULL
    for key, value in base.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.e2e_rates is None:
        low = [10.0] if args.quick else E2E_LOW_RATES
        args.e2e_rates = sorted(set(low) | set(args.rates))
    if args.devices < 1 or args.duration <= 0 or args.warmup < 0 or args.twin_batch < 1:
        p.error("--devices and --twin-batch must be >= 1, --duration > 0, --warmup >= 0")
    rates = [*args.rates, *args.e2e_rates]
    if any(r < 0 for r in rates) or any(n < 0 for n in args.rss_devices):
        p.error("rates and device counts must not be negative")
    if args.profile_gateway is not None:
        args.profile_gateway = args.profile_gateway.resolve()
    return args


def parse_worker_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="e2e_bench.py sim-worker")
    p.add_argument("--gateway", required=True)
    p.add_argument("--ca", type=Path, required=True)
    p.add_argument("--token", required=True)
    p.add_argument("--devices", type=int, required=True)
    p.add_argument("--prefix", required=True)
    p.add_argument("--connect-concurrency", type=int, default=64)
    return p.parse_args(argv)


def _e2e_worker(argv: list[str]) -> Coroutine[Any, Any, int]:
    return sim_worker(parse_worker_args(argv))


def run_main(
    prefix: str,
    parse: Callable[[list[str]], argparse.Namespace],
    bench: Callable[[argparse.Namespace, Path], Coroutine[Any, Any, dict[str, Any]]],
    log: Callable[[str], None] = say,
    worker: Callable[[list[str]], Coroutine[Any, Any, int]] = _e2e_worker,
) -> int:
    """A benchmark's ``main``: its ``sim-worker`` child (``worker``), or the run in a temporary
    work dir (kept with ``--keep-work-dir``), its JSON on stdout (and ``--output``); the exit
    code (1 also when a phase of the result says ``failed``)."""
    import uvloop

    if len(sys.argv) > 1 and sys.argv[1] == "sim-worker":
        return uvloop.run(worker(sys.argv[2:]))
    args = parse(sys.argv[1:])
    work = Path(tempfile.mkdtemp(prefix=prefix))
    log(f"work dir {work}")
    code = 0
    try:
        result = uvloop.run(bench(args, work))
        text = json.dumps(result, indent=2)
        print(text, flush=True)
        if args.output is not None:
            args.output.write_text(text + "\n", encoding="utf-8")
        failed = [k for k, v in result.items() if isinstance(v, dict) and "failed" in v]
        if failed:
            log(f"failed phases: {', '.join(failed)}")
            code = 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        log("interrupted")
        code = 130
    except Exception as e:
        traceback.print_exc()
        log(f"failed: {type(e).__name__}: {e}")
        code = 1
    finally:
        _kill_leftovers()
        if args.keep_work_dir:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return code


def main() -> int:
    return run_main("twinhub-e2e-", parse_args, run_bench)


if __name__ == "__main__":
    sys.exit(main())

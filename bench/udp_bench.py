"""Simple devices' telemetry over CoAP/UDP into the log (PRODUCT issue 10 item 6).

    .venv/bin/python bench/udp_bench.py [--devices 1000] [--rates 500,1000,2000,4000]
        [--duration 20] [--warmup 5] [--quick] [--output FILE]

Everything runs on this machine, on loopback, in a temporary directory removed on exit:

* ``nats-server`` (JetStream), authenticated as users run it
  (:class:`twinhub_cli.devservices.NatsServer`, services by NKey); the streams (events, leases,
  device tokens) provisioned by the twin role; ``--devices`` access tokens written into the
  token registry (one :class:`proto.devtokens.TokenRecord` on each token's subject, admin role);
* the system under test: ``twinhub gateway`` as its own process, only its simple devices'
  CoAP/UDP endpoint listening (:class:`gateway.adapters.coap_udp.SimpleDeviceServer`: token
  lookup through the cached registry, JSON parsing, per-token rate limit, presence, one append
  to the log per request, 2.01 once the log acknowledged it), connected with the gateway
  role's NKey;
* the raw baseline, its own process too (this script in ``sim-worker raw`` mode): an aiocoap
  UDP server whose one resource answers every request 2.01 once it has published the request's
  payload bytes, as they came, to the same stream (nats-py JetStream publish with a
  ``Nats-Msg-Id``, acknowledged, the gateway role's NKey). No token lookup, no parsing: the
  floor of "aiocoap + one JetStream publish";
* the load, its own process (``sim-worker load``): one UDP socket per device (its own port, as
  devices have their own addresses) sending CoAP confirmable POSTs to
  ``/api/v1/<token>/telemetry`` (Content-Format JSON) with the body
  ``{"ts": <ms>, "values": {"t": <n>, "sent": <epoch ns>}}``, round-robin over the devices at
  the offered total rate (a 10 ms ticker); no retransmissions: a request unanswered for 10 s
  is counted lost. The datagrams are built from a per-device template encoded once by aiocoap
  (header, token and message id patched in).

For each offered rate (``--rates``) the gateway and the baseline are measured in turn (same
load, same devices): warm-up ``--warmup`` s, a window of ``--duration`` s, rate 0, drain (all
answered). Per window: requests sent, answers by code, lost; events logged/s (the telemetry
messages the log received in the window, read back after it with the admin role); device→log
latency (the stored message's JetStream receive time ``StoredMessage.time_ns`` minus the
``sent`` the device put in the payload, both this host's wall clock); request→2.01 round trip
seen by the device; CPU of every process (``/proc``), and CPU per logged message of the server
under test and of nats-server. A rate is *sustained* when >= 95 % of the offered messages were
logged in the window and < 1 % of the requests went unanswered. ``ratios`` compare the gateway
with the baseline: the highest sustained rate, and CPU per message at each rate both sustain.

``others_pct_of_one_core`` is what the rest of the machine used during a window: check it
before trusting a number. Prints one JSON document on stdout (progress on stderr).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import re
import signal
import socket
import struct
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import benchutil
import msgspec
from e2e_bench import Child, _clean_env, _venv_bin, bus_env, cancel_on_signals, code_info, run_main

from eventstore.ports import ALL_EVENTS, EventStore

SCRIPT = Path(__file__).resolve()
OWNER = "bench"
HOST = "127.0.0.1"
RAW_SUBJECT = f"twinhub.ev.{OWNER}.raw-baseline.telemetry-reported._"
LOST_AFTER = 10.0  # seconds without an answer: the request is counted lost
SUSTAINED_LOGGED = 0.95
SUSTAINED_LOST = 0.01


def say(text: str) -> None:
    sys.stderr.write(f"[udp {time.strftime('%H:%M:%S')}] {text}\n")
    sys.stderr.flush()


def _emit(msg: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(msg) + "\n")
    sys.stdout.flush()


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def _summary_ms(values_ns: Sequence[int]) -> dict[str, Any]:
    return benchutil.summarize_ms(values_ns)


# -- the load (runs in the `sim-worker load` process) ------------------------------------------

_CON_POST = 0x40 | 4  # version 1, type CON (0), token length 4
_POST = 0x02


def _template(token: str) -> bytes:
    """The options and payload marker of a telemetry POST of ``token`` (after header + token)."""
    import aiocoap
    from aiocoap.numbers.contentformat import ContentFormat

    msg = aiocoap.Message(
        code=aiocoap.POST,
        mtype=aiocoap.CON,
        mid=0,
        token=b"\0\0\0\0",
        uri_path=("api", "v1", token, "telemetry"),
        payload=b"X",
    )
    msg.opt.content_format = ContentFormat.JSON
    encoded: bytes = msg.encode()
    return encoded[8:-1]  # 4-byte header, 4-byte token ... options, 0xFF | payload "X"


class _Device(asyncio.DatagramProtocol):
    def __init__(self, load: Load, options: bytes) -> None:
        self.load = load
        self.options = options
        self.mid = 0
        self.transport: asyncio.DatagramTransport | None = None

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.load.answer(self, data, addr)

    def error_received(self, exc: Exception) -> None:
        self.load.counters["socket_errors"] += 1


class Load:
    """Telemetry POSTs round-robin over the devices at a total rate, to one target port."""

    TICK = 0.01

    def __init__(self) -> None:
        self.devices: list[_Device] = []
        self.rate = 0.0
        self.port = 0
        self._t0 = 0.0
        self._done = 0
        self._next = 0
        self._n = 0
        self.pending: dict[bytes, int] = {}  # CoAP token -> send time (monotonic ns)
        self.counters: Counter[str] = Counter()
        self.rtts: list[int] = []

    def set_rate(self, rate: float, port: int, now: float) -> None:
        self.rate, self.port = max(0.0, rate), port
        self._t0, self._done = now, 0

    def send(self, d: _Device) -> None:
        assert d.transport is not None
        d.mid = (d.mid + 1) & 0xFFFF
        self._n += 1
        token = struct.pack("!I", self._n & 0xFFFFFFFF)
        now = time.time_ns()
        body = b'{"ts":%d,"values":{"t":%d,"sent":%d}}' % (now // 1_000_000, self._n, now)
        d.transport.sendto(
            struct.pack("!BBH", _CON_POST, _POST, d.mid) + token + d.options + body,
            (HOST, self.port),
        )
        self.pending[token] = time.monotonic_ns()
        self.counters["sent"] += 1

    def answer(self, d: _Device, data: bytes, addr: tuple[Any, int]) -> None:
        if len(data) < 4:
            return
        first, code, mid = struct.unpack_from("!BBH", data)
        mtype, tkl = (first >> 4) & 3, first & 0xF
        if code == 0:  # an empty ACK: the answer comes later, separately
            return
        if mtype == 0 and d.transport is not None:  # a separate CON answer: acknowledge it
            d.transport.sendto(struct.pack("!BBH", 0x60, 0, mid), addr)
        sent = self.pending.pop(data[4 : 4 + tkl], None)
        if sent is None:
            self.counters["late_or_duplicate_answers"] += 1
            return
        self.counters[f"{code >> 5}.{code & 0x1F:02d}"] += 1
        if len(self.rtts) < 500_000:
            self.rtts.append(time.monotonic_ns() - sent)

    def expire(self) -> None:
        cutoff = time.monotonic_ns() - int(LOST_AFTER * 1e9)
        old = [t for t, sent in self.pending.items() if sent < cutoff]
        for t in old:
            del self.pending[t]
        self.counters["lost"] += len(old)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        next_t = loop.time()
        while True:
            next_t += self.TICK
            await asyncio.sleep(max(0.0, next_t - loop.time()))
            now = loop.time()
            if now - next_t > 1.0:
                next_t = now
            self.expire()
            if self.rate <= 0 or not self.devices:
                continue
            due = int((now - self._t0) * self.rate) - self._done
            cap = max(1, int(self.rate))
            if due > cap:
                self.counters["dropped_behind"] += due - cap
                self._done += due - cap
                due = cap
            n = len(self.devices)
            for _ in range(due):
                self.send(self.devices[self._next % n])
                self._next += 1
                self._done += 1


async def load_worker(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="udp_bench.py sim-worker load")
    p.add_argument("--tokens", type=Path, required=True)
    args = p.parse_args(argv)
    loop = asyncio.get_running_loop()
    load = Load()
    tokens: list[str] = json.loads(args.tokens.read_text())
    for t in tokens:
        d = _Device(load, _template(t))
        transport, _ = await loop.create_datagram_endpoint(lambda d=d: d, local_addr=(HOST, 0))  # type: ignore[misc]
        d.transport = transport
        load.devices.append(d)
    runner = asyncio.create_task(load.run())
    reader = asyncio.StreamReader(limit=2**20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    _emit({"type": "ready", "devices": len(load.devices)})
    try:
        while line := await reader.readline():
            cmd = json.loads(line)
            name = cmd.get("cmd")
            if name == "stop":
                break
            if name == "rate":
                load.set_rate(float(cmd["rate"]), int(cmd["port"]), loop.time())
                _emit({"type": "ok"})
            elif name == "stats":
                rtts, load.rtts = load.rtts, []
                _emit(
                    {
                        "type": "stats",
                        "counters": dict(load.counters),
                        "pending": len(load.pending),
                        "rtt": _summary_ms(rtts),
                    }
                )
            else:
                _emit({"type": "error", "error": f"unknown command {name!r}"})
    finally:
        runner.cancel()
        for d in load.devices:
            if d.transport is not None:
                d.transport.close()
    return 0


# -- the raw baseline (runs in the `sim-worker raw` process) -----------------------------------


async def raw_server(argv: list[str]) -> int:
    import aiocoap
    from aiocoap import resource
    from nats.aio.client import Client

    p = argparse.ArgumentParser(prog="udp_bench.py sim-worker raw")
    p.add_argument("--url", required=True)
    p.add_argument("--seed", required=True)
    p.add_argument("--inbox-prefix", required=True)
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args(argv)
    nc = Client()
    await nc.connect(
        servers=[args.url], nkeys_seed=args.seed, inbox_prefix=args.inbox_prefix, connect_timeout=10
    )
    if not nc.is_connected:
        raise RuntimeError("not connected to NATS")
    js = nc.jetstream()
    counter = itertools.count(1)
    prefix = f"raw-{os.getpid()}-"
    created = aiocoap.Message(code=aiocoap.CREATED)

    class Root(resource.Resource, resource.PathCapable):  # type: ignore[misc]
        async def render(self, request: aiocoap.Message) -> aiocoap.Message:
            await js.publish(
                RAW_SUBJECT,
                bytes(request.payload),
                headers={"Nats-Msg-Id": f"{prefix}{next(counter)}"},
            )
            return created

    ctx = await aiocoap.Context.create_server_context(
        Root(), bind=(HOST, args.port), transports=["udp6"]
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    _emit({"type": "ready", "port": args.port})
    try:
        await stop.wait()
    finally:
        await ctx.shutdown()
        await nc.close()
    return 0


def sim_worker(argv: list[str]) -> Coroutine[Any, Any, int]:
    if argv and argv[0] == "load":
        return load_worker(argv[1:])
    if argv and argv[0] == "raw":
        return raw_server(argv[1:])
    raise SystemExit("sim-worker: load or raw")


# -- the benchmark's side ------------------------------------------------------------------


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


class LoadProc:
    def __init__(self, child: Child) -> None:
        self.child = child

    @property
    def pid(self) -> int:
        return self.child.pid

    async def call(self, cmd: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
        stdin = self.child.proc.stdin
        assert stdin is not None
        stdin.write((json.dumps(cmd) + "\n").encode())
        await stdin.drain()
        return await _read_json(self.child, timeout)


_UDP_LINE = re.compile(r"udp=\('([^']+)', (\d+)\)")


@dataclass
class Target:
    name: str
    pid: int
    port: int


@contextlib.asynccontextmanager
async def gateway_process(
    work: Path, data_dir: Path, config: Any, extra_env: dict[str, str]
) -> AsyncIterator[Target]:
    """``twinhub gateway`` with only its simple devices' UDP endpoint (TCP on a free port, TLS
    and DTLS off), connected with the gateway role's NKey; stopped with SIGTERM. ``extra_env``:
    more ``TWINHUB_*`` settings."""
    env = (
        _clean_env()
        | bus_env(config)
        | {
            "TWINHUB_GATEWAY_ID": "gw-udp",
            "TWINHUB_GATEWAY_TCP": f"{HOST}:0",
            "TWINHUB_GATEWAY_TLS": "",
            "TWINHUB_GATEWAY_UDP": f"{HOST}:0",
            "TWINHUB_GATEWAY_DTLS": "",
        }
        | extra_env
    )
    argv = [_venv_bin("twinhub"), "--log-level", "WARNING", "gateway", "--data-dir", str(data_dir)]
    child = await Child.spawn("gateway", argv, work / "gateway.log", env=env)
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
            m = _UDP_LINE.search(line)
            if m:
                break
        say(f"gateway pid {child.pid} on coap://{m.group(1)}:{m.group(2)}")
        yield Target("twinhub_gateway", child.pid, int(m.group(2)))
    finally:
        await child.stop()


@contextlib.asynccontextmanager
async def raw_process(work: Path, endpoint: Any) -> AsyncIterator[Target]:
    port = _free_udp_port()
    argv = [sys.executable, str(SCRIPT), "sim-worker", "raw"]
    argv += ["--url", endpoint.url, "--seed", str(endpoint.seed_file)]
    argv += ["--inbox-prefix", endpoint.inbox_prefix, "--port", str(port)]
    child = await Child.spawn("raw-baseline", argv, work / "raw.log", env=_clean_env())
    try:
        msg = await _read_json(child, 60)
        if msg.get("type") != "ready":
            raise child.failure(f"unexpected first message {msg!r}")
        say(f"raw baseline pid {child.pid} on coap://{HOST}:{port}")
        yield Target("raw_baseline", child.pid, port)
    finally:
        await child.stop()


@contextlib.asynccontextmanager
async def load_process(work: Path, tokens: Sequence[str]) -> AsyncIterator[LoadProc]:
    path = work / "tokens.json"
    path.write_text(json.dumps(list(tokens)))
    argv = [sys.executable, str(SCRIPT), "sim-worker", "load"]
    argv += ["--tokens", str(path)]
    child = await Child.spawn("load", argv, work / "load.log", env=_clean_env(), stdin=True)
    proc = LoadProc(child)
    try:
        msg = await _read_json(child, 60)
        if msg.get("type") != "ready":
            raise child.failure(f"unexpected first message {msg!r}")
        say(f"load pid {child.pid}: {msg.get('devices')} devices")
        yield proc
    finally:
        with contextlib.suppress(OSError, RuntimeError):
            stdin = child.proc.stdin
            assert stdin is not None
            stdin.write(b'{"cmd": "stop"}\n')
            await stdin.drain()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(child.proc.wait(), 10)
        await child.stop(grace=5.0)


async def provision_tokens(store: Any, n: int) -> list[str]:
    """``n`` fresh tokens of devices ``udp-<i>`` of OWNER in the registry (admin role)."""
    from eventstore.adapters.jetstream import JetStreamEventStore
    from proto.devtokens import TokenRecord, encode_record, new_token, token_subject
    from proto.message import NatsMessage
    from twinhub_cli.services import TOKEN_LAYOUT

    tokens = [new_token() for _ in range(n)]
    now_ms = time.time_ns() // 1_000_000
    async with JetStreamEventStore(store.connection, TOKEN_LAYOUT) as registry:
        for start in range(0, n, 200):
            batch = [
                NatsMessage(
                    subject=token_subject(t),
                    msg_id=f"bench-token-{start + i}",
                    data=encode_record(
                        TokenRecord(owner=OWNER, device_id=f"udp-{start + i}", issued_at_ms=now_ms)
                    ),
                )
                for i, t in enumerate(tokens[start : start + 200])
            ]
            await registry.append(batch)
    return tokens


class _Values(msgspec.Struct):
    values: dict[str, Any] | None = None


_VALUES = msgspec.json.Decoder(_Values)


async def read_latencies(
    store: EventStore, after: int, upto: int, *, limit: int, timeout: float
) -> tuple[int, list[int]]:
    """(telemetry messages, their device→log latencies in ns) at positions (after, upto]."""
    count = 0
    lat: list[int] = []
    try:
        async with (
            asyncio.timeout(timeout),
            contextlib.aclosing(store.read(ALL_EVENTS, after=after, limit=limit)) as stored,
        ):
            async for m in stored:
                if m.position > upto:
                    break
                try:
                    values = _VALUES.decode(m.message.data).values
                except msgspec.DecodeError:
                    continue
                sent = values.get("sent") if values else None
                if isinstance(sent, int):
                    count += 1
                    lat.append(m.time_ns - sent)
    except TimeoutError:
        say(f"  reading the window's messages took over {timeout:.0f} s: partial count")
    return count, lat


def _delta(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {
        k: b.get(k, 0) - a.get(k, 0) for k in sorted(set(a) | set(b)) if b.get(k, 0) - a.get(k, 0)
    }


async def measure(
    args: argparse.Namespace,
    store: EventStore,
    load: LoadProc,
    target: Target,
    rate: float,
    nats_pid: int,
) -> dict[str, Any]:
    await load.call({"cmd": "rate", "rate": rate, "port": target.port})
    await asyncio.sleep(args.warmup)
    meter = benchutil.CpuMeter(
        {"system": [target.pid], "nats": [nats_pid], "load": [load.pid], "bench": [os.getpid()]}
    )
    s0 = await load.call({"cmd": "stats"})
    pos0 = await store.last_position()
    c0 = meter.sample()
    await asyncio.sleep(args.duration)
    c1 = meter.sample()
    pos1 = await store.last_position()
    s1 = await load.call({"cmd": "stats"})
    await load.call({"cmd": "rate", "rate": 0.0, "port": target.port})
    wall = c1.wall - c0.wall
    # drain: every request answered or counted lost
    deadline = time.monotonic() + args.drain_timeout
    while True:
        st = await load.call({"cmd": "stats"})
        if st["pending"] == 0 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    logged, lat = await read_latencies(
        store, pos0, pos1, limit=args.latency_sample_limit, timeout=120
    )
    cpu = meter.usage(c0, c1)
    counters = _delta(s0["counters"], s1["counters"])
    sent = counters.get("sent", 0)
    lost = _delta(s0["counters"], st["counters"]).get("lost", 0)
    logged_rate = logged / wall
    if sent == 0:
        raise RuntimeError(f"the load sent nothing to {target.name}: see {load.child.log_path}")

    def per_msg_us(pct: float) -> float | None:
        return round(pct / 100 * wall / logged * 1e6, 1) if logged else None

    row: dict[str, Any] = {
        "system": target.name,
        "offered_per_s": rate,
        "window_s": round(wall, 2),
        "sent_per_s": round(sent / wall, 1),
        "logged_per_s": round(logged_rate, 1),
        "answers_in_window": {k: v for k, v in counters.items() if k != "sent"},
        "lost_of_window_and_drain": lost,
        "log_positions_in_window": pos1 - pos0,
        "device_to_log": benchutil.summarize_ms(lat),
        "request_to_answer": s1["rtt"],
        "cpu_pct_of_one_core": cpu,
        "cpu_us_per_logged_message": {
            "system": per_msg_us(cpu["system"]),
            "nats": per_msg_us(cpu["nats"]),
        },
    }
    row["sustained"] = bool(
        logged_rate >= SUSTAINED_LOGGED * rate and lost <= SUSTAINED_LOST * max(sent, 1)
    )
    d = row["device_to_log"]
    say(
        f"  {target.name} @ {rate:g}/s: logged {row['logged_per_s']}/s, "
        f"p50 {d.get('p50_ms')} ms p99 {d.get('p99_ms')} ms, CPU {cpu['system']} % "
        f"({row['cpu_us_per_logged_message']['system']} µs/msg), nats {cpu['nats']} %, "
        f"lost {lost}, others {cpu['others_pct_of_one_core']} %"
        + ("" if row["sustained"] else "  NOT SUSTAINED")
    )
    # let the log settle before the next window (nothing in flight, no stragglers)
    await asyncio.sleep(1.0)
    return row


def ratios(rows: list[dict[str, Any]]) -> dict[str, Any]:
    by: dict[str, dict[float, dict[str, Any]]] = {}
    for r in rows:
        by.setdefault(r["system"], {})[r["offered_per_s"]] = r

    def best(system: str) -> float:
        ok = [r["logged_per_s"] for r in by.get(system, {}).values() if r["sustained"]]
        return max(ok, default=0.0)

    def peak(system: str) -> float:
        return max((r["logged_per_s"] for r in by.get(system, {}).values()), default=0.0)

    gw, raw = "twinhub_gateway", "raw_baseline"
    out: dict[str, Any] = {
        "highest_sustained_per_s": {gw: best(gw), raw: best(raw)},
        "highest_logged_per_s": {gw: peak(gw), raw: peak(raw)},
        "sustained_rate_twinhub_over_baseline": round(best(gw) / best(raw), 3)
        if best(raw)
        else None,
        "logged_rate_twinhub_over_baseline_at_peak": round(peak(gw) / peak(raw), 3)
        if peak(raw)
        else None,
    }
    cpu: dict[str, Any] = {}
    for rate, a in sorted(by.get(gw, {}).items()):
        b = by.get(raw, {}).get(rate)
        if b is None:
            continue
        x = a["cpu_us_per_logged_message"]["system"]
        y = b["cpu_us_per_logged_message"]["system"]
        if x and y:
            cpu[f"{rate:g}"] = {
                "twinhub_us": x,
                "baseline_us": y,
                "ratio": round(x / y, 2),
                "both_sustained": a["sustained"] and b["sustained"],
            }
    out["cpu_per_message_twinhub_over_baseline"] = cpu
    return out


async def run_bench(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from twinhub_cli import services
    from twinhub_cli.busconfig import nats_endpoint
    from twinhub_cli.datadir import DataDir
    from twinhub_cli.devservices import NatsServer

    cancel_on_signals()
    nofile = benchutil.raise_nofile_limit()
    background = await benchutil.machine_busy_pct(1.0)
    result: dict[str, Any] = benchutil.result_header("udp")
    async with contextlib.AsyncExitStack() as stack:
        nats = await stack.enter_async_context(NatsServer(work / "nats"))
        assert nats.pid is not None
        result["machine"] = benchutil.machine(
            {
                "nats_server": benchutil.binary_version(nats.binary),
                "nofile_limit": list(nofile),
                "busy_pct_before_start": round(background, 1),
            }
        )
        result["code"] = code_info()
        config = benchutil.nats_config(nats)
        data = DataDir(work / "data")
        # the twin role provisions the streams (events, leases, tokens), as `twinhub twin` does
        async with services.event_store(config, data, "twin"):
            pass
        store = await stack.enter_async_context(services.event_store(config, data, "admin"))
        tokens = await provision_tokens(store, args.devices)
        say(f"{len(tokens)} device tokens in the registry")
        gateway = await stack.enter_async_context(
            gateway_process(work, work / "data", config, args.gateway_env)
        )
        raw = await stack.enter_async_context(
            raw_process(work, nats_endpoint(config, data, "gateway"))
        )
        load = await stack.enter_async_context(load_process(work, tokens))
        result["settings"] = {
            "devices": args.devices,
            "rates": args.rates,
            "warmup_s": args.warmup,
            "duration_s": args.duration,
            "transport": "CoAP over UDP (RFC 7252), CON POST /api/v1/<token>/telemetry, JSON",
            "bus": "authenticated NATS: gateway and baseline by the gateway role's NKey",
            "baseline": "aiocoap UDP server + one acknowledged JetStream publish per request",
            "lost_after_s": LOST_AFTER,
            "gateway_env": args.gateway_env,
            "sustained": (
                f">= {SUSTAINED_LOGGED:.0%} of offered logged, < {SUSTAINED_LOST:.0%} lost"
            ),
        }
        rows: list[dict[str, Any]] = []
        for rate in args.rates:
            say(f"rate {rate:g}/s")
            for target in (gateway, raw):
                rows.append(await measure(args, store, load, target, rate, nats.pid))
        result["windows"] = rows
        result["ratios"] = ratios(rows)
        say(f"ratios: {json.dumps(result['ratios'])}")
    return result


FULL: dict[str, Any] = {
    "devices": 1000,
    "rates": [500.0, 1000.0, 2000.0, 4000.0],
    "duration": 20.0,
    "warmup": 5.0,
}
QUICK: dict[str, Any] = {"devices": 20, "rates": [100.0, 200.0], "duration": 2.0, "warmup": 1.0}
GATEWAY_REQUEST_RATE = 20.0  # gateway.request_rate's default: requests/s per token


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--devices", type=int, help="simulated devices, one token each (1000)")
    p.add_argument(
        "--rates",
        type=lambda s: [float(x) for x in s.split(",") if x.strip()],
        help="offered total messages/s, comma-separated (500,1000,2000,4000)",
    )
    p.add_argument("--duration", type=float, help="measured seconds per rate and system (20)")
    p.add_argument("--warmup", type=float, help="seconds at each rate before measuring (5)")
    p.add_argument("--quick", action="store_true", help="smoke test: 20 devices, 2 s windows")
    p.add_argument("--drain-timeout", type=float, default=30.0, help="seconds (30)")
    p.add_argument(
        "--latency-sample-limit",
        type=int,
        default=500_000,
        help="log messages read back per window (500000)",
    )
    p.add_argument(
        "--gateway-env",
        action="append",
        default=[],
        metavar="TWINHUB_X=VALUE",
        help="a setting of the gateway process (repeatable), e.g. TWINHUB_GATEWAY_REQUEST_RATE=0",
    )
    p.add_argument("--output", type=Path, metavar="FILE", help="also write the JSON to FILE")
    p.add_argument("--keep-work-dir", action="store_true", help="keep the temp dir (logs)")
    args = p.parse_args(argv)
    env: dict[str, str] = {}
    for item in args.gateway_env:
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("TWINHUB_"):
            p.error(f"--gateway-env {item!r}: expected TWINHUB_NAME=VALUE")
        env[key] = value
    args.gateway_env = env
    base = QUICK if args.quick else FULL
    for key, value in base.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.devices < 1 or args.duration <= 0 or args.warmup < 0:
        p.error("--devices must be >= 1, --duration > 0, --warmup >= 0")
    if any(r <= 0 for r in args.rates):
        p.error("rates must be > 0")
    try:
        limit = float(env.get("TWINHUB_GATEWAY_REQUEST_RATE", GATEWAY_REQUEST_RATE))
    except ValueError:
        p.error("TWINHUB_GATEWAY_REQUEST_RATE: not a number")
    if limit > 0 and max(args.rates) / args.devices > limit * 0.8:
        p.error(
            f"{max(args.rates):g}/s over {args.devices} devices is near the gateway's per-token "
            f"rate limit ({limit:g}/s): use more devices"
        )
    return args


def main() -> int:
    return run_main("twinhub-udp-", parse_args, run_bench, say, sim_worker)


if __name__ == "__main__":
    sys.exit(main())

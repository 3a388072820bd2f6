"""The fault suite: components killed with ``kill -9`` under load, checked against the log and
the devices' own record of what they sent (issue 11).

    .venv/bin/python bench/faults.py [--devices 200] [--rate 2] [--phase-seconds 30]
        [--experiments baseline,kill-twin,kill-nats,kill-mongo,kill-gateway,gateway-lease]
        [--lease S] [--quick] [--output FILE] [--keep-work-dir]

Everything runs on this machine, on loopback, in a temporary directory removed on exit, as
users run it (the way :mod:`e2e_bench` runs it, whose process helpers this script reuses):
``nats-server`` (authenticated: services by NKey) and the MongoDB-wire server (FerretDB) from
:mod:`twinhub_cli.devservices`, ``twinhub gateway`` (TLS) and ``twinhub twin run``
(projector, command API, sweeper, gateway reaper) as processes of their own, the simulated
devices in ``sim-worker`` processes of this script, the auth callout and the command client
(:class:`twinhub_client.TwinhubClient`, an application token, prefix ``twinhub.api.v1``) in
this process; its own reads of the log use the admin role.

Experiments (``--experiments``, in that order):

* ``baseline``: the fleet's first connect wave and sync, no fault.
* ``kill-twin``, ``kill-nats``, ``kill-mongo``, ``kill-gateway``: ``--devices`` devices change
  their lights at ``--rate`` changes/s each (``--resources`` lights each) for
  ``--phase-seconds``; a third of the way in the component gets ``SIGKILL``, is started again
  after ``--pause`` seconds (same port, same data; the gateway with the same id) and the load
  goes on; devices reconnect by themselves. During ``kill-twin`` and ``kill-gateway`` the
  client also issues ``update`` commands (``--command-rate``/s, each with a unique ``power``
  and correlation id, ``--command-ttl``); a request that fails as unavailable (the twin is
  down, no answer) is sent again with the same correlation id, as a client in doubt does, and
  after the outcomes every ``--late-retry-every``-th command is sent once more (a client whose
  reply was lost).
* ``gateway-lease``: the gateway killed and left down for the lease (``gateway.lease``,
  ``--lease``) plus 7 s: its devices must be offline in the twin within the lease plus 5 s.

Each experiment ends with the load stopped; then it waits (with deadlines) for every device to
be signed in again, the log to be quiet, the commands to end and the twins to catch up with the
log, takes the devices' record and checks (see :mod:`faultchecks` for the precise
definitions): ``recovered``, ``acknowledged_lost``, ``duplicates_applied``, ``order``,
``converged``, ``live_subscription`` (one subscription of the client, opened before the
first experiment and read as ``twinhub watch`` reads it, ``next(timeout)`` in a loop, with a
short ``--watch-timeout`` so that timeouts cut it short at many await points),
``offline_marking`` (gateway experiments) and ``commands`` (command experiments). Values and
events are attributed to the experiment in whose window they were sent or logged;
convergence is the state at the check.

The devices' record: each ``sim-worker`` wraps the simulator's ``DeviceModel`` so that every
value a device renders into a response or notification is recorded with the connection it goes
out on (numbered per device) and the time, every connection's start and end (its
``wait_closed``), and every update a device applies (by ``power``); ``dump`` writes that to a
file.

Prints one JSON document (machine, settings, definitions, per experiment the fault, its timing
and the checks, a summary); exits 1 when a check is violated (``summary.failed``).
``--quick`` (CI, ``tests/test_benches.py``): 50 devices, 1 change/s each, 8 s phases, a 5 s
lease.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import itertools
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import benchutil
import e2e_bench as e2e
import faultchecks as fc
import msgspec

SCRIPT = Path(__file__).resolve()
OWNER = "faults"
GATEWAY_ID = "gw-faults"
HREF = "/light/1"
APP_TOKEN_TTL = 24 * 3600.0
EXPERIMENTS = ("baseline", "kill-twin", "kill-nats", "kill-mongo", "kill-gateway", "gateway-lease")
COMMAND_EXPERIMENTS = frozenset({"kill-twin", "kill-gateway"})
# The configuration option of the gateway lease (twinhub_cli.config): section, key.
LEASE_OPTION = ("gateway", "lease")
# Offline marking must happen within the lease plus this (issue 11, deliverable 3).
LEASE_SLACK_S = 5.0
# The twin's grace for an answer to a command already sent (twin.model.SENT_GRACE).
SENT_GRACE_S = 30.0


def say(text: str) -> None:
    sys.stderr.write(f"[faults {time.strftime('%H:%M:%S')}] {text}\n")
    sys.stderr.flush()


# -- the sim-worker: devices that record what they sent ---------------------------------------


class Recorder:
    """What the devices of this process wrote on their connections (see the module docstring)."""

    def __init__(self) -> None:
        self.devices: dict[str, Any] = {}  # device id -> SimDevice
        # device -> href -> seq -> connection number -> first write (epoch ns)
        self.sent: dict[str, dict[str, dict[int, dict[int, int]]]] = {}
        # device -> connection number -> [start, end | None] (epoch ns)
        self.conns: dict[str, dict[int, list[int | None]]] = {}
        self.applied: dict[int, int] = {}  # power -> times applied
        self._waits: set[asyncio.Future[Any]] = set()
        self._representation: Callable[..., dict[str, Any]] | None = None

    def install(self) -> None:
        """Wrap ``DeviceModel.representation`` (what the resources render, the only way a
        value reaches a response or notification) and ``DeviceModel.apply_update``."""
        from devicesim.resources import DeviceModel

        representation = DeviceModel.representation
        apply_update = DeviceModel.apply_update
        self._representation = representation

        def recording_representation(
            model: DeviceModel, href: str, *, baseline: bool = False
        ) -> dict[str, Any]:
            rep = representation(model, href, baseline=baseline)
            if href in model.user_hrefs:
                self.rendered(model.device_id, href, rep)
            return rep

        def recording_apply(
            model: DeviceModel, href: str, payload: Any, now_ns: int
        ) -> dict[str, Any]:
            rep = apply_update(model, href, payload, now_ns)
            power = payload.get("power") if isinstance(payload, dict) else None
            if isinstance(power, int):
                self.applied[power] = self.applied.get(power, 0) + 1
            return rep

        DeviceModel.representation = recording_representation  # type: ignore[method-assign,assignment]
        DeviceModel.apply_update = recording_apply  # type: ignore[method-assign,assignment]

    def connection(self, dev: Any) -> int | None:
        """The number of the device's current connection (registered on first sight, its end
        stamped when it closes); ``None`` without one."""
        conn = dev.connection
        if conn is None:
            return None
        number: int = dev.stats.connects  # bumped right after the connection is set
        conns = self.conns.setdefault(dev.device_id, {})
        if number not in conns:
            entry: list[int | None] = [time.time_ns(), None]
            conns[number] = entry
            fut = asyncio.ensure_future(conn.wait_closed())
            self._waits.add(fut)
            fut.add_done_callback(functools.partial(self._closed, entry))
        return number

    def _closed(self, entry: list[int | None], fut: asyncio.Future[Any]) -> None:
        self._waits.discard(fut)
        if not fut.cancelled():
            entry[1] = time.time_ns()

    def rendered(self, device: str, href: str, rep: dict[str, Any]) -> None:
        dev = self.devices.get(device)
        number = None if dev is None else self.connection(dev)
        seq = rep.get("seq")
        if number is None or not isinstance(seq, int):
            return
        writes = self.sent.setdefault(device, {}).setdefault(href, {}).setdefault(seq, {})
        writes.setdefault(number, time.time_ns())

    async def watch(self) -> None:
        """Notice new connections even before they carry a value (their start and end)."""
        while True:
            for dev in self.devices.values():
                self.connection(dev)
            await asyncio.sleep(0.1)

    def dump(self, path: Path) -> None:
        from devicesim.device import DeviceState

        assert self._representation is not None
        devices: dict[str, Any] = {}
        for device, dev in self.devices.items():
            conn = dev.connection
            online = None
            if dev.state is DeviceState.ONLINE and conn is not None and conn.is_open:
                online = self.connection(dev)
            devices[device] = {
                "sent": {
                    href: {str(seq): list(w.items()) for seq, w in by_seq.items()}
                    for href, by_seq in self.sent.get(device, {}).items()
                },
                "conns": [[n, s, e] for n, (s, e) in self.conns.get(device, {}).items()],
                "online": online,
                "final": {
                    h: self._representation(dev.model, h)["seq"] for h in dev.model.user_hrefs
                },
            }
        doc = {"recorded_ns": time.time_ns(), "applied": self.applied, "devices": devices}
        path.write_bytes(msgspec.json.encode(doc))


async def sim_worker(args: argparse.Namespace) -> int:
    import logging

    from devicesim.backoff import BackoffPolicy
    from devicesim.config import TlsOptions
    from devicesim.fleet import run_fleet

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    logging.getLogger("devicesim").setLevel(logging.ERROR)
    recorder = Recorder()
    recorder.install()
    driver = e2e._Driver()
    stop = asyncio.Event()

    def started(fleet: Sequence[Any]) -> None:
        driver.fleet = list(fleet)
        recorder.devices = {d.device_id: d for d in fleet}
        e2e._emit({"type": "ready", "devices": len(fleet)})

    fleet_task = asyncio.create_task(
        run_fleet(
            args.gateway,
            devices=args.devices,
            resources=args.resources,
            rate=0.0,
            tls=TlsOptions(ca_file=args.ca, server_name=e2e.GATEWAY_HOST),
            token=args.token,
            device_prefix=args.prefix,
            connect_concurrency=args.connect_concurrency,
            # devices come back by themselves, quickly: the suite waits for them
            backoff=BackoffPolicy(initial=0.2, maximum=2.0),
            stop=stop,
            handle_signals=True,
            on_started=started,
        ),
        name="fleet",
    )
    tasks = [
        asyncio.create_task(driver.run(), name="driver"),
        asyncio.create_task(recorder.watch(), name="connections"),
    ]

    def dump(cmd: dict[str, Any]) -> None:
        recorder.dump(Path(cmd["path"]))
        e2e._emit({"type": "dumped", "path": cmd["path"]})

    try:
        await e2e.serve_worker_commands(fleet_task, driver, {"dump": dump})
    finally:
        for t in tasks:
            t.cancel()
        stop.set()
    summary = await asyncio.wait_for(fleet_task, 80)
    e2e._emit({"type": "summary", **summary.to_dict()})
    return 0


# -- the processes under test, killable ---------------------------------------------------------


class Restartable:
    """A process of the system under test: started (returns the seconds until it was ready),
    killed with SIGKILL, started again; ``opener`` makes the context manager of one run."""

    def __init__(
        self,
        name: str,
        opener: Callable[[], contextlib.AbstractAsyncContextManager[Any]],
        pid_of: Callable[[Any], int],
    ) -> None:
        self.name = name
        self._opener = opener
        self._pid_of = pid_of
        self._stack: contextlib.AsyncExitStack | None = None
        self.value: Any = None

    @property
    def pid(self) -> int:
        return self._pid_of(self.value)

    async def start(self) -> float:
        t0 = time.monotonic()
        stack = contextlib.AsyncExitStack()
        self.value = await stack.enter_async_context(self._opener())
        self._stack = stack
        return time.monotonic() - t0

    async def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        say(f"killed {self.name} (pid {self.pid}) with SIGKILL")
        await self.stop()

    async def stop(self) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.aclose()


class ServerProc(Restartable):
    """A development server (:mod:`twinhub_cli.devservices`): same port and data on restart."""

    def __init__(self, server: Any) -> None:
        self.server = server

        @contextlib.asynccontextmanager
        async def run() -> AsyncIterator[Any]:
            await server.start()
            pid = server.pid
            e2e._CHILDREN[pid] = server.name
            try:
                yield server
            finally:
                await server.stop()
                e2e._CHILDREN.pop(pid, None)

        super().__init__(server.name, run, lambda s: int(s.pid))


@contextlib.asynccontextmanager
async def twin_process(
    work: Path, data_dir: Path, config: Any, extra_env: dict[str, str]
) -> AsyncIterator[e2e.Child]:
    """``twinhub twin run`` (projector, command API, sweeper, reaper) as the twin role."""
    env = (
        e2e._clean_env() | e2e.bus_env(config) | {"TWINHUB_MONGO_URL": config.mongo.url} | extra_env
    )
    argv = [e2e._venv_bin("twinhub"), "--log-level", "WARNING", "twin", "run"]
    argv += ["--data-dir", str(data_dir)]
    child = await e2e.Child.spawn("twin", argv, work / "twin.log", env=env)
    try:
        deadline = time.monotonic() + 60
        while b"command API on" not in (line := await child.readline(60)):
            if not line or time.monotonic() > deadline:
                raise child.failure("did not start")
        yield child
    finally:
        await child.stop(grace=20.0)


# -- the log as the checks see it ----------------------------------------------------------------


class LogMirror:
    """The event log read incrementally into a :class:`faultchecks.LogView`."""

    def __init__(self, store: Any, hrefs: Sequence[str]) -> None:
        self.store = store
        self.view = fc.LogView(hrefs)
        self._lock = asyncio.Lock()

    async def refresh(self, timeout: float = 60.0) -> bool:
        """Read what is new; ``False`` when the log could not be read (it is down)."""
        from eventstore.errors import EventStoreError
        from eventstore.ports import ALL_EVENTS
        from proto import binding

        async with self._lock:
            try:
                async with (
                    asyncio.timeout(timeout),
                    contextlib.aclosing(
                        self.store.read(ALL_EVENTS, after=self.view.position)
                    ) as rd,
                ):
                    async for m in rd:
                        self.view.add(binding.from_stored(m), m.time_ns)
            except (EventStoreError, TimeoutError, OSError) as e:
                say(f"  reading the log: {type(e).__name__}: {e}")
                return False
            return True

    async def end(self) -> int | None:
        from eventstore.errors import EventStoreError

        try:
            async with asyncio.timeout(10):
                return int(await self.store.last_position())
        except (EventStoreError, TimeoutError, OSError):
            return None


# -- commands -----------------------------------------------------------------------------------


@dataclass
class _Command:
    cid: str
    device: str
    power: int
    accepted_position: int | None = None
    attempts: int = 0
    error: str = ""
    retry: str = ""


class CommandLoad:
    """Updates issued at ``rate``/s round-robin over the devices while the experiment runs."""

    def __init__(
        self,
        client: Any,
        devices: Sequence[str],
        *,
        name: str,
        rate: float,
        ttl: float,
        powers: itertools.count[int],
        late_retry_every: int,
    ) -> None:
        self.client = client
        self.devices = devices
        self.name = name
        self.rate = rate
        self.ttl = ttl
        self.powers = powers
        self.late_retry_every = late_retry_every
        self.commands: dict[str, _Command] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._issuer: asyncio.Task[None] | None = None
        self.last_activity = time.monotonic()

    def start(self) -> None:
        if self.rate > 0:
            self._issuer = asyncio.create_task(self._issue(), name=f"commands {self.name}")

    async def _issue(self) -> None:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        for k in itertools.count():
            await asyncio.sleep(max(0.0, t0 + k / self.rate - loop.time()))
            cmd = _Command(
                f"{self.name}-{k}", self.devices[k % len(self.devices)], next(self.powers)
            )
            self.commands[cmd.cid] = cmd
            task = asyncio.create_task(self._send(cmd), name=f"command {cmd.cid}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _request(self, cmd: _Command) -> Any:
        return await self.client.update(
            cmd.device, HREF, {"power": cmd.power}, ttl=self.ttl, correlation_id=cmd.cid
        )

    async def _send(self, cmd: _Command) -> None:
        from twinhub_client.errors import ServiceUnavailableError, TwinhubError

        deadline = time.monotonic() + self.ttl
        while True:
            cmd.attempts += 1
            try:
                accepted = await self._request(cmd)
            except ServiceUnavailableError as e:  # in doubt: the same request again
                cmd.error = f"{type(e).__name__}: {e}"
                if time.monotonic() > deadline:
                    return
                await asyncio.sleep(0.5)
                continue
            except TwinhubError as e:  # answered: not retried
                cmd.error = f"{type(e).__name__}: {e}"
                return
            finally:
                self.last_activity = time.monotonic()
            cmd.accepted_position = accepted.position
            cmd.error = ""
            return

    async def stop_issuing(self) -> None:
        if self._issuer is not None:
            self._issuer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._issuer
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=self.ttl + 30)

    def _settled(self, view: fc.LogView) -> bool:
        for c in self.commands.values():
            entry = view.commands.get(c.cid)
            if entry is None:
                if c.accepted_position is not None:
                    return False
            elif entry.open or not entry.terminal:
                return False
        return True

    async def wait_settled(self, mirror: LogMirror, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            await mirror.refresh()
            if self._settled(mirror.view):
                return True
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.5)

    async def late_retries(self) -> int:
        """Send every ``late_retry_every``-th accepted command again, same correlation id."""
        from twinhub_client.errors import ConflictError, TwinhubError

        chosen = [
            c
            for i, c in enumerate(self.commands.values())
            if self.late_retry_every > 0
            and i % self.late_retry_every == 0
            and c.accepted_position is not None
        ]

        async def one(c: _Command) -> None:
            try:
                accepted = await self._request(c)
            except ConflictError:
                c.retry = "conflict"
            except TwinhubError as e:
                c.retry = f"error {type(e).__name__}"
            else:
                same = accepted.position == c.accepted_position
                c.retry = "same-position" if same else "new-position"

        await asyncio.gather(*(one(c) for c in chosen))
        return len(chosen)

    def issued(self) -> list[fc.IssuedCommand]:
        return [
            fc.IssuedCommand(
                cid=c.cid,
                device=c.device,
                power=c.power,
                accepted_position=c.accepted_position,
                attempts=c.attempts,
                retry=c.retry,
            )
            for c in self.commands.values()
        ]

    def errors(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for c in self.commands.values():
            if c.error:
                kind = c.error.split(":", 1)[0]
                out[kind] = out.get(kind, 0) + 1
        return out


# -- offline marking ------------------------------------------------------------------------------


class OfflineWatch:
    """After a gateway kill: when the log closes each connection it held, and when the twin
    stops showing the device online on it."""

    def __init__(
        self, mirror: LogMirror, twins: Any, held: dict[str, str], killed_ns: int, until_s: float
    ) -> None:
        self.mirror = mirror
        self.twins = twins
        self.held = held
        self.killed_ns = killed_ns
        self.until = time.monotonic() + until_s
        self.twin_ns: dict[str, int] = {}
        self.task = asyncio.create_task(self._run(), name="offline-watch")

    async def _run(self) -> None:
        from twin.errors import TwinError

        while time.monotonic() < self.until:
            await self.mirror.refresh(timeout=5)
            try:
                twins = await self.twins.get_many(list(self.held))
            except (TwinError, OSError, TimeoutError):
                twins = {}
            now = time.time_ns()
            for device, conn in self.held.items():
                t = twins.get(device)
                if device in self.twin_ns or t is None:
                    continue
                if not (t.connection.online and t.connection.connection_id == conn):
                    self.twin_ns[device] = now
            logged = all((d, c) in self.mirror.view.offline_ns for d, c in self.held.items())
            if logged and len(self.twin_ns) == len(self.held):
                return
            await asyncio.sleep(0.2)


# -- a live subscription ------------------------------------------------------------------------


class LiveWatch:
    """The owner's events through :meth:`TwinhubClient.subscribe`, read as ``twinhub watch``
    reads them (``next(timeout)``); reopened after its last position if it raises."""

    def __init__(self, client: Any, from_position: int, timeout: float) -> None:
        self.client = client
        self.timeout = timeout
        self.position = from_position
        self.delivered: list[int] = []
        self.errors: list[str] = []
        self.task = asyncio.create_task(self._run(), name="live-subscription")

    async def _run(self) -> None:
        while True:
            try:
                async with self.client.subscribe(OWNER, from_position=self.position) as sub:
                    while True:
                        event = await sub.next(timeout=self.timeout)
                        if event is not None:
                            self.delivered.append(event.position)
                            self.position = max(self.position, event.position)
            except Exception as e:
                self.errors.append(f"{type(e).__name__}: {e}")
                say(f"  live subscription: {self.errors[-1]}; reopening")
                await asyncio.sleep(0.5)

    async def caught_up(self, position: int, timeout: float) -> float | None:
        t0 = time.monotonic()
        while self.position < position:
            if time.monotonic() - t0 > timeout:
                return None
            await asyncio.sleep(0.1)
        return time.monotonic() - t0

    async def close(self) -> None:
        self.task.cancel()
        await asyncio.wait([self.task], timeout=10)


# -- the rig and the experiments -------------------------------------------------------------------


@dataclass
class Rig:
    args: argparse.Namespace
    work: Path
    store: Any  # the admin role's event store
    twins: Any  # a reader of the twin store
    mirror: LogMirror
    fleet: e2e.SimFleet
    client: Any
    devices: list[str]
    services: dict[str, Restartable]
    lease_s: float
    lease_reason: str | None
    live: LiveWatch
    outages: list[fc.Outage] = field(default_factory=list)
    powers: itertools.count[int] = field(default_factory=lambda: itertools.count(1000))
    dumps: int = 0

    @property
    def total_rate(self) -> float:
        return float(self.args.devices * self.args.rate)


async def wait_online(rig: Rig, timeout: float) -> tuple[int, float]:
    """(devices signed in, seconds waited) once all are or ``timeout`` passed."""
    t0 = time.monotonic()
    while True:
        st = await rig.fleet.stats()
        if st.signed_in >= rig.fleet.devices or time.monotonic() - t0 > timeout:
            return st.signed_in, time.monotonic() - t0
        await asyncio.sleep(0.25)


async def wait_quiet(rig: Rig, stable: float, timeout: float) -> float:
    """Wait until the log's end stays put ``stable`` seconds; the seconds waited."""
    t0 = time.monotonic()
    last = await rig.mirror.end()
    since = time.monotonic()
    while time.monotonic() - t0 < timeout:
        await asyncio.sleep(0.25)
        now = await rig.mirror.end()
        if now is None or now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= stable:
            break
    return time.monotonic() - t0


async def dump(rig: Rig) -> tuple[list[fc.DeviceRecord], dict[int, int], int]:
    """Every simulator's record: the devices', the updates applied, when it was taken."""
    records: list[fc.DeviceRecord] = []
    applied: dict[int, int] = {}
    recorded = 0
    for proc in rig.fleet.procs:
        rig.dumps += 1
        path = rig.work / f"record-{rig.dumps}.json"
        await proc.call({"cmd": "dump", "path": str(path)}, timeout=60)
        doc = json.loads(path.read_bytes())
        path.unlink()
        recorded = max(recorded, int(doc["recorded_ns"]))
        for power, n in doc["applied"].items():
            applied[int(power)] = applied.get(int(power), 0) + int(n)
        records += [fc.DeviceRecord.from_json(d, r) for d, r in doc["devices"].items()]
    return records, applied, recorded


async def caught_up_twins(rig: Rig, timeout: float) -> tuple[dict[str, Any], float | None]:
    """The stored twins once each reflects its device's last logged event (``None`` s: not
    within ``timeout``; the twins as they were then)."""
    from twin.errors import TwinError

    t0 = time.monotonic()
    twins: dict[str, Any] = {}
    while True:
        await rig.mirror.refresh()
        folded = rig.mirror.view.folded
        try:
            twins = await rig.twins.get_many(rig.devices)
        except (TwinError, OSError, TimeoutError) as e:
            say(f"  reading twins: {type(e).__name__}: {e}")
        if all(
            d in twins and d in folded and twins[d].position >= folded[d].position
            for d in rig.devices
        ):
            await rig.mirror.refresh()  # the projector may have appended meanwhile
            if all(twins[d].position >= rig.mirror.view.folded[d].position for d in rig.devices):
                return twins, time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            return twins, None
        await asyncio.sleep(0.5)


@dataclass
class Window:
    t0_ns: int
    pos0: int


async def open_window(rig: Rig) -> Window:
    await rig.mirror.refresh()
    return Window(time.time_ns(), rig.mirror.view.position)


async def check_experiment(
    rig: Rig,
    window: Window,
    *,
    load: CommandLoad | None = None,
    watch: OfflineWatch | None = None,
    held: dict[str, str] | None = None,
    killed_ns: int = 0,
    twin_required: bool = False,
) -> dict[str, Any]:
    args = rig.args
    timing: dict[str, Any] = {}
    online, took = await wait_online(rig, args.recover_timeout)
    timing["all_online_s"] = round(took, 2)
    timing["quiet_s"] = round(await wait_quiet(rig, args.ack_window, 60), 2)
    commands_settled: bool | None = None
    late = 0
    if load is not None:
        wait = max(5.0, load.last_activity + load.ttl + SENT_GRACE_S + 5 - time.monotonic())
        t0 = time.monotonic()
        commands_settled = await load.wait_settled(rig.mirror, wait)
        late = await load.late_retries()
        if late:
            again = await load.wait_settled(rig.mirror, min(load.ttl + 5, args.late_retry_wait))
            commands_settled = commands_settled and again
        timing["commands_settled_s"] = round(time.monotonic() - t0, 2)
        timing["quiet_after_commands_s"] = round(await wait_quiet(rig, args.ack_window, 60), 2)
    if watch is not None:
        await watch.task
    records, applied, recorded_ns = await dump(rig)
    twins, caught = await caught_up_twins(rig, args.catch_up_timeout)
    timing["twins_caught_up_s"] = None if caught is None else round(caught, 2)
    view = rig.mirror.view
    positions = (window.pos0, view.position)
    live_s = await rig.live.caught_up(view.position, args.catch_up_timeout)
    timing["live_subscription_caught_up_s"] = None if live_s is None else round(live_s, 2)
    checks: dict[str, Any] = {
        "recovered": fc.check(
            len(rig.devices) - online, devices=len(rig.devices), signed_in=online
        ),
        "acknowledged_lost": fc.lost_values(
            records,
            view,
            window=(window.t0_ns, recorded_ns),
            ack_window_ns=int(args.ack_window * 1e9),
            outages=rig.outages,
            recorded_ns=recorded_ns,
        ),
        "duplicates_applied": fc.duplicates(view, positions, twins),
        "order": fc.order_violations(view, positions),
        "converged": fc.convergence(view, twins, records) | {"twins_caught_up": caught is not None},
    }
    checks["live_subscription"] = fc.live_subscription(
        rig.live.delivered, view, positions, rig.live.errors
    ) | {"caught_up": live_s is not None}
    if live_s is None:
        checks["live_subscription"]["ok"] = False
        checks["live_subscription"]["violations"] = max(
            1, checks["live_subscription"]["violations"]
        )
    if caught is None:
        checks["converged"]["ok"] = False
        checks["converged"]["violations"] = max(1, checks["converged"]["violations"])
    if watch is not None and held is not None:
        bound = rig.lease_s + LEASE_SLACK_S
        checks["offline_marking"] = fc.offline_marking(
            held, killed_ns, view, watch.twin_ns, bound_s=bound, twin_required=twin_required
        ) | {"lease_s": rig.lease_s if rig.lease_reason is None else None}
        if rig.lease_reason is not None:
            checks["offline_marking"]["lease_reason"] = rig.lease_reason
    if load is not None:
        checks["commands"] = fc.commands(load.issued(), view, applied) | {
            "request_errors_seen": load.errors(),
            "late_retries_sent": late,
            "settled": commands_settled,
        }
    return {
        "log_positions": list(positions),
        "events": positions[1] - positions[0],
        "timing": timing,
        "checks": checks,
    }


async def baseline(rig: Rig, window: Window) -> dict[str, Any]:
    """The connect wave of the whole fleet and its sync, checked like any experiment."""
    return {"fault": None} | await check_experiment(rig, window)


async def kill_experiment(rig: Rig, name: str, target: str) -> dict[str, Any]:
    args = rig.args
    service = rig.services[target]
    gateway = target == "gateway"
    lease = name == "gateway-lease"
    window = await open_window(rig)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await rig.fleet.set_rate(rig.total_rate)
    load: CommandLoad | None = None
    if name in COMMAND_EXPERIMENTS:
        load = CommandLoad(
            rig.client,
            rig.devices,
            name=name,
            rate=args.command_rate,
            ttl=args.command_ttl,
            powers=rig.powers,
            late_retry_every=args.late_retry_every,
        )
        load.start()
    await asyncio.sleep(args.phase_seconds / 3)
    held: dict[str, str] = {}
    if gateway:
        await rig.mirror.refresh()
        held = rig.mirror.view.connections_of(GATEWAY_ID)
    pid = service.pid
    killed_ns = time.time_ns()
    await service.kill()
    watch = None
    if gateway:
        until = rig.lease_s + LEASE_SLACK_S + 3.0
        watch = OfflineWatch(rig.mirror, rig.twins, held, killed_ns, until)
    down_s = rig.lease_s + LEASE_SLACK_S + 2.0 if lease else args.pause
    await asyncio.sleep(down_s)
    start_s = await service.start()
    up_ns = time.time_ns()
    if target == "nats":
        rig.outages.append(fc.Outage(killed_ns, up_ns))
    say(f"{name}: {target} back after {(up_ns - killed_ns) / 1e9:.1f} s (start {start_s:.1f} s)")
    await asyncio.sleep(max(args.phase_seconds - (loop.time() - started), 2.0))
    await rig.fleet.set_rate(0)
    if load is not None:
        await load.stop_issuing()
    fault = {
        "target": target,
        "signal": "SIGKILL",
        "pid": pid,
        "killed_after_s": round(args.phase_seconds / 3, 2),
        "down_s": round((up_ns - killed_ns) / 1e9, 2),
        "start_s": round(start_s, 2),
        "connections_held": len(held) if gateway else None,
    }
    st = await rig.fleet.stats()
    out = {"fault": fault} | await check_experiment(
        rig,
        window,
        load=load,
        watch=watch,
        held=held if gateway else None,
        killed_ns=killed_ns,
        twin_required=lease,
    )
    out["load"] = {
        "offered_changes_per_s": rig.total_rate,
        "device_changes": st.driver.get("changes", 0),
        "skipped_offline": st.driver.get("skipped_offline", 0),
        "notifications_sent": st.totals.get("notifications_sent", 0),
        "reconnects": st.totals.get("reconnects", 0),
    }
    return out


TARGETS = {
    "kill-twin": "twin",
    "kill-nats": "nats",
    "kill-mongo": "mongo",
    "kill-gateway": "gateway",
    "gateway-lease": "gateway",
}


def lease_setting(lease: float | None) -> tuple[float, dict[str, str], str | None]:
    """The lease to run with, the environment that sets it, and why none could be set."""
    from twinhub_cli import config as cfgmod

    section, key = LEASE_OPTION
    defaults = getattr(cfgmod.Config(), section)
    if not hasattr(defaults, key):
        reason = (
            f"twinhub_cli/config.py has no {section}.{key}: the product holds no lease; the "
            f"bound is --lease ({lease or 15:g} s) + {LEASE_SLACK_S:g} s"
        )
        return lease or 15.0, {}, reason
    value = lease if lease is not None else float(getattr(defaults, key))
    return value, {f"TWINHUB_{section.upper()}_{key.upper()}": f"{value:g}"}, None


async def run_suite(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from devicesim.config import device_id_for
    from twinhub_cli import services
    from twinhub_cli.datadir import DataDir
    from twinhub_cli.devservices import MongoServer, NatsServer
    from twinhub_client import TwinhubClient

    e2e.cancel_on_signals()
    nofile = benchutil.raise_nofile_limit()
    lease_s, lease_env, lease_reason = lease_setting(args.lease)
    result: dict[str, Any] = {
        "benchmark": "faults",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    nats = NatsServer(work / "nats")
    mongo = MongoServer(work / "mongo")
    servers = {"nats": ServerProc(nats), "mongo": ServerProc(mongo)}
    async with contextlib.AsyncExitStack() as stack:
        for s in servers.values():
            await s.start()
            stack.push_async_callback(s.stop)
        result["machine"] = benchutil.machine(
            {
                "nats_server": benchutil.binary_version(nats.binary),
                "mongo_server": e2e._ferretdb_version(),
                "nofile_limit": list(nofile),
            }
        )
        result["code"] = e2e.code_info()
        result["settings"] = {
            "experiments": args.experiments,
            "devices": args.devices,
            "resources_per_device": args.resources,
            "changes_per_s_per_device": args.rate,
            "phase_s": args.phase_seconds,
            "pause_s": args.pause,
            "lease_s": lease_s,
            "lease_setting": None if lease_reason else lease_env,
            "ack_window_s": args.ack_window,
            "command_rate_per_s": args.command_rate,
            "command_ttl_s": args.command_ttl,
            "late_retry_every": args.late_retry_every,
            "transport": "coaps+tcp (TLS), batch observe of /oic/res",
            "bus": "authenticated NATS: services by NKey, the client by application token "
            "through the auth callout (in this process), API prefix twinhub.api.v1",
        }
        result["definitions"] = (
            (fc.__doc__ or "").split("Definitions (the JSON of a run repeats them):")[-1].strip()
        )
        data_dir = await e2e.twinhub_init(work)
        config = e2e.bench_config(nats, mongo.url)
        data = DataDir(data_dir)
        token = services.first_device_token(config, data, OWNER)
        app_token = services.issuer_for(config, data).issue(
            OWNER, now=time.time(), ttl=APP_TOKEN_TTL
        )
        store = await stack.enter_async_context(services.event_store(config, data, "admin"))
        twins = await stack.enter_async_context(services.twin_store(config))

        twin = Restartable(
            "twin", lambda: twin_process(work, data_dir, config, lease_env), lambda c: c.pid
        )
        gw_port = 0

        @contextlib.asynccontextmanager
        async def gateway_run() -> AsyncIterator[e2e.GatewayProc]:
            nonlocal gw_port
            async with e2e.gateway_process(
                work, GATEWAY_ID, data_dir, config, port=gw_port, extra_env=lease_env
            ) as gw:
                gw_port = gw.port
                yield gw

        gateway = Restartable("gateway", gateway_run, lambda g: g.pid)
        await asyncio.gather(twin.start(), gateway.start())
        stack.push_async_callback(twin.stop)
        stack.push_async_callback(gateway.stop)
        await stack.enter_async_context(services.run_callout(config, data))
        client = await stack.enter_async_context(TwinhubClient(nats.url, app_token, timeout=5.0))
        hrefs = [f"/light/{i}" for i in range(1, args.resources + 1)]
        mirror = LogMirror(store, hrefs)
        await mirror.refresh()
        live = LiveWatch(client, mirror.view.position, args.watch_timeout)
        stack.push_async_callback(live.close)
        say(f"connecting {args.devices} TLS devices")
        fleet = await stack.enter_async_context(
            e2e.sim_fleet(
                work,
                gateway.value,
                ca_file=data_dir / "pki" / "ca.crt",
                token=token,
                devices=args.devices,
                per_proc=args.devices_per_sim,
                prefix="f",
                connect_concurrency=64,
                script=SCRIPT,
                worker_args=["--resources", str(args.resources)],
            )
        )
        devices = [
            device_id_for(f"f{i}", j)
            for i, n in enumerate(e2e._split(args.devices, args.devices_per_sim))
            for j in range(n)
        ]
        rig = Rig(
            args,
            work,
            store,
            twins,
            mirror,
            fleet,
            client,
            devices,
            {"twin": twin, "gateway": gateway, **servers},
            lease_s,
            lease_reason,
            live,
        )
        experiments: dict[str, Any] = {}
        result["experiments"] = experiments
        window = Window(time.time_ns(), mirror.view.position)
        for name in args.experiments:
            say(f"experiment {name}")
            # the processes as they are at the start (a killed one's successor counts as
            # "others")
            meter = benchutil.CpuMeter(
                {"sim": fleet.pids, "bench": [os.getpid()]}
                | {n: [s.pid] for n, s in rig.services.items()}
            )
            cpu0 = meter.sample()
            t0 = time.monotonic()
            try:
                if name == "baseline":
                    out = await baseline(rig, window)
                else:
                    out = await kill_experiment(rig, name, TARGETS[name])
            except Exception as e:
                import traceback

                traceback.print_exc()
                out = {"failed": f"{type(e).__name__}: {e}"}
            out["seconds"] = round(time.monotonic() - t0, 1)
            out["cpu_pct_of_one_core"] = meter.usage(cpu0, meter.sample())
            experiments[name] = out
            say(f"  {name}: {_verdict(out)}")
        result["summary"] = summarize(experiments)
    return result


def _verdict(out: dict[str, Any]) -> str:
    if "failed" in out:
        return f"FAILED {out['failed']}"
    bad = {k: v["violations"] for k, v in out["checks"].items() if not v["ok"]}
    return "ok" if not bad else f"violations {bad}"


def summarize(experiments: dict[str, Any]) -> dict[str, Any]:
    violations: dict[str, int] = {}
    failed: list[str] = []
    for name, out in experiments.items():
        if "failed" in out:
            failed.append(f"{name}: did not run to its end ({out['failed']})")
            continue
        for check, v in out["checks"].items():
            violations[check] = violations.get(check, 0) + v["violations"]
            if not v["ok"]:
                failed.append(f"{name}: {check} ({v['violations']})")
    summary: dict[str, Any] = {"ok": not failed, "violations": violations}
    if failed:
        summary["failed"] = failed
    return summary


# -- command line -------------------------------------------------------------------------------

FULL: dict[str, Any] = {
    "devices": 200,
    "rate": 2.0,
    "phase_seconds": 30.0,
    "pause": 3.0,
    "lease": None,  # the product's default
    "command_rate": 5.0,
    "command_ttl": 60.0,
}
QUICK: dict[str, Any] = {
    "devices": 50,
    "rate": 1.0,
    "phase_seconds": 8.0,
    "pause": 2.0,
    "lease": 5.0,
    "command_rate": 2.0,
    "command_ttl": 10.0,
}


def _names(text: str) -> list[str]:
    out = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [x for x in out if x not in EXPERIMENTS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown experiments {unknown} (known: {', '.join(EXPERIMENTS)})"
        )
    return out


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="faults.py",
        description=(__doc__ or "").splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--devices", type=int, help="simulated devices (200)")
    p.add_argument("--rate", type=float, help="changes per second per device (2)")
    p.add_argument("--resources", type=int, default=2, help="lights per device (2)")
    p.add_argument("--phase-seconds", type=float, help="load per experiment, seconds (30)")
    p.add_argument("--pause", type=float, help="seconds a killed component stays down (3)")
    p.add_argument(
        "--lease",
        type=float,
        help="gateway lease, seconds (gateway.lease; default the product's)",
    )
    p.add_argument(
        "--experiments",
        type=_names,
        default=list(EXPERIMENTS),
        help=f"comma-separated, run in the order given ({','.join(EXPERIMENTS)})",
    )
    p.add_argument("--command-rate", type=float, help="commands per second (5)")
    p.add_argument("--command-ttl", type=float, help="commands' time to live, seconds (60)")
    p.add_argument(
        "--late-retry-every",
        type=int,
        default=4,
        help="send every N-th command again after its outcome (0: none; 4)",
    )
    p.add_argument(
        "--late-retry-wait",
        type=float,
        default=15.0,
        help="seconds to wait for what late retries cause (15)",
    )
    p.add_argument(
        "--ack-window",
        type=float,
        default=2.0,
        help="seconds a connection must outlive a write for it to count as acknowledged (2)",
    )
    p.add_argument(
        "--watch-timeout",
        type=float,
        default=0.05,
        help="the live subscription's next(timeout), seconds (0.05; twinhub watch: 0.5)",
    )
    p.add_argument("--recover-timeout", type=float, default=60.0)
    p.add_argument("--catch-up-timeout", type=float, default=60.0)
    p.add_argument("--devices-per-sim", type=int, default=2500)
    p.add_argument("--quick", action="store_true", help="CI: see QUICK")
    p.add_argument("--output", type=Path, metavar="FILE", help="also write the JSON to FILE")
    p.add_argument("--keep-work-dir", action="store_true", help="keep the temp dir (logs)")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.devices < 1 or args.resources < 1 or args.phase_seconds <= 0 or args.rate < 0:
        p.error("--devices and --resources must be >= 1, --phase-seconds > 0, --rate >= 0")
    return args


def parse_worker_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="faults.py sim-worker")
    p.add_argument("--gateway", required=True)
    p.add_argument("--ca", type=Path, required=True)
    p.add_argument("--token", required=True)
    p.add_argument("--devices", type=int, required=True)
    p.add_argument("--prefix", required=True)
    p.add_argument("--connect-concurrency", type=int, default=64)
    p.add_argument("--resources", type=int, default=1)
    return p.parse_args(argv)


def _worker(argv: list[str]) -> Coroutine[Any, Any, int]:
    return sim_worker(parse_worker_args(argv))


def main() -> int:
    return e2e.run_main("twinhub-faults-", parse_args, run_suite, say, _worker)


if __name__ == "__main__":
    sys.exit(main())

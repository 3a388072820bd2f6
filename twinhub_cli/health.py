"""``twinhub health gateway|nats|mongo|twin``: one-shot health checks (container health checks).

Every check prints one line (``healthy: ...`` on stdout, ``unhealthy: ...`` on stderr) and exits
**0** when healthy, **1** otherwise, including for a bad configuration (Docker reserves exit code
2 of a health check). The configuration is read as by the other commands (``--config FILE``,
then ``TWINHUB_*`` environment variables); ``--timeout`` bounds the whole check (default 3 s).

* ``gateway`` connects to the CoAP-over-TCP listener (``gateway.tcp``) or, with ``--tls``, to the
  TLS one (``gateway.tls``) and waits for the gateway's CSM (RFC 8323: the server's first
  message), so a socket accepted by the kernel of a hung process does not pass. A wildcard bind
  address (``0.0.0.0``, ``::``) is probed on loopback. With ``--tls --ca FILE`` the certificate
  is verified (chain, expiry, and the name: ``--server-name`` or the probed host).
* ``nats`` connects, asks for the JetStream account info, and checks that the event stream
  (``nats.stream``) exists: it is created by the first gateway or twin projector to start.
* ``mongo`` pings the server (``mongo.url``).
* ``twin`` checks NATS and MongoDB as above, and that the projector's durable consumer
  (``twin.consumer``) exists; it reports the consumer's pending count (events not yet
  delivered plus delivered but unacknowledged), and fails when that exceeds ``--max-pending``.
* ``endpoint gateway|twin|callout`` asks the running process itself, at its operations
  endpoint (``gateway.metrics_listen`` / ``twin.metrics_listen`` / ``callout.metrics_listen``,
  a wildcard address probed on loopback):
  ``/healthz`` (its event loop runs; the twin's projector too), or ``/readyz`` with ``--ready``
  (its servers answer). Healthy on HTTP 200; the line carries the endpoint's JSON answer.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import ssl
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from eventstore.adapters.endpoint import NatsEndpoint
from twinhub_cli import config as cfgmod
from twinhub_cli.config import Config, ConfigError, parse_hostport

if TYPE_CHECKING:
    from nats.aio.client import Client as NatsClient

    SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]

DEFAULT_TIMEOUT: Final = 3.0
CSM: Final = 0xE1  # 7.01, the first message of each side of a CoAP-over-TCP connection
_ERR_CONSUMER_NOT_FOUND: Final = 10014
_ERR_STREAM_NOT_FOUND: Final = 10059
_LOOPBACK: Final = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}
_USERINFO: Final = re.compile(r"//[^/@]*@")


@dataclass(frozen=True, slots=True)
class Health:
    """The outcome of one check: healthy or not, and one line saying why."""

    ok: bool
    detail: str


Check = Coroutine[Any, Any, Health]


class Unhealthy(Exception):
    """A check failed; the message is the diagnostic."""


def redact(url: str) -> str:
    """``url`` without credentials (``scheme://user:pass@host`` → ``scheme://***@host``)."""
    return _USERINFO.sub("//***@", url)


def _ms(start: float) -> str:
    return f"{(time.monotonic() - start) * 1000:.0f} ms"


def _why(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    name = type(exc).__name__
    return f"{name}: {first}" if first else name


class _Stage:
    """What a check is doing, for the diagnostic of a timeout."""

    def __init__(self, what: str) -> None:
        self.what = what


async def _bounded(limit: float, stage: _Stage, check: Coroutine[Any, Any, str]) -> Health:
    try:
        async with asyncio.timeout(limit):
            detail = await check
        return Health(True, detail)
    except TimeoutError:
        return Health(False, f"no answer within {limit:g} s while {stage.what}")
    except Unhealthy as exc:
        return Health(False, str(exc))


# -- gateway -----------------------------------------------------------------------------------


def client_ssl_context(
    ca: Path | None = None, cert: Path | None = None, key: Path | None = None
) -> ssl.SSLContext:
    """A TLS client context for the probe: ALPN ``coap``; verification only with ``ca``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if ca is None:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx.load_verify_locations(cafile=str(ca))
    if cert is not None:
        ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(["coap"])
    return ctx


async def _first_message_code(reader: asyncio.StreamReader) -> int:
    """The code of the next CoAP-over-TCP message (RFC 8323 section 3.2): Len|TKL, Extended
    Length (0, 1, 2 or 4 bytes), Code."""
    first = (await reader.readexactly(1))[0]
    extended = {13: 1, 14: 2, 15: 4}.get(first >> 4, 0)
    if extended:
        await reader.readexactly(extended)
    return (await reader.readexactly(1))[0]


def _code(code: int) -> str:
    return f"{code >> 5}.{code & 0x1F:02d}"


async def check_gateway(
    host: str,
    port: int,
    *,
    tls: ssl.SSLContext | None = None,
    server_name: str | None = None,
    limit: float = DEFAULT_TIMEOUT,
) -> Health:
    """Connect (TLS handshake with ``tls``) and wait for the gateway's CSM."""
    scheme = "coaps+tcp" if tls is not None else "coap+tcp"
    target = f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"
    stage = _Stage(f"connecting to {target}")

    async def run() -> str:
        start = time.monotonic()
        try:
            reader, writer = await asyncio.open_connection(
                host,
                port,
                ssl=tls,
                server_hostname=(server_name or host) if tls is not None else None,
                ssl_handshake_timeout=limit if tls is not None else None,
            )
        except ssl.SSLCertVerificationError as exc:
            raise Unhealthy(f"{target}: certificate not accepted: {exc.verify_message}") from None
        except (OSError, ssl.SSLError) as exc:
            raise Unhealthy(f"{target}: cannot connect: {_why(exc)}") from None
        try:
            stage.what = f"waiting for the CSM of {target}"
            try:
                code = await _first_message_code(reader)
            except asyncio.IncompleteReadError:
                raise Unhealthy(f"{target}: closed the connection without a CSM") from None
            except (OSError, ssl.SSLError) as exc:
                raise Unhealthy(f"{target}: connection failed before a CSM: {_why(exc)}") from None
            if code != CSM:
                raise Unhealthy(f"{target}: first message is {_code(code)}, not a CSM (7.01)")
        finally:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()
        return f"{target}: CSM received in {_ms(start)}"

    return await _bounded(limit, stage, run())


def gateway_target(config: Config, address: str | None, *, tls: bool) -> tuple[str, int]:
    """The host and port to probe: ``address``, else the configured listener (a wildcard bind
    address becomes loopback)."""
    key = "gateway.tls" if tls else "gateway.tcp"
    if address is not None:
        parsed = parse_hostport(address, "--address")
        if parsed is None:
            raise ConfigError("--address: expected HOST:PORT")
        return parsed
    parsed = parse_hostport(config.gateway.tls if tls else config.gateway.tcp, key)
    if parsed is None:
        raise ConfigError(f"{key} is disabled in the configuration (give --address)")
    host, port = parsed
    return _LOOPBACK.get(host, host), port


# -- NATS --------------------------------------------------------------------------------------


class _Nats:
    """A NATS connection for one check: no reconnects, JetStream API requests as JSON."""

    def __init__(self, endpoint: NatsEndpoint, limit: float) -> None:
        self.endpoint = endpoint
        self.url = endpoint.url
        self.limit = limit
        self._nc: NatsClient | None = None

    @contextlib.asynccontextmanager
    async def connected(self) -> AsyncIterator[_Nats]:
        import nats
        from nats.errors import Error as NatsError

        errors: list[Exception] = []

        async def record(exc: Exception) -> None:
            errors.append(exc)

        try:
            # nats-py retries the initial connection forever with max_reconnect_attempts=0 (it
            # only gives up for a value > 0): one retry per server, then NoServersError.
            self._nc = await nats.connect(
                **self.endpoint.connect_options(),
                name="twinhub-health",
                connect_timeout=self.limit,
                allow_reconnect=False,
                max_reconnect_attempts=1,
                reconnect_time_wait=0.1,
                error_cb=record,
            )
        except (OSError, NatsError) as exc:
            cause = errors[-1] if errors else exc
            raise Unhealthy(f"NATS {redact(self.url)}: cannot connect: {_why(cause)}") from None
        try:
            yield self
        finally:
            nc, self._nc = self._nc, None
            if nc is not None:
                with contextlib.suppress(Exception):
                    await nc.close()

    async def api(self, op: str) -> dict[str, Any]:
        """``$JS.API.<op>``; raises :class:`Unhealthy` on no JetStream, returns error bodies."""
        from nats.errors import Error as NatsError
        from nats.errors import NoRespondersError

        assert self._nc is not None, "use `async with _Nats(...).connected()`"
        try:
            msg = await self._nc.request(f"$JS.API.{op}", b"", timeout=self.limit)
        except NoRespondersError:
            raise Unhealthy(f"NATS {redact(self.url)}: JetStream is not enabled") from None
        except (OSError, NatsError) as exc:
            raise Unhealthy(f"NATS {redact(self.url)}: {op} failed: {_why(exc)}") from None
        if msg.headers and msg.headers.get("Status") == "503":
            raise Unhealthy(f"NATS {redact(self.url)}: JetStream is not available")
        try:
            body = json.loads(msg.data)
        except ValueError:
            raise Unhealthy(f"NATS {redact(self.url)}: {op}: not a JSON answer") from None
        if not isinstance(body, dict):
            raise Unhealthy(f"NATS {redact(self.url)}: {op}: unexpected answer")
        return body


def _api_error(body: dict[str, Any]) -> tuple[int, str] | None:
    err = body.get("error")
    if not isinstance(err, dict):
        return None
    return int(err.get("err_code", 0)), str(err.get("description", ""))


async def _nats_probe(nc: _Nats, stream: str, stage: _Stage) -> str:
    stage.what = f"asking NATS {redact(nc.url)} for the JetStream account info"
    account = await nc.api("INFO")
    if (err := _api_error(account)) is not None:
        raise Unhealthy(f"NATS {redact(nc.url)}: JetStream account info: {err[1]}")
    stage.what = f"asking NATS {redact(nc.url)} for stream {stream}"
    info = await nc.api(f"STREAM.INFO.{stream}")
    if (err := _api_error(info)) is not None:
        if err[0] == _ERR_STREAM_NOT_FOUND:
            raise Unhealthy(
                f"NATS {redact(nc.url)}: stream {stream} does not exist (the twin service "
                "creates it when it starts)"
            )
        raise Unhealthy(f"NATS {redact(nc.url)}: stream {stream}: {err[1]}")
    state = info.get("state") or {}
    return f"stream {stream} {state.get('messages', '?')} msgs, last seq {state.get('last_seq')}"


async def check_nats(
    endpoint: NatsEndpoint, stream: str, *, limit: float = DEFAULT_TIMEOUT
) -> Health:
    """Connect (with the endpoint's credentials), JetStream account info, the stream exists."""
    url = endpoint.url
    stage = _Stage(f"connecting to NATS {redact(url)}")

    async def run() -> str:
        start = time.monotonic()
        async with _Nats(endpoint, limit).connected() as nc:
            detail = await _nats_probe(nc, stream, stage)
        return f"NATS {redact(url)}: JetStream ok, {detail} ({_ms(start)})"

    return await _bounded(limit, stage, run())


# -- MongoDB -----------------------------------------------------------------------------------


async def _mongo_ping(url: str, limit: float, stage: _Stage) -> str:
    from pymongo import AsyncMongoClient
    from pymongo.errors import PyMongoError

    ms = max(1, int(limit * 1000))
    start = time.monotonic()
    stage.what = f"pinging MongoDB {redact(url)}"
    try:
        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
            url,
            serverSelectionTimeoutMS=ms,
            connectTimeoutMS=ms,
            socketTimeoutMS=ms,
            appname="twinhub-health",
        )
    except (PyMongoError, ValueError, TypeError) as exc:
        raise Unhealthy(f"MongoDB {redact(url)}: {_why(exc)}") from None
    try:
        await client.admin.command("ping")
    except PyMongoError as exc:
        raise Unhealthy(f"MongoDB {redact(url)}: ping failed: {_why(exc)}") from None
    finally:
        with contextlib.suppress(Exception):
            await client.close()
    return f"MongoDB {redact(url)}: ping ok ({_ms(start)})"


async def check_mongo(url: str, *, limit: float = DEFAULT_TIMEOUT) -> Health:
    """Ping."""
    stage = _Stage(f"connecting to MongoDB {redact(url)}")
    return await _bounded(limit, stage, _mongo_ping(url, limit, stage))


# -- twin --------------------------------------------------------------------------------------


async def _twin_nats(
    config: Config, endpoint: NatsEndpoint, limit: float, max_pending: int | None
) -> Health:
    url, stream, consumer = endpoint.url, config.nats.stream, config.twin.consumer
    stage = _Stage(f"connecting to NATS {redact(url)}")

    async def run() -> str:
        async with _Nats(endpoint, limit).connected() as nc:
            await _nats_probe(nc, stream, stage)
            stage.what = f"asking NATS {redact(url)} for consumer {stream}.{consumer}"
            info = await nc.api(f"CONSUMER.INFO.{stream}.{consumer}")
        if (err := _api_error(info)) is not None:
            if err[0] == _ERR_CONSUMER_NOT_FOUND:
                raise Unhealthy(
                    f"projector consumer {stream}.{consumer} does not exist (the twin "
                    "projector creates it when it starts)"
                )
            raise Unhealthy(f"projector consumer {stream}.{consumer}: {err[1]}")
        undelivered = int(info.get("num_pending", 0))
        unacked = int(info.get("num_ack_pending", 0))
        pending = undelivered + unacked
        detail = (
            f"projector consumer {consumer}: {pending} pending "
            f"({undelivered} undelivered, {unacked} unacknowledged)"
        )
        if max_pending is not None and pending > max_pending:
            raise Unhealthy(f"{detail}: more than --max-pending {max_pending}")
        return detail

    return await _bounded(limit, stage, run())


async def check_twin(
    config: Config,
    endpoint: NatsEndpoint,
    *,
    limit: float = DEFAULT_TIMEOUT,
    max_pending: int | None = None,
) -> Health:
    """NATS (JetStream, stream, the projector's consumer and its pending count) and MongoDB."""
    nats_health, mongo_health = await asyncio.gather(
        _twin_nats(config, endpoint, limit, max_pending),
        check_mongo(config.mongo.url, limit=limit),
    )
    return Health(
        nats_health.ok and mongo_health.ok, f"{nats_health.detail}; {mongo_health.detail}"
    )


# -- a process's operations endpoint -----------------------------------------------------------

ENDPOINT_SERVICES: Final = ("gateway", "twin", "callout")


def endpoint_target(config: Config, service: str, address: str | None) -> tuple[str, int]:
    """The host and port of ``service``'s operations endpoint: ``address``, else its
    ``metrics_listen`` (a wildcard bind address becomes loopback)."""
    if address is not None:
        parsed = parse_hostport(address, "--address")
        if parsed is None:
            raise ConfigError("--address: expected HOST:PORT")
        return parsed
    key = f"{service}.metrics_listen"
    listen = {
        "gateway": config.gateway.metrics_listen,
        "twin": config.twin.metrics_listen,
        "callout": config.callout.metrics_listen,
    }
    if service not in listen:
        raise ConfigError(f"no operations endpoint of {service!r}: one of {', '.join(listen)}")
    parsed = parse_hostport(listen[service], key)
    if parsed is None:
        raise ConfigError(f"{key} is not set: the {service} serves no endpoint (give --address)")
    host, port = parsed
    return _LOOPBACK.get(host, host), port


async def check_endpoint(
    host: str, port: int, path: str, *, limit: float = DEFAULT_TIMEOUT
) -> Health:
    """``GET path`` (HTTP/1.1, no TLS): healthy on 200."""
    url = f"http://[{host}]:{port}{path}" if ":" in host else f"http://{host}:{port}{path}"
    stage = _Stage(f"connecting to {url}")

    async def run() -> str:
        start = time.monotonic()
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError as exc:
            raise Unhealthy(f"{url}: cannot connect: {_why(exc)}") from None
        try:
            stage.what = f"waiting for the answer of {url}"
            writer.write(
                f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode()
            )
            await writer.drain()
            answer = await reader.read()  # until the server closes: a short JSON body
        except OSError as exc:
            raise Unhealthy(f"{url}: {_why(exc)}") from None
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        head, _, body = answer.partition(b"\r\n\r\n")
        status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
            raise Unhealthy(f"{url}: not an HTTP answer: {status_line[:80]!r}")
        text = " ".join(body.decode("utf-8", "replace").split())[:300]
        if parts[1] != "200":
            raise Unhealthy(f"{url}: {parts[1]} {text}")
        return f"{url}: 200 {text} ({_ms(start)})"

    return await _bounded(limit, stage, run())


# -- the command -------------------------------------------------------------------------------


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="TOML configuration file (TWINHUB_* env wins)")
    p.add_argument(
        "--timeout",
        type=_positive,
        default=DEFAULT_TIMEOUT,
        help=f"seconds for the whole check (default {DEFAULT_TIMEOUT:g})",
    )


def _bus(p: argparse.ArgumentParser, role: str) -> None:
    p.add_argument(
        "--data-dir",
        type=Path,
        default=Path("data"),
        help="where the bus credentials are when nats.credentials is not set (DIR/bus)",
    )
    p.add_argument(
        "--role",
        choices=["gateway", "twin", "admin"],
        default=role,
        help=f"whose NKey to connect with (default {role}: a container has only its own)",
    )


def _endpoint(config: Config, args: argparse.Namespace) -> NatsEndpoint:
    from dataclasses import replace

    from twinhub_cli.busconfig import nats_endpoint
    from twinhub_cli.datadir import DataDir

    endpoint = nats_endpoint(config, DataDir(args.data_dir.resolve()), args.role)
    url = getattr(args, "url", None)
    try:
        return replace(endpoint, url=url) if url else endpoint
    except ValueError as e:  # the URL holds credentials: refused, never printed
        raise ConfigError(f"--url: {e}") from None


def register(subparsers: SubParsers, name: str, /) -> None:
    group = subparsers.add_parser(
        name,
        help="health checks for containers: exit 0 healthy, 1 unhealthy, one line of diagnostic",
        description="One-shot health checks. Each prints one line and exits 0 when healthy, "
        "1 when not (also for a bad configuration).",
    )
    checks = group.add_subparsers(title="checks", metavar="CHECK", required=True)

    p = checks.add_parser(
        "gateway",
        help="connect to the CoAP-over-TCP listener (--tls: the TLS one) and wait for its CSM",
    )
    _common(p)
    p.add_argument(
        "--address", help="HOST:PORT to probe (default: gateway.tcp / gateway.tls, on loopback)"
    )
    p.add_argument("--tls", action="store_true", help="probe the TLS listener (TLS handshake)")
    p.add_argument("--ca", type=Path, help="with --tls: verify the certificate with this CA")
    p.add_argument("--server-name", help="with --ca: the name to verify (default: the host)")
    p.add_argument("--cert", type=Path, help="with --tls: a client certificate (PEM)")
    p.add_argument("--key", type=Path, help="with --cert: its private key (PEM)")
    p.set_defaults(handler=_gateway_cmd)

    p = checks.add_parser("nats", help="connect, JetStream account info, the event stream exists")
    _common(p)
    _bus(p, "gateway")
    p.add_argument("--url", help="NATS URL (default: nats.url)")
    p.set_defaults(handler=_nats_cmd)

    p = checks.add_parser("mongo", help="ping MongoDB")
    _common(p)
    p.add_argument("--url", help="MongoDB URL (default: mongo.url)")
    p.set_defaults(handler=_mongo_cmd)

    p = checks.add_parser(
        "twin", help="NATS and MongoDB, the projector's durable consumer and its pending count"
    )
    _common(p)
    p.add_argument(
        "--max-pending",
        type=_count,
        default=None,
        help="unhealthy when the consumer has more pending events (default: no limit)",
    )
    _bus(p, "twin")
    p.set_defaults(handler=_twin_cmd)

    p = checks.add_parser(
        "endpoint",
        help="ask a running gateway / twin at its /healthz (--ready: /readyz) endpoint",
    )
    _common(p)
    p.add_argument("service", choices=ENDPOINT_SERVICES, help="whose endpoint")
    p.add_argument(
        "--address",
        help="HOST:PORT (default: gateway.metrics_listen / twin.metrics_listen / "
        "callout.metrics_listen, on loopback)",
    )
    p.add_argument(
        "--ready",
        action="store_true",
        help="/readyz (its servers answer) instead of /healthz (the process runs)",
    )
    p.set_defaults(handler=_endpoint_cmd)


def _report(check: str, health: Health) -> int:
    if health.ok:
        sys.stdout.write(f"healthy: {health.detail}\n")
        sys.stdout.flush()
        return 0
    sys.stderr.write(f"unhealthy: {check}: {health.detail}\n")
    sys.stderr.flush()
    return 1


def _execute(check: str, args: argparse.Namespace, make: Callable[[Config], Check]) -> int:
    """Load the configuration, run ``make(config)`` (a coroutine giving :class:`Health`)."""
    try:
        config = cfgmod.load(args.config)
        coro = make(config)
    except (ConfigError, OSError, ssl.SSLError) as exc:
        return _report(check, Health(False, f"configuration: {exc}"))
    try:
        health = asyncio.run(coro)
    except KeyboardInterrupt:
        return _report(check, Health(False, "interrupted"))
    return _report(check, health)


def _gateway_cmd(args: argparse.Namespace) -> int:
    def make(config: Config) -> Check:
        host, port = gateway_target(config, args.address, tls=args.tls)
        ctx = client_ssl_context(args.ca, args.cert, args.key) if args.tls else None
        return check_gateway(host, port, tls=ctx, server_name=args.server_name, limit=args.timeout)

    return _execute("gateway", args, make)


def _nats_cmd(args: argparse.Namespace) -> int:
    def make(config: Config) -> Check:
        return check_nats(_endpoint(config, args), config.nats.stream, limit=args.timeout)

    return _execute("nats", args, make)


def _mongo_cmd(args: argparse.Namespace) -> int:
    def make(config: Config) -> Check:
        return check_mongo(args.url or config.mongo.url, limit=args.timeout)

    return _execute("mongo", args, make)


def _twin_cmd(args: argparse.Namespace) -> int:
    def make(config: Config) -> Check:
        return check_twin(
            config, _endpoint(config, args), limit=args.timeout, max_pending=args.max_pending
        )

    return _execute("twin", args, make)


def _endpoint_cmd(args: argparse.Namespace) -> int:
    def make(config: Config) -> Check:
        host, port = endpoint_target(config, args.service, args.address)
        path = "/readyz" if args.ready else "/healthz"
        return check_endpoint(host, port, path, limit=args.timeout)

    return _execute(f"{args.service} endpoint", args, make)

"""Run and inspect twinhub: ``init``, ``up``, ``gateway``, ``twin run|get|rebuild``,
``callout``, ``devices``.

Every command reads the configuration the same way (``--config FILE``, then
``TWINHUB_*`` environment variables). Commands that inspect a local stack find
its servers through ``--data-dir`` (the ``stack.json`` that ``twinhub up`` writes).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from twinhub_cli import config as cfgmod
from twinhub_cli import exitcodes, listing
from twinhub_cli.config import Config, ConfigError
from twinhub_cli.datadir import DataDir
from twinhub_cli.health import redact
from twinhub_cli.main import add_nats_cluster_options
from twinhub_cli.progress import Progress

if TYPE_CHECKING:
    from twin.model import Twin
    from twinhub_cli.console import ConsoleServer

    SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]

log = logging.getLogger(__name__)
DEFAULT_DATA = Path("data")


# -- shared plumbing ------------------------------------------------------------------------


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="TOML configuration file (TWINHUB_* env wins)")
    p.add_argument(
        "--data-dir",
        type=Path,
        default=DEFAULT_DATA,
        help="local data dir: keys, certificates, a running stack (default ./data)",
    )


def _load_config(args: argparse.Namespace, *, from_stack: bool = False) -> Config:
    overrides: dict[str, dict[str, Any]] = {}
    if from_stack:
        with contextlib.suppress(FileNotFoundError):
            info = DataDir(args.data_dir.resolve()).read_stack()
            overrides = {
                "nats": {"url": info["nats_url"]},
                "mongo": {"url": info["mongo_url"], "database": info["database"]},
            }
    return cfgmod.load(args.config, overrides=overrides)


def _run(main: Callable[[], Coroutine[Any, Any, int]], prog: str = "twinhub") -> int:
    """``main`` on uvloop; a failure twinhub knows (a bad setting, a port in use, a dependency
    unreachable: :mod:`twinhub_cli.exitcodes`) ends it with one line on stderr and its exit
    code, the traceback only in the debug log."""
    import uvloop

    try:
        return uvloop.run(main())
    except KeyboardInterrupt:
        return exitcodes.INTERRUPTED
    except Exception as e:
        code = exitcodes.report(e, prog)
        if code is None:
            raise
        return code


@contextlib.asynccontextmanager
async def _until_signal() -> AsyncIterator[asyncio.Event]:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        yield stop
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


# -- twinhub init ------------------------------------------------------------------------


def register_init(subparsers: SubParsers, name: str, /) -> None:
    p = subparsers.add_parser(
        name,
        help="create development keys and certificates in a data dir",
        description="Create what is missing of the signing key, the CA and the gateway's "
        "certificate (DATA), and the bus credentials (--bus-dir). With --bus-export, also "
        "copy each process's own secrets into a directory of its own, with the NATS server's "
        "configuration (TLS with --nats-host), MongoDB's passwords and the script that creates "
        "the twin service's MongoDB user, mongo.username (default twinhub) of mongo.database "
        "(compose.yaml; see twinhub_cli.initbus). Keys, passwords and certificates are kept "
        "on later runs.",
    )
    p.add_argument("--config", type=Path, help="TOML configuration file (TWINHUB_* env wins)")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    p.add_argument(
        "--host",
        action="append",
        default=[],
        help="a name or address for the gateway certificate (repeatable)",
    )
    p.add_argument(
        "--bus-dir",
        type=Path,
        help="where the full bus credential set is kept (default DATA/bus)",
    )
    p.add_argument(
        "--bus-export",
        type=Path,
        metavar="DIR",
        help="write DIR/<process>/ with only that process's secrets: gateway, twin, callout, "
        "admin, nats (nats.conf), mongo, mongo-initdb",
    )
    p.add_argument(
        "--nats-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a name or address of the NATS server: TLS on its client port, with a "
        "certificate from the data dir's CA for these names (repeatable; needs --bus-export)",
    )
    p.add_argument(
        "--nats-route",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="a member of a NATS cluster and its route port (repeatable, one per member): "
        "also write nats/nats-cluster.conf, every member's configuration, routes admitted "
        "with the bus directory's route password (TLS with --nats-host; needs --bus-export)",
    )
    p.add_argument(
        "--nats-conf-dir",
        type=Path,
        metavar="DIR",
        help="where the NATS server sees DIR/nats of the export (the paths in nats.conf; "
        "default: that directory itself)",
    )
    p.add_argument(
        "--mongo-conf-dir",
        type=Path,
        metavar="DIR",
        help="where the mongo container sees DIR/mongo of the export (the password file the "
        "initdb script reads; default: that directory itself)",
    )
    p.set_defaults(handler=run_init)


def _init_usage_error(args: argparse.Namespace) -> str:
    """What is wrong with the export options of ``twinhub init`` ("" = nothing)."""
    for given, option in (
        (args.nats_host, "--nats-host"),
        (args.nats_route, "--nats-route"),
        (args.nats_conf_dir, "--nats-conf-dir"),
        (args.mongo_conf_dir, "--mongo-conf-dir"),
    ):
        if given and args.bus_export is None:
            return f"{option} needs --bus-export"
    for path, option in (
        (args.nats_conf_dir, "--nats-conf-dir"),
        (args.mongo_conf_dir, "--mongo-conf-dir"),
    ):
        if path is not None and not path.is_absolute():
            return f"{option} must be an absolute path (as the server's container sees it)"
    for route in args.nats_route:
        try:
            cfgmod.parse_hostport(route, "--nats-route")
        except ConfigError as e:
            return str(e)
    if len({r.rpartition(":")[2] for r in args.nats_route}) > 1:
        return "--nats-route: every member listens for routes on the same port"
    if args.nats_route and len(args.nats_route) < 3:
        return "--nats-route: a JetStream cluster has at least 3 members"
    return ""


def run_init(args: argparse.Namespace) -> int:
    from bus.credentials import ensure_credentials
    from twinhub_cli import initbus
    from twinhub_cli import pki as devpki

    usage = _init_usage_error(args)
    if usage:
        sys.stderr.write(f"twinhub init: {usage}\n")
        return 2
    try:
        config = cfgmod.load(args.config)
    except ConfigError as e:
        sys.stderr.write(f"twinhub: configuration error: {e}\n")
        return 2
    data = DataDir(args.data_dir.resolve())
    data.issuer()
    hosts = tuple(args.host) or ("127.0.0.1", "localhost", "::1")
    issued = data.ensure_tls(hosts)
    bus_dir = args.bus_dir.resolve() if args.bus_dir is not None else data.bus
    creds = ensure_credentials(bus_dir)
    _out(f"signing key  {data.keys / 'jwt-signing-key.pem'}")
    _out(f"CA           {data.pki / 'ca.crt'}")
    _out(f"server cert  {issued.cert_path}")
    _out(f"bus keys     {creds.directory} (an NKey seed per service, the callout's key; 0600)")
    if args.bus_export is None:
        return 0
    mongo = initbus.ensure_mongo_secrets(bus_dir)
    options = initbus.ExportOptions(
        stream=config.nats.stream,
        projector=config.twin.consumer,
        mongo_user=config.mongo.username or initbus.DEFAULT_MONGO_USER,
        mongo_database=config.mongo.database,
        nats_hosts=tuple(args.nats_host),
        nats_conf_dir=args.nats_conf_dir,
        mongo_conf_dir=args.mongo_conf_dir,
        nats_routes=tuple(
            hp for hp in (cfgmod.parse_hostport(r, "--nats-route") for r in args.nats_route) if hp
        ),
    )
    try:
        exported = initbus.export_bus(
            creds, mongo, devpki.load_ca(data.pki), args.bus_export.resolve(), options
        )
    except (initbus.ExportError, OSError) as e:
        sys.stderr.write(f"twinhub init: --bus-export: {e}\n")
        return 1
    tls = f"TLS for {', '.join(options.nats_hosts)}" if exported.nats_cert else "no TLS"
    _out(f"bus export   {exported.directory}: " + ", ".join(initbus.EXPORTS) + " (0600)")
    _out(f"NATS conf    {exported.nats_conf} ({tls})")
    if exported.nats_cluster_conf is not None:
        _out(f"NATS cluster {exported.nats_cluster_conf} ({len(options.nats_routes)} members)")
    _out(
        f"MongoDB      {exported.directory / initbus.MONGO_DIR} (passwords), "
        f"{exported.initdb_script} (user {options.mongo_user} of {options.mongo_database})"
    )
    return 0


# -- twinhub gateway / twin run ------------------------------------------------------------


def register_gateway(subparsers: SubParsers, name: str, /) -> None:
    p = subparsers.add_parser(name, help="run the CoAP gateway until SIGTERM")
    _common(p)
    p.set_defaults(handler=run_gateway_cmd)


def run_gateway_cmd(args: argparse.Namespace) -> int:
    async def main() -> int:
        from twinhub_cli import services

        config = _load_config(args)
        data = DataDir(args.data_dir.resolve())
        async with (
            _until_signal() as stop,
            services.event_store(config, data, "gateway") as store,
            services.run_gateway(config, data, store) as gw,
            services.gateway_observability(config, store, gw) as ops,
        ):
            _out(
                f"gateway {config.gateway.id}: tcp={gw.tcp_address} tls={gw.tls_address}"
                f" udp={gw.udp_address} dtls={gw.dtls_address}"
            )
            if ops is not None:
                _out(f"gateway {config.gateway.id}: {ops.url}/metrics /healthz /readyz")
            await stop.wait()
        return 0

    return _run(main, "twinhub gateway")


def register_twin_run(subparsers: SubParsers, name: str, /) -> None:
    p = subparsers.add_parser(
        name,
        help="run the twin projector, the command API, the expiry sweeper and the gateway "
        "reaper until SIGTERM",
    )
    _common(p)
    p.set_defaults(handler=run_twin_cmd)


def run_twin_cmd(args: argparse.Namespace) -> int:
    async def main() -> int:
        from twinhub_cli import services
        from twinhub_cli.observability import ApiMetrics

        config = _load_config(args)
        data = DataDir(args.data_dir.resolve())
        api_metrics = ApiMetrics()
        async with (
            _until_signal() as stop,
            services.event_store(config, data, "twin") as store,
            services.mongo_database(config) as database,
            services.twin_store(config, database, starting=True) as twins,
            services.run_projector(config, store, twins) as projector,
            services.run_api(config, data, store, twins, metrics=api_metrics) as api_server,
            services.run_reaper(config, store, twins, database, metrics=api_metrics),
            services.twin_observability(config, store, twins, projector, api_metrics) as ops,
        ):
            _out(f"twin projector {config.twin.consumer}: running")
            _out(f"command API on {api_server.prefix}.>")
            if ops is not None:
                _out(f"twin {config.twin.consumer}: {ops.url}/metrics /healthz /readyz")
            await stop.wait()
        return 0

    return _run(main, "twinhub twin run")


def register_callout(subparsers: SubParsers, name: str, /) -> None:
    p = subparsers.add_parser(
        name,
        help="run the NATS auth callout (admits applications by their token) until SIGTERM",
        description="Answer the NATS server's authorization requests: a connection whose "
        "token is a valid application token is admitted to the APPS account with its owner's "
        "permissions, anything else refused. Run one or more (a queue group): while none "
        "runs, no application gets in.",
    )
    _common(p)
    p.set_defaults(handler=run_callout_cmd)


def run_callout_cmd(args: argparse.Namespace) -> int:
    async def main() -> int:
        from twinhub_cli import services

        config = _load_config(args)
        data = DataDir(args.data_dir.resolve())
        async with (
            _until_signal() as stop,
            services.run_callout(config, data) as callout,
            services.callout_observability(config, callout) as ops,
        ):
            _out(f"auth callout: serving (issuer {callout.issuer})")
            if ops is not None:
                _out(f"auth callout: {ops.url}/metrics /healthz /readyz")
            await stop.wait()
        return 0

    return _run(main, "twinhub callout")


# -- twinhub up ----------------------------------------------------------------------------


def register_up(subparsers: SubParsers, name: str, /) -> None:
    p = subparsers.add_parser(
        name,
        help="run the whole stack locally (NATS, MongoDB-wire server, gateway, twin)",
        description="Start NATS with JetStream and the MongoDB-wire server (unless --nats-url "
        "/ --mongo-url name existing ones), the auth callout, the twin service and the "
        "gateway; print the endpoints and a token for a first device or application; stop "
        "everything on Ctrl-C. NATS runs authenticated: services with the data dir's NKeys "
        "(bus/), applications with a token.",
    )
    _common(p)
    p.add_argument("--nats-url", help="use this NATS server instead of starting one")
    p.add_argument("--mongo-url", help="use this MongoDB instead of starting one")
    p.add_argument("--nats-port", type=int, default=4222, help="port of the started NATS")
    p.add_argument("--mongo-port", type=int, default=27017, help="port of the started MongoDB")
    add_nats_cluster_options(p)
    p.add_argument("--host", default="127.0.0.1", help="address the gateway listens on")
    p.add_argument("--tcp-port", type=int, default=5683, help="CoAP over TCP (0: any)")
    p.add_argument("--tls-port", type=int, default=5684, help="CoAP over TLS (0: any)")
    p.add_argument(
        "--device-auth",
        choices=["none", "any-certificate", "ocf-identity"],
        default="none",
        help="TLS client authentication of devices (default none)",
    )
    p.add_argument(
        "--gateway-metrics",
        default="127.0.0.1:9464",
        metavar="HOST:PORT",
        help="the gateway's /metrics /healthz /readyz (default 127.0.0.1:9464, '' = off)",
    )
    p.add_argument(
        "--twin-metrics",
        default="127.0.0.1:9465",
        metavar="HOST:PORT",
        help="the twin service's /metrics /healthz /readyz (default 127.0.0.1:9465, '' = off)",
    )
    p.add_argument(
        "--callout-metrics",
        default="127.0.0.1:9466",
        metavar="HOST:PORT",
        help="the auth callout's /metrics /healthz /readyz (default 127.0.0.1:9466, '' = off)",
    )
    p.add_argument("--owner", default="dev", help="owner of the printed first-device token")
    p.add_argument(
        "--console",
        default="127.0.0.1:8480",
        metavar="HOST:PORT",
        help="the web console (default 127.0.0.1:8480, '' = off; twinhub_cli/console.py)",
    )
    p.add_argument(
        "--nats-ws-port",
        type=int,
        default=4223,
        help="NATS's websocket listener for the console, loopback (0: any free port)",
    )
    p.add_argument("--nats-ws-url", help="the console's NATS websocket URL (with --nats-url)")
    p.set_defaults(handler=run_up)


def _uri(scheme: str, addr: tuple[str, int] | None) -> str:
    if addr is None:
        return "(disabled)"
    host = f"[{addr[0]}]" if ":" in addr[0] else addr[0]
    return f"{scheme}://{host}:{addr[1]}"


def _nats_step(args: argparse.Namespace) -> str:
    """What ``twinhub up`` does for NATS (its progress line)."""
    if args.nats_url:
        return f"using {args.nats_url}"
    if args.nats_cluster > 1:
        return f"starting {args.nats_cluster} nats-servers as a cluster, waiting for JetStream"
    return f"starting nats-server on {_port(args.nats_port)}, waiting for JetStream"


def _mongo_step(args: argparse.Namespace) -> str:
    if args.mongo_url:
        return f"using {redact(args.mongo_url)}"
    return f"starting mongo-server on {_port(args.mongo_port)}, waiting for it"


def _port(port: int) -> str:
    return f"port {port}" if port else "a free port"


def _start_console(
    stack: contextlib.AsyncExitStack, args: argparse.Namespace, config: Config
) -> ConsoleServer | None:
    """The web console of ``twinhub up`` (``--console``), None when off or without a NATS
    websocket URL (an unbuilt console is said, not fatal: the rest of the stack runs)."""
    from twinhub_cli.console import ConsoleNotBuiltError, serve_console

    if not args.console or not args.nats_ws_url:
        return None
    hp = cfgmod.parse_hostport(args.console, "--console")
    assert hp is not None
    try:
        return stack.enter_context(
            serve_console(
                args.nats_ws_url, host=hp[0], port=hp[1], owner_claim=config.auth.owner_claim
            )
        )
    except ConsoleNotBuiltError as e:
        sys.stderr.write(f"twinhub up: {e}\n")
        return None


def run_up(args: argparse.Namespace) -> int:
    progress = Progress("twinhub up")

    async def main() -> int:
        from bus.credentials import ensure_credentials
        from twinhub_cli import services
        from twinhub_cli.devservices import MongoServer, NatsCluster, NatsServer
        from twinhub_cli.observability import ApiMetrics

        data = DataDir(args.data_dir.resolve())
        data.root.mkdir(parents=True, exist_ok=True)
        async with contextlib.AsyncExitStack() as stack:
            stop = await stack.enter_async_context(_until_signal())
            progress.step("NATS", _nats_step(args))
            nats_url = args.nats_url
            nats_replicas: dict[str, int] = {}
            if not nats_url and args.nats_cluster > 1:
                cluster = await stack.enter_async_context(
                    NatsCluster(
                        data.root / "nats-cluster",
                        args.nats_cluster,
                        port=args.nats_port,
                        route_port=args.nats_route_port,
                        credentials=ensure_credentials(data.bus),
                    )
                )
                nats_url, nats_replicas = cluster.url, {"replicas": cluster.replicas}
            if not nats_url:
                nats = await stack.enter_async_context(
                    NatsServer(
                        data.root / "nats",
                        port=args.nats_port,
                        credentials=ensure_credentials(data.bus),
                        websocket_port=args.nats_ws_port if args.console else None,
                    )
                )
                nats_url = nats.url
                args.nats_ws_url = args.nats_ws_url or nats.ws_url
            progress.step("MongoDB", _mongo_step(args))
            mongo_url = args.mongo_url
            if not mongo_url:
                mongo = await stack.enter_async_context(
                    MongoServer(data.root / "mongo", port=args.mongo_port)
                )
                mongo_url = mongo.url
            host = args.host
            hp = f"[{host}]" if ":" in host else host
            config = cfgmod.load(
                args.config,
                overrides={
                    "nats": {"url": nats_url, **nats_replicas},
                    "mongo": {"url": mongo_url},
                    "gateway": {
                        "tcp": f"{hp}:{args.tcp_port}",
                        "tls": f"{hp}:{args.tls_port}",
                        "device_auth": args.device_auth,
                        "metrics_listen": args.gateway_metrics,
                    },
                    "twin": {"metrics_listen": args.twin_metrics},
                    "callout": {"metrics_listen": args.callout_metrics},
                },
            )
            api_metrics = ApiMetrics()
            progress.step("auth callout", "connecting to NATS")
            callout = await stack.enter_async_context(services.run_callout(config, data))
            callout_ops = await stack.enter_async_context(
                services.callout_observability(config, callout)
            )
            # each service with its own credentials, as when they run apart
            progress.step("twin service", "connecting to NATS, creating the event streams")
            store = await stack.enter_async_context(services.event_store(config, data, "twin"))
            progress.step("twin service", f"connecting to MongoDB ({config.mongo.database})")
            database = await stack.enter_async_context(services.mongo_database(config))
            twins = await stack.enter_async_context(
                services.twin_store(config, database, starting=True)
            )
            progress.step("twin service", "starting the projector, the command API, the reaper")
            projector = await stack.enter_async_context(
                services.run_projector(config, store, twins)
            )
            await stack.enter_async_context(
                services.run_api(config, data, store, twins, metrics=api_metrics)
            )
            await stack.enter_async_context(
                services.run_reaper(config, store, twins, database, metrics=api_metrics)
            )
            progress.step("gateway", "connecting to NATS, taking a lease, opening the listeners")
            gw_store = await stack.enter_async_context(
                services.event_store(config, data, "gateway")
            )
            gw = await stack.enter_async_context(services.run_gateway(config, data, gw_store))
            progress.step("operations", "/metrics /healthz /readyz of the twin and the gateway")
            twin_ops = await stack.enter_async_context(
                services.twin_observability(config, store, twins, projector, api_metrics)
            )
            gw_ops = await stack.enter_async_context(
                services.gateway_observability(config, gw_store, gw)
            )
            info = {
                "pid": os.getpid(),
                "nats_url": nats_url,
                "mongo_url": mongo_url,
                "database": config.mongo.database,
                "coap_tcp": _uri("coap+tcp", gw.tcp_address),
                "coaps_tcp": _uri("coaps+tcp", gw.tls_address),
                "coap_udp": _uri("coap", gw.udp_address),
                "coaps_udp": _uri("coaps", gw.dtls_address),
                "ca_file": str(data.pki / "ca.crt"),
                "gateway_metrics": f"{gw_ops.url}/metrics" if gw_ops else "",
                "twin_metrics": f"{twin_ops.url}/metrics" if twin_ops else "",
                "callout_metrics": f"{callout_ops.url}/metrics" if callout_ops else "",
            }
            data.write_stack(info)
            stack.callback(lambda: data.stack_file.unlink(missing_ok=True))
            token = services.first_device_token(config, data, args.owner)
            console = _start_console(stack, args, config)
            if console is not None:
                info["console_url"] = console.url
                data.write_stack(info)
            progress.done()
            _out("twinhub is up")
            _out(f"  devices (CoAP over TCP)  {info['coap_tcp']}")
            _out(f"  devices (CoAP over TLS)  {info['coaps_tcp']}   CA: {info['ca_file']}")
            _out(f"  simple devices (UDP)     {info['coap_udp']}/api/v1/<token>/...")
            _out(f"  simple devices (DTLS)    {info['coaps_udp']}/api/v1/<token>/...")
            _out(f"  NATS (applications)      {nats_url}   connect with a token (below)")
            _out("    events                 twinhub.ev.<owner>.>  (inbox prefix _INBOX.<owner>)")
            _out("    command API            twinhub.api.v1.<op>")
            _out(f"  MongoDB (twins)          {mongo_url}   db {config.mongo.database}")
            for name, ops in (("gateway", gw_ops), ("twin", twin_ops), ("callout", callout_ops)):
                if ops is not None:
                    _out(f"  {name + ' operations':<24} {ops.url}   /metrics /healthz /readyz")
            if console is not None:
                _out(f"  web console              {console.url}   NATS {console.nats_ws_url}")
            _out(f"  data dir                 {data.root}")
            _out(f"a token of owner {args.owner!r} (24 h; a device signs up with it, an")
            _out("application connects to NATS and calls the API with it):")
            _out(token)
            if console is not None:
                _out(f"sign in to the web console as {args.owner!r} (the token stays in the link):")
                _out(console.sign_in_link(token))
            await stop.wait()
            _out("stopping")
        return 0

    return _run(main, "twinhub up")


# -- twinhub twin get / rebuild, devices ----------------------------------------------------


def register_twin_get(subparsers: SubParsers, name: str, /) -> None:
    p = subparsers.add_parser(name, help="print a device's twin as JSON")
    _common(p)
    p.add_argument("device", help="device ID")
    p.set_defaults(handler=run_twin_get)


def run_twin_get(args: argparse.Namespace) -> int:
    async def main() -> int:
        from twinhub_cli import services

        config = _load_config(args, from_stack=True)
        async with services.twin_store(config) as twins:
            twin = await twins.get(args.device)
        if twin is None:
            sys.stderr.write(f"twinhub: no twin for device {args.device}\n")
            return 1
        _out(json.dumps(twin.to_json(), indent=2, sort_keys=True))
        return 0

    return _run(main)


def register_twin_rebuild(subparsers: SubParsers, name: str, /) -> None:
    p = subparsers.add_parser(
        name,
        help="rebuild the twins from the event log, beside the live ones",
        description="Folds the whole log into a new generation of the twin collections (each "
        "twin written once), makes it the active one in one step, and drops the old one after "
        "--grace seconds. The twin service may run meanwhile: its twins stay readable, and its "
        "projector moves to the new generation within a second.",
    )
    _common(p)
    p.add_argument(
        "--grace",
        type=float,
        default=10.0,
        help="seconds between the switch and dropping the old generation (default 10)",
    )
    p.set_defaults(handler=run_twin_rebuild)


def run_twin_rebuild(args: argparse.Namespace) -> int:
    async def main() -> int:
        from twin.rebuild import rebuild_beside
        from twinhub_cli import services

        config = _load_config(args, from_stack=True)
        started = time.monotonic()
        data = DataDir(args.data_dir.resolve())
        async with (
            services.event_store(config, data, "admin") as store,
            services.twin_store(config) as twins,
        ):
            generation, stats = await rebuild_beside(
                twins, store, name=config.twin.consumer, grace=args.grace
            )
        elapsed = time.monotonic() - started
        _out(
            f"rebuilt {stats.twins_written} twins from {stats.events_applied} events "
            f"in {elapsed:.1f}s (generation {generation} is active)"
        )
        return 0

    return _run(main)


def register_devices(subparsers: SubParsers, name: str, /) -> None:
    p = subparsers.add_parser(
        name,
        help="list devices (a table; -o wide: more columns, -o json / --json: JSON lines)",
    )
    _common(p)
    p.add_argument("--owner", help="only this owner's devices")
    p.add_argument("--online", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--resource-type", help="only devices with a resource of this type")
    p.add_argument("--limit", type=int, default=1000)
    listing.add_output_options(p)
    p.set_defaults(handler=run_devices)


DEVICE_COLUMNS: Final = (
    listing.Column("device"),
    listing.Column("name", wide=True),
    listing.Column("owner"),
    listing.Column("kind", wide=True),
    listing.Column("online"),
    listing.Column("gateway", wide=True),
    listing.Column("address", wide=True),
    listing.Column("sync state"),
    listing.Column("resources"),
    listing.Column("pending", wide=True),
    listing.Column("desired", wide=True),
    listing.Column("position", wide=True),
    listing.Column("last change"),
)


def device_row(t: Twin) -> list[str]:
    """A twin's cells in :data:`DEVICE_COLUMNS`."""
    return [
        t.device_id,
        t.name,
        t.owner,
        "simple" if t.simple else "ocf",
        "yes" if t.online else "no",
        t.connection.gateway,
        t.connection.remote_address,
        t.sync_state,
        str(len(t.resources)),
        str(len(t.pending)),
        str(len(t.desired)),
        str(t.position),
        t.updated_at.isoformat(timespec="seconds"),
    ]


def run_devices(args: argparse.Namespace) -> int:
    async def main() -> int:
        from twinhub_cli import services

        config = _load_config(args, from_stack=True)
        async with services.twin_store(config) as twins:
            found = await twins.find(
                owner=args.owner,
                online=args.online,
                resource_type=args.resource_type,
                limit=args.limit,
            )
        if args.output == "json":
            for t in found:
                _out(json.dumps(t.to_json(), sort_keys=True))
            return 0
        listing.print_table(
            f"{len(found)} device(s)",
            DEVICE_COLUMNS,
            [device_row(t) for t in found],
            wide=args.output == "wide",
        )
        return 0

    return _run(main)


def event_json(e: Any) -> str:
    """An event as one CloudEvents JSON line (attributes + data, log position as ``sequence``)."""
    from proto import binding

    ce = binding.to_cloudevent(e)
    attrs = {
        k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in ce.get_attributes().items()
    }
    return json.dumps(attrs | {"data": ce.get_data()}, sort_keys=True)

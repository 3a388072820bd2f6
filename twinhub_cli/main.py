"""Entry point of the ``twinhub`` command (``twinhub_cli.main:main``).

Commands are registered from :data:`COMMANDS`: a command path (words separated by spaces, e.g.
``"dev services"``) maps to ``"module:function"``. The function is called with the
``argparse`` sub-parsers action of the command's group and the command's last word; it adds its
parser and sets a handler with ``parser.set_defaults(handler=...)``, where the handler takes the
parsed ``argparse.Namespace`` and returns the exit code. Groups (``dev``) are created on demand;
give them a help line in :data:`GROUP_HELP`. To add a command, write its module and add one line
to :data:`COMMANDS`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]

log = logging.getLogger(__name__)

Handler = Callable[[argparse.Namespace], int]


class Registrar(Protocol):
    def __call__(self, subparsers: SubParsers, name: str, /) -> None: ...


COMMANDS: dict[str, str] = {
    "dev services": "twinhub_cli.main:register_dev_services",
    "token": "twinhub_cli.token_cmd:register",
    "init": "twinhub_cli.stack_cmds:register_init",
    "pki": "twinhub_cli.pki_cmd:register",
    "up": "twinhub_cli.stack_cmds:register_up",
    "gateway": "twinhub_cli.stack_cmds:register_gateway",
    "twin run": "twinhub_cli.stack_cmds:register_twin_run",
    "twin get": "twinhub_cli.stack_cmds:register_twin_get",
    "twin rebuild": "twinhub_cli.stack_cmds:register_twin_rebuild",
    "devices": "twinhub_cli.stack_cmds:register_devices",
    "watch": "twinhub_cli.cmd_cmds:register_watch",
    "callout": "twinhub_cli.stack_cmds:register_callout",
    "sim": "devicesim.cli:add_sim_parser",
    "health": "twinhub_cli.health:register",
    "cmd update": "twinhub_cli.cmd_cmds:register_command",
    "cmd retrieve": "twinhub_cli.cmd_cmds:register_command",
    "cmd create": "twinhub_cli.cmd_cmds:register_command",
    "cmd delete": "twinhub_cli.cmd_cmds:register_command",
    "cmd rpc": "twinhub_cli.cmd_cmds:register_rpc",
    "cmd cancel": "twinhub_cli.cmd_cmds:register_cancel",
    "rpc answer": "twinhub_cli.rpc_cmd:register_answer",
    "pending": "twinhub_cli.cmd_cmds:register_pending",
    "desired set": "twinhub_cli.cmd_cmds:register_desired",
    "desired clear": "twinhub_cli.cmd_cmds:register_desired",
    "provision": "twinhub_cli.provision_cmd:register",
}

GROUP_HELP: dict[str, str] = {
    "dev": "development helpers (local servers)",
    "twin": "the twin service and its documents",
    "cmd": "commands to devices through the command API",
    "desired": "desired state of resources",
    "rpc": "client-side RPCs of simple devices (answered through the command API)",
}


def _load(target: str) -> Registrar:
    module_name, _, attr = target.partition(":")
    registrar: Registrar = getattr(importlib.import_module(module_name), attr)
    return registrar


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="twinhub", description="twinhub device-twin backend")
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging level (default: INFO)",
    )
    root = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    groups: dict[tuple[str, ...], SubParsers] = {(): root}
    for path, target in sorted(COMMANDS.items()):
        *group_words, name = path.split()
        for depth in range(1, len(group_words) + 1):
            key = tuple(group_words[:depth])
            if key not in groups:
                word = key[-1]
                group = groups[key[:-1]].add_parser(word, help=GROUP_HELP.get(" ".join(key)))
                groups[key] = group.add_subparsers(
                    title=f"{' '.join(key)} commands", metavar="COMMAND", required=True
                )
        _load(target)(groups[tuple(group_words)], name)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    handler: Handler = args.handler
    return handler(args)


# --- twinhub dev services ----------------------------------------------------------------------


def register_dev_services(subparsers: SubParsers, name: str, /) -> None:
    parser = subparsers.add_parser(
        name,
        help="run NATS (JetStream) and the MongoDB-wire server until SIGINT/SIGTERM",
        description="Start NATS with JetStream and FerretDB on loopback, print their URLs, "
        "and run until SIGINT or SIGTERM. NATS is authenticated as in production: twinhub's "
        "services connect with the NKeys in DATA_DIR/bus (created here, as by `twinhub init`), "
        "applications with a token once an auth callout runs (`twinhub callout`).",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path("data"),
        help="where the servers keep their data and logs (default: ./data)",
    )
    parser.add_argument(
        "--nats-port",
        type=int,
        default=4222,
        help="0 picks a free port (a cluster: the first member's, the others' follow)",
    )
    parser.add_argument("--mongo-port", type=int, default=27017, help="0 picks a free port")
    add_nats_cluster_options(parser)
    parser.set_defaults(handler=_run_dev_services)


def nats_cluster_size(text: str) -> int:
    """``--nats-cluster N``: 1 (a single server) or a cluster of 3 to 5."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if n != 1 and not 3 <= n <= 5:
        raise argparse.ArgumentTypeError("1 (one server) or 3 to 5 servers")
    return n


def add_nats_cluster_options(parser: argparse.ArgumentParser) -> None:
    """``--nats-cluster N`` and ``--nats-route-port``, shared by ``dev services`` and ``up``."""
    parser.add_argument(
        "--nats-cluster",
        type=nats_cluster_size,
        default=1,
        metavar="N",
        help="start N nats-servers on loopback as one JetStream cluster (3 to 5; default 1): "
        "routes authenticated, twinhub's streams with min(3, N) replicas",
    )
    parser.add_argument(
        "--nats-route-port",
        type=int,
        default=6222,
        help="a cluster's first route port, the others' follow (0: free ports; default 6222)",
    )


def _run_dev_services(args: argparse.Namespace) -> int:
    import uvloop

    data_dir: Path = args.data_dir.resolve()
    return uvloop.run(
        _dev_services(
            data_dir, args.nats_port, args.mongo_port, args.nats_cluster, args.nats_route_port
        )
    )


async def _dev_services(
    data_dir: Path,
    nats_port: int,
    mongo_port: int,
    nats_cluster: int = 1,
    nats_route_port: int = 0,
) -> int:
    from bus.credentials import ensure_credentials
    from twinhub_cli.devservices import DevServiceError, MongoServer, NatsCluster, NatsServer

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        async with contextlib.AsyncExitStack() as stack:
            credentials = ensure_credentials(data_dir / "bus")
            nats_server: NatsServer | NatsCluster
            if nats_cluster > 1:
                nats_server = NatsCluster(
                    data_dir / "nats-cluster",
                    nats_cluster,
                    port=nats_port,
                    route_port=nats_route_port,
                    credentials=credentials,
                )
            else:
                nats_server = NatsServer(data_dir / "nats", port=nats_port, credentials=credentials)
            await stack.enter_async_context(nats_server)
            mongo_server = await stack.enter_async_context(
                MongoServer(data_dir / "mongo", port=mongo_port)
            )
            print(f"NATS     {nats_server.url}", flush=True)
            if isinstance(nats_server, NatsCluster):
                print(
                    f"         a cluster of {nats_cluster}: set nats.replicas = "
                    f"{nats_server.replicas} (TWINHUB_NATS_REPLICAS) for the twin service",
                    flush=True,
                )
            print(f"MongoDB  {mongo_server.url}", flush=True)
            print(f"data     {data_dir}", flush=True)
            print(f"bus keys {nats_server.credentials.directory}", flush=True)
            await stop.wait()
            log.info("stopping")
    except DevServiceError as exc:
        from twinhub_cli import exitcodes  # one line and its code (3: a port in use)

        code = exitcodes.report(exc, "twinhub dev services")
        if code is None:
            print(f"twinhub dev services: {exc}", file=sys.stderr)
        return exitcodes.FAILED if code is None else code
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
    return 0


if __name__ == "__main__":
    sys.exit(main())

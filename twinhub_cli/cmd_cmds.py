"""What an application does, from the command line: ``cmd update|retrieve|create|delete|cancel``,
``cmd rpc`` (to a simple device),
``pending``, ``desired set|clear`` through the command API, ``watch`` on the owner's events.

They act as a caller of the API with ``--token T`` (or ``TWINHUB_TOKEN``), or, against a local
stack, with ``--owner O``: a development token for O signed with the data dir's key (what
``twinhub up`` trusts). The NATS URL comes from ``--data-dir``'s ``stack.json`` when a stack runs
there, else from the configuration (``TWINHUB_NATS_URL``; ``TWINHUB_NATS_CA_FILE`` for TLS).
The token is the NATS connection token too: these commands are applications of its owner.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final

from twinhub_cli import listing
from twinhub_cli.config import ConfigError
from twinhub_cli.datadir import DataDir
from twinhub_cli.exitcodes import FAILED, UNREACHABLE, USAGE
from twinhub_cli.stack_cmds import _common, _load_config, _out, _run, _until_signal, event_json

if TYPE_CHECKING:
    from proto.api import PendingCommand
    from twinhub_client import TwinhubClient

    SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]

TOKEN_ENV = "TWINHUB_TOKEN"


def _caller(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--token", help=f"the caller's JWT (default: ${TOKEN_ENV})")
    p.add_argument(
        "--owner", help="act as this owner with a development token of the data dir's stack"
    )
    p.add_argument("--timeout", type=float, default=10.0, help="API request timeout (seconds)")


def _json_arg(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None


def _with_client(args: argparse.Namespace, body: Callable[[TwinhubClient], Awaitable[int]]) -> int:
    async def main() -> int:
        from twinhub_cli import services
        from twinhub_client import ApiError, ServiceUnavailableError, TwinhubClient, TwinhubError

        config = _load_config(args, from_stack=True)
        token = args.token or os.environ.get(TOKEN_ENV)
        if not token:
            if not args.owner:
                raise ConfigError(f"give --token, ${TOKEN_ENV}, or --owner with --data-dir")
            data = DataDir(args.data_dir.resolve())
            token = services.issuer_for(config, data).issue(args.owner, now=time.time(), ttl=3600)
        try:
            async with TwinhubClient(
                config.nats.url,
                token,
                ca_file=config.nats.ca_file or None,
                stream=config.nats.stream,
                timeout=args.timeout,
                owner_claim=config.auth.owner_claim,
            ) as client:
                return await body(client)
        except ApiError as e:
            sys.stderr.write(f"twinhub: {e.code}: {e.message}\n")
            # NATS or the command API not answering: the supervisor's "unreachable"
            return UNREACHABLE if isinstance(e, ServiceUnavailableError) else FAILED
        except TwinhubError as e:
            sys.stderr.write(f"twinhub: {e}\n")
            return FAILED
        except ValueError as e:  # a token that is not a JWT with an owner
            sys.stderr.write(f"twinhub: bad token: {e}\n")
            return USAGE

    return _run(main)


# -- twinhub cmd update|retrieve|create|delete -----------------------------------------------


def register_command(subparsers: SubParsers, name: str, /) -> None:
    takes_content = name in ("update", "create")
    p = subparsers.add_parser(
        name,
        help=f"{name} a resource of a device (prints the accepted command, or with --wait its "
        "outcome event)",
    )
    _caller(p)
    p.add_argument("device", help="device ID")
    p.add_argument("href", help="resource href, e.g. /light/1")
    if takes_content:
        p.add_argument("content", type=_json_arg, help="the content as JSON")
    p.add_argument("--ttl", type=float, default=60.0, help="seconds it may wait for the device")
    p.add_argument("--correlation-id", help="your id for it (default: generated)")
    p.add_argument("--interface", help="OCF interface (if=), e.g. oic.if.baseline")
    p.add_argument("--max-attempts", type=int, help="send attempts if the device does not answer")
    p.add_argument("--wait", action="store_true", help="wait for the outcome and print it")
    p.set_defaults(handler=run_command, op=name)


def run_command(args: argparse.Namespace) -> int:
    async def body(client: TwinhubClient) -> int:
        from proto.events import CommandSucceeded

        result = await client.command(
            args.op,
            args.device,
            args.href,
            getattr(args, "content", None),
            ttl=args.ttl,
            correlation_id=args.correlation_id,
            interface=args.interface,
            max_attempts=args.max_attempts,
            wait=args.wait,
        )
        if not args.wait:
            import msgspec

            _out(json.dumps(msgspec.to_builtins(result), sort_keys=True))
            return 0
        _out(event_json(result))
        return 0 if isinstance(getattr(result, "data", None), CommandSucceeded) else 1

    return _with_client(args, body)


# -- twinhub cmd rpc ------------------------------------------------------------------------


def register_rpc(subparsers: SubParsers, name: str, /) -> None:
    p = subparsers.add_parser(
        name,
        help="a server-side RPC to a simple device (prints the accepted command, or with --wait "
        "its outcome event, the device's answer as its content)",
    )
    _caller(p)
    p.add_argument("device", help="device ID (a simple device)")
    p.add_argument("method", help="the RPC method, e.g. setGpio")
    p.add_argument(
        "params", type=_json_arg, nargs="?", default=None, help="its params as JSON (default null)"
    )
    p.add_argument("--ttl", type=float, default=60.0, help="seconds it may wait for the device")
    p.add_argument("--correlation-id", help="your id for it (default: generated)")
    p.add_argument("--max-attempts", type=int, help="delivery attempts")
    p.add_argument("--wait", action="store_true", help="wait for the outcome and print it")
    p.set_defaults(handler=run_rpc)


def run_rpc(args: argparse.Namespace) -> int:
    async def body(client: TwinhubClient) -> int:
        from proto.events import CommandSucceeded

        result = await client.rpc(
            args.device,
            args.method,
            args.params,
            ttl=args.ttl,
            correlation_id=args.correlation_id,
            max_attempts=args.max_attempts,
            wait=args.wait,
        )
        if not args.wait:
            import msgspec

            _out(json.dumps(msgspec.to_builtins(result), sort_keys=True))
            return 0
        _out(event_json(result))
        return 0 if isinstance(getattr(result, "data", None), CommandSucceeded) else 1

    return _with_client(args, body)


# -- twinhub cmd cancel -------------------------------------------------------------------------


def register_cancel(subparsers: SubParsers, name: str, /) -> None:
    p = subparsers.add_parser(
        name, help="cancel pending commands of a device (one, a resource's, or all)"
    )
    _caller(p)
    p.add_argument("device", help="device ID")
    p.add_argument("--correlation-id", help="only this command")
    p.add_argument("--href", help="only this resource's commands")
    p.set_defaults(handler=run_cancel)


def run_cancel(args: argparse.Namespace) -> int:
    async def body(client: TwinhubClient) -> int:
        result = await client.cancel(
            args.device, correlation_id=args.correlation_id, href=args.href
        )
        _out(f"canceled {len(result.canceled)} command(s)")
        for cid in result.canceled:
            _out(f"  {cid}")
        return 0

    return _with_client(args, body)


# -- twinhub pending ------------------------------------------------------------------------


def register_pending(subparsers: SubParsers, name: str, /) -> None:
    p = subparsers.add_parser(
        name,
        help="list pending commands (a table; -o wide: more columns, -o json / --json: JSON lines)",
    )
    _caller(p)
    p.add_argument("--device", help="only this device's (read up to the log's end)")
    p.add_argument("--href", help="only this resource's")
    p.add_argument("--state", choices=["pending", "sent"])
    p.add_argument("--limit", type=int, default=1000)
    listing.add_output_options(p)
    p.set_defaults(handler=run_pending)


PENDING_COLUMNS: Final = (
    listing.Column("device"),
    listing.Column("href"),
    listing.Column("op"),
    listing.Column("state"),
    listing.Column("correlation id"),
    listing.Column("position", wide=True),
    listing.Column("issued"),
    listing.Column("expires"),
    listing.Column("tries"),
    listing.Column("interface", wide=True),
    listing.Column("content", wide=True),
)


def pending_row(c: PendingCommand) -> list[str]:
    """A pending command's cells in :data:`PENDING_COLUMNS`."""
    if c.content_b64 is not None:
        content = f"base64:{c.content_b64}"
    else:
        content = "" if c.content is None else json.dumps(c.content, sort_keys=True)
    return [
        c.device_id,
        c.href,
        c.op + (" (desired)" if c.reason == "desired" else ""),
        c.state,
        c.correlation_id,
        str(c.position),
        c.issued_at,
        c.expires_at or "-",
        f"{c.attempts}/{c.max_attempts}",
        c.interface or "",
        content,
    ]


def run_pending(args: argparse.Namespace) -> int:
    async def body(client: TwinhubClient) -> int:
        import msgspec

        found = await client.list_pending(
            args.device, href=args.href, state=args.state, limit=args.limit
        )
        if args.output == "json":
            for c in found:
                _out(json.dumps(msgspec.to_builtins(c), sort_keys=True))
            return 0
        listing.print_table(
            f"{len(found)} pending command(s)",
            PENDING_COLUMNS,
            [pending_row(c) for c in found],
            wide=args.output == "wide",
        )
        return 0

    return _with_client(args, body)


# -- twinhub desired set|clear --------------------------------------------------------------


def register_desired(subparsers: SubParsers, name: str, /) -> None:
    setting = name == "set"
    p = subparsers.add_parser(
        name,
        help="set the desired content of a resource"
        if setting
        else "clear the desired content of a resource",
    )
    _caller(p)
    p.add_argument("device", help="device ID")
    p.add_argument("href", help="resource href")
    if setting:
        p.add_argument(
            "content",
            type=_json_arg,
            help="desired content, a JSON object (a simple device's shared attribute "
            "/shared/<key>: its value, any JSON value)",
        )
    p.set_defaults(handler=run_desired, setting=setting)


def run_desired(args: argparse.Namespace) -> int:
    from proto.events import SHARED_PREFIX

    async def body(client: TwinhubClient) -> int:
        if args.setting:
            if not isinstance(args.content, dict) and not args.href.startswith(SHARED_PREFIX):
                sys.stderr.write(
                    "twinhub: desired content must be a JSON object "
                    f"(any JSON value on a shared attribute, {SHARED_PREFIX}<key>)\n"
                )
                return 2
            result = await client.set_desired(args.device, args.href, args.content)
        else:
            result = await client.clear_desired(args.device, args.href)
        _out(f"desired {args.href} of {args.device}: version {result.version}")
        for cid in result.superseded:
            _out(f"  superseded pending update {cid}")
        return 0

    return _with_client(args, body)


# -- twinhub watch ---------------------------------------------------------------------------


def register_watch(subparsers: SubParsers, name: str, /) -> None:
    p = subparsers.add_parser(
        name,
        help="print the owner's events live (JSON lines), gap-free from a position",
        description="Print the events of the token's owner (--owner O on a local stack) as "
        "CloudEvents JSON lines, in log order. With --from POSITION every event after that "
        "position comes once, with no gap (the resync contract: read a twin, note its "
        "position, watch --from it). With --durable NAME the watch resumes after the last "
        "event it printed when started again under that name.",
    )
    _caller(p)
    p.add_argument("--device", help="only this device's events")
    p.add_argument(
        "--type",
        dest="kinds",
        action="append",
        default=None,
        help="only this kind, e.g. resource-changed (repeatable)",
    )
    p.add_argument(
        "--from",
        dest="from_position",
        type=int,
        default=None,
        help="start after this log position (default: from now on)",
    )
    p.add_argument("--durable", help="a durable subscription name (resumes where it stopped)")
    p.add_argument("--count", type=int, default=None, help="stop after this many events")
    p.set_defaults(handler=run_watch)


def run_watch(args: argparse.Namespace) -> int:
    async def body(client: TwinhubClient) -> int:
        owner = await client.owner()
        sub = client.subscribe(
            owner,
            args.device,
            args.kinds,
            from_position=args.from_position,
            durable=args.durable,
        )
        printed = 0
        async with _until_signal() as stop, sub:
            while not stop.is_set() and (args.count is None or printed < args.count):
                e = await sub.next(timeout=0.5)
                if e is not None:
                    _out(event_json(e))
                    printed += 1
        return 0

    return _with_client(args, body)

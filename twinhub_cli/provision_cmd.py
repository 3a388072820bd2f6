"""``twinhub provision``: simple devices (ThingsBoard's device API) and their access tokens.

::

    twinhub provision --owner O [--device ID] [--name N] [--json]   create a device
    twinhub provision rotate DEVICE --owner O [--json]              give it a new token
    twinhub provision revoke DEVICE --owner O                       revoke its token

Creating and rotating print the device's access token on the last line (with ``--json``, one
object ``{"device": ..., "token": ..., "token_id": ...}``): it is shown only then, the service
keeps only its hash. The caller is an application of the owner, as for ``twinhub cmd``: ``--owner
O`` against a local stack (a development token signed with the data dir's key), or ``--token T``
/ ``TWINHUB_TOKEN``.

One parser with an optional action, not sub-commands: ``twinhub provision --owner O`` and
``twinhub provision rotate D --owner O`` both parse, with the same options in any order.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from twinhub_cli.cmd_cmds import _caller, _with_client
from twinhub_cli.stack_cmds import _out

if TYPE_CHECKING:
    from proto.api import DeviceTokenIssued
    from twinhub_client import TwinhubClient

    SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]

ACTIONS = ("revoke", "rotate")


def register(subparsers: SubParsers, name: str, /) -> None:
    p = subparsers.add_parser(
        name,
        help="create a simple device (ThingsBoard's device API) and print its access token; "
        "or revoke / rotate a device's token",
        description="Without an action: create a simple device for the caller's owner and "
        "print its access token on the last line. `revoke DEVICE` revokes the device's token; "
        "`rotate DEVICE` gives it a new one (printed like a new device's) and revokes the old.",
    )
    _caller(p)
    p.add_argument(
        "action", nargs="?", choices=ACTIONS, help="revoke or rotate a token (else: create)"
    )
    p.add_argument("target", nargs="?", metavar="DEVICE", help="the device (revoke, rotate)")
    p.add_argument("--device", help="the new device's id (default: a random UUID)")
    p.add_argument("--name", default="", help="the new device's name")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=run, parser=p)


def _problem(args: argparse.Namespace) -> str | None:
    if args.action is None:
        if args.target is not None:
            return f"unexpected argument {args.target!r} (give --device ID for the new device)"
        return None
    if args.target is None:
        return f"provision {args.action} needs the DEVICE"
    if args.device is not None or args.name:
        return f"--device and --name go with creating a device, not with {args.action}"
    return None


def _issued(args: argparse.Namespace, result: DeviceTokenIssued, what: str) -> None:
    if args.json:
        _out(
            json.dumps(
                {"device": result.device_id, "token": result.token, "token_id": result.token_id}
            )
        )
        return
    _out(f"{what} {result.device_id} (token {result.token_id}); its access token:")
    _out(result.token)


def run(args: argparse.Namespace) -> int:
    problem = _problem(args)
    if problem is not None:
        parser: argparse.ArgumentParser = args.parser
        parser.print_usage(sys.stderr)
        sys.stderr.write(f"twinhub provision: {problem}\n")
        return 2

    async def body(client: TwinhubClient) -> int:
        if args.action is None:
            _issued(args, await client.provision(args.device, args.name), "provisioned device")
        elif args.action == "rotate":
            _issued(args, await client.rotate_token(args.target), "new token for device")
        else:
            revoked = await client.revoke_token(args.target)
            if args.json:
                _out(json.dumps({"device": revoked.device_id, "revoked": revoked.token_id}))
            elif revoked.token_id:
                _out(f"revoked token {revoked.token_id} of device {revoked.device_id}")
            else:
                _out(f"device {revoked.device_id} has no token to revoke")
        return 0

    return _with_client(args, body)

"""``twinhub rpc answer DEVICE REQUEST_ID [RESULT]``: answer a simple device's client-side RPC.

A device's ``POST /api/v1/{token}/rpc`` is an ``rpc-requested`` event (``twinhub watch --type
rpc-requested`` prints them: ``data.request_id``, ``data.method``, ``data.params``); this
answers one through the command API (``answer-rpc``), and the device gets the result as its
CoAP response. The caller is given as for ``twinhub cmd`` (``--token``, or ``--owner`` on a
local stack).
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from twinhub_cli.cmd_cmds import _caller, _json_arg, _with_client
from twinhub_cli.stack_cmds import _out

if TYPE_CHECKING:
    from twinhub_client import TwinhubClient

    SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]


def register_answer(subparsers: SubParsers, name: str, /) -> None:
    p = subparsers.add_parser(
        name,
        help="answer a simple device's client-side RPC (its rpc-requested event's request_id)",
        description="Answer the client-side RPC REQUEST_ID of DEVICE (a POST /api/v1/{token}/rpc "
        "it made, an rpc-requested event: `twinhub watch --type rpc-requested`) with RESULT, "
        "any JSON value (default null). The device gets it as its CoAP response. The first "
        "answer wins; an answer after the device stopped waiting is not_found.",
    )
    _caller(p)
    p.add_argument("device", help="device ID (a simple device)")
    p.add_argument("request_id", help="the request_id of its rpc-requested event")
    p.add_argument(
        "result", type=_json_arg, nargs="?", default=None, help="the result as JSON (default null)"
    )
    p.set_defaults(handler=run_answer)


def run_answer(args: argparse.Namespace) -> int:
    async def body(client: TwinhubClient) -> int:
        import msgspec

        recorded = await client.answer_rpc(args.device, args.request_id, args.result)
        _out(json.dumps(msgspec.to_builtins(recorded), sort_keys=True))
        return 0

    return _with_client(args, body)

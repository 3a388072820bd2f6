"""``twinhub token``: mint a development JWT signed with a local stack's key."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from auth.application import DEFAULT_MAX_LIFETIME
from twinhub_cli.datadir import DataDir

if TYPE_CHECKING:
    SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]


def register(subparsers: SubParsers, name: str, /) -> None:
    p = subparsers.add_parser(
        name,
        help="print a development JWT (last line of the output)",
        description="Mint an ES256 JWT signed with the local stack's key (created on first "
        "use in DATA_DIR/keys). The gateway accepts it as a device's sign-up access token; "
        "clients use it for commands unless it is bound to a device (--device), has no expiry "
        "(--ttl 0) or lives longer than auth.app_token_max_lifetime (7 days by default).",
    )
    p.add_argument("--owner", required=True, help="the owner (the token's sub claim)")
    p.add_argument("--device", help="bind the token to one device ID")
    p.add_argument(
        "--ttl",
        type=float,
        default=3600.0,
        help="lifetime in seconds (default 3600; 0: no expiry, for device sign-up only)",
    )
    p.add_argument(
        "--data-dir",
        type=Path,
        default=Path("data"),
        help="the local stack's data dir (default: ./data)",
    )
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    issuer = DataDir(args.data_dir.resolve()).issuer()
    ttl = None if args.ttl == 0 else args.ttl
    token = issuer.issue(args.owner, now=time.time(), ttl=ttl, device_id=args.device)
    if args.device is None and (ttl is None or ttl > DEFAULT_MAX_LIFETIME):
        sys.stderr.write(
            "twinhub token: a token without expiry or living longer than"
            f" {DEFAULT_MAX_LIFETIME:.0f} s is for device sign-up only: the command API refuses"
            " it (auth.app_token_max_lifetime)\n"
        )
    sys.stdout.write(token + "\n")
    return 0

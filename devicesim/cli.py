"""``twinhub sim``: run a fleet of simulated OCF devices against a gateway.

:func:`add_sim_parser` registers the command on an ``argparse`` sub-parsers action (it has the
``(subparsers, name)`` shape of ``twinhub_cli.main``'s registrars) and sets its handler, which
runs :func:`devicesim.fleet.run_fleet` and prints the JSON summary on stdout.

Tokens: ``--token`` gives every device the same sign-up token; ``--data-dir [--owner]`` mints a
token whenever a device signs up, with the local stack's signing key (as ``twinhub token``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from devicesim.config import BatchSupport, TlsOptions, TokenFactory
from devicesim.errors import SimConfigError

if TYPE_CHECKING:
    SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]


def _positive_int(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return v


def _non_negative_int(text: str) -> int:
    v = int(text)
    if v < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return v


def _non_negative_float(text: str) -> float:
    v = float(text)
    if not v >= 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return v


def add_sim_parser(subparsers: SubParsers, name: str = "sim", /) -> argparse.ArgumentParser:
    """Add the ``sim`` command to ``subparsers``; returns its parser."""
    p = subparsers.add_parser(
        name,
        help="simulate OCF devices against a CoAP gateway",
        description="Run simulated OCF devices (CoAP over TCP/TLS) against a gateway until "
        "SIGINT/SIGTERM or --duration, then print a JSON summary on stdout.",
    )
    p.add_argument(
        "--gateway",
        required=True,
        metavar="URI",
        help="coap+tcp://host[:port] or coaps+tcp://host[:port]",
    )
    p.add_argument("--devices", type=_positive_int, default=1, metavar="N")
    p.add_argument(
        "--resources",
        type=_non_negative_int,
        default=1,
        metavar="R",
        help="lights per device (/light/1..R)",
    )
    p.add_argument(
        "--rate",
        type=_non_negative_float,
        default=0.0,
        metavar="HZ",
        help="value changes per second per device, spread over its resources",
    )
    p.add_argument(
        "--duration",
        type=float,
        default=None,
        metavar="S",
        help="stop after S seconds (default: run until Ctrl-C)",
    )
    tls = p.add_argument_group("TLS")
    tls.add_argument("--tls", action="store_true", help="use TLS (implied by coaps+tcp://)")
    tls.add_argument("--ca", type=Path, metavar="FILE", help="CA file to verify the gateway")
    tls.add_argument("--cert", type=Path, metavar="FILE", help="device certificate (mutual TLS)")
    tls.add_argument("--key", type=Path, metavar="FILE", help="key of --cert")
    tls.add_argument("--server-name", metavar="NAME", help="name to verify (and SNI)")
    tls.add_argument("--insecure", action="store_true", help="do not verify the gateway")
    auth = p.add_argument_group("sign-up token")
    auth.add_argument("--token", metavar="T", help="sign-up token for every device")
    auth.add_argument(
        "--data-dir",
        type=Path,
        metavar="DIR",
        help="mint sign-up tokens with the local stack's key (see `twinhub up`)",
    )
    auth.add_argument("--owner", metavar="O", help="owner of minted tokens (with --data-dir)")
    beh = p.add_argument_group("device behaviour")
    beh.add_argument(
        "--reference-stack",
        action="store_true",
        help="imitate iotivity-lite: no CSM, OCF version options, publish once",
    )
    beh.add_argument(
        "--no-batch",
        action="store_true",
        help="answer the oic.if.b batch observe without Observe (= --batch-mode get-only)",
    )
    beh.add_argument(
        "--batch-mode",
        choices=[b.value for b in BatchSupport],
        default=None,
        help="batch interface support (default: observe)",
    )
    beh.add_argument(
        "--device-prefix",
        default="sim",
        metavar="P",
        help="device names P-<i>; IDs are UUIDs derived from P and i (default: sim)",
    )
    beh.add_argument("--content-format", type=int, choices=[10000, 60, 50], default=10000)
    beh.add_argument(
        "--ping-interval",
        type=_non_negative_float,
        default=20.0,
        metavar="S",
        help="RFC 8323 Ping every S seconds (0: never; default 20)",
    )
    run = p.add_argument_group("run")
    run.add_argument(
        "--connect-concurrency",
        type=_positive_int,
        default=64,
        metavar="C",
        help="devices connecting/signing in at once (default 64)",
    )
    run.add_argument("--seed", type=int, default=None, help="seed for jitter and values")
    run.add_argument(
        "--summary", type=Path, metavar="FILE", help="also write the JSON summary to FILE"
    )
    run.add_argument("--no-progress", action="store_true", help="no live counters on stderr")
    p.set_defaults(handler=run_sim)
    return p


def _batch(args: argparse.Namespace) -> BatchSupport:
    if args.batch_mode is not None:
        return BatchSupport(args.batch_mode)
    return BatchSupport.GET_ONLY if args.no_batch else BatchSupport.OBSERVE


def _tls(args: argparse.Namespace) -> TlsOptions | None:
    wanted = args.tls or args.gateway.lower().startswith("coaps+tcp")
    if not (wanted or args.ca or args.cert or args.key or args.server_name or args.insecure):
        return None
    return TlsOptions(
        ca_file=args.ca,
        cert_file=args.cert,
        key_file=args.key,
        server_name=args.server_name,
        verify=not args.insecure,
    )


def fleet_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The :func:`run_fleet` arguments of a parsed command line (raises SimConfigError)."""
    token: str | TokenFactory
    if args.data_dir is not None:
        token = _minting_factory(args.data_dir, args.owner or "dev")
    elif args.owner is not None:
        raise SimConfigError("--owner needs --data-dir (it mints tokens with the stack's key)")
    elif args.token:
        token = args.token
    else:
        raise SimConfigError("give --token, or --data-dir [--owner] to mint tokens")
    if args.duration is not None and args.duration <= 0:
        raise SimConfigError("--duration must be > 0")
    return {
        "uri": args.gateway,
        "devices": args.devices,
        "resources": args.resources,
        "rate": args.rate,
        "tls": _tls(args),
        "force_tls": args.tls,
        "duration": args.duration,
        "token": token,
        "owner": args.owner,
        "progress": not args.no_progress,
        "reference_stack": args.reference_stack,
        "batch": _batch(args),
        "device_prefix": args.device_prefix,
        "connect_concurrency": args.connect_concurrency,
        "content_format": args.content_format,
        "ping_interval": args.ping_interval or None,
        "seed": args.seed,
    }


def _minting_factory(data_dir: Path, owner: str) -> TokenFactory:
    """Sign-up tokens minted with a local stack's key (``twinhub token`` does the same)."""
    import time

    from twinhub_cli.datadir import DataDir

    issuer = DataDir(data_dir.resolve()).issuer()

    def factory(device_id: str, device_owner: str | None) -> str:
        return issuer.issue(device_owner or owner, now=time.time(), ttl=3600)

    return factory


def run_sim(args: argparse.Namespace) -> int:
    import uvloop

    from devicesim.fleet import run_fleet

    try:
        kwargs = fleet_kwargs(args)
        if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
            # aiocoap logs every connection release at INFO: thousands of lines for a fleet.
            logging.getLogger("devicesim.coap").setLevel(logging.WARNING)
        summary = uvloop.run(run_fleet(**kwargs))
    except SimConfigError as e:
        print(f"twinhub sim: {e}", file=sys.stderr)
        return 2
    text = json.dumps(summary.to_dict(), indent=2)
    print(text, flush=True)
    if args.summary is not None:
        args.summary.write_text(text + "\n", encoding="utf-8")
    return 0 if summary.snapshot.totals["sign_ins"] > 0 else 1

"""``twinhub pki init|server|device``: the development PKI of a local stack.

The CA lives in ``DATA_DIR/pki`` (``ca.crt`` / ``ca.key``), the one ``twinhub up`` uses to
verify device certificates (``--device-auth any-certificate|ocf-identity``) and to sign its
server certificate. Certificates are PEM files ``OUT/<name>.crt`` and ``OUT/<name>.key``.
"""

from __future__ import annotations

import argparse
import re
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from twinhub_cli import pki as devpki
from twinhub_cli.datadir import DataDir

if TYPE_CHECKING:
    SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]

DEFAULT_DATA = Path("data")


def register(subparsers: SubParsers, name: str, /) -> None:
    p = subparsers.add_parser(
        name,
        help="development PKI: a CA, the gateway's certificate, device certificates",
        description="Create the local stack's CA and certificates signed by it (PEM files "
        "NAME.crt / NAME.key). The CA is DATA_DIR/pki/ca.crt, created on first use.",
    )
    sub = p.add_subparsers(title="pki commands", metavar="COMMAND", required=True)

    init = sub.add_parser("init", help="create the CA (kept if it exists)")
    _data_dir(init)
    init.set_defaults(handler=run_init)

    server = sub.add_parser("server", help="issue the gateway's TLS server certificate")
    _data_dir(server)
    server.add_argument(
        "--host",
        action="append",
        required=True,
        help="a DNS name or IP address of the gateway (repeatable)",
    )
    server.add_argument("--out", type=Path, help="directory (default: DATA_DIR/pki)")
    server.add_argument("--name", default="server", help="file name (default: server)")
    server.add_argument("--days", type=int, default=825)
    server.set_defaults(handler=run_server)

    device = sub.add_parser(
        "device",
        help="issue a device certificate (OCF identity, or --any for a plain one)",
        description="With --device-id: an OCF identity certificate (subject CN "
        "uuid:<device-id>, EKUs clientAuth, serverAuth and 1.3.6.1.4.1.44924.1.6). With --any "
        "--cn NAME: a plain client certificate (clientAuth only), e.g. a manufacturer's.",
    )
    _data_dir(device)
    kind = device.add_mutually_exclusive_group(required=True)
    kind.add_argument("--device-id", metavar="UUID", help="the device's ID (OCF identity)")
    kind.add_argument("--any", action="store_true", help="a non-OCF certificate (needs --cn)")
    device.add_argument("--cn", help="subject common name of an --any certificate")
    device.add_argument("--out", type=Path, required=True, help="directory of the files")
    device.add_argument("--name", help="file name (default: the device ID or the CN)")
    device.add_argument("--days", type=int, default=365)
    device.set_defaults(handler=run_device)


def _data_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data-dir",
        type=Path,
        default=DEFAULT_DATA,
        help="the local stack's data dir; its CA signs (default ./data)",
    )


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _err(text: str) -> int:
    sys.stderr.write(f"twinhub pki: {text}\n")
    return 2


def _ca(args: argparse.Namespace) -> devpki.Issued:
    data = DataDir(args.data_dir.resolve())
    existed = (data.pki / f"{devpki.CA_NAME}.crt").exists()
    ca = devpki.load_or_create_ca(data.pki)
    _out(f"CA           {ca.cert_path}{'' if existed else ' (created)'}")
    return ca


def run_init(args: argparse.Namespace) -> int:
    _ca(args)
    return 0


def run_server(args: argparse.Namespace) -> int:
    ca = _ca(args)
    out = args.out or DataDir(args.data_dir.resolve()).pki
    issued = devpki.issue_server(ca, out, args.host, name=args.name, days=args.days)
    _out(f"certificate  {issued.cert_path}")
    _out(f"key          {issued.key_path}")
    return 0


def run_device(args: argparse.Namespace) -> int:
    if args.any:
        if not args.cn:
            return _err("--any needs --cn NAME")
        name = args.name or _file_name(args.cn)
        device_id, common_name = None, args.cn
    else:
        if args.cn:
            return _err("--cn is for --any certificates (an OCF identity's CN is uuid:<id>)")
        try:
            canonical = str(uuid.UUID(args.device_id))
        except ValueError:
            return _err(f"--device-id {args.device_id!r} is not a UUID")
        if canonical != args.device_id.lower():
            return _err(f"--device-id: write the UUID as {canonical}")
        name = args.name or args.device_id
        device_id, common_name = args.device_id, None
    ca = _ca(args)
    issued = devpki.issue_device(
        ca, args.out, device_id=device_id, common_name=common_name, name=name, days=args.days
    )
    _out(f"certificate  {issued.cert_path}")
    _out(f"key          {issued.key_path}")
    return 0


def _file_name(cn: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", cn).strip(".") or "device"

"""What ``twinhub init --bus-export`` writes for a deployment in which every process gets only
its own secrets (compose.yaml): one directory per process, the NATS server's configuration and
certificate, MongoDB's passwords and the script that creates the twin service's user.

The full set stays in the bus directory (``--bus-dir``, default ``<data-dir>/bus``): the NKey
seeds (:mod:`bus.credentials`) and the two MongoDB passwords. The export copies from it::

    EXPORT/gateway/gateway.nk
    EXPORT/twin/twin.nk, consumer-key, mongo-twin-password
    EXPORT/callout/callout.nk, issuer.nk
    EXPORT/admin/admin.nk
    EXPORT/nats/nats.conf [, nats.crt, nats.key]    the server's configuration (TLS: --nats-host)
    EXPORT/nats/nats-cluster.conf [, ca.crt]        a cluster member's (--nats-route; see below)
    EXPORT/mongo/mongo-root-password, mongo-twin-password, mongo-keyfile
    EXPORT/mongo-initdb/twinhub-users.js            for the mongo image's docker-entrypoint-initdb.d

Files are mode 0600 in directories of mode 0700, owned by the user running ``init``; a file
that does not belong in a directory is removed from it. The two MongoDB directories are the
exception: the mongo image's server runs as its own user (``mongodb``), which reads them through
the group of the user running ``init`` (compose runs it as ``mongodb:<that group>``), so they are
0640 in directories of mode 0750.

A NATS cluster (``--nats-route HOST:PORT`` for each member, compose's ``cluster`` profile):
``nats-cluster.conf`` is ``nats.conf`` plus the cluster block of :func:`bus.serverconf.
render_server_config` -- routes to every member on ``HOST:PORT``, listening on port ``PORT`` of
every address, admitted with the route password of the bus directory (``route-password``,
which is why that file is 0600 like a key), TLS with the server's certificate and verified
against ``ca.crt`` (the CA, copied beside it) when ``--nats-host`` gives TLS. Every member runs
the same file; each is named by its command line (``--name``), and drops the route to itself.
``mongo-keyfile`` is the shared key of a MongoDB replica set's members (``--keyFile``).

Running ``init`` again keeps every key, password and certificate (a certificate is issued again
only when the names, the CA or the remaining validity call for it).
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import json
import os
import secrets
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from bus.credentials import (
    CONSUMER_KEY,
    ISSUER,
    BusCredentials,
    ensure_route_password,
    write_secret,
)
from bus.permissions import Role
from bus.serverconf import ClusterRoutes, ServerTls, render_server_config
from twinhub_cli import pki as devpki

__all__ = [
    "DEFAULT_MONGO_USER",
    "EXPORTS",
    "MONGO_DIR",
    "MONGO_INITDB_DIR",
    "MONGO_INITDB_SCRIPT",
    "MONGO_KEYFILE",
    "MONGO_ROOT_PASSWORD",
    "MONGO_TWIN_PASSWORD",
    "NATS_CA",
    "NATS_CERT",
    "NATS_CLUSTER_CONF",
    "NATS_CONF",
    "NATS_DIR",
    "NATS_KEY",
    "ExportError",
    "ExportOptions",
    "Exported",
    "MongoSecrets",
    "ensure_mongo_secrets",
    "ensure_nats_certificate",
    "export_bus",
    "initdb_script",
]

DEFAULT_MONGO_USER: Final = "twinhub"  # the twin service's MongoDB user when mongo.username is ""
MONGO_ROOT_PASSWORD: Final = "mongo-root-password"
MONGO_TWIN_PASSWORD: Final = "mongo-twin-password"
MONGO_KEYFILE: Final = "mongo-keyfile"

# what each process of twinhub reads: its own NKey seed, plus the callout's issuer key and the
# twin service's consumer key and MongoDB password
EXPORTS: Final[Mapping[Role, tuple[str, ...]]] = {
    "gateway": ("gateway.nk",),
    "twin": ("twin.nk", CONSUMER_KEY, MONGO_TWIN_PASSWORD),
    "callout": ("callout.nk", f"{ISSUER}.nk"),
    "admin": ("admin.nk",),
}
NATS_DIR: Final = "nats"
NATS_CONF: Final = "nats.conf"
NATS_CLUSTER_CONF: Final = "nats-cluster.conf"
NATS_CA: Final = "ca.crt"
NATS_CERT: Final = "nats.crt"
NATS_KEY: Final = "nats.key"
MONGO_DIR: Final = "mongo"
MONGO_INITDB_DIR: Final = "mongo-initdb"
MONGO_INITDB_SCRIPT: Final = "twinhub-users.js"

PRIVATE_DIR: Final = 0o700
PRIVATE_FILE: Final = 0o600
GROUP_DIR: Final = 0o750
GROUP_FILE: Final = 0o640
CERT_DAYS: Final = 825
CERT_RENEW_BEFORE: Final = dt.timedelta(days=30)


class ExportError(RuntimeError):
    """The export cannot be written as it must be (a directory of another user, ...)."""


@dataclass(frozen=True, slots=True)
class MongoSecrets:
    """The MongoDB passwords in the bus directory: the root user's and the twin service's."""

    directory: Path

    @property
    def root_password_file(self) -> Path:
        return self.directory / MONGO_ROOT_PASSWORD

    @property
    def twin_password_file(self) -> Path:
        return self.directory / MONGO_TWIN_PASSWORD

    @property
    def keyfile(self) -> Path:
        """A replica set's internal authentication key (``mongod --keyFile``)."""
        return self.directory / MONGO_KEYFILE


def ensure_mongo_secrets(directory: Path) -> MongoSecrets:
    """Random passwords (256 bits, URL-safe text) and a replica-set key (512 random bytes in
    base64, the alphabet mongod accepts) in ``directory``, created where missing."""
    found = MongoSecrets(directory)
    for path in (found.root_password_file, found.twin_password_file):
        if not path.exists():
            write_secret(path, secrets.token_urlsafe(32).encode())
    if not found.keyfile.exists():
        write_secret(found.keyfile, base64.b64encode(secrets.token_bytes(512)))
    return found


def _names(hosts: Iterable[str]) -> frozenset[str]:
    out = set()
    for h in hosts:
        try:
            out.add(str(ipaddress.ip_address(h)))
        except ValueError:
            out.add(h.lower())
    return frozenset(out)


def _certificate_names(cert: x509.Certificate) -> frozenset[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return frozenset()
    dns = san.get_values_for_type(x509.DNSName)
    ips = [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    return _names([*dns, *ips])


def _still_good(cert_path: Path, key_path: Path, ca: devpki.Issued, hosts: frozenset[str]) -> bool:
    if not (cert_path.is_file() and key_path.is_file()):
        return False
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        cert.verify_directly_issued_by(ca.cert)
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (ValueError, TypeError, InvalidSignature):
        return False
    if key.public_key() != cert.public_key():
        return False
    expires = cert.not_valid_after_utc
    if expires - dt.datetime.now(dt.UTC) < CERT_RENEW_BEFORE:
        return False
    return _certificate_names(cert) == hosts


def ensure_nats_certificate(ca: devpki.Issued, directory: Path, hosts: Iterable[str]) -> Path:
    """``directory/nats.crt`` (and ``nats.key``): the NATS server's certificate from ``ca`` for
    ``hosts``, issued when missing, for other names, by another CA or close to expiry."""
    wanted = list(dict.fromkeys(hosts))
    if not wanted:
        raise ValueError("a NATS server certificate needs at least one name")
    cert_path, key_path = directory / NATS_CERT, directory / NATS_KEY
    if not _still_good(cert_path, key_path, ca, _names(wanted)):
        devpki.issue_server(ca, directory, wanted, name=NATS_CERT.removesuffix(".crt"))
    for path in (cert_path, key_path):
        path.chmod(PRIVATE_FILE)
    return cert_path


def initdb_script(*, user: str, database: str, password_file: Path) -> str:
    """A mongosh script (the mongo image runs ``/docker-entrypoint-initdb.d/*.js`` once, on an
    empty data directory) that creates ``user`` in ``database`` with ``readWrite`` on that
    database only. The password is read from ``password_file`` as the mongo container sees it:
    it is in neither the script nor the environment."""
    u, db, pw = json.dumps(user), json.dumps(database), json.dumps(str(password_file))
    return f"""\
// Written by `twinhub init`: the twin service's own MongoDB user, allowed to read and write
// its database and nothing else. The mongo image runs this once, on an empty data directory.
// The password comes from the secret file (not from this script nor the environment).
const password = require("fs").readFileSync({pw}, "utf8").replace(/[\\r\\n]+$/, "");
if (password.length === 0) {{
  throw new Error("twinhub: the password file " + {pw} + " is empty");
}}
const twinDb = db.getSiblingDB({db});
if (twinDb.getUser({u}) === null) {{
  twinDb.createUser({{ user: {u}, pwd: password, roles: [{{ role: "readWrite", db: {db} }}] }});
}}
"""


@dataclass(frozen=True, slots=True)
class ExportOptions:
    """How the exported files refer to each other.

    ``nats_hosts``: names of the NATS server's TLS certificate (none: no TLS).
    ``nats_conf_dir``: where the NATS server sees ``EXPORT/nats`` (the paths in nats.conf);
    ``mongo_conf_dir``: where the mongo container sees ``EXPORT/mongo`` (the path in the initdb
    script). ``None``: the export's own directory (a server on this machine).
    ``nats_routes``: ``(host, port)`` of every member of a NATS cluster (none: no cluster
    configuration); each member listens for routes on its ``port``.
    """

    stream: str
    projector: str
    mongo_user: str
    mongo_database: str
    nats_hosts: tuple[str, ...] = ()
    nats_conf_dir: Path | None = None
    mongo_conf_dir: Path | None = None
    nats_routes: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "nats_routes", tuple(self.nats_routes))
        if len({port for _, port in self.nats_routes}) > 1:
            raise ValueError("the members of a NATS cluster listen for routes on one port")


@dataclass(frozen=True, slots=True)
class Exported:
    directory: Path
    nats_conf: Path
    nats_cert: Path | None
    initdb_script: Path
    nats_cluster_conf: Path | None = None


def _own_dir(path: Path, mode: int) -> None:
    path.mkdir(parents=True, exist_ok=True, mode=mode)
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode):
        raise ExportError(f"{path} is not a directory")
    if st.st_uid != os.geteuid():
        raise ExportError(
            f"{path} belongs to uid {st.st_uid}, not to the user running init ({os.geteuid()}):"
            " its files would not be private to it"
        )
    if stat.S_IMODE(st.st_mode) != mode:
        path.chmod(mode)


def _put(path: Path, data: bytes, mode: int) -> None:
    """``data`` at ``path`` with ``mode``, rewritten only when it differs."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        st = None
    if (
        st is not None
        and stat.S_ISREG(st.st_mode)
        and st.st_uid == os.geteuid()
        and path.read_bytes() == data
    ):
        if stat.S_IMODE(st.st_mode) != mode:
            path.chmod(mode)
        return
    write_secret(path, data)  # created 0600 (never more open), then widened if asked
    if mode != PRIVATE_FILE:
        path.chmod(mode)


def _prune(directory: Path, keep: Iterable[str]) -> None:
    """Remove the files of ``directory`` that are not in ``keep``."""
    wanted = set(keep)
    for entry in directory.iterdir():
        if entry.name not in wanted and (entry.is_symlink() or not entry.is_dir()):
            entry.unlink()


def export_bus(
    creds: BusCredentials,
    mongo: MongoSecrets,
    ca: devpki.Issued,
    directory: Path,
    options: ExportOptions,
) -> Exported:
    """Write the export under ``directory`` (see the module's documentation)."""
    directory.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR)
    sources: dict[str, Path] = {
        **{f"{role}.nk": creds.seed_file(role) for role in EXPORTS},
        f"{ISSUER}.nk": creds.issuer_file,
        CONSUMER_KEY: creds.consumer_key_file,
        MONGO_ROOT_PASSWORD: mongo.root_password_file,
        MONGO_TWIN_PASSWORD: mongo.twin_password_file,
        MONGO_KEYFILE: mongo.keyfile,
    }
    for role, names in EXPORTS.items():
        role_dir = directory / role
        _own_dir(role_dir, PRIVATE_DIR)
        for name in names:
            _put(role_dir / name, sources[name].read_bytes(), PRIVATE_FILE)
        _prune(role_dir, names)

    nats_dir = directory / NATS_DIR
    _own_dir(nats_dir, PRIVATE_DIR)
    seen_from = options.nats_conf_dir or nats_dir.resolve()
    tls: ServerTls | None = None
    cert: Path | None = None
    nats_files = [NATS_CONF]
    if options.nats_hosts:
        cert = ensure_nats_certificate(ca, nats_dir, options.nats_hosts)
        tls = ServerTls(cert_file=seen_from / NATS_CERT, key_file=seen_from / NATS_KEY)
        nats_files += [NATS_CERT, NATS_KEY]
    conf = render_server_config(
        issuer=creds.issuer_public(),
        users=creds.users(),
        stream=options.stream,
        projector=options.projector,
        tls=tls,
    )
    _put(nats_dir / NATS_CONF, conf.encode(), PRIVATE_FILE)
    cluster_conf: Path | None = None
    if options.nats_routes:
        routes = ClusterRoutes(
            listen_host="0.0.0.0",
            listen_port=options.nats_routes[0][1],
            routes=options.nats_routes,
            password=ensure_route_password(creds.directory),
            ca_file=seen_from / NATS_CA if tls is not None else None,
        )
        if tls is not None:
            _put(nats_dir / NATS_CA, ca.cert.public_bytes(serialization.Encoding.PEM), PRIVATE_FILE)
            nats_files.append(NATS_CA)
        text = render_server_config(
            issuer=creds.issuer_public(),
            users=creds.users(),
            stream=options.stream,
            projector=options.projector,
            tls=tls,
            cluster=routes,
        )
        cluster_conf = nats_dir / NATS_CLUSTER_CONF
        _put(cluster_conf, text.encode(), PRIVATE_FILE)
        nats_files.append(NATS_CLUSTER_CONF)
    _prune(nats_dir, nats_files)

    mongo_dir = directory / MONGO_DIR
    _own_dir(mongo_dir, GROUP_DIR)
    for name in (MONGO_ROOT_PASSWORD, MONGO_TWIN_PASSWORD, MONGO_KEYFILE):
        _put(mongo_dir / name, sources[name].read_bytes(), GROUP_FILE)
    _prune(mongo_dir, (MONGO_ROOT_PASSWORD, MONGO_TWIN_PASSWORD, MONGO_KEYFILE))

    initdb_dir = directory / MONGO_INITDB_DIR
    _own_dir(initdb_dir, GROUP_DIR)
    script = initdb_script(
        user=options.mongo_user,
        database=options.mongo_database,
        password_file=(options.mongo_conf_dir or mongo_dir.resolve()) / MONGO_TWIN_PASSWORD,
    )
    _put(initdb_dir / MONGO_INITDB_SCRIPT, script.encode(), GROUP_FILE)
    _prune(initdb_dir, (MONGO_INITDB_SCRIPT,))
    return Exported(
        directory, nats_dir / NATS_CONF, cert, initdb_dir / MONGO_INITDB_SCRIPT, cluster_conf
    )

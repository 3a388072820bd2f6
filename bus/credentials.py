"""The bus's keys in a directory: NKey seeds of the service users and of the callout's issuer.

Layout (every seed file mode 0600, the directory 0700)::

    DIR/gateway.nk, twin.nk, callout.nk, admin.nk    a user NKey seed per service role
    DIR/issuer.nk                                    the account key the auth callout signs with
    DIR/consumer-key                                 32 random bytes: applications' consumer names
    DIR/route-password                               a NATS cluster's route password (clusters only)

``twinhub init`` creates them once (:func:`ensure_credentials`); a process then needs only its
own seed (:meth:`BusCredentials.seed_file`), and compose hands each service only its own.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import nkeys

from bus.permissions import ROLES, Role

__all__ = [
    "BusCredentials",
    "ensure_credentials",
    "ensure_route_password",
    "public_key",
    "write_secret",
]

ISSUER: Final = "issuer"
CONSUMER_KEY: Final = "consumer-key"
ROUTE_PASSWORD: Final = "route-password"


def write_secret(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` with mode 0600 from the start (never readable by others)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(path.name + ".tmp")
    # a fresh file: a stale temporary file (or a symlink) there keeps its mode (or target)
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _new_seed(prefix: int) -> bytes:
    return bytes(nkeys.encode_seed(os.urandom(32), prefix))


def public_key(seed: bytes) -> str:
    """The public key (U... / A...) of an NKey seed."""
    kp = nkeys.from_seed(bytearray(seed.strip()))
    try:
        return bytes(kp.public_key).decode()
    finally:
        kp.wipe()


@dataclass(frozen=True, slots=True)
class BusCredentials:
    directory: Path

    def seed_file(self, role: Role) -> Path:
        return self.directory / f"{role}.nk"

    @property
    def issuer_file(self) -> Path:
        return self.directory / f"{ISSUER}.nk"

    @property
    def consumer_key_file(self) -> Path:
        return self.directory / CONSUMER_KEY

    def users(self) -> dict[Role, str]:
        """Each role's public key, from its seed file."""
        return {r: public_key(self.seed_file(r).read_bytes()) for r in ROLES}

    def issuer_public(self) -> str:
        return public_key(self.issuer_file.read_bytes())

    def exists(self) -> bool:
        files = [self.seed_file(r) for r in ROLES] + [self.issuer_file, self.consumer_key_file]
        return all(f.is_file() for f in files)


def ensure_credentials(directory: Path) -> BusCredentials:
    """The bus's keys under ``directory``, created where missing (kept where present)."""
    creds = BusCredentials(directory)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    directory.chmod(0o700)  # also when it existed: nobody else lists the keys
    for role in ROLES:
        path = creds.seed_file(role)
        if not path.exists():
            write_secret(path, _new_seed(nkeys.PREFIX_BYTE_USER))
    if not creds.issuer_file.exists():
        write_secret(creds.issuer_file, _new_seed(nkeys.PREFIX_BYTE_ACCOUNT))
    if not creds.consumer_key_file.exists():
        write_secret(creds.consumer_key_file, os.urandom(32))
    return creds


def ensure_route_password(directory: Path) -> str:
    """The route password of a NATS cluster (``directory/route-password``, 256 random bits as
    URL-safe text), created when missing: every member admits its peers' routes with it."""
    path = directory / ROUTE_PASSWORD
    if not path.exists():
        write_secret(path, secrets.token_urlsafe(32).encode())
    password = path.read_text(encoding="ascii").strip()
    if len(password) < 16:
        raise ValueError(f"{path}: a route password of at least 16 characters is needed")
    return password

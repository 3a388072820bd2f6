"""The bus settings of a process: where its credentials are, how it connects (``nats.*``).

Kept apart from :mod:`twinhub_cli.services` so that light commands (``twinhub health``) need
not import the services.
"""

from __future__ import annotations

from pathlib import Path

from bus.credentials import BusCredentials
from bus.permissions import Role, inbox_prefix
from eventstore.adapters.endpoint import NatsEndpoint
from twinhub_cli.config import Config, ConfigError
from twinhub_cli.datadir import DataDir

__all__ = ["bus_credentials", "nats_endpoint", "secret_file"]


def bus_credentials(config: Config, data: DataDir) -> BusCredentials:
    """Where this process's bus credentials are: ``nats.credentials``, else ``<data-dir>/bus``."""
    return BusCredentials(Path(config.nats.credentials) if config.nats.credentials else data.bus)


def secret_file(path: Path, what: str) -> Path:
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise ConfigError(
            f"nats.credentials: no {what} at {path} (create the bus credentials with"
            " `twinhub init`, or point nats.credentials at them)"
        ) from None
    if mode & 0o077:
        raise ConfigError(f"nats.credentials: {path} is readable by others: chmod 600 it")
    return path


def nats_endpoint(config: Config, data: DataDir, role: Role) -> NatsEndpoint:
    """How service ``role`` connects: ``nats.url`` with its own NKey seed (mode 0600), its own
    inbox prefix, and ``nats.ca_file`` to verify the server's certificate."""
    seed = secret_file(bus_credentials(config, data).seed_file(role), f"NKey seed of {role}")
    ca = Path(config.nats.ca_file) if config.nats.ca_file else None
    if ca is not None and not ca.is_file():
        raise ConfigError(f"nats.ca_file: no such file: {ca}")
    try:
        return NatsEndpoint(
            config.nats.url, seed_file=seed, ca_file=ca, inbox_prefix=inbox_prefix(role)
        )
    except ValueError as e:
        raise ConfigError(f"nats.url: {e}") from None

"""A simulator of OCF devices for the twinhub gateway (CoAP over TCP/TLS, RFC 8323).

* :class:`SimDevice` — one device: sign-up, sign-in, publish, serving ``/oic/res`` (with the
  ``oic.if.b`` batch interface), ``/oic/d``, ``/oic/p`` and ``/light/N`` over the connection it
  opened, value changes, token refresh, pings, reconnects with back-off.
* :func:`run_fleet` — many devices with bounded connect concurrency, live counters, a JSON summary.
* ``twinhub sim`` — the command line (:mod:`devicesim.cli`).
"""

from __future__ import annotations

from devicesim.backoff import BackoffPolicy
from devicesim.config import (
    BatchSupport,
    DeviceConfig,
    GatewayAddress,
    TlsOptions,
    TokenFactory,
    device_id_for,
    parse_gateway_uri,
)
from devicesim.device import DeviceState, SimDevice
from devicesim.errors import (
    SimConfigError,
    SimConnectionError,
    SimError,
    SimProtocolError,
    SimTimeoutError,
    SimUnauthorizedError,
)
from devicesim.fleet import run_fleet
from devicesim.stats import DeviceStats, FleetSnapshot, FleetSummary

__all__ = [
    "BackoffPolicy",
    "BatchSupport",
    "DeviceConfig",
    "DeviceState",
    "DeviceStats",
    "FleetSnapshot",
    "FleetSummary",
    "GatewayAddress",
    "SimConfigError",
    "SimConnectionError",
    "SimDevice",
    "SimError",
    "SimProtocolError",
    "SimTimeoutError",
    "SimUnauthorizedError",
    "TlsOptions",
    "TokenFactory",
    "device_id_for",
    "parse_gateway_uri",
    "run_fleet",
]

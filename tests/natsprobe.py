"""Connection attempts the server must refuse, shared by the bus, compose and dev-server tests."""

from __future__ import annotations

from typing import Any

import nats.errors
from nats.aio.client import Client as NatsClient

__all__ = ["refused"]


async def refused(url: str, *, connect_timeout: float = 10.0, **opts: Any) -> str:
    """Connect as told and assert the server did not admit the connection; the errors it was
    refused with (empty when the server just dropped it during the handshake)."""
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    nc = NatsClient()  # not nats.connect: a refused connect would leak its socket
    try:
        await nc.connect(
            url,
            error_cb=on_error,
            allow_reconnect=False,
            max_reconnect_attempts=1,
            reconnect_time_wait=0.05,
            connect_timeout=connect_timeout,
            **opts,
        )
    except (nats.errors.Error, OSError, TimeoutError) as e:
        errors.append(repr(e))
    finally:
        # nats-py returns an unconnected client when the server drops the connection during
        # the handshake (no answer from the callout: the server's authorization timeout)
        admitted = nc.is_connected
        await nc.close()
    assert not admitted, "the server admitted the connection"
    return " ".join(errors)

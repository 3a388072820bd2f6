"""The auth callout's driver: a NATS subscriber on ``$SYS.REQ.USER.AUTH`` in the AUTH account.

Several instances may run (a queue group). It fails closed: while no instance answers, the
server admits no application (nothing but the service users get in). :attr:`CalloutService.ready`
says whether this instance is connected and subscribed (its ``/readyz``), :attr:`stats` what
it decided (its metrics). Tokens are logged never; a refusal is logged with the client's
address and the reason.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import nats
import nats.errors
import nkeys
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from bus.callout import Caller, CalloutError, TokenCheck, decode_request, deny, grant
from bus.permissions import CALLOUT_SUBJECT
from eventstore.adapters.endpoint import ConnectionLog, NatsEndpoint

__all__ = ["CalloutService", "CalloutStats"]

log = logging.getLogger(__name__)

KeyRefresh = Callable[[Exception], Awaitable[bool]]
QUEUE = "twinhub-callout"


@dataclass(slots=True)
class CalloutStats:
    requests: int = 0
    granted: int = 0
    denied: int = 0
    malformed: int = 0
    last_latency: float = 0.0


class CalloutService:
    """Validates application tokens for the server (see the module docstring)."""

    def __init__(
        self,
        endpoint: NatsEndpoint,
        issuer_seed: Path,
        validator: TokenCheck,
        *,
        stream: str,
        reserved: Sequence[str],
        max_lifetime: float = 24 * 3600.0,
        refresh_keys: KeyRefresh | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._endpoint = endpoint
        self._signer = nkeys.from_seed(bytearray(issuer_seed.read_bytes().strip()))
        self._validator = validator
        self._stream = stream
        self._reserved = tuple(reserved)
        self._max_lifetime = max_lifetime
        self._refresh = refresh_keys
        self._clock = clock
        self._nc: NatsClient | None = None
        self._conn_log: ConnectionLog | None = None
        self._sub: Subscription | None = None
        self.stats = CalloutStats()

    @property
    def issuer(self) -> str:
        return bytes(self._signer.public_key).decode()

    @property
    def ready(self) -> bool:
        return self._nc is not None and self._nc.is_connected and self._sub is not None

    async def __aenter__(self) -> Self:
        nc = NatsClient()
        self._conn_log = ConnectionLog(nc, log, "callout", str(self._endpoint))
        options: dict[str, Any] = {  # nats-py annotates the times as int; floats work
            **self._endpoint.connect_options(),
            **self._conn_log.callbacks(),
            "name": "twinhub-callout",
            "max_reconnect_attempts": -1,
            "reconnect_time_wait": 0.25,
        }
        await nc.connect(**options)
        self._conn_log.connected()
        self._nc = nc
        self._sub = await self._nc.subscribe(CALLOUT_SUBJECT, queue=QUEUE, cb=self._on_request)
        await self._nc.flush()
        log.info("auth callout serving on %s (issuer %s)", self._endpoint, self.issuer)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        nc, self._nc = self._nc, None
        self._sub = None
        if nc is not None:
            if self._conn_log is not None:
                self._conn_log.closing()
            try:
                await nc.drain()
            except (TimeoutError, nats.errors.Error, OSError) as e:
                log.debug("callout drain: %r", e)

    async def _validate(self, token: str, now: float) -> Caller:
        try:
            return self._validator.validate(token, now)
        except Exception as e:
            if self._refresh is None or not await self._refresh(e):
                raise
        return self._validator.validate(token, now)  # once more, after a key refresh

    async def _on_request(self, msg: Msg) -> None:
        started = time.perf_counter()
        now = self._clock()
        self.stats.requests += 1
        try:
            request = decode_request(msg.data)
        except CalloutError as e:
            self.stats.malformed += 1
            log.warning("auth callout: unreadable request: %s", e)
            return  # no answer: the server times out and refuses the client
        if request.token is None:
            body = deny(request, self._signer, now, "an application token is required")
            self.stats.denied += 1
            log.info("auth callout: refused %s: no token", request.client_host)
        else:
            try:
                caller = await self._validate(request.token, now)
            except Exception as e:  # the validator's own error type: refused, with its reason
                body = deny(request, self._signer, now, f"token refused: {e}")
                self.stats.denied += 1
                log.info("auth callout: refused %s: %s", request.client_host, e)
            else:
                try:
                    body, exp = grant(
                        request,
                        caller,
                        self._signer,
                        now,
                        stream=self._stream,
                        reserved=self._reserved,
                        max_lifetime=self._max_lifetime,
                    )
                except ValueError as e:  # an owner no subject can hold (proto SubjectError)
                    body = deny(request, self._signer, now, f"token refused: {e}")
                    self.stats.denied += 1
                    log.info("auth callout: refused %s: %s", request.client_host, e)
                else:
                    self.stats.granted += 1
                    log.debug(
                        "auth callout: %s admitted as owner %r until %d",
                        request.client_host,
                        caller.owner,
                        exp,
                    )
        try:
            await msg.respond(body)
        except (nats.errors.Error, OSError) as e:
            log.warning("auth callout: cannot answer: %r", e)
        self.stats.last_latency = time.perf_counter() - started

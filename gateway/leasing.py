"""The driver of a gateway instance's lease (:mod:`gateway.lease`) on the lease stream.

:class:`GatewayLease` is an async context manager: on entry it supersedes the older runs of
its gateway id that still hold a lease and acquires a lease for a new instance; while the
block runs it renews it; on exit it releases it. The gateway serves as :attr:`instance`
(its connection ids carry it, :func:`proto.leases.connection_id`), so enter the lease before
the gateway and leave it after: the gateway's own offline events are in the log before the
release.

If the lease is lost (a renewal refused: the twin service claimed the instance or a newer run
superseded it), a new instance acquires a lease and ``on_new_instance`` is called with it: the
gateway then closes its connections (:meth:`gateway.service.Gateway.adopt_instance`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Final, Self

from eventstore.errors import ConcurrencyError, EventStoreError
from eventstore.ports import EventStore
from gateway.lease import LeaseConfig, LeaseHolder, LeaseWrite
from proto.errors import LeaseError
from proto.leases import decode_entry, gateway_scope, new_instance_id
from proto.message import NatsMessage

__all__ = ["GatewayLease", "LeaseStats"]

log = logging.getLogger(__name__)

SUPERSEDE_ATTEMPTS: Final = 3
RELEASE_TIMEOUT: Final = 5.0


@dataclass
class LeaseStats:
    renewals: int = 0
    failures: int = 0  # writes whose outcome was unknown (retried)
    lost: int = 0  # leases lost (a new instance took over)
    superseded: int = 0  # older runs marked superseded at start


class GatewayLease:
    """Holds the lease of this gateway's current instance (see the module docstring)."""

    def __init__(
        self,
        leases: EventStore,
        gateway_id: str,
        config: LeaseConfig | None = None,
        *,
        clock: Callable[[], float] = time.time,
        on_new_instance: Callable[[str], None] | None = None,
        acquire_timeout: float = 60.0,
    ) -> None:
        self._leases = leases
        self.gateway_id = gateway_id
        self.config = config or LeaseConfig()
        self._clock = clock
        self.on_new_instance = on_new_instance
        self._acquire_timeout = acquire_timeout
        self._holder = LeaseHolder(gateway_id, new_instance_id(), self.config)
        self._task: asyncio.Task[None] | None = None
        self.stats = LeaseStats()

    @property
    def instance(self) -> str:
        return self._holder.instance

    async def __aenter__(self) -> Self:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._acquire_timeout
        while True:
            try:
                await self._supersede()
                await self._acquire(self._holder)
                break
            except ConcurrencyError:
                raise  # a fresh random instance's scope is never taken
            except EventStoreError as e:
                if loop.time() >= deadline:
                    raise
                log.warning("gateway %s: cannot acquire a lease yet: %s", self.gateway_id, e)
                await asyncio.sleep(self.config.retry_interval)
        log.info(
            "gateway %s: instance %s holds a lease of %gs",
            self.gateway_id,
            self.instance,
            self.config.lease,
        )
        self._task = asyncio.create_task(self._run(), name=f"gateway-lease:{self.gateway_id}")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        write = self._holder.release(self._clock())
        if write is None:
            return
        try:
            async with asyncio.timeout(RELEASE_TIMEOUT):
                await self._append(write)
            log.info("gateway %s: instance %s released its lease", self.gateway_id, self.instance)
        except (EventStoreError, TimeoutError) as e:  # it lapses instead
            log.warning("gateway %s: could not release the lease: %s", self.gateway_id, e)

    async def _append(self, write: LeaseWrite) -> int:
        message = NatsMessage(
            subject=write.subject, msg_id=write.msg_id, data=write.record.encode()
        )
        result = await self._leases.append(
            [message], expected_last=write.expected_last, scope=write.scope
        )
        return result.last_position

    async def _supersede(self) -> None:
        for attempt in range(SUPERSEDE_ATTEMPTS):
            entries = []
            async for stored in self._leases.read(gateway_scope(self.gateway_id)):
                try:
                    entries.append(decode_entry(stored))
                except LeaseError as e:
                    log.warning("lease stream: %s", e)
            writes = self._holder.supersede(entries, self._clock())
            try:
                for write in writes:
                    await self._append(write)
                    self.stats.superseded += 1
                    log.warning(
                        "gateway %s: instance %s of an earlier run still held a lease: "
                        "superseded by %s (the twin service closes its sessions)",
                        self.gateway_id,
                        write.record.instance,
                        self.instance,
                    )
                return
            except ConcurrencyError:
                if attempt + 1 == SUPERSEDE_ATTEMPTS:
                    log.warning(
                        "gateway %s: the leases of earlier runs keep changing", self.gateway_id
                    )
                    return
                # that run renewed or a twin claimed it meanwhile: look again

    async def _acquire(self, holder: LeaseHolder) -> None:
        write = holder.acquire(self._clock())
        holder.written(write, await self._append(write), self._clock())

    async def _run(self) -> None:
        while True:
            holder = self._holder
            wake = holder.wake_at()
            if wake is not None:
                delay = max(0.0, wake - self._clock())
                await asyncio.sleep(delay)
            write = holder.next_write(self._clock())
            if write is None:
                if holder.lost:
                    await self._new_instance()
                continue
            try:
                position = await self._append(write)
            except ConcurrencyError:
                holder.refused(write)
                self.stats.lost += 1
                log.error(
                    "gateway %s: instance %s lost its lease (the twin service declared it "
                    "lost, or another run with this gateway id started): closing its sessions",
                    self.gateway_id,
                    holder.instance,
                )
                await self._new_instance()
                continue
            except EventStoreError as e:
                self.stats.failures += 1
                holder.failed(write, self._clock())
                log.warning("gateway %s: lease renewal failed: %s", self.gateway_id, e)
                continue
            holder.written(write, position, self._clock())
            self.stats.renewals += 1

    async def _new_instance(self) -> None:
        holder = LeaseHolder(self.gateway_id, new_instance_id(), self.config)
        while True:
            try:
                await self._acquire(holder)
                break
            except EventStoreError as e:
                log.warning("gateway %s: cannot acquire a new lease yet: %s", self.gateway_id, e)
                await asyncio.sleep(self.config.retry_interval)
        self._holder = holder
        log.warning("gateway %s: serving as instance %s", self.gateway_id, holder.instance)
        if self.on_new_instance is not None:
            self.on_new_instance(holder.instance)

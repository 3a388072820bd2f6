"""The lease of one gateway instance, sans-IO (see :mod:`proto.leases` for the contract).

:class:`LeaseHolder` decides what to write and when; :class:`gateway.leasing.GatewayLease`
does the writing. Time is an input (seconds since the epoch).

* A new run first marks every other run of its gateway id that still holds a lease as
  ``superseded`` (:meth:`LeaseHolder.supersede`): a gateway id names one process at a time, so
  a held lease of another run is a run that died (``kill -9``) and whose lease has not lapsed
  yet. The twin service closes that run's sessions at once instead of after the lease.
* It then acquires its own lease (``held``, expected last sequence 0: a fresh instance) and
  renews it every ``renew_interval``, each renewal conditional on its previous write.
* A renewal refused by that condition means someone else wrote on the instance: a twin
  instance claimed it (the lease lapsed while this gateway could not renew), or a newer run
  superseded it. The lease is lost (:attr:`LeaseHolder.lost`): the driver starts a new
  instance and closes every connection, whose devices reconnect and sign in again.
* A clean stop writes ``released``, so the twin service checks at once that nothing of the
  instance is left online.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

from proto.leases import (
    LeaseEntry,
    LeaseRecord,
    LeaseState,
    Writer,
    instance_scope,
    latest_per_instance,
    lease_subject,
)

__all__ = ["DEFAULT_LEASE", "LeaseConfig", "LeaseHolder", "LeaseWrite"]

DEFAULT_LEASE: Final = 15.0


@dataclass(frozen=True, slots=True)
class LeaseConfig:
    """``lease``: seconds after its last renewal that the twin service declares the instance
    lost. ``renew_interval``: default a third of the lease. ``retry_interval``: after a write
    whose outcome is unknown (the log unavailable)."""

    lease: float = DEFAULT_LEASE
    renew_interval: float | None = None
    retry_interval: float = 1.0

    def __post_init__(self) -> None:
        if not self.lease > 0:
            raise ValueError("lease must be > 0")
        if not 0 < self.renew_every < self.lease:
            raise ValueError("renew_interval must be > 0 and shorter than the lease")
        if not self.retry_interval > 0:
            raise ValueError("retry_interval must be > 0")

    @property
    def renew_every(self) -> float:
        return self.lease / 3 if self.renew_interval is None else self.renew_interval


@dataclass(frozen=True, slots=True)
class LeaseWrite:
    """One conditional append on a lease subject."""

    subject: str
    scope: str
    expected_last: int
    msg_id: str
    record: LeaseRecord


class LeaseHolder:
    """What one gateway instance writes about its lease."""

    def __init__(self, gateway_id: str, instance: str, config: LeaseConfig) -> None:
        self.gateway_id = gateway_id
        self.instance = instance
        self.config = config
        self.position = 0  # of our last write on our scope (0: not acquired)
        self.lost = False
        self._next_renewal: float | None = None
        self._retry: LeaseWrite | None = None
        self._retry_at = 0.0
        self._ids = itertools.count(1)
        self._subject = lease_subject(Writer.GATEWAY, gateway_id, instance)
        self._scope = instance_scope(gateway_id, instance)

    @property
    def acquired(self) -> bool:
        return self.position > 0 and not self.lost

    def _record(self, state: LeaseState, now: float, lease: float = 0.0) -> LeaseRecord:
        return LeaseRecord(
            state=state,
            gateway=self.gateway_id,
            instance=self.instance,
            at=datetime.fromtimestamp(now, UTC),
            lease=lease,
        )

    def _msg_id(self) -> str:
        return f"lease-{self.instance}-{next(self._ids)}"

    def supersede(self, entries: Iterable[LeaseEntry], now: float) -> list[LeaseWrite]:
        """The writes that mark the other runs of this gateway id still holding a lease as
        superseded by this one, each conditional on the entry it saw."""
        out: list[LeaseWrite] = []
        for (gateway, instance), entry in sorted(latest_per_instance(entries).items()):
            if gateway != self.gateway_id or instance == self.instance:
                continue
            if entry.record.state is not LeaseState.HELD:
                continue  # stopped cleanly, or already the twin service's
            out.append(
                LeaseWrite(
                    subject=lease_subject(Writer.GATEWAY, gateway, instance),
                    scope=instance_scope(gateway, instance),
                    expected_last=entry.position,
                    msg_id=self._msg_id(),
                    record=LeaseRecord(
                        state=LeaseState.SUPERSEDED,
                        gateway=gateway,
                        instance=instance,
                        at=datetime.fromtimestamp(now, UTC),
                        by=self.instance,
                    ),
                )
            )
        return out

    def acquire(self, now: float) -> LeaseWrite:
        """The first write of this instance (its scope must be empty)."""
        return self._held(now)

    def _held(self, now: float) -> LeaseWrite:
        return LeaseWrite(
            subject=self._subject,
            scope=self._scope,
            expected_last=self.position,
            msg_id=self._msg_id(),
            record=self._record(LeaseState.HELD, now, lease=self.config.lease),
        )

    def next_write(self, now: float) -> LeaseWrite | None:
        """The write due at ``now``: a retry of one whose outcome is unknown (same id, same
        condition: a retry of one that was stored is answered as a duplicate), else a renewal
        when it is time; None when nothing is due or the lease is lost."""
        if self.lost:
            return None
        if self._retry is not None:
            return self._retry if now >= self._retry_at else None
        if self._next_renewal is None:
            return self._held(now) if self.position == 0 else None
        if now >= self._next_renewal:
            return self._held(now)
        return None

    def wake_at(self) -> float | None:
        """When :meth:`next_write` has something next (None: never, the lease is lost)."""
        if self.lost:
            return None
        if self._retry is not None:
            return self._retry_at
        return self._next_renewal

    def written(self, write: LeaseWrite, position: int, now: float) -> None:
        """The log stored ``write`` at ``position``."""
        self._retry = None
        if write.subject == self._subject:
            self.position = position
            self._next_renewal = now + self.config.renew_every

    def failed(self, write: LeaseWrite, now: float) -> None:
        """The log could not be reached: the outcome of ``write`` is unknown; retry it."""
        if write.subject == self._subject:
            self._retry = write
            self._retry_at = now + self.config.retry_interval

    def refused(self, write: LeaseWrite) -> None:
        """The condition of ``write`` did not hold: someone else wrote on the scope."""
        self._retry = None
        if write.subject == self._subject:
            self.lost = True

    def release(self, now: float) -> LeaseWrite | None:
        """The write of a clean stop (None if the lease was never held or is lost)."""
        if not self.acquired:
            return None
        return LeaseWrite(
            subject=self._subject,
            scope=self._scope,
            expected_last=self.position,
            msg_id=self._msg_id(),
            record=self._record(LeaseState.RELEASED, now),
        )

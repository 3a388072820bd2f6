"""The twin store as a port: what the projector and the query side ask of it.

Two adapters implement it with the same observable behaviour, held to it by one contract suite
(``tests/contract/test_twinstore.py``):

* :class:`twin.adapters.mongo.MongoTwinStore` — MongoDB (or FerretDB), the real store;
* :class:`twin.memory.InMemoryTwinStore` — for unit tests of the services.

Semantics (both adapters):

* One twin per device, keyed by device id.
* **Guarded writes**: :meth:`TwinStore.write_many` writes a twin only if the stored one has a
  lower ``position`` (or there is none). A twin whose position is at or below the stored one is
  *skipped* and reported as such: that is how redelivered and replayed events stay harmless.
  Given the same device twice, the higher position is written and the other one skipped.
* **Checkpoints** record, per projector name, a log position up to which every event has been
  written. They only move forward; :meth:`TwinStore.drop` clears them with the twins.
* ``find`` pages by device id (keyset pagination): pass the last id seen as ``after_id``.
* ``due`` finds twins with an open command whose deadline (:attr:`Twin.next_expiry`) passed:
  what the expiry sweeper works through.
* **Open commands** are part of the twin (:attr:`Twin.pending`) but an adapter may keep them
  apart (the Mongo adapter: one document per command), so that neither a write nor a command
  request costs more as a device's queue grows: ``write_many`` takes the twins as the caller
  read them (``previous``) to write only the commands that changed, and
  :meth:`TwinStore.get_for_command` reads a twin with at most one of its commands.
* **Ended commands** are remembered by (device, correlation id) after they leave ``pending``:
  ``write_many`` stores those it is given for the twins it writes (what the fold of the batch
  ended, :attr:`twin.fold.BatchFold.ended`; the newest per id wins), each until ``forget_at``
  (its end plus the store's ``command_memory``);
  :meth:`TwinStore.ended_command` reads one back, :meth:`TwinStore.forget_ended` deletes those
  whose time is up. That is what lets the command API answer a repeated request with the
  original acceptance and outcome (:mod:`twin.commands`).

:class:`TokenRegistry` is the port of the simple devices' access-token registry
(:mod:`proto.devtokens`: one record per token hash, the last one kept), which the command API's
provisioning operations write and the gateway reads. Its adapter
(:class:`twin.adapters.token_registry.LogTokenRegistry`) keeps it in a stream of the log, over
the :class:`~eventstore.ports.EventStore` port: JetStream in production, in memory in tests.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Protocol

from proto.devtokens import TokenRecord
from twin.model import EndedCommand, Twin, utc_ms

__all__ = [
    "DEFAULT_FIND_LIMIT",
    "Ended",
    "TokenEntry",
    "TokenRegistry",
    "TwinStore",
    "WriteResult",
    "to_remember",
]

Ended = Mapping[str, Sequence[EndedCommand]]
"""Per device id, the commands a batch ended, in log order."""

DEFAULT_FIND_LIMIT = 100


@dataclass(frozen=True, slots=True)
class WriteResult:
    """Which twins a guarded write stored, and which it skipped (already at that position)."""

    written: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()


class TwinStore(Protocol):
    """Where twins live. See the module docstring for the semantics."""

    async def get(self, device_id: str) -> Twin | None:
        """The device's twin, or ``None``."""
        ...

    async def get_many(self, device_ids: Iterable[str]) -> dict[str, Twin]:
        """The twins of those devices that have one, by device id."""
        ...

    async def get_for_command(self, device_id: str, correlation_id: str) -> Twin | None:
        """The device's twin with ``pending`` holding only the open command with that
        correlation id, if there is one (no other open command): what a command request
        needs, at a cost that does not depend on how many commands are open."""
        ...

    async def ended_command(self, device_id: str, correlation_id: str) -> EndedCommand | None:
        """The newest command with this correlation id that ended on the device, while it is
        remembered (not yet deleted by :meth:`forget_ended`; the caller compares
        ``forget_at`` with its clock)."""
        ...

    async def forget_ended(self, now: datetime) -> int:
        """Delete the ended commands whose ``forget_at`` is at or before ``now``; how many."""
        ...

    async def write_many(
        self,
        twins: Iterable[Twin],
        *,
        previous: Mapping[str, Twin | None] | None = None,
        ended: Ended | None = None,
    ) -> WriteResult:
        """Store the twins, each guarded by its position (see the module docstring), and with
        each twin written the commands ``ended`` holds for it.

        ``previous``: for some of the devices, the twin as the caller read it from this store
        before changing it (``None``: it had none). Only a hint for writing less; a device
        left out is compared with what is stored."""
        ...

    async def find(
        self,
        *,
        owner: str | None = None,
        online: bool | None = None,
        resource_type: str | None = None,
        include_deleted: bool = False,
        has_pending: bool | None = None,
        limit: int = DEFAULT_FIND_LIMIT,
        after_id: str | None = None,
    ) -> list[Twin]:
        """Twins matching every given criterion, by ascending device id, after ``after_id``.

        ``has_pending``: with (``True``) or without (``False``) open commands."""
        ...

    async def due(self, now: datetime, limit: int = DEFAULT_FIND_LIMIT) -> list[Twin]:
        """Twins (deleted ones too) whose :attr:`Twin.next_expiry` is at or before ``now``,
        earliest first."""
        ...

    async def max_position(self) -> int:
        """The highest log position any twin reflects; 0 when there is none."""
        ...

    async def checkpoint(self, name: str) -> int:
        """The log position up to which projector ``name`` has written everything; 0 if none."""
        ...

    async def resolve_generation(self) -> bool:
        """Bind to the generation the store names active (a rebuild switched it); whether the
        twins read and written changed. Generations: :class:`GenerationalTwinStore`."""
        ...

    def recently_written(self, device_id: str) -> Twin | None:
        """A twin this store object wrote lately, without a read (None: not remembered). Another
        writer may have moved the device on since: a reader folds the log after its position
        (as :func:`twin.api.latest_twin` does), which gives the latest twin either way."""
        ...

    def write_counts(self) -> Mapping[str, int]:
        """Write commands sent to the store so far, by collection: ``twins``, ``commands``,
        ``ended``, ``checkpoints`` (for the metrics: store writes per event and per command)."""
        ...

    async def save_checkpoint(self, name: str, position: int) -> None:
        """Move projector ``name``'s checkpoint forward to ``position`` (never backward)."""
        ...

    async def drop(self) -> None:
        """Delete every twin, every checkpoint and every ended command."""
        ...

    async def ensure_indexes(self) -> None:
        """Create the query indexes (idempotent)."""
        ...


class GenerationalTwinStore(TwinStore, Protocol):
    """A store whose twins can be rebuilt beside the live ones: generation N's collections are
    written while N-1 is read, then N is made active in one atomic step."""

    generation: int

    async def active_generation(self) -> int: ...

    def at_generation(self, generation: int) -> GenerationalTwinStore:
        """A store of the same database bound to ``generation`` (not activated)."""
        ...

    async def activate(self, generation: int) -> None: ...

    async def drop_other_generations(self) -> list[str]:
        """Drop every generation but this store's; what was dropped."""
        ...


def check_find_limit(limit: int) -> None:
    """Shared by the adapters so that they refuse the same calls."""
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")


def newest_per_device(twins: Iterable[Twin]) -> tuple[dict[str, Twin], list[str]]:
    """The highest-position twin per device, and the ids of the ones it superseded."""
    newest: dict[str, Twin] = {}
    superseded: list[str] = []
    for t in twins:
        held = newest.get(t.device_id)
        if held is None or t.position > held.position:
            if held is not None:
                superseded.append(held.device_id)
            newest[t.device_id] = t
        else:
            superseded.append(t.device_id)
    return newest, superseded


def to_remember(ended: Sequence[EndedCommand], memory: timedelta) -> list[EndedCommand]:
    """The newest of each correlation id, with its ``forget_at``: its end plus ``memory``."""
    newest = {e.command.correlation_id: e for e in ended}
    return [replace(e, forget_at=utc_ms(e.outcome.at + memory)) for e in newest.values()]


@dataclass(frozen=True, slots=True)
class TokenEntry:
    """A token's current registry record and its position in the registry's stream (what a
    conditional write of the next record expects)."""

    record: TokenRecord
    position: int


class TokenRegistry(Protocol):
    """The access-token registry of simple devices, by token hash (see the module docstring)."""

    async def get(self, hashed: str) -> TokenEntry | None:
        """The current record of the token with this SHA-256 (hex), or ``None``."""
        ...

    async def put(self, hashed: str, record: TokenRecord, *, expected_last: int) -> int:
        """Write the token's record if its current one is still at ``expected_last`` (0: it has
        none), else :class:`~eventstore.errors.ConcurrencyError` and nothing is written; the
        position written. Idempotent: the same write again (same hash, state and
        ``expected_last``) returns the first one's position."""
        ...

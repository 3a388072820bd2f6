"""An in-memory :class:`~twin.ports.TwinStore` with the same semantics as the Mongo adapter.

It keeps twins in their document form (:meth:`Twin.to_document`) and reads them back through
:meth:`Twin.from_document`, so what survives a store round trip is the same in both adapters.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from twin.model import COMMAND_MEMORY, EndedCommand, Twin
from twin.ports import (
    DEFAULT_FIND_LIMIT,
    Ended,
    WriteResult,
    check_find_limit,
    newest_per_device,
    to_remember,
)

__all__ = ["InMemoryTwinStore"]


@dataclass
class _State:
    docs: dict[str, dict[str, Any]] = field(default_factory=dict)
    checkpoints: dict[str, int] = field(default_factory=dict)
    ended: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)


@dataclass
class _Catalog:
    """What the stores of one "database" share: each generation's state, the active one."""

    active: int = 0
    states: dict[int, _State] = field(default_factory=dict)


class InMemoryTwinStore:
    """Twins in a dict. Not shared between processes; for tests and tools. Generations as the
    Mongo adapter has them (:meth:`at_generation` gives a store of the same "database")."""

    def __init__(
        self,
        *,
        command_memory: timedelta = COMMAND_MEMORY,
        generation: int = 0,
        _catalog: _Catalog | None = None,
    ) -> None:
        self._catalog = _catalog or _Catalog()
        self.command_memory = command_memory
        self._writes: Counter[str] = Counter()
        self._recent: dict[str, Twin] = {}
        self._bind(generation)

    def _bind(self, generation: int) -> None:
        state = self._catalog.states.setdefault(generation, _State())
        self.generation = generation
        self._docs = state.docs
        self._checkpoints = state.checkpoints
        self._ended = state.ended

    async def active_generation(self) -> int:
        return self._catalog.active

    async def resolve_generation(self) -> bool:
        if self._catalog.active == self.generation:
            return False
        self._bind(self._catalog.active)
        self._recent.clear()
        return True

    def at_generation(self, generation: int) -> InMemoryTwinStore:
        return InMemoryTwinStore(
            command_memory=self.command_memory, generation=generation, _catalog=self._catalog
        )

    async def activate(self, generation: int) -> None:
        self._catalog.active = generation

    async def drop_other_generations(self) -> list[str]:
        gone = [g for g in self._catalog.states if g != self.generation]
        for g in gone:
            del self._catalog.states[g]
        return [f"generation {g}" for g in gone]

    async def get(self, device_id: str) -> Twin | None:
        doc = self._docs.get(device_id)
        return None if doc is None else Twin.from_document(copy.deepcopy(doc))

    async def get_many(self, device_ids: Iterable[str]) -> dict[str, Twin]:
        return {
            i: Twin.from_document(copy.deepcopy(self._docs[i]))
            for i in dict.fromkeys(device_ids)
            if i in self._docs
        }

    async def get_for_command(self, device_id: str, correlation_id: str) -> Twin | None:
        twin = await self.get(device_id)
        if twin is None:
            return None
        return replace(
            twin, pending=tuple(c for c in twin.pending if c.correlation_id == correlation_id)
        )

    async def ended_command(self, device_id: str, correlation_id: str) -> EndedCommand | None:
        doc = self._ended.get((device_id, correlation_id))
        return None if doc is None else EndedCommand.from_document(copy.deepcopy(doc))

    async def forget_ended(self, now: datetime) -> int:
        gone = [k for k, d in self._ended.items() if d["forget_at"] <= now]
        for k in gone:
            del self._ended[k]
        return len(gone)

    async def write_many(
        self,
        twins: Iterable[Twin],
        *,
        previous: Mapping[str, Twin | None] | None = None,
        ended: Ended | None = None,
    ) -> WriteResult:
        newest, skipped = newest_per_device(twins)
        if newest:
            self._writes["twins"] += 1  # one write command, as the Mongo adapter's bulk
        written: list[str] = []
        for device_id, t in newest.items():
            held = self._docs.get(device_id)
            if held is not None and held["position"] >= t.position:
                skipped.append(device_id)
                continue
            for e in to_remember((ended or {}).get(device_id, ()), self.command_memory):
                key = (device_id, e.command.correlation_id)
                self._ended[key] = copy.deepcopy(e.to_document())
            self._docs[device_id] = copy.deepcopy(t.to_document())
            self._recent[device_id] = Twin.from_document(copy.deepcopy(t.to_document()))
            written.append(device_id)
        return WriteResult(written=tuple(written), skipped=tuple(skipped))

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
        check_find_limit(limit)
        out: list[Twin] = []
        for device_id in sorted(self._docs):
            if after_id is not None and device_id <= after_id:
                continue
            doc = self._docs[device_id]
            if (
                (owner is not None and doc["owner"] != owner)
                or (online is not None and doc["connection"]["online"] != online)
                or (resource_type is not None and resource_type not in doc["resource_types"])
                or (not include_deleted and doc["deleted"])
                or (has_pending is not None and (doc["pending_count"] > 0) != has_pending)
            ):
                continue
            out.append(Twin.from_document(copy.deepcopy(doc)))
            if len(out) == limit:
                break
        return out

    async def due(self, now: datetime, limit: int = DEFAULT_FIND_LIMIT) -> list[Twin]:
        check_find_limit(limit)
        docs = sorted(
            (d for d in self._docs.values() if d["next_expiry"] is not None),
            key=lambda d: (d["next_expiry"], d["_id"]),
        )
        return [Twin.from_document(copy.deepcopy(d)) for d in docs if d["next_expiry"] <= now][
            :limit
        ]

    async def max_position(self) -> int:
        return max((int(doc["position"]) for doc in self._docs.values()), default=0)

    async def checkpoint(self, name: str) -> int:
        return self._checkpoints.get(name, 0)

    def recently_written(self, device_id: str) -> Twin | None:
        return self._recent.get(device_id)

    def write_counts(self) -> dict[str, int]:
        return dict(self._writes)

    async def save_checkpoint(self, name: str, position: int) -> None:
        self._writes["checkpoints"] += 1
        self._checkpoints[name] = max(position, self._checkpoints.get(name, 0))

    async def drop(self) -> None:
        self._recent.clear()
        self._docs.clear()
        self._checkpoints.clear()
        self._ended.clear()

    async def ensure_indexes(self) -> None:
        return None

"""The twin store on MongoDB (and FerretDB), through PyMongo's async API.

Guarded writes, portable to FerretDB v1. The MongoDB idiom is one ``bulk_write`` of
``replace_one({"_id": id, "position": {"$lt": p}}, twin, upsert=True)`` with ``ordered=False``,
a stale entry failing alone with a duplicate-key error. FerretDB v1.24 breaks it: a batch of
updates with one failing entry stops there (``ordered=False`` is ignored) and replies without
``nModified``, on which PyMongo raises ``KeyError`` (see ``tests/integration/test_mongo_wire.py``).
So a batch is written as: one ``find`` of the stored positions, guarded replaces *without* upsert
for the twins that exist (they cannot fail; one that matches nothing lost a race), an unordered
``insert_many`` for new twins (a duplicate key there is a race too), and a re-check of the racers.
Same result on both servers, same number of round trips in the common case.

FerretDB v1 pushes only an exact ``{"_id": X}`` filter down to SQLite (and only through the
index with our patch, see ``tools/mongo-server/patches``): ``{_id: {$in: ...}}`` and a guarded
``{_id: X, position: {$lt: P}}`` are full scans of the collection (measured: 390 ms for 64 ids,
205 ms per guarded replace at 1,000 twins, growing with the collection). There the store works
by point lookups only: ``get_many`` is concurrent ``find_one`` by ``_id``, and ``write_many``
compares positions itself — from a cache of the positions it last stored or read, a lookup by
``_id`` on a miss — and replaces by ``_id`` alone. That is sound because FerretDB already needs
a single writer per twins collection (its conditional updates are not atomic across
connections, see the contract tests): the projector. On MongoDB the guarded writes stay as they
are, so several writers remain safe there.

Resource content (and the content of pending commands, desired state and delta) is stored as
is when it is a valid BSON document; otherwise (keys with ``.``, a leading ``$`` or NUL,
integers beyond 64 bits, which devices may well send and FerretDB refuses) it is stored as JSON
text in ``content_json`` and decoded on read. So are the values of a simple device's telemetry
and client attributes (``value``, ``value_json``).

Open commands live in ``<collection>_commands``, one document per command (``_id``: the JSON
text of ``[device id, correlation id]``, plus ``device_id``), not in the twin document: a device
with a thousand queued commands would otherwise make every write of its twin, and every command
request, rewrite or read all of them (measured on FerretDB: 160 ms per twin write and 130 ms per
read with 1,000 embedded commands, 1.3 / 1.0 ms with none). A write stores only the commands
that changed since ``previous`` (or since what is stored) — first the commands, then the twin,
so a write cut short leaves commands *ahead* of their twin, which the fold tolerates: replaying
the events from the twin's position adds nothing twice (a second ``command-pending`` of an open
id is ignored, ``command-sent`` keeps the highest attempt) and ends again what had ended
(only ``recent_outcomes`` can miss a command that ended in the cut-short write). A
twin is read with all its commands (one query on ``device_id``), or with at most the one a
command request names (:meth:`MongoTwinStore.get_for_command`, two point lookups). One writer
(the projector) per twins collection.

Ended commands live in ``<collection>_ended``, one document per (device, correlation id), the
newest command of that id, with the same ``_id`` as its open document had: a write stores
there the commands it is given as ended (with the open commands, before the twin) and the
command API reads one by ``_id`` alone (:meth:`MongoTwinStore.ended_command`). The sweeper
deletes those past their ``forget_at`` (:meth:`MongoTwinStore.forget_ended`, a range on an
indexed field; a scan on FerretDB, once a minute). Ended commands are never read by
``device_id``, so they cost nothing to twin reads however many a device has.

Queries stay simple for FerretDB v1 (no TTL indexes, limited aggregation): the sweeper's
``due`` is a range on the top-level ``next_expiry``, "has pending commands" a range on
``pending_count``, both indexed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import Counter, OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from bson.codec_options import CodecOptions
from bson.errors import BSONError
from pymongo import ASCENDING, DESCENDING, DeleteOne, IndexModel, ReplaceOne
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import (
    BulkWriteError,
    ConnectionFailure,
    DocumentTooLarge,
    DuplicateKeyError,
    ExecutionTimeout,
    PyMongoError,
    WTimeoutError,
)

from twin.errors import CorruptTwinError, StoreUnavailableError, TwinStoreError
from twin.model import COMMAND_MEMORY, EndedCommand, Twin, TwinCommand
from twin.ports import (
    DEFAULT_FIND_LIMIT,
    Ended,
    WriteResult,
    check_find_limit,
    newest_per_device,
    to_remember,
)

__all__ = ["DEFAULT_COLLECTION", "MongoTwinStore"]

log = logging.getLogger(__name__)

Doc = dict[str, Any]

DEFAULT_COLLECTION: Final = "twins"
DUPLICATE_KEY: Final = 11000
MAX_WRITE_ROUNDS: Final = 8  # each extra round means another writer raced us on a device
_INT64 = (-(2**63), 2**63 - 1)

INDEXES: Final = (
    IndexModel([("owner", ASCENDING)], name="owner"),
    IndexModel([("owner", ASCENDING), ("_id", ASCENDING)], name="owner_id"),  # owner's pages
    IndexModel([("connection.online", ASCENDING)], name="online"),
    IndexModel([("resource_types", ASCENDING)], name="resource_types"),
    IndexModel([("position", ASCENDING)], name="position"),  # max_position
    IndexModel([("next_expiry", ASCENDING)], name="next_expiry"),  # the expiry sweeper
    IndexModel([("owner", ASCENDING), ("pending_count", ASCENDING)], name="owner_pending"),
)
COMMANDS_INDEX: Final = IndexModel([("device_id", ASCENDING)], name="device_id")
ENDED_INDEX: Final = IndexModel([("forget_at", ASCENDING)], name="forget_at")
# Lists of the document whose items carry JSON ``content`` (the delta is derived, written only).
_CONTENT_LISTS: Final = ("resources", "desired", "delta")
# Lists whose items carry a JSON ``value`` (a simple device's telemetry and client attributes).
_VALUE_LISTS: Final = ("telemetry", "client_attributes")


POINT_LOOKUPS: Final = 16  # concurrent find_one by _id on FerretDB
POSITION_CACHE: Final = 200_000  # positions remembered on FerretDB (~100 B each)
RECENT_TWINS: Final = 10_000  # twins this store wrote, kept for recently_written()

WRITE_CHUNK: Final = 256
"""Most operations per write command. Unpatched FerretDB v1.24 (SQLite) never answers an update
command of 100 or more updates (tools/mongo-server patches that, see
``tests/integration/test_mongo_wire.py``); bounded chunks keep each command short anyway."""


_SUFFIXES: Final = ("", "_checkpoints", "_commands", "_ended")


def generation_collection(base: str, generation: int) -> str:
    """The twins collection of ``generation`` (0: ``base`` itself)."""
    return base if generation == 0 else f"{base}_g{generation}"


def _generation_of(base: str, name: str) -> int | None:
    """The generation whose collections include ``name``, None for other collections."""
    for suffix in _SUFFIXES:
        stem = name.removesuffix(suffix) if suffix else name
        if suffix and stem == name:
            continue
        if stem == base:
            return 0
        rest = stem.removeprefix(base + "_g")
        if rest != stem and rest.isdigit() and not rest.startswith("0"):
            return int(rest)
    return None


class MongoTwinStore:
    """Twins in one collection (``twins`` by default), checkpoints in ``<collection>_checkpoints``.

    The caller owns the client; the store only borrows the database. ``command_memory``: how
    long an ended command is remembered (:data:`~twin.model.COMMAND_MEMORY`).

    Generations. A rebuild writes a new set of collections beside the live one and then makes it
    the active one (:meth:`activate`): generation 0 is ``<collection>`` (and its
    ``_checkpoints``, ``_commands``, ``_ended``), generation N >= 1 ``<collection>_gN`` (and its
    three). Which one is active is one document of ``<collection>_catalog``, so the switch is
    atomic; a store binds to it in :meth:`resolve_generation` (the twin service's projector
    calls it between batches, then folds from the new generation's checkpoint).
    """

    def __init__(
        self,
        database: AsyncDatabase[Doc],
        collection: str = DEFAULT_COLLECTION,
        *,
        command_memory: timedelta = COMMAND_MEMORY,
        generation: int = 0,
    ) -> None:
        if generation < 0:
            raise ValueError("generation must be >= 0")
        self._database = database
        self._base = collection
        self._options: CodecOptions[Doc] = CodecOptions(
            document_class=dict, tz_aware=True, tzinfo=UTC
        )
        self._catalog: AsyncCollection[Doc] = database.get_collection(
            f"{collection}_catalog", codec_options=self._options
        )
        self._bind(generation)
        self.command_memory = command_memory
        # Writes through one store never overlap: on FerretDB a guarded update is not atomic.
        self._write_lock = asyncio.Lock()
        self._ferretdb: bool | None = None  # learnt from buildInfo on first use
        self._writes: Counter[str] = Counter()  # write commands sent, by collection
        # FerretDB only (single writer): device id -> position of the twin stored, oldest first.
        self._positions: dict[str, int] = {}
        self._recent: OrderedDict[str, Twin] = OrderedDict()  # twins written, oldest first

    def _bind(self, generation: int) -> None:
        name = generation_collection(self._base, generation)
        get = self._database.get_collection
        self.generation = generation
        self._twins: AsyncCollection[Doc] = get(name, codec_options=self._options)
        self._checkpoints: AsyncCollection[Doc] = get(
            f"{name}_checkpoints", codec_options=self._options
        )
        self._commands: AsyncCollection[Doc] = get(f"{name}_commands", codec_options=self._options)
        self._ended: AsyncCollection[Doc] = get(f"{name}_ended", codec_options=self._options)

    # -- generations ------------------------------------------------------------------------

    async def active_generation(self) -> int:
        """The generation the catalog names (0 without a catalog)."""
        with _translated():
            doc = await self._catalog.find_one({"_id": "active"})
        return 0 if doc is None else int(doc["generation"])

    async def resolve_generation(self) -> bool:
        """Bind to the active generation; whether that changed the collections used."""
        active = await self.active_generation()
        if active == self.generation:
            return False
        async with self._write_lock:  # no write of this store straddles the switch
            self._bind(active)
            self._positions.clear()
            self._recent.clear()
        log.info("twins: generation %d is active (%s)", active, self._twins.name)
        return True

    def at_generation(self, generation: int) -> MongoTwinStore:
        """Another store on the same database, bound to ``generation`` (not activated)."""
        return MongoTwinStore(
            self._database, self._base, command_memory=self.command_memory, generation=generation
        )

    async def activate(self, generation: int) -> None:
        """Make ``generation`` the active one (readers bind to it when they next resolve)."""
        with _translated():
            await self._catalog.replace_one(
                {"_id": "active"}, {"_id": "active", "generation": generation}, upsert=True
            )
        self._writes["catalog"] += 1

    async def drop_other_generations(self) -> list[str]:
        """Drop the collections of every generation but this store's; their names."""
        with _translated():
            names = await self._database.list_collection_names()
        dropped = []
        for name in sorted(names):
            generation = _generation_of(self._base, name)
            if generation is None or generation == self.generation:
                continue
            with _translated():
                await self._database.drop_collection(name)
            dropped.append(name)
        if dropped:
            log.info("twins: dropped %s", ", ".join(dropped))
        return dropped

    async def _point_lookups(self) -> bool:
        """Whether this is FerretDB, where only ``{_id: X}`` filters use an index."""
        if self._ferretdb is None:
            with _translated():
                info = await self._twins.database.command("buildInfo")
            self._ferretdb = "ferretdbVersion" in info
            if self._ferretdb:
                log.info("FerretDB %s: point lookups by _id only", info["ferretdbVersion"])
        return self._ferretdb

    def _remember(self, device_id: str, position: int) -> None:
        self._positions.pop(device_id, None)
        self._positions[device_id] = position
        if len(self._positions) > POSITION_CACHE:
            del self._positions[next(iter(self._positions))]

    async def get(self, device_id: str) -> Twin | None:
        with _translated():
            doc = await self._twins.find_one({"_id": device_id})
        if doc is None:
            return None
        return _decode(doc, (await self._open_commands([device_id])).get(device_id, []))

    async def get_for_command(self, device_id: str, correlation_id: str) -> Twin | None:
        with _translated():
            doc, command = await asyncio.gather(
                self._twins.find_one({"_id": device_id}),
                self._commands.find_one({"_id": _command_key(device_id, correlation_id)}),
            )
        if doc is None:
            return None
        return _decode(doc, [] if command is None else [command])

    async def ended_command(self, device_id: str, correlation_id: str) -> EndedCommand | None:
        with _translated():
            doc = await self._ended.find_one({"_id": _command_key(device_id, correlation_id)})
        if doc is None:
            return None
        try:
            _restore_content(doc["command"])
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise CorruptTwinError(f"bad ended command {doc.get('_id')!r}: {e}") from e
        return EndedCommand.from_document(doc)

    async def forget_ended(self, now: datetime) -> int:
        with _translated():
            result = await self._ended.delete_many({"forget_at": {"$lte": now}})
        self._writes["ended"] += 1
        return int(result.deleted_count)

    async def get_many(self, device_ids: Iterable[str]) -> dict[str, Twin]:
        ids = list(dict.fromkeys(device_ids))
        if not ids:
            return {}
        if await self._point_lookups():
            docs = await self._find_each(ids)
            twins = await self._decode_all(docs)
            for t in twins:
                self._remember(t.device_id, t.position)
            return {t.device_id: t for t in twins}
        with _translated():
            docs = await self._twins.find({"_id": {"$in": ids}}).to_list()
        return {t.device_id: t for t in await self._decode_all(docs)}

    async def _decode_all(self, docs: list[Doc]) -> list[Twin]:
        """Twins of these documents, each with its open commands (one query for all)."""
        # Not only those whose pending_count says so: a write cut short may have stored
        # commands ahead of their twin, and the projector must see them to end them.
        commands = await self._open_commands([d["_id"] for d in docs]) if docs else {}
        return [_decode(d, commands.get(d["_id"], [])) for d in docs]

    async def _open_commands(self, device_ids: list[str]) -> dict[str, list[Doc]]:
        """The stored command documents of these devices, per device."""
        query: Doc = (
            {"device_id": device_ids[0]}
            if len(device_ids) == 1
            else {"device_id": {"$in": device_ids}}
        )
        out: dict[str, list[Doc]] = {}
        with _translated():
            async for c in self._commands.find(query):
                out.setdefault(c["device_id"], []).append(c)
        return out

    async def _find_each(self, ids: list[str], projection: Doc | None = None) -> list[Doc]:
        """``find_one`` by ``_id`` for each id, a few at a time; the documents found."""
        gate = asyncio.Semaphore(POINT_LOOKUPS)

        async def one(device_id: str) -> Doc | None:
            async with gate:
                return await self._twins.find_one({"_id": device_id}, projection)

        with _translated():
            found = await asyncio.gather(*(one(i) for i in ids))
        return [d for d in found if d is not None]

    async def _stored_positions(self, ids: list[str], *, cached: bool) -> dict[str, int]:
        """The positions of the stored twins among ``ids`` (absent: no twin)."""
        if not await self._point_lookups():
            with _translated():
                return {
                    d["_id"]: d["position"]
                    async for d in self._twins.find(
                        {"_id": {"$in": ids}}, {"_id": 1, "position": 1}
                    )
                }
        known = {i: self._positions[i] for i in ids if cached and i in self._positions}
        missing = [i for i in ids if i not in known]
        for d in await self._find_each(missing, {"_id": 1, "position": 1}):
            known[d["_id"]] = d["position"]
        return known

    async def write_many(
        self,
        twins: Iterable[Twin],
        *,
        previous: Mapping[str, Twin | None] | None = None,
        ended: Ended | None = None,
    ) -> WriteResult:
        async with self._write_lock:
            return await self._write_many(twins, previous or {}, ended or {})

    async def _write_many(
        self, twins: Iterable[Twin], previous: Mapping[str, Twin | None], ended: Ended
    ) -> WriteResult:
        pending, skipped = newest_per_device(twins)
        written: list[str] = []
        recheck: set[str] = set()  # lost a race last round: equal position there means ours
        for round_ in range(MAX_WRITE_ROUNDS):
            if not pending:
                return WriteResult(written=tuple(written), skipped=tuple(skipped))
            # A device the caller read as absent is inserted without a lookup: if another
            # writer created it meanwhile, the insert says so and the next round compares.
            ids = [d for d in pending if round_ or d not in previous or previous[d] is not None]
            stored = await self._stored_positions(ids, cached=round_ == 0) if ids else {}
            replace: list[Twin] = []
            insert: list[Twin] = []
            for device_id, t in pending.items():
                held = stored.get(device_id)
                if held is None:
                    insert.append(t)
                elif held < t.position:
                    replace.append(t)
                elif held == t.position and device_id in recheck:
                    written.append(device_id)
                else:
                    skipped.append(device_id)
            # The commands first: a write cut short leaves them ahead of the twin (see above).
            await self._write_commands([*replace, *insert], previous, ended)
            racers = await self._replace(replace, written) + await self._insert(insert, written)
            recheck = {t.device_id for t in racers}
            pending = {t.device_id: t for t in racers}
            previous = {}  # the racers' commands were just written: compare with the store
        raise TwinStoreError(f"gave up writing {sorted(pending)}: other writers keep racing")

    async def _write_commands(
        self, twins: list[Twin], previous: Mapping[str, Twin | None], ended: Ended | None = None
    ) -> None:
        """Upsert the twins' commands that changed, delete those that are no longer open, and
        store those that ended."""
        unknown = [t.device_id for t in twins if t.device_id not in previous]
        stored = await self._stored_command_ids(unknown) if unknown else {}
        ops: list[ReplaceOne[Doc] | DeleteOne] = []
        remember: list[ReplaceOne[Doc]] = []
        for t in twins:
            if t.device_id in previous:
                before = previous[t.device_id]
                old: dict[str, TwinCommand | None] = (
                    {} if before is None else {c.correlation_id: c for c in before.pending}
                )
            else:
                old = dict.fromkeys(stored.get(t.device_id, ()))
            for e in to_remember((ended or {}).get(t.device_id, ()), self.command_memory):
                key = _command_key(t.device_id, e.command.correlation_id)
                doc = _encode_ended(t.device_id, e)
                remember.append(ReplaceOne({"_id": key}, doc, upsert=True))
            now = {c.correlation_id: c for c in t.pending}
            for cid, c in now.items():
                if old.get(cid) != c:
                    key = _command_key(t.device_id, cid)
                    ops.append(
                        ReplaceOne({"_id": key}, _encode_command(t.device_id, c), upsert=True)
                    )
            ops.extend(
                DeleteOne({"_id": _command_key(t.device_id, cid)}) for cid in old if cid not in now
            )
        with _translated():
            for i in range(0, len(remember), WRITE_CHUNK):
                await self._ended.bulk_write(remember[i : i + WRITE_CHUNK], ordered=False)
                self._writes["ended"] += 1
            for i in range(0, len(ops), WRITE_CHUNK):
                await self._commands.bulk_write(ops[i : i + WRITE_CHUNK], ordered=False)
                self._writes["commands"] += 1

    async def _stored_command_ids(self, device_ids: list[str]) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for device_id, docs in (await self._open_commands(device_ids)).items():
            out[device_id] = [d["correlation_id"] for d in docs]
        return out

    async def _replace(self, twins: list[Twin], written: list[str]) -> list[Twin]:
        """Guarded replaces of existing twins; returns those that matched nothing (raced)."""
        if not twins:
            return []
        by_id_only = await self._point_lookups()  # single writer, positions compared above
        ops = [
            ReplaceOne(
                {"_id": t.device_id}
                if by_id_only
                else {"_id": t.device_id, "position": {"$lt": t.position}},
                _encode(t),
            )
            for t in twins
        ]
        matched = 0
        with _translated():
            for i in range(0, len(ops), WRITE_CHUNK):
                result = await self._twins.bulk_write(ops[i : i + WRITE_CHUNK], ordered=False)
                self._writes["twins"] += 1
                matched += result.matched_count
        if matched == len(twins):
            self._written(twins, written)
            return []
        for t in twins:  # someone else moved some of them: find out which next round
            self._positions.pop(t.device_id, None)
        return twins

    def _written(self, twins: Iterable[Twin], written: list[str]) -> None:
        recent = self._recent
        for t in twins:
            written.append(t.device_id)
            if self._ferretdb:
                self._remember(t.device_id, t.position)
            recent.pop(t.device_id, None)
            recent[t.device_id] = t
        while len(recent) > RECENT_TWINS:
            recent.popitem(last=False)

    def recently_written(self, device_id: str) -> Twin | None:
        return self._recent.get(device_id)

    async def _insert(self, twins: list[Twin], written: list[str]) -> list[Twin]:
        """Unordered insert of new twins; returns those another writer created first."""
        if not twins:
            return []
        racers: list[Twin] = []
        for start in range(0, len(twins), WRITE_CHUNK):
            racers += await self._insert_chunk(twins[start : start + WRITE_CHUNK], written)
        return racers

    async def _insert_chunk(self, twins: list[Twin], written: list[str]) -> list[Twin]:
        docs = [{"_id": t.device_id, **_encode(t)} for t in twins]
        self._writes["twins"] += 1
        try:
            with _translated(BulkWriteError):
                await self._twins.insert_many(docs, ordered=False)
        except BulkWriteError as e:
            errors = e.details.get("writeErrors", [])
            if any(err.get("code") != DUPLICATE_KEY for err in errors):
                raise _translate(e) from e
            racers = {err["index"] for err in errors}
            self._written((t for i, t in enumerate(twins) if i not in racers), written)
            return [twins[i] for i in sorted(racers)]
        self._written(twins, written)
        return []

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
        query: Doc = {}
        if has_pending is not None:
            query["pending_count"] = {"$gt": 0} if has_pending else 0
        if owner is not None:
            query["owner"] = owner
        if online is not None:
            query["connection.online"] = online
        if resource_type is not None:
            query["resource_types"] = resource_type
        if not include_deleted:
            query["deleted"] = False
        if after_id is not None:
            query["_id"] = {"$gt": after_id}
        with _translated():
            docs = await self._twins.find(query).sort("_id", ASCENDING).limit(limit).to_list()
        return await self._decode_all(docs)

    async def due(self, now: datetime, limit: int = DEFAULT_FIND_LIMIT) -> list[Twin]:
        check_find_limit(limit)
        with _translated():
            docs = (
                await self._twins.find({"next_expiry": {"$lte": now}})
                .sort([("next_expiry", ASCENDING), ("_id", ASCENDING)])
                .limit(limit)
                .to_list()
            )
        return await self._decode_all(docs)

    async def max_position(self) -> int:
        with _translated():
            docs = (
                await self._twins.find({}, {"_id": 0, "position": 1})
                .sort("position", DESCENDING)
                .limit(1)
                .to_list()
            )
        return int(docs[0]["position"]) if docs else 0

    async def checkpoint(self, name: str) -> int:
        with _translated():
            doc = await self._checkpoints.find_one({"_id": name})
        return 0 if doc is None else int(doc["position"])

    def write_counts(self) -> dict[str, int]:
        return dict(self._writes)

    async def save_checkpoint(self, name: str, position: int) -> None:
        for _ in range(2):  # two first saves may race to insert: the loser retries as an update
            try:
                with _translated(DuplicateKeyError):
                    self._writes["checkpoints"] += 1
                    await self._checkpoints.update_one(
                        {"_id": name}, {"$max": {"position": position}}, upsert=True
                    )
                return
            except DuplicateKeyError:
                continue
        raise TwinStoreError(f"could not save checkpoint {name!r}")

    async def drop(self) -> None:
        self._positions.clear()
        self._recent.clear()
        with _translated():
            await self._twins.drop()
            await self._commands.drop()
            await self._ended.drop()
            await self._checkpoints.drop()
        log.info("dropped twins collection %s", self._twins.full_name)

    async def ensure_indexes(self) -> None:
        # One index per command: FerretDB v1.24 panics (and drops the connection) on a
        # createIndexes of several indexes that already exist.
        with _translated():
            for index in INDEXES:
                await self._twins.create_indexes([index])
            await self._commands.create_indexes([COMMANDS_INDEX])
            await self._ended.create_indexes([ENDED_INDEX])


# -- codec ------------------------------------------------------------------------------


def _encode(twin: Twin) -> Doc:
    """The replacement document (without ``_id`` and the open commands, which are stored
    apart), with unsafe resource content as JSON text."""
    doc = twin.to_document()
    del doc["_id"]
    del doc["pending"]
    for key in _CONTENT_LISTS:
        for r in doc[key]:
            _safe_content(r)
    for key in _VALUE_LISTS:
        for r in doc[key]:
            _safe_content(r, "value")
    return doc


def _command_key(device_id: str, correlation_id: str) -> str:
    return json.dumps([device_id, correlation_id], separators=(",", ":"))


def _encode_command(device_id: str, command: TwinCommand) -> Doc:
    doc = {"device_id": device_id, **command.to_document()}
    _safe_content(doc)
    return doc


def _encode_ended(device_id: str, ended: EndedCommand) -> Doc:
    doc = {"device_id": device_id, **ended.to_document()}
    _safe_content(doc["command"])
    return doc


def _safe_content(item: Doc, field: str = "content") -> None:
    if not _bson_safe(item[field]):
        item[f"{field}_json"] = json.dumps(item[field], separators=(",", ":"), allow_nan=False)
        item[field] = None


def _decode(doc: Doc, commands: list[Doc]) -> Twin:
    try:
        for key in _CONTENT_LISTS:
            for r in doc.get(key, ()):
                _restore_content(r)
        for key in _VALUE_LISTS:
            for r in doc.get(key, ()):
                _restore_content(r, "value")
        for c in commands:
            _restore_content(c)
    except (TypeError, AttributeError, ValueError) as e:
        raise CorruptTwinError(f"bad resource content in twin {doc.get('_id')!r}: {e}") from e
    doc["pending"] = sorted(commands, key=lambda c: (c.get("position", 0), c.get("_id", "")))
    return Twin.from_document(doc)


def _restore_content(item: Doc, field: str = "content") -> None:
    text = item.pop(f"{field}_json", None)
    if text is not None:
        item[field] = json.loads(text)


def _bson_safe(value: Any) -> bool:
    """Whether a JSON value is stored by every MongoDB-wire server exactly as it is."""
    if value is None or isinstance(value, bool | float | str):
        return True
    if isinstance(value, int):
        return _INT64[0] <= value <= _INT64[1]
    if isinstance(value, list):
        return all(map(_bson_safe, value))
    if isinstance(value, dict):
        return all(
            isinstance(k, str)
            and k
            and not k.startswith("$")
            and "." not in k
            and "\x00" not in k
            and _bson_safe(v)
            for k, v in value.items()
        )
    return False


# -- error translation -----------------------------------------------------------------


def _translate(e: Exception) -> TwinStoreError:
    if isinstance(e, ConnectionFailure | ExecutionTimeout | WTimeoutError):
        return StoreUnavailableError(f"twin store unavailable: {e}")
    if isinstance(e, DocumentTooLarge | BSONError | OverflowError):
        return CorruptTwinError(f"twin cannot be stored: {e}")
    return TwinStoreError(f"twin store failed: {e}")


@contextlib.contextmanager
def _translated(*passthrough: type[Exception]) -> Iterator[None]:
    """Turn PyMongo's errors into ours, except those the caller handles itself."""
    try:
        yield
    except passthrough:
        raise
    except (PyMongoError, BSONError, OverflowError) as e:
        raise _translate(e) from e

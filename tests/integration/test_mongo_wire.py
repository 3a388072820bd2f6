"""What the twin store needs from the MongoDB wire, checked against the server the fixtures start.

Position-guarded upsert: ``update_one({"_id": X, "position": {"$lt": P}}, {"$set": ...},
upsert=True)``. When the stored twin already reflects position >= P the filter matches nothing,
so the server tries to insert ``_id: X`` and fails with DuplicateKeyError (code 11000). The twin
store treats that error as "already applied" (``apply_guarded`` below); this is sound as long as
the twins collection has no other unique index, so ``_id`` is the only key that can collide.
On MongoDB, ``bulk_write(ordered=False)`` of such upserts reports each stale one as a code-11000
write error in ``BulkWriteError`` and applies the rest; FerretDB does not (below).

FerretDB v1.24.0 (SQLite backend, reports MongoDB 7.0.42) differs from MongoDB, as pinned below:

* An ``update`` command with a write error (our stale guarded upsert) replies without ``n`` /
  ``nModified``: PyMongo's ``bulk_write`` then fails with ``KeyError: 'nModified'`` instead of
  ``BulkWriteError``. (``update_one`` is fine: it raises ``DuplicateKeyError``.)
* In that command ``ordered: false`` is ignored: it stops at the first failing update, and the
  error's ``index`` is not the op's position in the batch.
* ``upserted[].index`` counts upserts, not ops: ``upserted_ids`` is keyed wrongly in a mixed batch.
* Unordered ``insert`` is right (continues after duplicates, correct indexes and ``nInserted``).

So the twin store must not put a possibly-stale guarded upsert in a ``bulk_write``; it writes a
batch as ``apply_guarded_bulk`` does (one find, guarded updates without upsert, unordered insert
of new twins), which behaves the same on both servers. Set ``TWINHUB_TEST_MONGO_URL`` to run this
module against a real MongoDB.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sqlite3
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pymongo import ASCENDING, AsyncMongoClient, ReplaceOne, UpdateOne
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError, DuplicateKeyError, WriteError

from twinhub_cli.devservices import MongoServer

pytestmark = pytest.mark.servers

Doc = dict[str, Any]
DUPLICATE_KEY = 11000


async def apply_guarded(
    coll: AsyncCollection[Doc], twin_id: str, position: int, state: Doc
) -> bool:
    """Write ``state`` at ``position`` unless the twin already reflects it; True if written."""
    try:
        await coll.update_one(
            {"_id": twin_id, "position": {"$lt": position}},
            {"$set": {**state, "position": position}},
            upsert=True,
        )
    except DuplicateKeyError:
        return False  # a newer-or-equal position is stored: this event was already applied
    return True


async def apply_guarded_bulk(coll: AsyncCollection[Doc], writes: dict[str, tuple[int, Doc]]) -> int:
    """Write many twins (id -> (position, state)); returns how many were written.

    Portable to FerretDB: a batch of guarded *upserts* must not contain a stale entry there (see
    the module docstring), so existing twins get guarded updates without upsert (cannot fail)
    and new twins an unordered insert; a twin created concurrently by another writer is retried
    as a guarded update.
    """
    pending = dict(writes)
    written = 0
    while pending:
        ids = list(pending)
        existing = {doc["_id"] async for doc in coll.find({"_id": {"$in": ids}}, {"_id": 1})}
        if existing:
            result = await coll.bulk_write(
                [
                    UpdateOne(
                        {"_id": twin_id, "position": {"$lt": pending[twin_id][0]}},
                        {"$set": {**pending[twin_id][1], "position": pending[twin_id][0]}},
                    )
                    for twin_id in ids
                    if twin_id in existing
                ],
                ordered=False,
            )
            written += result.matched_count
        new = [twin_id for twin_id in ids if twin_id not in existing]
        raced: list[str] = []
        if new:
            docs = [{"_id": i, **pending[i][1], "position": pending[i][0]} for i in new]
            try:
                written += len((await coll.insert_many(docs, ordered=False)).inserted_ids)
            except BulkWriteError as exc:
                errors = exc.details["writeErrors"]
                if any(err["code"] != DUPLICATE_KEY for err in errors):
                    raise
                raced = [new[err["index"]] for err in errors]
                written += exc.details["nInserted"]
        pending = {twin_id: pending[twin_id] for twin_id in raced}
    return written


async def is_ferretdb(db: AsyncDatabase[Doc]) -> bool:
    return "ferretdbVersion" in await db.client.admin.command("buildInfo")


async def test_insert_and_find(mongo_db: AsyncDatabase[Doc]) -> None:
    await mongo_db.twins.insert_one({"_id": "d1", "position": 1, "reported": {"temp": 20.5}})
    assert await mongo_db.twins.find_one({"_id": "d1"}) == {
        "_id": "d1",
        "position": 1,
        "reported": {"temp": 20.5},
    }


async def test_guarded_upsert_creates_then_advances(mongo_db: AsyncDatabase[Doc]) -> None:
    coll = mongo_db.twins
    assert await apply_guarded(coll, "d1", 5, {"reported": {"on": True}})
    assert await apply_guarded(coll, "d1", 7, {"reported": {"on": False}})
    assert await coll.find_one({"_id": "d1"}) == {
        "_id": "d1",
        "position": 7,
        "reported": {"on": False},
    }


async def test_stale_guarded_upsert_is_a_duplicate_key(mongo_db: AsyncDatabase[Doc]) -> None:
    coll = mongo_db.twins
    await coll.insert_one({"_id": "d1", "position": 9, "reported": {"on": True}})
    with pytest.raises(DuplicateKeyError) as info:
        await coll.update_one(
            {"_id": "d1", "position": {"$lt": 9}}, {"$set": {"position": 9}}, upsert=True
        )
    assert info.value.code == DUPLICATE_KEY
    # the store maps that to "already applied", for an equal and for an older position
    assert not await apply_guarded(coll, "d1", 9, {"reported": {"on": False}})
    assert not await apply_guarded(coll, "d1", 3, {"reported": {"on": False}})
    assert await coll.find_one({"_id": "d1"}) == {
        "_id": "d1",
        "position": 9,
        "reported": {"on": True},
    }


async def test_bulk_guarded_writes(mongo_db: AsyncDatabase[Doc]) -> None:
    coll = mongo_db.twins
    await coll.insert_many(
        [
            {"_id": "a", "position": 10, "v": "a10"},
            {"_id": "b", "position": 2, "v": "b2"},
            {"_id": "d", "position": 7, "v": "d7"},
        ]
    )
    written = await apply_guarded_bulk(
        coll,
        {
            "a": (4, {"v": "a4"}),  # stale: a is at 10
            "b": (5, {"v": "b5"}),  # advances b
            "c": (1, {"v": "c1"}),  # creates c
            "d": (7, {"v": "d7-again"}),  # redelivery of the stored position: stale
        },
    )
    assert written == 2
    docs = await coll.find({}, {"_id": 1, "position": 1, "v": 1}).sort("_id", ASCENDING).to_list()
    assert docs == [
        {"_id": "a", "position": 10, "v": "a10"},
        {"_id": "b", "position": 5, "v": "b5"},
        {"_id": "c", "position": 1, "v": "c1"},
        {"_id": "d", "position": 7, "v": "d7"},
    ]


async def test_bulk_guarded_upserts_with_stale_entries(mongo_db: AsyncDatabase[Doc]) -> None:
    """The MongoDB idiom, and what FerretDB v1.24 does with it instead (pinned, see docstring)."""
    coll = mongo_db.twins
    await coll.insert_many([{"_id": "a", "position": 10}, {"_id": "b", "position": 2}])
    ops = [
        UpdateOne({"_id": "a", "position": {"$lt": 4}}, {"$set": {"position": 4}}, upsert=True),
        UpdateOne({"_id": "b", "position": {"$lt": 5}}, {"$set": {"position": 5}}, upsert=True),
        UpdateOne({"_id": "c", "position": {"$lt": 1}}, {"$set": {"position": 1}}, upsert=True),
    ]
    if await is_ferretdb(mongo_db):
        # the reply to the failed batch lacks nModified, so PyMongo fails while merging it
        with pytest.raises(KeyError, match="nModified"):
            await coll.bulk_write(ops, ordered=False)
        # and ordered=False was ignored: nothing after the stale entry was applied
        assert await coll.find().sort("_id").to_list() == [
            {"_id": "a", "position": 10},
            {"_id": "b", "position": 2},
        ]
        return
    with pytest.raises(BulkWriteError) as info:
        await coll.bulk_write(ops, ordered=False)
    errors = info.value.details["writeErrors"]
    assert [(err["index"], err["code"]) for err in errors] == [(0, DUPLICATE_KEY)]
    assert await coll.find().sort("_id").to_list() == [
        {"_id": "a", "position": 10},
        {"_id": "b", "position": 5},
        {"_id": "c", "position": 1},
    ]


async def test_unordered_insert_reports_each_duplicate(mongo_db: AsyncDatabase[Doc]) -> None:
    coll = mongo_db.twins
    await coll.insert_many([{"_id": "a"}, {"_id": "b"}])
    with pytest.raises(BulkWriteError) as info:
        await coll.insert_many(
            [{"_id": "a"}, {"_id": "x"}, {"_id": "b"}, {"_id": "y"}], ordered=False
        )
    details = info.value.details
    assert [(err["index"], err["code"]) for err in details["writeErrors"]] == [
        (0, DUPLICATE_KEY),
        (2, DUPLICATE_KEY),
    ]
    assert details["nInserted"] == 2
    assert await coll.count_documents({}) == 4


async def test_bulk_all_fresh_reports_counts(mongo_db: AsyncDatabase[Doc]) -> None:
    coll = mongo_db.twins
    result = await coll.bulk_write(
        [
            UpdateOne(
                {"_id": f"d{i}", "position": {"$lt": 1}}, {"$set": {"position": 1}}, upsert=True
            )
            for i in range(5)
        ],
        ordered=False,
    )
    assert result.upserted_count == 5
    assert result.upserted_ids == {i: f"d{i}" for i in range(5)}


async def test_upserted_ids_are_keyed_by_op_index(mongo_db: AsyncDatabase[Doc]) -> None:
    coll = mongo_db.twins
    await coll.insert_one({"_id": "b", "position": 2})
    result = await coll.bulk_write(
        [
            UpdateOne({"_id": "b", "position": {"$lt": 3}}, {"$set": {"position": 3}}, upsert=True),
            UpdateOne({"_id": "c", "position": {"$lt": 1}}, {"$set": {"position": 1}}, upsert=True),
        ],
        ordered=False,
    )
    assert (result.matched_count, result.upserted_count) == (1, 1)
    # FerretDB numbers upserts among themselves, not by their index in the batch
    expected_index = 0 if await is_ferretdb(mongo_db) else 1
    assert result.upserted_ids == {expected_index: "c"}


async def test_create_index_and_query_by_it(mongo_db: AsyncDatabase[Doc]) -> None:
    coll = mongo_db.twins
    name = await coll.create_index([("owner", ASCENDING), ("position", ASCENDING)])
    unique = await coll.create_index("serial", unique=True)
    info = await coll.index_information()
    assert {name, unique} <= set(info)
    assert info[unique].get("unique") is True
    await coll.insert_many(
        [
            {"_id": f"d{i}", "owner": "o1" if i % 2 else "o2", "position": i, "serial": i}
            for i in range(6)
        ]
    )
    found = await coll.find({"owner": "o1", "position": {"$gte": 2}}).sort("position").to_list()
    assert [d["_id"] for d in found] == ["d3", "d5"]
    with pytest.raises(DuplicateKeyError):
        await coll.insert_one({"_id": "x", "serial": 3})


async def test_lookups_by_id_use_the_id_index(mongo_db: AsyncDatabase[Doc]) -> None:
    """``{_id: X}`` is an index lookup, not a scan: the twin store's writes and reads rely on it.

    FerretDB v1.24 (SQLite) scans the whole table for it: its query says ``->'$._id'`` while
    its ``_id`` index is on ``->"_id"``, which SQLite does not treat as the same expression
    (24 ms per lookup at 1,000 twins, growing with the collection). tools/mongo-server
    patches that (``patches/0001-*.patch``); this fails if a FerretDB upgrade loses the patch.
    """
    coll = mongo_db.get_collection("by_id")
    await coll.insert_many([{"_id": f"d{i}", "v": i} for i in range(50)])
    build = await mongo_db.command("buildInfo")
    plan = await mongo_db.command("explain", {"find": "by_id", "filter": {"_id": "d7"}})
    if "ferretdbVersion" in build:
        steps = plan["queryPlanner"]["Plan"]
        assert plan["filterPushdown"] is True
        assert any("USING INDEX" in step for step in steps), steps
        assert not any("SCAN" in step for step in steps), steps
    else:  # MongoDB: an _id point lookup, however the version spells it
        assert "COLLSCAN" not in str(plan["queryPlanner"]["winningPlan"])
    assert await coll.find_one({"_id": "d7"}) == {"_id": "d7", "v": 7}


async def test_an_update_command_of_many_statements_is_answered(
    mongo_db: AsyncDatabase[Doc],
) -> None:
    """One ``update`` command of 300 replaces completes (the twin store sends hundreds).

    FerretDB v1.24 kept each statement's query open until the end of the command, one pooled
    SQLite connection each, and the 100th statement waited forever for one of the pool's 100
    (the command never answered and the collection stayed blocked). tools/mongo-server patches
    that (``patches/0002-*.patch``); this fails (times out) if an upgrade loses the patch.
    """
    coll = mongo_db.get_collection("many_updates")
    await coll.insert_many([{"_id": f"d{i}", "v": 0} for i in range(300)])
    ops = [UpdateOne({"_id": f"d{i}"}, {"$set": {"v": 1}}) for i in range(300)]
    result = await asyncio.wait_for(coll.bulk_write(ops, ordered=False), timeout=30)
    assert result.matched_count == 300
    assert await coll.count_documents({"v": 1}) == 300


# SQLite checkpoints a WAL of 1,000 pages (4 MiB) by itself; a rewound WAL stays that size.
SQLITE_AUTO_CHECKPOINT = 4 << 20


async def _replace_many(
    coll: AsyncCollection[Doc], ids: list[str], writes: int, wal: Path
) -> tuple[int, list[float]]:
    """``writes`` replaces of 3 KB documents: the largest -wal size seen, the sorted latencies."""
    largest, latencies = 0, []
    for n in range(writes):
        started = time.perf_counter()
        await coll.replace_one({"_id": ids[n % len(ids)]}, {"v": n, "pad": "y" * 3000})
        latencies.append(time.perf_counter() - started)
        largest = max(largest, _size(wal))
    assert await coll.find_one({"_id": ids[(writes - 1) % len(ids)]}, {"v": 1}) == {
        "_id": ids[(writes - 1) % len(ids)],
        "v": writes - 1,
    }
    return largest, sorted(latencies)


def _size(path: Path) -> int:
    """A file's size, 0 if it does not exist (a stat: too quick to need a thread)."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _latencies(latencies: list[float]) -> str:
    p50, p99 = latencies[len(latencies) // 2], latencies[len(latencies) * 99 // 100]
    worst = latencies[-1]
    return f"replace_one p50 {p50 * 1e3:.1f} ms, p99 {p99 * 1e3:.1f} ms, max {worst * 1e3:.0f} ms"


async def _seed(coll: AsyncCollection[Doc]) -> list[str]:
    ids = [f"d{i}" for i in range(200)]
    await coll.insert_many([{"_id": i, "v": 0, "pad": "x" * 3000} for i in ids])
    return ids


async def test_a_lone_writer_lets_sqlite_rewind_its_wal(tmp_path: Path) -> None:
    """With no reader and the checkpointer off, SQLite's own checkpoints bound the WAL.

    FerretDB v1.24 kept an update's query open (its SQLite read transaction on another pooled
    connection) while it wrote, so SQLite never found the WAL free of readers to rewind it:
    these writes grew the -wal file by all their traffic (16 MiB; 64 MiB in 15 s of a loop).
    tools/mongo-server patches that (``patches/0003-*.patch``); this fails if the patch is lost.
    """
    extra = ["--wal-checkpoint-interval", "0"]
    async with MongoServer(tmp_path, extra_args=extra) as server:
        client: AsyncMongoClient[Doc] = AsyncMongoClient(server.url)
        try:
            coll = client.walsolo.twins
            ids = await _seed(coll)
            wal = server.db_dir / "walsolo.sqlite-wal"
            async with asyncio.timeout(100):
                largest, latencies = await _replace_many(coll, ids, 2000, wal)
            assert largest < 2 * SQLITE_AUTO_CHECKPOINT, (
                f"WAL reached {largest} bytes ({_latencies(latencies)})"
            )
        finally:
            await client.close()


WAL_CHECK_SIZE = 1 << 20  # the checkpointer's threshold in the test below (default 64 MiB)


async def test_the_checkpointer_bounds_the_wal_under_concurrent_reads(tmp_path: Path) -> None:
    """tools/mongo-server's checkpointer keeps the WAL near its threshold while readers overlap.

    SQLite only rewinds its WAL when a writer finds no reader still using it; with readers
    overlapping the writes that moment may not come (a soak grew the -wal file by 26 GB/h).
    The server's TRUNCATE checkpoints (every 200 ms here, above 1 MiB) keep it well under the
    4 MiB that SQLite's own checkpoints let it reach; without them this fails. Runs its own
    server: the test needs small checkpoint settings (and FerretDB).
    """
    extra = ["--wal-checkpoint-interval", "200ms", "--wal-checkpoint-size", str(WAL_CHECK_SIZE)]
    async with MongoServer(tmp_path, extra_args=extra) as server:
        client: AsyncMongoClient[Doc] = AsyncMongoClient(server.url, maxPoolSize=16)
        try:
            coll = client.walsoak.twins
            ids = await _seed(coll)
            wal = server.db_dir / "walsoak.sqlite-wal"
            stop = asyncio.Event()
            reads = 0

            async def reader(k: int) -> None:
                nonlocal reads
                while not stop.is_set():
                    assert await coll.find_one({"_id": ids[(k * 31 + reads) % len(ids)]})
                    reads += 1

            async def writer() -> tuple[int, list[float]]:
                try:
                    return await _replace_many(coll, ids, 1000, wal)
                finally:
                    stop.set()

            async with asyncio.timeout(100), asyncio.TaskGroup() as tg:
                for k in range(8):
                    tg.create_task(reader(k), name=f"wal-reader-{k}")
                written = tg.create_task(writer(), name="wal-writer")
            largest, latencies = written.result()
            assert reads > 1000  # the readers overlapped the writes
            assert largest < 3 << 20, f"WAL reached {largest} bytes ({_latencies(latencies)})"
        finally:
            await client.close()


# -- the cost of a write (issue 14): tools/mongo-server patches 0004-0007 -------------------------


async def test_a_replace_by_id_writes_without_reading(mongo_db: AsyncDatabase[Doc]) -> None:
    """``replace_one({_id: X}, doc)``, the twin store's write, answers as MongoDB does, with
    or without upsert, and keeps ``_id`` (the other server-side checks stay too).

    On FerretDB ``patches/0005-*`` writes such a replace without reading the stored document
    first; this pins the behaviour it must keep (the statement count is pinned below).
    """
    coll = mongo_db.get_collection("replaces")
    await coll.insert_many([{"_id": "a", "v": 1, "w": "x"}, {"_id": "b", "v": 1}])

    replaced = await coll.replace_one({"_id": "a"}, {"v": 2, "nested": {"k": [1, 2]}})
    assert (replaced.matched_count, replaced.modified_count) == (1, 1)
    assert replaced.upserted_id is None
    assert await coll.find_one({"_id": "a"}) == {"_id": "a", "v": 2, "nested": {"k": [1, 2]}}

    missing = await coll.replace_one({"_id": "nobody"}, {"v": 3})
    assert (missing.matched_count, missing.modified_count) == (0, 0)
    assert await coll.count_documents({}) == 2

    upserted = await coll.replace_one({"_id": "c"}, {"v": 4}, upsert=True)
    assert (upserted.matched_count, upserted.modified_count, upserted.upserted_id) == (0, 0, "c")
    existing = await coll.replace_one({"_id": "c"}, {"v": 5}, upsert=True)
    assert (existing.matched_count, existing.modified_count) == (1, 1)
    assert existing.upserted_id is None
    assert await coll.find_one({"_id": "c"}) == {"_id": "c", "v": 5}

    same_id = await coll.replace_one({"_id": "b"}, {"_id": "b", "v": 6})
    assert same_id.matched_count == 1
    assert await coll.find_one({"_id": "b"}) == {"_id": "b", "v": 6}
    with pytest.raises(WriteError):  # _id is immutable
        await coll.replace_one({"_id": "b"}, {"_id": "other", "v": 7})
    assert await coll.find_one({"_id": "b"}) == {"_id": "b", "v": 6}

    batch = await coll.bulk_write(
        [ReplaceOne({"_id": i}, {"v": 8}) for i in ("a", "b", "nobody", "c")], ordered=False
    )
    assert (batch.matched_count, batch.modified_count) == (3, 3)
    assert sorted(await coll.distinct("v")) == [8]


def _log_offset(server: MongoServer) -> int:
    return _size(server.log_path)


def _statements(server: MongoServer, offset: int, table_prefix: str) -> list[str]:
    """The SQL statements the server ran on ``table_prefix*`` tables since ``offset`` of its
    log (``--log-level debug`` logs each statement as ``>>> SQL`` before running it)."""
    with server.log_path.open("rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    quoted = f'\\"{table_prefix}_'
    return [
        line.split('msg="', 1)[1].split('" ', 1)[0]
        for line in text.splitlines()
        if 'msg=">>> ' in line and quoted in line
    ]


async def test_a_replace_by_id_is_one_sql_statement(tmp_path: Path) -> None:
    """On FerretDB a ``replace_one`` by ``_id`` is one SQL ``UPDATE``, no ``SELECT``, and SQL
    statements are still logged at debug level.

    FerretDB v1.24 read each matched document first (a query, the document decoded from JSON,
    compared, then written): about a third of its CPU per replace. ``patches/0005-*`` writes
    a replacement by ``_id`` directly; this fails if a FerretDB upgrade loses it. It also pins
    what ``patches/0004-*`` must keep: that patch only stops building the statements' log
    records when they are not logged (a pure speed-up, no other observable).
    """
    async with MongoServer(tmp_path, extra_args=["--log-level", "debug"]) as server:
        client: AsyncMongoClient[Doc] = AsyncMongoClient(server.url)
        try:
            coll = client.stmts.twins
            await coll.insert_many([{"_id": f"d{i}", "v": 0} for i in range(3)])
            offset = _log_offset(server)
            result = await coll.replace_one({"_id": "d1"}, {"v": 1, "pad": "p" * 100})
            assert result.matched_count == 1
            statements = _statements(server, offset, "twins")
            assert len(statements) == 1, statements
            assert statements[0].startswith(">>> UPDATE"), statements

            offset = _log_offset(server)  # the general path stays for update operators
            await coll.update_one({"_id": "d2"}, {"$set": {"v": 2}})
            kinds = [s.split()[1] for s in _statements(server, offset, "twins")]
            assert kinds == ["SELECT", "UPDATE"], kinds
            assert await coll.find_one({"_id": "d1"}) == {"_id": "d1", "v": 1, "pad": "p" * 100}
        finally:
            await client.close()


def _sqlite_indexes(db_file: Path) -> set[str]:
    """The index names in a SQLite database file (read-only, beside the running server)."""
    with contextlib.closing(sqlite3.connect(f"file:{db_file}?mode=ro", uri=True)) as db:
        return {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}


async def test_secondary_indexes_cost_sqlite_nothing(tmp_path: Path) -> None:
    """On FerretDB (SQLite) non-unique secondary indexes live in the metadata only, and are
    listed, reported and dropped as before; the ``_id`` index and unique ones stay in SQLite.

    FerretDB v1.24's SQLite backend never queries a secondary index (it pushes down an exact
    ``_id`` and nothing else), yet SQLite maintained their JSON expressions on every write:
    with the twin store's seven, a third of the CPU per replace. ``patches/0006-*`` keeps them
    out of SQLite; this fails if a FerretDB upgrade loses it.
    """
    async with MongoServer(tmp_path) as server:
        client: AsyncMongoClient[Doc] = AsyncMongoClient(server.url)
        try:
            coll = client.idx.twins
            await coll.insert_many(
                [{"_id": f"d{i}", "owner": f"o{i % 2}", "serial": i} for i in range(6)]
            )
            owner = await coll.create_index([("owner", ASCENDING), ("_id", ASCENDING)])
            serial = await coll.create_index("serial", unique=True)
            info = await coll.index_information()
            assert set(info) == {"_id_", owner, serial}
            assert info[owner]["key"] == [("owner", 1), ("_id", 1)]

            in_sqlite = _sqlite_indexes(server.db_dir / "idx.sqlite")
            assert any(n.endswith("__id_") for n in in_sqlite), in_sqlite
            assert any(n.endswith(f"_{serial}") for n in in_sqlite), in_sqlite
            assert not any(n.endswith(f"_{owner}") for n in in_sqlite), in_sqlite

            with pytest.raises(DuplicateKeyError):  # a unique index still constrains
                await coll.insert_one({"_id": "x", "serial": 3})
            found = await coll.find({"owner": "o1"}).sort("_id").to_list()
            assert [d["_id"] for d in found] == ["d1", "d3", "d5"]
            stats = await client.idx.command("collStats", "twins")
            assert set(stats["indexSizes"]) == {"_id_", owner, serial}

            # A database from an unpatched server has the index in SQLite: dropped on start.
            db_file = server.db_dir / "idx.sqlite"
            await server.stop()
            with contextlib.closing(sqlite3.connect(db_file)) as db:
                (table,) = db.execute(
                    "SELECT tbl_name FROM sqlite_master WHERE name LIKE '%\\__id_' ESCAPE '\\'"
                ).fetchone()
                db.execute(
                    f'CREATE INDEX "{table}_{owner}" ON "{table}" '
                    '(_ferretdb_sjson->"owner", _ferretdb_sjson->"_id")'
                )
                db.commit()
            assert any(n.endswith(f"_{owner}") for n in _sqlite_indexes(db_file))
            await server.start()
            assert not any(n.endswith(f"_{owner}") for n in _sqlite_indexes(db_file))
            assert set(await coll.index_information()) == {"_id_", owner, serial}

            await coll.drop_index(owner)
            assert set(await coll.index_information()) == {"_id_", serial}
            await coll.drop_index(serial)
            assert not any(
                n.endswith(f"_{serial}") for n in _sqlite_indexes(server.db_dir / "idx.sqlite")
            )
        finally:
            await client.close()


async def test_acknowledged_replaces_survive_a_kill(tmp_path: Path) -> None:
    """Every acknowledged replace is there after ``kill -9`` of the server (WAL with
    ``synchronous=NORMAL``: durable against a process crash, not a power loss).

    Pins what ``patches/0007-*`` must keep: a one-document update is now one autocommit
    ``UPDATE`` instead of an explicit transaction around it (a pure speed-up: the same atomic
    statement, one BEGIN and COMMIT fewer).
    """
    async with MongoServer(tmp_path) as server:
        client: AsyncMongoClient[Doc] = AsyncMongoClient(server.url, retryWrites=False)
        try:
            coll = client.killed.twins
            ids = [f"d{i}" for i in range(20)]
            await coll.insert_many([{"_id": i, "v": 0} for i in ids])
            for n in range(1, 201):
                await coll.replace_one({"_id": ids[n % len(ids)]}, {"v": n, "pad": "z" * 500})
            assert server.pid is not None
            os.kill(server.pid, signal.SIGKILL)
            await server.restart()
            got = {d["_id"]: d["v"] async for d in coll.find({}, {"v": 1})}
            assert got == {i: 200 - (200 - k) % len(ids) for k, i in enumerate(ids)}
        finally:
            await client.close()


async def test_values_round_trip_exactly(mongo_db: AsyncDatabase[Doc]) -> None:
    """Strings that JSON must escape, keys too, integers at their limits and dates are read
    back as written, inserted and replaced.

    Pins what ``patches/0009-*`` must keep: FerretDB stores documents as JSON text, and that
    patch writes the commonest values (plain ASCII strings and keys, integers, dates) without
    encoding/json, in the same bytes (a pure speed-up; FerretDB's own sjson tests pass too).
    """
    coll = mongo_db.get_collection("round_trip")
    when = datetime(2026, 3, 4, 5, 6, 7, 890000, tzinfo=UTC)
    doc: Doc = {
        "plain": "light-1 /oic/d",
        "escapes": 'q"b\\s</x>&amp;\x01\x1f\x7f',
        "unicode": "é ✓ 😀 \u2028\u2029",
        "<key&>": {'nested "key"': ["a", "<", 1]},
        "i32": [0, -1, 2**31 - 1, -(2**31)],
        "i64": [2**31, -(2**31) - 1, 2**63 - 1, -(2**63)],
        "when": when,
        "empty": "",
    }
    await coll.insert_one({"_id": "r", **doc})
    assert await coll.find_one({"_id": "r"}, {"_id": 0}) == doc
    replaced = {**doc, "plain": "light-2", "i64": [2**62]}
    await coll.replace_one({"_id": "r"}, replaced)
    got = await coll.find_one({"_id": "r"}, {"_id": 0})
    assert got == replaced
    assert got is not None and list(got) == list(replaced)  # the field order too


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        text: str = r.read().decode()
        return text


async def test_resource_tracking_records_no_stacks(tmp_path: Path) -> None:
    """A release build of the server keeps no pprof profiles of FerretDB's live objects.

    FerretDB v1.24 added every tracked object (each document iterator, query, transaction:
    several per command) to a pprof profile, recording the creator's stack: ~5 % of its CPU
    per replace. ``patches/0008-*`` keeps those profiles to FerretDB's debug builds; this
    fails (they show up in ``/debug/pprof/``) if a FerretDB upgrade loses it.
    """
    addr = f"127.0.0.1:{_free_port()}"
    async with MongoServer(tmp_path, extra_args=["--pprof", addr]) as server:
        client: AsyncMongoClient[Doc] = AsyncMongoClient(server.url)
        try:
            coll = client.tracked.twins
            await coll.insert_many([{"_id": f"d{i}", "v": 0} for i in range(5)])
            await coll.update_one({"_id": "d1"}, {"$set": {"v": 1}})
            assert [d["_id"] async for d in coll.find({"v": 0}).sort("_id")] == [
                "d0",
                "d2",
                "d3",
                "d4",
            ]
            index = await asyncio.to_thread(_get, f"http://{addr}/debug/pprof/")
            assert "goroutine" in index  # the profiler answers
            assert "FerretDB/" not in index, index
        finally:
            await client.close()

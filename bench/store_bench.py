"""What one write of a twin costs the MongoDB-wire server (FerretDB, SQLite backend; issue 14).

    .venv/bin/python bench/store_bench.py [--twins 500] [--seconds 5] [--binary PATH ...]
        [--pprof-dir DIR] [--quick] [--output result.json]

Starts its own ``mongo-server`` (:class:`twinhub_cli.devservices.MongoServer`, as ``twinhub
up`` runs it) per ``--binary`` (default: the one ``./scripts/setup`` built; give an old build
and a new one to compare them in one run), writes ``--twins`` real twin documents through the
store adapter (:class:`twin.adapters.mongo.MongoTwinStore`: its indexes, its encoding; the twins
folded from the events a simulated device sends: links, ``/oic/d``, ``/oic/p``, a light, online;
~2.1 kB of BSON each), then rewrites them with raw PyMongo, round robin, each replacement the
stored document with its ``position``, ``version`` and ``updated_at`` moved on:

* ``replace_1conn``   ``replace_one({_id}, doc)`` from one connection, each awaited;
* ``replace_8conn``   the same from 8 connections (threads) at once;
* ``bulk_256``        ``bulk_write`` of 256 ``ReplaceOne`` (unordered, as the store writes);
* ``replace_1conn_id_index_only``  the 1-connection loop on a copy of the collection with no
  index but ``_id`` (what the 7 secondary indexes cost).

Each reports replaces per second, the server process's CPU per replace (utime + stime deltas
of ``/proc/<pid>/stat``), the client's own CPU per replace, and the CPU of everything else on
the machine meanwhile (``others_pct_of_one_core``: far above 0, the machine was shared); each
binary its server's peak RSS. Baseline in the same run, with no server: SQLite itself (Python's
``sqlite3``, the C library, WAL, ``synchronous=NORMAL`` like the server) doing the equivalent
statement, ``UPDATE t SET sjson = ? WHERE sjson->'_id' = ?`` of the same documents as JSON text
in FerretDB's table layout (an expression index on ``_id``), with and without the 7 secondary
expression indexes FerretDB would create, one transaction per update (its CPU includes
Python's ``json.dumps``). ``ratio_server_cpu_over_sqlite_8_indexes``: the server's CPU per
``replace_1conn`` over that.

``--pprof-dir DIR``: also record a 1-connection CPU profile of each binary (the server's
``--pprof``, Go's ``net/http/pprof``) into ``DIR/<binary name>.pprof``. ``--quick``: a smoke test
(20 twins, a fraction of a second per scenario); its figures mean nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import sqlite3
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import benchutil
import bson
from pymongo import AsyncMongoClient, MongoClient, ReplaceOne

from devicesim import ocf
from devicesim.resources import DeviceModel
from proto import events as ev
from twin.adapters.mongo import MongoTwinStore
from twin.fold import fold_all
from twin.model import Twin
from twinhub_cli.devservices import MongoServer, find_mongo_server_binary

Doc = dict[str, Any]
DB = "bench"
COLLECTION = "twins"
OWNER = "bench-owner"
T0 = datetime(2026, 1, 1, tzinfo=UTC)
FULL = {"twins": 500, "seconds": 5.0}
QUICK = {"twins": 20, "seconds": 0.3}
CONNECTIONS = 8
BULK = 256


# -- the documents ------------------------------------------------------------------------------


def real_twin(n: int) -> Twin:
    """The twin of a simulated device (devicesim's model) after its usual first events."""
    device_id = str(uuid.UUID(int=n + 1))
    model = DeviceModel(device_id=device_id, name=f"bench-{n}", resources=1)
    conn = f"c-{device_id[-12:]}"
    links = tuple(
        ev.ResourceLink(
            href=link["href"],
            rt=tuple(link["rt"]),
            interfaces=tuple(link["if"]),
            ins=link["ins"],
            observable=bool(link["p"]["bm"] & ocf.BM_OBSERVABLE),
            anchor=link["anchor"],
        )
        for link in model.publish_links()
    )
    data: list[ev.EventData] = [
        ev.DeviceRegistered(auth_provider="bench", gateway="gw-1"),
        ev.DeviceOnline(gateway="gw-1", connection_id=conn, remote_address="127.0.0.1:40000"),
        ev.ResourceLinksPublished(links=links),
    ]
    for href in (ocf.DEVICE, ocf.PLATFORM, *model.user_hrefs):
        data.append(
            ev.ResourceChanged(
                href=href,
                content=model.representation(href),
                content_format=10000,
                connection_id=conn,
            )
        )
    events = [
        ev.Event(
            owner=OWNER,
            device_id=device_id,
            data=d,
            source="/gateway/gw-1",
            id=f"{device_id}-{i}",
            time=T0 + timedelta(seconds=i),
            position=i + 1,
        )
        for i, d in enumerate(data)
    ]
    twin = fold_all(None, events)
    assert twin is not None
    return twin


async def seed(url: str, twins: int) -> None:
    """The twins written by the store adapter itself (its indexes and encoding)."""
    async with AsyncMongoClient[Doc](url) as client:
        store = MongoTwinStore(client[DB], COLLECTION)
        await store.ensure_indexes()
        result = await store.write_many([real_twin(n) for n in range(twins)])
        assert len(result.written) == twins, result


def moved_on(doc: Doc, step: int) -> Doc:
    """The replacement of a stored twin: the same shape, a later position."""
    out = {k: v for k, v in doc.items() if k != "_id"}
    out["position"] = doc["position"] + step
    out["version"] = doc["version"] + step
    out["updated_at"] = T0 + timedelta(milliseconds=step)
    return out


# -- the loops ----------------------------------------------------------------------------------


def cpu(pid: int) -> float:
    value = benchutil.cpu_seconds(pid)
    if value is None:
        raise RuntimeError(f"process {pid} is gone")
    return value


class Counter:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.step = 0

    def next(self) -> int:
        with self.lock:
            self.step += 1
            return self.step


def _replace_loop(
    client: MongoClient[Doc],
    collection: str,
    docs: list[Doc],
    offset: int,
    stride: int,
    until: float,
    counter: Counter,
) -> int:
    coll = client[DB][collection]
    n = 0
    i = offset
    while time.monotonic() < until:
        doc = docs[i % len(docs)]
        result = coll.replace_one({"_id": doc["_id"]}, moved_on(doc, counter.next()))
        assert result.matched_count == 1, result.raw_result
        n += 1
        i += stride
    return n


def _bulk_loop(client: MongoClient[Doc], docs: list[Doc], until: float, counter: Counter) -> int:
    coll = client[DB][COLLECTION]
    n = 0
    i = 0
    while time.monotonic() < until:
        batch = [docs[(i + k) % len(docs)] for k in range(min(BULK, len(docs)))]
        i += len(batch)
        step = counter.next()
        ops = [ReplaceOne({"_id": d["_id"]}, moved_on(d, step)) for d in batch]
        result = coll.bulk_write(ops, ordered=False)
        assert result.matched_count == len(batch), result.bulk_api_result
        n += len(batch)
    return n


def measure(
    name: str, pid: int, seconds: float, workers: Sequence[Callable[[float], int]]
) -> dict[str, Any]:
    results: list[int] = [0] * len(workers)
    errors: list[BaseException] = []

    def run(k: int, until: float) -> None:
        try:
            results[k] = workers[k](until)
        except BaseException as e:  # reported below, in the main thread
            errors.append(e)

    sys0 = benchutil.system_cpu()
    server0, client0, t0 = cpu(pid), time.process_time(), time.perf_counter()
    until = time.monotonic() + seconds
    threads = [threading.Thread(target=run, args=(k, until)) for k in range(len(workers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    server, client = cpu(pid) - server0, time.process_time() - client0
    sys1 = benchutil.system_cpu()
    cores = os.cpu_count() or 1
    busy = cores * (sys1[0] - sys0[0]) / max(sys1[1] - sys0[1], 1e-9)  # in cores
    if errors:
        raise errors[0]
    ops = sum(results)
    return {
        "scenario": name,
        "connections": len(workers),
        "replaces": ops,
        "seconds": round(wall, 3),
        "replaces_per_s": round(ops / wall, 1),
        "server_cpu_ms_per_replace": round(1000 * server / max(ops, 1), 3),
        "server_cpu_pct_of_one_core": round(100 * server / wall, 1),
        "client_cpu_ms_per_replace": round(1000 * client / max(ops, 1), 3),
        # Everything else on the machine meanwhile (not this bench, not its server), in % of
        # one core: far above 0, the figures are those of a shared machine.
        "others_pct_of_one_core": round(max(0.0, 100 * (busy - (server + client) / wall)), 1),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def profile(addr: str, seconds: float, out: Path, loop: Callable[[float], int]) -> None:
    """A CPU profile of the server over ``seconds`` of ``loop``."""
    url = f"http://{addr}/debug/pprof/profile?seconds={max(1, round(seconds))}"
    box: dict[str, bytes] = {}

    def fetch() -> None:
        with urllib.request.urlopen(url, timeout=seconds + 60) as r:
            box["data"] = r.read()

    t = threading.Thread(target=fetch)
    t.start()
    loop(time.monotonic() + seconds + 1.5)  # covers the whole profiled window
    t.join()
    out.write_bytes(box["data"])


async def bench_binary(
    binary: Path, twins: int, seconds: float, pprof_dir: Path | None
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="store-bench-") as tmp:
        pprof = f"127.0.0.1:{free_port()}" if pprof_dir else None
        server = MongoServer(Path(tmp), extra_args=("--pprof", pprof) if pprof else ())
        server.binary = binary
        async with server:
            await seed(server.url, twins)
            assert server.pid is not None
            return await asyncio.to_thread(
                run_scenarios, server.url, server.pid, binary, twins, seconds, pprof, pprof_dir
            )


def run_scenarios(
    url: str,
    pid: int,
    binary: Path,
    twins: int,
    seconds: float,
    pprof: str | None,
    pprof_dir: Path | None,
) -> dict[str, Any]:
    counter = Counter()
    clients = [MongoClient[Doc](url, maxPoolSize=1) for _ in range(CONNECTIONS)]
    try:
        main = clients[0]
        docs = list(main[DB][COLLECTION].find({}))
        assert len(docs) == twins
        sizes = sorted(len(bson.encode(d)) for d in docs)
        indexes = sorted(i["name"] for i in main[DB][COLLECTION].list_indexes())
        bare = f"{COLLECTION}_id_index_only"
        main[DB][bare].insert_many(docs)

        def loop(
            client: MongoClient[Doc], coll: str, offset: int = 0, stride: int = 1
        ) -> Callable[[float], int]:
            def run(until: float) -> int:
                return _replace_loop(client, coll, docs, offset, stride, until, counter)

            return run

        def bulk(until: float) -> int:
            return _bulk_loop(main, docs, until, counter)

        loop(main, COLLECTION)(time.monotonic() + seconds / 5)  # warm-up, not measured
        eight = [loop(c, COLLECTION, k, CONNECTIONS) for k, c in enumerate(clients)]
        scenarios = [
            measure("replace_1conn", pid, seconds, [loop(main, COLLECTION)]),
            measure("replace_8conn", pid, seconds, eight),
            measure("bulk_256", pid, seconds, [bulk]),
            measure("replace_1conn_id_index_only", pid, seconds, [loop(main, bare)]),
        ]
        if pprof is not None and pprof_dir is not None:
            pprof_dir.mkdir(parents=True, exist_ok=True)
            profile(
                pprof, max(seconds, 5.0), pprof_dir / f"{binary.name}.pprof", loop(main, COLLECTION)
            )
        build = main[DB].command("buildInfo")
        peak_rss_kb = benchutil.status_kb(pid, "VmHWM")
    finally:
        for c in clients:
            c.close()
    return {
        "binary": str(binary),
        "ferretdb_version": build.get("ferretdbVersion", ""),
        "twins": twins,
        "document_bson_bytes": {"min": sizes[0], "max": sizes[-1]},
        "indexes": indexes,
        "server_peak_rss_kb": peak_rss_kb,
        "scenarios": {s["scenario"]: s for s in scenarios},
    }


# -- baseline: SQLite itself --------------------------------------------------------------------

# FerretDB's table layout: one JSON text column, a unique expression index on _id; its
# secondary indexes are expression indexes on the indexed fields (``sjson->'$.owner'``...).
_SECONDARY = (
    ("owner",),
    ("owner", "_id"),
    ("connection.online",),
    ("resource_types",),
    ("position",),
    ("next_expiry",),
    ("owner", "pending_count"),
)


def sqlite_baseline(docs: list[Doc], seconds: float, indexes: bool) -> dict[str, Any]:
    texts = [json.loads(bson.json_util.dumps(d)) for d in docs]
    with tempfile.TemporaryDirectory(prefix="store-bench-sqlite-") as tmp:
        db = sqlite3.connect(Path(tmp) / "t.sqlite", isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("CREATE TABLE t (sjson TEXT)")
            db.execute("CREATE UNIQUE INDEX t_id ON t (sjson->'_id')")
            if indexes:
                for k, fields in enumerate(_SECONDARY):
                    cols = ", ".join(f"sjson->'$.{f}'" for f in fields)
                    db.execute(f"CREATE INDEX t_{k} ON t ({cols})")
            for d in texts:
                db.execute("INSERT INTO t VALUES (?)", (json.dumps(d),))
            n = 0
            c0, t0 = time.process_time(), time.perf_counter()
            until = time.monotonic() + seconds
            while time.monotonic() < until:
                d = dict(texts[n % len(texts)])
                d["position"] = d["position"] + n + 1
                db.execute("BEGIN")
                cur = db.execute(
                    "UPDATE t SET sjson = ? WHERE sjson->'_id' = ?",
                    (json.dumps(d), json.dumps(d["_id"])),
                )
                assert cur.rowcount == 1
                db.execute("COMMIT")
                n += 1
            wall, used = time.perf_counter() - t0, time.process_time() - c0
        finally:
            db.close()
    return {
        "scenario": "sqlite_update_" + ("8_indexes" if indexes else "id_index_only"),
        "sqlite_version": sqlite3.sqlite_version,
        "updates": n,
        "updates_per_s": round(n / wall, 1),
        "cpu_ms_per_update": round(1000 * used / max(n, 1), 4),
        "note": "Python sqlite3 in this process, one transaction per UPDATE; CPU includes "
        "the JSON encoding in Python",
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--twins", type=int, default=None)
    p.add_argument("--seconds", type=float, default=None, help="per scenario")
    p.add_argument(
        "--binary",
        type=Path,
        action="append",
        help="mongo-server binary (repeat to compare builds; default: the built one)",
    )
    p.add_argument("--pprof-dir", type=Path, default=None)
    p.add_argument("--quick", action="store_true", help="a smoke test (CI)")
    p.add_argument("--output", type=Path, default=None)
    args = p.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    twins = int(args.twins if args.twins is not None else sizes["twins"])
    seconds = float(args.seconds if args.seconds is not None else sizes["seconds"])
    binaries = [b.resolve() for b in (args.binary or [find_mongo_server_binary()])]

    runs = [asyncio.run(bench_binary(b, twins, seconds, args.pprof_dir)) for b in binaries]
    docs = [{"_id": t.device_id, **t.to_document()} for t in map(real_twin, range(twins))]
    baselines = {
        b["scenario"]: b
        for b in (sqlite_baseline(docs, seconds, False), sqlite_baseline(docs, seconds, True))
    }
    floor = baselines["sqlite_update_8_indexes"]["cpu_ms_per_update"]
    for run in runs:
        one = run["scenarios"]["replace_1conn"]["server_cpu_ms_per_replace"]
        run["ratio_server_cpu_over_sqlite_8_indexes"] = round(one / max(floor, 1e-9), 1)
    result = {
        "machine": benchutil.machine(
            {"mongo_server": [str(b) for b in binaries], "connections": CONNECTIONS}
        ),
        "quick": args.quick,
        "seconds_per_scenario": seconds,
        "runs": runs,
        "baselines": baselines,
    }
    text = json.dumps(result, indent=1, default=str)
    if args.output is not None:
        args.output.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())

"""``twinhub devices`` into a pipe prints every device ID whole (issue 15, item 3: rich cut
them to ``850faf5f-e543-…`` off a terminal, so ``twinhub devices | grep ID`` found nothing);
``-o wide`` adds columns, ``-o json`` is ``--json``."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from pymongo.asynchronous.database import AsyncDatabase

from proto import events as ev
from tests.conftest import HasUrl
from tests.integration.twin.test_mongo_held import twin  # a twin folded from events
from tests.integration.twinhub_cli.cli import Ran, twinhub
from twin.adapters.mongo import MongoTwinStore
from twinhub_cli.datadir import DataDir

pytestmark = pytest.mark.servers


@pytest.fixture
async def stack(
    mongo_db: AsyncDatabase[Any], mongo_server: HasUrl, tmp_path: Path
) -> tuple[Path, list[str]]:
    """A data dir whose stack.json names the test's database, with two devices in it."""
    owner = "o" + uuid.uuid4().hex[:10]
    ids = sorted(str(uuid.uuid4()) for _ in range(2))
    online = ev.DeviceOnline(gateway="gw-cli", connection_id="c1", remote_address="10.0.0.1:1")
    twins = [twin(ids[0], online, owner=owner), twin(ids[1], owner=owner)]
    await MongoTwinStore(mongo_db).write_many(twins)
    data = DataDir(tmp_path / "data")
    data.write_stack(
        {"nats_url": "nats://127.0.0.1:1", "mongo_url": mongo_server.url, "database": mongo_db.name}
    )
    return data.root, ids


async def devices(data: Path, *args: str) -> Ran:
    ran = await twinhub("devices", "--data-dir", str(data), *args)
    assert ran.code == 0, ran.err
    return ran


async def test_a_pipe_gets_whole_device_ids_one_device_a_line(
    stack: tuple[Path, list[str]],
) -> None:
    data, ids = stack
    lines = (await devices(data)).out.splitlines()
    for device in ids:
        (line,) = [line for line in lines if device in line]  # `twinhub devices | grep ID`
        assert line.split()[0] == device
    header = "DEVICE OWNER ONLINE SYNC_STATE RESOURCES LAST_CHANGE"
    assert lines[0].split() == header.split()
    assert [line.split()[2] for line in lines[1:]] == ["yes", "no"]
    assert "…" not in "\n".join(lines)


async def test_wide_adds_columns_and_json_is_json_lines(stack: tuple[Path, list[str]]) -> None:
    data, ids = stack
    lines = (await devices(data, "-o", "wide")).out.splitlines()
    header = lines[0].split()
    assert header[:4] == ["DEVICE", "NAME", "OWNER", "KIND"]
    assert {"GATEWAY", "ADDRESS", "PENDING", "DESIRED", "POSITION"} <= set(header)
    first = dict(zip(header, lines[1].split(), strict=True))
    assert (first["DEVICE"], first["GATEWAY"], first["ADDRESS"]) == (ids[0], "gw-cli", "10.0.0.1:1")
    as_json = (await devices(data, "-o", "json")).out
    assert as_json == (await devices(data, "--json")).out
    assert [json.loads(line)["device_id"] for line in as_json.splitlines()] == ids

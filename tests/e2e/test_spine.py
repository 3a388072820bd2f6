"""OCF devices → gateway → JetStream → twin projector → MongoDB, on real servers."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from pymongo.asynchronous.database import AsyncDatabase

from devicesim.config import BatchSupport
from devicesim.device import SimDevice
from proto import events as ev

from .stack import WAIT, Stack, open_stack

if TYPE_CHECKING:
    from tests.conftest import Bus

pytestmark = pytest.mark.servers


@pytest.fixture
async def stack(bus: Bus, mongo_db: AsyncDatabase[Any], tmp_path: Path) -> Any:
    async with open_stack(bus, mongo_db, tmp_path) as st:
        yield st


def _lights(d: SimDevice) -> dict[str, Any]:
    return {h: d.model.representation(h) for h in d.model.user_hrefs}


async def _synced(stack: Stack, d: SimDevice) -> Any:
    return await stack.wait_twin(
        d.device_id,
        lambda t: (
            t.online
            and t.sync_state == "in_sync"
            and all(t.resource(h) is not None for h in d.model.user_hrefs)
        ),
    )


@pytest.mark.parametrize(
    ("tls", "batch", "reference"),
    [
        (False, BatchSupport.OBSERVE, False),
        (True, BatchSupport.OBSERVE, False),
        (False, BatchSupport.GET_ONLY, False),
        (True, BatchSupport.OBSERVE, True),
        (False, BatchSupport.REJECT, True),
    ],
    ids=[
        "tcp-batch",
        "tls-batch",
        "tcp-batch-get-only",
        "tls-reference-stack",
        "tcp-reference-batch-rejected",
    ],
)
async def test_device_changes_reach_the_twin_in_order(
    stack: Stack, tls: bool, batch: BatchSupport, reference: bool
) -> None:
    async with stack.running_projector():
        d = stack.device(
            tls=tls, resources=3, batch=batch, reference_stack=reference, ping_interval=None
        )
        async with d:
            await _synced(stack, d)
            for _ in range(30):
                sent = d.stats.notifications_sent
                d.change()  # one change, one notification (no coalescing at the device)
                await d.wait_until(lambda dev, n=sent: dev.stats.notifications_sent > n, WAIT)
            final = _lights(d)
            twin = await stack.wait_twin(
                d.device_id,
                lambda t: all(
                    (r := t.resource(h)) is not None and r.content == rep
                    for h, rep in final.items()
                ),
            )
            assert twin.owner == stack.owner
            assert twin.connection.protocol == ("coaps+tcp" if tls else "coap+tcp")
        # the device signed out on stop: offline
        await stack.wait_twin(d.device_id, lambda t: not t.online)
    changes = await stack.events(d.device_id, ev.ResourceChanged.KIND)
    per_href: dict[str, list[int]] = {}
    for e in changes:
        assert isinstance(e.data, ev.ResourceChanged)
        if isinstance(e.data.content, dict) and "seq" in e.data.content:
            per_href.setdefault(e.data.href, []).append(e.data.content["seq"])
    assert set(per_href) >= set(final)
    for href, seqs in per_href.items():
        assert seqs == sorted(seqs), f"{href} out of order: {seqs}"
        assert len(seqs) == len(set(seqs)), f"{href}: identical content appended twice"
    # every change the device made is in the log: each light's seq runs without a gap
    for href in final:
        seqs = per_href[href]
        assert seqs == list(range(seqs[0], final[href]["seq"] + 1)), f"{href}: gap in {seqs}"
    assert sum(final[h]["seq"] for h in final) >= 30
    kinds = [e.kind for e in await stack.events(d.device_id)]
    assert kinds[0] == "device-registered"
    assert "device-online" in kinds and kinds[-1] == "device-offline"


async def test_disconnected_device_is_marked_offline(stack: Stack) -> None:
    async with stack.running_projector():
        d = stack.device(resources=1, ping_interval=None)
        await d.start()
        await _synced(stack, d)
        await d.stop(sign_out=False)  # just drops the connection
        twin = await stack.wait_twin(d.device_id, lambda t: not t.online, WAIT)
        assert twin.sync_state == "out_of_sync" or not twin.online

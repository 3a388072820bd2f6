"""Shared-attribute updates to simple devices over UDP against a real log (issue 10 item 3):
the device observes ``/api/v1/{token}/attributes``; the registration is answered with the
current shared attributes (desired state on ``/shared/<key>``), and each later change comes as
ThingsBoard's attribute update, ``{"key": value}`` for keys set and ``{"deleted": [keys]}`` for
keys cleared. aiocoap's client and libcoap's coap-client as the devices."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiocoap
import pytest
from aiocoap.numbers.codes import Code
from aiocoap.numbers.contentformat import ContentFormat

from proto import binding
from proto import events as ev
from proto.events import SHARED_PREFIX

from .simple_peers import coap_client
from .test_simple_rpc import Observer, _true
from .test_simple_udp import DEADLINE, Stack, client, stack, until

__all__ = ["client", "stack"]  # the fixtures

pytestmark = pytest.mark.servers


class Shared:
    """Desired state on a device's ``/shared/<key>``, written as the command API does."""

    def __init__(self, stack: Stack, device: str) -> None:
        self.stack, self.device = stack, device
        self.versions: dict[str, int] = {}

    async def set(self, key: str, value: Any) -> None:
        version = self.versions[key] = self.versions.get(key, 0) + 1
        await self._append(ev.DesiredSet(href=SHARED_PREFIX + key, content=value, version=version))

    async def clear(self, key: str) -> None:
        version = self.versions[key] = self.versions.get(key, 0) + 1
        await self._append(ev.DesiredCleared(href=SHARED_PREFIX + key, version=version))

    async def _append(self, data: ev.DesiredSet | ev.DesiredCleared) -> None:
        e = ev.Event(
            owner=self.stack.owner, device_id=self.device, data=data, source="/twinhub/twin/api"
        )
        await self.stack.admin.append([binding.to_nats(e)])


def _json(msg: aiocoap.Message | None) -> Any:
    assert msg is not None
    assert msg.code == Code.CONTENT and msg.opt.content_format == ContentFormat.JSON, msg
    return json.loads(msg.payload)


async def _quiet(observer: Observer, seconds: float) -> None:
    """No notification comes within ``seconds``."""
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(observer.notifications.get(), seconds)


async def test_the_registration_carries_the_shared_attributes_then_each_change_comes(
    stack: Stack, client: aiocoap.Context
) -> None:
    token, device = await stack.issue()
    shared = Shared(stack, device)
    await shared.set("target", 25)
    await shared.set("schedule", {"on": "07:00"})
    async with Observer(client, stack.url(token, "attributes")) as obs:
        assert obs.first is not None and obs.first.opt.observe is not None  # observed
        assert _json(obs.first) == {"target": 25, "schedule": {"on": "07:00"}}
        await shared.set("mode", "eco")
        assert await obs.next() == {"mode": "eco"}
        await shared.clear("target")
        assert await obs.next() == {"deleted": ["target"]}
        await shared.set("target", 21.5)
        assert await obs.next() == {"target": 21.5}
        await shared.set("target", 21.5)  # a new version, the same value: nothing to tell
        await shared.set("mode", True)
        assert await obs.next() == {"mode": True}
    (online,) = await stack.events(device, "device-online")
    assert online.data.protocol == "coap+udp"  # type: ignore[union-attr]


async def test_shared_keys_narrow_the_observation(stack: Stack, client: aiocoap.Context) -> None:
    token, device = await stack.issue()
    shared = Shared(stack, device)
    await shared.set("a", 1)
    await shared.set("b", 2)
    async with Observer(client, stack.url(token, "attributes", "sharedKeys=b,c")) as obs:
        assert _json(obs.first) == {"b": 2}
        await shared.set("a", 10)
        await _quiet(obs, 1.0)
        await shared.set("c", "x")
        assert await obs.next() == {"c": "x"}
        await shared.clear("a")
        await shared.clear("b")
        assert await obs.next() == {"deleted": ["b"]}


async def test_a_change_while_nobody_observes_is_in_the_next_registration(
    stack: Stack, client: aiocoap.Context
) -> None:
    token, device = await stack.issue()
    shared = Shared(stack, device)
    async with Observer(client, stack.url(token, "attributes")) as obs:
        assert _json(obs.first) == {}
        await shared.set("fw", "1.1")
        assert await obs.next() == {"fw": "1.1"}
    await shared.set("fw", "1.2")
    async with Observer(client, stack.url(token, "attributes")) as again:
        assert _json(again.first) == {"fw": "1.2"}


async def test_a_bad_token_cannot_observe_attributes(stack: Stack, client: aiocoap.Context) -> None:
    token, _ = await stack.issue(state="revoked")
    msg = aiocoap.Message(code=Code.GET, uri=stack.url(token, "attributes"), observe=0)
    got = await asyncio.wait_for(client.request(msg).response, DEADLINE)
    assert got.code == Code.UNAUTHORIZED and got.payload == b"" and got.opt.observe is None


async def test_coap_client_observes_shared_attributes(stack: Stack) -> None:
    """``coap-client -m get -s N coap://HOST/api/v1/TOKEN/attributes`` (ThingsBoard's docs)
    prints the current shared attributes, then the update set while it observes."""
    token, device = await stack.issue()
    shared = Shared(stack, device)
    await shared.set("target", 25)
    observer = asyncio.create_task(
        coap_client("-m", "get", "-s", "4", stack.url(token, "attributes"), timeout=8)
    )
    await until(
        lambda: _true(stack.server.observing_attributes(stack.owner, device) == 1), "observing"
    )
    await shared.set("target", 30)
    observed = await observer
    bodies = [
        json.loads(line.split(" :: ", 1)[1].strip("'"))
        for line in observed.stdout.splitlines()
        if " c:2.05 " in line and " :: " in line
    ]
    assert bodies[:2] == [{"target": 25}, {"target": 30}], observed.stdout + observed.stderr
    await until(
        lambda: _true(stack.server.observing_attributes(stack.owner, device) == 0), "its end"
    )

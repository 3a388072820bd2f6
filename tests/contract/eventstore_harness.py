"""What the event-store contract tests need besides the store: unique subjects, messages, polling.

Every test gets its own stream *and* its own subject root (``ct<hex>.ev``): JetStream refuses two
streams whose subjects overlap, and other suites on the same server may hold a stream on
``twinhub.ev.>``. The subjects keep twinhub's six-token shape
``<root>.<owner>.<device>.<kind>.<resource>``.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from eventstore.layout import StreamLayout
from eventstore.ports import EventStore
from proto.message import NatsMessage, StoredMessage

_ids = itertools.count(1)


def unique_layout(**kwargs: Any) -> tuple[StreamLayout, str]:
    hexid = uuid.uuid4().hex[:12]
    root = f"ct{hexid}.ev"
    return StreamLayout(name=f"CT_{hexid}", subjects=(f"{root}.>",), **kwargs), root


@dataclass
class Harness:
    backend: str
    store: EventStore
    layout: StreamLayout
    root: str
    wire_messages: Callable[[], int] | None = None  # messages received by the client so far
    _tag: str = field(default_factory=lambda: uuid.uuid4().hex[:8])

    @property
    def everything(self) -> str:
        return f"{self.root}.>"

    def subject(
        self, device: str, resource: str = "r1", kind: str = "resource-changed", owner: str = "o1"
    ) -> str:
        return f"{self.root}.{owner}.{device}.{kind}.{resource}"

    def device_scope(self, device: str) -> str:
        return f"{self.root}.*.{device}.>"

    def msg(
        self,
        device: str,
        resource: str = "r1",
        *,
        kind: str = "resource-changed",
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
        msg_id: str | None = None,
    ) -> NatsMessage:
        n = next(_ids)
        return NatsMessage(
            subject=self.subject(device, resource, kind),
            msg_id=msg_id or f"{self._tag}-{n}",
            data=data if data is not None else f"event {n}".encode(),
            headers=headers if headers is not None else {"ce-type": kind, "ce-id": str(n)},
        )

    async def read_all(
        self, filter_subject: str | None = None, *, after: int = 0, limit: int | None = None
    ) -> list[StoredMessage]:
        return await collect(
            self.store.read(filter_subject or self.everything, after=after, limit=limit)
        )


async def collect(it: AsyncIterator[StoredMessage]) -> list[StoredMessage]:
    return [m async for m in it]


def ids(stored: Sequence[StoredMessage]) -> list[str]:
    return [s.message.msg_id for s in stored]


async def eventually(
    check: Callable[[], Awaitable[bool]], *, within: float = 10.0, what: str = "condition"
) -> None:
    """Poll ``check`` until it is true; fail after ``within`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not await check():
        if loop.time() > deadline:
            raise AssertionError(f"{what} not reached within {within}s")
        await asyncio.sleep(0.02)

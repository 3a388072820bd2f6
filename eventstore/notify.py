"""The wake-up half every :class:`eventstore.ports.Notifier` adapter shares."""

from __future__ import annotations

import asyncio


class WakeUp:
    """An event set by the adapter when something matching arrives; ``wait`` consumes it."""

    def __init__(self) -> None:
        self.event = asyncio.Event()

    async def wait(self, timeout: float) -> bool:  # noqa: ASYNC109
        try:
            await asyncio.wait_for(self.event.wait(), timeout)
        except TimeoutError:
            return False
        self.event.clear()
        return True

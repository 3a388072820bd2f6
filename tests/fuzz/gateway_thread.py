"""A full gateway (in-memory event log) on its own event loop in a thread, so that synchronous
hypothesis / replay tests can drive it example by example over real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Coroutine, Iterator
from concurrent.futures import Future
from typing import Any, TypeVar

from ..integration.gateway.gateway_stack import Stack, running_gateway  # noqa: TID252

T = TypeVar("T")


class ErrorLog(logging.Handler):
    """Error records of any thread (an error logged by the gateway is a crash caught late)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def messages(self) -> list[str]:
        return [f"{r.name}: {r.getMessage()}" for r in self.records]


class GatewayThread:
    def __init__(self, stack: Stack, loop: asyncio.AbstractEventLoop) -> None:
        self.stack = stack
        self.loop = loop

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


@contextlib.contextmanager
def gateway_thread(**config: Any) -> Iterator[tuple[GatewayThread, ErrorLog]]:
    errors = ErrorLog()
    root = logging.getLogger()
    root.addHandler(errors)
    started: Future[GatewayThread] = Future()
    stop: list[asyncio.Event] = []

    async def main() -> None:
        stop.append(asyncio.Event())
        async with running_gateway(**config) as stack:
            started.set_result(GatewayThread(stack, asyncio.get_running_loop()))
            await stop[0].wait()

    def target() -> None:
        try:
            asyncio.run(main())
        except BaseException as e:
            if not started.done():
                started.set_exception(e)
            raise

    thread = threading.Thread(target=target, name="fuzzed-gateway", daemon=True)
    thread.start()
    try:
        gw = started.result(30)
        yield gw, errors
        gw.loop.call_soon_threadsafe(stop[0].set)
        thread.join(30)
        assert not thread.is_alive(), "the gateway did not stop"
    finally:
        root.removeHandler(errors)

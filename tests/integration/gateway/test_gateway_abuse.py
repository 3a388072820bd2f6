"""A hostile barrage against the full gateway (in-memory event log), then a well-behaved device.

Malformed frames, oversized messages, junk, silent connections, requests before sign-in and a
request flood, all at once. Afterwards the gateway is back to its baseline -- sessions,
connections, unauthenticated count, tasks, and traced memory -- and a simulated device signs
up, signs in, publishes and goes online as usual. Nothing on the way is logged as an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import random
import tracemalloc
from collections.abc import Iterator

import cbor2

from .coap_peers import ABORT, POST, RawPeer, request
from .gateway_stack import DEADLINE, Stack, running_gateway
from .test_coap_hostile import MALFORMED

UNAUTHORIZED, BAD_REQUEST, TOO_MANY_REQUESTS, SERVICE_UNAVAILABLE = 129, 128, 157, 163


async def _malformed(stack: Stack, data: bytes) -> None:
    peer = await RawPeer.connect(stack.tcp)
    peer.writer.write(data)
    frames = await peer.expect_eof()
    assert frames[-1].code == ABORT


async def _oversized(stack: Stack) -> None:
    peer = await RawPeer.connect(stack.tcp)
    peer.writer.write(bytes([0xF0, 0x3F, 0xFF, 0x00, 0x00, POST]))  # ~1 GiB announced
    with contextlib.suppress(ConnectionError):
        for _ in range(16):
            peer.writer.write(bytes(64 * 1024))
            await peer.writer.drain()
    frames = await peer.expect_eof()
    assert frames[-1].payload.startswith(b"message too large")


async def _garbage(stack: Stack, data: bytes) -> None:
    peer = await RawPeer.connect(stack.tcp)
    peer.writer.write(data)
    with contextlib.suppress(ConnectionError):
        await peer.writer.drain()
    peer.writer.transport.abort()  # and go: half of them the gateway has not even read


async def _silent(stack: Stack) -> None:
    peer = await RawPeer.connect(stack.tcp)
    frames = await peer.expect_eof()  # the opening timeout
    assert frames[-1].payload.startswith(b"opening timeout")


async def _before_sign_in(stack: Stack) -> None:
    peer = await RawPeer.connect(stack.tcp)
    peer.send(request(POST, "/oic/rd", peer.token(), payload=cbor2.dumps({"links": []})))
    frames = await peer.expect_eof()
    assert UNAUTHORIZED in [f.code for f in frames]


async def _flood(stack: Stack) -> None:
    peer = await RawPeer.connect(stack.tcp)
    tokens = [peer.token() for _ in range(150)]
    peer.send(*(request(POST, "/oic/sec/account", t, payload=b"\xff\x00") for t in tokens))
    codes = []
    while len(codes) < len(tokens):
        frame = await peer.recv()
        if frame.token in tokens:
            codes.append(frame.code)
    # the burst passes the rate limit (some then meet the concurrency limit: 5.03), the rest 4.29
    assert set(codes) <= {BAD_REQUEST, SERVICE_UNAVAILABLE, TOO_MANY_REQUESTS}
    assert BAD_REQUEST in codes
    assert len(codes) - codes.count(TOO_MANY_REQUESTS) >= 100
    await peer.close()


class _Errors(logging.Handler):
    """Keeps error records only (pytest's own capture would keep every record: memory)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def errors_only() -> Iterator[list[logging.LogRecord]]:
    handler = _Errors()
    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers = [handler]
    try:
        yield handler.records
    finally:
        root.handlers = saved


async def barrage(stack: Stack, rng: random.Random) -> None:
    attacks = [
        *(_malformed(stack, d) for d, _ in MALFORMED.values() for _ in range(4)),
        *(_oversized(stack) for _ in range(8)),
        *(_garbage(stack, rng.randbytes(rng.randrange(1, 4000))) for _ in range(40)),
        *(_silent(stack) for _ in range(20)),
        *(_before_sign_in(stack) for _ in range(20)),
        _flood(stack),
    ]
    async with asyncio.timeout(3 * DEADLINE):
        await asyncio.gather(*attacks)


def traced() -> tracemalloc.Snapshot:
    gc.collect()
    return tracemalloc.take_snapshot().filter_traces(
        [tracemalloc.Filter(False, tracemalloc.__file__)]
    )


async def test_after_a_hostile_barrage_the_gateway_is_back_to_baseline_and_serves() -> None:
    """Two rounds: the first one takes the gateway's tables to their high-water marks (dicts do
    not shrink), the second one must not add to the first: a leak grows with every round."""
    rng = random.Random(8323)
    async with running_gateway(opening_timeout=0.5) as stack:
        baseline = stack.counts()
        await stack.well_behaved_device_works()
        await stack.settle(baseline, 3 * DEADLINE)
        with errors_only() as errors:
            tracemalloc.start(8)
            try:
                await barrage(stack, rng)
                await stack.settle(baseline, 3 * DEADLINE)
                first = traced()
                await barrage(stack, rng)
                await stack.settle(baseline, 3 * DEADLINE)
                second = traced()
            finally:
                tracemalloc.stop()
        assert not errors, [r.getMessage() for r in errors]
        diff = second.compare_to(first, "traceback")
        growth = sum(d.size_diff for d in diff)
        top = "\n".join(f"{d}\n  " + "\n  ".join(d.traceback.format()) for d in diff[:3])
        assert growth < 256 * 1024, f"grew by {growth} bytes in the second round:\n{top}"

        await stack.well_behaved_device_works()
        await stack.settle(baseline, 3 * DEADLINE)

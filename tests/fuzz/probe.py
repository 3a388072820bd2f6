"""Send hostile bytes to the gateway over a fresh connection and see what comes back."""

from __future__ import annotations

import asyncio
import contextlib

from gateway.adapters.coap_frames import Deframer, FrameError

from ..integration.gateway.coap_peers import PING, PONG, Frame, RawPeer  # noqa: TID252
from ..integration.gateway.gateway_stack import Stack, sign_in  # noqa: TID252

PROBE = b"\xfe\xed"  # the token of our closing Ping


async def probe(stack: Stack, data: bytes, *, signed_in: bool = False) -> list[Frame]:
    """Connect (and sign in), write ``data`` and a Ping; return the frames received until its
    Pong or the end of the connection.

    When ``data`` ends inside a message, the Ping only adds to that message: then we close
    after writing (the gateway waits for the rest of a message as long as its timeouts allow).
    """
    ping = Frame(PING, PROBE).encode()
    _, error, incomplete = deframe_all(data + ping, stack.gateway.config.max_message_size)
    peer = await RawPeer.connect(stack.tcp)
    try:
        if signed_in:
            await sign_in(stack, peer)
        peer.writer.write(data + ping)
        if incomplete and error is None:
            await peer.writer.drain()
            return []
        frames: list[Frame] = []
        with contextlib.suppress(EOFError, ConnectionError):
            async with asyncio.timeout(5):
                while True:
                    frame = await peer.recv()
                    frames.append(frame)
                    if frame.code == PONG and frame.token == PROBE:
                        break
        return frames
    finally:
        peer.writer.transport.abort()


def check_answers(frames: list[Frame]) -> None:
    """What the gateway sends: responses (2.xx-5.xx), requests of its own (0.01-0.04: the
    session syncing a signed-in device) or signalling (7.01-7.05)."""
    for frame in frames:
        code_class = frame.code >> 5
        assert code_class in (2, 3, 4, 5, 7) or 1 <= frame.code <= 4, frame
        if code_class == 7:
            assert 0xE1 <= frame.code <= 0xE5, frame


def deframe_all(data: bytes, limit: int) -> tuple[int, str | None, bool]:
    """How many frames ``data`` holds, the format error that ends it (if any) and whether it
    ends inside a message -- nothing else may come out of the deframer."""
    deframer = Deframer(limit)
    deframer.feed(data)
    count = 0
    try:
        while deframer.next() is not None:
            count += 1
    except FrameError as e:
        return count, str(e), False
    return count, None, deframer.buffered > 0

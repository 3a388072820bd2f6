"""Send hostile bytes to the gateway over a fresh connection and see what comes back."""

from __future__ import annotations

import asyncio
import contextlib

from gateway.adapters.coap_frames import Deframer, FrameError, encode_frame
from gateway.adapters.coap_frames import Frame as CoreFrame

from ..integration.gateway.coap_peers import PING, PONG, Frame, RawPeer  # noqa: TID252
from ..integration.gateway.gateway_stack import Stack, sign_in  # noqa: TID252

PROBE = b"\xfe\xed"  # the token of our closing Ping


async def probe(stack: Stack, data: bytes, *, signed_in: bool = False) -> list[Frame]:
    """Connect (and sign in), write ``data`` and a Ping; return the frames received until its
    Pong or the end of the connection.

    A Ping after ``data`` may end up inside its last message (as its payload, or as the rest of
    an incomplete one): more Pings go out until one stands on its own. When ``data`` still ends
    inside a message we close after writing (the gateway waits for the rest of a message as long
    as its timeouts allow); after a format error we read until the gateway closes.
    """
    ping = encode_frame(CoreFrame(PING, PROBE))
    limit = stack.gateway.config.max_message_size
    for _ in range(3):
        data += ping
        frames, error, incomplete = deframe(data, limit)
        if error is not None or incomplete or frames[-1] == CoreFrame(PING, PROBE):
            break
    peer = await RawPeer.connect(stack.tcp)
    try:
        if signed_in:
            await sign_in(stack, peer)
        peer.writer.write(data)
        if incomplete and error is None:
            await peer.writer.drain()
            return []
        got: list[Frame] = []
        with contextlib.suppress(EOFError, ConnectionError):
            async with asyncio.timeout(5):
                while True:
                    frame = await peer.recv()
                    got.append(frame)
                    if frame.code == PONG and frame.token == PROBE:
                        break
        return got
    finally:
        peer.writer.transport.abort()


def deframe(data: bytes, limit: int) -> tuple[list[CoreFrame], str | None, bool]:
    """The frames of ``data``, the format error that ends it (if any) and whether it ends
    inside a message -- nothing else may come out of the deframer."""
    deframer = Deframer(limit)
    deframer.feed(data)
    frames: list[CoreFrame] = []
    try:
        while (frame := deframer.next()) is not None:
            frames.append(frame)
    except FrameError as e:
        return frames, str(e), False
    return frames, None, deframer.buffered > 0


def check_answers(frames: list[Frame]) -> None:
    """What the gateway sends: responses (2.xx-5.xx), requests of its own (0.01-0.04: the
    session syncing a signed-in device) or signalling (7.01-7.05)."""
    for frame in frames:
        code_class = frame.code >> 5
        assert code_class in (2, 3, 4, 5, 7) or 1 <= frame.code <= 4, frame
        if code_class == 7:
            assert 0xE1 <= frame.code <= 0xE5, frame

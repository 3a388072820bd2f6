"""libFuzzer (atheris) harness over the RFC 8323 framing and the adapter's message glue.

By hand, from the repository root (new inputs go to the first directory; crashes to
``crash-*`` files, which belong in ``tests/fuzz/corpus/`` once fixed)::

    mkdir -p /tmp/frames && .venv/bin/python tests/fuzz/atheris_frames.py /tmp/frames \\
        tests/fuzz/corpus -max_total_time=600

The first input byte picks the chunk size the stream is fed in. For every input: the deframer
gives frames or one :class:`FrameError` (nothing else, and the same whatever the chunking), a
frame re-encodes to itself, the request option rules hold, and a frame becomes a
:class:`CoapRequest` / :class:`CoapResponse` (:mod:`gateway.wire.messages`, with the options the
connection hands over: a request's usable ones) without raising, and a response's Block2 is
judged (W19) without raising.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

with atheris.instrument_imports(include=["gateway.adapters.coap_frames", "gateway.wire"]):
    from gateway.adapters import coap_frames as frames
    from gateway.wire import messages

LIMIT = 4096


def _frames(data: bytes, step: int) -> tuple[list[frames.Frame], str | None]:
    deframer = frames.Deframer(LIMIT)
    out: list[frames.Frame] = []
    for i in range(0, len(data), step):
        deframer.feed(data[i : i + step])
        while True:
            try:
                frame = deframer.next()
            except frames.FrameError as e:
                return out, str(e)
            if frame is None:
                break
            out.append(frame)
        if deframer.buffered > LIMIT + 6:
            raise AssertionError(f"buffered {deframer.buffered} bytes")
    return out, None


def test_one_input(data: bytes) -> None:
    if not data:
        return
    step, stream = data[0] % 16 + 1, data[1:]
    got = _frames(stream, step)
    if got != _frames(stream, len(stream) or 1):
        raise AssertionError("chunking changed the result")
    for frame in got[0]:
        if frames.parse_frame(frames.encode_frame(frame)) != frame:
            raise AssertionError(f"round trip changed {frame}")
        if 1 <= frame.code < 32:
            if frames.request_option_problem(frame.options) is None:
                usable = frames.usable_request_options(frame.options)
                messages.request_value(frames.Frame(frame.code, frame.token, usable, frame.payload))
        elif 64 <= frame.code < 192:
            messages.response_value(frame)
            messages.block_wise_problem(frame)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()

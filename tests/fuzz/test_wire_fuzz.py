"""Hypothesis over ``CoapTcpConnection.receive_data``: random bytes and mangled conversations, fed
in random chunks, never raise and fail only through the connection's own failure event (see
:mod:`.wire_check`). Also replays ``tests/fuzz/corpus/``. ``TWINHUB_FUZZ_EXAMPLES=100000``
explores further by hand."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.adapters.coap_frames import Frame, encode_frame

from .wire_check import check

EXAMPLES = int(os.environ.get("TWINHUB_FUZZ_EXAMPLES", "0"))
CORPUS = sorted((Path(__file__).parent / "corpus").iterdir())

frames = st.builds(
    Frame,
    code=st.one_of(
        st.sampled_from([0, 1, 2, 69, 132, 225, 226, 227, 228, 229]), st.integers(0, 255)
    ),
    token=st.one_of(st.sampled_from([b"\x01", b"\x02", b"\x03"]), st.binary(max_size=8)),
    options=st.lists(
        st.tuples(st.sampled_from([2, 4, 6, 9, 11, 12, 15, 35, 2053]), st.binary(max_size=6)),
        max_size=4,
    ).map(lambda o: tuple(sorted(o, key=lambda x: x[0]))),
    payload=st.binary(max_size=50),
)


@st.composite
def conversations(draw: st.DrawFn) -> bytes:
    data = bytearray(b"".join(encode_frame(f) for f in draw(st.lists(frames, max_size=8))))
    for _ in range(draw(st.integers(0, 3))):
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        mangle = draw(st.sampled_from(["flip", "cut", "repeat", "insert"]))
        if mangle == "flip":
            data[at] ^= draw(st.integers(1, 255))
        elif mangle == "cut":
            del data[at:]
        elif mangle == "repeat":
            data += data[at:]
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=4))
    return bytes(data)


@settings(max_examples=EXAMPLES or 400, deadline=None, derandomize=not EXAMPLES)
@given(st.one_of(conversations(), st.binary(max_size=300)), st.integers(1, 40))
def test_receive_data_fails_only_through_its_own_event(stream: bytes, step: int) -> None:
    check(stream, step)


@pytest.mark.parametrize("path", CORPUS, ids=[p.name for p in CORPUS])
def test_the_corpus_through_the_connection(path: Path) -> None:
    data = path.read_bytes()
    for step in (1, 7, len(data) or 1):
        check(data, step)

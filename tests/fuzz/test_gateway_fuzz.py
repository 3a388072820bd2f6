"""Hypothesis through the real transport into a real gateway (in-memory event log), bounded.

Requests are built from OCF paths, options and CBOR / JSON bodies of the wrong shapes, then
sometimes mangled (bytes flipped, cut, duplicated); half of the examples first sign in, so the
session's signed-in paths are reached too. After each example the gateway answers a Ping on the
fuzzed connection (or has aborted it), logs no error, and at the end serves a well-behaved
device and is back to its baseline. ``TWINHUB_FUZZ_EXAMPLES=5000`` explores further by hand.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.adapters.coap_frames import Frame, encode_frame

from .gateway_thread import ErrorLog, GatewayThread, gateway_thread
from .probe import check_answers, probe

PATHS = ["/oic/sec/account", "/oic/sec/session", "/oic/sec/tokenrefresh", "/oic/rd", "/oic/res"]
KEYS = ["di", "accesstoken", "refreshtoken", "uid", "login", "authprovider", "links", "ttl", "href"]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True),
    st.text(max_size=40),
    st.binary(max_size=40),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=8)), inner, max_size=5),
    ),
    max_leaves=12,
)


def _json(value: object) -> bytes:
    try:
        return json.dumps(value, default=repr).encode()
    except (ValueError, TypeError):
        return b"{"


payloads = st.one_of(
    st.binary(max_size=200),
    values.map(cbor2.dumps),
    values.map(_json),
    st.fixed_dictionaries({}, optional={k: values for k in KEYS}).map(cbor2.dumps),
)
options = st.lists(
    st.one_of(
        st.tuples(st.just(12), st.sampled_from([b"\x27\x10", b"\x32", b"\x3c", b"", b"\xff\xff"])),
        st.tuples(st.just(15), st.text(max_size=30).map(str.encode)),
        st.tuples(st.integers(0, 3000), st.binary(max_size=12)),
    ),
    max_size=4,
)


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    path = draw(st.one_of(st.sampled_from(PATHS), st.text(max_size=20).map(lambda t: "/" + t)))
    segments = [(11, p.encode()) for p in path.strip("/").split("/") if p]
    frame = Frame(
        code=draw(st.one_of(st.sampled_from([1, 2, 3, 4]), st.integers(0, 255))),
        token=draw(st.binary(max_size=8)),
        options=tuple(segments + draw(options)),
        payload=draw(payloads),
    )
    data = bytearray(encode_frame(frame))
    for _ in range(draw(st.integers(0, 3))):
        mangle = draw(st.sampled_from(["flip", "cut", "repeat"]))
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        if mangle == "flip":
            data[at] ^= draw(st.integers(1, 255))
        elif mangle == "cut":
            del data[at:]
        else:
            data += data[at:]
    return bytes(data)


@pytest.fixture(scope="module")
def fuzzed() -> Iterator[tuple[GatewayThread, ErrorLog]]:
    with gateway_thread() as (gw, errors):
        baseline = gw.run(_baseline(gw))
        yield gw, errors
        assert not errors.messages()
        gw.run(gw.stack.well_behaved_device_works())
        gw.run(gw.stack.settle(baseline))


async def _baseline(gw: GatewayThread) -> dict[str, int]:
    return gw.stack.counts()


EXAMPLES = int(os.environ.get("TWINHUB_FUZZ_EXAMPLES", "0"))
"""Set to explore by hand (random seeds); CI runs 60 derandomized examples, about a second."""


@settings(
    max_examples=EXAMPLES or 60,
    deadline=None,
    derandomize=not EXAMPLES,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.lists(requests(), min_size=1, max_size=4).map(b"".join), signed_in=st.booleans())
def test_random_requests_through_the_real_gateway(
    fuzzed: tuple[GatewayThread, ErrorLog], data: bytes, signed_in: bool
) -> None:
    gw, errors = fuzzed
    frames = gw.run(probe(gw.stack, data, signed_in=signed_in))
    check_answers(frames)
    assert not errors.messages()

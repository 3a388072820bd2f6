"""Replays ``tests/fuzz/corpus/``: every input that once broke something (and the hand-made
seeds of ``make_corpus.py``), through the pure deframer and through the real gateway, signed in
and not. A new crashing input goes into the folder as a file and is replayed from then on."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .gateway_thread import ErrorLog, GatewayThread, gateway_thread
from .probe import check_answers, deframe, probe

CORPUS = sorted((Path(__file__).parent / "corpus").iterdir())


@pytest.fixture(scope="module")
def fuzzed() -> Iterator[tuple[GatewayThread, ErrorLog]]:
    with gateway_thread() as (gw, errors):
        yield gw, errors


def test_the_corpus_is_there() -> None:
    assert len(CORPUS) >= 10


@pytest.mark.parametrize("path", CORPUS, ids=[p.name for p in CORPUS])
def test_replay(path: Path, fuzzed: tuple[GatewayThread, ErrorLog]) -> None:
    data = path.read_bytes()
    deframe(data, 64 * 1024)  # FrameError or frames, nothing else
    gw, errors = fuzzed
    for signed_in in (False, True):
        check_answers(gw.run(probe(gw.stack, data, signed_in=signed_in)))
    assert not errors.messages()

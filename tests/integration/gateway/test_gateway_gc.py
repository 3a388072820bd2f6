"""The gateway's GC policy: the young generation's threshold while it runs, restored after."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from gateway.service import young_gc_threshold

from .gateway_stack import running_gateway


@pytest.fixture
def thresholds() -> Iterator[tuple[int, int, int]]:
    before = gc.get_threshold()
    gc.set_threshold(700, 10, 10)
    yield gc.get_threshold()
    gc.set_threshold(*before)


def test_young_threshold_is_set_and_restored(thresholds: tuple[int, int, int]) -> None:
    with young_gc_threshold(12_345):
        assert gc.get_threshold() == (12_345, 10, 10)
    assert gc.get_threshold() == thresholds


def test_thresholds_changed_meanwhile_are_left_alone(thresholds: tuple[int, int, int]) -> None:
    with young_gc_threshold(12_345):
        gc.set_threshold(5_000, 7, 7)
    assert gc.get_threshold() == (5_000, 7, 7)


def test_a_threshold_below_one_is_refused(thresholds: tuple[int, int, int]) -> None:
    with pytest.raises(ValueError, match="GC threshold"), young_gc_threshold(0):
        pass
    assert gc.get_threshold() == thresholds


async def test_the_gateway_runs_with_its_threshold(thresholds: tuple[int, int, int]) -> None:
    async with running_gateway(gc_young_threshold=20_000):
        assert gc.get_threshold() == (20_000, 10, 10)
    assert gc.get_threshold() == thresholds


async def test_none_leaves_the_interpreter_alone(thresholds: tuple[int, int, int]) -> None:
    async with running_gateway(gc_young_threshold=None):
        assert gc.get_threshold() == thresholds

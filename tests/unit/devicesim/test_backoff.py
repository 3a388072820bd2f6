from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from devicesim.backoff import BackoffPolicy, backoff_delay
from devicesim.errors import SimConfigError


def test_grows_exponentially_then_caps() -> None:
    p = BackoffPolicy(initial=0.5, maximum=4.0, multiplier=2.0, jitter=0.0)
    assert [backoff_delay(p, n, 0.0) for n in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


def test_jitter_shortens_by_at_most_its_fraction() -> None:
    p = BackoffPolicy(initial=1.0, maximum=10.0, jitter=0.5)
    assert backoff_delay(p, 1, 0.0) == 1.0
    assert backoff_delay(p, 1, 0.999999) == pytest.approx(0.5, abs=1e-5)


@given(
    attempt=st.integers(min_value=1, max_value=10_000),
    rand=st.floats(min_value=0.0, max_value=1.0, exclude_max=True),
    jitter=st.floats(min_value=0.0, max_value=1.0),
)
def test_delay_stays_within_bounds(attempt: int, rand: float, jitter: float) -> None:
    p = BackoffPolicy(initial=0.1, maximum=30.0, multiplier=2.0, jitter=jitter)
    d = backoff_delay(p, attempt, rand)
    base = min(30.0, 0.1 * 2.0 ** min(attempt - 1, 64))
    assert base * (1 - jitter) - 1e-9 <= d <= base + 1e-9


@pytest.mark.parametrize(
    "kwargs",
    [{"initial": 0}, {"initial": 2, "maximum": 1}, {"multiplier": 0.5}, {"jitter": 1.5}],
)
def test_rejects_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(SimConfigError):
        BackoffPolicy(**kwargs)


def test_attempt_counts_from_one() -> None:
    with pytest.raises(ValueError, match="from 1"):
        backoff_delay(BackoffPolicy(), 0, 0.5)

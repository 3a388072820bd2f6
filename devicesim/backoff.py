"""Reconnect back-off: exponential growth with a cap and random jitter (pure)."""

from __future__ import annotations

from dataclasses import dataclass

from devicesim.errors import SimConfigError


@dataclass(frozen=True, slots=True)
class BackoffPolicy:
    """``initial * multiplier**(attempt-1)`` capped at ``maximum``; ``jitter`` (0..1) is the
    fraction of that delay that is randomised, so a fleet that lost its gateway at once does not
    come back at once."""

    initial: float = 0.5
    maximum: float = 30.0
    multiplier: float = 2.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if self.initial <= 0 or self.maximum < self.initial:
            raise SimConfigError("back-off needs 0 < initial <= maximum")
        if self.multiplier < 1:
            raise SimConfigError("back-off multiplier must be >= 1")
        if not 0 <= self.jitter <= 1:
            raise SimConfigError("back-off jitter must be within [0, 1]")


def backoff_delay(policy: BackoffPolicy, attempt: int, rand: float) -> float:
    """Delay before reconnect ``attempt`` (1 = first retry); ``rand`` is uniform in [0, 1).

    The result lies in ``[base * (1 - jitter), base]`` where ``base`` is the capped exponential.
    """
    if attempt < 1:
        raise ValueError("attempt counts from 1")
    # Cap the exponent first: multiplier**attempt overflows a float long before attempts run out.
    base = policy.initial
    for _ in range(attempt - 1):
        base *= policy.multiplier
        if base >= policy.maximum:
            base = policy.maximum
            break
    return base * (1.0 - policy.jitter * rand)

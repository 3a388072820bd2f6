"""Time for the simulator: an epoch-based nanosecond clock that never steps backwards."""

from __future__ import annotations

import time


class EpochClock:
    """Nanoseconds since the Unix epoch, advancing with the monotonic clock.

    The epoch offset is sampled once, so readings compare across processes on one host (a
    benchmark subtracts a device's ``ts`` from its own ``time.time_ns()``) but never jump when the
    wall clock is adjusted.
    """

    def __init__(self) -> None:
        self._offset = time.time_ns() - time.monotonic_ns()

    def now_ns(self) -> int:
        return time.monotonic_ns() + self._offset

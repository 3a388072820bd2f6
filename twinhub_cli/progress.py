"""Progress of a start that takes several steps (``twinhub up``): one line per step on stderr.

The line is written when the step begins and says what it starts or waits for, so that a step
that hangs or fails is the last one shown, right above the failure's one line
(:mod:`twinhub_cli.exitcodes`). A whole line at a time, never a line rewritten in place: the
services' log lines go to the same stderr and would break a half-written one.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

__all__ = ["Progress"]


class Progress:
    """``prog: PART  what it does`` for each :meth:`step`, then ``prog: ready in N s``."""

    PART_WIDTH = 13

    def __init__(
        self,
        prog: str,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.prog = prog
        self._stream = stream
        self._clock = clock
        self._started = clock()
        self.steps = 0

    def _write(self, text: str) -> None:
        stream = self._stream or sys.stderr
        stream.write(f"{self.prog}: {text}\n")
        stream.flush()

    def step(self, part: str, doing: str) -> None:
        """Step ``part`` begins: it ``doing`` (a phrase, e.g. "starting nats-server on ...")."""
        self.steps += 1
        self._write(f"{part:<{self.PART_WIDTH}} {doing}")

    def done(self) -> float:
        """Every step is done: the line with the time they took (returned, in seconds)."""
        elapsed = self._clock() - self._started
        self._write(f"{'ready':<{self.PART_WIDTH}} in {elapsed:.1f} s")
        return elapsed

"""``twinhub up``'s progress lines (twinhub_cli.progress): one whole line per step, as it
begins, then the time the whole start took."""

from __future__ import annotations

import io

from twinhub_cli.progress import Progress


def test_one_line_per_step_then_ready() -> None:
    now = [100.0]
    out = io.StringIO()
    progress = Progress("twinhub up", out, clock=lambda: now[0])
    progress.step("NATS", "starting nats-server on port 4222, waiting for JetStream")
    assert out.getvalue() == (
        "twinhub up: NATS          starting nats-server on port 4222, waiting for JetStream\n"
    )
    progress.step("auth callout", "connecting to NATS")
    now[0] += 1.25
    assert progress.done() == 1.25
    assert out.getvalue().splitlines()[1:] == [
        "twinhub up: auth callout  connecting to NATS",
        "twinhub up: ready         in 1.2 s",
    ]
    assert progress.steps == 2

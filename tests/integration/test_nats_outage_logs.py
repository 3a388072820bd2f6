"""A NATS outage in the logs: one line per change of state, never a traceback (issue 11,
item 7).

The real server is stopped for long enough that every connection fails several reconnect
attempts (nats-py tries every 0.25 s), then started again. Each long-lived connection --
the event store's (gateway, twin, the CLI's admin path), the auth callout's and an
application's (``TwinhubClient``: the CLI's ``watch`` and ``cmd``) -- must log exactly: lost,
still unreachable, back. nats-py's default error callback logged every failed attempt with
its traceback.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable

import pytest

from eventstore.adapters.jetstream import JetStreamEventStore
from tests.conftest import Bus
from twinhub_cli.devservices import NatsServer
from twinhub_client import TwinhubClient

pytestmark = pytest.mark.servers

ATTEMPTS = 4  # failed reconnect attempts of every connection before the server comes back


def _lines(caplog: pytest.LogCaptureFixture, who: str, level: int) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= level and r.getMessage().startswith(f"{who}: ")
    ]


async def _until(check: Callable[[], bool], within: float, what: str) -> None:
    async with asyncio.timeout(within):
        while not check():
            await asyncio.sleep(0.05)
    assert check(), what


def _refusals(caplog: pytest.LogCaptureFixture) -> int:
    """Log records of failed connection attempts, at any level, traceback or not."""
    return sum(
        "Connect call failed" in r.getMessage() + repr(r.exc_info[1] if r.exc_info else "")
        for r in caplog.records
    )


def _is(line: str, *words: str) -> bool:
    return all(w in line for w in words)


async def test_an_outage_logs_lost_unreachable_back_once_per_connection(
    nats_server: NatsServer, bus: Bus, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    owner = "o" + uuid.uuid4().hex[:10]
    async with (
        JetStreamEventStore.from_url(bus.admin) as store,
        TwinhubClient(bus.url, bus.token(owner)),
    ):
        caplog.clear()
        await nats_server.stop()
        try:
            # Counted whatever logs them (nats-py's default callback did, with a traceback).
            await _until(
                lambda: _refusals(caplog) >= 3 * ATTEMPTS, 20, "reconnect attempts failing"
            )
        finally:
            await nats_server.start()

        def all_back() -> bool:
            return (
                all(
                    any(_is(m, "back after") for m in _lines(caplog, w, logging.INFO))
                    for w in ("eventstore", "callout")
                )
                and store.connection.is_connected
            )

        await _until(all_back, 30, "connections back")
        assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
        for w in ("eventstore", "callout"):
            lost, unreachable, back = _lines(caplog, w, logging.INFO)
            assert _is(lost, "connection to", "lost", "reconnecting"), lost
            assert _is(unreachable, "unreachable", "reconnecting until it answers"), unreachable
            assert _is(back, "back after", "failed attempts"), back
        # The application's connection may be refused once or twice more while the callout
        # is not back yet (what _AppConnection is for): each a change of state, each a line.
        await _until(
            lambda: any(_is(m, "back after") for m in _lines(caplog, "client", logging.INFO)),
            30,
            "client back",
        )
        client = _lines(caplog, "client", logging.INFO)
        assert _is(client[0], "lost") and _is(client[1], "unreachable"), client
        assert _is(client[-1], "back after"), client
        assert len(client) <= 3 + 2 * 3, client  # at most three refusals on its way back
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    assert "Traceback" not in caplog.text

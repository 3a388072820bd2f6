"""The client sends a command that got no answer again, unchanged (issue 11 item 4): same
correlation id (generated when the caller gives none), bounded attempts. Over a scripted NATS
connection; the real-server case is tests/e2e/test_command_idempotency.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

import msgspec
import nats.errors
import pytest
from nats.aio.client import Client as NatsClient

from proto import api
from twinhub_client import TwinhubClient
from twinhub_client.errors import ConflictError, ServiceUnavailableError

ACCEPTED = api.CommandAccepted(
    correlation_id="", device_id="d1", href="/light", position=7, expires_at="2026-01-01T00:01:00Z"
)


@dataclass
class Msg:
    data: bytes


@dataclass
class ScriptedNats:
    """Answers each request with the next of ``script``: an exception to raise, or a reply (its
    correlation id taken from the request)."""

    script: list[BaseException | api.Reply]
    sent: list[tuple[str, bytes, dict[str, str]]] = field(default_factory=list)

    async def request(
        self, subject: str, payload: bytes, timeout: float, headers: dict[str, str]
    ) -> Msg:
        self.sent.append((subject, payload, headers))
        step = self.script.pop(0)
        if isinstance(step, BaseException):
            raise step
        if step.ok:
            cid = msgspec.json.decode(payload)["correlation_id"]
            step = api.Reply(ok=True, result=msgspec.structs.replace(ACCEPTED, correlation_id=cid))
        return Msg(api.encode_reply(step))


def client(nc: ScriptedNats, **kw: Any) -> TwinhubClient:
    return TwinhubClient(cast(NatsClient, nc), "not-a-jwt", retry_delay=0, **kw)


OK = api.Reply(ok=True)


@pytest.mark.parametrize(
    "lost",
    [
        nats.errors.TimeoutError(),  # no answer in time: the reply was lost, or the twin died
        nats.errors.NoRespondersError(),  # no twin instance serving (restarting)
        api.Reply(ok=False, error=api.ApiError(code="unavailable", message="log down")),
    ],
)
async def test_a_command_without_an_answer_is_sent_again_unchanged(lost: Any) -> None:
    nc = ScriptedNats([lost, lost, OK])
    got = await client(nc).update("d1", "/light", {"value": True})
    assert len(nc.sent) == 3
    bodies = {body for _, body, _ in nc.sent}
    assert len(bodies) == 1, "the same request every time"
    cid = msgspec.json.decode(bodies.pop())["correlation_id"]
    assert cid and got.correlation_id == cid  # generated once, before the first attempt


async def test_attempts_are_bounded() -> None:
    nc = ScriptedNats([nats.errors.TimeoutError()] * 5)
    with pytest.raises(ServiceUnavailableError):
        await client(nc, retries=3).retrieve("d1", "/light", correlation_id="mine")
    assert len(nc.sent) == 4
    assert all(b'"correlation_id":"mine"' in body for _, body, _ in nc.sent)
    nc = ScriptedNats([nats.errors.TimeoutError()])
    with pytest.raises(ServiceUnavailableError):
        await client(nc, retries=0).retrieve("d1", "/light")
    assert len(nc.sent) == 1


async def test_a_conflict_is_not_retried() -> None:
    conflict = api.Reply(ok=False, error=api.ApiError(code="conflict", message="another"))
    nc = ScriptedNats([conflict, OK])
    with pytest.raises(ConflictError):
        await client(nc).update("d1", "/light", {"value": True}, correlation_id="x")
    assert len(nc.sent) == 1


def test_bad_retry_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="retries"):
        client(ScriptedNats([]), retries=-1)

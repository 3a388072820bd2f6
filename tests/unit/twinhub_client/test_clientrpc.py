"""The client's side of simple devices' client-side RPC: ``answer_rpc`` sends ``answer-rpc``
once (an answer is not retried: a repeat of a recorded one is answered as it, so the caller
may). ``rpc_requests`` against a real bus: tests/e2e/test_simple_clientrpc.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import cast

import msgspec
import nats.errors
import pytest
from nats.aio.client import Client as NatsClient

from proto import api
from twinhub_client import ConflictError, ServiceUnavailableError, TwinhubClient


@dataclass
class Msg:
    data: bytes


@dataclass
class ScriptedNats:
    script: list[BaseException | api.Reply]
    sent: list[tuple[str, bytes]] = field(default_factory=list)

    async def request(
        self, subject: str, payload: bytes, timeout: float, headers: dict[str, str]
    ) -> Msg:
        self.sent.append((subject, payload))
        step = self.script.pop(0)
        if isinstance(step, BaseException):
            raise step
        return Msg(api.encode_reply(step))


RECORDED = api.RpcAnswerRecorded(device_id="d1", request_id="r-1", position=9)


async def test_answer_rpc_sends_the_answer_and_returns_where_it_is() -> None:
    nc = ScriptedNats([api.Reply(ok=True, result=msgspec.to_builtins(RECORDED))])
    got = await TwinhubClient(cast(NatsClient, nc), "t").answer_rpc("d1", "r-1", {"time": 5})
    assert got == RECORDED
    ((subject, body),) = nc.sent
    assert subject == "twinhub.api.v1.answer-rpc"
    assert msgspec.json.decode(body) == {
        "device_id": "d1",
        "request_id": "r-1",
        "result": {"time": 5},
    }


async def test_answer_rpc_is_sent_once() -> None:
    nc = ScriptedNats([nats.errors.TimeoutError()])
    with pytest.raises(ServiceUnavailableError):
        await TwinhubClient(cast(NatsClient, nc), "t").answer_rpc("d1", "r-1")
    assert len(nc.sent) == 1
    conflict = api.Reply(ok=False, error=api.ApiError(code="conflict", message="answered"))
    nc = ScriptedNats([conflict])
    with pytest.raises(ConflictError):
        await TwinhubClient(cast(NatsClient, nc), "t").answer_rpc("d1", "r-1", 1)

"""The client's provisioning calls: the requests they send and their typed results, over a
scripted NATS connection (the real-server case is tests/e2e/test_provisioning.py)."""

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


@dataclass
class Msg:
    data: bytes


@dataclass
class ScriptedNats:
    script: list[BaseException | api.Reply]
    sent: list[tuple[str, Any]] = field(default_factory=list)

    async def request(
        self, subject: str, payload: bytes, timeout: float, headers: dict[str, str]
    ) -> Msg:
        self.sent.append((subject, msgspec.json.decode(payload)))
        step = self.script.pop(0)
        if isinstance(step, BaseException):
            raise step
        return Msg(api.encode_reply(step))


def client(nc: ScriptedNats) -> TwinhubClient:
    return TwinhubClient(cast(NatsClient, nc), "not-a-jwt", retry_delay=0)


ISSUED = api.DeviceTokenIssued(device_id="d1", token="tok", token_id="0123456789ab", position=4)


async def test_provision_rotate_revoke_send_their_requests() -> None:
    revoked = api.DeviceTokenRevoked(device_id="d1", token_id="0123456789ab", position=9)
    nc = ScriptedNats(
        [
            api.Reply(ok=True, result=ISSUED),
            api.Reply(ok=True, result=ISSUED),
            api.Reply(ok=True, result=ISSUED),
            api.Reply(ok=True, result=revoked),
        ]
    )
    c = client(nc)
    assert await c.provision("d1", "boiler") == ISSUED
    assert await c.provision() == ISSUED
    assert await c.rotate_token("d1") == ISSUED
    assert await c.revoke_token("d1") == revoked
    assert nc.sent == [
        ("twinhub.api.v1.provision-device", {"device_id": "d1", "name": "boiler"}),
        ("twinhub.api.v1.provision-device", {}),
        ("twinhub.api.v1.rotate-device-token", {"device_id": "d1"}),
        ("twinhub.api.v1.revoke-device-token", {"device_id": "d1"}),
    ]


async def test_provisioning_is_sent_once() -> None:
    """Not retried: a lost reply may have provisioned the device (its token is then rotated)."""
    nc = ScriptedNats([nats.errors.TimeoutError(), api.Reply(ok=True, result=ISSUED)])
    with pytest.raises(ServiceUnavailableError):
        await client(nc).provision("d1")
    assert len(nc.sent) == 1
    conflict = api.Reply(ok=False, error=api.ApiError(code="conflict", message="exists"))
    with pytest.raises(ConflictError):
        await client(ScriptedNats([conflict])).provision("d1")

"""The gateway's side of self-provisioning on the bus: a :class:`gateway.simpleprovision.
Provisioner` that relays a device's request to the twin service as a NATS request on
:data:`proto.selfprovision.SUBJECT` (only the gateway role may publish there, only the twin
role answers: bus/permissions.py) and waits for the answer a bounded time.

No answer in time, no responder, a connection that is down, an undecodable answer: None (the
device gets 5.03 and may retry); each logged once, never with the secret. The connection is a
small structural port (:class:`Requester`, what nats-py's ``Client`` offers), passed in by the
composition root: nats-py itself stays in the adapters tests/test_layering.py names.
"""

from __future__ import annotations

import logging
from typing import Protocol

from proto.selfprovision import SUBJECT, ProvisionReply, ProvisionRequest, decode_reply, encode

__all__ = ["NatsProvisioner", "Requester"]

log = logging.getLogger(__name__)


class ReplyMsg(Protocol):
    @property
    def data(self) -> bytes: ...


class Requester(Protocol):
    """What this adapter uses of a NATS connection."""

    # nats-py's signature (the timeout is the library's, not an asyncio one of ours)
    async def request(
        self,
        subject: str,
        payload: bytes = b"",
        timeout: float = 0.5,  # noqa: ASYNC109
    ) -> ReplyMsg: ...


class NatsProvisioner:
    def __init__(self, bus: Requester, *, subject: str = SUBJECT, timeout: float = 5.0) -> None:
        self._bus = bus
        self.subject = subject
        self.timeout = timeout

    async def provision(self, request: ProvisionRequest) -> ProvisionReply | None:
        try:
            msg = await self._bus.request(self.subject, encode(request), timeout=self.timeout)
        except Exception as e:  # timeout, no responders, connection closed: the seam's errors
            log.warning(
                "self-provisioning of %r from %s: the twin service did not answer: %r",
                request.device_name,
                request.remote,
                e,
            )
            return None
        try:
            return decode_reply(msg.data)
        except ValueError as e:
            log.error("self-provisioning: undecodable answer from the twin service: %s", e)
            return None

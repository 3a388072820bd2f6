"""The wire shape shared by the event log and the NATS binding.

A :class:`NatsMessage` is what one CloudEvent becomes on NATS (see
:mod:`proto.binding`): a subject, headers and a body. The event store stores and
returns these without knowing the event types; :mod:`proto.binding` turns them
into typed events and back.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType


@dataclass(frozen=True, slots=True)
class NatsMessage:
    """One message as published to / read from NATS.

    ``msg_id`` is the dedup key (JetStream ``Nats-Msg-Id``): the CloudEvent ``id``.
    """

    subject: str
    msg_id: str
    data: bytes
    headers: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "headers", MappingProxyType(dict(self.headers)))


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """A message as the log holds it: the message plus its log position.

    ``position`` is the JetStream stream sequence: global, strictly increasing,
    gap-tolerant (deleted or expired messages leave holes). ``time_ns`` is the
    server's receive time in nanoseconds since the epoch.
    """

    position: int
    message: NatsMessage
    time_ns: int

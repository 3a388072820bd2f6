"""The token registry on JetStream (stream ``TWINHUB_DEVICE_TOKENS``, :mod:`proto.devtokens`):
a :class:`gateway.devtokens.TokenDirectory` reading the last record on a token's hash subject
through the event-store port (``last_message``: a direct get; the gateway role may read the
stream, never write it)."""

from __future__ import annotations

import logging

import msgspec

from eventstore.ports import EventStore
from proto.devtokens import TokenRecord, decode_record, token_id, token_subject

__all__ = ["NatsTokenDirectory"]

log = logging.getLogger(__name__)


class NatsTokenDirectory:
    """``store`` is an event store opened on the registry's stream layout (the twin service
    provisions it; ``twinhub_cli.services.token_store`` gives one)."""

    def __init__(self, store: EventStore) -> None:
        self.store = store

    async def lookup(self, token: str) -> TokenRecord | None:
        stored = await self.store.last_message(token_subject(token))
        if stored is None:
            return None
        try:
            return decode_record(stored.message.data)
        except (msgspec.ValidationError, msgspec.DecodeError) as e:
            log.error(
                "token registry: malformed record for token %s at position %d: %s",
                token_id(token),
                stored.position,
                e,
            )
            return None

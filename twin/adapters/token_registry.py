"""The access-token registry of simple devices on a stream of the log.

:class:`LogTokenRegistry` implements :class:`twin.ports.TokenRegistry` over the
:class:`~eventstore.ports.EventStore` port: in production the JetStream store of
``TWINHUB_DEVICE_TOKENS`` (``twinhub_cli.services.token_store``, one message kept per subject),
in unit tests an in-memory store with the same layout. A record is one message on
``twinhub.devtoken.<hash>`` (:func:`proto.devtokens.hash_subject`); a write is a conditional
append on that subject, so two writers that read the same record cannot both replace it. Its
message id is derived from (hash, state, expected position): a retried write is deduplicated
by the log, a different one is not.
"""

from __future__ import annotations

import logging

import msgspec

from eventstore.ports import EventStore
from proto.devtokens import TokenRecord, decode_record, encode_record, hash_subject, token_id
from proto.message import NatsMessage
from twin.errors import TwinStoreError
from twin.ports import TokenEntry

__all__ = ["LogTokenRegistry"]

log = logging.getLogger(__name__)


class LogTokenRegistry:
    """The registry in ``store`` (a stream holding :data:`proto.devtokens.ALL_TOKENS`)."""

    def __init__(self, store: EventStore) -> None:
        self._store = store

    async def get(self, hashed: str) -> TokenEntry | None:
        stored = await self._store.last_message(hash_subject(hashed))
        if stored is None:
            return None
        try:
            record = decode_record(stored.message.data)
        except (msgspec.ValidationError, msgspec.DecodeError) as e:
            raise TwinStoreError(
                f"malformed token record of {token_id(hashed, hashed=True)}: {e}"
            ) from e
        return TokenEntry(record=record, position=stored.position)

    async def put(self, hashed: str, record: TokenRecord, *, expected_last: int) -> int:
        subject = hash_subject(hashed)
        message = NatsMessage(
            subject=subject,
            msg_id=f"devtoken:{hashed}:{record.state}:{expected_last}",
            data=encode_record(record),
        )
        result = await self._store.append([message], expected_last=expected_last, scope=subject)
        log.info(
            "token %s of device %s: %s",
            token_id(hashed, hashed=True),
            record.device_id,
            record.state,
        )
        return result.last_position

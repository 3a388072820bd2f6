"""Which devices a gateway instance holds, from the twins collection (MongoDB / FerretDB).

:class:`MongoHeldConnections` is :class:`twin.gateways.HeldConnections` on the collection
:class:`twin.adapters.mongo.MongoTwinStore` writes: the twins online on a connection whose id
starts with the instance (``<instance>.``, :func:`proto.leases.connection_id`) of that
gateway, read with a projection of the three fields the reaper needs, through one cursor. On
MongoDB an anchored regular expression on ``connection.connection_id`` is a range scan of its
index (created by :meth:`MongoHeldConnections.ensure_indexes`); FerretDB v1 scans the
collection, which is acceptable for what happens once per lost gateway instance.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any, Final

from pymongo import ASCENDING, IndexModel
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import ConnectionFailure, ExecutionTimeout, PyMongoError

from twin.adapters.mongo import DEFAULT_COLLECTION
from twin.errors import CorruptTwinError, StoreUnavailableError, TwinStoreError
from twin.gateways import HeldConnection

__all__ = ["CONNECTION_INDEX", "MongoHeldConnections"]

Doc = dict[str, Any]

CONNECTION_INDEX: Final = IndexModel(
    [("connection.connection_id", ASCENDING)], name="connection_id"
)
BATCH: Final = 1000


class MongoHeldConnections:
    """The caller owns the client; this only borrows the database."""

    def __init__(self, database: AsyncDatabase[Doc], collection: str = DEFAULT_COLLECTION) -> None:
        self._twins: AsyncCollection[Doc] = database.get_collection(collection)

    async def ensure_indexes(self) -> None:
        try:
            await self._twins.create_indexes([CONNECTION_INDEX])
        except PyMongoError as e:
            raise _translate(e) from e

    async def held_by(self, gateway: str, instance: str) -> AsyncIterator[HeldConnection]:
        query: Doc = {
            "connection.connection_id": {"$regex": f"^{re.escape(instance)}\\."},
            "connection.online": True,
            "connection.gateway": gateway,
        }
        projection: Doc = {"_id": 1, "owner": 1, "connection.connection_id": 1}
        try:
            async with self._twins.find(query, projection, batch_size=BATCH) as cursor:
                async for doc in cursor:
                    yield _held(doc)
        except PyMongoError as e:
            raise _translate(e) from e


def _held(doc: Doc) -> HeldConnection:
    try:
        device_id, owner = doc["_id"], doc["owner"]
        connection_id = doc["connection"]["connection_id"]
    except (KeyError, TypeError) as e:
        raise CorruptTwinError(f"twin {doc.get('_id')!r}: no connection id") from e
    if not all(isinstance(v, str) for v in (device_id, owner, connection_id)):
        raise CorruptTwinError(f"twin {device_id!r}: connection fields are not strings")
    return HeldConnection(device_id, owner, connection_id)


def _translate(e: PyMongoError) -> TwinStoreError:
    if isinstance(e, ConnectionFailure | ExecutionTimeout):
        return StoreUnavailableError(f"MongoDB unavailable: {e}")
    return TwinStoreError(f"MongoDB: {e}")

"""The event log: a port and its adapters (JetStream, in-memory).

Import the adapters from their modules (``eventstore.adapters.jetstream`` needs nats-py);
this package exports the port, its value types and errors.
"""

from eventstore.errors import (
    ConcurrencyError,
    ConsumerGoneError,
    EventStoreError,
    InvalidAppendError,
    NotProvisionedError,
    UnavailableError,
)
from eventstore.layout import DEFAULT_STREAM, StreamLayout
from eventstore.memory import InMemoryEventStore
from eventstore.ports import (
    ALL_EVENTS,
    MAX_ATOMIC_APPEND,
    AppendResult,
    Consumer,
    ConsumerSpec,
    Delivery,
    EventStore,
)

__all__ = [
    "ALL_EVENTS",
    "DEFAULT_STREAM",
    "MAX_ATOMIC_APPEND",
    "AppendResult",
    "ConcurrencyError",
    "Consumer",
    "ConsumerGoneError",
    "ConsumerSpec",
    "Delivery",
    "EventStore",
    "EventStoreError",
    "InMemoryEventStore",
    "InvalidAppendError",
    "NotProvisionedError",
    "StreamLayout",
    "UnavailableError",
]

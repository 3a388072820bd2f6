"""The event store's exception tree, one root for the package.

::

    EventStoreError
    ├── ConcurrencyError      (also ValueError)      expected_last did not hold
    ├── InvalidAppendError    (also ValueError)      the append can never succeed as given
    ├── UnavailableError      (also ConnectionError) NATS down, timed out, JetStream not ready
    ├── NotProvisionedError   (also LookupError)     the stream does not exist: call provision()
    └── ConsumerGoneError     (also LookupError)     the durable consumer was deleted under us

Adapters translate their library's errors into these at the seam; nothing from ``nats`` leaks.
"""

from __future__ import annotations

__all__ = [
    "ConcurrencyError",
    "ConsumerGoneError",
    "EventStoreError",
    "InvalidAppendError",
    "NotProvisionedError",
    "UnavailableError",
]


class EventStoreError(Exception):
    """Root of every error raised by the event store."""


class ConcurrencyError(EventStoreError, ValueError):
    """An append with ``expected_last`` found another last position in its scope.

    Nothing of the append was written. ``actual`` is the last position the store saw in
    ``scope`` when it refused (``None`` if the store could not tell).
    """

    def __init__(self, scope: str, expected: int, actual: int | None) -> None:
        self.scope = scope
        self.expected = expected
        self.actual = actual
        found = "unknown" if actual is None else str(actual)
        super().__init__(f"expected last position {expected} in {scope!r}, found {found}")

    def __reduce__(self) -> tuple[type[ConcurrencyError], tuple[str, int, int | None]]:
        return (type(self), (self.scope, self.expected, self.actual))


class InvalidAppendError(EventStoreError, ValueError):
    """The append is malformed (bad subject, reserved header, batch too large, ...).

    Retrying the same call cannot succeed.
    """


class UnavailableError(EventStoreError, ConnectionError):
    """The log could not be reached or did not answer in time.

    For an append the outcome is unknown: some or all messages may have been stored.
    Retrying with the same message ids is safe (deduplication returns the original
    positions).
    """


class NotProvisionedError(EventStoreError, LookupError):
    """The stream does not exist (``provision()`` was never run, or it was deleted)."""


class ConsumerGoneError(EventStoreError, LookupError):
    """The durable consumer no longer exists (deleted by an operator or another process)."""

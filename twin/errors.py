"""The exception tree of :mod:`twin`, one root for the package.

::

    TwinError
    ├── FoldError              (also ValueError)      an event the fold cannot take (no position,
    │                                                 another device's event)
    ├── TwinStoreError                                the twin store failed
    │   ├── StoreUnavailableError (also ConnectionError)  server down / timed out: retry later
    │   └── CorruptTwinError      (also ValueError)       a stored document is not a twin
    ├── ProjectorStoppedError  (also RuntimeError)    the projector's loop ended (its cause chained)
    └── ProjectionTimeoutError (also TimeoutError)    a position was not reached in time

Adapters translate their library's errors into these at the seam; nothing from ``pymongo``
leaks out of :mod:`twin.adapters.mongo`.
"""

from __future__ import annotations

__all__ = [
    "CorruptTwinError",
    "FoldError",
    "ProjectionTimeoutError",
    "ProjectorStoppedError",
    "StoreUnavailableError",
    "TwinError",
    "TwinStoreError",
]


class TwinError(Exception):
    """Root of every error raised by :mod:`twin`."""


class FoldError(TwinError, ValueError):
    """The fold was given an event it must never see (a programming error, not bad data)."""


class TwinStoreError(TwinError):
    """The twin store failed; the write or read may be retried."""


class StoreUnavailableError(TwinStoreError, ConnectionError):
    """The store could not be reached or did not answer in time."""


class CorruptTwinError(TwinStoreError, ValueError):
    """A stored document cannot be read back as a twin (or a twin cannot be stored)."""


class ProjectorStoppedError(TwinError, RuntimeError):
    """The projector's loop is not running (it failed or was stopped)."""


class ProjectionTimeoutError(TwinError, TimeoutError):
    """The projection did not reach the awaited log position in time."""

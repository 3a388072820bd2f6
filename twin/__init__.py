"""The twin service: folds the event log into the device twin (one document per device).

* :mod:`twin.model` — the :class:`Twin` value and its document / JSON forms;
* :mod:`twin.fold` — the pure fold of events into twins;
* :mod:`twin.ports` — the :class:`TwinStore` port; :mod:`twin.memory` its in-memory adapter,
  :mod:`twin.adapters.mongo` the MongoDB one (import it from there: it needs pymongo);
* :mod:`twin.service` — the projector (log → store, durably) and ``rebuild``.
"""

from twin.errors import (
    CorruptTwinError,
    FoldError,
    ProjectionTimeoutError,
    ProjectorStoppedError,
    StoreUnavailableError,
    TwinError,
    TwinStoreError,
)
from twin.fold import BatchFold, fold, fold_all, fold_batch
from twin.memory import InMemoryTwinStore
from twin.model import Connection, ResourceState, Twin
from twin.ports import TwinStore, WriteResult
from twin.service import ProjectorConfig, ProjectorHooks, ProjectorStats, TwinProjector, rebuild

__all__ = [
    "BatchFold",
    "Connection",
    "CorruptTwinError",
    "FoldError",
    "InMemoryTwinStore",
    "ProjectionTimeoutError",
    "ProjectorConfig",
    "ProjectorHooks",
    "ProjectorStats",
    "ProjectorStoppedError",
    "ResourceState",
    "StoreUnavailableError",
    "Twin",
    "TwinError",
    "TwinProjector",
    "TwinStore",
    "TwinStoreError",
    "WriteResult",
    "fold",
    "fold_all",
    "fold_batch",
    "rebuild",
]

"""The event log stream layout: stream and consumer configuration (sizing notes follow)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

from eventstore.ports import ALL_EVENTS, ConsumerSpec, is_filter_subject

__all__ = [
    "DEFAULT_STREAM",
    "StreamLayout",
    "durable_consumer_config",
    "read_consumer_config",
    "stream_config",
]

DEFAULT_STREAM: Final = "TWINHUB_EVENTS"
_NS: Final = 1_000_000_000


def _ns(seconds: float) -> int:
    return round(seconds * _NS)


@dataclass(frozen=True, slots=True)
class StreamLayout:
    """The event log stream's configuration (see the module docstring for sizing).

    ``None`` limits mean unlimited. Times are in seconds.
    """

    name: str = DEFAULT_STREAM
    subjects: tuple[str, ...] = (ALL_EVENTS,)
    duplicate_window: float = 120.0
    max_age: float | None = None
    max_bytes: int | None = None
    max_msgs_per_subject: int | None = None
    replicas: int = 1
    storage: Literal["file", "memory"] = "file"

    def __post_init__(self) -> None:
        object.__setattr__(self, "subjects", tuple(self.subjects))
        if not self.name or any(c in self.name for c in " .*>\t\r\n/\\"):
            raise ValueError(f"bad stream name {self.name!r}")
        if not self.subjects or not all(map(is_filter_subject, self.subjects)):
            raise ValueError(f"bad stream subjects {self.subjects!r}")
        if not self.duplicate_window > 0:
            raise ValueError("duplicate_window must be > 0")
        if self.max_age is not None and not self.max_age > 0:
            raise ValueError("max_age must be > 0 (or None)")
        if self.max_age is not None and self.max_age < self.duplicate_window:
            # JetStream refuses a duplicate window longer than max_age.
            raise ValueError("max_age must be >= duplicate_window")
        if self.max_bytes is not None and self.max_bytes < 1:
            raise ValueError("max_bytes must be >= 1 (or None)")
        if self.max_msgs_per_subject is not None and self.max_msgs_per_subject < 1:
            raise ValueError("max_msgs_per_subject must be >= 1 (or None)")
        if self.replicas not in (1, 3, 5):
            raise ValueError("replicas must be 1, 3 or 5")


def stream_config(layout: StreamLayout) -> dict[str, Any]:
    """The JetStream stream configuration, as the ``$JS.API.STREAM.CREATE`` JSON body.

    Built by hand rather than with nats-py's ``StreamConfig`` so every field we rely on
    (``allow_atomic`` in particular) is sent exactly as the server expects.
    """
    return {
        "name": layout.name,
        "subjects": list(layout.subjects),
        "retention": "limits",
        "storage": layout.storage,
        "discard": "old",
        "num_replicas": layout.replicas,
        "duplicate_window": _ns(layout.duplicate_window),
        "max_age": 0 if layout.max_age is None else _ns(layout.max_age),
        "max_bytes": -1 if layout.max_bytes is None else layout.max_bytes,
        "max_msgs": -1,
        "max_msgs_per_subject": (
            -1 if layout.max_msgs_per_subject is None else layout.max_msgs_per_subject
        ),
        "max_msg_size": -1,
        "max_consumers": -1,
        # Conditional multi-message appends are atomic batches (ADR-50, nats-server 2.12).
        "allow_atomic": True,
        "allow_direct": True,
        # Events are never removed one by one; limits and purges (operators) still apply.
        "deny_delete": True,
        "deny_purge": False,
        "allow_rollup_hdrs": False,
    }


def _filters(filter_subjects: Sequence[str]) -> dict[str, Any]:
    if len(filter_subjects) == 1:
        return {"filter_subject": filter_subjects[0]}
    return {"filter_subjects": list(filter_subjects)}


def _start(after: int) -> dict[str, Any]:
    if after <= 0:
        return {"deliver_policy": "all"}
    return {"deliver_policy": "by_start_sequence", "opt_start_seq": after + 1}


def durable_consumer_config(spec: ConsumerSpec) -> dict[str, Any]:
    """A durable pull consumer with explicit acks (the twin's at-least-once feed)."""
    return {
        "durable_name": spec.name,
        "name": spec.name,
        "ack_policy": "explicit",
        "ack_wait": _ns(spec.ack_wait),
        "max_ack_pending": spec.max_ack_pending,
        "max_deliver": -1,
        "replay_policy": "instant",
        **_start(spec.start_after),
        **_filters(spec.filter_subjects),
    }


def read_consumer_config(
    name: str, filter_subjects: Sequence[str], after: int, inactive_threshold: float
) -> dict[str, Any]:
    """A throw-away pull consumer for one replay: no acks, in memory, one replica, deleted by
    the server if the reader vanishes."""
    return {
        "name": name,
        "ack_policy": "none",
        "replay_policy": "instant",
        "mem_storage": True,
        "num_replicas": 1,
        "inactive_threshold": _ns(inactive_threshold),
        **_start(after),
        **_filters(filter_subjects),
    }

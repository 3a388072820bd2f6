"""The event log's layout on JetStream: stream and consumer configuration, and how it scales.

Subjects and stream
===================
Every event is one message on ``twinhub.ev.<owner>.<device>.<kind>.<resource>`` (six tokens,
built by :mod:`proto.subjects`; ``<resource>`` is ``_`` for device-level kinds). One stream,
``TWINHUB_EVENTS`` by default, captures ``twinhub.ev.>``: file storage, ``discard: old``, a
duplicate window (default 2 min) for ``Nats-Msg-Id``, ``allow_atomic`` for conditional
multi-message appends, ``deny_delete``. A position is the stream sequence. The optimistic
concurrency scope of a device is ``twinhub.ev.*.<device>.>``; a replay of one device is a
batched direct get (``allow_direct``; a consumer past 256 events) filtered on it, so the server
only sends that device's events. When the owner is known,
``twinhub.ev.<owner>.<device>.>`` is cheaper for the server: a wildcard in the owner position
makes it walk every owner's branch of its subject index (measured with 300 owners and 300 k
subjects: ``last_position`` 0.72 ms with the wildcard, 0.33 ms without; the gap grows with the
number of owners).

Sizing at 1 million devices with 10 resources each
==================================================
"Measured" numbers come from ``bench/append_bench.py --subject-memory 1000000`` on a 2-vCPU
Xeon VM, nats-server 2.12.8, single node, growth of the server's resident memory (Go RSS,
which includes GC headroom, so these are upper-side figures). Everything else is an estimate
and says from what.

Subject cardinality. Each (kind, resource) pair a device ever used is one subject. Today a
device has 10 ``resource-changed`` subjects and up to 7 device-level kinds (registered,
unregistered, online, offline, twin-sync-state, links-published, links-unpublished): 17 per
device, about 15-17 M subjects for 1 M devices. Command events will add (command kinds) x
(commanded resources) per device: if each lifecycle state (pending, sent, succeeded, ...) were
its own kind this multiplies by ~6, so the state should travel in the event, one kind per
command type (estimate: +4 x 10 = 40 subjects per device in the worst case, ~55 M in total).

Per-subject index memory. The file store keeps, for every subject in the stream, an in-memory
entry of its subject-state index (``psim``: an adaptive radix tree keyed by subject holding the
message count and first/last block; nats-server issues #4742 and #6561 describe it and that it is
not paged to disk). Measured: **189 B per subject** (1 M subjects of ~33 characters, ten per
device prefix). Our subjects are ~110 characters (two UUIDs), mostly a prefix shared by the
device's subjects; estimate 200-300 B each, so **15 M subjects ~ 3-4.5 GB** on every server that
holds a replica of the stream, and ~11-16 GB if commands reach 55 M subjects. The index is
also written to ``index.db`` on shutdown; after an unclean stop the server rebuilds it by
scanning the stream (#6561), which takes long on a big store.

Duplicate window memory. The stream remembers every ``Nats-Msg-Id`` of the window in memory.
Measured: **226 B per id** (1 M 35-character ids, CloudEvent ids are 36-character UUIDs). So
memory = event rate x window x 226 B: 10 k events/s x 120 s = 1.2 M ids ~ **270 MB**;
50 k events/s x 120 s ~ 1.4 GB; the same with a 30 s window ~ 340 MB. The window only has to
exceed the longest time a producer keeps retrying one append (the gateway's reconnect and
retry budget), so it can be shortened when the rate grows.

Storage per event. A ``resource-changed`` event in binary CloudEvents mode is ~110 B subject +
~390 B headers (``ce-*``, ``Content-Type``, ``Nats-Msg-Id``) + ~140 B JSON body; with the file
store's ~30 B record overhead about **670 B** on disk (computed from a real event built by
:func:`proto.binding.to_nats`). At 10 k events/s that is ~580 GB a day per replica.

Retention. ``max_age`` and/or ``max_bytes`` bound the log by time or size (oldest first). With
``max_msgs_per_subject = N`` the stream becomes a compacted log: the last N events of every
(kind, resource), at most 15 M x N x 670 B (N = 2: ~20 GB) whatever the age of the fleet. A twin
can still be rebuilt from it because ``resource-changed`` carries the whole content and
online/offline/sync-state events carry the whole state; events that describe a change rather
than a state (links published/unpublished, command lifecycles) need N large enough or a
periodic full-state event. Compaction gives up the full history (audit, "every event exactly
once" to a subscriber that lags further behind than N events per subject), so it is a
deployment choice, off by default. Optimistic concurrency is unaffected: the last sequence of a
subject always survives.

Sharding. One stream lives on one replica set, so its subject index and dedup table must fit
on each of those servers. To spread them, split the log into P streams by a hash of the
device with an account subject mapping, e.g. for P = 8::

    mappings = {
      "twinhub.ev.*.*.*.*": "twinhub.evp.{{partition(8,2)}}.$1.$2.$3.$4"
    }

(``partition(8,2)`` hashes the second wildcard, the device, into 0-7: FNV-1a 32 of the token
modulo 8; checked against nats-server 2.12.8, where the same device lands in the same partition
whoever the owner) and streams
``TWINHUB_EVENTS_<p>`` capturing ``twinhub.evp.<p>.>``. A device always lands in the same
partition, so its order and its expected-last-subject-sequence checks are unchanged; a
position becomes (partition, sequence), with no order across partitions, which the product
does not need (devices are independent). With R3 streams on a 9-server cluster each server
holds ~P x 3 / 9 partitions: a third of the subject index and dedup memory instead of all of it.
The adapter does not do this yet: it would compute the partition the same way to build scopes
and filters.

Durability. An append returns once JetStream acknowledged it. With one replica the file store
writes at once but syncs to disk every ``sync_interval`` (2 min by default): a process crash
loses nothing, a machine crash can lose the last interval. Run R3 (the default for production)
or set ``jetstream { sync_interval: always }`` on single-node deployments that need more.
"""

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
        # Reads are batched direct gets (ADR-31, nats-server 2.11).
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
        **(
            {}
            if spec.inactive_threshold is None
            else {"inactive_threshold": _ns(spec.inactive_threshold)}
        ),
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

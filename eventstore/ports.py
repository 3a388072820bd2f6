"""The event log as a port: what the gateway and the twin may ask of it.

Two adapters implement it with the same observable behaviour, held to it by one contract
suite (``tests/contract/test_eventstore.py``):

* :class:`eventstore.adapters.jetstream.JetStreamEventStore` — NATS JetStream, the real log;
* :class:`eventstore.memory.InMemoryEventStore` — for unit tests of the services.

Semantics (both adapters):

* **Position** = the stream sequence: global, strictly increasing, may have holes.
* **Append** writes messages in order. Each carries a ``msg_id``; a message whose id was
  appended within the duplicate window is not written again, its original position is
  returned and flagged as a duplicate. A retried append therefore returns the same positions.
* **Optimistic concurrency**: with ``expected_last`` the append is written only if the last
  position among messages matching ``scope`` (a subject filter, wildcards allowed) equals
  ``expected_last`` (0: nothing in scope yet); otherwise :class:`ConcurrencyError` and nothing
  is written. A conditional append of several messages is atomic: all or nothing. Duplicate
  detection comes first: a retry of an append that succeeded returns its positions as
  duplicates, it does not fail the check its own first attempt moved.
* **Read** replays messages with position > ``after`` matching a filter, in position order,
  up to the end of the log as it was when the read started.
* **Durable consumers** deliver at least once with explicit acks; re-opening a consumer by name
  continues after what was acknowledged; unacknowledged messages come back after ``ack_wait``
  or a ``nak``; redeliveries come before new messages.
"""

from __future__ import annotations

import functools
import re
from collections.abc import AsyncGenerator, Iterable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Final, Protocol, Self

from eventstore.errors import InvalidAppendError
from proto.message import NatsMessage, StoredMessage
from proto.subjects import ALL_EVENTS

__all__ = [
    "ALL_EVENTS",
    "MAX_ATOMIC_APPEND",
    "RESERVED_HEADER_PREFIX",
    "AppendResult",
    "Consumer",
    "ConsumerSpec",
    "Delivery",
    "EventStore",
    "Notifier",
    "Settler",
    "check_append",
    "is_filter_subject",
    "is_literal_subject",
    "subject_matches",
]

MAX_ATOMIC_APPEND: Final = 1000
"""Most messages one conditional (``expected_last``) append may hold: JetStream's atomic batch
limit (nats-server 2.12). Unconditional appends have no such limit."""

RESERVED_HEADER_PREFIX: Final = "nats-"
"""Headers the log uses itself (``Nats-Msg-Id``, ``Nats-Expected-*``, ``Nats-Batch-*``);
callers may not set them and they are not returned on read."""

_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_SUBJECT_CHARS = re.compile(r"[\s]")
_CONSUMER_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def is_literal_subject(subject: str) -> bool:
    """A subject a message can be published to: non-empty tokens, no wildcards, no spaces."""
    if not subject or _BAD_SUBJECT_CHARS.search(subject):
        return False
    return all(tok and tok not in ("*", ">") for tok in subject.split("."))


def is_filter_subject(subject: str) -> bool:
    """A subscription filter: like a literal subject, but ``*`` may stand for a token and a
    final ``>`` for one or more tokens."""
    if not subject or _BAD_SUBJECT_CHARS.search(subject):
        return False
    tokens = subject.split(".")
    for i, tok in enumerate(tokens):
        if not tok:
            return False
        if tok == ">" and i != len(tokens) - 1:
            return False
    return True


def subject_matches(filter_subject: str, subject: str) -> bool:
    """NATS subject matching: ``*`` matches exactly one token, a final ``>`` one or more."""
    f = filter_subject.split(".")
    s = subject.split(".")
    for i, tok in enumerate(f):
        if tok == ">":
            return len(s) > i
        if i >= len(s):
            return False
        if tok != "*" and tok != s[i]:
            return False
    return len(s) == len(f)


@dataclass(frozen=True, slots=True)
class AppendResult:
    """Where each appended message is, and which were already there."""

    positions: tuple[int, ...]
    duplicates: tuple[bool, ...]

    def __post_init__(self) -> None:
        if len(self.positions) != len(self.duplicates) or not self.positions:
            raise ValueError("positions and duplicates must be non-empty and of equal length")

    @property
    def last_position(self) -> int:
        return self.positions[-1]

    @property
    def all_duplicates(self) -> bool:
        return all(self.duplicates)


@dataclass(frozen=True, slots=True)
class ConsumerSpec:
    """A durable consumer: its name, what it reads, and from where it starts.

    ``start_after`` applies only when the consumer is created; re-opening an existing consumer
    continues where it was. ``ack_wait`` (seconds) and ``max_ack_pending`` may change between
    openings; so may ``filter_subjects``. With ``inactive_threshold`` (seconds) the log may
    delete the consumer once nobody has fetched from it for that long: for a temporary consumer
    whose owner could not delete it (the log was unreachable when it closed).
    """

    name: str
    filter_subjects: tuple[str, ...] = (ALL_EVENTS,)
    start_after: int = 0
    ack_wait: float = 30.0
    max_ack_pending: int = 1000
    inactive_threshold: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "filter_subjects", tuple(self.filter_subjects))
        if not _CONSUMER_NAME.fullmatch(self.name):
            raise ValueError(f"consumer name must match {_CONSUMER_NAME.pattern}: {self.name!r}")
        if not self.filter_subjects or not all(map(is_filter_subject, self.filter_subjects)):
            raise ValueError(f"bad filter subjects: {self.filter_subjects!r}")
        if self.start_after < 0:
            raise ValueError("start_after must be >= 0")
        if not self.ack_wait > 0:
            raise ValueError("ack_wait must be > 0")
        if self.max_ack_pending < 1:
            raise ValueError("max_ack_pending must be >= 1")
        if self.inactive_threshold is not None and not self.inactive_threshold > 0:
            raise ValueError("inactive_threshold must be > 0")


class Settler(Protocol):
    """How a :class:`Delivery` reports back to the adapter that delivered it (internal seam)."""

    async def settle_ack(self, token: object) -> None: ...

    async def settle_nak(self, token: object, delay: float | None) -> None: ...


@dataclass(frozen=True, slots=True, eq=False)
class Delivery:
    """One delivery of a stored message by a durable consumer.

    ``num_delivered`` counts deliveries of this message to the consumer, 1 the first time.
    """

    stored: StoredMessage
    num_delivered: int
    _settler: Settler = field(repr=False)
    _token: object = field(repr=False)

    @property
    def redelivered(self) -> bool:
        return self.num_delivered > 1

    @property
    def position(self) -> int:
        return self.stored.position

    async def ack(self) -> None:
        """Acknowledge: the message will not be delivered again. Returns once the log
        recorded the ack; acknowledging twice is harmless."""
        await self._settler.settle_ack(self._token)

    async def nak(self, delay: float | None = None) -> None:
        """Give the message back for redelivery, at once or after ``delay`` seconds."""
        if delay is not None and delay < 0:
            raise ValueError("delay must be >= 0")
        await self._settler.settle_nak(self._token, delay)


class Consumer(Protocol):
    """An open durable consumer (pull). Closing it keeps its state in the log."""

    @property
    def spec(self) -> ConsumerSpec: ...

    async def fetch(self, max_messages: int, timeout: float) -> list[Delivery]:  # noqa: ASYNC109
        """Up to ``max_messages`` deliveries, redeliveries first; returns as soon as at least one
        is available, or ``[]`` once ``timeout`` seconds passed with nothing to deliver."""
        ...

    async def ack_many(self, deliveries: Iterable[Delivery]) -> None:
        """Acknowledge several deliveries, concurrently."""
        ...

    async def close(self) -> None: ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


class Notifier(Protocol):
    """A wake-up signal for new messages matching some filters (routing by subscription).

    It carries no data and no ordering: on a wake-up, read the log after the position you
    have. It also wakes after a reconnection to the server, when messages may have been
    missed. Best effort by design — the log is the truth. A wake-up may come *before* a read
    can see the message (JetStream hands a publish to subscribers just before the stream
    stores it, and a duplicate publish wakes without being stored): a reader that finds
    nothing new should read again shortly, a bounded number of times.
    """

    async def wait(self, timeout: float) -> bool:  # noqa: ASYNC109
        """True once something matching arrived (or a resync is due) since the last wait;
        False after ``timeout`` seconds of nothing."""
        ...

    async def close(self) -> None: ...


class EventStore(Protocol):
    """The event log. See the module docstring for the semantics."""

    async def provision(self, consumers: Sequence[ConsumerSpec] = ()) -> None:
        """Create or update the stream, and the given durable consumers. Idempotent."""
        ...

    async def append(
        self,
        messages: Sequence[NatsMessage],
        *,
        expected_last: int | None = None,
        scope: str | None = None,
    ) -> AppendResult:
        """Append ``messages`` (all of one device) in order.

        ``scope`` defaults to the messages' subject when they all share one; it is required
        with ``expected_last`` otherwise, and refused without it.
        """
        ...

    async def last_position(self, scope: str = ALL_EVENTS) -> int:
        """The last position among messages matching ``scope``; 0 if there is none."""
        ...

    async def last_message(self, scope: str) -> StoredMessage | None:
        """The last message matching ``scope`` (wildcards allowed), or None."""
        ...

    async def notifier(self, filters: Sequence[str]) -> Notifier:
        """A :class:`Notifier` for messages appended on subjects matching ``filters``."""
        ...

    def read(
        self,
        filter_subject: str = ALL_EVENTS,
        *,
        after: int = 0,
        limit: int | None = None,
    ) -> AsyncGenerator[StoredMessage, None]:
        """Messages with position > ``after`` matching ``filter_subject`` (server-side), in
        position order, up to the end of the log when the read started; at most ``limit``."""
        ...

    async def consumer(
        self,
        name: str,
        filter_subjects: Sequence[str] = (ALL_EVENTS,),
        *,
        start_after: int = 0,
        ack_wait: float = 30.0,
        max_ack_pending: int = 1000,
        inactive_threshold: float | None = None,
    ) -> Consumer:
        """Open the durable consumer ``name``, creating it if needed (see :class:`ConsumerSpec`)."""
        ...

    async def delete_consumer(self, name: str) -> bool:
        """Delete a durable consumer and its state; ``False`` if there was none."""
        ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


@functools.lru_cache(maxsize=1024)
def _header_name_problem(name: str) -> str | None:
    # Cached: every event carries the same few header names.
    if not _HEADER_NAME.fullmatch(name):
        return f"bad header name {name!r}"
    if name.lower().startswith(RESERVED_HEADER_PREFIX):
        return f"header {name!r} is reserved to the log"
    return None


def _check_headers(message: NatsMessage) -> None:
    for name, value in message.headers.items():
        problem = _header_name_problem(name)
        if problem is not None:
            raise InvalidAppendError(f"{problem} on {message.subject!r}")
        if "\r" in value or "\n" in value or value != value.strip():
            raise InvalidAppendError(
                f"header {name!r} value must have no CR/LF and no surrounding whitespace"
            )


@functools.lru_cache(maxsize=16384)
def _subject_problem(subject: str, stream_subjects: tuple[str, ...]) -> str | None:
    # Cached: a device's events go to the same few subjects (the gateway's hot path).
    if not is_literal_subject(subject):
        return f"not a publishable subject: {subject!r}"
    if not any(subject_matches(f, subject) for f in stream_subjects):
        return f"subject {subject!r} is outside the stream's subjects"
    return None


def check_append(
    messages: Sequence[NatsMessage],
    expected_last: int | None,
    scope: str | None,
    stream_subjects: Sequence[str],
) -> str | None:
    """Validate an append's arguments; return the effective scope (``None`` if unconditional).

    Shared by the adapters so they refuse exactly the same calls.
    """
    if not messages:
        raise InvalidAppendError("nothing to append")
    seen: set[str] = set()
    within = tuple(stream_subjects)
    for m in messages:
        problem = _subject_problem(m.subject, within)
        if problem is not None:
            raise InvalidAppendError(problem)
        if not m.msg_id or m.msg_id != m.msg_id.strip() or "\r" in m.msg_id or "\n" in m.msg_id:
            raise InvalidAppendError(f"bad msg_id {m.msg_id!r} on {m.subject!r}")
        if m.msg_id in seen:
            raise InvalidAppendError(f"msg_id {m.msg_id!r} appears twice in one append")
        seen.add(m.msg_id)
        _check_headers(m)
    if expected_last is None:
        if scope is not None:
            raise InvalidAppendError("scope is only meaningful with expected_last")
        return None
    if expected_last < 0:
        raise InvalidAppendError("expected_last must be >= 0")
    if len(messages) > MAX_ATOMIC_APPEND:
        raise InvalidAppendError(
            f"a conditional append holds at most {MAX_ATOMIC_APPEND} messages, got {len(messages)}"
        )
    if scope is None:
        subjects = {m.subject for m in messages}
        if len(subjects) != 1:
            raise InvalidAppendError("scope is required when the messages' subjects differ")
        return subjects.pop()
    if not is_filter_subject(scope):
        raise InvalidAppendError(f"not a subject filter: {scope!r}")
    return scope

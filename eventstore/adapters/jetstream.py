"""The event log on NATS JetStream (nats-server >= 2.12): the only module that speaks NATS.

How each operation maps onto JetStream:

* **append, unconditional** — every message is published with a reply subject on one shared
  inbox, all of them first, then their acks are awaited together, so appends from many tasks
  pipeline on one connection. ``Nats-Msg-Id`` = ``msg_id``: the server's duplicate window turns
  a retry into ``duplicate: true`` acks carrying the original sequences.
* **append, conditional, one message** — one publish with
  ``Nats-Expected-Last-Subject-Sequence`` and ``...-Subject`` = scope (wildcards allowed).
* **append, conditional, several messages** — an atomic batch (ADR-50, stream option
  ``allow_atomic``): ``Nats-Batch-Id``/``Nats-Batch-Sequence`` on every message, the expected-last
  headers on the first, ``Nats-Batch-Commit: 1`` on the last, which alone asks for an ack. The
  server checks the expectation against the stream before the batch and stores all or nothing.
  The server allows 50 open batches per stream: we keep at most ``max_atomic_inflight`` and retry
  a batch the server refused as incomplete (what it answers when the limit is hit).
* **duplicates of conditional appends** — the server evaluates the expected-last headers before
  the duplicate window (a retried single message gets "wrong last sequence") and rejects an
  atomic batch holding a known id. In both cases we look the ids up on the messages' own subjects
  (server-side filter, messages of the last two duplicate windows) and, when they are all there,
  answer with their positions as duplicates, as the in-memory store does.
* **read** — a batched direct get (ADR-31, stream option ``allow_direct``): one request on
  ``$JS.API.DIRECT.GET.<stream>`` with ``seq`` = ``after + 1``, ``next_by_subj`` (the filter,
  applied by the server) and ``batch``; the server answers with up to ``batch`` (256) stored
  messages, each carrying its subject, position, time and the number of matching messages after
  it in ``Nats-*`` headers, then a ``204 EOB`` status (``404`` alone when nothing matches). The
  replies come to the store's one reply inbox. The read ends with what the server counted when
  it answered, so a small read (the hot paths) is that one request: no consumer, no
  ``last_position``. A longer read goes on from the last position seen through a throw-away pull
  consumer (no acks, memory storage, ``inactive_threshold``), cheaper for the server per message,
  pulled in ``no_wait`` batches up to ``last_position`` taken then. Streams without
  ``allow_direct`` are refused (``NotProvisionedError``: ``provision()`` turns it on). On a
  replicated stream followers answer direct gets too and may lag the leader by the appends in
  flight; not yet looked at on a cluster (the tests run one server).
* **looking up recent ids** (a refused conditional append that may be a retry) — a throw-away
  pull consumer (no acks, memory storage, ``inactive_threshold``) from a start time, filtered on
  the messages' subjects.
* **last_position** — ``STREAM.MSG.GET`` with ``last_by_subj`` (wildcards allowed), answered by
  the stream leader.
* **durable consumers** — pull consumers with explicit acks; ``fetch`` is one pull request with
  ``no_wait`` and ``expires``: the server waits for a first message up to ``expires``, then sends
  what is there and ends the request. Acks and naks are requests, so ``ack()`` returns once the
  server recorded it.

Stream and consumer management goes through the raw JSON API (``$JS.API.*``) with the bodies
built in :mod:`eventstore.layout`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import logging
import re
import time
import uuid
from collections import deque
from collections.abc import AsyncGenerator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Final, NoReturn, Self

import msgspec
import nats
import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.client import __version__ as nats_client_version
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from eventstore.adapters.endpoint import ConnectionLog, NatsEndpoint
from eventstore.errors import (
    ConcurrencyError,
    ConsumerGoneError,
    EventStoreError,
    InvalidAppendError,
    NotProvisionedError,
    UnavailableError,
)
from eventstore.layout import (
    StreamLayout,
    durable_consumer_config,
    read_consumer_config,
    stream_config,
)
from eventstore.ports import (
    ALL_EVENTS,
    RESERVED_HEADER_PREFIX,
    AppendResult,
    ConsumerSpec,
    Delivery,
    check_append,
    is_filter_subject,
    subject_matches,
)
from proto.message import NatsMessage, StoredMessage
from proto.subjects import PREFIX

__all__ = [
    "AckMetadata",
    "JetStreamApiError",
    "JetStreamConsumer",
    "JetStreamEventStore",
    "parse_ack_reply",
]

log = logging.getLogger("eventstore.jetstream")

_NS: Final = 1_000_000_000
_API: Final = "$JS.API"
_READ_BATCH: Final = 256
# Messages of a read's batched direct get; a longer read goes on through a consumer.
_DIRECT_BATCH: Final = 256
_READ_INACTIVE: Final = 30.0
_LONG_POLL_GRACE: Final = 1.0
# A fetch that got messages returns when no more arrive for this long: the server keeps a pull
# open (without a final status) while max_ack_pending holds further deliveries back.
_QUIET: Final = 0.05

# JetStream API error codes we act on (nats-server errors.json).
_ERR_CONSUMER_NOT_FOUND: Final = 10014
_ERR_NO_MESSAGE: Final = 10037
_ERR_STREAM_NAME_IN_USE: Final = 10058
_ERR_STREAM_NOT_FOUND: Final = 10059
_ERR_WRONG_LAST_SEQUENCE: Final = 10071
_ERR_CONSUMER_EXISTS: Final = 10148
_ERR_BATCH_INCOMPLETE: Final = 10176
_ERR_BATCH_DUPLICATE_ID: Final = 10201


def _replicas(cfg: dict[str, Any]) -> int:
    """The replicas a stream configuration asks for (JetStream's 0 means 1)."""
    return int(cfg.get("num_replicas") or 1)


_WRONG_LAST = re.compile(r"wrong last sequence: (\d+)")

H_MSG_ID: Final = "Nats-Msg-Id"
H_EXPECTED_LAST_SUBJECT_SEQ: Final = "Nats-Expected-Last-Subject-Sequence"
H_EXPECTED_LAST_SUBJECT_SEQ_SUBJECT: Final = "Nats-Expected-Last-Subject-Sequence-Subject"
H_BATCH_ID: Final = "Nats-Batch-Id"
H_BATCH_SEQ: Final = "Nats-Batch-Sequence"
H_BATCH_COMMIT: Final = "Nats-Batch-Commit"
# What a direct get adds to a stored message's own headers.
H_SUBJECT: Final = "Nats-Subject"
H_SEQUENCE: Final = "Nats-Sequence"
H_TIME_STAMP: Final = "Nats-Time-Stamp"
H_NUM_PENDING: Final = "Nats-Num-Pending"
_STATUS: Final = "Status"

_decode_ack: Final = msgspec.json.Decoder(dict[str, Any]).decode


class JetStreamApiError(EventStoreError):
    """An error answer of the JetStream API that has no more specific meaning for us."""

    def __init__(self, code: int, err_code: int, description: str) -> None:
        self.code = code
        self.err_code = err_code
        self.description = description
        super().__init__(f"JetStream error {code}/{err_code}: {description}")


def _api_error(err: dict[str, Any]) -> EventStoreError:
    code = int(err.get("code", 0))
    err_code = int(err.get("err_code", 0))
    desc = str(err.get("description", ""))
    if err_code == _ERR_STREAM_NOT_FOUND:
        return NotProvisionedError(desc)
    if code == 503:
        return UnavailableError(f"JetStream unavailable: {desc}")
    return JetStreamApiError(code, err_code, desc)


@dataclass(frozen=True, slots=True)
class AckMetadata:
    """What a JetStream delivery's reply subject tells about it."""

    stream: str
    consumer: str
    num_delivered: int
    stream_seq: int
    consumer_seq: int
    timestamp_ns: int
    num_pending: int


def parse_ack_reply(reply: str) -> AckMetadata:
    """Parse ``$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>`` (v1) or
    ``$JS.ACK.<domain>.<account>.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>...``
    (v2, 12+ tokens)."""
    t = reply.split(".")
    if len(t) < 9 or t[0] != "$JS" or t[1] != "ACK":
        raise ValueError(f"not a JetStream ack subject: {reply!r}")
    if len(t) == 9:
        base = 2
    elif len(t) >= 11:
        base = 4
    else:
        raise ValueError(f"unexpected JetStream ack subject: {reply!r}")
    try:
        return AckMetadata(
            stream=t[base],
            consumer=t[base + 1],
            num_delivered=int(t[base + 2]),
            stream_seq=int(t[base + 3]),
            consumer_seq=int(t[base + 4]),
            timestamp_ns=int(t[base + 5]),
            num_pending=int(t[base + 6]),
        )
    except ValueError as exc:
        raise ValueError(f"bad JetStream ack subject: {reply!r}") from exc


def _to_nats_message(msg: Msg, subject: str | None = None) -> NatsMessage:
    headers = msg.headers or {}
    msg_id = headers.get(H_MSG_ID, "")
    kept = {
        str(k): str(v)
        for k, v in headers.items()
        if not str(k).lower().startswith(RESERVED_HEADER_PREFIX)
    }
    subject = msg.subject if subject is None else subject
    return NatsMessage(subject=subject, msg_id=msg_id, data=msg.data, headers=kept)


def _stored(msg: Msg) -> tuple[StoredMessage, AckMetadata]:
    meta = parse_ack_reply(msg.reply)
    stored = StoredMessage(
        position=meta.stream_seq, message=_to_nats_message(msg), time_ns=meta.timestamp_ns
    )
    return stored, meta


def _stored_direct(msg: Msg) -> StoredMessage:
    """A message as a direct get returns it: the stored headers plus its subject, position and
    time in ``Nats-*`` headers (which, like every reserved header, are not returned)."""
    headers = msg.headers or {}
    return StoredMessage(
        position=int(headers[H_SEQUENCE]),
        message=_to_nats_message(msg, headers[H_SUBJECT]),
        time_ns=_parse_rfc3339_ns(headers[H_TIME_STAMP]),
    )


def _stored_from_api(raw: dict[str, Any]) -> StoredMessage:
    """A message as ``$JS.API.STREAM.MSG.GET`` returns it (base64 headers and data)."""
    headers: dict[str, str] = {}
    hdrs = raw.get("hdrs")
    if hdrs:
        lines = base64.b64decode(hdrs).decode("utf-8", "replace").split("\r\n")
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep and name:
                headers[name.strip()] = value.strip()
    msg_id = headers.get(H_MSG_ID, "")
    kept = {k: v for k, v in headers.items() if not k.lower().startswith(RESERVED_HEADER_PREFIX)}
    data = base64.b64decode(raw["data"]) if raw.get("data") else b""
    return StoredMessage(
        position=int(raw["seq"]),
        message=NatsMessage(subject=str(raw["subject"]), msg_id=msg_id, data=data, headers=kept),
        time_ns=_parse_rfc3339_ns(str(raw.get("time", ""))),
    )


def _parse_rfc3339_ns(text: str) -> int:
    """Nanoseconds since the epoch of a UTC RFC 3339 time with up to 9 fraction digits."""
    if not text:
        return 0
    base, _, frac = text.rstrip("Z").partition(".")
    return _epoch_seconds(base) * _NS + int((frac or "0")[:9].ljust(9, "0"))


@functools.lru_cache(maxsize=256)
def _epoch_seconds(base: str) -> int:
    # Cached: the messages of a read mostly share a few seconds.
    return int(datetime.fromisoformat(base).replace(tzinfo=UTC).timestamp())


def _status(msg: Msg) -> str | None:
    if msg.headers is None:
        return None
    return msg.headers.get(_STATUS)


# -- publishing without nats-py's per-header work (pinned to nats-py 2.16) ----------------------
#
# ``Client.publish`` re-validates and rewrites every header of every message (a regex per name,
# ``strip`` and a ``str.translate`` of CR/LF per value): ~20 µs for an event's ten CloudEvent
# headers, the largest single cost of an append. ``check_append`` has already refused what that
# work guards against (names outside the same token grammar, CR/LF or surrounding white space in
# values, subjects with white space), so the command is built here, byte for byte what
# ``publish`` would build, and handed to the client's own queue and flusher with the same
# checks ``publish`` makes. Only when the client looks like the one this was written against;
# otherwise ``publish`` (tests/unit/eventstore/test_publish.py compares the bytes).

_CLIENT_INTERNALS: Final = ("_send_command", "_flush_pending", "_flush_queue", "_pending_data_size")


_WRITTEN_AGAINST: Final = "2.16."  # the nats-py release whose internals this mirrors


def fast_publish_supported(nc: NatsClient) -> bool:
    """Only on the nats-py release this was written against (the test compares the bytes);
    any other release publishes through ``Client.publish``."""
    return (
        nats_client_version.startswith(_WRITTEN_AGAINST)
        and all(hasattr(nc, name) for name in _CLIENT_INTERNALS)
        and hasattr(nc, "_max_pending_size")
    )


def hpub_command(subject: str, reply: str, headers: Mapping[str, str], payload: bytes) -> bytes:
    """The ``HPUB`` command of one message with already valid headers (see above)."""
    hdr = "".join(["NATS/1.0\r\n", *[f"{k}: {v}\r\n" for k, v in headers.items()], "\r\n"])
    block = hdr.encode()
    size = len(block)
    return b"".join(
        (
            f"HPUB {subject} {reply} {size} {size + len(payload)}\r\n".encode(),
            block,
            payload,
            b"\r\n",
        )
    )


async def publish_prevalidated(
    nc: NatsClient, subject: str, reply: str, headers: Mapping[str, str], payload: bytes
) -> None:
    """``nc.publish(subject, payload, reply, headers)`` for headers ``check_append`` accepted."""
    if nc.is_closed:
        raise nats.errors.ConnectionClosedError
    if nc.is_draining_pubs:
        raise nats.errors.ConnectionDrainingError
    size = len(payload)
    if not nc.is_connected:
        limit = nc._max_pending_size
        if limit <= 0 or size + nc._pending_data_size > limit:
            raise nats.errors.OutboundBufferLimitError
    if size > nc.max_payload:
        raise nats.errors.MaxPayloadError
    if not subject:
        raise nats.errors.BadSubjectError
    nc.stats["out_msgs"] += 1
    nc.stats["out_bytes"] += size
    await nc._send_command(hpub_command(subject, reply, headers, payload))
    if nc._flush_queue is not None and nc._flush_queue.empty():
        await nc._flush_pending()


def _expire(futures: Iterable[asyncio.Future[Msg | None]]) -> None:
    for fut in futures:
        if not fut.done():
            fut.set_result(None)


def _rfc3339_ns(ns: int) -> str:
    secs, frac = divmod(max(ns, 0), _NS)
    base = datetime.fromtimestamp(secs, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{base}.{frac:09d}Z"


class JetStreamNotifier:
    """Core NATS subscriptions on the log's subjects: a JetStream publish reaches them too."""

    def __init__(self, store: JetStreamEventStore) -> None:
        self.store = store
        self.event = asyncio.Event()
        self.subs: list[Subscription] = []
        self.shared: list[tuple[str, tuple[str, str]]] = []  # on the store's shared wakeups

    async def on_msg(self, msg: Msg) -> None:
        self.event.set()

    async def wait(self, timeout: float) -> bool:  # noqa: ASYNC109
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancellation that
        # arrives as the event is set (the gateway cancels a device's command loop this way).
        try:
            async with asyncio.timeout(timeout):
                await self.event.wait()
        except TimeoutError:
            return False
        self.event.clear()
        return True

    async def close(self) -> None:
        self.store._notifiers.discard(self)
        if self.shared and self.store.shared_wakeups is not None:
            await self.store.shared_wakeups.remove(self)
        subs, self.subs = self.subs, []
        for sub in subs:
            with contextlib.suppress(nats.errors.Error, OSError):
                await sub.unsubscribe()


class _SharedWakeups:
    """Notifiers of many devices on a few subscriptions (``shared_notifiers``).

    A filter ``twinhub.ev.<owner>.<device>.<rest>`` is heard through one subscription to
    ``twinhub.ev.*.*.<rest>``, shared by every notifier with the same ``<rest>``; a message is
    handed to the notifiers of its owner and device whose filter it matches. A gateway holding
    20,000 devices then keeps 3 subscriptions for their commands, not 60,000 (each with its own
    queue and task in nats-py), at the price of hearing the command events of devices it does
    not hold: they are few and small, and the log stays the truth."""

    def __init__(self) -> None:
        self._subs: dict[str, Subscription] = {}
        self._listeners: dict[str, dict[tuple[str, str], dict[JetStreamNotifier, list[str]]]] = {}
        self._lock = asyncio.Lock()

    @staticmethod
    def shape(filter_subject: str) -> tuple[str, tuple[str, str]] | None:
        """``(shared pattern, (owner, device))`` of a per-device filter, else None."""
        tokens = filter_subject.split(".")
        if len(tokens) < 5 or ".".join(tokens[:2]) != PREFIX:
            return None
        owner, device = tokens[2], tokens[3]
        if owner in ("*", ">") or device in ("*", ">"):
            return None
        return ".".join((*tokens[:2], "*", "*", *tokens[4:])), (owner, device)

    @property
    def subscriptions(self) -> int:
        return len(self._subs)

    async def add(self, nc: NatsClient, notifier: JetStreamNotifier, filter_subject: str) -> bool:
        """Listen for ``filter_subject`` on its shared subscription; False if it has no
        per-device shape (the caller subscribes to it alone)."""
        shape = self.shape(filter_subject)
        if shape is None:
            return False
        pattern, key = shape
        async with self._lock:
            if pattern not in self._subs:

                async def deliver(msg: Msg) -> None:
                    self._deliver(pattern, msg)

                self._subs[pattern] = await nc.subscribe(pattern, cb=deliver)
            listeners = self._listeners.setdefault(pattern, {}).setdefault(key, {})
            listeners.setdefault(notifier, []).append(filter_subject)
        notifier.shared.append((pattern, key))
        return True

    def _deliver(self, pattern: str, msg: Msg) -> None:
        tokens = msg.subject.split(".", 4)
        if len(tokens) < 5:
            return
        by_device = self._listeners.get(pattern, {}).get((tokens[2], tokens[3]))
        if not by_device:
            return
        for notifier, filters in by_device.items():
            if any(subject_matches(f, msg.subject) for f in filters):
                notifier.event.set()

    async def remove(self, notifier: JetStreamNotifier) -> None:
        shared, notifier.shared = notifier.shared, []
        unused: list[Subscription] = []
        async with self._lock:
            for pattern, key in shared:
                by_key = self._listeners.get(pattern, {})
                by_key.get(key, {}).pop(notifier, None)
                if key in by_key and not by_key[key]:
                    del by_key[key]
                if not by_key and pattern in self._subs:
                    self._listeners.pop(pattern, None)
                    unused.append(self._subs.pop(pattern))
        for sub in unused:
            with contextlib.suppress(nats.errors.Error, OSError):
                await sub.unsubscribe()


class _BatchAnswer:
    """The answer to one batched direct get: the stored messages, then what ended it."""

    __slots__ = ("done", "end", "msgs")

    def __init__(self) -> None:
        self.msgs: list[Msg] = []
        self.end: Msg | None = None  # None once done: the inbox stopped
        self.done = asyncio.Event()


class _ReplyMux:
    """One wildcard inbox for publish acks and requests: a publish registers a future under a
    token; a batched direct get registers a :class:`_BatchAnswer` collecting several replies."""

    def __init__(self, nc: NatsClient) -> None:
        self._nc = nc
        self._prefix = nc.new_inbox()
        self._futures: dict[str, asyncio.Future[Msg | None]] = {}
        self._batches: dict[str, _BatchAnswer] = {}
        self._counter = 0
        self._sub: Subscription | None = None

    async def start(self) -> None:
        self._sub = await self._nc.subscribe(self._prefix + ".*", cb=self._on_reply)

    async def stop(self) -> None:
        sub, self._sub = self._sub, None
        # Resolved as unanswered (None), not cancelled: a CancelledError would reach a task
        # nobody cancelled.
        _expire(self._futures.values())
        self._futures.clear()
        for answer in self._batches.values():
            answer.done.set()
        self._batches.clear()
        if sub is not None:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()

    def expect(self) -> tuple[str, str, asyncio.Future[Msg | None]]:
        """A reply subject, its token and the future its answer resolves."""
        self._counter += 1
        token = str(self._counter)
        fut: asyncio.Future[Msg | None] = asyncio.get_running_loop().create_future()
        self._futures[token] = fut
        return f"{self._prefix}.{token}", token, fut

    def forget(self, pending: Iterable[tuple[str, asyncio.Future[Msg | None]]]) -> None:
        for token, fut in pending:
            self._futures.pop(token, None)
            if not fut.done():
                fut.cancel()

    def expect_batch(self) -> tuple[str, str, _BatchAnswer]:
        """A reply subject, its token and the answer its replies fill."""
        self._counter += 1
        token = str(self._counter)
        answer = _BatchAnswer()
        self._batches[token] = answer
        return f"{self._prefix}.{token}", token, answer

    def forget_batch(self, token: str) -> None:
        self._batches.pop(token, None)

    async def _on_reply(self, msg: Msg) -> None:
        token = msg.subject[len(self._prefix) + 1 :]
        fut = self._futures.pop(token, None)
        if fut is not None:
            if not fut.done():
                fut.set_result(msg)
            return
        answer = self._batches.get(token)
        if answer is None or answer.done.is_set():
            return
        headers = msg.headers
        if headers is not None and H_SEQUENCE in headers:
            answer.msgs.append(msg)
            if H_NUM_PENDING in headers:
                return
            # A stored message without the batch headers: a server that ignored "batch" (< 2.11)
            # answered with this one message and will send nothing more.
        answer.end = msg
        answer.done.set()


class _PullInbox:
    """The inbox of one pull consumer: deliveries go to a buffer, pull-request end statuses to
    the request they answer (one reply subject per request)."""

    def __init__(self, nc: NatsClient, api: str, stream: str, consumer: str) -> None:
        self._nc = nc
        self._next_subject = f"{api}.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._prefix = nc.new_inbox()
        self._buffer: deque[Msg] = deque()
        self._open: dict[str, str | None] = {}  # request token -> end status once known
        self._wake = asyncio.Event()
        self._counter = 0
        self._sub: Subscription | None = None
        self._stopped = False

    async def start(self) -> None:
        self._sub = await self._nc.subscribe(self._prefix + ".*", cb=self._on_msg)

    async def stop(self) -> list[Msg]:
        """Unsubscribe; return deliveries that arrived but were never handed out."""
        sub, self._sub = self._sub, None
        self._stopped = True
        self._wake.set()  # a collect in progress returns
        if sub is not None:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
        left = list(self._buffer)
        self._buffer.clear()
        return left

    async def _on_msg(self, msg: Msg) -> None:
        if msg.reply and msg.reply.startswith("$JS.ACK."):
            self._buffer.append(msg)
        else:
            status = _status(msg)
            token = msg.subject[len(self._prefix) + 1 :]
            if status != "100" and token in self._open:  # 100: idle heartbeat
                self._open[token] = status or "?"
        self._wake.set()

    def take(self, n: int) -> list[Msg]:
        out: list[Msg] = []
        while self._buffer and len(out) < n:
            out.append(self._buffer.popleft())
        return out

    async def request(self, batch: int, *, no_wait: bool, expires: float | None) -> str:
        self._counter += 1
        token = str(self._counter)
        body: dict[str, Any] = {"batch": batch}
        if no_wait:
            body["no_wait"] = True
        if expires is not None:
            body["expires"] = max(round(expires * _NS), 1_000_000)
        self._open[token] = None
        try:
            await self._nc.publish(
                self._next_subject, json.dumps(body).encode(), reply=f"{self._prefix}.{token}"
            )
        except nats.errors.Error as exc:
            self._open.pop(token, None)
            raise UnavailableError(f"pull request failed: {exc!r}") from exc
        except BaseException:  # cancelled: nobody will collect it (its deliveries are buffered)
            self._open.pop(token, None)
            raise
        return token

    async def collect(
        self, token: str, want: int, deadline: float, *, quiet: float | None = None
    ) -> tuple[list[Msg], str | None]:
        """Deliveries until ``want`` arrived, the request ended (its status is returned), the
        loop-time ``deadline`` passed, the inbox stopped, or -- with ``quiet`` -- nothing more
        came for ``quiet`` seconds after a first delivery (status ``None`` for the last four).

        Cancellation-safe: deliveries stay in the inbox's buffer until the moment they are
        returned (taken with no await between), so a cancellation or a timeout at any of the
        waits leaves them to the next call. Holding them in a local list across a wait lost
        them: JetStream redelivers only after ``ack_wait``, behind newer events."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                have = len(self._buffer)
                if have >= want:
                    return self.take(want), None
                status = self._open.get(token)
                if status is not None:
                    return self.take(want), status
                remaining = deadline - loop.time()
                if remaining <= 0 or self._stopped:
                    return self.take(want), None
                if have and quiet is not None:
                    remaining = min(remaining, quiet)
                self._wake.clear()
                try:
                    # Not asyncio.wait_for: on Python 3.11 it swallows a cancellation that
                    # arrives in the same loop turn as a wake-up, which under a steady stream
                    # made a cancelled or timed-out subscription carry on for good.
                    async with asyncio.timeout(remaining):
                        await self._wake.wait()
                except TimeoutError:
                    if have and quiet is not None:
                        return self.take(want), None
        finally:
            self._open.pop(token, None)


def _create_subject(stream: str, name: str, filters: Sequence[str]) -> str:
    """The consumer create subject: the filtered form for a single filter (permissions can
    then restrict the filter), the plain one for several."""
    if len(filters) == 1:
        return f"CONSUMER.CREATE.{stream}.{name}.{filters[0]}"
    return f"CONSUMER.CREATE.{stream}.{name}"


class JetStreamEventStore:
    """:class:`eventstore.ports.EventStore` on JetStream.

    ``JetStreamEventStore(nc, layout)`` uses a connection the caller owns;
    :meth:`from_url` makes a store that connects (reconnecting forever) on ``__aenter__`` and
    closes on ``__aexit__``. Use it as an async context manager either way.

    ``api_prefix`` is where the JetStream API is reached: ``$JS.API`` for twinhub's services,
    :data:`bus.permissions.APP_JS_PREFIX` for an application (its account imports only the
    consumer operations of its own owner's subjects there; see docs/architecture.md).
    A consumer with a single filter is created on the filtered create subject
    (``CONSUMER.CREATE.<stream>.<name>.<filter>``), which is what lets the server check the
    filter against a client's permissions.
    """

    def __init__(
        self,
        nc: NatsClient | None = None,
        layout: StreamLayout | None = None,
        *,
        timeout: float = 5.0,
        max_atomic_inflight: int = 32,
        api_prefix: str = _API,
        shared_notifiers: bool = False,
    ) -> None:
        self.layout = layout or StreamLayout()
        self.shared_wakeups: Final = _SharedWakeups() if shared_notifiers else None
        """``shared_notifiers``: per-device notifier filters share one subscription per shape
        (see :class:`_SharedWakeups`); needs permission to subscribe to every owner's events
        (a service, never an application)."""
        self.api_prefix = api_prefix
        self._nc = nc
        self._endpoint: NatsEndpoint | None = None
        self._owns_nc = False
        self._timeout = timeout
        self._atomic_slots = asyncio.Semaphore(max_atomic_inflight)
        self._mux: _ReplyMux | None = None
        self._notifiers: set[JetStreamNotifier] = set()
        self._fast_publish = False
        self._conn_log: ConnectionLog | None = None

    @classmethod
    def from_url(
        cls,
        endpoint: NatsEndpoint,
        layout: StreamLayout | None = None,
        *,
        timeout: float = 5.0,
        max_atomic_inflight: int = 32,
        api_prefix: str = _API,
        shared_notifiers: bool = False,
    ) -> JetStreamEventStore:
        """A store that connects to ``endpoint`` (URL and credentials) when entered."""
        store = cls(
            None,
            layout,
            timeout=timeout,
            max_atomic_inflight=max_atomic_inflight,
            api_prefix=api_prefix,
            shared_notifiers=shared_notifiers,
        )
        store._endpoint = endpoint
        return store

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._nc is None:
            assert self._endpoint is not None
            # Not nats.connect: a connect that fails would leave its socket open.
            nc = NatsClient()
            self._conn_log = ConnectionLog(nc, log, "eventstore", str(self._endpoint))
            options: dict[str, Any] = {  # nats-py annotates the times as int; floats work
                **self._endpoint.connect_options(),
                **self._conn_log.callbacks(reconnected=self._on_reconnected),
                "name": "twinhub-eventstore",
                "max_reconnect_attempts": -1,
                "reconnect_time_wait": 0.25,
                "connect_timeout": self._timeout,
                "allow_reconnect": True,
            }
            try:
                await nc.connect(**options)
            except (OSError, nats.errors.Error) as exc:
                self._conn_log.closing()
                with contextlib.suppress(nats.errors.Error, OSError):
                    await nc.close()
                raise UnavailableError(
                    f"cannot connect to NATS at {self._endpoint}: {exc!r}"
                ) from exc
            self._conn_log.connected()
            self._nc = nc
            self._owns_nc = True
        self._fast_publish = fast_publish_supported(self._nc)
        if not self._fast_publish:
            log.warning("nats-py internals changed: publishing through Client.publish (slower)")
        mux = _ReplyMux(self._nc)
        try:
            await mux.start()
        except nats.errors.Error as exc:
            await self._close_nc()
            raise UnavailableError(f"cannot subscribe: {exc!r}") from exc
        self._mux = mux
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        mux, self._mux = self._mux, None
        if mux is not None:
            await mux.stop()
        await self._close_nc()

    async def _close_nc(self) -> None:
        if self._owns_nc and self._nc is not None:
            nc, self._nc = self._nc, None
            self._owns_nc = False
            if self._conn_log is not None:
                self._conn_log.closing()
            # While the server is away nats-py's close can fail flushing to the dead socket
            # (ConnectionResetError): closing must still succeed.
            with contextlib.suppress(nats.errors.Error, OSError):
                await nc.close()

    def _conn(self) -> tuple[NatsClient, _ReplyMux]:
        if self._nc is None or self._mux is None:
            raise EventStoreError("JetStreamEventStore is not open: use `async with`")
        return self._nc, self._mux

    @property
    def connection(self) -> NatsClient:
        return self._conn()[0]

    # -- JetStream API -----------------------------------------------------------------------

    async def request(self, subject: str, payload: bytes, timeout: float) -> Msg:  # noqa: ASYNC109
        """One request/reply on the shared reply inbox; raises nats' ``TimeoutError`` /
        ``NoRespondersError`` like ``nc.request``, which is not used: its ``asyncio.wait_for``
        (Python 3.11) drops a cancellation that arrives with the reply, so a subscription
        cancelled or timed out while acknowledging an event went on running."""
        nc, mux = self._conn()
        reply, token, fut = mux.expect()
        timer = asyncio.get_running_loop().call_later(timeout, _expire, (fut,))
        try:
            await nc.publish(subject, payload, reply=reply)
            msg = await fut
        finally:
            timer.cancel()
            mux.forget([(token, fut)])
        if msg is None:
            raise nats.errors.TimeoutError
        if _status(msg) == "503":
            raise nats.errors.NoRespondersError
        return msg

    async def _api(self, op: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        payload = b"" if body is None else json.dumps(body).encode()
        try:
            msg = await self.request(f"{self.api_prefix}.{op}", payload, self._timeout)
        except nats.errors.NoRespondersError as exc:
            raise UnavailableError(f"JetStream not available ({op})") from exc
        except (nats.errors.Error, OSError) as exc:
            raise UnavailableError(f"JetStream request {op} failed: {exc!r}") from exc
        resp: dict[str, Any] = json.loads(msg.data)
        err = resp.get("error")
        if err is not None:
            raise _api_error(err)
        return resp

    async def provision(self, consumers: Sequence[ConsumerSpec] = ()) -> None:
        cfg = stream_config(self.layout)
        name = self.layout.name
        try:
            await self._api(f"STREAM.CREATE.{name}", cfg)
            log.info("stream %s created or unchanged", name)
        except JetStreamApiError as exc:
            if exc.err_code != _ERR_STREAM_NAME_IN_USE:
                raise
            # A process configured with fewer replicas than the stream has (an admin command
            # with the default settings on a cluster) must not scale the log down: replicas
            # only ever grow here (an operator scales down by hand).
            info = await self._api(f"STREAM.INFO.{name}")
            current = int(info.get("config", {}).get("num_replicas", 1) or 1)
            if current > _replicas(cfg):
                cfg = {**cfg, "num_replicas": current}
            await self._api(f"STREAM.UPDATE.{name}", cfg)
            log.info("stream %s updated (%d replicas)", name, _replicas(cfg))
        for spec in consumers:
            await self._ensure_consumer(spec)

    async def wait_provisioned(self, timeout: float) -> None:  # noqa: ASYNC109
        """Return once the stream exists (created by whoever provisions it: twinhub's twin
        service); :class:`NotProvisionedError` if it still does not after ``timeout`` s."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        delay = 0.05
        while await self._stream_missing():
            if loop.time() + delay > deadline:
                raise NotProvisionedError(
                    f"stream {self.layout.name!r} does not exist after {timeout:g}s"
                    " (it is created by the twin service)"
                )
            if delay >= 0.8:
                log.info("waiting for stream %s to be provisioned", self.layout.name)
            await asyncio.sleep(delay)
            delay = min(2 * delay, 2.0)

    async def _stream_missing(self) -> bool:
        try:
            await self._api(f"STREAM.INFO.{self.layout.name}")
        except NotProvisionedError:
            return True
        return False

    # -- append ------------------------------------------------------------------------------

    async def append(
        self,
        messages: Sequence[NatsMessage],
        *,
        expected_last: int | None = None,
        scope: str | None = None,
    ) -> AppendResult:
        effective_scope = check_append(messages, expected_last, scope, self.layout.subjects)
        if effective_scope is None:
            return await self._append_pipelined(messages)
        assert expected_last is not None
        if len(messages) == 1:
            return await self._append_conditional_one(messages[0], expected_last, effective_scope)
        return await self._append_atomic(messages, expected_last, effective_scope)

    @staticmethod
    def _headers(m: NatsMessage) -> dict[str, str]:
        h = dict(m.headers)
        h[H_MSG_ID] = m.msg_id
        return h

    async def _publish(
        self, items: Sequence[tuple[NatsMessage, dict[str, str], bool]]
    ) -> list[tuple[str, asyncio.Future[Msg | None]]]:
        """Publish in order from this one coroutine (so the order on the wire is the order
        given); return the ack futures of the items that asked for one."""
        nc, mux = self._conn()
        fast = self._fast_publish
        pending: list[tuple[str, asyncio.Future[Msg | None]]] = []
        try:
            for m, headers, want_ack in items:
                reply = ""
                if want_ack:
                    reply, token, fut = mux.expect()
                    pending.append((token, fut))
                if fast:
                    await publish_prevalidated(nc, m.subject, reply, headers, m.data)
                else:
                    await nc.publish(m.subject, m.data, reply=reply, headers=headers)
        except (nats.errors.Error, OSError) as exc:
            mux.forget(pending)
            raise UnavailableError(f"publish failed: {exc!r}") from exc
        return pending

    async def _await_acks(self, pending: list[tuple[str, asyncio.Future[Msg | None]]]) -> list[Msg]:
        # One timer per append resolving the stragglers with None: much cheaper than wait_for,
        # which costs a task and a waiter per call on the hot path.
        _, mux = self._conn()
        futures = [fut for _, fut in pending]
        timer = asyncio.get_running_loop().call_later(self._timeout, _expire, futures)
        try:
            if len(futures) == 1:
                done = [await futures[0]]
            else:
                done = await asyncio.gather(*futures)
        finally:
            timer.cancel()
            mux.forget(pending)
        acks = [m for m in done if m is not None]
        if len(acks) != len(done):
            raise UnavailableError(f"no ack from JetStream within {self._timeout}s")
        return acks

    async def _pub_ack(self, msg: Msg) -> dict[str, Any]:
        """The ack's JSON, or the JetStream error it carries, translated."""
        if _status(msg) == "503":
            if await self._stream_missing():
                raise NotProvisionedError(f"stream {self.layout.name!r} does not exist")
            raise UnavailableError("no JetStream stream answered (not ready?)")
        if not msg.data:
            raise EventStoreError("empty JetStream ack")
        try:
            resp: dict[str, Any] = _decode_ack(msg.data)
        except msgspec.DecodeError as exc:  # once per appended event: msgspec, not json
            raise EventStoreError(f"malformed JetStream ack: {msg.data[:200]!r}") from exc
        return resp

    async def _append_pipelined(self, messages: Sequence[NatsMessage]) -> AppendResult:
        futures = await self._publish([(m, self._headers(m), True) for m in messages])
        acks = await self._await_acks(futures)
        positions: list[int] = []
        duplicates: list[bool] = []
        for msg in acks:
            resp = await self._pub_ack(msg)
            if "error" in resp:
                raise _api_error(resp["error"])
            positions.append(int(resp["seq"]))
            duplicates.append(bool(resp.get("duplicate", False)))
        return AppendResult(positions=tuple(positions), duplicates=tuple(duplicates))

    async def _append_conditional_one(
        self, m: NatsMessage, expected_last: int, scope: str
    ) -> AppendResult:
        headers = self._headers(m)
        headers[H_EXPECTED_LAST_SUBJECT_SEQ] = str(expected_last)
        headers[H_EXPECTED_LAST_SUBJECT_SEQ_SUBJECT] = scope
        (ack,) = await self._await_acks(await self._publish([(m, headers, True)]))
        resp = await self._pub_ack(ack)
        if "error" in resp:
            return await self._resolve_refusal([m], expected_last, scope, resp["error"])
        return AppendResult(
            positions=(int(resp["seq"]),), duplicates=(bool(resp.get("duplicate", False)),)
        )

    async def _append_atomic(
        self, messages: Sequence[NatsMessage], expected_last: int, scope: str
    ) -> AppendResult:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        backoff = 0.005
        while True:
            batch_id = uuid.uuid4().hex
            items: list[tuple[NatsMessage, dict[str, str], bool]] = []
            last = len(messages)
            for i, m in enumerate(messages, start=1):
                h = self._headers(m)
                h[H_BATCH_ID] = batch_id
                h[H_BATCH_SEQ] = str(i)
                if i == 1:
                    h[H_EXPECTED_LAST_SUBJECT_SEQ] = str(expected_last)
                    h[H_EXPECTED_LAST_SUBJECT_SEQ_SUBJECT] = scope
                if i == last:
                    h[H_BATCH_COMMIT] = "1"
                items.append((m, h, i == last))
            async with self._atomic_slots:
                (ack,) = await self._await_acks(await self._publish(items))
            resp = await self._pub_ack(ack)
            err = resp.get("error")
            if err is None:
                end = int(resp["seq"])
                if int(resp.get("count", last)) != last:
                    raise EventStoreError(f"atomic batch stored {resp.get('count')} of {last}")
                return AppendResult(
                    positions=tuple(range(end - last + 1, end + 1)), duplicates=(False,) * last
                )
            if int(err.get("err_code", 0)) == _ERR_BATCH_INCOMPLETE and loop.time() < deadline:
                # The server's cap of open batches per stream was hit (or a message of the batch
                # was lost on a reconnect): nothing was stored, try again with a new batch id.
                log.debug("atomic batch %s refused as incomplete, retrying", batch_id)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 0.2)
                continue
            return await self._resolve_refusal(messages, expected_last, scope, err)

    async def _resolve_refusal(
        self,
        messages: Sequence[NatsMessage],
        expected_last: int,
        scope: str,
        err: dict[str, Any],
    ) -> AppendResult:
        """A conditional append was refused. If it is the retry of one that was stored, answer
        with the stored positions as duplicates; else the refusal stands."""
        err_code = int(err.get("err_code", 0))
        if err_code not in (_ERR_WRONG_LAST_SEQUENCE, _ERR_BATCH_DUPLICATE_ID):
            raise _api_error(err)
        found = await self._find_recent(messages)
        if len(found) == len(messages):
            return AppendResult(
                positions=tuple(found[m.msg_id] for m in messages),
                duplicates=(True,) * len(messages),
            )
        if found:
            raise InvalidAppendError(
                "some messages of this conditional append were appended before, others not"
            )
        if err_code == _ERR_BATCH_DUPLICATE_ID:
            # Ids known to the server's window but not found on these subjects: stored on other
            # subjects under the same ids. Never written twice; the caller must pick new ids.
            raise InvalidAppendError("message ids already used by other messages")
        match = _WRONG_LAST.search(str(err.get("description", "")))
        raise ConcurrencyError(scope, expected_last, int(match.group(1)) if match else None)

    async def _find_recent(self, messages: Sequence[NatsMessage]) -> dict[str, int]:
        """Positions of ``messages``' ids among the recent messages on their subjects."""
        wanted = {m.msg_id for m in messages}
        window_ns = round(self.layout.duplicate_window * _NS)
        now = time.time_ns()
        # Two windows back: the second one absorbs clock skew between us and the server.
        start_ns = now - 2 * window_ns
        subjects = sorted({m.subject for m in messages})
        found: dict[str, int] = {}
        scan = self._scan(subjects, start_time_ns=start_ns, after=0, end=None)
        async with contextlib.aclosing(scan):
            async for stored in scan:
                mid = stored.message.msg_id
                if mid in wanted and stored.time_ns >= now - window_ns:
                    found[mid] = stored.position
                    if len(found) == len(wanted):
                        break
        return found

    # -- reads -------------------------------------------------------------------------------

    async def last_position(self, scope: str = ALL_EVENTS) -> int:
        if not is_filter_subject(scope):
            raise ValueError(f"not a subject filter: {scope!r}")
        try:
            resp = await self._api(f"STREAM.MSG.GET.{self.layout.name}", {"last_by_subj": scope})
        except JetStreamApiError as exc:
            if exc.err_code == _ERR_NO_MESSAGE:
                return 0
            raise
        return int(resp["message"]["seq"])

    async def _on_reconnected(self) -> None:
        for n in list(self._notifiers):  # messages may have been missed while away
            n.event.set()

    async def notifier(self, filters: Sequence[str]) -> JetStreamNotifier:
        if not filters or not all(map(is_filter_subject, filters)):
            raise ValueError(f"bad filter subjects: {filters!r}")
        nc, _ = self._conn()
        n = JetStreamNotifier(self)
        shared = self.shared_wakeups
        try:
            for f in filters:
                if shared is not None and await shared.add(nc, n, f):
                    continue
                n.subs.append(await nc.subscribe(f, cb=n.on_msg))
        except nats.errors.Error as exc:
            await n.close()
            raise UnavailableError(f"cannot subscribe to {filters}: {exc!r}") from exc
        self._notifiers.add(n)
        return n

    async def last_message(self, scope: str) -> StoredMessage | None:
        if not is_filter_subject(scope):
            raise ValueError(f"not a subject filter: {scope!r}")
        try:
            resp = await self._api(f"STREAM.MSG.GET.{self.layout.name}", {"last_by_subj": scope})
        except JetStreamApiError as exc:
            if exc.err_code == _ERR_NO_MESSAGE:
                return None
            raise
        return _stored_from_api(resp["message"])

    async def read(
        self,
        filter_subject: str = ALL_EVENTS,
        *,
        after: int = 0,
        limit: int | None = None,
    ) -> AsyncGenerator[StoredMessage, None]:
        if not is_filter_subject(filter_subject):
            raise ValueError(f"not a subject filter: {filter_subject!r}")
        if limit is not None and limit < 0:
            raise ValueError("limit must be >= 0")
        if limit == 0:
            return
        want = _DIRECT_BATCH if limit is None else min(_DIRECT_BATCH, limit)
        msgs = await self._direct_batch(filter_subject, after + 1, want)
        if not msgs:
            return
        # What matched when the read started: the first message and the number of matching
        # messages after it, counted by the server before it sent anything.
        total = int((msgs[0].headers or {})[H_NUM_PENDING]) + 1
        left = total if limit is None else min(limit, total)
        msgs = msgs[:left]  # the server may also send what was appended while it answered
        for msg in msgs:
            yield _stored_direct(msg)
        left -= len(msgs)
        if left <= 0:
            return
        # A long read goes on through a consumer: the server streams those at a third of the
        # CPU direct gets cost per message (bench/read_bench.py, full replay). Unread messages
        # removed by limits meanwhile leave room in the count for newer ones: the end of the
        # log now bounds those.
        cursor = int((msgs[-1].headers or {})[H_SEQUENCE])
        end = await self.last_position(filter_subject)
        if end <= cursor:
            return
        scan = self._scan([filter_subject], start_time_ns=None, after=cursor, end=end, limit=left)
        async with contextlib.aclosing(scan):
            async for stored in scan:
                yield stored

    async def _direct_batch(self, filter_subject: str, seq: int, batch: int) -> list[Msg]:
        """Up to ``batch`` stored messages matching ``filter_subject`` from position ``seq`` on,
        in one batched direct get (ADR-31, nats-server >= 2.11): the server sends them, each
        with its subject, position, time and the number still matching after it, then an
        end-of-batch status (or 404 when nothing matches)."""
        nc, mux = self._conn()
        name = self.layout.name
        body = json.dumps({"seq": seq, "next_by_subj": filter_subject, "batch": batch}).encode()
        reply, token, answer = mux.expect_batch()
        try:
            try:
                await nc.publish(f"{self.api_prefix}.DIRECT.GET.{name}", body, reply=reply)
            except (nats.errors.Error, OSError) as exc:
                raise UnavailableError(f"direct get failed: {exc!r}") from exc
            try:
                # asyncio.timeout, not wait_for (Python 3.11 drops a cancellation with it).
                async with asyncio.timeout(self._timeout):
                    await answer.done.wait()
            except TimeoutError:
                raise UnavailableError(
                    f"no answer reading {filter_subject!r} within {self._timeout}s"
                ) from None
        finally:
            mux.forget_batch(token)
        end = answer.end
        if end is None:
            raise UnavailableError(f"store closed while reading {filter_subject!r}")
        headers = end.headers or {}
        if H_SEQUENCE in headers:
            raise EventStoreError(
                "nats-server answered a batched direct get with a single message: "
                "it needs nats-server >= 2.11"
            )
        status = headers.get(_STATUS)
        if status in ("204", "404"):
            return answer.msgs
        if status == "503":
            await self._direct_get_refused()
        description = headers.get("Description", "")
        raise EventStoreError(f"direct get of {filter_subject!r} answered {status} {description}")

    async def _direct_get_refused(self) -> NoReturn:
        """Nobody answered a direct get (503, no responders): say why."""
        info = await self._api(f"STREAM.INFO.{self.layout.name}")  # NotProvisionedError if gone
        if not info.get("config", {}).get("allow_direct", False):
            raise NotProvisionedError(
                f"stream {self.layout.name!r} does not allow direct gets: run provision()"
            )
        raise UnavailableError("no server answered the direct get (stream not ready?)")

    async def _scan(
        self,
        filters: Sequence[str],
        *,
        start_time_ns: int | None,
        after: int,
        end: int | None,
        limit: int | None = None,
    ) -> AsyncGenerator[StoredMessage, None]:
        """Messages matching ``filters`` with position > ``after`` (or from a time), through an
        ephemeral consumer, until ``end``, until nothing is pending, or ``limit`` of them (which
        bounds what the server sends, not just what we yield)."""
        nc, _ = self._conn()
        stream = self.layout.name
        name = "read_" + uuid.uuid4().hex
        cfg = read_consumer_config(name, filters, after, _READ_INACTIVE)
        if start_time_ns is not None:
            cfg["deliver_policy"] = "by_start_time"
            cfg["opt_start_time"] = _rfc3339_ns(start_time_ns)
            cfg.pop("opt_start_seq", None)
        info = await self._api(
            _create_subject(stream, name, filters),
            {"stream_name": stream, "config": cfg, "action": "create"},
        )
        inbox = _PullInbox(nc, self.api_prefix, stream, name)
        try:
            if int(info.get("num_pending", 0)) == 0:
                return
            try:
                await inbox.start()
            except nats.errors.Error as exc:
                raise UnavailableError(f"cannot subscribe: {exc!r}") from exc
            loop = asyncio.get_running_loop()
            left = limit
            while left is None or left > 0:
                batch = _READ_BATCH if left is None else min(_READ_BATCH, left)
                token = await inbox.request(batch, no_wait=True, expires=self._timeout)
                msgs, status = await inbox.collect(token, batch, loop.time() + self._timeout)
                if not msgs:
                    if status is None:
                        raise UnavailableError(f"no answer reading {filters} within the timeout")
                    if status in ("404", "408"):
                        return  # nothing left (messages removed by limits meanwhile)
                    raise EventStoreError(f"read of {filters} ended with status {status}")
                for msg in msgs:
                    stored, meta = _stored(msg)
                    if end is not None and stored.position > end:
                        return
                    yield stored
                    if (end is not None and stored.position >= end) or meta.num_pending == 0:
                        return
                if left is not None:
                    left -= len(msgs)
        finally:
            await inbox.stop()
            with contextlib.suppress(EventStoreError):
                await self._api(f"CONSUMER.DELETE.{stream}.{name}")

    # -- durable consumers ------------------------------------------------------------------

    async def _ensure_consumer(self, spec: ConsumerSpec) -> None:
        stream = self.layout.name
        cfg = durable_consumer_config(spec)
        existing: dict[str, Any] | None
        try:
            existing = (await self._api(f"CONSUMER.INFO.{stream}.{spec.name}"))["config"]
        except JetStreamApiError as exc:
            if exc.err_code != _ERR_CONSUMER_NOT_FOUND:
                raise
            existing = None
        if existing is None:
            try:
                await self._api(
                    _create_subject(stream, spec.name, spec.filter_subjects),
                    {"stream_name": stream, "config": cfg, "action": "create"},
                )
                log.info("consumer %s.%s created", stream, spec.name)
                return
            except JetStreamApiError as exc:
                if exc.err_code != _ERR_CONSUMER_EXISTS:
                    raise
            existing = (await self._api(f"CONSUMER.INFO.{stream}.{spec.name}"))["config"]
        # The start position belongs to the existing consumer; the rest follows the spec.
        for key in ("deliver_policy", "opt_start_seq", "opt_start_time"):
            cfg.pop(key, None)
            if key in existing:
                cfg[key] = existing[key]
        if all(existing.get(k) == v for k, v in cfg.items()) and (
            ("filter_subject" in cfg) == ("filter_subject" in existing)
        ):
            return
        await self._api(
            _create_subject(stream, spec.name, spec.filter_subjects),
            {"stream_name": stream, "config": cfg, "action": "update"},
        )
        log.info("consumer %s.%s updated", stream, spec.name)

    async def consumer(
        self,
        name: str,
        filter_subjects: Sequence[str] = (ALL_EVENTS,),
        *,
        start_after: int = 0,
        ack_wait: float = 30.0,
        max_ack_pending: int = 1000,
        inactive_threshold: float | None = None,
    ) -> JetStreamConsumer:
        spec = ConsumerSpec(
            name=name,
            filter_subjects=tuple(filter_subjects),
            start_after=start_after,
            ack_wait=ack_wait,
            max_ack_pending=max_ack_pending,
            inactive_threshold=inactive_threshold,
        )
        await self._ensure_consumer(spec)
        nc, _ = self._conn()
        consumer = JetStreamConsumer(self, nc, spec)
        await consumer._start()
        return consumer

    async def delete_consumer(self, name: str) -> bool:
        try:
            await self._api(f"CONSUMER.DELETE.{self.layout.name}.{name}")
        except JetStreamApiError as exc:
            if exc.err_code == _ERR_CONSUMER_NOT_FOUND:
                return False
            raise
        return True

    async def _consumer_exists(self, name: str) -> bool:
        try:
            await self._api(f"CONSUMER.INFO.{self.layout.name}.{name}")
        except JetStreamApiError as exc:
            if exc.err_code == _ERR_CONSUMER_NOT_FOUND:
                return False
            raise
        return True


class JetStreamConsumer:
    """An open durable pull consumer. Use from one task at a time (fetches are serialized).

    A fetch may be cancelled (or timed out) at any point without losing a delivery: what
    reached the inbox stays there for the next fetch, and :meth:`close` gives back (naks) what
    was never handed out.
    """

    def __init__(self, store: JetStreamEventStore, nc: NatsClient, spec: ConsumerSpec) -> None:
        self._store = store
        self._nc = nc
        self._spec = spec
        self._inbox = _PullInbox(nc, store.api_prefix, store.layout.name, spec.name)
        self._lock = asyncio.Lock()
        self._closed = False

    @property
    def spec(self) -> ConsumerSpec:
        return self._spec

    async def _start(self) -> None:
        try:
            await self._inbox.start()
        except nats.errors.Error as exc:
            raise UnavailableError(f"cannot subscribe: {exc!r}") from exc

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        left = await self._inbox.stop()
        # Delivered to us but never handed out: give them back now rather than after ack_wait.
        for msg in left:
            with contextlib.suppress(nats.errors.Error, OSError):
                await self._nc.publish(msg.reply, b"-NAK")

    def _deliveries(self, msgs: list[Msg]) -> list[Delivery]:
        out: list[Delivery] = []
        for msg in msgs:
            stored, meta = _stored(msg)
            out.append(Delivery(stored, meta.num_delivered, self, msg.reply))
        return out

    async def _ended(self, status: str | None) -> None:
        if status == "409" or status == "503":
            if not await self._store._consumer_exists(self._spec.name):
                raise ConsumerGoneError(f"consumer {self._spec.name!r} does not exist")
            if status == "503":
                raise UnavailableError("JetStream did not serve the pull request")

    async def fetch(self, max_messages: int, timeout: float) -> list[Delivery]:  # noqa: ASYNC109
        if max_messages < 1:
            raise ValueError("max_messages must be >= 1")
        if self._closed:
            raise EventStoreError(f"consumer {self._spec.name!r} is closed")
        async with self._lock:
            buffered = self._inbox.take(max_messages)
            if buffered:
                return self._deliveries(buffered)
            if not self._nc.is_connected:
                raise UnavailableError("not connected to NATS")
            loop = asyncio.get_running_loop()
            wait = max(0.0, timeout)
            # no_wait + expires: the server waits up to `expires` for a first message, then sends
            # what is there and ends the request at once (404) -- a long poll that never holds
            # messages back. Plain no_wait would be parked while max_ack_pending is reached.
            # Deliveries that arrive after we returned wait in the inbox for the next fetch.
            token = await self._inbox.request(max_messages, no_wait=True, expires=wait)
            msgs, status = await self._inbox.collect(
                token, max_messages, loop.time() + wait + _LONG_POLL_GRACE, quiet=_QUIET
            )
            if msgs:
                return self._deliveries(msgs)
            if status is None and not self._nc.is_connected:
                raise UnavailableError("connection lost during fetch")
            await self._ended(status)
            return []

    async def ack_many(self, deliveries: Iterable[Delivery]) -> None:
        """All but the last acked without waiting for the server's confirmation, the last one
        confirmed: the server handles one connection's acks of a consumer in order, so that
        confirmation comes after the others are recorded. Half the messages of one confirmed ack
        each; an ack lost with a broken connection only means a redelivery (which consumers
        of the log must bear anyway)."""
        ds = list(deliveries)
        if not ds:
            return
        if not self._nc.is_connected:
            raise UnavailableError("not connected to NATS")
        try:
            for d in ds[:-1]:
                reply = d._token  # this adapter's own token: the delivery's reply subject
                assert isinstance(reply, str)
                await self._nc.publish(reply, b"+ACK")
        except (nats.errors.Error, OSError) as exc:
            raise UnavailableError(f"ack not sent: {exc!r}") from exc
        await ds[-1].ack()

    async def _settle(self, reply: object, payload: bytes) -> None:
        assert isinstance(reply, str)
        try:
            await self._store.request(reply, payload, self._store._timeout)
        except nats.errors.NoRespondersError as exc:
            raise ConsumerGoneError(f"consumer {self._spec.name!r} does not exist") from exc
        except (nats.errors.Error, OSError) as exc:
            raise UnavailableError(f"ack not confirmed: {exc!r}") from exc

    async def settle_ack(self, token: object) -> None:
        await self._settle(token, b"+ACK")

    async def settle_nak(self, token: object, delay: float | None) -> None:
        if delay is None or delay <= 0:
            await self._settle(token, b"-NAK")
        else:
            await self._settle(token, b"-NAK " + json.dumps({"delay": round(delay * _NS)}).encode())

"""Pure pieces of the event store: argument checks, value types, JetStream wire formats."""

from __future__ import annotations

import pickle
from typing import Any

import pytest

from eventstore.adapters.jetstream import (
    _parse_rfc3339_ns,
    _ReplyMux,
    _rfc3339_ns,
    _stored_direct,
    _to_nats_message,
    parse_ack_reply,
)
from eventstore.errors import ConcurrencyError, EventStoreError, InvalidAppendError
from eventstore.layout import (
    StreamLayout,
    durable_consumer_config,
    read_consumer_config,
    stream_config,
)
from eventstore.ports import AppendResult, ConsumerSpec, check_append
from proto.message import NatsMessage, StoredMessage

STREAM = ("twinhub.ev.>",)


def m(subject: str = "twinhub.ev.o.d.k.r", msg_id: str = "1", **headers: str) -> NatsMessage:
    return NatsMessage(subject=subject, msg_id=msg_id, data=b"", headers=headers)


def test_parse_ack_reply_v1_and_v2() -> None:
    v1 = parse_ack_reply("$JS.ACK.EVENTS.twin.2.1041.77.1795392925167055946.5")
    assert (v1.stream, v1.consumer, v1.num_delivered, v1.stream_seq, v1.consumer_seq) == (
        "EVENTS",
        "twin",
        2,
        1041,
        77,
    )
    assert (v1.timestamp_ns, v1.num_pending) == (1795392925167055946, 5)
    v2 = parse_ack_reply("$JS.ACK._.ACCHASH.EVENTS.twin.1.9.3.1795392925167055946.0.rnd")
    assert (v2.stream, v2.consumer, v2.stream_seq, v2.num_pending) == ("EVENTS", "twin", 9, 0)
    for bad in ("", "$JS.ACK.a.b", "_INBOX.x.y.z.a.b.c.d.e", "$JS.ACK.S.C.x.1.1.1.1"):
        with pytest.raises(ValueError, match="JetStream ack"):
            parse_ack_reply(bad)


def test_stored_headers_lose_the_logs_own() -> None:
    class FakeMsg:
        subject = "twinhub.ev.o.d.k.r"
        data = b"body"
        headers = {
            "Nats-Msg-Id": "abc",
            "Nats-Batch-Id": "b",
            "nats-expected-last-subject-sequence": "0",
            "ce-type": "t",
        }

    got = _to_nats_message(FakeMsg())  # type: ignore[arg-type]
    assert got == NatsMessage(
        subject="twinhub.ev.o.d.k.r", msg_id="abc", data=b"body", headers={"ce-type": "t"}
    )


def test_rfc3339_ns() -> None:
    assert _rfc3339_ns(1_700_000_000_123_456_789) == "2023-11-14T22:13:20.123456789Z"
    assert _rfc3339_ns(-5) == "1970-01-01T00:00:00.000000000Z"
    # Go's RFC3339Nano (direct get's Nats-Time-Stamp) drops trailing zeros of the fraction.
    for ns in (1_700_000_000_123_456_789, 1_700_000_000_120_000_000, 1_700_000_000_000_000_000):
        go = _rfc3339_ns(ns).rstrip("Z").rstrip("0").rstrip(".") + "Z"
        assert _parse_rfc3339_ns(go) == ns


class FakeMsg:
    def __init__(self, subject: str, headers: dict[str, str] | None, data: bytes = b"") -> None:
        self.subject = subject
        self.headers = headers
        self.data = data


def direct(seq: int, pending: int | None, **extra: str) -> FakeMsg:
    headers = {
        "ce-type": "t",
        "Nats-Msg-Id": f"id{seq}",
        "Nats-Stream": "S",
        "Nats-Subject": "twinhub.ev.o.d.k.r",
        "Nats-Sequence": str(seq),
        "Nats-Time-Stamp": "2023-11-14T22:13:20.12Z",
        "Nats-Last-Sequence": "0",
        **extra,
    }
    if pending is not None:
        headers["Nats-Num-Pending"] = str(pending)
    return FakeMsg("_INBOX.reply", headers, b"body")


def test_stored_direct_reads_position_subject_and_time_from_headers() -> None:
    got = _stored_direct(direct(7, 0, Status="user header"))  # type: ignore[arg-type]
    assert got == StoredMessage(
        position=7,
        message=NatsMessage(
            subject="twinhub.ev.o.d.k.r",
            msg_id="id7",
            data=b"body",
            headers={"ce-type": "t", "Status": "user header"},
        ),
        time_ns=1_700_000_000_120_000_000,
    )


async def test_reply_mux_collects_a_batch_until_its_end() -> None:
    class FakeClient:
        def new_inbox(self) -> str:
            return "_INBOX.x"

    mux = _ReplyMux(FakeClient())  # type: ignore[arg-type]
    on = mux._on_reply
    reply, token, answer = mux.expect_batch()
    other = direct(9, 0)  # for another request: not collected
    await on(other)  # type: ignore[arg-type]
    first, second = direct(1, 1, Status="a user header"), direct(2, 0)
    eob = FakeMsg("", {"Status": "204", "Description": "EOB", "Nats-Num-Pending": "0"})
    late = direct(3, 0)
    for msg in (first, second, eob, late):
        msg.subject = reply
    await on(first)  # type: ignore[arg-type]
    await on(second)  # type: ignore[arg-type]
    assert not answer.done.is_set()
    await on(eob)  # type: ignore[arg-type]
    await on(late)  # type: ignore[arg-type]
    assert answer.done.is_set() and answer.end is eob and answer.msgs == [first, second]
    mux.forget_batch(token)

    # A server that ignores "batch" answers with one message without Nats-Num-Pending: the end.
    reply, token, answer = mux.expect_batch()
    single = FakeMsg(reply, direct(5, None).headers)
    await on(single)  # type: ignore[arg-type]
    assert answer.done.is_set() and answer.end is single and answer.msgs == [single]
    mux.forget_batch(token)

    # Stopping the inbox ends an open batch with no end message (read as "unavailable").
    _, _, answer = mux.expect_batch()
    await mux.stop()
    assert answer.done.is_set() and answer.end is None


def test_check_append_scope_rules() -> None:
    assert check_append([m()], None, None, STREAM) is None
    assert check_append([m(), m(msg_id="2")], 3, None, STREAM) == "twinhub.ev.o.d.k.r"
    assert check_append([m()], 0, "twinhub.ev.*.d.>", STREAM) == "twinhub.ev.*.d.>"
    cases: list[tuple[list[NatsMessage], int | None, str | None, tuple[str, ...]]] = [
        ([], None, None, STREAM),
        ([m(), m(subject="twinhub.ev.o.d.k.x", msg_id="2")], 0, None, STREAM),
        ([m()], None, "twinhub.>", STREAM),
        ([m(msg_id=" 1")], None, None, STREAM),
        ([m(**{"Nats-Expected-Stream": "x"})], None, None, STREAM),
        ([m(**{"x": "a\nb"})], None, None, STREAM),
        ([m()], None, None, ("other.>",)),
    ]
    for messages, expected, scope, stream in cases:
        with pytest.raises(InvalidAppendError):
            check_append(messages, expected, scope, stream)


def test_value_types_validate() -> None:
    with pytest.raises(ValueError, match="equal length"):
        AppendResult(positions=(1,), duplicates=())
    with pytest.raises(ValueError, match="consumer name"):
        ConsumerSpec(name="a.b")
    with pytest.raises(ValueError, match="filter"):
        ConsumerSpec(name="a", filter_subjects=("a..b",))
    with pytest.raises(ValueError, match="ack_wait"):
        ConsumerSpec(name="a", ack_wait=0)
    with pytest.raises(ValueError, match="max_age"):
        StreamLayout(max_age=60, duplicate_window=120)
    with pytest.raises(ValueError, match="stream name"):
        StreamLayout(name="a.b")


def test_concurrency_error_is_typed_and_picklable() -> None:
    err = ConcurrencyError("twinhub.ev.*.d1.>", 3, 7)
    assert isinstance(err, EventStoreError)
    assert isinstance(err, ValueError)
    back = pickle.loads(pickle.dumps(err))
    assert (back.scope, back.expected, back.actual) == (err.scope, 3, 7)
    assert "found 7" in str(err)


def test_stream_config_defaults() -> None:
    cfg: dict[str, Any] = stream_config(StreamLayout())
    assert cfg["name"] == "TWINHUB_EVENTS"
    assert cfg["subjects"] == ["twinhub.ev.>"]
    assert cfg["allow_atomic"] is True
    assert cfg["storage"] == "file"
    assert cfg["discard"] == "old"
    assert cfg["duplicate_window"] == 120 * 10**9
    assert (cfg["max_age"], cfg["max_bytes"], cfg["max_msgs_per_subject"]) == (0, -1, -1)


def test_consumer_configs() -> None:
    durable = durable_consumer_config(ConsumerSpec(name="twin", start_after=10, ack_wait=1.5))
    assert durable["durable_name"] == "twin"
    assert durable["ack_policy"] == "explicit"
    assert durable["ack_wait"] == 1_500_000_000
    assert (durable["deliver_policy"], durable["opt_start_seq"]) == ("by_start_sequence", 11)
    assert durable["filter_subject"] == "twinhub.ev.>"
    assert "inactive_threshold" not in durable  # a durable consumer never expires by default
    temporary = durable_consumer_config(ConsumerSpec(name="sub-1", inactive_threshold=60))
    assert temporary["inactive_threshold"] == 60 * 10**9
    multi = durable_consumer_config(ConsumerSpec(name="t", filter_subjects=("a.>", "b.>")))
    assert multi["filter_subjects"] == ["a.>", "b.>"]
    assert multi["deliver_policy"] == "all"
    read = read_consumer_config("r", ["twinhub.ev.*.d1.>"], 0, 30)
    assert read["ack_policy"] == "none"
    assert read["mem_storage"] is True
    assert read["deliver_policy"] == "all"

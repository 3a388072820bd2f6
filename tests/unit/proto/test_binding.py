from __future__ import annotations

import json

import pytest
from hypothesis import given

from proto import binding, events, subjects
from proto.errors import BindingError
from proto.message import NatsMessage

from .strategies import event_objects


@given(event_objects)
def test_binary_mode_round_trip(event: events.AnyEvent) -> None:
    msg = binding.to_nats(event)
    assert msg.msg_id == event.id
    assert msg.headers["ce-type"] == event.type
    assert subjects.is_valid_subject(msg.subject)
    assert binding.from_nats(msg) == event
    assert binding.from_nats(msg, 42) == event.at(42)


@given(event_objects)
def test_structured_mode_round_trip(event: events.AnyEvent) -> None:
    msg = binding.to_structured(event)
    assert msg.headers["Content-Type"] == "application/cloudevents+json"
    assert json.loads(msg.data)["specversion"] == "1.0"
    assert binding.from_nats(msg) == event


def _online() -> events.AnyEvent:
    return events.Event(
        owner="alice",
        device_id="d1",
        source="/gateway/g1",
        data=events.DeviceOnline(gateway="g1", connection_id="c1", remote_address="[::1]:5"),
    )


def test_sdk_interop() -> None:
    ce = binding.to_cloudevent(_online().at(7))
    assert ce.get_type() == "io.twinhub.device.online.v1"
    assert ce.get_extension("owner") == "alice"
    assert ce.get_extension("sequence") == "7"


def test_unknown_types_are_kept_raw() -> None:
    msg = binding.to_nats(_online())
    headers = dict(msg.headers)
    headers["ce-type"] = "io.twinhub.device.teleported.v3"
    other = NatsMessage(
        subject="twinhub.ev.alice.d1.device-teleported._",
        msg_id=msg.msg_id,
        data=b'{"to":"mars"}',
        headers=headers,
    )
    ev = binding.from_nats(other)
    assert isinstance(ev.data, events.UnknownData)
    assert ev.data.raw == b'{"to":"mars"}'
    assert ev.kind == "device-teleported"
    again = binding.to_nats(ev)
    assert again.data == other.data
    assert again.subject == other.subject


def test_header_names_are_case_insensitive_on_input() -> None:
    msg = binding.to_nats(_online())
    upper = NatsMessage(
        subject=msg.subject,
        msg_id=msg.msg_id,
        data=msg.data,
        headers={k.upper(): v for k, v in msg.headers.items()},
    )
    assert binding.from_nats(upper) == binding.from_nats(msg)


@pytest.mark.parametrize("drop", ["ce-id", "ce-type", "ce-source", "ce-specversion", "ce-time"])
def test_missing_attributes_are_rejected(drop: str) -> None:
    msg = binding.to_nats(_online())
    headers = {k: v for k, v in msg.headers.items() if k != drop}
    with pytest.raises(BindingError):
        binding.from_nats(NatsMessage(msg.subject, msg.msg_id, msg.data, headers))


@pytest.mark.parametrize(
    "body", [b"{", b'{"gateway": 5}', b"[]", b"\xff", b'{"gateway": "\xff\xfe"}']
)
def test_bad_data_is_rejected(body: bytes) -> None:
    msg = binding.to_nats(_online())
    with pytest.raises(BindingError):
        binding.from_nats(NatsMessage(msg.subject, msg.msg_id, body, msg.headers))


def test_bad_structured_body_is_rejected() -> None:
    with pytest.raises(BindingError):
        binding.from_nats(
            NatsMessage(
                "twinhub.ev.a.d.device-online._",
                "x",
                b"nope",
                {"Content-Type": "application/cloudevents+json"},
            )
        )


def test_wrong_specversion_rejected() -> None:
    msg = binding.to_nats(_online())
    headers = dict(msg.headers) | {"ce-specversion": "0.3"}
    with pytest.raises(BindingError):
        binding.from_nats(NatsMessage(msg.subject, msg.msg_id, msg.data, headers))

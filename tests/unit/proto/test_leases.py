"""The gateway lease contract (proto.leases): subjects, connection ids, records."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from eventstore.ports import subject_matches
from proto.errors import LeaseError
from proto.leases import (
    ALL_LEASES,
    GATEWAY_SUBJECTS,
    TWIN_SUBJECTS,
    LeaseEntry,
    LeaseRecord,
    LeaseState,
    Writer,
    connection_id,
    decode_entry,
    gateway_scope,
    instance_of,
    instance_scope,
    latest_per_instance,
    lease_subject,
    new_instance_id,
)
from proto.message import NatsMessage, StoredMessage

AT = datetime(2026, 1, 1, tzinfo=UTC)


def stored(subject: str, record: LeaseRecord | bytes, position: int = 1) -> StoredMessage:
    data = record if isinstance(record, bytes) else record.encode()
    return StoredMessage(position, NatsMessage(subject, f"m{position}", data), 0)


def held(gateway: str = "gw-1", instance: str = "a1", lease: float = 3.0) -> LeaseRecord:
    return LeaseRecord(
        state=LeaseState.HELD, gateway=gateway, instance=instance, at=AT, lease=lease
    )


def test_subjects_and_scopes() -> None:
    gw = lease_subject(Writer.GATEWAY, "gw.1", "a1")
    tw = lease_subject(Writer.TWIN, "gw.1", "a1")
    assert gw == "twinhub.lease.gw.gw~2E1.a1"
    assert tw == "twinhub.lease.twin.gw~2E1.a1"
    scope = instance_scope("gw.1", "a1")
    assert subject_matches(scope, gw) and subject_matches(scope, tw)
    assert not subject_matches(scope, lease_subject(Writer.GATEWAY, "gw.1", "a2"))
    assert subject_matches(gateway_scope("gw.1"), lease_subject(Writer.TWIN, "gw.1", "zz"))
    assert not subject_matches(gateway_scope("gw.1"), lease_subject(Writer.TWIN, "gw.2", "a1"))
    assert subject_matches(GATEWAY_SUBJECTS, gw) and not subject_matches(GATEWAY_SUBJECTS, tw)
    assert subject_matches(TWIN_SUBJECTS, tw) and not subject_matches(TWIN_SUBJECTS, gw)
    assert subject_matches(ALL_LEASES, gw) and subject_matches(ALL_LEASES, tw)
    with pytest.raises(LeaseError):
        lease_subject(Writer.GATEWAY, "", "a1")
    with pytest.raises(LeaseError):
        instance_scope("gw", "a.b")
    with pytest.raises(LeaseError):
        gateway_scope("")


def test_connection_ids_carry_their_instance() -> None:
    instance = new_instance_id()
    assert len(instance) == 16 and instance != new_instance_id()
    cid = connection_id(instance, "f00d")
    assert cid == f"{instance}.f00d"
    assert instance_of(cid) == instance
    # ids of gateways from before leases, and malformed ones, belong to no instance
    for other in ("f00d", ".f00d", f"{instance}.", "a b.c", ""):
        assert instance_of(other) is None, other
    with pytest.raises(LeaseError):
        connection_id("not one", "x")


def test_decode_entry() -> None:
    subject = lease_subject(Writer.GATEWAY, "gw.1", "a1")
    entry = decode_entry(stored(subject, held("gw.1"), position=7))
    assert entry == LeaseEntry(Writer.GATEWAY, "gw.1", "a1", 7, held("gw.1"))
    assert entry.key == ("gw.1", "a1")
    assert LeaseRecord.__struct_config__.frozen


@pytest.mark.parametrize(
    ("subject", "body"),
    [
        ("twinhub.lease.gw.gw-1", held().encode()),  # too short
        ("twinhub.other.gw.gw-1.a1", held().encode()),
        ("twinhub.lease.xx.gw-1.a1", held().encode()),  # unknown writer
        ("twinhub.lease.gw.gw-1.a1", b"{not json"),
        ("twinhub.lease.gw.gw-1.a1", b'{"state": "held"}'),  # fields missing
        (
            "twinhub.lease.gw.gw-1.a1",
            b'{"state": "gone", "gateway": "gw-1", "instance": "a1", "at": "2026-01-01T00:00:00Z"}',
        ),
        # a state its writer may not write: the twin never holds, the gateway never reaps
        ("twinhub.lease.twin.gw-1.a1", held().encode()),
        (
            "twinhub.lease.gw.gw-1.a1",
            LeaseRecord(state=LeaseState.REAPED, gateway="gw-1", instance="a1", at=AT).encode(),
        ),
        # the record of another instance
        ("twinhub.lease.gw.gw-1.a2", held().encode()),
        ("twinhub.lease.gw.gw-2.a1", held().encode()),
    ],
)
def test_decode_entry_refuses(subject: str, body: bytes) -> None:
    with pytest.raises(LeaseError):
        decode_entry(stored(subject, body))


def test_latest_per_instance_is_the_highest_position() -> None:
    def entry(writer: Writer, instance: str, position: int, state: LeaseState) -> LeaseEntry:
        record = LeaseRecord(state=state, gateway="gw", instance=instance, at=AT)
        return LeaseEntry(writer, "gw", instance, position, record)

    a_held = entry(Writer.GATEWAY, "a", 3, LeaseState.HELD)
    a_claim = entry(Writer.TWIN, "a", 5, LeaseState.REAPING)
    b_held = entry(Writer.GATEWAY, "b", 9, LeaseState.HELD)
    b_old_claim = entry(Writer.TWIN, "b", 4, LeaseState.REAPED)
    got = latest_per_instance([a_claim, b_held, a_held, b_old_claim])
    assert got == {("gw", "a"): a_claim, ("gw", "b"): b_held}

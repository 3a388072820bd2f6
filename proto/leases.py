"""Gateway leases: the contract between the gateway instances and the twin service.

Every gateway *instance* (a gateway id plus a random id of the run, :func:`new_instance_id`)
holds a lease in the JetStream stream :data:`LEASE_STREAM` (one message per subject, the last
one kept). The gateway writes on::

    twinhub.lease.gw.<gateway>.<instance>      held, renewed every lease / 3; released on a
                                               clean stop; superseded by the next run of the
                                               same gateway id
    twinhub.lease.twin.<gateway>.<instance>    the twin service's claim: reaping, then reaped

Both subjects of an instance form its **scope** (:func:`instance_scope`): every write is a
conditional append on it (expected last sequence = the last one the writer saw), so a
renewal that comes after a claim fails (the gateway knows it lost its lease) and of two twin
instances claiming one lapse, one wins.

A connection's id carries its instance (:func:`connection_id`): ``<instance>.<local id>``.
The twin's ``connection.connection_id`` therefore says which run of a gateway holds a device,
and a device that reconnected (through another gateway or the next run of the same one) has
another connection id.

``device-offline`` events the twin service appends for the devices of a lost instance have
the reason :data:`GATEWAY_LOST`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Final

import msgspec

from proto.errors import LeaseError
from proto.message import StoredMessage
from proto.subjects import escape_token, unescape_token

__all__ = [
    "ALL_LEASES",
    "GATEWAY_LOST",
    "GATEWAY_SUBJECTS",
    "LEASE_STREAM",
    "TWIN_SUBJECTS",
    "LeaseEntry",
    "LeaseRecord",
    "LeaseState",
    "Writer",
    "connection_id",
    "decode_entry",
    "gateway_scope",
    "instance_of",
    "instance_scope",
    "latest_per_instance",
    "lease_subject",
    "new_instance_id",
]

LEASE_STREAM: Final = "TWINHUB_LEASES"
PREFIX: Final = "twinhub.lease"
ALL_LEASES: Final = PREFIX + ".>"
GATEWAY_SUBJECTS: Final = PREFIX + ".gw.>"
TWIN_SUBJECTS: Final = PREFIX + ".twin.>"

GATEWAY_LOST: Final = "gateway lost"
"""The reason of a ``device-offline`` the twin service appends for a lost gateway instance."""

_INSTANCE: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")


class Writer(StrEnum):
    """Who writes a lease subject (its third token)."""

    GATEWAY = "gw"
    TWIN = "twin"


class LeaseState(StrEnum):
    HELD = "held"  # the instance runs (gateway)
    RELEASED = "released"  # it stopped cleanly (gateway)
    SUPERSEDED = "superseded"  # a newer run of the same gateway id started (gateway)
    REAPING = "reaping"  # a twin instance is closing its sessions (twin)
    REAPED = "reaped"  # done (twin)


WRITTEN_BY: Final[dict[LeaseState, Writer]] = {
    LeaseState.HELD: Writer.GATEWAY,
    LeaseState.RELEASED: Writer.GATEWAY,
    LeaseState.SUPERSEDED: Writer.GATEWAY,
    LeaseState.REAPING: Writer.TWIN,
    LeaseState.REAPED: Writer.TWIN,
}


class LeaseRecord(
    msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, forbid_unknown_fields=False
):
    """One lease message's body (JSON).

    ``lease``: in ``held``, the term in seconds the holder asks for (it renews every third of
    it). ``by``: who wrote it (the instance, the newer instance that superseded it, the twin
    instance that claims it). ``cause``: why a claim was made. ``devices``: in ``reaped``,
    how many devices were marked offline.
    """

    state: LeaseState
    gateway: str
    instance: str
    at: datetime
    lease: float = 0.0
    by: str = ""
    cause: str = ""
    devices: int = 0

    def encode(self) -> bytes:
        return _encoder.encode(self)


_encoder: Final = msgspec.json.Encoder()
_decoder: Final = msgspec.json.Decoder(LeaseRecord)


def new_instance_id() -> str:
    """A random id for one run of a gateway (64 bits, hex)."""
    return os.urandom(8).hex()


def _instance_token(instance: str) -> str:
    if not _INSTANCE.fullmatch(instance):
        raise LeaseError(f"bad gateway instance id {instance!r}")
    return instance


def lease_subject(writer: Writer, gateway: str, instance: str) -> str:
    if not gateway:
        raise LeaseError("the gateway id must not be empty")
    return f"{PREFIX}.{writer.value}.{escape_token(gateway)}.{_instance_token(instance)}"


def instance_scope(gateway: str, instance: str) -> str:
    """Both subjects of one instance: the scope of its conditional writes."""
    if not gateway:
        raise LeaseError("the gateway id must not be empty")
    return f"{PREFIX}.*.{escape_token(gateway)}.{_instance_token(instance)}"


def gateway_scope(gateway: str) -> str:
    """Every instance of one gateway id."""
    if not gateway:
        raise LeaseError("the gateway id must not be empty")
    return f"{PREFIX}.*.{escape_token(gateway)}.*"


def connection_id(instance: str, local: str) -> str:
    """The id of connection ``local`` of ``instance``, as events and the twin carry it."""
    return f"{_instance_token(instance)}.{local}"


def instance_of(connection_id: str) -> str | None:
    """The instance part of a connection id (None: not one of :func:`connection_id`)."""
    instance, sep, local = connection_id.partition(".")
    if not sep or not local or not _INSTANCE.fullmatch(instance):
        return None
    return instance


@dataclass(frozen=True, slots=True)
class LeaseEntry:
    """A lease message as read from the stream: who wrote it, where, and what."""

    writer: Writer
    gateway: str
    instance: str
    position: int
    record: LeaseRecord

    @property
    def key(self) -> tuple[str, str]:
        return self.gateway, self.instance


def decode_entry(stored: StoredMessage) -> LeaseEntry:
    """Parse a stored lease message; :class:`LeaseError` if it is not one (wrong subject, a
    body that does not decode, a state its writer may not write, another instance's record)."""
    parts = stored.message.subject.split(".")
    if len(parts) != 5 or ".".join(parts[:2]) != PREFIX:
        raise LeaseError(f"not a lease subject: {stored.message.subject!r}")
    try:
        writer = Writer(parts[2])
        gateway = unescape_token(parts[3])
        instance = _instance_token(parts[4])
        record = _decoder.decode(stored.message.data)
    except (ValueError, msgspec.DecodeError) as e:
        raise LeaseError(f"bad lease message on {stored.message.subject!r}: {e}") from None
    if WRITTEN_BY[record.state] is not writer:
        raise LeaseError(f"state {record.state} on {stored.message.subject!r}")
    if (record.gateway, record.instance) != (gateway, instance):
        raise LeaseError(f"record of {record.gateway}/{record.instance} on another subject")
    return LeaseEntry(writer, gateway, instance, stored.position, record)


def latest_per_instance(entries: Iterable[LeaseEntry]) -> dict[tuple[str, str], LeaseEntry]:
    """The newest entry (highest position) of each instance: its current state."""
    out: dict[tuple[str, str], LeaseEntry] = {}
    for e in entries:
        held = out.get(e.key)
        if held is None or e.position > held.position:
            out[e.key] = e
    return out

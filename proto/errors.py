"""The exception tree of :mod:`proto`."""

from __future__ import annotations


class ProtoError(Exception):
    """Root of every error raised by :mod:`proto`."""


class CodecError(ProtoError, ValueError):
    """A payload could not be decoded or encoded in the requested content format."""


class SubjectError(ProtoError, ValueError):
    """A subject or subject token is not valid under twinhub's grammar."""


class BindingError(ProtoError, ValueError):
    """A NATS message is not a valid CloudEvent under twinhub's binding."""


class LeaseError(ProtoError, ValueError):
    """A gateway lease subject, instance id or record is not valid (see :mod:`proto.leases`)."""

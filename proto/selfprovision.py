"""Self-provisioning of simple devices (ThingsBoard's ``POST /api/v1/provision``): the contract
between the gateway, which relays a device's request, and the twin service, which checks the
provision key and secret and provisions.

The gateway sends a :class:`ProvisionRequest` as a NATS request on :data:`SUBJECT`; one twin
instance (a queue group) answers a :class:`ProvisionReply`. Only the gateway role may publish
on the subject and only the twin role subscribes (bus/permissions.py); applications reach
nothing of it (APPS imports none of it). The secret travels on the bus inside the TWINHUB
account only, and is checked by the twin service, so a gateway alone cannot mint devices.

``status`` is ThingsBoard's (``SUCCESS``, ``NOT_FOUND``: no profile has that key and secret,
``FAILURE``: the key and secret were right but the device could not be provisioned, with
``error_msg``), plus ``UNAVAILABLE``: the twin service could not decide now (its log or
registry unreachable; the gateway answers 5.03).
"""

from __future__ import annotations

from typing import Final, Literal

import msgspec

__all__ = [
    "MAX_FIELD",
    "QUEUE",
    "SUBJECT",
    "ProvisionReply",
    "ProvisionRequest",
    "Status",
    "decode_reply",
    "decode_request",
    "encode",
]

SUBJECT: Final = "twinhub.svc.provision"
QUEUE: Final = "twinhub-twin-provision"
MAX_FIELD: Final = 256  # characters of a device name, key or secret

Status = Literal["SUCCESS", "NOT_FOUND", "FAILURE", "UNAVAILABLE"]


class ProvisionRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=False):
    """A device's request as the gateway parsed it. ``credentials_type``: the request's
    ``credentialsType`` ("" when absent); ``supplied``: the names of credentials the device
    brought itself (``token``, ``hash``, ``username``...), which are not supported."""

    device_name: str
    key: str
    secret: str
    credentials_type: str = ""
    supplied: tuple[str, ...] = ()
    remote: str = ""  # the device's address, for the logs
    gateway: str = ""

    def __repr__(self) -> str:  # the secret never in a repr (logs, tracebacks)
        return (
            f"ProvisionRequest(device_name={self.device_name!r}, key={self.key!r}, "
            f"remote={self.remote!r}, gateway={self.gateway!r})"
        )


class ProvisionReply(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    status: Status
    credentials_value: str = ""  # SUCCESS: the device's access token
    device_id: str = ""
    error_msg: str = ""


_requests: Final = msgspec.json.Decoder(ProvisionRequest)
_replies: Final = msgspec.json.Decoder(ProvisionReply)


def encode(message: ProvisionRequest | ProvisionReply) -> bytes:
    return msgspec.json.encode(message)


def decode_request(data: bytes) -> ProvisionRequest:
    """Raises ``ValueError`` (``msgspec.DecodeError``/``ValidationError``) for a bad one."""
    return _requests.decode(data)


def decode_reply(data: bytes) -> ProvisionReply:
    return _replies.decode(data)

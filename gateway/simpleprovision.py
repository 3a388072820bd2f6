"""Self-provisioning of simple devices (ThingsBoard's ``POST /api/v1/provision``): the gateway's
sans-IO core.

A device without a token posts ``{"deviceName": ..., "provisionDeviceKey": ...,
"provisionDeviceSecret": ...}`` (JSON, lenient as every simple-device payload, or CBOR). The
gateway does not know the secrets: it parses the request here (:meth:`ProvisionCore.accept`),
relays it to the twin service, which checks the key and secret and provisions
(:mod:`proto.selfprovision`), and renders the twin's answer (:meth:`ProvisionCore.reply`):

* ``SUCCESS``: 2.01 with ``{"status": "SUCCESS", "credentialsType": "ACCESS_TOKEN",
  "credentialsValue": <token>}``;
* ``FAILURE`` (the key and secret were right): 4.00 with ``{"status": "FAILURE", "errorMsg":
  ...}`` (a name provisioned already, credentials the device brought itself);
* ``NOT_FOUND`` (no profile with that key and secret): 4.00 with ``{"status": "NOT_FOUND"}``
  only when that body is no larger than the request's payload, else 4.00 without payload;
* the twin service unreachable or undecided: 5.03.

The codes are those of ThingsBoard's CoAP transport since 3.4 (``CoapTransportResource``:
2.01 for ``SUCCESS``, 4.00 with the status body for anything else; earlier releases answered
2.05 to all), so firmware that checks either the code or the body's ``status`` works.

Anti-reflection: a UDP source address can be spoofed, and until the twin found the key and
secret right nothing is validated, so no reply before that is larger than its request: a
malformed request gets 4.00 **without** a diagnostic (unlike a token's request, which has one
once the token is known), a wrong method 4.05, too large a payload 4.13 with Size1, all
empty; ``NOT_FOUND`` as above (a request that carries the three fields is always longer than
the 22 bytes of that body, so in practice the body goes out). Requests are rate-limited per
source address and per provision key (:class:`ProvisionConfig`; 4.29 with Max-Age, empty),
so that the endpoint can be used neither to flood the twin service nor to guess secrets fast.

The answer is in the request's format: CBOR for a CBOR request (or ``Accept: 60``), JSON
otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Final, Protocol

from gateway.errors import BadRequest
from gateway.simple import CBOR, JSON, Reply, SimpleRequest, TokenBuckets, decode_payload
from proto import codecs
from proto.selfprovision import MAX_FIELD, ProvisionReply, ProvisionRequest

__all__ = [
    "SUPPLIED_CREDENTIALS",
    "ProvisionConfig",
    "ProvisionCore",
    "Provisioner",
    "source_of",
]

MAX_REQUEST: Final = 2048  # bytes of a provisioning request's payload
SUPPLIED_CREDENTIALS: Final = ("token", "hash", "clientId", "username", "password")
"""Fields of ThingsBoard's requests with credentials the device brings itself (not supported)."""


@dataclass(frozen=True, slots=True)
class ProvisionConfig:
    rate: float = 1.0
    """Requests per second per source address, and per provision key (each a bucket)."""
    burst: int = 5
    """Requests at once, per source address and per provision key."""
    max_buckets: int = 10_000
    """Sources and keys tracked at once (least recently used forgotten first)."""

    def __post_init__(self) -> None:
        if not self.rate > 0:
            raise ValueError("rate must be > 0")
        if self.burst < 1:
            raise ValueError("burst must be >= 1")
        if self.max_buckets < 1:
            raise ValueError("max_buckets must be >= 1")


def source_of(remote: str) -> str:
    """The address of ``host:port`` / ``[v6]:port`` (the port varies: not part of a source)."""
    host, sep, port = remote.rpartition(":")
    if not sep or not port.isdigit():
        return remote
    return host


def _string(obj: dict[str, Any], name: str) -> str:
    value = obj.get(name)
    if value is None:
        return ""
    if not isinstance(value, str) or len(value) > MAX_FIELD:
        raise BadRequest(name)
    return value


class ProvisionCore:
    """The decisions of ``/api/v1/provision``; one per gateway (it holds the rate buckets)."""

    def __init__(self, gateway_id: str, config: ProvisionConfig | None = None) -> None:
        self.gateway_id = gateway_id
        self.config = c = config or ProvisionConfig()
        self.sources = TokenBuckets(c.rate, c.burst, c.max_buckets)
        self.keys = TokenBuckets(c.rate, c.burst, c.max_buckets)

    def accept(self, req: SimpleRequest, now: float) -> ProvisionRequest | Reply:
        """The request to relay to the twin service, or the reply at once (all without
        payload: nothing is validated yet)."""
        if req.method != "POST":
            return Reply("4.05")
        size = req.declared_size if req.declared_size is not None else len(req.payload)
        if size > MAX_REQUEST:
            return Reply("4.13", size1=MAX_REQUEST)
        if (refused := self._take(self.sources, source_of(req.remote), now)) is not None:
            return refused
        try:
            value = decode_payload(req.payload, req.content_format)
            if not isinstance(value, dict):
                raise BadRequest("not an object")
            key = _string(value, "provisionDeviceKey")
            secret = _string(value, "provisionDeviceSecret")
            name = _string(value, "deviceName")
            credentials_type = _string(value, "credentialsType")
        except BadRequest:
            return Reply("4.00")
        if not key or not secret:
            return Reply("4.00")
        if (refused := self._take(self.keys, key, now)) is not None:
            return refused
        return ProvisionRequest(
            device_name=name,
            key=key,
            secret=secret,
            credentials_type=credentials_type,
            supplied=tuple(n for n in SUPPLIED_CREDENTIALS if value.get(n) is not None),
            remote=req.remote,
            gateway=self.gateway_id,
        )

    @staticmethod
    def _take(buckets: TokenBuckets, key: str, now: float) -> Reply | None:
        wait = buckets.take(key, now)
        if wait > 0:
            return Reply("4.29", max_age=max(1, math.ceil(wait)))
        return None

    @staticmethod
    def reply(req: SimpleRequest, answer: ProvisionReply | None) -> Reply:
        """The device's reply for the twin service's ``answer`` (None: none came)."""
        if answer is None or answer.status == "UNAVAILABLE":
            return Reply("5.03")
        body: dict[str, Any] = {"status": answer.status}
        if answer.status == "SUCCESS":
            body["credentialsType"] = "ACCESS_TOKEN"
            body["credentialsValue"] = answer.credentials_value
        elif answer.status == "FAILURE":
            body["errorMsg"] = answer.error_msg
        if req.accept in (JSON, CBOR):
            fmt = req.accept
        else:
            fmt = CBOR if req.content_format == CBOR else JSON
        payload = codecs.encode(body, fmt)
        if answer.status == "NOT_FOUND" and len(payload) > len(req.payload):
            return Reply("4.00")  # not validated: nothing larger than the request
        return Reply("2.01" if answer.status == "SUCCESS" else "4.00", payload, fmt)


class Provisioner(Protocol):
    """The port to the twin service's self-provisioning (:mod:`proto.selfprovision`): its
    answer, or None when none came in time (the twin service unreachable: 5.03)."""

    async def provision(self, request: ProvisionRequest) -> ProvisionReply | None: ...

"""The events a :class:`~gateway.wire.connection.CoapTcpConnection` reports: frozen values
(``msgspec.Struct``: a notification makes one per message, a frozen dataclass costs ten times
as much to make).

Handles name the exchanges: :class:`Outgoing` for a request we sent (its token), :class:`Incoming`
for one the peer sent (its token and a serial, since a peer may reuse a token once its exchange
ended). Messages are :class:`gateway.adapters.coap_frames.Frame` values as parsed: options in
wire order, raw bytes.
"""

from __future__ import annotations

from enum import Enum

import msgspec

from gateway.adapters.coap_frames import Frame


class _Value(msgspec.Struct, frozen=True, gc=False):
    """Frozen, and cheap to make (a notification makes one per message); ``gc=False``: they
    hold frames, bytes and strings, never a cycle."""


class Outgoing(_Value, frozen=True, gc=False):
    """A request we sent; ``observe`` when it registers an observation (Observe=0)."""

    token: bytes
    observe: bool = False


class Incoming(_Value, frozen=True, gc=False):
    """A request the peer sent; ``observe`` when it asks to observe (Observe=0)."""

    token: bytes
    serial: int
    observe: bool = False


class FailureKind(Enum):
    """Why the connection failed (a :class:`ConnectionFailed`); the connection is closed."""

    FORMAT_ERROR = "format-error"  # RFC 8323 section 3.2: we sent Abort
    TOO_LARGE = "too-large"  # above our Max-Message-Size: we sent Abort
    BAD_SIGNAL = "bad-signal"  # a signalling message we cannot accept: we sent Abort
    PING_TIMEOUT = "ping-timeout"  # no Pong in time: we sent Abort
    OPENING_TIMEOUT = "opening-timeout"  # no CSM nor request in time: we sent Abort
    MESSAGE_TIMEOUT = "message-timeout"  # a message begun and not completed in time
    TRUNCATED = "truncated"  # the peer closed in the middle of a message
    WRITE_BUFFER = "write-buffer"  # the peer does not read: the driver aborted the transport


class RequestReceived(_Value, frozen=True, gc=False):
    handle: Incoming
    frame: Frame


class RequestRefused(_Value, frozen=True, gc=False):
    """A request the connection answered itself (4.02 Bad Option / 5.05, RFC 7252 5.4); for logs."""

    frame: Frame
    code: int
    diagnostic: str


class ResponseReceived(_Value, frozen=True, gc=False):
    """The response to ``handle``; ``last`` unless it established an observation (then
    ``observe`` holds its sequence number and notifications follow)."""

    handle: Outgoing
    frame: Frame
    last: bool
    observe: int | None = None


class NotificationReceived(_Value, frozen=True, gc=False):
    """A notification of the observation ``handle``; ``fresh`` per RFC 7641 section 3.4."""

    handle: Outgoing
    frame: Frame
    seq: int
    fresh: bool


class RequestTimedOut(_Value, frozen=True, gc=False):
    handle: Outgoing


class CsmReceived(_Value, frozen=True, gc=False):
    """The peer's capabilities (RFC 8323 section 5.3); ``max_message_size`` as now in force."""

    max_message_size: int
    block_wise: bool


class PingReceived(_Value, frozen=True, gc=False):
    token: bytes
    custody: bool


class PongReceived(_Value, frozen=True, gc=False):
    token: bytes


class ReleaseReceived(_Value, frozen=True, gc=False):
    """RFC 8323 section 5.5: send no new request; the peer closes after the pending ones."""

    alternative_addresses: tuple[str, ...]
    hold_off: int | None


class AbortReceived(_Value, frozen=True, gc=False):
    """RFC 8323 section 5.6: the connection is closed."""

    diagnostic: str
    bad_csm_option: int | None


class ConnectionFailed(_Value, frozen=True, gc=False):
    """We ended the connection for ``kind`` (and sent Abort with ``diagnostic`` where we could)."""

    kind: FailureKind
    diagnostic: str


class ConnectionClosed(_Value, frozen=True, gc=False):
    """The peer closed the stream (end of file) between messages."""

    reason: str


Event = (
    RequestReceived
    | RequestRefused
    | ResponseReceived
    | NotificationReceived
    | RequestTimedOut
    | CsmReceived
    | PingReceived
    | PongReceived
    | ReleaseReceived
    | AbortReceived
    | ConnectionFailed
    | ConnectionClosed
)

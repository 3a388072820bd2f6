"""One CoAP-over-TCP / TLS connection (RFC 8323) as a sans-IO state machine.

Inputs: :meth:`CoapTcpConnection.receive_data` (bytes, split anyhow), :meth:`~CoapTcpConnection.
receive_eof`, :meth:`~CoapTcpConnection.tick` (time is an input, nothing here reads a clock) and
the calls of the layer above (requests, responses, observations, Ping, Release, Abort). Outputs:
:meth:`~CoapTcpConnection.events` (frozen values of :mod:`gateway.wire.events`) and
:meth:`~CoapTcpConnection.data_to_send`. The connection is symmetric: the same class serves the
gateway and, in tests, the device.

It owns what RFC 8323 puts on a connection: our CSM first and the peer's when it comes (never
waited for: iotivity-lite sends none, W2), the Max-Message-Size both ways (ours in the deframer,
a larger message aborts with 7.05; the peer's refuses a request with :class:`MessageTooLarge`,
W20, and an answer once the peer's CSM stated a limit), Ping / Pong (answered here; a Ping of
ours without Pong in time fails the connection),
Release and Abort with their options, tokens (a counter: never reused on a connection), request
deadlines, observations and their sequence numbers (RFC 7641 section 3.4), the option rules of
requests (4.02 / 5.05 answered here, W14) and message format errors (Abort with a diagnostic,
then closed; W13, W15). When the connection ends (``ConnectionFailed``, ``ConnectionClosed``,
``AbortReceived``, or our own ``abort`` / ``close``) every exchange ends with it: the layer above
fails whatever it still awaited.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from enum import Enum
from typing import Final

from gateway.adapters import coap_frames as frames
from gateway.adapters.coap_frames import Frame
from gateway.wire import events as ev
from gateway.wire import observe as obs
from gateway.wire import signals as sig
from gateway.wire.errors import ConnectionNotOpen, MessageTooLarge, UnknownHandle
from gateway.wire.options import decode_uint, encode_uint, option_value

BAD_OPTION: Final = 130  # 4.02
PROXYING_NOT_SUPPORTED: Final = 165  # 5.05


class State(Enum):
    OPEN = "open"
    RELEASING = "releasing"  # Release sent or received: no new request goes out
    CLOSED = "closed"


class StalePolicy(Enum):
    """What to do with a notification that is not fresh (RFC 7641 section 3.4)."""

    DELIVER = "deliver"  # W3: TCP keeps the order, so every notification is handed over
    DROP = "drop"


@dataclass(frozen=True, slots=True)
class ConnectionConfig:
    max_message_size: int = 16384
    """Ours, advertised in our CSM; a larger incoming message aborts the connection."""
    request_timeout: float = 30.0
    ping_timeout: float = 10.0
    keepalive_interval: float | None = None
    """Send a Ping after this long without input (W8)."""
    opening_timeout: float | None = None
    """Fail unless a CSM, request or response arrives within this (W8)."""
    message_timeout: float | None = None
    """Fail when a message begun is not complete within this (W8: a peer trickling bytes)."""
    check_request_options: bool = True
    """Answer requests that break RFC 7252 section 5.4 here (W14)."""
    stale_notifications: StalePolicy = StalePolicy.DELIVER
    block_wise: bool = False
    """Advertise Block-wise-Transfer in our CSM (W19: nothing here does it)."""


class _Exchange:
    """A request we sent and its state; mutable, private to the connection."""

    __slots__ = (
        "cancelling",
        "deadline",
        "established",
        "handle",
        "last_at",
        "last_seq",
        "request",
    )

    def __init__(self, handle: ev.Outgoing, request: Frame, deadline: float | None) -> None:
        self.handle = handle
        self.request = request
        self.deadline = deadline
        self.established = False
        self.cancelling = False
        self.last_seq = 0
        self.last_at = 0.0


class _Served:
    """A request the peer sent, not yet answered (or an observation of ours, still notifying)."""

    __slots__ = ("handle", "seq")

    def __init__(self, handle: ev.Incoming) -> None:
        self.handle = handle
        self.seq = 1  # the next notification's Observe value


class CoapTcpConnection:
    """One RFC 8323 connection; see the module docstring."""

    __slots__ = (
        "_csm_received",
        "_deadlines",
        "_deframer",
        "_events",
        "_last_rx",
        "_message_started",
        "_next_token",
        "_now",
        "_opened",
        "_out",
        "_peer_block_wise",
        "_peer_max",
        "_pending",
        "_ping_deadline",
        "_serial",
        "_served",
        "_started_at",
        "_state",
        "config",
        "ignored_responses",
    )

    def __init__(self, config: ConnectionConfig | None = None, now: float = 0.0) -> None:
        self.config: Final = config or ConnectionConfig()
        self._deframer = frames.Deframer(self.config.max_message_size)
        self._out = bytearray()
        self._events: list[ev.Event] = []
        self._state = State.OPEN
        self._now = now
        self._started_at = now
        self._last_rx = now
        self._message_started: float | None = None
        self._opened = False
        self._csm_received = False
        self._peer_max = sig.BASE_MAX_MESSAGE_SIZE
        self._peer_block_wise = False
        self._next_token = 1
        self._pending: dict[bytes, _Exchange] = {}
        self._deadlines: list[tuple[float, bytes]] = []
        self._served: dict[bytes, _Served] = {}
        self._serial = 0
        self._ping_deadline: float | None = None
        self.ignored_responses = 0
        """Responses whose token matched no exchange (late, after a timeout or forget)."""
        self._write(sig.csm(self.config.max_message_size, self.config.block_wise))

    # -- what the layer above reads

    @property
    def state(self) -> State:
        return self._state

    @property
    def csm_received(self) -> bool:
        return self._csm_received

    @property
    def peer_max_message_size(self) -> int:
        return self._peer_max

    @property
    def peer_block_wise(self) -> bool:
        return self._peer_block_wise

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete incoming message held."""
        return self._deframer.buffered

    @property
    def outgoing(self) -> int:
        """Bytes to send not yet taken by :meth:`data_to_send`."""
        return len(self._out)

    @property
    def pending(self) -> int:
        """Requests of ours not yet ended (observations included)."""
        return len(self._pending)

    def events(self) -> list[ev.Event]:
        """The events since the last call, in order."""
        out, self._events = self._events, []
        return out

    def data_to_send(self) -> bytes:
        """The bytes to write since the last call."""
        if not self._out:
            return b""
        out = bytes(self._out)
        self._out.clear()
        return out

    def next_deadline(self) -> float | None:
        """When :meth:`tick` has something to do next (None: nothing is timed)."""
        if self._state is State.CLOSED:
            return None
        cfg = self.config
        times: list[float] = []
        deadlines, pending = self._deadlines, self._pending
        while deadlines:  # drop the deadlines of exchanges ended since
            deadline, token = deadlines[0]
            exchange = pending.get(token)
            if exchange is not None and exchange.deadline == deadline:
                times.append(deadline)
                break
            heapq.heappop(deadlines)
        if self._ping_deadline is not None:
            times.append(self._ping_deadline)
        elif cfg.keepalive_interval is not None:
            times.append(self._last_rx + cfg.keepalive_interval)
        if not self._opened and cfg.opening_timeout is not None:
            times.append(self._started_at + cfg.opening_timeout)
        if self._message_started is not None and cfg.message_timeout is not None:
            times.append(self._message_started + cfg.message_timeout)
        return min(times) if times else None

    # -- inputs

    def receive_data(self, data: bytes | bytearray | memoryview, now: float | None = None) -> None:
        """Bytes from the peer (``now`` defaults to the last time given)."""
        if now is not None:
            self._now = now
        if self._state is State.CLOSED or not data:
            return
        self._last_rx = self._now
        deframer = self._deframer
        deframer.feed(data)
        completed = False
        while not self._is_closed():
            try:
                frame = deframer.next()
            except frames.FrameTooLarge as e:
                self._fail(ev.FailureKind.TOO_LARGE, str(e))
                return
            except frames.FrameError as e:
                self._fail(ev.FailureKind.FORMAT_ERROR, str(e))
                return
            if frame is None:
                break
            completed = True
            self._on_frame(frame)
        if self._is_closed():
            return
        if not deframer.buffered:
            self._message_started = None
        elif completed or self._message_started is None:
            self._message_started = self._now

    def receive_eof(self, reason: str = "closed by the peer") -> None:
        """The peer closed its side, or the transport is gone."""
        if self._state is State.CLOSED:
            return
        held = self._deframer.buffered
        if held:
            self._close()
            self._events.append(
                ev.ConnectionFailed(
                    ev.FailureKind.TRUNCATED,
                    f"{reason} in the middle of a message ({held} bytes held)",
                )
            )
            return
        self._close()
        self._events.append(ev.ConnectionClosed(reason))

    def tick(self, now: float) -> None:
        """Time passed: timeouts, keepalive."""
        self._now = now
        if self._state is State.CLOSED:
            return
        cfg = self.config
        if (
            not self._opened
            and cfg.opening_timeout is not None
            and now >= self._started_at + cfg.opening_timeout
        ):
            self._fail(
                ev.FailureKind.OPENING_TIMEOUT,
                f"opening timeout: no CSM or request within {cfg.opening_timeout}s",
            )
            return
        if (
            self._message_started is not None
            and cfg.message_timeout is not None
            and now >= self._message_started + cfg.message_timeout
        ):
            self._fail(
                ev.FailureKind.MESSAGE_TIMEOUT,
                f"message timeout: a message not complete within {cfg.message_timeout}s",
            )
            return
        if self._ping_deadline is not None:
            if now >= self._ping_deadline:
                self._fail(
                    ev.FailureKind.PING_TIMEOUT,
                    f"keepalive timeout: no Pong within {cfg.ping_timeout}s",
                )
                return
        elif cfg.keepalive_interval is not None and now >= self._last_rx + cfg.keepalive_interval:
            self.ping()
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            deadline, token = heapq.heappop(deadlines)
            exchange = self._pending.get(token)
            if exchange is not None and exchange.deadline == deadline:
                del self._pending[token]
                self._events.append(ev.RequestTimedOut(exchange.handle))

    # -- calls of the layer above

    def send_request(self, request: Frame, *, timeout: float | None = None) -> ev.Outgoing:
        """Send ``request`` (its token is ours to pick: the one given is ignored).

        A GET / FETCH with Observe=0 registers an observation (the handle says so): its first
        2.xx response with an Observe option establishes it, notifications follow until a
        response without Observe, an error response, or :meth:`cancel_observation`. The deadline
        (``timeout``, else the config's) runs until the first response."""
        if self._state is not State.OPEN:
            raise ConnectionNotOpen(f"connection {self._state.value}: no new request")
        if not 1 <= request.code < 32:
            raise ValueError(f"not a request code: {request.code}")
        token = encode_uint(self._next_token)
        wire = frames.encode_frame(Frame(request.code, token, request.options, request.payload))
        if len(wire) > self._peer_max:
            raise MessageTooLarge(len(wire), self._peer_max)
        self._next_token += 1
        handle = ev.Outgoing(token, obs.is_registration(request))
        deadline = self._now + (self.config.request_timeout if timeout is None else timeout)
        self._pending[token] = _Exchange(handle, request, deadline)
        heapq.heappush(self._deadlines, (deadline, token))
        self._out += wire
        return handle

    def observe(self, request: Frame, *, timeout: float | None = None) -> ev.Outgoing:
        """:meth:`send_request` with Observe=0 (RFC 7641 registration)."""
        if request.code not in (1, 5):
            raise ValueError(f"only GET and FETCH observe, not code {request.code}")
        return self.send_request(obs.with_observe(request, obs.REGISTER), timeout=timeout)

    def cancel_observation(self, handle: ev.Outgoing, *, timeout: float | None = None) -> None:
        """W4: GET with Observe=1 on the registration's token and options; the peer's answer
        (a :class:`~gateway.wire.events.ResponseReceived`, ``last``) ends the exchange."""
        exchange = self._pending.get(handle.token)
        if exchange is None or exchange.handle != handle or not handle.observe:
            raise UnknownHandle(f"no observation {handle.token.hex()}")
        if self._state is State.CLOSED:
            raise ConnectionNotOpen("connection closed")
        if exchange.cancelling:
            return
        request = obs.with_observe(exchange.request, obs.DEREGISTER)
        wire = frames.encode_frame(
            Frame(request.code, handle.token, request.options, request.payload)
        )
        exchange.cancelling = True
        deadline = self._now + (self.config.request_timeout if timeout is None else timeout)
        exchange.deadline = deadline
        heapq.heappush(self._deadlines, (deadline, handle.token))
        self._out += wire

    def forget(self, handle: ev.Outgoing) -> None:
        """Lose interest in ``handle`` without telling the peer; its later responses are
        ignored (counted in :attr:`ignored_responses`)."""
        exchange = self._pending.get(handle.token)
        if exchange is not None and exchange.handle == handle:
            del self._pending[handle.token]

    def send_response(
        self, handle: ev.Incoming, response: Frame, *, keep_observing: bool = False
    ) -> None:
        """Answer the request ``handle`` (the token given is ignored).

        ``keep_observing`` (on an observe request) sends it as a notification: an Observe option
        with the next sequence number replaces any given, and the request stays open for more;
        otherwise the exchange ends with this response."""
        if self._state is State.CLOSED:
            raise ConnectionNotOpen("connection closed")
        served = self._served.get(handle.token)
        if served is None or served.handle != handle:
            raise UnknownHandle(f"no open request {handle.token.hex()}")
        if not 64 <= response.code < 192:
            raise ValueError(f"not a response code: {response.code}")
        if keep_observing:
            if not handle.observe:
                raise ValueError("keep_observing on a request that did not ask to observe")
            response = obs.with_observe(response, encode_uint(served.seq))
        wire = frames.encode_frame(
            Frame(response.code, handle.token, response.options, response.payload)
        )
        # The peer's limit binds an answer once its CSM stated one. A peer that sent none
        # (iotivity-lite) still gets its answer whole: the reply to its resource publication
        # echoes its links, beyond the base 1,152 bytes with ten resources, and such devices
        # take it. Our own requests keep the base value (W20).
        if self._csm_received and len(wire) > self._peer_max:
            raise MessageTooLarge(len(wire), self._peer_max)
        if keep_observing:
            served.seq = (served.seq + 1) % obs.SEQUENCE_LIMIT
        else:
            del self._served[handle.token]
        self._out += wire

    def ping(self, *, custody: bool = False) -> None:
        """Send a Ping; without a Pong within ``ping_timeout`` the connection fails."""
        if self._state is State.CLOSED:
            raise ConnectionNotOpen("connection closed")
        self._write(sig.ping(custody))
        if self._ping_deadline is None:
            self._ping_deadline = self._now + self.config.ping_timeout

    def release(self, alternative_address: str | None = None, hold_off: int | None = None) -> None:
        """RFC 8323 section 5.5: ask the peer to go (to ``alternative_address``, e.g.
        ``"coaps+tcp://gw2.example:5684"``, after ``hold_off`` seconds); no new request of ours
        goes out, pending ones may still complete, then :meth:`close`."""
        if self._state is State.CLOSED:
            raise ConnectionNotOpen("connection closed")
        self._write(sig.release(alternative_address, hold_off))
        self._state = State.RELEASING

    def abort(self, diagnostic: str, bad_csm_option: int | None = None) -> None:
        """RFC 8323 section 5.6: send Abort and close (no event: the caller knows)."""
        if self._state is State.CLOSED:
            return
        self._write(sig.abort(diagnostic, bad_csm_option))
        self._close()

    def close(self) -> None:
        """Closed from our side (after a Release, or the peer's): nothing more is sent."""
        self._close()

    # -- internals

    def _is_closed(self) -> bool:
        return self._state is State.CLOSED

    def _write(self, frame: Frame) -> None:
        self._out += frames.encode_frame(frame)

    def _close(self) -> None:
        self._state = State.CLOSED
        if self._deframer.buffered:  # let go of what a closed connection will never read
            self._deframer = frames.Deframer(self.config.max_message_size)
        self._pending.clear()
        self._deadlines.clear()
        self._served.clear()
        self._ping_deadline = None
        self._message_started = None

    def _fail(
        self, kind: ev.FailureKind, diagnostic: str, bad_csm_option: int | None = None
    ) -> None:
        self._write(sig.abort(diagnostic, bad_csm_option))
        self._close()
        self._events.append(ev.ConnectionFailed(kind, diagnostic))

    def _on_frame(self, frame: Frame) -> None:
        code = frame.code
        if 64 <= code < 192:
            self._on_response(frame)
        elif 1 <= code < 32:
            self._on_request(frame)
        elif code >= 224:
            self._on_signal(frame)
        elif code:  # classes 1 and 6 are reserved (W15); Empty is ignored (RFC 8323 3.3)
            self._fail(
                ev.FailureKind.FORMAT_ERROR,
                f"message format error: reserved code {code >> 5}.{code & 0x1F:02d}",
            )

    def _on_request(self, frame: Frame) -> None:
        self._opened = True
        if self.config.check_request_options:
            problem = frames.request_option_problem(frame.options)
            if problem is not None:
                code = BAD_OPTION if problem.code == "4.02" else PROXYING_NOT_SUPPORTED
                self._write(
                    Frame(code, frame.token, (), sig.diagnostic_payload(problem.diagnostic))
                )
                self._events.append(ev.RequestRefused(frame, code, problem.diagnostic))
                return
            usable = frames.usable_request_options(frame.options)
            if len(usable) != len(frame.options):
                frame = Frame(frame.code, frame.token, usable, frame.payload)
        self._serial += 1
        handle = ev.Incoming(frame.token, self._serial, obs.is_registration(frame))
        self._served[frame.token] = _Served(handle)
        self._events.append(ev.RequestReceived(handle, frame))

    def _on_response(self, frame: Frame) -> None:
        self._opened = True
        exchange = self._pending.get(frame.token)
        if exchange is None:
            self.ignored_responses += 1
            return
        observe = option_value(frame, obs.OBSERVE)
        seq = None if observe is None else decode_uint(observe)
        if (
            seq is not None
            and exchange.handle.observe
            and not exchange.cancelling
            and frame.code < 96  # 2.xx
        ):
            now = self._now
            if not exchange.established:
                exchange.established = True
                exchange.deadline = None
                exchange.last_seq, exchange.last_at = seq, now
                self._events.append(ev.ResponseReceived(exchange.handle, frame, False, seq))
                return
            fresh = obs.is_fresh(exchange.last_seq, seq, exchange.last_at, now)
            if fresh:
                exchange.last_seq, exchange.last_at = seq, now
            elif self.config.stale_notifications is StalePolicy.DROP:
                return
            self._events.append(ev.NotificationReceived(exchange.handle, frame, seq, fresh))
            return
        del self._pending[frame.token]
        self._events.append(ev.ResponseReceived(exchange.handle, frame, True, seq))

    def _on_signal(self, frame: Frame) -> None:
        code = frame.code
        if code not in sig.KNOWN_OPTIONS:
            self._fail(ev.FailureKind.BAD_SIGNAL, f"unknown signalling code 7.{code & 0x1F:02d}")
            return
        if code == sig.ABORT:  # whatever its options: the peer is gone
            self._close()
            self._events.append(sig.parse_abort(frame))
            return
        critical = sig.unknown_critical_option(frame)
        if critical is not None:
            if code == sig.CSM:
                diagnostic = f"unknown critical option {critical} in a CSM"
                self._fail(ev.FailureKind.BAD_SIGNAL, diagnostic, bad_csm_option=critical)
            else:
                diagnostic = f"unknown critical option {critical} in a signalling message"
                self._fail(ev.FailureKind.BAD_SIGNAL, diagnostic)
            return
        if code == sig.CSM:
            max_size, block_wise = sig.parse_csm(frame)
            if max_size is not None:
                self._peer_max = max_size
            self._peer_block_wise = self._peer_block_wise or block_wise
            self._csm_received = self._opened = True
            self._events.append(ev.CsmReceived(self._peer_max, self._peer_block_wise))
        elif code == sig.PING:
            pong = sig.pong(frame)
            self._write(pong)
            self._events.append(ev.PingReceived(frame.token, bool(pong.options)))
        elif code == sig.PONG:
            self._ping_deadline = None
            self._events.append(ev.PongReceived(frame.token))
        else:  # Release
            if self._state is State.OPEN:
                self._state = State.RELEASING
            self._events.append(sig.parse_release(frame))

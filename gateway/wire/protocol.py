"""The asyncio driver of :class:`~gateway.wire.connection.CoapTcpConnection` (no streams API).

One :class:`CoapTcpProtocol` per TCP / TLS connection, made by ``loop.create_server`` (``ssl=``
for TLS; uvloop too) or ``loop.connect_accepted_socket``. It feeds ``data_received`` to the
connection, hands each event to ``on_event`` at once, writes what the connection has to send
once per loop turn (however many messages a turn produced), drives ``tick`` with one timer at
the connection's next deadline, and stops reading while the transport's write buffer is above
its high-water mark (back-pressure: a peer that does not read does not get to send); past
``max_write_buffer`` it aborts the transport (W7). An exception raised by ``on_event`` is a
bug of the layer above and ends the connection as asyncio ends it.

When the connection closes (Abort, Release done, failure) the transport is closed after the
last bytes are written: over plain TCP with a FIN first and reading on until the peer closes or
``close_timeout`` passes (closing with unread input would send RST and could lose the Abort).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, cast

from gateway.adapters.coap_frames import Frame
from gateway.wire import events as ev
from gateway.wire.connection import CoapTcpConnection, ConnectionConfig, State

EventHandler = Callable[["CoapTcpProtocol", ev.Event], None]


class CoapTcpProtocol(asyncio.Protocol):
    """Drives one connection; the layer above calls the methods here and gets events."""

    __slots__ = (
        "_close_timeout",
        "_closed",
        "_closing",
        "_config",
        "_conn",
        "_flush_handle",
        "_hard_close",
        "_loop",
        "_lost",
        "_max_write_buffer",
        "_on_event",
        "_on_open",
        "_timer",
        "_timer_at",
        "_transport",
        "writable",
        "writes",
    )

    def __init__(
        self,
        on_event: EventHandler,
        config: ConnectionConfig | None = None,
        *,
        close_timeout: float = 5.0,
        max_write_buffer: int | None = None,
        on_open: Callable[[CoapTcpProtocol], None] | None = None,
    ) -> None:
        self._on_event = on_event
        self._on_open = on_open
        self._config = config or ConnectionConfig()
        self._close_timeout = close_timeout
        self._max_write_buffer = max_write_buffer
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._conn: CoapTcpConnection | None = None
        self._flush_handle: asyncio.Handle | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._hard_close: asyncio.TimerHandle | None = None
        self._closing = False
        self._lost = False
        self.writable = True
        """False while the transport asks us to pause writing."""
        self._closed: asyncio.Future[None] | None = None  # made when someone waits
        self.writes = 0
        """Writes to the transport so far (one per loop turn with something to send)."""

    # -- for the layer above

    @property
    def connection(self) -> CoapTcpConnection:
        if self._conn is None:
            raise RuntimeError("not connected yet")
        return self._conn

    @property
    def lost(self) -> bool:
        """The transport is gone."""
        return self._lost

    async def wait_closed(self) -> None:
        """Until the transport is gone."""
        if self._lost:
            return
        if self._closed is None:
            self._closed = self._loop.create_future()
        await asyncio.shield(self._closed)

    @property
    def reading(self) -> bool:
        """False while reading is paused (back-pressure) or there is no transport."""
        transport = self._transport
        return transport is not None and not transport.is_closing() and transport.is_reading()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if self._transport is None:
            return default
        return self._transport.get_extra_info(name, default)

    def send_request(self, request: Frame, *, timeout: float | None = None) -> ev.Outgoing:
        handle = self.connection.send_request(request, timeout=timeout)
        self._changed()
        return handle

    def observe(self, request: Frame, *, timeout: float | None = None) -> ev.Outgoing:
        handle = self.connection.observe(request, timeout=timeout)
        self._changed()
        return handle

    def cancel_observation(self, handle: ev.Outgoing, *, timeout: float | None = None) -> None:
        self.connection.cancel_observation(handle, timeout=timeout)
        self._changed()

    def forget(self, handle: ev.Outgoing) -> None:
        self.connection.forget(handle)

    def send_response(
        self, handle: ev.Incoming, response: Frame, *, keep_observing: bool = False
    ) -> None:
        self.connection.send_response(handle, response, keep_observing=keep_observing)
        self._changed()

    def ping(self, *, custody: bool = False) -> None:
        self.connection.ping(custody=custody)
        self._changed()

    def release(self, alternative_address: str | None = None, hold_off: int | None = None) -> None:
        self.connection.release(alternative_address, hold_off)
        self._changed()

    def abort(self, diagnostic: str, bad_csm_option: int | None = None) -> None:
        self.connection.abort(diagnostic, bad_csm_option)
        self._changed()

    def close(self) -> None:
        self.connection.close()
        self._changed()

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._conn = CoapTcpConnection(self._config, now=self._loop.time())
        if self._on_open is not None:
            self._on_open(self)
        self._changed()

    def data_received(self, data: bytes) -> None:
        conn = self._conn
        if conn is None or conn.state is State.CLOSED:
            return  # draining after our Abort / close: discard
        conn.receive_data(data, self._loop.time())
        self._dispatch()

    def eof_received(self) -> bool | None:
        if self._conn is not None:
            self._conn.receive_eof()
            self._dispatch()
        return None  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        for handle in (self._flush_handle, self._timer, self._hard_close):
            if handle is not None:
                handle.cancel()
        self._flush_handle = self._timer = self._hard_close = None
        conn = self._conn
        if conn is not None and conn.state is not State.CLOSED:
            conn.receive_eof("closed by the peer" if exc is None else f"connection lost: {exc}")
            for event in conn.events():
                self._on_event(self, event)
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(None)

    def pause_writing(self) -> None:
        self.writable = False
        if self._transport is not None and not self._transport.is_closing():
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        self.writable = True
        if self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()

    # -- internals

    def _dispatch(self) -> None:
        conn = self._conn
        assert conn is not None
        for event in conn.events():
            self._on_event(self, event)
        self._changed()

    def _changed(self) -> None:
        if self._lost:
            return
        if self._flush_handle is None:
            self._flush_handle = self._loop.call_soon(self._flush)
        conn = self._conn
        if conn is None:
            return
        limit, transport = self._max_write_buffer, self._transport
        if (
            limit is not None
            and transport is not None
            and not self._closing
            and conn.outgoing + transport.get_write_buffer_size() > limit
        ):  # checked before the bytes pile up in one turn (W7)
            self._write_buffer_exceeded(transport, conn, limit)
            return
        deadline = conn.next_deadline()
        if deadline is None:
            return
        if self._timer is None or deadline < self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = deadline
            self._timer = self._loop.call_at(deadline, self._on_timer)

    def _write_buffer_exceeded(
        self, transport: asyncio.Transport, conn: CoapTcpConnection, limit: int
    ) -> None:
        """W7: a peer that lets our writes pile up is cut off (it would not read an Abort)."""
        self._closing = True
        conn.close()
        conn.data_to_send()
        transport.abort()
        self._on_event(
            self,
            ev.ConnectionFailed(
                ev.FailureKind.WRITE_BUFFER,
                f"peer does not read (write buffer above {limit} bytes)",
            ),
        )

    def _on_timer(self) -> None:
        self._timer = None
        conn = self._conn
        if conn is None or self._lost:
            return
        conn.tick(self._loop.time())
        self._dispatch()

    def _flush(self) -> None:
        self._flush_handle = None
        transport, conn = self._transport, self._conn
        if transport is None or conn is None or self._lost:
            return
        data = conn.data_to_send()
        if data and not transport.is_closing():
            transport.write(data)
            self.writes += 1
            limit = self._max_write_buffer
            if limit is not None and transport.get_write_buffer_size() > limit:
                self._write_buffer_exceeded(transport, conn, limit)
                return
        if conn.state is State.CLOSED and not self._closing:
            self._closing = True
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if transport.is_closing():
                return
            try:
                if transport.can_write_eof():
                    transport.write_eof()
                else:
                    transport.close()  # TLS: close_notify after the buffered bytes
                self._hard_close = self._loop.call_later(self._close_timeout, transport.abort)
            except (OSError, RuntimeError):  # the peer is already gone
                transport.abort()

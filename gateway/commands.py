"""The sans-IO core of command delivery to one signed-in device.

:class:`Dispatcher` holds the device's pending commands (loaded from the log at
sign-in, then added live as clients issue them) and decides what to send when:

* per resource, commands go out **in issue order** (log position), one at a time;
* a command is recorded as ``command-sent`` *before* the CoAP request is written
  (the driver writes it only after the append was acknowledged);
* the device's answer is recorded as ``command-succeeded`` / ``command-failed``;
  only then does the next command of that resource go out;
* no answer (timeout, 5.xx): retried with exponential back-off while attempts
  remain and the time to live allows; then ``command-failed``;
* a command past its time to live is never sent (the twin's sweeper records
  ``command-expired``); a canceled one is dropped from the queue;
* a command for a resource the device has not published waits for the publish.

Every event id is derived from (device, correlation id, issue position, step), so
a retried append is deduplicated by the log and two gateways never record one
step twice. A device answer is recorded once; a command whose answer is recorded
is not pending any more, so a gateway restarted later never sends it again.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import uuid
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from proto import codecs
from proto.codecs import ContentFormat
from proto.errors import CodecError
from proto.events import (
    AnyEvent,
    CommandFailed,
    CommandOp,
    CommandSent,
    CommandSucceeded,
    Event,
    EventData,
)

OCF_CBOR: Final = int(ContentFormat.OCF_CBOR)
_NS: Final = uuid.UUID("6b1e0a8e-4f4c-4b7a-9d0e-2c3f5a7b9c11")
_METHODS: Final[dict[str, str]] = {
    "update": "POST",
    "create": "POST",
    "retrieve": "GET",
    "delete": "DELETE",
}


@dataclass(slots=True)
class Command:
    """One pending command as the gateway tracks it."""

    correlation_id: str
    op: CommandOp
    href: str
    position: int  # of its command-pending event: the issue order
    expires_at: float | None = None  # epoch seconds
    content: Any = None
    content_b64: str | None = None
    content_format: int | None = None
    interface: str | None = None
    max_attempts: int = 3
    attempts: int = 0  # attempts already made (recorded command-sent events)
    owner: str = ""
    retry_at: float | None = None


@dataclass(frozen=True, slots=True)
class SendCommand:
    """Write this request to the device; answer with :meth:`Dispatcher.answered`."""

    correlation_id: str
    attempt: int
    method: str
    href: str
    query: tuple[str, ...]
    payload: bytes
    content_format: int | None


@dataclass(frozen=True, slots=True)
class AppendCommandEvents:
    """Append (in order, this device); answer with :meth:`Dispatcher.appended`."""

    ref: int
    events: tuple[AnyEvent, ...]


CommandEffect = SendCommand | AppendCommandEvents


@dataclass(frozen=True, slots=True)
class Answer:
    code: str
    payload: bytes = b""
    content_format: int | None = None


@dataclass(slots=True)
class _Step:
    kind: str  # "sent" or "outcome"
    correlation_id: str
    attempt: int = 0


@dataclass(slots=True)
class DispatcherConfig:
    gateway_id: str
    connection_id: str
    retry_initial: float = 1.0
    retry_max: float = 30.0


@dataclass
class Dispatcher:
    """Command delivery for one device connection (see module doc)."""

    config: DispatcherConfig
    owner: str
    device_id: str
    commands: dict[str, Command] = field(default_factory=dict)
    published: set[str] | None = None  # None: not known yet (nothing is sent before)
    _queues: dict[str, deque[str]] = field(default_factory=dict)
    _busy: dict[str, str] = field(default_factory=dict)  # href -> correlation id in flight
    _steps: dict[int, _Step] = field(default_factory=dict)
    _refs: Any = field(default_factory=lambda: itertools.count(1))
    _closed: bool = False

    # -- inputs ----------------------------------------------------------------------------

    def set_published(self, hrefs: Iterable[str], now: float) -> list[CommandEffect]:
        """The resources the device serves (its published / discovered links)."""
        self.published = set(hrefs) if self.published is None else self.published | set(hrefs)
        return self._pump(now)

    def add(self, commands: Iterable[Command], now: float) -> list[CommandEffect]:
        """Commands loaded at sign-in or issued live; known correlation ids are ignored."""
        for cmd in sorted(commands, key=lambda c: c.position):
            if cmd.correlation_id in self.commands:
                continue
            self.commands[cmd.correlation_id] = cmd
            queue = self._queues.setdefault(cmd.href, deque())
            queue.append(cmd.correlation_id)
            if len(queue) > 1 and self.commands[queue[-2]].position > cmd.position:
                ordered = sorted(queue, key=lambda c: self.commands[c].position)
                self._queues[cmd.href] = deque(ordered)
        return self._pump(now)

    def cancel(self, correlation_id: str, now: float) -> list[CommandEffect]:
        """A client canceled the command: never send it (an answer in flight is still logged)."""
        cmd = self.commands.get(correlation_id)
        if cmd is None:
            return []
        if self._busy.get(cmd.href) != correlation_id:
            self._forget(cmd)
        else:
            cmd.max_attempts = cmd.attempts  # no retry
        return self._pump(now)

    def appended(self, ref: int, ok: bool, now: float) -> list[CommandEffect]:
        step = self._steps.pop(ref, None)
        if step is None:
            return []
        cmd = self.commands.get(step.correlation_id)
        if cmd is None:
            return self._pump(now)
        if not ok:  # the log refused or is gone: try this step again later
            self._busy.pop(cmd.href, None)
            cmd.retry_at = now + self.config.retry_initial
            return self._pump(now)
        if step.kind == "sent":
            return [self._request(cmd, step.attempt)]
        self._forget(cmd)  # the outcome is in the log: done
        return self._pump(now)

    def answered(
        self,
        correlation_id: str,
        attempt: int,
        answer: Answer | None,
        error: str,
        now: float,
        *,
        permanent: bool = False,
    ) -> list[CommandEffect]:
        """The device's answer, or ``error``; ``permanent``: the request cannot be sent at all
        (say, larger than the device accepts), so it fails now, without retries."""
        cmd = self.commands.get(correlation_id)
        if cmd is None or self._busy.get(cmd.href) != correlation_id or attempt != cmd.attempts:
            return []
        if permanent:
            return [self._failure(cmd, None, error)]
        if answer is not None and (answer.code.startswith("2.") or answer.code.startswith("4.")):
            return [self._outcome(cmd, answer)]
        # no answer, or a server error on the device: retry while allowed
        delay = min(self.config.retry_initial * 2 ** (cmd.attempts - 1), self.config.retry_max)
        expired = cmd.expires_at is not None and now + delay >= cmd.expires_at
        if cmd.attempts >= cmd.max_attempts or expired:
            reason = error or (f"device answered {answer.code}" if answer else "no answer")
            return [self._failure(cmd, answer, reason)]
        self._busy.pop(cmd.href, None)
        cmd.retry_at = now + delay
        return self._pump(now)

    def tick(self, now: float) -> list[CommandEffect]:
        return self._pump(now)

    def close(self) -> None:
        self._closed = True

    # -- the pump ---------------------------------------------------------------------------

    def _pump(self, now: float) -> list[CommandEffect]:
        out: list[CommandEffect] = []
        if self._closed or self.published is None:
            return out
        for href, queue in list(self._queues.items()):
            if href in self._busy or href not in self.published:
                continue
            while queue:
                cmd = self.commands[queue[0]]
                if cmd.expires_at is not None and now >= cmd.expires_at:
                    self._forget(cmd)  # the sweeper records the expiry
                    continue
                break
            if not queue:
                continue
            cmd = self.commands[queue[0]]
            if cmd.retry_at is not None and now < cmd.retry_at:
                continue
            if cmd.attempts >= cmd.max_attempts:
                out.append(self._failure(cmd, None, "no answer"))
                continue
            cmd.retry_at = None
            cmd.attempts += 1
            self._busy[href] = cmd.correlation_id
            ev = self._event(
                cmd,
                CommandSent(
                    href=href,
                    gateway=self.config.gateway_id,
                    connection_id=self.config.connection_id,
                    attempt=cmd.attempts,
                ),
                f"sent/{cmd.attempts}",
            )
            out.append(self._append(ev, _Step("sent", cmd.correlation_id, cmd.attempts)))
        return out

    # -- helpers ----------------------------------------------------------------------------

    def _forget(self, cmd: Command) -> None:
        self.commands.pop(cmd.correlation_id, None)
        queue = self._queues.get(cmd.href)
        if queue is not None:
            with contextlib.suppress(ValueError):
                queue.remove(cmd.correlation_id)
            if not queue:
                del self._queues[cmd.href]
        if self._busy.get(cmd.href) == cmd.correlation_id:
            del self._busy[cmd.href]

    def _append(self, ev: AnyEvent, step: _Step) -> AppendCommandEvents:
        ref = next(self._refs)
        self._steps[ref] = step
        return AppendCommandEvents(ref, (ev,))

    def _event(self, cmd: Command, data: EventData, step: str) -> AnyEvent:
        key = f"{self.device_id}/{cmd.correlation_id}/{cmd.position}/{step}"
        return Event(
            owner=cmd.owner or self.owner,
            device_id=self.device_id,
            data=data,
            source=f"/gateway/{self.config.gateway_id}",
            id=str(uuid.uuid5(_NS, key)),
            time=datetime.now(UTC),
            correlation_id=cmd.correlation_id,
        )

    def _request(self, cmd: Command, attempt: int) -> SendCommand:
        query: tuple[str, ...] = ()
        if cmd.interface:
            query = (f"if={cmd.interface}",)
        elif cmd.op == "create":
            query = ("if=oic.if.create",)
        payload = b""
        cf: int | None = None
        if cmd.op in ("update", "create"):
            if cmd.content_b64 is not None:
                payload = base64.b64decode(cmd.content_b64)
                cf = cmd.content_format or OCF_CBOR
            else:
                payload = codecs.encode(cmd.content, OCF_CBOR)
                cf = OCF_CBOR
        return SendCommand(
            cmd.correlation_id, attempt, _METHODS[cmd.op], cmd.href, query, payload, cf
        )

    def _outcome(self, cmd: Command, answer: Answer) -> CommandEffect:
        try:
            value = codecs.decode(answer.payload, answer.content_format or OCF_CBOR)
            content, lossy = codecs.to_json_value(value)
        except CodecError:
            content, lossy = None, True
        raw = base64.b64encode(answer.payload).decode("ascii") if lossy else None
        if answer.code.startswith("2."):
            data: EventData = CommandSucceeded(
                href=cmd.href,
                status=answer.code,
                content=content,
                content_format=answer.content_format,
                raw=raw,
            )
        else:
            data = CommandFailed(
                href=cmd.href,
                status=answer.code,
                content=content,
                content_format=answer.content_format,
                reason=f"device answered {answer.code}",
                attempts=cmd.attempts,
            )
        ev = self._event(cmd, data, "outcome")
        return self._append(ev, _Step("outcome", cmd.correlation_id))

    def _failure(self, cmd: Command, answer: Answer | None, reason: str) -> CommandEffect:
        self._busy[cmd.href] = cmd.correlation_id
        data = CommandFailed(
            href=cmd.href,
            status=answer.code if answer else None,
            reason=reason,
            attempts=cmd.attempts,
        )
        return self._append(self._event(cmd, data, "outcome"), _Step("outcome", cmd.correlation_id))

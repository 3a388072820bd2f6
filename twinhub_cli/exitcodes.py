"""The exit codes of ``twinhub``, and the one line a command prints when it fails.

A supervisor (compose, systemd, a script) tells the failures of a service apart by the code
alone, without reading a traceback:

=====  ===========================================================================================
code   meaning
=====  ===========================================================================================
0      done (a service: stopped by SIGINT / SIGTERM)
1      the command ran and failed: an API error (``forbidden``, ``not_found``, ...), a command
       whose outcome is not success, an unhealthy check (``twinhub health`` exits 0 or 1 only),
       a local server of ``twinhub up`` / ``dev services`` that would not start; and anything
       unexpected (a bug: its traceback is printed)
2      usage or configuration: a bad option or setting, a missing or unreadable key, certificate
       or password file
3      an address to listen on is in use (the gateway's listeners, an operations endpoint, the
       NATS or MongoDB port of ``twinhub up`` / ``dev services``)
4      a dependency is unreachable after its retry budget: NATS (``nats.startup_timeout``),
       MongoDB (``mongo.startup_timeout``), the event stream the twin service creates (a gateway
       waits 120 s for it); for the application commands, NATS or the command API
130    interrupted (Ctrl-C)
=====  ===========================================================================================

:func:`report` turns a failure into its code and one line on stderr; with ``--log-level DEBUG``
the traceback is logged as well. An exception it does not know is left to propagate: an
unexpected error keeps its traceback.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import sys
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import AbstractAsyncContextManager
from typing import Final, TypeVar

from twinhub_cli.config import ConfigError

__all__ = [
    "FAILED",
    "INTERRUPTED",
    "OK",
    "PORT_IN_USE",
    "UNREACHABLE",
    "USAGE",
    "PortInUseError",
    "UnreachableError",
    "classify",
    "listening",
    "one_line",
    "report",
]

log = logging.getLogger(__name__)

OK: Final = 0
FAILED: Final = 1
USAGE: Final = 2  # argparse's own code for a bad command line, too
PORT_IN_USE: Final = 3
UNREACHABLE: Final = 4
INTERRUPTED: Final = 130

_MAX_LINE: Final = 400  # characters of a foreign error's message kept in the line

T = TypeVar("T")
Bind = tuple[str, int]


class PortInUseError(OSError):
    """The listener of ``setting`` cannot bind ``address``: another process holds it."""

    def __init__(self, setting: str, address: str) -> None:
        super().__init__(errno.EADDRINUSE, f"{setting} {address}: address already in use")
        self.setting = setting
        self.address = address

    def __str__(self) -> str:
        return f"{self.setting} {self.address} is in use (address already in use)"


class UnreachableError(ConnectionError):
    """``what`` at ``where`` did not answer within its retry budget; ``detail`` says how it
    failed last."""

    def __init__(self, what: str, where: str, detail: str) -> None:
        super().__init__(f"{what} at {where} unreachable: {detail}")
        self.what = what
        self.where = where
        self.detail = detail


def _hostport(bind: Bind) -> str:
    return f"[{bind[0]}]:{bind[1]}" if ":" in bind[0] else f"{bind[0]}:{bind[1]}"


def _address_in_use(exc: OSError) -> bool:
    # uvloop reports a busy UDP port as an OSError without errno, raised from the real one
    return any(isinstance(e, OSError) and e.errno == errno.EADDRINUSE for e in _chain(exc))


def _busy(exc: OSError, settings: Mapping[str, Bind | None]) -> PortInUseError:
    """The listener ``exc`` is about: the one whose port its message names, else all."""
    text = " ".join(str(e) for e in _chain(exc))
    given = {name: bind for name, bind in settings.items() if bind is not None}
    named = {n: b for n, b in given.items() if f", {b[1]})" in text or f":{b[1]}" in text}
    chosen = named if len(named) == 1 else given
    return PortInUseError(
        " or ".join(chosen) or "a listener",
        " / ".join(_hostport(b) for b in chosen.values()) or "?",
    )


@contextlib.asynccontextmanager
async def listening(
    server: AbstractAsyncContextManager[T], settings: Mapping[str, Bind | None]
) -> AsyncIterator[T]:
    """``server`` entered; "address already in use" while it binds becomes a
    :class:`PortInUseError` naming the setting of that address (``settings``: setting name to
    the address it binds, ``None`` when off). Only the start is translated: what the block
    raises passes unchanged."""
    async with contextlib.AsyncExitStack() as stack:
        try:
            entered = await stack.enter_async_context(server)
        except PortInUseError:
            raise
        except OSError as e:
            if not _address_in_use(e):
                raise
            raise _busy(e, settings) from e
        yield entered


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, then what it was raised from (``raise ... from``), and the leaves of exception
    groups (a task group's failures). Not ``__context__``: a bug raised while handling a known
    failure must keep its traceback."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, BaseExceptionGroup):
            todo.extend(e.exceptions)
            continue
        yield e
        if e.__cause__ is not None:
            todo.append(e.__cause__)


def one_line(text: str) -> str:
    """A foreign error's message on one line, without pymongo's topology dump."""
    for cut in (", Timeout: ", " (configured timeouts: "):
        text = text.split(cut, 1)[0]
    line = " ".join(text.split())
    return line if len(line) <= _MAX_LINE else line[: _MAX_LINE - 1] + "…"


def _dev_server(e: BaseException) -> tuple[int, str] | None:
    """A local server of ``twinhub up`` / ``dev services`` that did not start (its message is a
    first line and the tail of the server's log)."""
    from twinhub_cli.devservices import BinaryNotFoundError, ServiceStartError

    if isinstance(e, BinaryNotFoundError):
        return USAGE, one_line(str(e))
    if not isinstance(e, ServiceStartError):
        return None
    first, *tail = str(e).splitlines()
    busy = [line for line in tail if "address already in use" in line.lower()]
    if busy:
        return PORT_IN_USE, one_line(f"{first} {busy[-1].strip()}")
    return FAILED, one_line(f"{first} {tail[-1].strip()}" if tail else first)


def _unreachable(e: BaseException) -> str | None:
    import pymongo.errors

    from eventstore.errors import NotProvisionedError, UnavailableError
    from twin.errors import StoreUnavailableError
    from twinhub_client.errors import ServiceUnavailableError

    if isinstance(e, UnreachableError):
        return str(e)
    if isinstance(e, StoreUnavailableError | pymongo.errors.ConnectionFailure):
        return f"MongoDB unreachable: {one_line(str(e))}"
    if isinstance(e, UnavailableError | ServiceUnavailableError):
        return one_line(str(e))
    if isinstance(e, NotProvisionedError):
        return one_line(str(e))
    return None


def classify(exc: BaseException) -> tuple[int, str] | None:
    """The exit code and the one line of a failure twinhub knows; None for anything else."""
    for e in _chain(exc):
        if isinstance(e, ConfigError):
            return USAGE, f"configuration error: {one_line(str(e))}"
        if isinstance(e, PortInUseError):
            return PORT_IN_USE, str(e)
        if isinstance(e, OSError) and _address_in_use(e):
            return PORT_IN_USE, f"address in use: {one_line(str(e))}"
        found = _dev_server(e)
        if found is not None:
            return found
        line = _unreachable(e)
        if line is not None:
            return UNREACHABLE, line
    return None


def report(exc: BaseException, prog: str = "twinhub") -> int | None:
    """Print the one line of a known failure on stderr (``prog: ...``) and return its exit
    code; None (nothing printed) when ``exc`` is not one. The traceback goes to the log at
    debug level."""
    found = classify(exc)
    if found is None:
        return None
    code, line = found
    log.debug("%s failed: its traceback", prog, exc_info=exc)
    sys.stderr.write(f"{prog}: {line}\n")
    sys.stderr.flush()
    return code

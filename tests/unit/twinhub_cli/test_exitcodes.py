"""Which failures end a command with which exit code and line (twinhub_cli.exitcodes), and the
translation of a busy address into the setting that names it (``listening``)."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Iterator

import pymongo.errors
import pytest

from eventstore.errors import NotProvisionedError, UnavailableError
from twin.errors import StoreUnavailableError
from twinhub_cli import exitcodes
from twinhub_cli.config import ConfigError
from twinhub_cli.devservices import BinaryNotFoundError, ServiceStartError
from twinhub_cli.exitcodes import PortInUseError, UnreachableError, classify, listening

PYMONGO_TEXT = (
    "127.0.0.1:1: [Errno 111] Connect call failed ('127.0.0.1', 1) (configured timeouts: "
    "socketTimeoutMS: 20000.0ms, connectTimeoutMS: 20000.0ms), Timeout: 5.0s, Topology "
    "Description: <TopologyDescription id: 6b11, topology_type: Single, servers: [...]>"
)


def raised_from(outer: BaseException, inner: BaseException) -> BaseException:
    try:
        raise outer from inner
    except BaseException as e:
        return e


def test_the_codes_are_distinct() -> None:
    codes = [
        exitcodes.OK,
        exitcodes.FAILED,
        exitcodes.USAGE,
        exitcodes.PORT_IN_USE,
        exitcodes.UNREACHABLE,
        exitcodes.INTERRUPTED,
    ]
    assert codes == [0, 1, 2, 3, 4, 130]


@pytest.mark.parametrize(
    ("exc", "code", "line"),
    [
        (ConfigError("gateway.lease: must be > 0"), 2, "configuration error: gateway.lease"),
        (
            OSError(errno.EADDRINUSE, "error while attempting to bind on address"),
            3,
            "address in use:",
        ),
        (PortInUseError("gateway.tcp", "127.0.0.1:5683"), 3, "gateway.tcp 127.0.0.1:5683 is in"),
        (
            # uvloop: a busy UDP port is an OSError without errno, raised from the real one
            raised_from(
                OSError("could not bind to local_addr ('127.0.0.1', 5683)"),
                OSError(errno.EADDRINUSE, "Address already in use"),
            ),
            3,
            "address in use: could not bind",
        ),
        (UnreachableError("NATS", "nats://h:4222", "no connection"), 4, "NATS at nats://h:4222"),
        (StoreUnavailableError(f"twin store unavailable: {PYMONGO_TEXT}"), 4, "MongoDB"),
        (pymongo.errors.ServerSelectionTimeoutError(PYMONGO_TEXT), 4, "MongoDB unreachable"),
        (UnavailableError("cannot connect to NATS at nats://h"), 4, "cannot connect to NATS"),
        (NotProvisionedError("stream 'TWINHUB_EVENTS' does not exist after 120s"), 4, "stream"),
        (BinaryNotFoundError("mongo-server binary not found"), 2, "mongo-server binary"),
        (
            ServiceStartError(
                "nats-server (pid 7) exited with code 1 during start; log /d/nats.log:\n"
                "[7] [INF] Starting nats-server\n"
                '[7] [FTL] Error listening on port: 127.0.0.1:4222, "bind: address already in '
                'use"'
            ),
            3,
            "nats-server (pid 7) exited with code 1 during start; log /d/nats.log: [7] [FTL]",
        ),
        (
            ServiceStartError("mongo-server (pid 8) printed no READY line in time; log x:\nboom"),
            1,
            "mongo-server (pid 8) printed no READY line in time; log x: boom",
        ),
        # a task group's failure
        (ExceptionGroup("tg", [ConfigError("twin.batch: bad")]), 2, "configuration error"),
    ],
)
def test_known_failures_have_a_code_and_one_short_line(
    exc: BaseException, code: int, line: str
) -> None:
    found = classify(exc)
    assert found is not None
    assert found[0] == code
    assert found[1].startswith(line), found[1]
    assert "\n" not in found[1]
    assert "Topology Description" not in found[1]


def buggy_handler() -> None:
    try:
        raise StoreUnavailableError("down")
    except StoreUnavailableError:
        raise AttributeError("bug in the handler")  # noqa: B904


def test_an_unexpected_error_is_not_hidden() -> None:
    assert classify(KeyError("bug")) is None
    # a bug raised while a known failure was being handled keeps its traceback
    with pytest.raises(AttributeError) as info:
        buggy_handler()
    assert isinstance(info.value.__context__, StoreUnavailableError)
    assert classify(info.value) is None


def test_report_prints_the_line_and_logs_the_traceback_at_debug(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    exc = raised_from(UnreachableError("MongoDB", "mongodb://h", "no answer"), TimeoutError())
    with caplog.at_level(logging.DEBUG, logger="twinhub_cli.exitcodes"):
        assert exitcodes.report(exc, "twinhub twin run") == exitcodes.UNREACHABLE
    assert capsys.readouterr().err == (
        "twinhub twin run: MongoDB at mongodb://h unreachable: no answer\n"
    )
    (record,) = caplog.records
    assert record.levelno == logging.DEBUG and record.exc_info is not None
    assert exitcodes.report(KeyError("bug")) is None
    assert capsys.readouterr().err == ""


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


class Listener:
    """A TCP server as an async context manager (what the gateway's listeners are)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> Listener:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(asyncio.Protocol, "127.0.0.1", self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


async def test_listening_names_the_setting_of_the_busy_address(busy_port: int) -> None:
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        other = free.getsockname()[1]
    settings = {"gateway.tcp": ("127.0.0.1", other), "gateway.tls": ("127.0.0.1", busy_port)}
    with pytest.raises(PortInUseError) as info:
        async with listening(Listener(busy_port), settings):
            pass
    assert (info.value.setting, info.value.address) == ("gateway.tls", f"127.0.0.1:{busy_port}")
    assert info.value.errno == errno.EADDRINUSE


async def test_listening_passes_the_blocks_errors_and_other_os_errors(busy_port: int) -> None:
    settings = {"gateway.tcp": ("127.0.0.1", 0)}
    with pytest.raises(OSError, match="in the block") as info:
        async with listening(Listener(0), settings):
            raise OSError(errno.EADDRINUSE, "in the block")
    assert not isinstance(info.value, PortInUseError)
    with pytest.raises(OSError, match="permission denied") as refused:
        async with listening(Refusing(), settings):
            pass
    assert refused.value.errno == errno.EACCES and not isinstance(refused.value, PortInUseError)


class Refusing:
    async def __aenter__(self) -> None:
        raise OSError(errno.EACCES, "permission denied")

    async def __aexit__(self, *exc: object) -> None:
        raise AssertionError("never entered")

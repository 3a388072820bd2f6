"""The ``twinhub`` command as a user runs it: a subprocess (the CLI runs on uvloop), with only
the ``TWINHUB_*`` settings a test gives it."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass

from twinhub_cli import config as cfgmod

WAIT = 60.0


@dataclass(frozen=True)
class Ran:
    code: int
    out: str
    err: str

    @property
    def last_err(self) -> str:
        lines = self.err.splitlines()
        return lines[-1] if lines else ""


def environment(settings: Mapping[str, str] | None = None) -> dict[str, str]:
    """The test process's environment without its twinhub settings, plus ``settings``."""
    names = set(cfgmod.env_names())
    return {k: v for k, v in os.environ.items() if k not in names} | dict(settings or {})


async def start(
    *args: str, settings: Mapping[str, str] | None = None
) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "twinhub_cli.main",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=environment(settings),
    )


async def twinhub(
    *args: str, settings: Mapping[str, str] | None = None, within: float = WAIT
) -> Ran:
    """Run ``twinhub ARGS`` to its end (at most ``within`` seconds)."""
    proc = await start(*args, settings=settings)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), within)
    except TimeoutError:
        proc.kill()
        out, err = await proc.communicate()
        raise AssertionError(
            f"twinhub {' '.join(args)} still runs after {within:g} s; stderr:\n{err.decode()}"
        ) from None
    assert proc.returncode is not None
    return Ran(proc.returncode, out.decode(), err.decode())


def free_port(kind: socket.SocketKind = socket.SOCK_STREAM) -> int:
    """A port nothing listens on (closed again at once)."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port

"""Simple devices for the integration tests: libcoap's ``coap-client``, as ThingsBoard's docs
drive it (seed 004), against :class:`gateway.adapters.coap_udp.SimpleDeviceServer`."""

from __future__ import annotations

import asyncio
import re
import shutil
from dataclasses import dataclass

COAP_CLIENT = "coap-client-openssl"
_RESPONSE = re.compile(r"^v:1 t:(?:ACK|NON|CON) c:(\d\.\d\d) ", re.MULTILINE)


@dataclass(frozen=True)
class ClientResult:
    code: str  # the response code coap-client printed, "" when none came
    body: str  # what it printed of the response payload (the last line of its stdout)
    stdout: str
    stderr: str


async def coap_client(*args: str, timeout: float = 5.0) -> ClientResult:
    """Run ``coap-client-openssl -v 6 -B <timeout> ARGS``: with ``-v 6`` it prints every
    message it sends and receives (``v:1 t:ACK c:2.01 i:... [options] :: 'payload'``)."""
    exe = shutil.which(COAP_CLIENT)
    assert exe is not None, f"{COAP_CLIENT} is missing: apt-get install libcoap3-bin"
    proc = await asyncio.create_subprocess_exec(
        exe,
        "-v",
        "6",
        "-B",
        str(int(timeout)),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout + 10)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    stdout, stderr = out.decode(errors="replace"), err.decode(errors="replace")
    codes = _RESPONSE.findall(stdout)
    lines = [line for line in stdout.splitlines() if line and not line.startswith("v:1 ")]
    return ClientResult(codes[-1] if codes else "", lines[-1] if lines else "", stdout, stderr)

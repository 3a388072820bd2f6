"""Baseline servers for the gateway's cost per TLS device and notification (issue 13, item 7).

    .venv/bin/python bench/baseline_servers.py --kind aiocoap|lean|wire --cert CRT --key KEY
        [--host 127.0.0.1] [--port 0]

Each is a TLS CoAP-over-TCP (RFC 8323) server that accepts the simulated devices of
:mod:`devicesim` as the gateway does, and does nothing else the gateway does: it answers their
sign-up, sign-in (and sign-out) and publish POSTs with the least the simulator accepts (2.04
and a fixed CBOR body), then observes ``/oic/res?if=oic.if.b`` on every connection right after
the publish and counts the notifications. No token check, no event, no bus: what is left is the
floor of "TLS + CoAP over TCP + one observation per device" against which the gateway's CPU per
notification and memory per idle signed-in device are compared (``wire_baselines_bench.py``).

* ``aiocoap`` -- aiocoap's own TLS server (``aiocoap.cli.common.server_context_from_arguments``,
  its ``tlsserver`` transport) with a resource site, and the observations made through
  ``Context.request`` on the device's connection (``Message.remote``); public API only.
* ``lean`` -- an ``asyncio.Protocol`` over uvloop's TLS transport that cuts messages with
  :class:`gateway.adapters.coap_frames.Deframer` and writes them with ``encode_frame``: our CSM,
  Pong to a Ping, the three answers, one GET with Observe=0, a counter. No per-message object
  beyond the parsed frame: the cheapest RFC 8323 reader there is in Python.
* ``wire`` -- the same behaviour on :class:`gateway.wire.protocol.CoapTcpProtocol` (the sans-IO
  connection of issue 13 item 1: tokens, CSM, Ping, observation sequence numbers, deadlines),
  to show what that connection costs over ``lean``.

Protocol with the benchmark: the first stdout line is JSON ``{"type": "ready", "port": P, ...}``;
then every line ``stats`` (or ``{"cmd": "stats"}``) on stdin is answered with one JSON status
line: notifications counted, connections open, observations established, requests answered by
kind, reads (``data_received`` calls; lean and wire), this process's CPU seconds. End of stdin,
SIGTERM or SIGINT stop the server (a last status line goes out). Progress and errors go to
stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import ssl
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cbor2

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from anywhere: the project's packages
    sys.path.insert(0, str(REPO))

OCF_CBOR = 10000
# Option numbers (RFC 7252, 7641; RFC 8323 signalling)
OBSERVE, URI_PATH, CONTENT_FORMAT, URI_QUERY = 6, 11, 12, 15
CSM, PING, PONG, RELEASE, ABORT = 225, 226, 227, 228, 229
CSM_MAX_MESSAGE_SIZE = 2
POST, GET = 2, 1
CHANGED, NOT_FOUND = 68, 132
MAX_MESSAGE_SIZE = 16384

# The bodies the simulator needs (devicesim.ocf.parse_sign_up / parse_sign_in): a registration
# that never expires (expiresin 0: no refresh), a session that never expires.
SIGN_UP_BODY = cbor2.dumps(
    {"uid": "baseline", "accesstoken": "baseline-token", "refreshtoken": "", "expiresin": 0}
)
SESSION_BODY = cbor2.dumps({"expiresin": 0})
OBSERVE_PATH = ("oic", "res")
OBSERVE_QUERY = "if=oic.if.b"


def say(text: str) -> None:
    sys.stderr.write(f"[baseline {time.strftime('%H:%M:%S')}] {text}\n")
    sys.stderr.flush()


def emit(msg: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(msg) + "\n")
    sys.stdout.flush()


@dataclass
class Counters:
    """What a baseline has seen; the benchmark reads it through ``stats``."""

    notifications: int = 0
    connections: int = 0
    connections_total: int = 0
    observing: int = 0
    requests: dict[str, int] = field(
        default_factory=lambda: {"sign_up": 0, "session": 0, "publish": 0, "other": 0}
    )
    pings: int = 0
    errors: int = 0
    reads: int = 0  # data_received calls (lean, wire): how many notifications one read brings

    def snapshot(self, kind: str) -> dict[str, Any]:
        return {
            "type": "stats",
            "kind": kind,
            "notifications": self.notifications,
            "connections": self.connections,
            "connections_total": self.connections_total,
            "observing": self.observing,
            "requests": dict(self.requests),
            "pings": self.pings,
            "errors": self.errors,
            "reads": self.reads,
            "cpu_s": round(time.process_time(), 6),
        }


def answer_for(path: tuple[str, ...]) -> tuple[str, bytes]:
    """(request kind, 2.04 body) for the POST of a device to ``path``."""
    last = path[-1] if path else ""
    if last == "account":
        return "sign_up", SIGN_UP_BODY
    if last == "session":
        return "session", SESSION_BODY
    if last == "rd":
        return "publish", b""
    return "other", b""


def free_port(host: str) -> int:
    """A TCP port nothing listens on now (and its predecessor, for aiocoap's bind)."""
    import socket

    while True:
        with socket.socket() as s:
            s.bind((host, 0))
            port: int = s.getsockname()[1]
        if port > 1024:
            return port


def server_tls(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    context.set_alpn_protocols(["coap"])
    return context


# -- aiocoap ---------------------------------------------------------------------------------


async def serve_aiocoap(args: argparse.Namespace, counters: Counters) -> tuple[int, Any]:
    """aiocoap's TLS server; returns (port, what to shut down)."""
    import aiocoap
    from aiocoap import resource
    from aiocoap.cli.common import server_context_from_arguments

    context: Any = None
    observations: set[asyncio.Task[None]] = set()  # held: a task nobody holds may vanish

    def observe(remote: Any) -> None:
        msg = aiocoap.Message(
            code=aiocoap.GET, uri_path=OBSERVE_PATH, uri_query=(OBSERVE_QUERY,), observe=0
        )
        msg.remote = remote
        request = context.request(msg, handle_blockwise=False)
        task = asyncio.create_task(follow(request))
        observations.add(task)
        task.add_done_callback(observations.discard)

    async def follow(request: Any) -> None:
        """One observation, as aiocoap's documentation has it: the response, then
        ``async for`` over its notifications until the connection ends."""
        try:
            response = await request.response
        except Exception:
            counters.errors += 1
            return
        if response.opt.observe is None:
            return
        counters.observing += 1
        try:
            async for _ in request.observation:
                counters.notifications += 1
        except Exception:
            pass  # the connection ended: so does the observation
        finally:
            counters.observing -= 1

    class Post(resource.Resource):  # type: ignore[misc]  # aiocoap is untyped
        def __init__(self, kind: str, body: bytes) -> None:
            super().__init__()
            self.kind = kind
            self.body = body

        async def needs_blockwise_assembly(self, request: Any) -> bool:
            return False

        async def render_post(self, request: Any) -> Any:
            counters.requests[self.kind] += 1
            if self.kind == "publish":
                asyncio.get_running_loop().call_soon(observe, request.remote)
            if self.body:
                return aiocoap.Message(
                    code=aiocoap.CHANGED, payload=self.body, content_format=OCF_CBOR
                )
            return aiocoap.Message(code=aiocoap.CHANGED)

    site = resource.Site()
    for path in (("oic", "sec", "account"), ("oic", "sec", "session"), ("oic", "rd")):
        kind, body = answer_for(path)
        site.add_resource(path, Post(kind, body))
    # aiocoap's TLS server listens on the port it is given plus one (5684 for 5683), and on
    # its default port for none: ask for the one below the port we want.
    port = args.port or free_port(args.host)
    options = argparse.Namespace(
        bind=(args.host, port - 1),
        tls_server_certificate=str(args.cert),
        tls_server_key=str(args.key),
        credentials=None,
    )
    context = await server_context_from_arguments(site, options, transports=["tlsserver"])
    return port, context


# -- lean: Deframer + encode_frame on an asyncio Protocol --------------------------------------


OBSERVE_TOKEN = b"\x01"


def make_lean(counters: Counters) -> Callable[[], asyncio.Protocol]:
    from gateway.adapters.coap_frames import Deframer, Frame, FrameError, encode_frame

    our_csm = encode_frame(
        Frame(CSM, b"", ((CSM_MAX_MESSAGE_SIZE, MAX_MESSAGE_SIZE.to_bytes(2, "big")),))
    )
    observe_request = encode_frame(
        Frame(
            GET,
            OBSERVE_TOKEN,
            (
                (OBSERVE, b""),
                *((URI_PATH, p.encode()) for p in OBSERVE_PATH),
                (URI_QUERY, OBSERVE_QUERY.encode()),
            ),
        )
    )
    cbor_format = ((CONTENT_FORMAT, OCF_CBOR.to_bytes(2, "big")),)

    class Lean(asyncio.Protocol):
        __slots__ = ("deframer", "established", "transport")

        def __init__(self) -> None:
            self.deframer = Deframer(MAX_MESSAGE_SIZE)
            self.transport: asyncio.Transport | None = None
            self.established = False

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
            counters.connections += 1
            counters.connections_total += 1
            transport.write(our_csm)  # type: ignore[attr-defined]

        def connection_lost(self, exc: Exception | None) -> None:
            counters.connections -= 1
            if self.established:
                counters.observing -= 1
            self.transport = None

        def data_received(self, data: bytes) -> None:
            counters.reads += 1
            deframer = self.deframer
            deframer.feed(data)
            out = bytearray()
            try:
                while (frame := deframer.next()) is not None:
                    code = frame.code
                    if 64 <= code < 192:  # a response: ours is the only request
                        if frame.token == OBSERVE_TOKEN:
                            if self.established:
                                counters.notifications += 1
                            else:
                                self.established = True
                                counters.observing += 1
                    elif code == POST:
                        path = tuple(v.decode() for n, v in frame.options if n == URI_PATH)
                        kind, body = answer_for(path)
                        counters.requests[kind] += 1
                        options = cbor_format if body else ()
                        out += encode_frame(Frame(CHANGED, frame.token, options, body))
                        if kind == "publish":
                            out += observe_request
                    elif 1 <= code < 32:
                        counters.requests["other"] += 1
                        out += encode_frame(Frame(NOT_FOUND, frame.token, (), b""))
                    elif code == PING:
                        counters.pings += 1
                        out += encode_frame(Frame(PONG, frame.token, (), b""))
                    elif code in (RELEASE, ABORT):
                        if self.transport is not None:
                            self.transport.close()
                        return
            except FrameError as e:
                counters.errors += 1
                say(f"lean: {e}")
                if self.transport is not None:
                    self.transport.abort()
                return
            if out and self.transport is not None:
                self.transport.write(bytes(out))

    return Lean


# -- wire: gateway.wire.CoapTcpProtocol ---------------------------------------------------------


def make_wire(counters: Counters) -> Callable[[], asyncio.Protocol]:
    from gateway.adapters.coap_frames import Frame
    from gateway.wire import events as ev
    from gateway.wire.protocol import CoapTcpProtocol

    observe_request = Frame(
        GET,
        b"",
        (*((URI_PATH, p.encode()) for p in OBSERVE_PATH), (URI_QUERY, OBSERVE_QUERY.encode())),
    )
    cbor_format = ((CONTENT_FORMAT, OCF_CBOR.to_bytes(2, "big")),)
    Notification, Request, Response = (
        ev.NotificationReceived,
        ev.RequestReceived,
        ev.ResponseReceived,
    )

    def on_event(protocol: CoapTcpProtocol, event: ev.Event) -> None:
        kind = type(event)
        if kind is Notification:
            counters.notifications += 1
        elif kind is Request:
            assert isinstance(event, ev.RequestReceived)
            frame = event.frame
            if frame.code == POST:
                path = tuple(v.decode() for n, v in frame.options if n == URI_PATH)
                what, body = answer_for(path)
                counters.requests[what] += 1
                options = cbor_format if body else ()
                protocol.send_response(event.handle, Frame(CHANGED, b"", options, body))
                if what == "publish":
                    protocol.observe(observe_request)
            else:
                counters.requests["other"] += 1
                protocol.send_response(event.handle, Frame(NOT_FOUND, b"", (), b""))
        elif kind is Response:
            assert isinstance(event, ev.ResponseReceived)
            if not event.last:
                assert isinstance(protocol, Wire)
                protocol.established = True
                counters.observing += 1
        elif kind is ev.PingReceived:
            counters.pings += 1
        elif kind is ev.ReleaseReceived:
            protocol.close()

    class Wire(CoapTcpProtocol):
        __slots__ = ("established",)

        def __init__(self) -> None:
            super().__init__(on_event)
            self.established = False

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            counters.connections += 1
            counters.connections_total += 1
            super().connection_made(transport)

        def data_received(self, data: bytes) -> None:
            counters.reads += 1
            super().data_received(data)

        def connection_lost(self, exc: Exception | None) -> None:
            super().connection_lost(exc)
            counters.connections -= 1
            if self.established:
                counters.observing -= 1
                self.established = False

    return Wire


# -- main ------------------------------------------------------------------------------------


async def read_commands(counters: Counters, kind: str, stop: asyncio.Event) -> None:
    """``stats`` lines on stdin, a status line each on stdout; end of stdin stops."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    try:
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    except (OSError, ValueError):  # stdin is no pipe (a terminal is fine; /dev/null is not)
        return
    while True:
        line = await reader.readline()
        if not line:
            stop.set()
            return
        text = line.decode(errors="replace").strip()
        with contextlib.suppress(ValueError):
            cmd = json.loads(text)
            if isinstance(cmd, dict):
                text = str(cmd.get("cmd", ""))
        if text == "stats":
            emit(counters.snapshot(kind))
        elif text == "stop":
            stop.set()
            return
        elif text:
            emit({"type": "error", "error": f"unknown command {text!r}"})


async def run(args: argparse.Namespace) -> int:
    counters = Counters()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    if args.kind == "aiocoap":
        # aiocoap keeps its connections to itself: "connections" stays 0, "observing" counts
        port, context = await serve_aiocoap(args, counters)
        close: Callable[[], Any] = context.shutdown
    else:
        factory = make_lean(counters) if args.kind == "lean" else make_wire(counters)
        server = await loop.create_server(
            factory, args.host, args.port, ssl=server_tls(args.cert, args.key), backlog=4096
        )
        port = server.sockets[0].getsockname()[1]

        async def close_server() -> None:
            server.close()

        close = close_server
    emit({"type": "ready", "kind": args.kind, "host": args.host, "port": port})
    say(f"{args.kind} baseline listening on coaps+tcp://{args.host}:{port}")
    commands = asyncio.create_task(read_commands(counters, args.kind, stop))
    try:
        await stop.wait()
    finally:
        commands.cancel()
        emit(counters.snapshot(args.kind))
        with contextlib.suppress(Exception):
            await asyncio.wait_for(close(), 5)
    return 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--kind", choices=("aiocoap", "lean", "wire"), required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="TLS port (0: a free one)")
    p.add_argument("--cert", type=Path, required=True, help="server certificate (PEM)")
    p.add_argument("--key", type=Path, required=True, help="its private key (PEM)")
    return p.parse_args(argv)


def main() -> int:
    import uvloop

    return uvloop.run(run(parse_args(sys.argv[1:])))


if __name__ == "__main__":
    sys.exit(main())

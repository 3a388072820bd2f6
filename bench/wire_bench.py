"""CPU per received notification through our RFC 8323 connection (issue 13, item 1).

    .venv/bin/python bench/wire_bench.py [--frames 200000] [--repeats 5] [--quick] [--output FILE]

One process, no I/O: a stream of identical-shaped notifications of one established observation
(token of 1 byte, Observe of 3, Content-Format 10000, OCF-Content-Format-Version, a 48-byte
CBOR payload; 64 bytes on the wire) is fed as bytes, and the CPU time (``process_time``) per
notification is measured, best of ``--repeats``, for:

* ``deframer`` -- :class:`gateway.adapters.coap_frames.Deframer` alone (feed + next): the
  baseline, framing and parsing only;
* ``connection`` -- :class:`gateway.wire.connection.CoapTcpConnection`: ``receive_data``, token
  matching, RFC 7641 freshness and the :class:`~gateway.wire.events.NotificationReceived` event,
  read with ``events()``;
* ``aiocoap_decode`` -- aiocoap's public parser, ``aiocoap.Message.decode``, on the same message
  in its RFC 7252 (UDP) form: aiocoap's TCP parser is private, and the option decoding is the
  same work (no token matching, no dispatch: a floor for aiocoap's per-message cost).

Each is run with the stream cut in 16 KiB pieces (a busy connection: many messages per read)
and one message per read (an idle one). ``memory`` is what one idle connection core holds
(``tracemalloc``, over ``--connections`` of them): CSMs exchanged, one established observation,
its bytes read.

``tls`` runs the real thing on loopback, on uvloop: :class:`gateway.wire.protocol.CoapTcpProtocol`
behind ``loop.create_server(ssl=...)`` (development PKI of :mod:`twinhub_cli.pki`, no client
certificate) observes ``/oic/d`` of one device, a child process (this script, ``sender``) that
answers and then streams ``--tls-frames`` notifications as fast as it can, in writes of 64
(``burst``) or one TLS record each (``per_record``). The figure is this process's CPU (TLS,
event loop, driver, connection, the event) per notification, from the first response to the
last notification: the "lean TLS + RFC 8323" floor of issue 13. Output: one JSON document with
the machine described.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import ssl
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import benchutil

from gateway.adapters.coap_frames import Deframer, Frame, encode_frame
from gateway.wire import events as ev
from gateway.wire.connection import CoapTcpConnection, ConnectionConfig
from gateway.wire.options import encode_uint
from gateway.wire.protocol import CoapTcpProtocol
from twinhub_cli import pki as devpki

OBSERVE, URI_PATH, CONTENT_FORMAT, OCF_VERSION = 6, 11, 12, 2053
PAYLOAD = bytes.fromhex("a3617818") + b"\x2a" + b"\x61y\x78\x20" + b"z" * 32 + b"\x61n\xf5" * 2
CHUNK = 16 * 1024


def notification(token: bytes, seq: int) -> Frame:
    return Frame(
        69,
        token,
        (
            (OBSERVE, seq.to_bytes(3, "big")),
            (CONTENT_FORMAT, encode_uint(10000)),
            (OCF_VERSION, encode_uint(0x0800)),
        ),
        PAYLOAD,
    )


def stream(frames: int, token: bytes) -> list[bytes]:
    return [encode_frame(notification(token, 1 + i % 0xFFFFF0)) for i in range(frames)]


def chunked(messages: list[bytes], per_message: bool) -> list[bytes]:
    if per_message:
        return messages
    whole = b"".join(messages)
    return [whole[i : i + CHUNK] for i in range(0, len(whole), CHUNK)]


def run_deframer(chunks: list[bytes]) -> int:
    deframer = Deframer(16384)
    n = 0
    for chunk in chunks:
        deframer.feed(chunk)
        while deframer.next() is not None:
            n += 1
    return n


def run_connection(chunks: list[bytes]) -> int:
    conn = CoapTcpConnection(ConnectionConfig(), now=0.0)
    handle = conn.observe(Frame(1, b"", ((URI_PATH, b"oic"), (URI_PATH, b"d"))))
    conn.receive_data(encode_frame(notification(handle.token, 0)))
    conn.events()
    n = 0
    for chunk in chunks:
        conn.receive_data(chunk)
        for event in conn.events():
            if type(event) is ev.NotificationReceived:
                n += 1
    return n


def aiocoap_messages(frames: int) -> list[bytes] | None:
    try:
        import aiocoap
        from aiocoap.optiontypes import UintOption
    except ImportError:
        return None
    out = []
    for i in range(frames):
        message = aiocoap.Message(
            code=aiocoap.CONTENT, payload=PAYLOAD, observe=1 + i % 0xFFFFF0, content_format=10000
        )
        message.mtype, message.mid, message.token = aiocoap.NON, i & 0xFFFF, b"\x01"
        message.opt.add_option(UintOption(OCF_VERSION, 0x0800))
        out.append(message.encode())
    return out


def run_aiocoap(datagrams: list[bytes]) -> int:
    import aiocoap

    n = 0
    for datagram in datagrams:
        message = aiocoap.Message.decode(datagram)
        if message.opt.observe is not None:
            n += 1
    return n


def measure(
    fn: Callable[[list[bytes]], int], chunks: list[bytes], frames: int, repeats: int
) -> dict[str, Any]:
    times = []
    for _ in range(repeats):
        start = time.process_time_ns()
        count = fn(chunks)
        times.append(time.process_time_ns() - start)
        if count != frames:
            raise AssertionError(f"{fn.__name__}: {count} of {frames} frames seen")
    best = min(times)
    return {
        "us_per_frame": round(best / frames / 1000, 3),
        "us_per_frame_median": round(sorted(times)[len(times) // 2] / frames / 1000, 3),
        "frames_per_cpu_s": round(frames / (best / 1e9)),
    }


def memory_per_connection(connections: int) -> dict[str, Any]:
    peer_csm = encode_frame(Frame(225, b"", ((2, encode_uint(8192)),)))
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    held = []
    for _ in range(connections):
        conn = CoapTcpConnection(ConnectionConfig(), now=0.0)
        handle = conn.observe(Frame(1, b"", ((URI_PATH, b"oic"), (URI_PATH, b"d"))))
        conn.receive_data(peer_csm + encode_frame(notification(handle.token, 0)))
        conn.events()
        conn.data_to_send()
        held.append(conn)
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return {
        "connections": connections,
        "bytes_per_connection": round((after - before) / connections),
    }


def run_sender(port: int, ca: str, frames: int, batch: int) -> int:
    """The device of the ``tls`` run (a child process): CSM, answer the observation, stream."""
    context = ssl.create_default_context(cafile=ca)
    with (
        socket.create_connection(("127.0.0.1", port)) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        tls.sendall(encode_frame(Frame(225, b"", ((2, encode_uint(1 << 20)),))))
        deframer = Deframer(1 << 20)
        token = None
        while token is None:
            deframer.feed(tls.recv(1 << 16))
            while (frame := deframer.next()) is not None:
                if frame.code == 1:
                    token = frame.token
        messages = stream(frames, token)
        tls.sendall(encode_frame(notification(token, 0)))
        for i in range(0, frames, batch):
            tls.sendall(b"".join(messages[i : i + batch]))
        while tls.recv(1 << 16):  # until the server closes
            pass
    return 0


def tls_run(frames: int, batch: int) -> dict[str, Any]:
    import uvloop

    with tempfile.TemporaryDirectory() as tmp:
        ca = devpki.create_ca(Path(tmp))
        issued = devpki.issue_server(ca, Path(tmp), ["127.0.0.1"])
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(issued.cert_path, issued.key_path)
        marks: dict[str, float] = {}

        async def serve() -> None:
            loop = asyncio.get_running_loop()
            done = asyncio.Event()
            seen = 0

            def on_event(protocol: CoapTcpProtocol, event: ev.Event) -> None:
                nonlocal seen
                if type(event) is ev.NotificationReceived:
                    seen += 1
                    if seen == frames:
                        marks["cpu_end"], marks["wall_end"] = time.process_time(), time.time()
                        protocol.close()
                        done.set()
                elif type(event) is ev.ResponseReceived:
                    marks["cpu_start"], marks["wall_start"] = time.process_time(), time.time()

            def on_open(protocol: CoapTcpProtocol) -> None:
                protocol.observe(Frame(1, b"", ((URI_PATH, b"oic"), (URI_PATH, b"d"))))

            server = await loop.create_server(
                lambda: CoapTcpProtocol(on_event, on_open=on_open), "127.0.0.1", 0, ssl=context
            )
            port = server.sockets[0].getsockname()[1]
            command = [sys.executable, __file__, "sender", str(port), str(ca.cert_path)]
            child = await asyncio.create_subprocess_exec(*command, str(frames), str(batch))
            try:
                async with asyncio.timeout(600):
                    await done.wait()
                    await child.wait()
            finally:
                if child.returncode is None:
                    child.kill()
                    await child.wait()
                server.close()
                await server.wait_closed()
            if child.returncode != 0:
                raise RuntimeError(f"the sender exited {child.returncode}")

        uvloop.run(serve())
    cpu = marks["cpu_end"] - marks["cpu_start"]
    wall = marks["wall_end"] - marks["wall_start"]
    return {
        "us_cpu_per_notification": round(cpu / frames * 1e6, 3),
        "notifications_per_s": round(frames / wall) if wall > 0 else None,
        "server_cpu_share": round(cpu / wall, 2) if wall > 0 else None,
    }


def main() -> int:
    if sys.argv[1:2] == ["sender"]:
        port, ca, frames, batch = sys.argv[2:6]
        return run_sender(int(port), ca, int(frames), int(batch))
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--tls-frames", type=int, default=200_000)
    parser.add_argument("--quick", action="store_true", help="a few thousand frames, 2 repeats")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    frames, repeats = (5_000, 2) if args.quick else (args.frames, args.repeats)
    connections = 500 if args.quick else args.connections
    tls_frames = 5_000 if args.quick else args.tls_frames
    messages = stream(frames, b"\x01")
    datagrams = aiocoap_messages(frames)
    results: dict[str, Any] = {}
    for mode, per_message in (("chunks_16k", False), ("one_per_read", True)):
        chunks = chunked(messages, per_message)
        row = {
            "deframer": measure(run_deframer, chunks, frames, repeats),
            "connection": measure(run_connection, chunks, frames, repeats),
        }
        if datagrams is not None:
            row["aiocoap_decode"] = measure(run_aiocoap, datagrams, frames, repeats)
        base = row["deframer"]["us_per_frame"]
        row["connection_over_deframer"] = round(row["connection"]["us_per_frame"] / base, 2)
        if datagrams is not None:
            row["aiocoap_decode_over_connection"] = round(
                row["aiocoap_decode"]["us_per_frame"] / row["connection"]["us_per_frame"], 2
            )
        results[mode] = row
    document = {
        "bench": "wire",
        "quick": args.quick,
        "params": {
            "frames": frames,
            "repeats": repeats,
            "frame_bytes": len(messages[0]),
            "chunk_bytes": CHUNK,
            "connections": connections,
            "tls_frames": tls_frames,
        },
        "results": results,
        "memory": memory_per_connection(connections),
        "tls": {
            "burst": tls_run(tls_frames, 64),
            "per_record": tls_run(tls_frames, 1),
        },
        "machine": benchutil.machine(),
    }
    text = json.dumps(document, indent=1)
    if args.output is not None:
        args.output.write_text(text + "\n")
    sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

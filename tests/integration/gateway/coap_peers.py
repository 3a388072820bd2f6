"""Test peers for the CoAP device adapter: a raw RFC 8323 device and throwaway TLS material.

The raw peer frames messages itself (no aiocoap), so it can do what OCF devices do and aiocoap
does not: send a request before any CSM, flood notifications, stay silent, never read.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import socket
import ssl
import threading
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# codes
GET, POST, PUT, DELETE = 1, 2, 3, 4
CONTENT, CHANGED, NOT_FOUND, SERVICE_UNAVAILABLE = 69, 68, 132, 163
CSM, PING, PONG, RELEASE, ABORT = 225, 226, 227, 228, 229
# options
OBSERVE, URI_PATH, CONTENT_FORMAT, URI_QUERY, ACCEPT = 6, 11, 12, 15, 17
MAX_MESSAGE_SIZE = 2  # in a CSM
OCF_ACCEPT_VERSION, OCF_VERSION = 2049, 2053

DEADLINE = 10.0  # seconds: any wait for an expected event


def uint(value: int) -> bytes:
    return value.to_bytes((value.bit_length() + 7) // 8, "big")


def _ext(value: int) -> tuple[int, bytes]:
    if value < 13:
        return value, b""
    if value < 269:
        return 13, (value - 13).to_bytes(1, "big")
    if value < 65805:
        return 14, (value - 269).to_bytes(2, "big")
    return 15, (value - 65805).to_bytes(4, "big")


@dataclass(frozen=True)
class Frame:
    code: int
    token: bytes = b""
    options: tuple[tuple[int, bytes], ...] = ()
    payload: bytes = b""

    def values(self, number: int) -> list[bytes]:
        return [v for n, v in self.options if n == number]

    def value(self, number: int) -> bytes | None:
        found = self.values(number)
        return found[0] if found else None

    def uint(self, number: int) -> int | None:
        value = self.value(number)
        return None if value is None else int.from_bytes(value, "big")

    @property
    def path(self) -> str:
        return "/" + "/".join(v.decode() for v in self.values(URI_PATH))

    @property
    def query(self) -> tuple[str, ...]:
        return tuple(v.decode() for v in self.values(URI_QUERY))

    def encode(self) -> bytes:
        body = bytearray()
        last = 0
        for number, value in sorted(self.options, key=lambda o: o[0]):
            delta, delta_ext = _ext(number - last)
            length, length_ext = _ext(len(value))
            body += bytes([(delta << 4) | length]) + delta_ext + length_ext + value
            last = number
        if self.payload:
            body += b"\xff" + self.payload
        length, length_ext = _ext(len(body))
        return (
            bytes([(length << 4) | len(self.token)])
            + length_ext
            + bytes([self.code])
            + (self.token + bytes(body))
        )


def request(
    code: int,
    path: str,
    token: bytes,
    *,
    query: Iterable[str] = (),
    payload: bytes = b"",
    options: Iterable[tuple[int, bytes]] = (),
) -> Frame:
    opts = [(URI_PATH, p.encode()) for p in path.strip("/").split("/") if p]
    opts += [(URI_QUERY, q.encode()) for q in query]
    opts += list(options)
    return Frame(code, token, tuple(opts), payload)


def parse(buffer: bytes) -> tuple[Frame, int] | None:
    """One frame from the front of ``buffer`` and its size, or None when incomplete."""
    if not buffer:
        return None
    length, tkl = buffer[0] >> 4, buffer[0] & 0x0F
    ext = {13: 1, 14: 2, 15: 4}.get(length, 0)
    if len(buffer) < 1 + ext:
        return None
    if ext:
        length = int.from_bytes(buffer[1 : 1 + ext], "big") + {1: 13, 2: 269, 4: 65805}[ext]
    start = 1 + ext
    total = start + 1 + tkl + length
    if len(buffer) < total:
        return None
    code = buffer[start]
    token = buffer[start + 1 : start + 1 + tkl]
    rest = buffer[start + 1 + tkl : total]
    options: list[tuple[int, bytes]] = []
    number = 0
    while rest and rest[0] != 0xFF:
        delta, olen = rest[0] >> 4, rest[0] & 0x0F
        pos = 1
        for which in ("delta", "len"):
            v = delta if which == "delta" else olen
            if v == 13:
                v = rest[pos] + 13
                pos += 1
            elif v == 14:
                v = int.from_bytes(rest[pos : pos + 2], "big") + 269
                pos += 2
            if which == "delta":
                delta = v
            else:
                olen = v
        number += delta
        options.append((number, bytes(rest[pos : pos + olen])))
        rest = rest[pos + olen :]
    payload = bytes(rest[1:]) if rest else b""
    return Frame(code, bytes(token), tuple(options), payload), total


@dataclass
class RawPeer:
    """A device speaking raw RFC 8323 over a real socket."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    _buffer: bytes = b""
    _tokens: int = field(default=0)

    @classmethod
    async def connect(
        cls,
        address: tuple[str, int],
        ssl_context: ssl.SSLContext | None = None,
        *,
        local_host: str | None = None,
    ) -> RawPeer:
        reader, writer = await asyncio.open_connection(
            address[0],
            address[1],
            ssl=ssl_context,
            server_hostname=address[0] if ssl_context else None,
            local_addr=None if local_host is None else (local_host, 0),
        )
        return cls(reader, writer)

    def token(self) -> bytes:
        self._tokens += 1
        return self._tokens.to_bytes(4, "big")

    def send(self, *frames: Frame) -> None:
        self.writer.write(b"".join(f.encode() for f in frames))

    async def recv(self, timeout: float = DEADLINE) -> Frame:
        async with asyncio.timeout(timeout):
            while True:
                parsed = parse(self._buffer)
                if parsed is not None:
                    frame, size = parsed
                    self._buffer = self._buffer[size:]
                    return frame
                data = await self.reader.read(65536)
                if not data:
                    raise EOFError("connection closed by the server")
                self._buffer += data

    async def recv_until(self, code: int, timeout: float = DEADLINE) -> Frame:
        """Skip frames (e.g. the server's CSM, Pings) until one with ``code``."""
        async with asyncio.timeout(timeout):
            while True:
                frame = await self.recv(timeout)
                if frame.code == code:
                    return frame

    async def recv_request(self, timeout: float = DEADLINE) -> Frame:
        """The next request from the server, skipping signalling."""
        async with asyncio.timeout(timeout):
            while True:
                frame = await self.recv(timeout)
                if 1 <= frame.code < 32:
                    return frame

    async def expect_eof(self, timeout: float = DEADLINE) -> list[Frame]:
        """Read until the server closes (then close our end); returns what came before."""
        frames = []
        try:
            async with asyncio.timeout(timeout):
                while True:
                    frames.append(await self.recv(timeout))
        except (EOFError, ConnectionResetError):
            self.writer.transport.abort()
            return frames

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await self.writer.wait_closed()


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def ipv6_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------- TLS material


@dataclass(frozen=True)
class Pki:
    """A throwaway CA, a server certificate for loopback and an OCF identity client certificate."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    device_id: str

    def server_context(self, *, client_cert: bool = True) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.server_cert, self.server_key)
        if client_cert:
            ctx.load_verify_locations(self.ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def client_context(self, *, client_cert: bool = True, alpn: bool = True) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(self.ca)
        if client_cert:
            ctx.load_cert_chain(self.client_cert, self.client_key)
        if alpn:
            ctx.set_alpn_protocols(["coap"])
        return ctx


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(
    path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> tuple[Path, Path]:
    cert_path, key_path = path.with_suffix(".crt"), path.with_suffix(".key")
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def make_pki(directory: Path) -> Pki:
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("twinhub test CA"))
        .issuer_name(_name("twinhub test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(
        cn: str, usage: x509.ObjectIdentifier, sans: list[x509.GeneralName]
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return builder.sign(ca_key, hashes.SHA256()), key

    server, server_key = leaf(
        "localhost",
        ExtendedKeyUsageOID.SERVER_AUTH,
        [
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("::1")),
        ],
    )
    device_id = str(uuid.uuid4())
    client, client_key = leaf(f"uuid:{device_id}", ExtendedKeyUsageOID.CLIENT_AUTH, [])
    ca_path = directory / "ca.crt"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    server_cert, server_key_path = _write(directory / "server", server, server_key)
    client_cert, client_key_path = _write(directory / "client", client, client_key)
    return Pki(ca_path, server_cert, server_key_path, client_cert, client_key_path, device_id)


def run_in_thread(target: Callable[[], None]) -> None:
    """Run on a fresh event loop in another thread (the test session's loop stays untouched)."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            target()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, name="other-loop")
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "scenario did not finish"
    if errors:
        raise errors[0]

"""The DTLS terminator's pure parts: record framing, cookies, and the session table.

The DTLS engine itself (OpenSSL through pyOpenSSL, on memory BIOs) lives in
``gateway/adapters/dtls.py``; what is here needs no library and no clock (time is an input):

* DTLS 1.2 record framing (RFC 6347 section 4.1): a memory BIO hands back a whole flight as
  one byte string, which must be cut into records and packed into datagrams of at most one MTU.
* Stateless cookies for the HelloVerifyRequest (RFC 6347 section 4.2.1): an HMAC of the
  client's address and a time epoch, so a spoofed ClientHello costs the server no state.
* The session table: at most ``max_sessions`` peers, an idle deadline per peer, and the
  mapping from a session's relay address (what the plain CoAP server sees) to the device.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import ipaddress
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Final, Generic, TypeVar

Address = tuple[str, int]

RECORD_HEADER: Final = 13  # type, version (2), epoch (2), sequence number (6), length (2)
CONTENT_HANDSHAKE: Final = 22
HANDSHAKE_CLIENT_HELLO: Final = 1


class FramingError(ValueError):
    """Bytes that are not a sequence of whole DTLS records."""


def split_records(data: bytes) -> list[bytes]:
    """Cut a byte string of back-to-back DTLS records into the records."""
    records: list[bytes] = []
    at = 0
    while at < len(data):
        if len(data) - at < RECORD_HEADER:
            raise FramingError(f"truncated record header at {at}")
        length = int.from_bytes(data[at + 11 : at + 13], "big")
        end = at + RECORD_HEADER + length
        if end > len(data):
            raise FramingError(f"record at {at} claims {length} bytes, {len(data) - at} left")
        records.append(data[at:end])
        at = end
    return records


def pack_datagrams(records: Iterable[bytes], mtu: int) -> list[bytes]:
    """Pack records, in order, into as few datagrams of at most ``mtu`` bytes as greedy allows.

    A record larger than ``mtu`` goes alone (OpenSSL fragments handshake messages to its MTU, so
    this happens only if the MTU was set smaller than OpenSSL's own).
    """
    datagrams: list[bytes] = []
    current = b""
    for record in records:
        if current and len(current) + len(record) > mtu:
            datagrams.append(current)
            current = b""
        current += record
    if current:
        datagrams.append(current)
    return datagrams


def is_client_hello(datagram: bytes) -> bool:
    """Whether the datagram starts with an unencrypted (epoch 0) ClientHello record."""
    return (
        len(datagram) > RECORD_HEADER
        and datagram[0] == CONTENT_HANDSHAKE
        and datagram[3:5] == b"\x00\x00"
        and datagram[RECORD_HEADER] == HANDSHAKE_CLIENT_HELLO
    )


def canonical(addr: Address) -> Address:
    """``(host, port)`` with an IPv4-mapped IPv6 host written as IPv4 (``::ffff:127.0.0.1``)."""
    host, port = addr[0], addr[1]
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return (host, port)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return (str(ip.ipv4_mapped), port)
    return (str(ip), port)


@dataclass(frozen=True, slots=True)
class CookieJar:
    """Stateless HelloVerifyRequest cookies: HMAC-SHA256(secret, epoch, address), 16 bytes.

    A cookie stays valid for one to two ``lifetime`` periods (the current epoch and the one
    before), so a client that answers within ``lifetime`` seconds always passes.
    """

    secret: bytes
    lifetime: float = 60.0

    def _mac(self, peer: Address, epoch: int) -> bytes:
        host, port = canonical(peer)
        msg = b"%d|%s|%d" % (epoch, host.encode(), port)
        return hmac.new(self.secret, msg, hashlib.sha256).digest()[:16]

    def make(self, peer: Address, now: float) -> bytes:
        return self._mac(peer, int(now // self.lifetime))

    def check(self, peer: Address, cookie: bytes, now: float) -> bool:
        epoch = int(now // self.lifetime)
        return any(hmac.compare_digest(cookie, self._mac(peer, e)) for e in (epoch, epoch - 1))


class CloseReason(enum.Enum):
    IDLE = "idle"
    PEER_CLOSED = "peer-closed"
    HANDSHAKE_FAILED = "handshake-failed"
    PROTOCOL_ERROR = "protocol-error"
    SHUTDOWN = "shutdown"
    REPLACED = "replaced"
    RELAY_FAILED = "relay-failed"


S = TypeVar("S")


@dataclass(slots=True)
class _Entry(Generic[S]):
    state: S
    last_seen: float
    relay: Address | None = None


@dataclass(slots=True)
class SessionTable(Generic[S]):
    """Sessions by device address, with a size limit, idle deadlines and relay addresses."""

    max_sessions: int
    idle_timeout: float
    _by_peer: dict[Address, _Entry[S]] = field(default_factory=dict)
    _by_relay: dict[Address, Address] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.max_sessions < 1:
            raise ValueError("max_sessions must be at least 1")
        if self.idle_timeout <= 0:
            raise ValueError("idle_timeout must be positive")

    def __len__(self) -> int:
        return len(self._by_peer)

    def __contains__(self, peer: object) -> bool:
        return peer in self._by_peer

    def __iter__(self) -> Iterator[Address]:
        return iter(list(self._by_peer))

    def full(self) -> bool:
        return len(self._by_peer) >= self.max_sessions

    def add(self, peer: Address, state: S, now: float) -> None:
        if peer in self._by_peer:
            raise KeyError(f"{peer} already has a session")
        if self.full():
            raise OverflowError(f"at most {self.max_sessions} sessions")
        self._by_peer[peer] = _Entry(state, now)

    def get(self, peer: Address) -> S | None:
        entry = self._by_peer.get(peer)
        return None if entry is None else entry.state

    def touch(self, peer: Address, now: float) -> None:
        entry = self._by_peer.get(peer)
        if entry is not None:
            entry.last_seen = max(entry.last_seen, now)

    def bind_relay(self, peer: Address, relay: Address) -> None:
        entry = self._by_peer[peer]
        relay = canonical(relay)
        if entry.relay is not None:
            self._by_relay.pop(entry.relay, None)
        entry.relay = relay
        self._by_relay[relay] = peer

    def relay_of(self, peer: Address) -> Address | None:
        entry = self._by_peer.get(peer)
        return None if entry is None else entry.relay

    def peer_of(self, relay: Address) -> Address | None:
        """The device address behind a relay address (as the plain server sees it)."""
        return self._by_relay.get(canonical(relay))

    def remove(self, peer: Address) -> S | None:
        entry = self._by_peer.pop(peer, None)
        if entry is None:
            return None
        if entry.relay is not None:
            self._by_relay.pop(entry.relay, None)
        return entry.state

    def expired(self, now: float) -> list[Address]:
        """Peers idle for at least ``idle_timeout`` seconds at ``now``."""
        return [p for p, e in self._by_peer.items() if now - e.last_seen >= self.idle_timeout]

    def next_deadline(self) -> float | None:
        """When the next peer becomes idle (None without sessions)."""
        if not self._by_peer:
            return None
        return min(e.last_seen for e in self._by_peer.values()) + self.idle_timeout

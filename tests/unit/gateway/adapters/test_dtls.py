"""The DTLS engine without sockets: a pyOpenSSL client on memory BIOs talks to it directly.

Time is an input (``now``); only OpenSSL's own retransmission timer reads a clock.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest
from OpenSSL import SSL

from gateway.adapters.dtls import (
    Closed,
    Deliver,
    DtlsConfig,
    DtlsEngine,
    DtlsSetupError,
    Effect,
    Opened,
    Transmit,
)
from gateway.dtls_sessions import CloseReason, is_client_hello, split_records
from twinhub_cli import pki

PEER = ("198.51.100.7", 40000)
OTHER = ("198.51.100.8", 40000)
CONTENT_ALERT = 21
HANDSHAKE_HELLO_VERIFY_REQUEST = 3


@dataclass(frozen=True)
class Pki:
    ca: Path
    other_ca: Path
    cert: Path
    key: Path


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca = pki.create_ca(d / "ca")
    server = pki.issue_server(ca, d / "server", ["127.0.0.1", "localhost"])
    other = pki.create_ca(d / "other", common_name="someone else")
    return Pki(ca.cert_path, other.cert_path, server.cert_path, server.key_path)


class Client:
    """A DTLS 1.2 client on memory BIOs, like a device."""

    def __init__(self, ca: Path | None) -> None:
        ctx = SSL.Context(SSL.DTLS_CLIENT_METHOD)
        if ca is not None:
            ctx.load_verify_locations(str(ca))
            ctx.set_verify(SSL.VERIFY_PEER, lambda _c, _x, _e, _d, ok: bool(ok))
        self.conn = SSL.Connection(ctx, None)
        self.conn.set_connect_state()
        self.done = False

    def step(self) -> list[bytes]:
        """Advance the handshake; the datagrams to send."""
        try:
            self.conn.do_handshake()
            self.done = True
        except SSL.WantReadError:
            pass
        return self.out()

    def out(self) -> list[bytes]:
        chunks = []
        while True:
            try:
                chunks.append(self.conn.bio_read(65535))
            except SSL.WantReadError:
                return chunks

    def feed(self, effects: Iterable[Effect], peer: tuple[str, int] = PEER) -> None:
        for e in effects:
            if isinstance(e, Transmit) and e.peer == peer:
                self.conn.bio_write(e.datagram)


def engine(certs: Pki, **kw: float) -> DtlsEngine:
    config = DtlsConfig(certs.cert, certs.key, **kw)  # type: ignore[arg-type]
    return DtlsEngine(config, cookie_secret=b"s" * 32)


def send_all(
    eng: DtlsEngine, datagrams: list[bytes], now: float, peer: tuple[str, int] = PEER
) -> list[Effect]:
    effects: list[Effect] = []
    for d in datagrams:
        effects += eng.datagram_received(peer, d, now)
    return effects


def handshake(
    eng: DtlsEngine,
    client: Client,
    now: float = 100.0,
    peer: tuple[str, int] = PEER,
    seen: Callable[[list[Effect]], None] = lambda _e: None,
) -> list[Effect]:
    """Pump datagrams both ways until the client is done; every effect of the engine."""
    effects: list[Effect] = []
    datagrams = client.step()
    for _ in range(20):
        if client.done:
            return effects
        step = send_all(eng, datagrams, now, peer)
        seen(step)
        effects += step
        client.feed(step, peer)
        datagrams = client.step()
    raise AssertionError("handshake did not finish")


def test_a_client_hello_without_cookie_gets_only_a_smaller_hello_verify_request(
    certs: Pki,
) -> None:
    eng = engine(certs)
    (hello,) = Client(certs.ca).step()
    assert is_client_hello(hello)
    effects = eng.datagram_received(PEER, hello, 100.0)
    assert len(effects) == 1
    assert isinstance(effects[0], Transmit)
    (hvr,) = split_records(effects[0].datagram)
    assert hvr[13] == HANDSHAKE_HELLO_VERIFY_REQUEST
    assert len(effects[0].datagram) <= len(hello)
    assert PEER not in eng
    assert eng.peers == []


def test_handshake_with_the_ca_then_coap_both_ways(certs: Pki) -> None:
    eng = engine(certs)
    client = Client(certs.ca)
    sizes: list[int] = []
    effects = handshake(
        eng,
        client,
        seen=lambda es: sizes.extend(len(e.datagram) for e in es if isinstance(e, Transmit)),
    )
    assert Opened(PEER) in effects
    assert eng.established(PEER)
    assert max(sizes) <= eng.config.mtu
    assert "ECDSA" in (client.conn.get_cipher_name() or "")
    assert client.conn.get_protocol_version_name() == "DTLSv1.2"

    client.conn.send(b"\x40\x01\x12\x34coap")
    assert send_all(eng, client.out(), 101.0) == [Deliver(PEER, b"\x40\x01\x12\x34coap")]
    client.feed(eng.send(PEER, b"\x60\x44\x12\x34answer", 101.0))
    assert client.conn.recv(65535) == b"\x60\x44\x12\x34answer"


def test_a_small_mtu_cuts_the_certificate_flight_into_datagrams_that_fit(certs: Pki) -> None:
    eng = engine(certs, mtu=400)
    sizes: list[int] = []
    handshake(
        eng,
        Client(certs.ca),
        seen=lambda es: sizes.extend(len(e.datagram) for e in es if isinstance(e, Transmit)),
    )
    assert eng.established(PEER)
    assert max(sizes) <= 400
    assert len(sizes) > 3


def test_a_cookie_is_bound_to_the_address(certs: Pki) -> None:
    eng = engine(certs)
    client = Client(certs.ca)
    (hello,) = client.step()
    client.feed(eng.datagram_received(PEER, hello, 100.0))
    (hello_with_cookie,) = client.step()
    # replayed from another address: again only a HelloVerifyRequest, no session
    effects = eng.datagram_received(OTHER, hello_with_cookie, 100.0)
    assert [type(e) for e in effects] == [Transmit]
    assert OTHER not in eng
    # an old cookie is refused as well
    assert PEER not in eng
    assert all(
        isinstance(e, Transmit) for e in eng.datagram_received(PEER, hello_with_cookie, 500.0)
    )
    assert PEER not in eng
    # in time, from its own address, it opens a handshake
    eng.datagram_received(PEER, hello_with_cookie, 101.0)
    assert PEER in eng
    assert not eng.established(PEER)
    assert eng.retransmit_in(PEER) is not None  # OpenSSL's timer runs for the server flight


def test_strangers_non_hello_datagrams_get_no_answer(certs: Pki) -> None:
    eng = engine(certs)
    assert eng.datagram_received(PEER, b"\x17\xfe\xfd" + b"\x00" * 20, 100.0) == []
    assert eng.datagram_received(PEER, b"garbage", 100.0) == []
    assert eng.send(PEER, b"x", 100.0) == []
    assert eng.handle_timeout(PEER, 100.0) == []
    assert eng.close(PEER) == []


def test_the_session_limit_holds_new_devices_off_without_any_answer(certs: Pki) -> None:
    eng = engine(certs, max_sessions=1)
    handshake(eng, Client(certs.ca))
    (hello,) = Client(certs.ca).step()
    assert eng.datagram_received(OTHER, hello, 100.0) == []
    eng.close(PEER)
    assert eng.datagram_received(OTHER, hello, 100.0) != []


def test_idle_sessions_are_closed_with_close_notify(certs: Pki) -> None:
    eng = engine(certs, idle_timeout=30.0)
    client = Client(certs.ca)
    handshake(eng, client, now=100.0)
    client.conn.send(b"keepalive")
    send_all(eng, client.out(), 120.0)
    assert eng.next_deadline() == 150.0
    assert eng.expire(149.0) == []
    effects = eng.expire(150.0)
    assert effects[-1] == Closed(PEER, CloseReason.IDLE)
    assert isinstance(effects[0], Transmit)
    assert effects[0].datagram[0] == CONTENT_ALERT
    client.feed(effects)
    with pytest.raises(SSL.ZeroReturnError):
        client.conn.recv(65535)
    assert PEER not in eng


def test_a_device_closing_ends_its_session(certs: Pki) -> None:
    eng = engine(certs)
    client = Client(certs.ca)
    handshake(eng, client)
    assert client.conn.shutdown() is False  # close_notify sent, the server's not yet seen
    effects = send_all(eng, client.out(), 101.0)
    assert effects[-1] == Closed(PEER, CloseReason.PEER_CLOSED)
    assert PEER not in eng
    client.feed(effects)  # the server answers with its own close_notify
    assert client.conn.shutdown() is True


def test_a_client_that_rejects_the_certificate_fails_the_handshake(certs: Pki) -> None:
    eng = engine(certs)
    client = Client(certs.other_ca)
    effects: list[Effect] = []

    def advance() -> None:
        datagrams = client.step()
        for _ in range(10):
            step = send_all(eng, datagrams, 100.0)
            effects.extend(step)
            client.feed(step)
            datagrams = client.step()

    with pytest.raises(SSL.Error, match="certificate verify failed"):
        advance()
    effects += send_all(eng, client.out(), 100.0)  # its alert
    assert Closed(PEER, CloseReason.HANDSHAKE_FAILED) in effects
    assert not any(isinstance(e, Opened) for e in effects)
    assert PEER not in eng


def test_a_device_restarting_on_the_same_address_replaces_its_session(certs: Pki) -> None:
    eng = engine(certs)
    handshake(eng, Client(certs.ca))
    effects = handshake(eng, Client(certs.ca))
    assert Closed(PEER, CloseReason.REPLACED) in effects
    assert Opened(PEER) in effects
    assert eng.established(PEER)


def test_close_all_notifies_every_device(certs: Pki) -> None:
    eng = engine(certs)
    a, b = Client(certs.ca), Client(certs.ca)
    handshake(eng, a, peer=PEER)
    handshake(eng, b, peer=OTHER)
    effects = eng.close_all()
    assert {e.peer for e in effects if isinstance(e, Closed)} == {PEER, OTHER}
    for client, peer in ((a, PEER), (b, OTHER)):
        client.feed(effects, peer)
        with pytest.raises(SSL.ZeroReturnError):
            client.conn.recv(65535)
    assert eng.peers == []


def test_a_key_that_does_not_match_the_certificate_is_a_setup_error(
    certs: Pki, tmp_path: Path
) -> None:
    other = pki.issue_server(pki.load_ca(certs.other_ca.parent), tmp_path, ["localhost"])
    with pytest.raises(DtlsSetupError, match="key"):
        DtlsEngine(DtlsConfig(certs.cert, other.key_path))
    with pytest.raises(DtlsSetupError):
        DtlsEngine(DtlsConfig(tmp_path / "missing.crt", certs.key))
    with pytest.raises(ValueError, match="mtu"):
        DtlsConfig(certs.cert, certs.key, mtu=100)


def test_a_handshake_that_stalls_past_its_cookie_frees_its_slot(certs: Pki) -> None:
    eng = engine(certs, max_sessions=1, handshake_timeout=10.0, idle_timeout=60.0)
    client = Client(certs.ca)
    (hello,) = client.step()
    client.feed(eng.datagram_received(PEER, hello, 100.0))
    eng.datagram_received(PEER, client.step()[0], 100.0)  # past the cookie, then silence
    assert PEER in eng
    assert eng.next_deadline() == 110.0
    assert eng.expire(109.9) == []
    assert eng.expire(110.0) == [Closed(PEER, CloseReason.HANDSHAKE_FAILED)]
    assert eng.next_deadline() is None
    handshake(eng, Client(certs.ca), now=111.0, peer=OTHER)  # the slot is free again
    assert eng.next_deadline() == 111.0 + 60.0

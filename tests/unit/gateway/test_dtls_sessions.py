"""The DTLS terminator's pure parts: record framing, cookies, the session table."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.dtls_sessions import (
    RECORD_HEADER,
    CookieJar,
    FramingError,
    SessionTable,
    canonical,
    is_client_hello,
    pack_datagrams,
    split_records,
)


def record(content_type: int, body: bytes, epoch: int = 0) -> bytes:
    return (
        bytes([content_type])
        + b"\xfe\xfd"
        + epoch.to_bytes(2, "big")
        + b"\x00" * 6
        + len(body).to_bytes(2, "big")
        + body
    )


bodies = st.lists(st.binary(max_size=300), max_size=12)


@given(bodies)
def test_split_records_inverts_concatenation(payloads: list[bytes]) -> None:
    records = [record(22, p) for p in payloads]
    assert split_records(b"".join(records)) == records


@given(bodies, st.integers(min_value=RECORD_HEADER + 300, max_value=1500))
def test_pack_datagrams_keeps_order_and_respects_the_mtu(payloads: list[bytes], mtu: int) -> None:
    records = [record(23, p) for p in payloads]
    datagrams = pack_datagrams(records, mtu)
    assert b"".join(datagrams) == b"".join(records)
    assert all(len(d) <= mtu for d in datagrams)
    # greedy: no two neighbours would have fitted in one datagram
    assert all(len(a) + len(split_records(b)[0]) > mtu for a, b in itertools.pairwise(datagrams))
    assert [r for d in datagrams for r in split_records(d)] == records


def test_pack_datagrams_sends_an_oversized_record_alone() -> None:
    small, big = record(22, b"a" * 10), record(22, b"b" * 200)
    assert pack_datagrams([small, big, small], 100) == [small, big, small]


@pytest.mark.parametrize(
    "data", [b"\x16\xfe\xfd", record(22, b"abc")[:-1], record(22, b"") + b"\x17"]
)
def test_split_records_rejects_truncated_input(data: bytes) -> None:
    with pytest.raises(FramingError):
        split_records(data)
    assert issubclass(FramingError, ValueError)


def test_is_client_hello() -> None:
    assert is_client_hello(record(22, b"\x01rest"))
    assert not is_client_hello(record(22, b"\x01rest", epoch=1))  # encrypted renegotiation
    assert not is_client_hello(record(22, b"\x03hvr"))  # HelloVerifyRequest
    assert not is_client_hello(record(23, b"\x01"))  # application data
    assert not is_client_hello(record(22, b""))
    assert not is_client_hello(b"")


def test_canonical_unmaps_ipv4_mapped_addresses() -> None:
    assert canonical(("::ffff:127.0.0.1", 5)) == ("127.0.0.1", 5)
    assert canonical(("::1", 5)) == ("::1", 5)
    assert canonical(("127.0.0.1", 5)) == ("127.0.0.1", 5)
    assert canonical(("localhost", 5)) == ("localhost", 5)


class TestCookieJar:
    jar = CookieJar(b"k" * 32, lifetime=60.0)
    peer = ("192.0.2.1", 5684)

    def test_a_cookie_passes_for_its_address_within_its_lifetime(self) -> None:
        cookie = self.jar.make(self.peer, 1000.0)
        assert len(cookie) == 16
        assert self.jar.check(self.peer, cookie, 1000.0)
        assert self.jar.check(self.peer, cookie, 1000.0 + 60.0)  # the next epoch still passes

    def test_a_cookie_fails_for_another_address_or_when_too_old(self) -> None:
        cookie = self.jar.make(self.peer, 1000.0)
        assert not self.jar.check(("192.0.2.1", 5685), cookie, 1000.0)
        assert not self.jar.check(("192.0.2.2", 5684), cookie, 1000.0)
        assert not self.jar.check(self.peer, cookie, 1000.0 + 120.0)
        assert not CookieJar(b"x" * 32).check(self.peer, cookie, 1000.0)

    def test_mapped_and_plain_ipv4_are_one_address(self) -> None:
        cookie = self.jar.make(("::ffff:192.0.2.1", 5684), 5.0)
        assert self.jar.check(self.peer, cookie, 5.0)


class TestSessionTable:
    def test_limit(self) -> None:
        table: SessionTable[str] = SessionTable(max_sessions=2, idle_timeout=10.0)
        table.add(("a", 1), "s1", 0.0)
        with pytest.raises(KeyError):
            table.add(("a", 1), "again", 0.0)
        table.add(("b", 1), "s2", 0.0)
        assert table.full()
        with pytest.raises(OverflowError):
            table.add(("c", 1), "s3", 0.0)
        assert table.remove(("a", 1)) == "s1"
        assert not table.full()
        assert table.remove(("a", 1)) is None

    def test_idle_deadlines_follow_activity(self) -> None:
        table: SessionTable[str] = SessionTable(max_sessions=5, idle_timeout=10.0)
        table.add(("a", 1), "a", 0.0)
        table.add(("b", 1), "b", 2.0)
        assert table.next_deadline() == 10.0
        table.touch(("a", 1), 5.0)
        table.touch(("a", 1), 4.0)  # time never goes back
        assert table.next_deadline() == 12.0
        assert table.expired(11.9) == []
        assert table.expired(12.0) == [("b", 1)]
        assert table.expired(15.0) == [("a", 1), ("b", 1)]
        table.touch(("zz", 1), 3.0)  # unknown peers are ignored
        assert SessionTable[str](1, 1.0).next_deadline() is None

    def test_peer_of_relay(self) -> None:
        table: SessionTable[str] = SessionTable(max_sessions=5, idle_timeout=10.0)
        device = ("198.51.100.7", 40000)
        table.add(device, "s", 0.0)
        table.bind_relay(device, ("127.0.0.1", 50001))
        assert table.peer_of(("::ffff:127.0.0.1", 50001)) == device
        assert table.relay_of(device) == ("127.0.0.1", 50001)
        table.bind_relay(device, ("127.0.0.1", 50002))
        assert table.peer_of(("127.0.0.1", 50001)) is None
        table.remove(device)
        assert table.peer_of(("127.0.0.1", 50002)) is None

    @pytest.mark.parametrize(("size", "idle"), [(0, 1.0), (1, 0.0)])
    def test_rejects_bad_limits(self, size: int, idle: float) -> None:
        with pytest.raises(ValueError, match="must be"):
            SessionTable[str](size, idle)

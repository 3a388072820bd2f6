from __future__ import annotations

import pytest

from gateway.simplepresence import PROTOCOL, Presence, PresenceConfig
from proto.events import DeviceOffline, DeviceOnline
from proto.leases import instance_of


def presence(**kw: object) -> Presence:
    return Presence(PresenceConfig("gw-1", timeout=300.0, **kw))  # type: ignore[arg-type]


def test_first_accepted_request_announces_the_device_once() -> None:
    p = presence()
    ev = p.arrive("alice", "d1", "10.0.0.1:5683", 100.0)
    assert ev is not None
    assert isinstance(ev.data, DeviceOnline)
    assert (ev.owner, ev.device_id, ev.source) == ("alice", "d1", "/gateway/gw-1")
    assert (ev.data.gateway, ev.data.remote_address, ev.data.protocol) == (
        "gw-1",
        "10.0.0.1:5683",
        PROTOCOL,
    )
    # a concurrent request while the online event is being written: not announced twice
    assert p.arrive("alice", "d1", "10.0.0.1:5683", 100.5) is None
    assert not p.online("alice", "d1")
    p.confirm(ev, True)
    assert p.online("alice", "d1")
    assert p.arrive("alice", "d1", "10.0.0.1:5683", 200.0) is None


def test_a_failed_online_append_is_retried_with_the_next_request() -> None:
    p = presence()
    ev = p.arrive("alice", "d1", "r", 0.0)
    assert ev is not None
    p.confirm(ev, False)
    again = p.arrive("alice", "d1", "r", 1.0)
    assert again is not None
    assert isinstance(again.data, DeviceOnline)
    assert isinstance(ev.data, DeviceOnline)
    assert again.data.connection_id != ev.data.connection_id


def test_inactivity_takes_a_device_offline_on_its_connection() -> None:
    p = presence()
    ev = p.arrive("alice", "d1", "r", 0.0)
    assert ev is not None
    p.confirm(ev, True)
    p.arrive("alice", "d1", "r", 100.0)
    assert p.expire(399.0) == []
    (off,) = p.expire(400.0)
    assert isinstance(off.data, DeviceOffline)
    assert isinstance(ev.data, DeviceOnline)
    assert off.data.connection_id == ev.data.connection_id
    assert off.data.reason == "inactive"
    assert len(p) == 0
    # the next request is a new connection
    nxt = p.arrive("alice", "d1", "r", 401.0)
    assert nxt is not None
    assert isinstance(nxt.data, DeviceOnline)
    assert nxt.data.connection_id != ev.data.connection_id


def test_connection_ids_carry_the_instance_and_release_lists_every_device() -> None:
    p = presence(instance="i1")
    for d in ("d1", "d2"):
        ev = p.arrive("alice", d, "r", 0.0)
        assert ev is not None
        assert isinstance(ev.data, DeviceOnline)
        assert instance_of(ev.data.connection_id) == "i1"
        p.confirm(ev, True)
    unconfirmed = p.arrive("alice", "d3", "r", 0.0)
    assert unconfirmed is not None
    offs = p.release("gateway shutting down", 10.0)
    assert sorted(e.device_id for e in offs) == ["d1", "d2"]
    assert len(p) == 0
    p.adopt_instance("i2")
    ev = p.arrive("alice", "d1", "r", 11.0)
    assert ev is not None
    assert isinstance(ev.data, DeviceOnline)
    assert instance_of(ev.data.connection_id) == "i2"


def test_timeout_must_be_positive() -> None:
    with pytest.raises(ValueError, match="timeout"):
        PresenceConfig("gw", timeout=0)


def test_devices_over_dtls_are_coaps_udp() -> None:
    ev = presence().arrive("alice", "d1", "r", 0.0, secure=True)
    assert ev is not None
    assert isinstance(ev.data, DeviceOnline)
    assert ev.data.protocol == "coaps+udp"


def test_an_observing_device_stays_online_past_the_timeout_then_times_out_after() -> None:
    p = presence()
    ev = p.arrive("alice", "d1", "r", 0.0)
    assert ev is not None
    p.confirm(ev, True)
    assert p.hold("alice", "d1")
    assert p.connection_of("alice", "d1") == ev.data.connection_id  # type: ignore[union-attr]
    assert p.expire(10_000.0) == []  # observing: online whatever the silence
    p.unhold("alice", "d1", 10_000.0)
    assert p.expire(10_299.0) == []  # the timeout counts from the observation's end
    (off,) = p.expire(10_300.0)
    assert isinstance(off.data, DeviceOffline) and off.data.reason == "inactive"
    assert p.connection_of("alice", "d1") is None
    assert not p.hold("alice", "d1")  # not online here: nothing held
    p.unhold("alice", "d1", 0.0)  # harmless

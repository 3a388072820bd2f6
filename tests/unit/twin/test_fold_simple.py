"""Simple devices (ThingsBoard's device API) through the fold: provisioning, tokens, telemetry
and client attributes, scripted and as properties over generated logs."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proto import events as ev
from proto.events import AnyEvent
from twin import commands
from twin.fold import fold, fold_all
from twin.model import SIMPLE_PROFILE, Telemetry, Twin

from .factory import T0, device_logs, event, offline, online, simple_payloads, telemetry_values

MS0 = int(T0.timestamp() * 1000)
H1, H2 = "1" * 64, "2" * 64


def provisioned(owner: str = "alice", name: str = "boiler", h: str = H1) -> Twin:
    twin = fold(None, event(ev.DeviceProvisioned(name=name, token_hash=h), 1, owner=owner))
    assert twin is not None
    return twin


def test_provisioning_creates_a_simple_device_for_its_owner() -> None:
    twin = provisioned()
    assert (twin.owner, twin.profile, twin.name, twin.token_hash) == (
        "alice",
        SIMPLE_PROFILE,
        "boiler",
        H1,
    )
    assert twin.simple and not twin.deleted and (twin.position, twin.version) == (1, 1)
    view = twin.to_json()
    assert (view["profile"], view["name"], view["token_id"]) == (SIMPLE_PROFILE, "boiler", H1[:12])
    assert Twin.from_document(twin.to_document()) == twin


def test_a_second_provisioning_changes_nothing_but_the_position() -> None:
    twin = provisioned()
    for owner in ("alice", "bob"):  # not even its own owner's: the first one wins
        again = fold(twin, event(ev.DeviceProvisioned(name="x", token_hash=H2), 5, owner=owner))
        assert again is not None
        assert (again.owner, again.name, again.token_hash, again.position) == (
            "alice",
            "boiler",
            H1,
            5,
        )


def test_provisioning_an_ocf_device_id_does_not_take_it_over() -> None:
    ocf = fold(None, event(ev.DeviceRegistered(), 1, owner="alice"))
    twin = fold(ocf, event(ev.DeviceProvisioned(token_hash=H2), 2, owner="bob"))
    assert twin is not None
    assert (twin.owner, twin.profile, twin.token_hash) == ("alice", "", "")


def test_provisioning_a_deleted_device_starts_afresh() -> None:
    twin = fold_all(
        None,
        [
            event(ev.DeviceRegistered(), 1, owner="alice"),
            event(ev.ResourceChanged(href="/a", content=1), 2, owner="alice"),
            event(ev.DeviceUnregistered(), 3, owner="alice"),
            event(ev.DeviceProvisioned(name="n", token_hash=H2), 4, owner="bob"),
        ],
    )
    assert twin is not None
    assert (twin.owner, twin.deleted, twin.resources, twin.token_hash) == ("bob", False, (), H2)


def test_token_changes() -> None:
    twin = fold_all(
        provisioned(),
        [event(ev.DeviceTokenChanged(token_hash=H2, previous_token_hash=H1, reason="rotated"), 2)],
    )
    assert twin is not None and twin.token_hash == H2
    revoked = fold(twin, event(ev.DeviceTokenChanged(previous_token_hash=H2, reason="revoked"), 3))
    assert revoked is not None and revoked.token_hash == ""
    assert revoked.to_json()["token_id"] == ""


def test_another_owners_events_change_nothing_but_the_position() -> None:
    twin = provisioned()
    for data in (
        ev.DeviceTokenChanged(token_hash=H2, reason="rotated"),
        ev.TelemetryReported(values={"t": 1}),
        ev.AttributesReported(values={"a": 1}),
    ):
        after = fold(twin, event(data, 9, owner="bob"))
        assert after is not None and after.position == 9
        assert (after.token_hash, after.telemetry, after.client_attributes) == (H1, (), ())


def test_ocf_devices_keep_no_telemetry() -> None:
    ocf = fold(None, event(ev.DeviceRegistered(), 1))
    twin = fold(ocf, event(ev.TelemetryReported(values={"t": 1}), 2))
    assert twin is not None and twin.telemetry == ()


def test_telemetry_keeps_the_latest_value_per_key_by_its_ts() -> None:
    twin = fold_all(
        provisioned(),
        [
            event(ev.TelemetryReported(ts=MS0 + 5000, values={"t": 25, "h": 40}), 2),
            event(ev.TelemetryReported(ts=MS0 + 1000, values={"t": 20, "p": 1}), 3),  # older
            event(ev.TelemetryReported(ts=MS0 + 5000, values={"h": 41}), 4),  # same ts: later wins
        ],
    )
    assert twin is not None
    assert twin.telemetry == (
        Telemetry(key="h", value=41, ts=MS0 + 5000),
        Telemetry(key="p", value=1, ts=MS0 + 1000),  # a new key is taken whatever its age
        Telemetry(key="t", value=25, ts=MS0 + 5000),
    )
    assert twin.to_json()["telemetry"] == {
        "h": {"value": 41, "ts": MS0 + 5000},
        "p": {"value": 1, "ts": MS0 + 1000},
        "t": {"value": 25, "ts": MS0 + 5000},
    }
    assert Twin.from_document(twin.to_document()) == twin


def test_a_sample_without_ts_takes_the_events_time() -> None:
    t = T0 + timedelta(seconds=7, microseconds=123_456)
    twin = fold(
        provisioned(),
        ev.Event(
            owner="alice",
            device_id="d1",
            data=ev.TelemetryReported(values={"t": 1}),
            source="/gateway/test",
            time=t,
            position=2,
        ),
    )
    assert twin is not None
    assert twin.telemetry_for("t") == Telemetry(key="t", value=1, ts=MS0 + 7123)


def test_client_attributes_are_merged() -> None:
    twin = fold_all(
        provisioned(),
        [
            event(ev.AttributesReported(values={"fw": "1.0", "model": "x"}), 2),
            event(ev.AttributesReported(values={"fw": "1.1", "a.b": None}), 3),
        ],
    )
    assert twin is not None
    assert twin.to_json()["client_attributes"] == {"fw": "1.1", "model": "x", "a.b": None}
    assert [k for k, _ in twin.client_attributes] == ["a.b", "fw", "model"]


@pytest.mark.parametrize("owner", ["alice", "mallory"])
def test_an_ocf_sign_up_never_takes_a_live_simple_device_over(owner: str) -> None:
    twin = fold_all(
        provisioned(),
        [
            event(ev.TelemetryReported(values={"t": 1}), 2),
            event(ev.DeviceRegistered(), 3, owner=owner),
        ],
    )
    assert twin is not None and twin.simple and twin.owner == "alice" and twin.position == 3
    assert twin.telemetry_for("t") is not None and twin.token_hash == H1


def test_a_simple_device_goes_online_like_any_device_and_is_in_sync() -> None:
    """It has no synchronisation phase (what it sends is the twin): in sync while online."""
    twin = fold(provisioned(), event(online("c1"), 2))
    assert twin is not None and twin.online and twin.profile == SIMPLE_PROFILE
    assert twin.sync_state == "in_sync"
    twin = fold(twin, event(offline("c1"), 3))
    assert twin is not None and not twin.online and twin.sync_state == "out_of_sync"
    ocf = fold_all(None, [event(ev.DeviceRegistered(), 1), event(online("c1"), 2)])
    assert ocf is not None and ocf.sync_state == "out_of_sync"  # until its gateway synced it


def test_shared_attributes_hold_any_json_value_and_have_no_delta() -> None:
    steps = [
        event(ev.DesiredSet(href="/shared/target", content=25, version=1), 2),
        event(ev.DesiredSet(href="/shared/mode", content="eco", version=1), 3),
        event(ev.DesiredSet(href="/shared/list", content=[1, 2], version=1), 4),
    ]
    twin = fold_all(provisioned(), steps)
    assert twin is not None
    assert [(d.href, d.content) for d in twin.desired] == [
        ("/shared/list", [1, 2]),
        ("/shared/mode", "eco"),
        ("/shared/target", 25),
    ]
    assert twin.delta() == {} and twin.delta_for("/shared/target") is None
    assert Twin.from_document(twin.to_document()) == twin


# -- properties ---------------------------------------------------------------------------


def _ts(e: AnyEvent, data: ev.TelemetryReported) -> int:
    return int(e.time.timestamp() * 1000) if data.ts is None else data.ts


@given(
    device_logs(
        st.builds(
            ev.TelemetryReported,
            ts=st.none() | st.integers(0, 5).map(lambda k: MS0 + k * 1000),
            values=telemetry_values,
        ),
        max_size=30,
    )
)
def test_telemetry_is_the_newest_sample_per_key(log: list[AnyEvent]) -> None:
    """Per key: the value of the sample with the greatest ts, the later in the log on ties."""
    start = provisioned()
    log = [e for e in log if e.owner == "alice"]
    expected: dict[str, tuple[int, Any]] = {}
    for e in log:
        assert isinstance(e.data, ev.TelemetryReported)
        ts = _ts(e, e.data)
        for key, value in e.data.values.items():
            if key not in expected or ts >= expected[key][0]:
                expected[key] = (ts, value)
    twin = fold_all(start, [e.at((e.position or 0) + 1) for e in log])  # after the provisioning
    assert twin is not None
    assert {t.key: (t.ts, t.value) for t in twin.telemetry} == expected


@given(device_logs(simple_payloads, max_size=30), st.data())
def test_simple_device_logs_fold_idempotently(log: list[AnyEvent], data: st.DataObject) -> None:
    k = data.draw(st.integers(0, len(log)))
    twin = fold_all(None, log[:k])
    stored = None if twin is None else Twin.from_document(twin.to_document())
    assert fold_all(fold_all(stored, log[k:]), log) == fold_all(None, log)


def test_no_desired_updates_are_issued_for_a_simple_device() -> None:
    """Its desired state is its shared attributes, which the gateway reads from the log."""
    steps = [
        event(online("c1"), 2),
        event(ev.DesiredSet(href="/shared/mode", content={"v": 1}, version=1), 3),
    ]
    simple_twin = fold_all(provisioned(), steps)
    assert simple_twin is not None and simple_twin.online
    assert commands.desired_update_events(simple_twin, T0) == ()
    ocf = fold_all(fold(None, event(ev.DeviceRegistered(), 1)), steps)
    assert ocf is not None and len(commands.desired_update_events(ocf, T0)) == 1

"""The fault suite's checks (``bench/faultchecks.py``) catch what they claim to catch: each is
fed a made-up history with one violation of its kind, and a clean one. The suite itself runs
against real processes in ``tests/test_benches.py``; this shows that its zeros mean something.
Also the simulator's recording (``bench/faults.py``): a rendered value is recorded with the
connection it goes out on."""

from __future__ import annotations

import asyncio
import json
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from proto import events as ev

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import faultchecks as fc
import faults

D = "dev-1"
HREF = "/light/1"
S = 1_000_000_000  # one second in ns
T0 = datetime(2026, 1, 1, tzinfo=UTC)


class Log:
    """Events appended to a LogView with consecutive positions and times (1 s apart)."""

    def __init__(self, hrefs: tuple[str, ...] = (HREF,)) -> None:
        self.view = fc.LogView(hrefs)
        self.position = 0
        self.events: list[ev.AnyEvent] = []

    def add(
        self,
        data: Any,
        *,
        device: str = D,
        cid: str | None = None,
        event_id: str | None = None,
        at_ns: int | None = None,
    ) -> int:
        self.position += 1
        kw: dict[str, Any] = {} if event_id is None else {"id": event_id}
        event = ev.Event(
            owner="o",
            device_id=device,
            data=data,
            source="/test",
            time=T0 + timedelta(seconds=self.position),
            correlation_id=cid,
            position=self.position,
            **kw,
        )
        self.events.append(event)
        self.view.add(event, self.position * S if at_ns is None else at_ns)
        return self.position

    def online(self, conn: str = "c1", device: str = D, gateway: str = "gw") -> int:
        return self.add(
            ev.DeviceOnline(gateway=gateway, connection_id=conn, remote_address="a"),
            device=device,
        )

    def value(self, seq: int, *, conn: str = "c1", observe: int | None = None, **kw: Any) -> int:
        content = {"state": True, "power": 1, "seq": seq, "ts": seq}
        data = ev.ResourceChanged(
            href=HREF, content=content, connection_id=conn, observe_seq=observe
        )
        return self.add(data, **kw)


def record(
    sent: dict[int, list[tuple[int, int]]],
    conns: dict[int, tuple[int, int | None]],
    *,
    online: int | None = None,
    final: int | None = None,
) -> fc.DeviceRecord:
    return fc.DeviceRecord(
        device=D,
        sent={HREF: sent},
        conns={n: fc.Conn(n, s, e) for n, (s, e) in conns.items()},
        online_conn=online,
        final={} if final is None else {HREF: final},
    )


# -- acknowledged, lost -----------------------------------------------------------------------


def test_a_value_counts_as_acknowledged_only_when_its_connection_outlived_it_with_a_log() -> None:
    window = 2 * S
    dead_soon = record({1: [(1, 10 * S)]}, {1: (0, 10 * S + S // 2)})
    lived = record({1: [(1, 10 * S)]}, {1: (0, 13 * S)})
    still_up = record({1: [(1, 10 * S)]}, {1: (0, None)}, online=1)
    up_not_signed_in = record({1: [(1, 10 * S)]}, {1: (0, None)}, online=None)

    def at(rec: fc.DeviceRecord, outages: list[fc.Outage] = []) -> int | None:  # noqa: B006
        return fc.acknowledged_at(
            rec, rec.sent[HREF][1], ack_window_ns=window, outages=outages, recorded_ns=20 * S
        )

    assert at(dead_soon) is None  # in flight when the connection died
    assert at(lived) == 10 * S
    assert at(still_up) == 10 * S
    assert at(up_not_signed_in) is None
    # the log down (or recovering) while the gateway held it: not acknowledged
    assert at(lived, [fc.Outage(11 * S, 12 * S)]) is None
    assert at(lived, [fc.Outage(7 * S, 9 * S)]) is None  # recovering until 11 s
    assert at(lived, [fc.Outage(5 * S, 6 * S)]) == 10 * S
    # still up at the check: acknowledged across an outage (the gateway buffers and retries)
    assert at(still_up, [fc.Outage(11 * S, 12 * S)]) == 10 * S


def test_lost_values_finds_a_missing_acknowledged_value_and_a_missing_final_value() -> None:
    log = Log()
    log.online()
    log.value(1)
    log.value(3)
    rec = record(
        {1: [(1, 10 * S)], 2: [(1, 11 * S)], 3: [(1, 12 * S)], 4: [(1, 19 * S)]},
        {1: (0, None)},
        online=1,
        final=5,
    )

    def lost(**kw: Any) -> dict[str, Any]:
        args: dict[str, Any] = {
            "window": (0, 30 * S),
            "ack_window_ns": 2 * S,
            "outages": [],
            "recorded_ns": 20 * S,
        }
        return fc.lost_values([rec], log.view, **(args | kw))

    out = lost()
    assert not out["ok"]
    assert (out["values_sent"], out["acknowledged"], out["in_flight"]) == (4, 3, 1)
    assert out["acknowledged_lost"] == 1  # seq 2
    assert out["final_values_lost"] == 1  # seq 5
    assert {(e["seq"]) for e in out["examples"]} == {2, 5}
    # values sent outside the window belong to another experiment
    assert lost(window=(11 * S + 1, 30 * S))["acknowledged_lost"] == 0

    log.value(2)
    log.value(5)
    assert lost()["ok"]


# -- duplicates, order ----------------------------------------------------------------------------


def test_duplicates_are_the_same_event_or_notification_twice_not_a_value_read_again() -> None:
    log = Log()
    log.online()
    log.value(1, observe=7, event_id="e-1")
    clean = fc.duplicates(log.view, (0, log.position), {})
    assert clean["ok"]

    log.value(1, conn="c2")  # a re-sync read the unchanged value again: reported only
    again = fc.duplicates(log.view, (0, log.position), {})
    assert again["ok"]
    assert again["same_value_appended_again"] == 1

    p = log.value(2, observe=8, event_id="e-1")  # an event appended twice
    log.value(1, observe=7)  # a notification appended twice
    out = fc.duplicates(log.view, (0, log.position), {})
    assert not out["ok"]
    assert (out["same_event_id_twice"], out["same_notification_twice"]) == (1, 1)
    assert fc.duplicates(log.view, (p + 1, log.position), {})["same_event_id_twice"] == 0


def test_a_twin_that_applied_an_event_twice_is_a_duplicate() -> None:
    log = Log()
    log.online()
    log.value(1)
    folded = log.view.folded[D]
    assert fc.duplicates(log.view, (0, 2), {D: folded})["ok"]
    doubled = fc.duplicates(log.view, (0, 2), {D: _replace(folded, version=folded.version + 1)})
    assert doubled["twins_with_wrong_version"] == 1


def _replace(twin: Any, **kw: Any) -> Any:
    import dataclasses

    return dataclasses.replace(twin, **kw)


def test_an_older_value_logged_after_a_newer_one_is_an_order_violation() -> None:
    # issue 11: "seq 1 at position 503 and seq 0 at 506, although the device sent seq 0 first"
    log = Log()
    log.online()
    log.value(1)
    log.value(1)  # the same value again is not out of order
    late = log.value(0)
    log.value(2)
    out = fc.order_violations(log.view, (0, log.position))
    assert not out["ok"]
    assert out["violations"] == 1
    assert out["examples"][0] | {"device": D} == {
        "device": D,
        "href": HREF,
        "seq": 0,
        "position": late,
        "after_seq": 1,
        "at_position": 2,
    }
    assert fc.order_violations(log.view, (late, log.position))["ok"]  # another experiment's


# -- convergence ----------------------------------------------------------------------------------


def test_convergence_compares_the_stored_twin_with_the_fold_and_the_device() -> None:
    log = Log()
    log.online()
    log.value(1)
    behind = log.view.folded[D]
    log.value(2)
    twin = log.view.folded[D]
    rec = record({}, {1: (0, None)}, online=1, final=2)
    assert fc.convergence(log.view, {D: twin}, [rec])["ok"]
    stale = fc.convergence(log.view, {D: behind}, [rec])
    assert stale["twins_not_the_fold_of_the_log"] == 1
    assert stale["twins_not_showing_the_device_value"] == 1
    assert "position" in stale["examples"][0]["fields"]
    missing = fc.convergence(log.view, {}, [rec])
    assert not missing["ok"]
    newer = record({}, {1: (0, None)}, online=1, final=3)  # the device has a value the log lacks
    assert fc.convergence(log.view, {D: twin}, [newer])["twins_not_showing_the_device_value"] == 1


# -- offline marking ---------------------------------------------------------------------------


def test_offline_marking_needs_the_dead_connection_closed_within_the_bound() -> None:
    log = Log()
    log.online("c1", device="a")
    log.online("c2", device="b")
    log.online("c3", device="c")
    held = log.view.connections_of("gw")
    assert held == {"a": "c1", "b": "c2", "c": "c3"}
    killed = 10 * S
    log.add(ev.DeviceOffline(gateway="gw", connection_id="c1"), device="a", at_ns=14 * S)
    log.online("c9", device="b")  # came back through the restarted gateway: replaced
    twin = {"a": 15 * S, "b": 12 * S}

    def marking(**kw: Any) -> dict[str, Any]:
        args: dict[str, Any] = {"bound_s": 10.0, "twin_required": False}
        return fc.offline_marking(held, killed, log.view, twin, **(args | kw))

    out = marking()
    assert out["violations"] == 1  # c3: still online in the log
    assert out["examples"][0]["connection_id"] == "c3"
    assert out["closed_in_log_by"] == {"offline": 1, "replaced": 1}
    assert marking(bound_s=3.0)["violations"] == 2  # c1 closed 4 s after the kill
    log.add(ev.DeviceOffline(gateway="gw", connection_id="c3"), device="c", at_ns=16 * S)
    assert marking()["ok"]
    # the gateway stayed down: the twin must also show it, within the bound
    assert marking(twin_required=True)["violations"] == 1  # c: the twin never did


# -- commands ---------------------------------------------------------------------------------


def test_every_command_must_end_exactly_once_and_a_success_be_applied() -> None:
    log = Log()

    def pending(cid: str) -> int:
        return log.add(ev.CommandPending(href=HREF, op="update", content={"power": 1}), cid=cid)

    def ended(cid: str, data: Any) -> None:
        log.add(data, cid=cid)

    ok_pos = pending("ok")
    ended("ok", ev.CommandSucceeded(href=HREF, status="2.04"))
    twice_pos = pending("twice")
    ended("twice", ev.CommandSucceeded(href=HREF, status="2.04"))
    ended("twice", ev.CommandExpired(href=HREF))
    reused_pos = pending("reused")  # issue 11 defect 4: a retry after success recorded anew
    ended("reused", ev.CommandSucceeded(href=HREF, status="2.04"))
    pending("reused")
    ghost_pos = pending("ghost")
    ended("ghost", ev.CommandSucceeded(href=HREF, status="2.04"))
    expired_pos = pending("expired")
    ended("expired", ev.CommandExpired(href=HREF))

    def issued(cid: str, power: int, position: int | None) -> fc.IssuedCommand:
        return fc.IssuedCommand(cid, D, power, position, attempts=1)

    out = fc.commands(
        [
            issued("ok", 1, ok_pos),
            issued("twice", 2, twice_pos),
            issued("reused", 3, reused_pos),
            issued("ghost", 4, ghost_pos),  # "succeeded" but the device never applied it
            issued("lost", 5, 99),  # accepted, not in the log
            issued("refused", 6, None),  # never accepted, never recorded: fine
            issued("expired", 7, expired_pos),
        ],
        log.view,
        applied={1: 1, 2: 1, 3: 1},
    )
    assert out["violations"] == 4
    assert {e["cid"] for e in out["examples"]} == {"twice", "reused", "ghost", "lost"}
    assert out["never_recorded"] == 1
    clean = fc.commands([issued("ok", 1, ok_pos)], log.view, applied={1: 2})
    assert clean["ok"]
    assert clean["applied_more_than_once"] == 1


def test_a_live_subscription_must_hand_out_every_event_once_in_order() -> None:
    log = Log()
    for seq in range(5):
        log.value(seq)
    assert fc.live_subscription([1, 2, 3, 4, 5], log.view, (0, 5), [])["ok"]
    gap = fc.live_subscription([1, 2, 4, 5], log.view, (0, 5), [])  # issue 11 defect 2
    assert (gap["violations"], gap["missing"]) == (1, 1)
    assert gap["examples"][0] == {"position": 3}
    assert fc.live_subscription([1, 2, 4, 5], log.view, (3, 5), [])["ok"]  # not this window
    again = fc.live_subscription([1, 2, 3, 2, 4, 5], log.view, (0, 5), ["E: x"])
    assert (again["violations"], again["repeated_or_out_of_order"]) == (1, 1)
    assert again["reopened_after_errors"] == 1


def test_summary_fails_on_any_violation_or_an_experiment_that_did_not_finish() -> None:
    good = {"checks": {"order": fc.check(0)}}
    assert faults.summarize({"a": good}) == {"ok": True, "violations": {"order": 0}}
    bad = faults.summarize({"a": good, "b": {"checks": {"order": fc.check(2)}}})
    assert not bad["ok"]
    assert bad["failed"] == ["b: order (2)"]
    crashed = faults.summarize({"a": {"failed": "RuntimeError: x"}})
    assert not crashed["ok"]


# -- the simulator's record -------------------------------------------------------------------


async def _until(cond: Any) -> None:
    async with asyncio.timeout(5):
        while not cond():
            await asyncio.sleep(0.001)


class _Stats:
    connects = 0


class _Conn:
    def __init__(self) -> None:
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.is_open = True

    async def wait_closed(self) -> None:
        await asyncio.shield(self.closed)


class _Device:
    def __init__(self, model: Any) -> None:
        from devicesim.device import DeviceState

        self.device_id = model.device_id
        self.model = model
        self.stats = _Stats()
        self.connection: _Conn | None = None
        self.state = DeviceState.ONLINE


async def test_the_recorder_records_what_is_rendered_with_its_connection(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from devicesim.resources import DeviceModel

    # install() wraps the class; the monkeypatch puts the originals back afterwards
    monkeypatch.setattr(DeviceModel, "representation", DeviceModel.representation)
    monkeypatch.setattr(DeviceModel, "apply_update", DeviceModel.apply_update)
    recorder = faults.Recorder()
    recorder.install()
    model = DeviceModel(device_id=D, name="d", resources=1)
    dev = _Device(model)
    recorder.devices = {D: dev}

    model.representation(HREF)  # no connection: nothing can go out
    first = _Conn()
    dev.connection, dev.stats.connects = first, 1
    model.representation(HREF, baseline=True)  # seq 0 on connection 1
    first.is_open = False
    first.closed.set_result(None)
    await _until(lambda: recorder.conns[D][1][1] is not None)
    second = _Conn()
    dev.connection, dev.stats.connects = second, 2
    model.apply_update(HREF, {"power": 42}, 5)  # seq 1: applied, not yet sent
    model.batch()  # seq 1 on connection 2 (a batch notification)
    model.representation("/oic/d")  # not a light: not recorded

    path = tmp_path / "record.json"
    recorder.dump(path)
    doc = json.loads(path.read_bytes())
    assert doc["applied"] == {"42": 1}
    rec = fc.DeviceRecord.from_json(D, doc["devices"][D])
    assert set(rec.sent[HREF]) == {0, 1}
    assert [c for c, _ in rec.sent[HREF][0]] == [1]
    assert [c for c, _ in rec.sent[HREF][1]] == [2]
    assert rec.conns[1].end_ns is not None
    assert rec.conns[2].end_ns is None
    assert rec.online_conn == 2
    assert rec.final == {HREF: 1}
    second.closed.set_result(None)
    await _until(lambda: recorder.conns[D][2][1] is not None)

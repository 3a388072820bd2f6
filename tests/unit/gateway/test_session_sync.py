"""Scripted conversations: the twin synchronisation of one connection -- the order of a
resource's events whatever the interleaving of first responses and notifications (issue 11,
item 1), and which resources it reads (item 5)."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import session as s
from proto import events

from .playbook import Play, appended, of, one, reply

DISCOVERY = [
    {"href": "/oic/res", "rt": ["oic.wk.res"], "if": ["oic.if.ll", "oic.if.b"], "p": {"bm": 3}},
    {"href": "/oic/d", "rt": ["oic.wk.d"], "if": ["oic.if.r"], "p": {"bm": 1}},
    {"href": "/oic/p", "rt": ["oic.wk.p"], "if": ["oic.if.r"], "p": {"bm": 1}},
    {"href": "/oc/wk/introspection", "rt": ["oic.wk.introspection"], "p": {"bm": 1}},
    {"href": "/oic/sec/doxm", "rt": ["oic.r.doxm"], "if": ["oic.if.baseline"], "p": {"bm": 1}},
    {"href": "/light/1", "rt": ["core.light"], "if": ["oic.if.a"], "p": {"bm": 3}},
    {"href": "/light/2", "rt": ["core.light"], "if": ["oic.if.a"], "p": {"bm": 3}},
]
LIGHTS = ("/light/1", "/light/2")
PUBLISHED = s.DeviceState(
    links=tuple(events.ResourceLink(href=h, observable=True, ins=i) for i, h in enumerate(LIGHTS))
)


def synced_to_discovery(play: Play, state: s.DeviceState = PUBLISHED) -> list[s.Effect]:
    """Signed in, the log read; the discovery answered: what the session asks next."""
    load = one(play.sign_in(), s.LoadDeviceState)
    discovery = one(play.feed(s.DeviceStateLoaded(load.ref, state)), s.SendRequest)
    return play.feed(s.DeviceResponse(discovery.ref, reply(body=DISCOVERY)))


def light(seq: int) -> dict[str, Any]:
    return {"state": seq % 2 == 1, "seq": seq}


def batch_body(*items: tuple[str, Any]) -> list[dict[str, Any]]:
    return [{"href": f"ocf://d1{h}", "rep": rep} for h, rep in items]


def changes(effects: list[s.Effect]) -> list[events.ResourceChanged]:
    return [e.data for e in appended(effects) if isinstance(e.data, events.ResourceChanged)]


def seqs(effects: list[s.Effect], href: str) -> list[tuple[int, int | None]]:
    """(the device's own seq, the observe sequence number) of ``href``'s events, in order."""
    return [(c.content["seq"], c.observe_seq) for c in changes(effects) if c.href == href]


# --------------------------------------------------------------------------- order (item 1)


def test_a_notification_fed_before_the_batch_first_response_is_appended_after_it() -> None:
    play = Play()
    batch = one(synced_to_discovery(play), s.SendRequest)
    assert batch.observe
    # the device sent the first response, then a change; the driver fed the change first
    early = play.feed(
        s.Notification(batch.ref, reply(body=batch_body(("/light/1", light(1))), observe=1))
    )
    assert early == [], "nothing before the first response"
    first = reply(
        body=batch_body(("/oic/d", {"n": "dev"}), ("/light/1", light(0)), ("/light/2", light(0))),
        observe=0,
    )
    effects = play.feed(s.DeviceResponse(batch.ref, first))
    assert seqs(effects, "/light/1") == [(0, 0), (1, 1)]
    assert seqs(effects, "/light/2") == [(0, 0)]
    # later notifications go straight in
    later = play.feed(
        s.Notification(batch.ref, reply(body=batch_body(("/light/2", light(1))), observe=2))
    )
    assert seqs(later, "/light/2") == [(1, 2)]


def test_a_notification_fed_before_its_observations_first_response_is_appended_after_it() -> None:
    play = Play(batch=False)
    reqs = {r.path: r for r in of(synced_to_discovery(play), s.SendRequest)}
    ref = reqs["/light/1"].ref
    assert play.feed(s.Notification(ref, reply(body=light(1), observe=8))) == []
    assert play.feed(s.Notification(ref, reply(body=light(2), observe=9))) == []
    effects = play.feed(s.DeviceResponse(ref, reply(body=light(0), observe=7)))
    assert seqs(effects, "/light/1") == [(0, 7), (1, 8), (2, 9)]


def test_early_notifications_are_bounded_keeping_the_newest() -> None:
    play = Play(batch=False)
    reqs = {r.path: r for r in of(synced_to_discovery(play), s.SendRequest)}
    ref = reqs["/light/1"].ref
    n = s.MAX_EARLY_NOTIFICATIONS + 10
    for i in range(1, n + 1):
        play.feed(s.Notification(ref, reply(body=light(i), observe=i)))
    effects = play.feed(s.DeviceResponse(ref, reply(body=light(0), observe=0)))
    got = [seq for seq, _ in seqs(effects, "/light/1")]
    assert got == [0, *range(11, n + 1)]


def test_early_notifications_of_a_connection_that_ended_are_dropped() -> None:
    play = Play(batch=False)
    reqs = {r.path: r for r in of(synced_to_discovery(play), s.SendRequest)}
    ref = reqs["/light/1"].ref
    play.feed(s.Notification(ref, reply(body=light(1), observe=1)))
    lost = play.feed(s.ConnectionLost("gone"))
    assert [type(e.data) for e in appended(lost)] == [events.DeviceOffline]
    assert play.feed(s.DeviceResponse(ref, reply(body=light(0), observe=0))) == []


@st.composite
def interleavings(draw: st.DrawFn, observations: int) -> list[tuple[int, int]]:
    """The driver's view of ``observations`` observations, each a first response (index 0)
    then notifications 1..k in wire order: notifications of one observation are fed in order,
    its first response after any number of them (the await), observations interleave freely.
    Items are (observation, index)."""
    per: list[list[int]] = []
    for _ in range(observations):
        k = draw(st.integers(0, 4))
        before = draw(st.integers(0, k))  # notifications the driver feeds before the response
        per.append([*range(1, before + 1), 0, *range(before + 1, k + 1)])
    order = draw(st.permutations([o for o, items in enumerate(per) for _ in items]))
    cursors = [0] * observations
    out: list[tuple[int, int]] = []
    for o in order:
        out.append((o, per[o][cursors[o]]))
        cursors[o] += 1
    return out


@settings(max_examples=200, deadline=None)
@given(interleavings(observations=len(LIGHTS)))
def test_one_by_one_any_interleaving_keeps_each_resources_order(
    fed: list[tuple[int, int]],
) -> None:
    play = Play(batch=False)
    reqs = {r.path: r for r in of(synced_to_discovery(play), s.SendRequest)}
    effects: list[s.Effect] = []
    for o, i in fed:
        ref = reqs[LIGHTS[o]].ref
        r = reply(body=light(i), observe=100 + i)
        inp = s.DeviceResponse(ref, r) if i == 0 else s.Notification(ref, r)
        effects += play.feed(inp)
    for o, href in enumerate(LIGHTS):
        produced = sorted(i for oo, i in fed if oo == o)
        assert seqs(effects, href) == [(i, 100 + i) for i in produced]


@settings(max_examples=200, deadline=None)
@given(interleavings(observations=1), st.lists(st.sampled_from(LIGHTS), min_size=5, max_size=5))
def test_batch_any_interleaving_keeps_each_resources_order(
    fed: list[tuple[int, int]], changed: list[str]
) -> None:
    """Notification i of the batch observation carries the change of ``changed[i - 1]``."""
    play = Play()
    batch = one(synced_to_discovery(play), s.SendRequest)
    device = {h: 0 for h in LIGHTS}
    wire: list[s.Reply] = [reply(body=batch_body(*((h, light(0)) for h in LIGHTS)), observe=0)]
    for i in range(1, len(fed)):
        href = changed[i - 1]
        device[href] += 1
        wire.append(reply(body=batch_body((href, light(device[href]))), observe=i))
    effects: list[s.Effect] = []
    for _, i in fed:
        inp = s.DeviceResponse(batch.ref, wire[i]) if i == 0 else s.Notification(batch.ref, wire[i])
        effects += play.feed(inp)
    for href in LIGHTS:
        got = [seq for seq, _ in seqs(effects, href)]
        assert got == list(range(device[href] + 1))


def published_later(play: Play, href: str) -> s.SendRequest:
    """The device publishes ``href`` while the batch observation runs: it is read once."""
    effects = play.request(
        "POST", "/oic/rd", {"di": "d1", "links": [{"href": href, "p": {"bm": 3}, "ins": 9}]}
    )
    return one(play.ack(effects), s.SendRequest)


def test_a_one_shot_read_answered_after_a_batch_report_of_it_is_dropped() -> None:
    play = Play()
    batch = one(synced_to_discovery(play), s.SendRequest)
    first = batch_body(("/oic/d", {}), ("/oic/p", {}), *((h, light(0)) for h in LIGHTS))
    in_sync = appended(play.feed(s.DeviceResponse(batch.ref, reply(body=first, observe=0))))
    assert isinstance(in_sync[-1].data, events.TwinSyncStateChanged)
    read = published_later(play, "/light/3")
    assert (read.path, read.observe) == ("/light/3", False)
    note = play.feed(
        s.Notification(batch.ref, reply(body=batch_body(("/light/3", light(5))), observe=1))
    )
    assert seqs(note, "/light/3") == [(5, 1)]
    states = [e.data for e in appended(note) if isinstance(e.data, events.TwinSyncStateChanged)]
    assert [st.state for st in states] == ["in_sync"], "reported: the read adds nothing"
    answer = play.feed(s.DeviceResponse(read.ref, reply(body=light(4))))
    assert appended(answer) == [], "the read may predate the notification: not appended"
    later = play.feed(
        s.Notification(batch.ref, reply(body=batch_body(("/light/3", light(6))), observe=2))
    )
    assert seqs(later, "/light/3") == [(6, 2)]


def test_a_one_shot_read_answered_before_any_batch_report_of_it_is_appended() -> None:
    play = Play()
    batch = one(synced_to_discovery(play), s.SendRequest)
    play.feed(
        s.DeviceResponse(batch.ref, reply(body=batch_body(("/light/1", light(0))), observe=0))
    )
    read = published_later(play, "/light/3")
    answer = play.feed(s.DeviceResponse(read.ref, reply(body=light(4))))
    assert seqs(answer, "/light/3") == [(4, None)]
    note = play.feed(
        s.Notification(batch.ref, reply(body=batch_body(("/light/3", light(5))), observe=1))
    )
    assert seqs(note, "/light/3") == [(5, 1)]


# --------------------------------------------------------------------------- what is read (item 5)


def test_one_by_one_reads_the_published_resources_and_the_device_information_only() -> None:
    play = Play(batch=False)
    only_one = s.DeviceState(links=(events.ResourceLink(href="/light/1", observable=True),))
    reqs = {r.path: r for r in of(synced_to_discovery(play, only_one), s.SendRequest)}
    assert set(reqs) == {"/oic/d", "/oic/p", "/light/1"}
    assert reqs["/light/1"].observe
    assert not reqs["/oic/d"].observe


def test_batch_reports_of_resources_not_published_are_not_appended() -> None:
    play = Play()
    only_one = s.DeviceState(links=(events.ResourceLink(href="/light/1", observable=True),))
    batch = one(synced_to_discovery(play, only_one), s.SendRequest)
    first = reply(
        body=batch_body(
            ("/oic/d", {"n": "dev"}),
            ("/oic/p", {"pi": "p"}),
            ("/oc/wk/introspection", None),
            ("/light/1", light(0)),
            ("/light/2", light(0)),
        ),
        observe=0,
    )
    effects = play.feed(s.DeviceResponse(batch.ref, first))
    assert sorted(c.href for c in changes(effects)) == ["/light/1", "/oic/d", "/oic/p"]
    assert isinstance(appended(effects)[-1].data, events.TwinSyncStateChanged)
    note = reply(body=batch_body(("/light/2", light(1)), ("/light/1", light(1))), observe=1)
    assert [c.href for c in changes(play.feed(s.Notification(batch.ref, note)))] == ["/light/1"]


def test_the_device_information_is_read_when_published_even_if_not_discovered() -> None:
    play = Play(batch=False)
    state = s.DeviceState(links=(events.ResourceLink(href="/oic/d"),))
    load = one(play.sign_in(), s.LoadDeviceState)
    discovery = one(play.feed(s.DeviceStateLoaded(load.ref, state)), s.SendRequest)
    reqs = of(play.feed(s.DeviceResponse(discovery.ref, s.Reply("4.04"))), s.SendRequest)
    assert [r.path for r in reqs] == ["/oic/d"]


def test_an_unchanged_resync_appends_no_content() -> None:
    """What the log held at sign-in (device information not published, an error status) is
    compared with what the device answers: nothing changed, nothing appended."""
    play = Play(batch=False)
    only_one = s.DeviceState(
        links=(events.ResourceLink(href="/light/1", observable=True),),
        last_content={
            "/light/1": (10000, light(3)),
            "/oic/d": (10000, {"n": "dev"}),
            "/oic/p": (None, ("status", "4.00")),
        },
    )
    reqs = {r.path: r for r in of(synced_to_discovery(play, only_one), s.SendRequest)}
    effects = play.feed(s.DeviceResponse(reqs["/oic/d"].ref, reply(body={"n": "dev"})))
    effects += play.feed(s.DeviceResponse(reqs["/oic/p"].ref, s.Reply("4.00", b"no", 0)))
    effects += play.feed(s.DeviceResponse(reqs["/light/1"].ref, reply(body=light(3), observe=0)))
    assert changes(effects) == []
    assert [e.data.state for e in appended(effects)] == ["in_sync"]  # type: ignore[union-attr]

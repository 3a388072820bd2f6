"""Scripted conversations: the OCF cloud protocol of one device connection."""

from __future__ import annotations

from typing import Any

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import session as s
from proto import events

from .playbook import NOW, Play, appended, of, one, reply

LINKS = [
    {"href": "/oic/res", "rt": ["oic.wk.res"], "if": ["oic.if.ll", "oic.if.b"], "p": {"bm": 3}},
    {"href": "/oic/d", "rt": ["oic.wk.d"], "if": ["oic.if.r"], "p": {"bm": 1}},
    {"href": "/light/1", "rt": ["core.light"], "if": ["oic.if.a"], "p": {"bm": 3}},
    {"href": "/oic/sec/doxm", "rt": ["oic.r.doxm"], "if": ["oic.if.baseline"], "p": {"bm": 1}},
]


# What the log says the device published before (the twin syncs published resources only).
PUBLISHED = s.DeviceState(links=(events.ResourceLink(href="/light/1", observable=True),))


def signed_in(play: Play) -> list[s.Effect]:
    effects = play.sign_in()
    load = one(effects, s.LoadDeviceState)
    return play.feed(s.DeviceStateLoaded(load.ref, PUBLISHED))


def test_sign_up_replies_after_the_log_acknowledged() -> None:
    play = Play()
    effects = play.request(
        "POST", "/oic/sec/account", {"di": "d1", "accesstoken": play.token(), "authprovider": "x"}
    )
    assert not of(effects, s.Respond), "no reply before the append is acknowledged"
    ev = one(appended(effects) and [appended(effects)[0]], events.Event)  # type: ignore[arg-type]
    assert isinstance(ev.data, events.DeviceRegistered)
    assert (ev.owner, ev.device_id) == ("alice", "d1")
    r = one(play.ack(effects), s.Respond)
    body = cbor2.loads(r.payload)
    assert r.code == "2.04"
    assert r.content_format == 10000
    assert body["accesstoken"]
    assert body["refreshtoken"]
    assert body["uid"] == "alice"
    assert isinstance(body["expiresin"], int)
    assert body["expiresin"] == 3600
    assert body["redirecturi"] == ""


def test_sign_up_retry_gets_the_same_answer_and_log_failure_is_503() -> None:
    play = Play()
    token = play.token()
    first = play.request("POST", "/oic/sec/account", {"di": "d1", "accesstoken": token})
    failed = play.feed(s.AppendResult(one(first, s.Append).ref, False, "down"))
    assert one(failed, s.Respond).code == "5.03"
    # not recorded: the retry registers again (a 2.04 must never precede the registration)
    again = play.request("POST", "/oic/sec/account", {"di": "d1", "accesstoken": token})
    answer = one(play.ack(again), s.Respond)
    assert answer.code == "2.04"
    third = play.request("POST", "/oic/sec/account", {"di": "d1", "accesstoken": token})
    assert [(r.code, r.payload) for r in of(third, s.Respond)] == [(answer.code, answer.payload)]
    assert not of(third, s.Append), "recorded: a retry gets the same answer, nothing appended"


def test_before_sign_in_only_security_paths_are_open() -> None:
    play = Play()
    effects = play.request("POST", "/oic/rd", {"di": "d1", "links": []})
    assert one(effects, s.Respond).code == "4.01"
    one(effects, s.Close)
    assert play.request("GET", "/oic/res") == [], "nothing after Close"


def test_sign_in_with_expiresin_then_batch_sync_to_in_sync() -> None:
    play = Play()
    effects = play.sign_in()
    r = one(effects, s.Respond)
    assert r.code == "2.04"
    assert isinstance(cbor2.loads(r.payload)["expiresin"], int)
    one(effects, s.SignedIn)
    load = one(effects, s.LoadDeviceState)
    discovery = one(play.feed(s.DeviceStateLoaded(load.ref, PUBLISHED)), s.SendRequest)
    assert (discovery.method, discovery.path, discovery.observe) == ("GET", "/oic/res", False)
    batch = one(play.feed(s.DeviceResponse(discovery.ref, reply(body=LINKS))), s.SendRequest)
    assert batch.query == ("if=oic.if.b",)
    assert batch.observe
    rep = [
        {"href": "ocf://d1/oic/d", "rep": {"n": "dev"}},
        {"href": "ocf://d1/light/1", "rep": {"state": True}},
    ]
    effects = play.feed(s.DeviceResponse(batch.ref, reply(body=rep, observe=1)))
    evs = appended(effects)
    changed = [e.data for e in evs if isinstance(e.data, events.ResourceChanged)]
    assert {c.href for c in changed} == {"/oic/d", "/light/1"}
    assert isinstance(evs[-1].data, events.TwinSyncStateChanged)
    assert evs[-1].data.state == "in_sync"
    # a notification with new content is appended, an identical one is not
    upd = [
        {"href": "ocf://d1/light/1", "rep": {"state": False}},
        {"href": "ocf://d1/oic/d", "rep": {"n": "dev"}},
    ]
    evs = appended(play.feed(s.Notification(batch.ref, reply(body=upd, observe=2))))
    assert [
        (e.data.href, e.data.content)
        for e in evs  # type: ignore[union-attr]
    ] == [("/light/1", {"state": False})]
    assert appended(play.feed(s.Notification(batch.ref, reply(body=upd, observe=3)))) == []


def _discover(play: Play, links: list[dict[str, Any]]) -> list[s.Effect]:
    effects = signed_in(play)
    discovery = one(effects, s.SendRequest)
    return play.feed(s.DeviceResponse(discovery.ref, reply(body=links)))


def test_batch_answered_without_observe_falls_back_to_one_by_one() -> None:
    play = Play()
    batch = one(_discover(play, LINKS), s.SendRequest)
    effects = play.feed(s.DeviceResponse(batch.ref, reply(body=[], observe=None)))
    reqs = of(effects, s.SendRequest)
    assert {(r.path, r.observe) for r in reqs} == {("/oic/d", False), ("/light/1", True)}
    one(effects, s.CancelObservation)


def test_empty_collection_400_is_tolerated() -> None:
    play = Play()
    batch = one(_discover(play, LINKS), s.SendRequest)
    effects = play.feed(s.DeviceResponse(batch.ref, s.Reply("4.00", b"\x80", 10000)))
    assert {r.path for r in of(effects, s.SendRequest)} == {"/oic/d", "/light/1"}


def test_without_batch_support_observe_observables_and_get_the_rest() -> None:
    play = Play(batch=False)
    reqs = of(_discover(play, LINKS), s.SendRequest)
    by_path = {r.path: r for r in reqs}
    assert set(by_path) == {"/oic/d", "/light/1"}, "security resources are never observed"
    assert by_path["/light/1"].observe
    assert not by_path["/oic/d"].observe
    play.feed(s.DeviceResponse(by_path["/oic/d"].ref, reply(body={"n": "x"})))
    effects = play.feed(s.DeviceResponse(by_path["/light/1"].ref, reply(body={"v": 1}, observe=5)))
    last = appended(effects)[-1].data
    assert isinstance(last, events.TwinSyncStateChanged)
    assert last.state == "in_sync"
    evs = appended(
        play.feed(s.Notification(by_path["/light/1"].ref, reply(body={"v": 2}, observe=6)))
    )
    assert isinstance(evs[0].data, events.ResourceChanged)
    assert evs[0].data.observe_seq == 6


def test_device_that_does_not_answer_still_reaches_in_sync_with_an_error_status() -> None:
    play = Play(batch=False)
    reqs = of(_discover(play, LINKS), s.SendRequest)
    play.feed(s.DeviceResponse(reqs[0].ref, None, "timeout"))
    effects = play.feed(s.DeviceResponse(reqs[1].ref, reply(body={"v": 1}, observe=1)))
    assert any(isinstance(e.data, events.TwinSyncStateChanged) for e in appended(effects))


def test_publish_echoes_links_with_ins_and_starts_observing() -> None:
    play = Play(batch=False)
    _discover(play, [])
    effects = play.request(
        "POST",
        "/oic/rd",
        {
            "di": "d1",
            "ttl": 0,
            "links": [
                {
                    "href": "ocf://d1/temp",
                    "rt": ["oic.r.temperature"],
                    "if": ["oic.if.s"],
                    "p": {"bm": 3},
                },
                {"href": "/hum", "ins": 7},
            ],
        },
    )
    ev = appended(effects)[0].data
    assert isinstance(ev, events.ResourceLinksPublished)
    follow = play.ack(effects)
    body = cbor2.loads(one(follow, s.Respond).payload)
    assert [(link["href"], link["ins"]) for link in body["links"]] == [("/temp", 1), ("/hum", 7)]
    assert {r.path for r in of(follow, s.SendRequest)} == {"/temp", "/hum"}


def test_published_links_survive_reconnect_via_loaded_state() -> None:
    play = Play(batch=False)
    effects = play.sign_in()
    load = one(effects, s.LoadDeviceState)
    state = s.DeviceState(
        links=(events.ResourceLink(href="/temp", observable=True, ins=3),),
        last_content={"/temp": (10000, {"t": 20})},
    )
    discovery = one(play.feed(s.DeviceStateLoaded(load.ref, state)), s.SendRequest)
    req = one(play.feed(s.DeviceResponse(discovery.ref, reply(body=[]))), s.SendRequest)
    assert req.path == "/temp"
    assert req.observe
    evs = appended(play.feed(s.DeviceResponse(req.ref, reply(body={"t": 20}, observe=1))))
    assert [type(e.data) for e in evs] == [events.TwinSyncStateChanged], "same content as logged"


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"di": "d1", "uid": "mallory", "login": True}, "4.01"),  # uid is not the owner
        ({"di": "d1", "uid": "alice", "accesstoken": "garbage", "login": True}, "4.01"),
        ({"di": "d1", "uid": "alice", "login": "yes"}, "4.00"),
        ({"uid": "alice", "accesstoken": "x", "login": True}, "4.00"),
        ([1, 2], "4.00"),
    ],
)
def test_bad_sign_in(body: Any, code: str) -> None:
    play = Play()
    if isinstance(body, dict) and body.get("uid") and "accesstoken" not in body:
        body = body | {"accesstoken": play.token()}
    effects = play.request("POST", "/oic/sec/session", body)
    assert one(effects, s.Respond).code == code
    assert bool(of(effects, s.Close)) == (code == "4.01")


def test_expired_token_and_token_for_another_device_are_refused() -> None:
    play = Play()
    expired = play.issuer.issue("alice", now=NOW - 7200, ttl=60)
    effects = play.request("POST", "/oic/sec/account", {"di": "d1", "accesstoken": expired})
    assert one(effects, s.Respond).code == "4.01"
    play2 = Play()
    other = play2.token(device="d2")
    effects = play2.request("POST", "/oic/sec/account", {"di": "d1", "accesstoken": other})
    assert one(effects, s.Respond).code == "4.01"


def test_malformed_cbor_is_400_with_diagnostic() -> None:
    play = Play()
    effects = play.feed(
        s.DeviceRequest(1, "POST", "/oic/sec/account", payload=b"\xbf\x61", content_format=10000)
    )
    r = one(effects, s.Respond)
    assert r.code == "4.00"
    assert b"CBOR" in r.payload
    assert not of(effects, s.Close)


def test_json_request_gets_json_reply() -> None:
    play = Play()
    import json

    body = json.dumps({"di": "d1", "accesstoken": play.token()}).encode()
    effects = play.feed(
        s.DeviceRequest(1, "POST", "/oic/sec/account", payload=body, content_format=50)
    )
    r = one(play.ack(effects), s.Respond)
    assert r.content_format == 50
    assert json.loads(r.payload)["uid"] == "alice"


def test_refresh_then_sign_in_again_on_the_same_connection() -> None:
    play = Play()
    signed_in(play)
    tokens = play.sign_up()
    effects = play.request(
        "POST",
        "/oic/sec/tokenrefresh",
        {"di": "d1", "uid": "alice", "refreshtoken": tokens["refreshtoken"]},
    )
    body = cbor2.loads(one(effects, s.Respond).payload)
    assert body["accesstoken"]
    assert body["refreshtoken"]
    assert isinstance(body["expiresin"], int)
    effects = play.request(
        "POST",
        "/oic/sec/session",
        {"di": "d1", "uid": "alice", "accesstoken": body["accesstoken"], "login": True},
    )
    assert one(effects, s.Respond).code == "2.04"
    assert not of(effects, s.Append), "a resumed session is not a second online event"


def test_refresh_with_access_token_is_401() -> None:
    play = Play()
    tokens = play.sign_up()
    effects = play.request(
        "POST",
        "/oic/sec/tokenrefresh",
        {"di": "d1", "uid": "alice", "refreshtoken": tokens["accesstoken"]},
    )
    assert one(effects, s.Respond).code == "4.01"


def test_connection_lost_emits_offline_once() -> None:
    play = Play()
    signed_in(play)
    effects = play.feed(s.ConnectionLost("reset"))
    ev = one(appended(effects), events.Event)  # type: ignore[arg-type]
    assert isinstance(ev.data, events.DeviceOffline)
    assert ev.data.reason == "reset"
    assert play.feed(s.ConnectionLost("again")) == []


def test_sign_out_then_token_expiry() -> None:
    play = Play(access_ttl=100)
    signed_in(play)
    effects = play.request("POST", "/oic/sec/session", {"di": "d1", "login": False})
    assert isinstance(appended(effects)[0].data, events.DeviceOffline)
    assert one(play.ack(effects), s.Respond).code == "2.04"
    play.sign_in()
    play.now += 101
    effects = play.feed(s.Tick())
    assert isinstance(appended(effects)[0].data, events.DeviceOffline)
    one(effects, s.Close)


def test_unknown_path_after_sign_in_is_404() -> None:
    play = Play()
    signed_in(play)
    assert one(play.request("GET", "/nope"), s.Respond).code == "4.04"
    assert one(play.request("PUT", "/oic/sec/session", {}), s.Respond).code == "4.05"


inputs = st.one_of(
    st.builds(
        s.DeviceRequest,
        rid=st.integers(0, 9),
        method=st.sampled_from(["GET", "POST", "DELETE", "PUT"]),
        path=st.sampled_from(
            [
                "/oic/sec/account",
                "/oic/sec/session",
                "/oic/sec/tokenrefresh",
                "/oic/rd",
                "/oic/res",
                "/x",
            ]
        ),
        query=st.lists(st.text(max_size=8), max_size=2).map(tuple),
        payload=st.binary(max_size=40),
        content_format=st.sampled_from([None, 50, 60, 10000, 7]),
    ),
    st.builds(s.AppendResult, ref=st.integers(0, 20), ok=st.booleans()),
    st.builds(
        s.DeviceResponse,
        ref=st.integers(0, 20),
        reply=st.none()
        | st.builds(
            s.Reply,
            code=st.sampled_from(["2.05", "4.00", "4.04"]),
            payload=st.binary(max_size=30),
            content_format=st.sampled_from([None, 10000]),
            observe=st.none() | st.integers(0, 9),
        ),
    ),
    st.builds(
        s.Notification,
        ref=st.integers(0, 20),
        reply=st.builds(s.Reply, code=st.just("2.05"), payload=st.binary(max_size=30)),
    ),
    st.builds(s.DeviceStateLoaded, ref=st.integers(0, 20), state=st.none()),
    st.builds(s.Discovered, ref=st.integers(0, 20), links=st.none() | st.just({})),
    st.just(s.Tick()),
    st.builds(s.ConnectionLost, reason=st.text(max_size=5)),
)


@settings(max_examples=300)
@given(st.lists(inputs, max_size=30), st.booleans())
def test_any_input_sequence_is_handled_without_crashing(seq: list[s.Input], sign_in: bool) -> None:
    play = Play()
    if sign_in:
        signed_in(play)
    for inp in seq:
        for eff in play.feed(inp):
            assert isinstance(
                eff,
                s.Discover
                | s.ResourcesKnown
                | s.Respond
                | s.SendRequest
                | s.CancelObservation
                | s.Append
                | s.LoadDeviceState
                | s.Close
                | s.SignedIn
                | s.SignedOut,
            )


def test_batch_get_without_observe_reports_then_observes_observables() -> None:
    play = Play()
    batch = one(_discover(play, LINKS), s.SendRequest)
    rep = [
        {"href": "ocf://d1/oic/d", "rep": {"n": "dev"}},
        {"href": "ocf://d1/light/1", "rep": {"state": True, "rt": ["x"], "if": ["y"]}},
    ]
    effects = play.feed(s.DeviceResponse(batch.ref, reply(body=rep, observe=None)))
    changed = [e.data for e in appended(effects) if isinstance(e.data, events.ResourceChanged)]
    assert {c.href: c.content for c in changed} == {
        "/oic/d": {"n": "dev"},
        "/light/1": {"state": True},
    }
    reqs = of(effects, s.SendRequest)
    assert [(r.path, r.observe) for r in reqs] == [("/light/1", True)]


def test_links_published_before_discovery_are_synced_once() -> None:
    play = Play(batch=False)
    effects = play.sign_in()
    load = one(effects, s.LoadDeviceState)
    pub = play.request(
        "POST", "/oic/rd", {"di": "d1", "links": [{"href": "/light/1", "p": {"bm": 3}}]}
    )
    assert not of(play.ack(pub), s.SendRequest), "the coming discovery picks them up"
    discovery = one(play.feed(s.DeviceStateLoaded(load.ref, s.DeviceState())), s.SendRequest)
    reqs = of(play.feed(s.DeviceResponse(discovery.ref, reply(body=[]))), s.SendRequest)
    assert [(r.path, r.observe) for r in reqs] == [("/light/1", True)]


def test_cloud_discovery_lists_the_owners_devices_from_the_log() -> None:
    play = Play()
    signed_in(play)
    effects = play.request("GET", "/oic/res", query=("rt=core.light",))
    ask = one(effects, s.Discover)
    assert (ask.owner, ask.resource_types) == ("alice", ("core.light",))
    light = events.ResourceLink(href="/light/1", rt=("core.light",), observable=True, ins=1)
    other = events.ResourceLink(href="/oic/d", rt=("oic.wk.d",))
    effects = play.feed(s.Discovered(ask.ref, {"d2": (light, other), "d3": (other,)}))
    body = cbor2.loads(one(effects, s.Respond).payload)
    assert [(d["di"], [link["href"] for link in d["links"]]) for d in body] == [
        ("d2", ["/light/1"])
    ]
    again = one(play.request("GET", "/oic/res"), s.Discover)
    assert one(play.feed(s.Discovered(again.ref, None)), s.Respond).code == "5.03"

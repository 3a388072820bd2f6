from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from devicesim.config import BatchSupport
from devicesim.resources import DeviceModel, UpdateRejected

DI = "2b8d7e3c-0000-4000-8000-00000000abcd"


def model(resources: int = 2, batch: BatchSupport = BatchSupport.OBSERVE) -> DeviceModel:
    return DeviceModel(device_id=DI, name="m", resources=resources, batch=batch, now_ns=5)


def test_initial_lights() -> None:
    m = model()
    assert m.user_hrefs == ("/light/1", "/light/2")
    assert m.representation("/light/1") == {"state": False, "power": 0, "seq": 0, "ts": 5}
    base = m.representation("/light/1", baseline=True)
    assert base["rt"] == ["core.light"]
    assert base["if"] == ["oic.if.rw", "oic.if.baseline"]


def test_round_robin_changes_bump_seq_and_ts() -> None:
    m = model()
    rng = random.Random(1)
    hrefs = [m.next_href() for _ in range(4)]
    assert hrefs == ["/light/1", "/light/2", "/light/1", "/light/2"]
    rep = m.simulate_change("/light/2", 99, rng)
    assert rep["state"] is True
    assert 1 <= rep["power"] <= 100
    assert (rep["seq"], rep["ts"]) == (1, 99)
    rep = m.simulate_change("/light/2", 100, rng)
    assert (rep["state"], rep["power"], rep["seq"]) == (False, 0, 2)
    assert model(0).next_href() is None


def test_update_applies_keys() -> None:
    m = model()
    rep = m.apply_update("/light/1", {"state": True, "power": 7, "label": "x"}, 42)
    assert rep == {"state": True, "power": 7, "seq": 1, "ts": 42, "label": "x"}
    assert m.representation("/light/1") == rep


@pytest.mark.parametrize(
    ("href", "payload"),
    [
        ("/light/1", {"seq": 3}),
        ("/light/1", {"ts": 3}),
        ("/light/1", {"state": 1}),
        ("/light/1", {"power": -1}),
        ("/light/1", {"power": True}),
        ("/light/1", {}),
        ("/light/1", [1]),
        ("/light/1", {1: 2}),
        ("/oic/d", {"n": "x"}),
    ],
)
def test_update_rejects(href: str, payload: Any) -> None:
    m = model()
    with pytest.raises(UpdateRejected):
        m.apply_update(href, payload, 1)
    if href == "/light/1":
        assert m.representation(href)["seq"] == 0


def test_links_and_publish_links() -> None:
    m = model()
    links = m.links()
    assert [link["href"] for link in links] == [
        "/oic/res",
        "/oic/d",
        "/oic/p",
        "/light/1",
        "/light/2",
    ]
    res = links[0]
    assert res["if"] == ["oic.if.ll", "oic.if.b", "oic.if.baseline"]
    assert res["p"] == {"bm": 3}
    assert links[1]["p"] == {"bm": 1}
    assert all("eps" not in link for link in links)
    assert [link["href"] for link in m.links(rt="core.light")] == ["/light/1", "/light/2"]
    assert [link["ins"] for link in m.publish_links()] == [1, 2, 3, 4, 5]
    with_eps = DeviceModel(device_id=DI, name="m", resources=0, eps=("coaps+tcp://x:1",))
    assert with_eps.links()[0]["eps"] == [{"ep": "coaps+tcp://x:1"}]


@pytest.mark.parametrize("batch", [BatchSupport.GET_ONLY, BatchSupport.REJECT])
def test_res_not_observable_without_batch_observe(batch: BatchSupport) -> None:
    res = model(batch=batch).links()[0]
    assert res["p"] == {"bm": 1}
    assert "oic.if.b" in res["if"]


def test_batch_representation() -> None:
    m = model()
    full = m.batch()
    assert [item["href"] for item in full] == [
        f"ocf://{DI}/oic/d",
        f"ocf://{DI}/oic/p",
        f"ocf://{DI}/light/1",
        f"ocf://{DI}/light/2",
    ]
    assert full[0]["rep"]["di"] == DI
    assert full[0]["rep"]["rt"] == ["oic.wk.d"]
    only = m.batch(["/light/2"])
    assert only == [
        {"href": f"ocf://{DI}/light/2", "rep": m.representation("/light/2", baseline=True)}
    ]


@given(st.lists(st.sampled_from(["/light/1", "/light/2", "/light/3"]), max_size=50))
def test_seq_counts_changes(hrefs: list[str]) -> None:
    m = model(3)
    rng = random.Random(0)
    for i, h in enumerate(hrefs):
        m.simulate_change(h, i, rng)
    for h in m.user_hrefs:
        assert m.representation(h)["seq"] == hrefs.count(h)


def test_introspection_is_listed_but_neither_published_nor_in_the_batch() -> None:
    m = DeviceModel(device_id="d1", name="n", resources=1, introspection=True)
    assert "/oc/wk/introspection" in [link["href"] for link in m.links()]
    assert "/oc/wk/introspection" not in [link["href"] for link in m.publish_links()]
    assert "/oc/wk/introspection" not in [item["href"][len("ocf://d1") :] for item in m.batch()]
    assert "/oc/wk/introspection" not in [
        link["href"] for link in DeviceModel(device_id="d1", name="n", resources=1).links()
    ]

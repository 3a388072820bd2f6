"""SimDevice against a fake OCF cloud over real TCP/TLS on loopback."""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from typing import Any

import pytest
from aiocoap.numbers.codes import CSM, PING, POST

from devicesim import (
    BackoffPolicy,
    BatchSupport,
    DeviceConfig,
    DeviceState,
    SimDevice,
    TlsOptions,
    ocf,
    parse_gateway_uri,
)

from .conftest import CLIENT_DEVICE_ID, TlsMaterial
from .fakecloud import FakeCloud

FAST = BackoffPolicy(initial=0.02, maximum=0.2, jitter=0.5)
OCF_2_0 = b"\x08\x00"
OPT_ACCEPT = 17
OPT_CONTENT_FORMAT = 12


def make_config(cloud: FakeCloud, **kw: Any) -> DeviceConfig:
    args: dict[str, Any] = {
        "gateway": parse_gateway_uri(cloud.uri),
        "device_id": str(uuid.uuid4()),
        "token": "auth-code",
        "name": "test-device",
        "resources": 2,
        "ping_interval": None,
        "backoff": FAST,
        "request_timeout": 5.0,
    }
    args.update(kw)
    return DeviceConfig(**args)


def online(dev: SimDevice) -> bool:
    return dev.state is DeviceState.ONLINE


async def test_sign_up_sign_in_publish_observe_notify(cloud: FakeCloud) -> None:
    cfg = make_config(cloud)
    di = cfg.device_id
    async with SimDevice(cfg) as dev:
        await dev.wait_until(online, 10)

        paths = [(r.path, r.query) for r in cloud.received]
        assert paths == [
            (ocf.ACCOUNT, ()),
            (ocf.SESSION, ()),
            (ocf.RD, ("rt=oic.wk.rdpub",)),
        ]
        sign_up, sign_in, publish = cloud.received
        assert sign_up.conn is sign_in.conn is publish.conn
        assert sign_up.value == {"di": di, "accesstoken": "auth-code", "authprovider": "twinhub"}
        assert all(r.content_format == 10000 for r in cloud.received)
        rec = cloud.devices[di]
        assert sign_in.value == {
            "di": di,
            "uid": "owner-1",
            "accesstoken": rec.access_token,
            "login": True,
        }
        links = {link["href"]: link for link in publish.value["links"]}
        assert set(links) == {"/oic/res", "/oic/d", "/oic/p", "/light/1", "/light/2"}
        assert links["/light/1"]["p"] == {"bm": 3}
        assert links["/light/1"]["rt"] == ["core.light"]
        assert "oic.if.b" in links["/oic/res"]["if"]
        assert sorted(link["ins"] for link in links.values()) == [1, 2, 3, 4, 5]
        assert publish.value["ttl"] == 0
        # Normal stack: the connection starts with our CSM.
        assert sign_up.conn.first_code == CSM

        obs = await cloud.observe(di, "/light/1")
        assert obs.first.code == "2.05"
        assert obs.first.observe == 0
        assert set(obs.first.value) == {"state", "power", "seq", "ts"}
        before = time.time_ns()
        dev.change("/light/1")
        await cloud.wait_until(lambda: len(obs.notifications) == 1)
        note = obs.notifications[0]
        assert note.value["seq"] == obs.first.value["seq"] + 1
        assert note.value["state"] is True
        assert before - 10**9 < note.value["ts"] <= time.time_ns() + 10**9
        await dev.wait_until(lambda d: d.stats.notifications_sent == 1, 5)
        assert dev.stats.sign_ups == dev.stats.sign_ins == dev.stats.publishes == 1
    # Clean stop: sign-out with login false.
    out = cloud.requests_to(ocf.SESSION, di)[-1]
    assert out.value["login"] is False
    assert cloud.devices[di].sign_outs == 1
    assert dev.state is DeviceState.STOPPED
    assert dev.stats.errors == 0


async def test_rate_changes_values_and_counts_notifications(cloud: FakeCloud) -> None:
    cfg = make_config(cloud, rate=100.0, resources=2)
    async with SimDevice(cfg) as dev:
        await dev.wait_until(online, 10)
        o1 = await cloud.observe(cfg.device_id, "/light/1")
        o2 = await cloud.observe(cfg.device_id, "/light/2")
        await cloud.wait_until(lambda: len(o1.notifications) >= 3 and len(o2.notifications) >= 3)
        o1.cancel()
        o2.cancel()
        assert dev.stats.changes >= 6
        seqs = [n.value["seq"] for n in o1.notifications]
        assert seqs == sorted(seqs)
        received = len(o1.notifications) + len(o2.notifications)
        # Every notification the cloud got was counted as sent.
        assert dev.stats.notifications_sent >= received


async def test_reference_stack_sends_no_csm_and_ocf_version_options(cloud: FakeCloud) -> None:
    cfg = make_config(cloud, reference_stack=True)
    async with SimDevice(cfg) as dev:
        await dev.wait_until(online, 10)
        sign_up = cloud.received[0]
        conn = sign_up.conn
        assert conn.first_code == POST
        assert not conn.csm_received
        for r in cloud.received:
            assert r.options[ocf.OPT_OCF_CONTENT_FORMAT_VERSION] == [OCF_2_0]
            assert r.options[ocf.OPT_OCF_ACCEPT_CONTENT_FORMAT_VERSION] == [OCF_2_0]
            assert r.options[OPT_ACCEPT] == [(10000).to_bytes(2, "big")]
            assert r.content_format == 10000
        reply = await cloud.request(cfg.device_id, "GET", "/light/1")
        assert reply.code == "2.05"
        assert reply.content_format == 10000
        assert reply.options[ocf.OPT_OCF_CONTENT_FORMAT_VERSION] == [OCF_2_0]
        assert not conn.csm_received  # the whole exchange ran without a CSM from the device


async def test_discovery_links_baseline_and_rt_filter(cloud: FakeCloud) -> None:
    cfg = make_config(cloud, resources=3)
    di = cfg.device_id
    async with SimDevice(cfg) as dev:
        await dev.wait_until(online, 10)
        links = (await cloud.request(di, "GET", "/oic/res")).value
        assert [link["href"] for link in links] == [
            "/oic/res",
            "/oic/d",
            "/oic/p",
            "/light/1",
            "/light/2",
            "/light/3",
        ]
        assert all(link["anchor"] == f"ocf://{di}" for link in links)
        baseline = (await cloud.request(di, "GET", "/oic/res", ("if=oic.if.baseline",))).value
        assert baseline["rt"] == ["oic.wk.res"]
        assert baseline["links"] == links
        lights = (await cloud.request(di, "GET", "/oic/res", ("rt=core.light",))).value
        assert [link["href"] for link in lights] == ["/light/1", "/light/2", "/light/3"]
        d = (await cloud.request(di, "GET", "/oic/d")).value
        assert d["di"] == di
        assert d["n"] == "test-device"
        p = (await cloud.request(di, "GET", "/oic/p", ("if=oic.if.baseline",))).value
        assert p["rt"] == ["oic.wk.p"]


async def test_batch_observe_notifies_changed_resources(cloud: FakeCloud) -> None:
    cfg = make_config(cloud, resources=3, batch=BatchSupport.OBSERVE)
    di = cfg.device_id
    async with SimDevice(cfg) as dev:
        await dev.wait_until(online, 10)
        obs = await cloud.observe(di, "/oic/res", ("if=oic.if.b",))
        assert obs.first.code == "2.05"
        assert obs.first.observe == 0
        hrefs = [item["href"] for item in obs.first.value]
        assert hrefs == [
            f"ocf://{di}/oic/d",
            f"ocf://{di}/oic/p",
            f"ocf://{di}/light/1",
            f"ocf://{di}/light/2",
            f"ocf://{di}/light/3",
        ]
        light = obs.first.value[2]["rep"]
        assert light["rt"] == ["core.light"]
        assert {"state", "power", "seq", "ts"} <= set(light)

        dev.change("/light/2")
        await cloud.wait_until(lambda: len(obs.notifications) == 1)
        note = obs.notifications[0]
        assert note.observe is not None
        assert note.observe > 0
        assert [item["href"] for item in note.value] == [f"ocf://{di}/light/2"]
        assert note.value[0]["rep"]["seq"] == 1
        await dev.wait_until(lambda d: d.stats.notifications_sent == 1, 5)


@pytest.mark.parametrize(
    ("batch", "mode", "code"),
    [
        (BatchSupport.GET_ONLY, BatchSupport.GET_ONLY, "2.05"),
        (False, BatchSupport.GET_ONLY, "2.05"),
        (BatchSupport.REJECT, BatchSupport.REJECT, "4.00"),
    ],
)
async def test_batch_without_observe_support(
    cloud: FakeCloud, batch: BatchSupport | bool, mode: BatchSupport, code: str
) -> None:
    cfg = make_config(cloud, batch=batch)
    di = cfg.device_id
    async with SimDevice(cfg) as dev:
        await dev.wait_until(online, 10)
        res_link = next(link for link in cloud.devices[di].links if link["href"] == "/oic/res")
        assert "oic.if.b" in res_link["if"]
        assert res_link["p"]["bm"] == 1  # not observable
        obs = await cloud.observe(di, "/oic/res", ("if=oic.if.b",))
        assert obs.first.code == code
        assert obs.first.observe is None
        if mode is BatchSupport.GET_ONLY:
            assert len(obs.first.value) == 4  # /oic/d, /oic/p, two lights
        else:
            assert obs.first.value  # a diagnostic, not an empty 4.00 ("empty collection")
        # Per-resource observation still works.
        single = await cloud.observe(di, "/light/1")
        assert single.first.observe == 0


async def test_update_via_post_answers_new_rep_and_notifies(cloud: FakeCloud) -> None:
    cfg = make_config(cloud)
    di = cfg.device_id
    async with SimDevice(cfg) as dev:
        await dev.wait_until(online, 10)
        obs = await cloud.observe(di, "/light/1")
        reply = await cloud.request(di, "POST", "/light/1", value={"state": True, "power": 42})
        assert reply.code == "2.04"
        assert reply.value["state"] is True
        assert reply.value["power"] == 42
        assert reply.value["seq"] == 1
        await cloud.wait_until(lambda: len(obs.notifications) == 1)
        assert obs.notifications[0].value == reply.value
        assert dev.stats.updates_applied == 1

        bad = await cloud.request(di, "POST", "/light/1", value={"seq": 7})
        assert bad.code == "4.00"
        wrong_type = await cloud.request(di, "POST", "/light/1", value={"power": "high"})
        assert wrong_type.code == "4.00"
        read_only = await cloud.request(di, "POST", "/oic/d", value={"n": "x"})
        assert read_only.code == "4.05"
        missing = await cloud.request(di, "GET", "/light/9")
        assert missing.code == "4.04"
        assert dev.stats.updates_applied == 1


@pytest.mark.parametrize("reference_stack", [False, True])
async def test_reconnect_after_server_close(cloud: FakeCloud, reference_stack: bool) -> None:
    cfg = make_config(cloud, reference_stack=reference_stack)
    di = cfg.device_id
    async with SimDevice(cfg) as dev:
        await dev.wait_until(online, 10)
        first_conn = cloud.devices[di].conn
        cloud.drop(di)
        await dev.wait_until(lambda d: d.stats.sign_ins == 2 and online(d), 10)
        rec = cloud.devices[di]
        assert rec.conn is not None
        assert rec.conn is not first_conn
        assert rec.sign_ups == 1  # the registration survives the connection
        assert dev.stats.reconnects == 1
        # The reference stack publishes once per registration; ours on every connection.
        assert rec.publishes == (1 if reference_stack else 2)
        paths = [r.path for r in cloud.received if r.conn is rec.conn]
        assert paths[0] == ocf.SESSION
        # The new connection serves requests as the old one did.
        assert (await cloud.request(di, "GET", "/light/1")).code == "2.05"


async def test_reconnects_with_backoff_while_gateway_is_down() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = DeviceConfig(
        gateway=parse_gateway_uri(f"coap+tcp://127.0.0.1:{port}"),
        device_id=str(uuid.uuid4()),
        token="t",
        ping_interval=None,
        backoff=BackoffPolicy(initial=0.01, maximum=0.05, jitter=0.0),
    )
    dev = SimDevice(cfg)
    await dev.start()
    try:
        await dev.wait_until(lambda d: d.stats.connect_failures >= 3, 10)
        assert dev.stats.reconnects >= 2
        assert dev.stats.errors >= 3
        assert "SimConnectionError" in (dev.stats.last_error or "")
    finally:
        async with asyncio.timeout(5):
            await dev.stop()
    assert dev.state is DeviceState.STOPPED


async def test_token_refresh_before_expiry_signs_in_again() -> None:
    async with FakeCloud(expires_in=1) as cloud:
        cfg = make_config(cloud, refresh_fraction=0.5)
        di = cfg.device_id
        async with SimDevice(cfg) as dev:
            await dev.wait_until(online, 10)
            await dev.wait_until(
                lambda d: d.stats.token_refreshes >= 1 and d.stats.sign_ins >= 2, 10
            )
            rec = cloud.devices[di]
            assert rec.refreshes >= 1
            refresh = cloud.requests_to(ocf.TOKEN_REFRESH, di)[0]
            assert set(refresh.value) == {"di", "uid", "refreshtoken"}
            assert dev.stats.reconnects == 0  # same connection
            assert dev.registration is not None
            assert dev.registration.access_token == rec.access_token


async def test_refused_sign_in_refreshes_token_on_next_connection(cloud: FakeCloud) -> None:
    cfg = make_config(cloud)
    di = cfg.device_id
    cloud.refuse_sign_in.add(di)
    async with SimDevice(cfg) as dev:
        await dev.wait_until(lambda d: d.stats.token_refreshes >= 1, 10)
        assert dev.stats.errors >= 1
        assert cloud.devices[di].sign_ups == 1
        cloud.refuse_sign_in.discard(di)
        await dev.wait_until(online, 10)
        assert cloud.devices[di].sign_ins == 1


async def test_pings_and_pongs(cloud: FakeCloud) -> None:
    cfg = make_config(cloud, ping_interval=0.02, pong_timeout=2.0)
    async with SimDevice(cfg) as dev:
        await dev.wait_until(online, 10)
        await dev.wait_until(lambda d: d.stats.pongs_received >= 2, 10)
        conn = cloud.devices[cfg.device_id].conn
        assert conn is not None
        assert conn.signalling.count(PING) >= 2
        assert dev.stats.reconnects == 0


async def test_async_token_factory_gets_device_and_owner(cloud: FakeCloud) -> None:
    calls: list[tuple[str, str | None]] = []

    async def mint(device_id: str, owner: str | None) -> str:
        calls.append((device_id, owner))
        return f"jwt-for-{device_id}"

    cfg = make_config(cloud, token=mint, owner="alice")
    async with SimDevice(cfg) as dev:
        await dev.wait_until(online, 10)
    assert calls == [(cfg.device_id, "alice")]
    assert cloud.received[0].value["accesstoken"] == f"jwt-for-{cfg.device_id}"


async def test_failing_token_factory_is_an_error_not_a_crash(cloud: FakeCloud) -> None:
    def broken(device_id: str, owner: str | None) -> str:
        raise RuntimeError("no key")

    async with SimDevice(make_config(cloud, token=broken)) as dev:
        await dev.wait_until(lambda d: d.stats.errors >= 2, 10)
        assert "token factory failed" in (dev.stats.last_error or "")
        assert dev.stats.sign_ups == 0


async def test_mutual_tls(tls_material: TlsMaterial) -> None:
    async with FakeCloud(ssl_context=tls_material.server_context()) as cloud:
        cfg = make_config(
            cloud,
            device_id=CLIENT_DEVICE_ID,
            tls=TlsOptions(
                ca_file=tls_material.ca,
                cert_file=tls_material.client_cert,
                key_file=tls_material.client_key,
            ),
        )
        assert cfg.gateway.tls
        async with SimDevice(cfg) as dev:
            await dev.wait_until(online, 10)
            conn = cloud.devices[CLIENT_DEVICE_ID].conn
            assert conn is not None
            subject = dict(x[0] for x in conn.peer_cert["subject"])
            assert subject["commonName"] == f"uuid:{CLIENT_DEVICE_ID}"
            obs = await cloud.observe(CLIENT_DEVICE_ID, "/light/1")
            dev.change("/light/1")
            await cloud.wait_until(lambda: len(obs.notifications) == 1)


async def test_tls_rejects_unknown_gateway_certificate(tls_material: TlsMaterial) -> None:
    async with FakeCloud(ssl_context=tls_material.server_context()) as cloud:
        cfg = make_config(cloud, tls=TlsOptions())  # system roots do not know our test CA
        async with SimDevice(cfg) as dev:
            await dev.wait_until(lambda d: d.stats.connect_failures >= 1, 10)
            assert "certificate" in (dev.stats.last_error or "").lower()
            assert cloud.devices == {}

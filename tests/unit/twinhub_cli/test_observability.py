"""The pure parts of the operations endpoints: liveness / readiness answers, the prober, the
collectors (on stand-ins of the gateway and the projector), the API outcome counts, and the HTTP
server itself on loopback (no NATS or MongoDB needed)."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from auth.errors import TokenError
from auth.tokens import Claims
from eventstore.memory import InMemoryEventStore
from gateway.service import GatewayStats
from proto import api
from twin.memory import InMemoryTwinStore
from twin.model import Twin
from twin.service import ProjectorStats
from twinhub_cli import config as cfgmod
from twinhub_cli.observability import (
    ApiMetrics,
    Check,
    CountingTwinApi,
    GatewayCollector,
    Heartbeat,
    LogHead,
    ObservabilityConfig,
    ObservabilityServer,
    Prober,
    ProbeResult,
    TwinCollector,
    liveness,
    projector_lag,
    readiness,
    standard_registry,
)


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape, by (sample name, sorted labels)."""
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


# -- liveness / readiness ----------------------------------------------------------------------


def test_liveness_follows_the_heartbeat() -> None:
    status, doc = liveness(last_beat=100.0, now=101.5, stall_after=10.0)
    assert (status, doc["status"]) == (200, "ok")
    status, doc = liveness(last_beat=100.0, now=110.0, stall_after=10.0)
    assert (status, doc["status"]) == (503, "stalled")
    assert "10.0 s" in doc["detail"]


def test_liveness_fails_when_a_vital_part_ended() -> None:
    status, doc = liveness(last_beat=100.0, now=101.0, stall_after=10.0, failed=("projector",))
    assert (status, doc["status"], doc["detail"]) == (503, "failed", "failed: projector")


def test_heartbeat_evaluates_vital_conditions_on_each_beat() -> None:
    running = True
    hb = Heartbeat(1.0, clock=lambda: 0.0, vital={"projector": lambda: running})
    hb.beat(now=1.0, expected=1.0)
    assert hb.failed == ()
    running = False
    hb.beat(now=2.0, expected=2.0)
    assert hb.failed == ("projector",)


def test_readiness() -> None:
    assert readiness(None, now=5.0, max_age=3.0) == (503, {"status": "starting", "checks": {}})
    good = ProbeResult(at=10.0, checks=(Check("nats", True, "x"), Check("mongo", True)))
    assert readiness(good, now=11.0, max_age=3.0) == (
        200,
        {"status": "ready", "checks": {"nats": "ok", "mongo": "ok"}},
    )
    bad = ProbeResult(at=10.0, checks=(Check("nats", False, "NATS reconnecting"),))
    status, doc = readiness(bad, now=11.0, max_age=3.0)
    assert (status, doc) == (
        503,
        {"status": "not ready", "checks": {"nats": "failed: NATS reconnecting"}},
    )
    status, doc = readiness(good, now=14.0, max_age=3.0)  # the loop stopped probing
    assert (status, doc["status"]) == (503, "stale")


def test_heartbeat_lag() -> None:
    hb = Heartbeat(1.0, clock=lambda: 50.0)
    assert (hb.last, hb.lag) == (50.0, 0.0)
    hb.beat(now=52.5, expected=51.0)
    assert (hb.last, hb.lag) == (52.5, 1.5)
    hb.beat(now=53.0, expected=53.5)  # early never counts as negative lag
    assert hb.lag == 0.0


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="stall_after"):
        ObservabilityConfig(heartbeat_interval=5.0, stall_after=5.0)
    assert ObservabilityConfig().probe_max_age == 14.0


async def test_prober_runs_checks_concurrently_with_a_timeout() -> None:
    started: list[str] = []

    async def ok() -> str:
        started.append("ok")
        return "fine"

    async def broken() -> str:
        started.append("broken")
        raise ConnectionError("NATS disconnected")

    async def hangs() -> str:
        started.append("hangs")
        await asyncio.Event().wait()
        return "never"

    prober = Prober(
        {"a": ok, "b": broken, "c": hangs}, interval=1.0, timeout=0.1, clock=lambda: 7.0
    )
    assert prober.result is None
    result = await prober.probe()
    assert prober.result is result
    assert sorted(started) == ["broken", "hangs", "ok"]
    assert result.at == 7.0
    assert not result.ok
    assert result.checks == (
        Check("a", True, "fine"),
        Check("b", False, "ConnectionError: NATS disconnected"),
        Check("c", False, "no answer within 0.1 s"),
    )


async def test_log_head_reads_the_last_position() -> None:
    store = InMemoryEventStore()
    await store.provision()
    head = LogHead(store)
    assert head.position is None
    assert await head() == "last position 0"
    assert head.position == 0


def test_projector_lag() -> None:
    assert projector_lag(None, 5) is None
    assert projector_lag(10, 4) == 6
    assert projector_lag(3, 4) == 0  # the head was probed before the projector moved on


# -- collectors --------------------------------------------------------------------------------


def test_gateway_collector_reads_the_stats_at_scrape_time() -> None:
    stats = GatewayStats(connections=3, signed_in=2, requests=40, notifications=17, refused=1)
    gw: Any = SimpleNamespace(
        stats=stats,
        conns={"c1": 0, "c2": 0},
        devices={"d1": 0},
        config=SimpleNamespace(gateway_id="gw-7"),
    )
    prober = Prober({})
    prober.result = ProbeResult(1.0, (Check("nats", True), Check("jetstream", False, "x")))
    heartbeat = Heartbeat()
    heartbeat.lag = 0.25
    registry = CollectorRegistry()
    registry.register(GatewayCollector(gw, heartbeat, prober))
    got = samples(registry)
    assert got[("twinhub_gateway_connections_total", ())] == 3
    assert got[("twinhub_gateway_sign_ins_total", ())] == 2
    assert got[("twinhub_gateway_requests_total", ())] == 40
    assert got[("twinhub_gateway_notifications_total", ())] == 17
    assert got[("twinhub_gateway_overflow_closes_total", ())] == 0
    assert got[("twinhub_gateway_refused_total", ())] == 1
    assert got[("twinhub_gateway_connections", ())] == 2
    assert got[("twinhub_gateway_devices_online", ())] == 1
    assert got[("twinhub_gateway_event_loop_lag_seconds", ())] == 0.25
    assert got[("twinhub_gateway_info", (("gateway_id", "gw-7"),))] == 1
    assert got[("twinhub_gateway_check_ok", (("check", "nats"),))] == 1
    assert got[("twinhub_gateway_check_ok", (("check", "jetstream"),))] == 0

    stats.notifications += 5  # no registration, no hook: the next scrape reads it
    gw.devices["d2"] = 0
    got = samples(registry)
    assert got[("twinhub_gateway_notifications_total", ())] == 22
    assert got[("twinhub_gateway_devices_online", ())] == 2


@dataclass
class FakeProjector:
    stats: ProjectorStats
    config: Any = field(default_factory=lambda: SimpleNamespace(name="p", filter_subject=">"))


def test_twin_collector() -> None:
    projector: Any = FakeProjector(
        ProjectorStats(events_applied=9, duplicates_skipped=2, batches=3, position=40)
    )
    head = LogHead(InMemoryEventStore())
    api_metrics = ApiMetrics()
    api_metrics.record("update", "ok")
    api_metrics.record("update", "ok")
    api_metrics.record("twin-get", "not_found")
    registry = CollectorRegistry()
    registry.register(
        TwinCollector(projector, head, api_metrics, Heartbeat(), Prober({}), lambda: True)
    )
    got = samples(registry)
    assert got[("twinhub_twin_events_applied_total", ())] == 9
    assert got[("twinhub_twin_duplicates_skipped_total", ())] == 2
    assert got[("twinhub_twin_batches_total", ())] == 3
    assert got[("twinhub_twin_store_failures_total", ())] == 0
    assert got[("twinhub_twin_projector_position", ())] == 40
    assert got[("twinhub_twin_projector_running", ())] == 1
    assert ("twinhub_twin_projector_lag", ()) not in got  # the head is not known yet
    assert got[("twinhub_twin_api_requests_total", (("op", "update"), ("outcome", "ok")))] == 2
    assert (
        got[("twinhub_twin_api_requests_total", (("op", "twin-get"), ("outcome", "not_found")))]
        == 1
    )

    head.position = 45
    got = samples(registry)
    assert got[("twinhub_twin_log_head_position", ())] == 45
    assert got[("twinhub_twin_projector_lag", ())] == 5


async def test_twin_collector_counts_store_writes_per_collection_and_event() -> None:
    store = InMemoryTwinStore()
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    await store.write_many(
        [Twin(device_id="d1", owner="o", position=1, version=1, created_at=t0, updated_at=t0)]
    )
    await store.save_checkpoint("p", 1)
    await store.save_checkpoint("p", 2)
    projector: Any = FakeProjector(ProjectorStats(events_applied=6, commands_ended=2))
    registry = CollectorRegistry()
    registry.register(
        TwinCollector(
            projector,
            LogHead(InMemoryEventStore()),
            None,
            Heartbeat(),
            Prober({}),
            lambda: True,
            store,
        )
    )
    got = samples(registry)
    writes = "twinhub_twin_store_writes_total"
    assert got[(writes, (("collection", "twins"),))] == 1
    assert got[(writes, (("collection", "checkpoints"),))] == 2
    assert got[(writes, (("collection", "commands"),))] == 0
    assert got[("twinhub_twin_store_writes_per_event", ())] == 0.5
    assert got[("twinhub_twin_commands_ended_total", ())] == 2


class Validator:
    def validate(self, token: str, now: float) -> Claims:
        if token != "alice":
            raise TokenError("bad token")
        return Claims(owner=token, device_id=None, expires_at=None)


async def test_counting_api_records_op_and_outcome() -> None:
    log = InMemoryEventStore()
    await log.provision()
    metrics = ApiMetrics()
    twin_api = CountingTwinApi(log, InMemoryTwinStore(), Validator(), metrics=metrics)
    body = api.encode_request(api.ListDevices())
    assert (await twin_api.handle(api.ListDevices.OP, body, "alice")).ok
    assert not (await twin_api.handle(api.ListDevices.OP, body, "mallory")).ok
    assert not (await twin_api.handle(api.ListDevices.OP, body, None)).ok
    # a client picks the op (the subject's last token): the label stays bounded
    assert not (await twin_api.handle("x" * 200, b"{}", "alice")).ok
    assert metrics.requests() == {
        (api.ListDevices.OP, "ok"): 1,
        (api.ListDevices.OP, "unauthorized"): 2,
        ("unknown", "bad_request"): 1,
    }


# -- the HTTP server ---------------------------------------------------------------------------


def get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read()


async def test_server_endpoints() -> None:
    ready = True

    async def check() -> str:
        if not ready:
            raise ConnectionError("down")
        return "up"

    obs = ObservabilityConfig(heartbeat_interval=0.05, stall_after=1.0, probe_interval=0.05)
    prober = Prober({"thing": check}, interval=obs.probe_interval, timeout=obs.probe_timeout)
    heartbeat = Heartbeat(obs.heartbeat_interval)
    registry = standard_registry()
    async with ObservabilityServer(
        "test", ("127.0.0.1", 0), registry, prober, heartbeat, obs
    ) as server:
        base = server.url
        assert base.startswith("http://127.0.0.1:")

        status, ctype, body = await asyncio.to_thread(get, base + "/metrics")
        assert status == 200
        assert ctype.startswith("text/plain")
        assert b"process_resident_memory_bytes" in body
        assert b"process_open_fds" in body

        status, ctype, body = await asyncio.to_thread(get, base + "/healthz")
        assert (status, ctype) == (200, "application/json")
        assert json.loads(body)["status"] == "ok"

        async with asyncio.timeout(5):
            while (await asyncio.to_thread(get, base + "/readyz"))[0] != 200:
                await asyncio.sleep(0.02)
        ready = False
        async with asyncio.timeout(5):
            while (status := (await asyncio.to_thread(get, base + "/readyz")))[0] != 503:
                await asyncio.sleep(0.02)
        assert json.loads(status[2])["checks"] == {"thing": "failed: ConnectionError: down"}

        assert (await asyncio.to_thread(get, base + "/nothing"))[0] == 404

        # a blocked event loop: the HTTP threads still answer, /healthz says so
        heartbeat.last -= 5.0
        status, _, body = await asyncio.to_thread(get, base + "/healthz")
        assert status == 503
        assert json.loads(body)["status"] == "stalled"
    with pytest.raises(urllib.error.URLError):  # closed with the context
        await asyncio.to_thread(get, base + "/healthz")


def test_metrics_listen_settings() -> None:
    config = cfgmod.load(env={})
    assert (config.gateway.metrics_listen, config.twin.metrics_listen) == ("", "")  # off
    config = cfgmod.load(
        env={"TWINHUB_GATEWAY_METRICS_LISTEN": ":9464", "TWINHUB_TWIN_METRICS_LISTEN": ":9465"}
    )
    assert cfgmod.parse_hostport(config.gateway.metrics_listen, "x") == ("0.0.0.0", 9464)
    assert cfgmod.parse_hostport(config.twin.metrics_listen, "x") == ("0.0.0.0", 9465)
